//! Producers: publish to one destination, with a window of unconfirmed messages.
//!
//! A confirm means the broker made the message durable as configured on the
//! broker (its `durability` setting); see the broker's documentation for what
//! each mode promises. Until then the client keeps the message, so that it
//! can resend it after a failover (same producer id and sequence, which the
//! broker stores once); the window bounds that memory and the broker's work
//! per producer.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, Semaphore};
use twinmq_protocol::OutMessage;

use crate::connection::{Command, Commands, EndReason};
use crate::{ClientError, Destination, MessageId};

/// Publishes to one destination. Cheap to clone; clones share the producer id,
/// the sequence and the window.
///
/// ```no_run
/// # async fn demo(client: twinmq_client::Client) -> Result<(), twinmq_client::ClientError> {
/// use twinmq_client::{Destination, Message};
/// let producer = client.producer(Destination::queue("orders"));
/// // One at a time: each send waits for its confirm.
/// let confirmed = producer.send(Message::persistent("order 1")).await?;
/// println!("stored as {:?}", confirmed.id());
/// // Pipelined: up to the window in flight, confirms awaited later (in order).
/// let confirms = producer.send_batch((2..=100).map(|i| Message::persistent(format!("order {i}")))).await?;
/// for confirm in confirms {
///     confirm.await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Producer {
    inner: Arc<ProducerInner>,
}

#[derive(Debug)]
struct ProducerInner {
    /// Random, so that two clients (or two runs) never share an idempotence key.
    id: u64,
    destination: Destination,
    /// One permit per message that may be unconfirmed; a permit travels with
    /// its publish and is released when the confirm or error arrives.
    window: Arc<Semaphore>,
    window_size: usize,
    commands: Commands,
}

impl Drop for ProducerInner {
    fn drop(&mut self) {
        // Best effort: if the queue is full the task keeps a few bytes of state.
        self.commands.try_send(Command::ProducerDropped { producer_id: self.id });
    }
}

impl Producer {
    pub(crate) fn new(destination: Destination, window: usize, commands: Commands) -> Self {
        let window_size = window.max(1);
        Producer {
            inner: Arc::new(ProducerInner {
                id: rand::random(),
                destination,
                window: Arc::new(Semaphore::new(window_size)),
                window_size,
                commands,
            }),
        }
    }

    /// The producer id the broker uses, with the sequence, to store a resend once.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Where this producer publishes.
    pub fn destination(&self) -> &Destination {
        &self.inner.destination
    }

    /// Messages sent and not yet confirmed (or refused).
    pub fn in_flight(&self) -> usize {
        self.inner.window_size - self.inner.window.available_permits()
    }

    /// Send one message and wait until the broker confirms it: stored as
    /// the broker's durability mode promises (fdatasync'd, on both nodes
    /// when `replicated`), or refused with its error.
    pub async fn send(&self, message: Message) -> Result<Confirmed, ClientError> {
        self.send_nowait(message).await?.await
    }

    /// Send one message, waiting only for a free slot in the window; the
    /// returned [`Confirm`] resolves when the broker confirms or refuses it.
    /// Confirms of one producer resolve in send order.
    pub async fn send_nowait(&self, message: Message) -> Result<Confirm, ClientError> {
        let inner = &self.inner;
        let permit = inner.window.clone().acquire_owned().await.map_err(|_| ClientError::Closed)?;
        let (done, answer) = oneshot::channel();
        let command = Command::Publish {
            producer_id: inner.id,
            destination: inner.destination.to_wire(),
            message: message.into_wire(),
            permit,
            done,
        };
        inner.commands.send(command).await?;
        Ok(Confirm { answer, ended: inner.commands.end_reason() })
    }

    /// Send several messages in order, each as [`Producer::send_nowait`]
    /// (so at most the window is in flight: this waits for earlier confirms
    /// when it must), and return their confirms, in the same order. An
    /// error stops the batch: the messages before it were sent and their
    /// confirms are lost with the returned error, so await confirms one by
    /// one with `send_nowait` if you need each outcome then.
    pub async fn send_batch(&self, messages: impl IntoIterator<Item = Message>) -> Result<Vec<Confirm>, ClientError> {
        let mut confirms = Vec::new();
        for message in messages {
            confirms.push(self.send_nowait(message).await?);
        }
        Ok(confirms)
    }
}

