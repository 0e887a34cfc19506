//! The [`Client`] handle: connect, then create producers and consumers.

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, watch};
use tracing::{info_span, Instrument};

use crate::admin::AdminClient;
use crate::connection::{request, Command, Commands, Connection, SubscriptionSpec};
use crate::events::{ClientEvent, Events};
use crate::link::{ServerInfo, TicketSlot};
use crate::{dial, ClientConfig, ClientError, Consumer, Destination, NodeStatus, Producer, SubscribeOptions};

/// A connection to the active node of a twinmq pair that follows the
/// active role across failovers (see the crate docs for the contract).
/// Cheap to clone; the connection closes when [`Client::close`] is called or
/// when every handle (clients, producers, consumers, deliveries) is dropped.
///
/// ```no_run
/// # async fn demo() -> Result<(), twinmq_client::ClientError> {
/// use twinmq_client::{Client, ClientConfig, ClientEvent};
/// let client = Client::connect(ClientConfig::new(["10.0.0.1:5570", "10.0.0.2:5570"])).await?;
/// println!("connected to {} ({})", client.server().node_id, client.server().addr);
/// let mut events = client.events();
/// tokio::spawn(async move {
///     while let Ok(event) = events.recv().await {
///         if let ClientEvent::Connected { addr, .. } = event {
///             println!("now on {addr}");
///         }
///     }
/// });
/// client.close().await
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    commands: Commands,
    server: watch::Receiver<ServerInfo>,
    events: Events,
    window: usize,
}

impl Client {
    /// Connect to the active node of `config.servers` and start the
    /// connection task. Addresses are tried in order (one that does not
    /// answer delays the next by at most 150 ms); a `NotActive` answer's hint
    /// is tried next (once per round). While no node is active (every one is
    /// passive or unreachable, as during a failover) the rounds repeat with a
    /// short backoff until `failover_timeout`; then the error of the last
    /// attempt is returned. Wrong credentials fail at once. Must be called
    /// inside a tokio runtime.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let config = Arc::new(config);
        let ticket = TicketSlot::default();
        let (link, server) = dial::find_active(config.clone(), ticket.clone()).await?;
        let (commands, receiver) = Commands::channel();
        let (server_tx, server_rx) = watch::channel(server.clone());
        let events = Events::new(config.on_event.clone());
        // Before the task starts, so that a watcher subscribing after this
        // call returns never sees it as a reconnect.
        events.emit(ClientEvent::Connected { addr: server.addr.clone(), node_id: server.node_id.clone() });
        let span = info_span!("twinmq_connection", client = %config.client_name);
        let window = config.window;
        let connection = Connection::new(receiver, &commands, ticket, config, events.clone(), server_tx);
        tokio::spawn(connection.run(link, server).instrument(span));
        Ok(Client { commands, server: server_rx, events, window })
    }

    /// An admin connection (status, switchover, promote) to the first node
    /// of `config.servers` that welcomes it, passive or active; see [`AdminClient`].
    pub async fn admin(config: ClientConfig) -> Result<AdminClient, ClientError> {
        AdminClient::connect(&config).await
    }

    /// The node this client is connected to, or was last connected to while
    /// it reconnects.
    pub fn server(&self) -> ServerInfo {
        self.server.borrow().clone()
    }

    /// Watch the connection's life: disconnects, reconnect rounds, new
    /// connections, resubscriptions, resends (see [`ClientEvent`]). Only
    /// events after this call are received.
    pub fn events(&self) -> broadcast::Receiver<ClientEvent> {
        self.events.subscribe()
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
        let (deliveries, receiver) = mpsc::unbounded_channel();
        let spec = SubscriptionSpec { destination: destination.to_wire(), durable: options.durable, prefetch };
        let sub_id = request(&self.commands, |done| Command::Subscribe { spec, deliveries, done }).await?;
        Ok(Consumer::new(sub_id, destination, receiver, self.commands.clone()))
    }

    /// Remove the durable subscription `name` of `topic` and the messages it
    /// holds. Interrupted by a failover, the request is sent again to the new
    /// active node, which refuses it if the first one had already taken effect.
    pub async fn delete_durable(&self, topic: impl Into<String>, name: impl Into<String>) -> Result<(), ClientError> {
        let (topic, name) = (topic.into(), name.into());
        request(&self.commands, |done| Command::DeleteDurable { topic, name, done }).await
    }

    /// The status of the node this client is connected to (see
    /// [`NodeStatus`]; needs an admin grant when the broker has users).
    pub async fn status(&self) -> Result<NodeStatus, ClientError> {
        NodeStatus::parse(request(&self.commands, |done| Command::Status { done }).await?)
    }

    /// Close the connection in order: refuse new work, wait for outstanding
    /// confirms (up to `close_timeout`, reconnecting if need be; `Err(Timeout)`
    /// if some never came), send everything queued (acks included), say Bye
    /// and wait for the broker to close. Consumers then end with `None`.
    pub async fn close(&self) -> Result<(), ClientError> {
        request(&self.commands, |done| Command::Close { done }).await
    }
}
