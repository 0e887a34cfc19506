//! The [`Client`] handle: connect, then create producers and consumers.

use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{info_span, Instrument};
use twinmq_protocol::Destination;

use crate::connection::{request, Command, Connection, SubscriptionSpec, COMMAND_QUEUE};
use crate::link::ServerInfo;
use crate::{connect, ClientConfig, ClientError, Consumer, Producer, SubscribeOptions};

/// A connection to the active node of a twinmq pair. Cheap to clone; the
/// connection closes when [`Client::close`] is called or when every handle
/// (clients, producers, consumers, deliveries) is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    server: Arc<ServerInfo>,
    window: usize,
}

impl Client {
    /// Connect to the active node of `config.servers` and start the
    /// connection task. Addresses are tried in order; a `NotActive` answer's
    /// hint is tried next (once), then the rest. Wrong credentials fail at
    /// once; otherwise the error of the last attempt is returned. Must be
    /// called inside a tokio runtime.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let (link, server) = connect::find_active(&config).await?;
        let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
        let span = info_span!("twinmq_connection", addr = %server.addr, node = %server.node_id);
        let connection = Connection::new(receiver, commands.downgrade(), config.close_timeout);
        tokio::spawn(connection.run(link).instrument(span));
        Ok(Client { commands, server: Arc::new(server), window: config.window })
    }

    /// The node this client is connected to.
    pub fn server(&self) -> &ServerInfo {
        &self.server
    }

    /// A producer for `destination`, with the configured window.
    pub fn producer(&self, destination: Destination) -> Producer {
        Producer::new(destination, self.window, self.commands.clone())
    }

    /// Start consuming `destination`; resolves once the broker registered the
    /// consumer, or with its refusal. A prefetch of 0 is taken as 1.
    pub async fn subscribe(
        &self,
        destination: Destination,
        options: SubscribeOptions,
    ) -> Result<Consumer, ClientError> {
        let prefetch = options.prefetch.max(1);
        // One slot more than the prefetch: room for the error that ends the stream.
        let capacity = usize::try_from(prefetch).unwrap_or(usize::MAX).saturating_add(1);
        let (deliveries, receiver) = mpsc::channel(capacity);
        let spec = SubscriptionSpec { destination: destination.clone(), durable: options.durable, prefetch };
        let sub_id = request(&self.commands, |done| Command::Subscribe { spec, deliveries, done }).await?;
        Ok(Consumer::new(sub_id, destination, receiver, self.commands.clone()))
    }

    /// Remove the durable subscription `name` of `topic` and the messages it holds.
    pub async fn delete_durable(&self, topic: impl Into<String>, name: impl Into<String>) -> Result<(), ClientError> {
        let (topic, name) = (topic.into(), name.into());
        request(&self.commands, |done| Command::DeleteDurable { topic, name, done }).await
    }

    /// The node's status, as JSON.
    pub async fn status(&self) -> Result<String, ClientError> {
        request(&self.commands, |done| Command::Status { done }).await
    }

    /// Close the connection in order: refuse new work, wait for outstanding
    /// confirms (up to `close_timeout`; `Err(Timeout)` if some never came),
    /// send everything queued (acks included), say Bye and wait for the broker
    /// to close. Consumers then end with `None`.
    pub async fn close(&self) -> Result<(), ClientError> {
        request(&self.commands, |done| Command::Close { done }).await
    }
}
