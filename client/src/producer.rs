//! Producers: publish to one destination, with a window of unconfirmed messages.
//!
//! A confirm means the broker made the message durable as configured on the
//! broker (its `durability` setting); see the broker's documentation for what
//! each mode promises. Until then the client keeps the message, so that it
//! can resend it after a failover (same producer id and sequence, which the
//! broker stores once); the window bounds that memory and the broker's work
//! per producer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{oneshot, Semaphore};
use twinmq_protocol::{Destination, OutMessage};

use crate::connection::{Command, Commands, EndReason};
use crate::ClientError;

/// Publishes to one destination. Cheap to clone; clones share the producer id,
/// the sequence and the window.
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

    pub fn destination(&self) -> &Destination {
        &self.inner.destination
    }

    /// Messages sent and not yet confirmed (or refused).
    pub fn in_flight(&self) -> usize {
        self.inner.window_size - self.inner.window.available_permits()
    }

    /// Send one message and wait until the broker confirms it.
    pub async fn send(&self, message: impl Into<OutMessage>) -> Result<(), ClientError> {
        self.send_nowait(message).await?.await
    }

    /// Send one message, waiting only for a free slot in the window; the
    /// returned [`Confirm`] resolves when the broker confirms or refuses it.
    /// Confirms of one producer resolve in send order.
    pub async fn send_nowait(&self, message: impl Into<OutMessage>) -> Result<Confirm, ClientError> {
        let inner = &self.inner;
        let permit = inner.window.clone().acquire_owned().await.map_err(|_| ClientError::Closed)?;
        let (done, answer) = oneshot::channel();
        let command = Command::Publish {
            producer_id: inner.id,
            destination: inner.destination.clone(),
            message: message.into(),
            permit,
            done,
        };
        inner.commands.send(command).await?;
        Ok(Confirm { answer, ended: inner.commands.end_reason() })
    }
}

/// The broker's answer to one publish: `Ok(())` once the message is durable.
#[derive(Debug)]
#[must_use = "a Confirm does nothing unless awaited; drop it only if you do not care about the outcome"]
pub struct Confirm {
    answer: oneshot::Receiver<Result<(), ClientError>>,
    /// For the connection's end reason, should the answer never come.
    ended: EndReason,
}

impl Future for Confirm {
    type Output = Result<(), ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        Pin::new(&mut this.answer).poll(cx).map(|answer| answer.unwrap_or_else(|_| Err(this.ended.error())))
    }
}

/// A small builder for [`OutMessage`].
///
/// ```
/// use twinmq_client::Message;
/// let message = Message::persistent("hello").header("kind", "greeting").ttl(std::time::Duration::from_secs(60));
/// let out: twinmq_protocol::OutMessage = message.into();
/// assert!(out.persistent);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message(OutMessage);

impl Message {
    /// Written to the store before it is confirmed.
    pub fn persistent(payload: impl Into<Vec<u8>>) -> Self {
        Message(OutMessage { payload: payload.into(), persistent: true, ..Default::default() })
    }

    /// Kept in memory only; lost if the broker stops.
    pub fn transient(payload: impl Into<Vec<u8>>) -> Self {
        Message(OutMessage { payload: payload.into(), persistent: false, ..Default::default() })
    }

    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.0.headers.insert(key.into(), value.into());
        self
    }

    /// Expire `ttl` after the broker received it (millisecond precision).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.0.ttl_ms = Some(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        self
    }
}

impl From<Message> for OutMessage {
    fn from(message: Message) -> Self {
        message.0
    }
}