/// What the broker said of a confirmed publish.
///
/// ```no_run
/// # async fn demo(producer: twinmq_client::Producer) -> Result<(), twinmq_client::ClientError> {
/// let confirmed = producer.send(twinmq_client::Message::persistent("x")).await?;
/// if confirmed.duplicate() {
///     // A resend after a failover: the first attempt was stored and is the one consumers get.
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Confirmed {
    id: Option<MessageId>,
    duplicate: bool,
}

impl Confirmed {
    pub(crate) fn new(id: Option<MessageId>, duplicate: bool) -> Self {
        Confirmed { id, duplicate }
    }

    /// The id consumers will get the message under (see [`MessageId`]).
    /// `None` for a duplicate and from brokers older than 0.1.0's confirm ids.
    pub fn id(&self) -> Option<MessageId> {
        self.id
    }

    /// Nothing was stored by this send: the broker had stored this
    /// producer's message under the same sequence before (the client
    /// resent it after a failover; the first copy counts).
    pub fn duplicate(&self) -> bool {
        self.duplicate
    }
}

/// The broker's answer to one publish: [`Confirmed`] once the message is
/// durable, or the broker's refusal. Resolves even if the client is gone
/// (with the reason).
///
/// ```no_run
/// # async fn demo(producer: twinmq_client::Producer) -> Result<(), twinmq_client::ClientError> {
/// let confirm = producer.send_nowait(twinmq_client::Message::persistent("x")).await?;
/// // ... send more, then:
/// let confirmed = confirm.await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "a Confirm does nothing unless awaited; drop it only if you do not care about the outcome"]
pub struct Confirm {
    answer: oneshot::Receiver<Result<Confirmed, ClientError>>,
    /// For the connection's end reason, should the answer never come.
    ended: EndReason,
}

impl Future for Confirm {
    type Output = Result<Confirmed, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        Pin::new(&mut this.answer).poll(cx).map(|answer| answer.unwrap_or_else(|_| Err(this.ended.error())))
    }
}

/// A message to publish: a payload ([`Bytes`], so that a payload shared
/// with other parts of an application is not copied), headers, a time to
/// live and whether it is persistent.
///
/// ```
/// use twinmq_client::Message;
/// let message = Message::persistent("hello").header("kind", "greeting").ttl(std::time::Duration::from_secs(60));
/// assert!(message.is_persistent());
/// assert_eq!(message.payload().as_ref(), b"hello");
/// assert_eq!(message.headers().get("kind").map(String::as_str), Some("greeting"));
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    payload: Bytes,
    headers: BTreeMap<String, String>,
    ttl: Option<Duration>,
    persistent: bool,
}

impl Message {
    /// Written to the store before it is confirmed.
    pub fn persistent(payload: impl Into<Bytes>) -> Self {
        Message { payload: payload.into(), persistent: true, ..Default::default() }
    }

    /// Kept in memory only; lost if the broker stops.
    pub fn transient(payload: impl Into<Bytes>) -> Self {
        Message { payload: payload.into(), persistent: false, ..Default::default() }
    }

    /// Add (or replace) a header; at most 64 per message, counted in the
    /// broker's `max_message_bytes`.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// Expire `ttl` after the broker received it (millisecond precision).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The headers, by name.
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }

    /// The time to live, if any.
    pub fn time_to_live(&self) -> Option<Duration> {
        self.ttl
    }

    /// Whether the broker stores it before confirming.
    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    /// The wire form; the payload is moved, not copied, when this message
    /// holds the only reference to it.
    pub(crate) fn into_wire(self) -> OutMessage {
        OutMessage {
            headers: self.headers,
            payload: Vec::from(self.payload),
            ttl_ms: self.ttl.map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            persistent: self.persistent,
        }
    }
}
