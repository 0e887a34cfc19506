//! What the connection task reports about its connection, for applications
//! that want to watch a failover happen (and for logs: every event is also
//! one INFO line).

use tokio::sync::broadcast;
use tracing::info;

use crate::EventHook;

/// Room for events not yet read by a slow watcher; past it the watcher
/// gets `RecvError::Lagged` and misses the oldest ones, the client never waits.
pub(crate) const EVENT_CAPACITY: usize = 64;

/// One step of the client's connection life, in the order they happen:
/// `Connected`, then on a loss `Disconnected`, `Reconnecting` (once per
/// round over the addresses), `Connected`, `Resubscribed`, `Resent`; or, when
/// `failover_timeout` passes first (or the credentials are refused),
/// `GaveUp`, after which every pending operation has failed.
///
/// ```
/// use twinmq_client::ClientEvent;
/// fn alert(event: &ClientEvent) -> Option<String> {
///     match event {
///         ClientEvent::GaveUp { reason } => Some(format!("twinmq unreachable: {reason}")),
///         _ => None, // the enum is #[non_exhaustive]
///     }
/// }
/// # let _ = alert;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// The connection to `addr` is gone; the client starts reconnecting.
    Disconnected {
        /// The node's address.
        addr: String,
        /// What ended the connection.
        reason: String,
    },
    /// Round `attempt` (from 1) over the addresses has started.
    Reconnecting {
        /// The round, from 1.
        attempt: u32,
    },
    /// `addr` (node `node_id`) welcomed us; for a reconnect, subscriptions
    /// are re-created next.
    Connected {
        /// The node's address.
        addr: String,
        /// The node's id (its `node_id` setting).
        node_id: String,
    },
    /// After a reconnect: `count` subscriptions are registered again (those
    /// the broker refused ended their consumer with its error).
    Resubscribed {
        /// Subscriptions registered again.
        count: usize,
    },
    /// After a reconnect: `count` unconfirmed publishes were sent again (with
    /// their original producer id and sequence), followed by those queued
    /// during the outage.
    Resent {
        /// Publishes sent again.
        count: usize,
    },
    /// No active node within `failover_timeout`, or a final refusal: pending
    /// operations failed and the client is closed.
    GaveUp {
        /// Why.
        reason: String,
    },
}

impl std::fmt::Display for ClientEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientEvent::Disconnected { addr, reason } => write!(f, "disconnected from {addr}: {reason}"),
            ClientEvent::Reconnecting { attempt } => write!(f, "reconnecting (round {attempt})"),
            ClientEvent::Connected { addr, node_id } => write!(f, "connected to {addr} (node {node_id})"),
            ClientEvent::Resubscribed { count } => write!(f, "{count} subscriptions re-created"),
            ClientEvent::Resent { count } => write!(f, "{count} unconfirmed publishes resent"),
            ClientEvent::GaveUp { reason } => write!(f, "gave up: {reason}"),
        }
    }
}

/// The sending side, owned by the connection task; the [`crate::Client`]
/// keeps a clone so that watchers can subscribe at any time.
#[derive(Debug, Clone)]
pub(crate) struct Events {
    sender: broadcast::Sender<ClientEvent>,
    hook: Option<EventHook>,
}

impl Events {
    pub(crate) fn new(hook: Option<EventHook>) -> Self {
        Events { sender: broadcast::channel(EVENT_CAPACITY).0, hook }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<ClientEvent> {
        self.sender.subscribe()
    }

    /// Log `event` and hand it to the watchers (if any).
    pub(crate) fn emit(&self, event: ClientEvent) {
        info!(%event, "twinmq client");
        if let Some(hook) = &self.hook {
            (hook.0)(&event);
        }
        // No watcher is fine: events are optional reading.
        let _ = self.sender.send(event);
    }
}
