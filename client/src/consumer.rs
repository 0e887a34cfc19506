//! Consumers: deliveries of one subscription, and their acknowledgements.
//!
//! Delivery is at-least-once: a delivery that is not acked goes back to the
//! destination when the consumer ends (unsubscribe, drop, lost connection) and
//! is delivered again, flagged `redelivered`.
//!
//! A consumer outlives a failover: the client re-creates its subscription
//! on the new connection under the same id. Deliveries that were already
//! handed to the consumer stay valid; the broker redelivers the unacked ones
//! anyway, so after a failover a consumer may see a message twice.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::{mpsc, oneshot};
use twinmq_protocol::Delivered;

use crate::connection::{Command, Commands, SettleHow};
use crate::{ClientError, Destination, MessageId};

/// How to subscribe.
///
/// ```
/// use twinmq_client::SubscribeOptions;
/// let options = SubscribeOptions::default().durable("billing").prefetch(64);
/// assert_eq!((options.durable.as_deref(), options.prefetch), (Some("billing"), 64));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// Name of a durable subscription (topics only): it keeps messages while
    /// no consumer is attached and survives restarts and failover.
    pub durable: Option<String>,
    /// Most unacknowledged deliveries the broker sends to this consumer (at least 1).
    pub prefetch: u32,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions { durable: None, prefetch: 256 }
    }
}

impl SubscribeOptions {
    /// A durable subscription of this name (topics only).
    pub fn durable(mut self, name: impl Into<String>) -> Self {
        self.durable = Some(name.into());
        self
    }

    /// At most this many unacknowledged deliveries at a time (at least 1).
    pub fn prefetch(mut self, prefetch: u32) -> Self {
        self.prefetch = prefetch;
        self
    }
}

/// Receives the deliveries of one subscription, by [`Consumer::recv`] or
/// as a [`Stream`]. Dropping it unsubscribes.
///
/// ```no_run
/// # async fn demo(client: twinmq_client::Client) -> Result<(), twinmq_client::ClientError> {
/// use futures_util::StreamExt;
/// use twinmq_client::{Destination, SubscribeOptions};
/// let mut consumer = client.subscribe(Destination::queue("orders"), SubscribeOptions::default()).await?;
/// while let Some(delivery) = consumer.next().await {
///     let delivery = delivery?;
///     println!("{}: {} bytes", delivery.id(), delivery.payload().len());
///     delivery.ack().await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Consumer {
    sub_id: u32,
    destination: Destination,
    /// Filled by the connection task. Unbounded because deliveries of an
    /// earlier connection may still wait here when the new connection's
    /// prefetch starts; the task bounds what each connection adds (see
    /// [`Inbound`]).
    deliveries: mpsc::UnboundedReceiver<Inbound>,
    commands: Commands,
    unsubscribed: bool,
}

impl Consumer {
    pub(crate) fn new(
        sub_id: u32,
        destination: Destination,
        deliveries: mpsc::UnboundedReceiver<Inbound>,
        commands: Commands,
    ) -> Self {
        Consumer { sub_id, destination, deliveries, commands, unsubscribed: false }
    }

    /// What this consumer receives from.
    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    /// The next delivery; `Some(Err(_))` when the consumer ended abnormally
    /// (lost connection, closed by the broker), then `None`. `None` also after
    /// the client was closed.
    pub async fn recv(&mut self) -> Option<Result<Delivery, ClientError>> {
        self.deliveries.recv().await.map(Inbound::take)
    }

    /// Stop consuming; the broker puts unacknowledged deliveries back.
    pub async fn unsubscribe(mut self) -> Result<(), ClientError> {
        self.unsubscribed = true;
        let command = Command::Unsubscribe { sub_id: self.sub_id };
        self.commands.send(command).await
    }
}

/// The deliveries, as [`Consumer::recv`] gives them: `Err` once when the
/// consumer ends abnormally, then the end of the stream.
impl Stream for Consumer {
    type Item = Result<Delivery, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.deliveries.poll_recv(cx).map(|item| item.map(Inbound::take))
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if !self.unsubscribed {
            // Best effort; otherwise the task unsubscribes at the next delivery.
            self.commands.try_send(Command::Unsubscribe { sub_id: self.sub_id });
        }
    }
}

