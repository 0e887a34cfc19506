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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use twinmq_protocol::{Delivered, Destination};

use crate::connection::{Command, Commands};
use crate::ClientError;

/// How to subscribe.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    pub fn durable(mut self, name: impl Into<String>) -> Self {
        self.durable = Some(name.into());
        self
    }

    pub fn prefetch(mut self, prefetch: u32) -> Self {
        self.prefetch = prefetch;
        self
    }
}

/// Receives the deliveries of one subscription. Dropping it unsubscribes.
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

/// One delivered message, to be acked (or nacked) once processed.
#[derive(Debug)]
pub struct Delivery {
    sub_id: u32,
    message: Delivered,
    commands: Commands,
}

impl Delivery {
    pub(crate) fn new(sub_id: u32, message: Delivered, commands: Commands) -> Self {
        Delivery { sub_id, message, commands }
    }

    pub fn message(&self) -> &Delivered {
        &self.message
    }

    pub fn payload(&self) -> &[u8] {
        &self.message.payload
    }

    /// The message, giving up the possibility to ack it here.
    pub fn into_message(self) -> Delivered {
        self.message
    }

    /// Acknowledge: the broker forgets the message. Resolves once the ack is
    /// queued on the connection (the protocol does not answer acks).
    pub async fn ack(self) -> Result<(), ClientError> {
        let command = Command::Ack { sub_id: self.sub_id, id: self.message.id };
        self.commands.send(command).await
    }

    /// Give the message back for redelivery (counts as a delivery attempt).
    pub async fn nack(self) -> Result<(), ClientError> {
        let command = Command::Nack { sub_id: self.sub_id, id: self.message.id };
        self.commands.send(command).await
    }
}
