//! Consumers: deliveries of one subscription, and their acknowledgements.
//!
//! Delivery is at-least-once: a delivery that is not acked goes back to the
//! destination when the consumer ends (unsubscribe, drop, lost connection) and
//! is delivered again, flagged `redelivered`.

use tokio::sync::mpsc;
use twinmq_protocol::{Delivered, Destination};

use crate::connection::Command;
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
    /// Filled by the connection task; bounded by the prefetch (see `connection`).
    deliveries: mpsc::Receiver<Result<Delivery, ClientError>>,
    commands: mpsc::Sender<Command>,
    unsubscribed: bool,
}

impl Consumer {
    pub(crate) fn new(
        sub_id: u32,
        destination: Destination,
        deliveries: mpsc::Receiver<Result<Delivery, ClientError>>,
        commands: mpsc::Sender<Command>,
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
        self.deliveries.recv().await
    }

    /// Stop consuming; the broker puts unacknowledged deliveries back.
    pub async fn unsubscribe(mut self) -> Result<(), ClientError> {
        self.unsubscribed = true;
        let command = Command::Unsubscribe { sub_id: self.sub_id };
        self.commands.send(command).await.map_err(|_| ClientError::Disconnected)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if !self.unsubscribed {
            // Best effort; otherwise the task unsubscribes at the next delivery.
            let _ = self.commands.try_send(Command::Unsubscribe { sub_id: self.sub_id });
        }
    }
}

/// One delivered message, to be acked (or nacked) once processed.
#[derive(Debug)]
pub struct Delivery {
    sub_id: u32,
    message: Delivered,
    commands: mpsc::Sender<Command>,
}

impl Delivery {
    pub(crate) fn new(sub_id: u32, message: Delivered, commands: mpsc::Sender<Command>) -> Self {
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
        self.commands.send(command).await.map_err(|_| ClientError::Disconnected)
    }

    /// Give the message back for redelivery (counts as a delivery attempt).
    pub async fn nack(self) -> Result<(), ClientError> {
        let command = Command::Nack { sub_id: self.sub_id, id: self.message.id };
        self.commands.send(command).await.map_err(|_| ClientError::Disconnected)
    }
}