/// What the connection task hands a consumer.
#[derive(Debug)]
pub(crate) struct Inbound {
    item: Result<Delivery, ClientError>,
    /// For a delivery: how many deliveries of the connection that made it
    /// wait in the channel, decremented when the consumer takes this one.
    /// The broker never has more than `prefetch` unacked deliveries on one
    /// connection, so this never exceeds it; the task checks that.
    waiting: Option<Arc<AtomicUsize>>,
}

impl Inbound {
    /// A delivery, counted in `waiting` until the consumer takes it.
    pub(crate) fn delivery(delivery: Delivery, waiting: &Arc<AtomicUsize>) -> Self {
        waiting.fetch_add(1, Ordering::Relaxed);
        Inbound { item: Ok(delivery), waiting: Some(waiting.clone()) }
    }

    /// The error that ends the consumer.
    pub(crate) fn end(error: ClientError) -> Self {
        Inbound { item: Err(error), waiting: None }
    }

    fn take(self) -> Result<Delivery, ClientError> {
        if let Some(waiting) = &self.waiting {
            waiting.fetch_sub(1, Ordering::Relaxed);
        }
        self.item
    }
}

/// A message as a consumer receives it. Fields are public for reading
/// (the struct is `#[non_exhaustive]`: later releases may add some).
///
/// ```no_run
/// # fn demo(delivery: twinmq_client::Delivery) {
/// let message = delivery.into_message(); // keeps it, gives up acking it here
/// if message.redelivered {
///     println!("{} again ({} deliveries before)", message.id, message.delivery_count);
/// }
/// let age = message.timestamp.elapsed().unwrap_or_default();
/// println!("{} bytes from {}, {age:?} old", message.payload.len(), message.destination);
/// # }
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ReceivedMessage {
    /// The broker's id, the same in every delivery of this message.
    pub id: MessageId,
    /// Where it was published.
    pub destination: Destination,
    /// The headers, as published (a dead-lettered message gains two).
    pub headers: BTreeMap<String, String>,
    /// The payload.
    pub payload: Bytes,
    /// When the broker accepted it.
    pub timestamp: SystemTime,
    /// When it expires, if it has a time to live.
    pub expires_at: Option<SystemTime>,
    /// Stored by the broker (not kept in memory only).
    pub persistent: bool,
    /// It may have been delivered before (to this or another consumer).
    pub redelivered: bool,
    /// How many times it was delivered before this delivery.
    pub delivery_count: u32,
}

impl ReceivedMessage {
    fn from_wire(m: Delivered) -> Self {
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        ReceivedMessage {
            id: MessageId::from_wire(m.id),
            destination: Destination::from_wire(m.destination),
            headers: m.headers,
            payload: Bytes::from(m.payload),
            timestamp: at(m.timestamp_ms),
            expires_at: m.expires_at_ms.map(at),
            persistent: m.persistent,
            redelivered: m.redelivered,
            delivery_count: m.delivery_count,
        }
    }
}

/// One delivered message, to be acked (or nacked) once processed.
///
/// ```no_run
/// # async fn demo(mut consumer: twinmq_client::Consumer) -> Result<(), twinmq_client::ClientError> {
/// use twinmq_client::ClientError;
/// if let Some(delivery) = consumer.recv().await {
///     let delivery = delivery?;
///     if delivery.payload().is_empty() {
///         delivery.nack().await?; // back to the queue, delivered again
///     } else {
///         match delivery.ack().await {
///             Ok(()) => {}
///             // Not sent (failover in progress): it comes back, flagged redelivered.
///             Err(ClientError::NotSettled { .. }) => {}
///             Err(e) => return Err(e),
///         }
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Delivery {
    sub_id: u32,
    message: ReceivedMessage,
    commands: Commands,
}

impl Delivery {
    pub(crate) fn new(sub_id: u32, message: Delivered, commands: Commands) -> Self {
        Delivery { sub_id, message: ReceivedMessage::from_wire(message), commands }
    }

    /// The message and what the broker says of it.
    pub fn message(&self) -> &ReceivedMessage {
        &self.message
    }

    /// The broker's id of the message: deduplicate redeliveries by it.
    pub fn id(&self) -> MessageId {
        self.message.id
    }

    /// The payload, borrowed.
    pub fn payload(&self) -> &[u8] {
        &self.message.payload
    }

    /// The payload as [`Bytes`]: shares the buffer (no copy), to keep or
    /// hand on after the delivery is acked.
    pub fn payload_bytes(&self) -> Bytes {
        self.message.payload.clone()
    }

    /// The message, giving up the possibility to ack it here (it is
    /// delivered again once this consumer ends).
    pub fn into_message(self) -> ReceivedMessage {
        self.message
    }

    /// Acknowledge: the broker forgets the message. `Ok` once the ack is
    /// queued on the connection that carries this consumer (the broker
    /// settles it when it arrives; a connection lost before that makes the
    /// message come back, flagged redelivered: consumers must be
    /// idempotent, as with every at-least-once broker).
    /// `Err(`[`ClientError::NotSettled`]`)` when it could not be sent: the
    /// consumer is closed or the client is between connections; the message
    /// will be delivered again.
    pub async fn ack(self) -> Result<(), ClientError> {
        self.settle(SettleHow::Ack).await
    }

    /// Acknowledge and wait for the broker to say it has the ack: `Ok` once
    /// the ack is stored as its durability mode promises (fdatasync'd; on
    /// both nodes when `replicated`), so the message will not come back even
    /// after a failover. `Err(`[`ClientError::NotSettled`]`)` when the ack
    /// settled nothing (the delivery timed out, or a failover came first:
    /// the message is delivered again) or could not be sent. Costs a round
    /// trip and a commit per call, where [`Delivery::ack`] costs neither.
    /// Needs a broker of protocol version 2, as [`Delivery::nack_after`].
    ///
    /// ```no_run
    /// # async fn demo(delivery: twinmq_client::Delivery) -> Result<(), twinmq_client::ClientError> {
    /// // E.g. before telling a user their order was taken off the queue for good.
    /// delivery.ack_stored().await?;
    /// # Ok(()) }
    /// ```
    pub async fn ack_stored(self) -> Result<(), ClientError> {
        self.settle(SettleHow::AckStored).await
    }

    /// Acknowledge this delivery and every earlier one (lower
    /// [`MessageId`]) that this consumer holds unacknowledged: one frame for
    /// a run of deliveries processed in order. Answers as [`Delivery::ack`]
    /// does; needs a broker of protocol version 2, as [`Delivery::nack_after`].
    /// The earlier [`Delivery`] values may simply be dropped.
    ///
    /// ```no_run
    /// # async fn demo(mut consumer: twinmq_client::Consumer) -> Result<(), twinmq_client::ClientError> {
    /// let mut last = None;
    /// for _ in 0..100 {
    ///     let Some(delivery) = consumer.recv().await else { break };
    ///     let delivery = delivery?;
    ///     // ... process it ...
    ///     last = Some(delivery);
    /// }
    /// if let Some(last) = last {
    ///     last.ack_through().await?; // the hundred in one ack
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn ack_through(self) -> Result<(), ClientError> {
        self.settle(SettleHow::AckThrough).await
    }

    /// Give the message back for redelivery (counts as a delivery attempt:
    /// past the queue's `max_redeliveries` it goes to the dead-letter queue).
    /// Answers as [`Delivery::ack`] does.
    pub async fn nack(self) -> Result<(), ClientError> {
        self.settle(SettleHow::Nack { delay: None }).await
    }

    /// Give the message back, to be redelivered no sooner than `delay` from
    /// now (at most an hour; longer is cut to it): a retry with a back-off.
    /// Meanwhile it counts in the queue's depth, goes to no one else, and a
    /// failover redelivers it at once. Needs a broker of protocol version 2
    /// (`Err(`[`ClientError::Unsupported`]`)` otherwise, nothing sent).
    ///
    /// ```no_run
    /// # async fn demo(delivery: twinmq_client::Delivery) -> Result<(), twinmq_client::ClientError> {
    /// delivery.nack_after(std::time::Duration::from_secs(5)).await?; // the downstream is busy: later
    /// # Ok(()) }
    /// ```
    pub async fn nack_after(self, delay: Duration) -> Result<(), ClientError> {
        self.settle(SettleHow::Nack { delay: Some(delay) }).await
    }

    /// Never deliver this message again (a poison message): it goes to the
    /// queue's dead-letter queue now, or, without one, is dropped as if
    /// acked. Needs a broker of protocol version 2, as
    /// [`Delivery::nack_after`].
    pub async fn terminate(self) -> Result<(), ClientError> {
        self.settle(SettleHow::Terminate).await
    }

    async fn settle(self, how: SettleHow) -> Result<(), ClientError> {
        let (done, answer) = oneshot::channel();
        let command = Command::Settle { sub_id: self.sub_id, id: self.message.id.to_wire(), how, done };
        self.commands.send(command).await?;
        answer.await.unwrap_or_else(|_| Err(self.commands.ended()))
    }
}
