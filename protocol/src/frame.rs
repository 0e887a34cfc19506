//! Wire types exchanged between a client and a broker.
//!
//! Every frame on the wire is `u32 length (big endian) | u8 version | MessagePack body`
//! (see [`crate::codec`]). The body is a [`ClientFrame`] (client to broker) or a
//! [`ServerFrame`] (broker to client). Types here carry no behaviour beyond
//! small helpers, so that broker and client agree on them by construction.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The protocol version this crate speaks. A frame carrying another version is
/// answered with [`ErrorCode::UnsupportedVersion`] and the connection closed.
pub const PROTOCOL_VERSION: u8 = 1;

/// Which kind of destination a name refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DestKind {
    /// Point to point: each message goes to one consumer.
    Queue,
    /// Publish/subscribe: every subscriber gets every message.
    Topic,
}

/// A destination: a queue or a topic, by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Destination {
    pub kind: DestKind,
    pub name: String,
}

impl Destination {
    pub fn queue(name: impl Into<String>) -> Self {
        Destination { kind: DestKind::Queue, name: name.into() }
    }
    pub fn topic(name: impl Into<String>) -> Self {
        Destination { kind: DestKind::Topic, name: name.into() }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            DestKind::Queue => write!(f, "queue:{}", self.name),
            DestKind::Topic => write!(f, "topic:{}", self.name),
        }
    }
}

/// A message as a producer hands it over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct OutMessage {
    pub headers: BTreeMap<String, String>,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// Time to live in milliseconds from the broker's receipt; `None`: never expires.
    pub ttl_ms: Option<u64>,
    /// Persistent messages are written to the store before they are confirmed.
    pub persistent: bool,
}

/// A message as a consumer receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivered {
    /// Broker-assigned id, unique across the pair and its epochs.
    pub id: MessageId,
    pub destination: Destination,
    pub headers: BTreeMap<String, String>,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// Milliseconds since the Unix epoch at which the broker accepted it.
    pub timestamp_ms: u64,
    /// Absolute expiry, milliseconds since the Unix epoch.
    pub expires_at_ms: Option<u64>,
    pub persistent: bool,
    /// True when this message may have been delivered before.
    pub redelivered: bool,
    /// How many times it was delivered before this delivery.
    pub delivery_count: u32,
}

/// Message id: the epoch the broker was in and the store sequence of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId {
    pub epoch: u64,
    pub seq: u64,
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.epoch, self.seq)
    }
}

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// First frame on every connection.
    Hello {
        client_name: String,
        user: Option<String>,
        password: Option<String>,
        /// An admin connection (status, switchover, promote) is accepted by
        /// every node, the passive one too, and carries no messaging.
        #[serde(default)]
        admin: bool,
    },
    /// Store and route a message. Confirmed with [`ServerFrame::Confirm`]
    /// carrying the same `producer_id`/`seq`, or answered with an error.
    /// `(producer_id, seq)` is the idempotence key: a resend is stored once.
    Publish {
        producer_id: u64,
        seq: u64,
        destination: Destination,
        message: OutMessage,
    },
    /// Start consuming. `durable` names a durable subscription (topics only).
    Subscribe {
        sub_id: u32,
        destination: Destination,
        durable: Option<String>,
        /// Maximum unacknowledged deliveries in flight to this consumer.
        prefetch: u32,
    },
    /// Stop a consumer; its unacknowledged messages go back to the queue.
    Unsubscribe {
        sub_id: u32,
    },
    /// Remove a durable subscription and the messages it holds.
    DeleteDurable {
        req: u64,
        topic: String,
        name: String,
    },
    /// Acknowledge one delivery.
    Ack {
        sub_id: u32,
        id: MessageId,
    },
    /// Give one delivery back for redelivery (counts as a delivery attempt).
    Nack {
        sub_id: u32,
        id: MessageId,
    },
    /// Ask for the node's status (JSON).
    Status {
        req: u64,
    },
    Ping {
        nonce: u64,
    },
    /// An operator command (admin connections only); answered with `Done { req }`,
    /// `AdminReply { req, .. }` (listings) or an error. `force` lets a change
    /// of destinations, users or ACLs through while the pair is split.
    Admin {
        req: u64,
        command: AdminCommand,
        #[serde(default)]
        force: bool,
    },
    /// Orderly goodbye.
    Bye,
}

/// Operator commands over an admin connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminCommand {
    /// Hand the active role to the in-sync passive peer (send it to the active
    /// node; a passive node answers `NotActive`).
    Switchover,
    /// Make this passive node active without waiting for its peer. `force` is
    /// required: the operator asserts the peer is dead.
    Promote {
        force: bool,
    },
    /// Create a user. The password travels hashed (argon2 PHC string): the
    /// broker never sees it.
    UserAdd {
        name: String,
        password_hash: String,
        grants: Vec<AclGrant>,
    },
    /// Replace a user's password hash.
    UserPasswd {
        name: String,
        password_hash: String,
    },
    /// Remove a user; their open connections are closed.
    UserRm {
        name: String,
    },
    /// Users and their grants (JSON in `AdminReply`).
    UserList,
    /// Allow `grant.permission` on destinations matching `grant.pattern`.
    AclGrant {
        user: String,
        grant: AclGrant,
    },
    /// Remove exactly that grant; applies to open connections at once.
    AclRevoke {
        user: String,
        grant: AclGrant,
    },
    /// Grants of one user, or of all (JSON in `AdminReply`).
    AclList {
        user: Option<String>,
    },
    QueueCreate {
        name: String,
    },
    /// Delete a queue and every message it holds; its consumers are closed.
    QueueRm {
        name: String,
    },
    /// Queues with depth and consumers (JSON in `AdminReply`).
    QueueList,
    /// Drop the messages waiting in a queue (not those out for delivery).
    QueuePurge {
        name: String,
    },
    /// Topics with subscribers and durable subscriptions (JSON in `AdminReply`).
    TopicList,
    /// Delete the durable subscription `name` on `topic` and what it holds.
    TopicRmDurable {
        topic: String,
        name: String,
    },
}

impl AdminCommand {
    /// The command's name for logs (never its arguments: they may hold a password hash).
    pub fn name(&self) -> &'static str {
        match self {
            AdminCommand::Switchover => "switchover",
            AdminCommand::Promote { .. } => "promote",
            AdminCommand::UserAdd { .. } => "user add",
            AdminCommand::UserPasswd { .. } => "user passwd",
            AdminCommand::UserRm { .. } => "user rm",
            AdminCommand::UserList => "user list",
            AdminCommand::AclGrant { .. } => "acl grant",
            AdminCommand::AclRevoke { .. } => "acl revoke",
            AdminCommand::AclList { .. } => "acl list",
            AdminCommand::QueueCreate { .. } => "queue create",
            AdminCommand::QueueRm { .. } => "queue rm",
            AdminCommand::QueueList => "queue list",
            AdminCommand::QueuePurge { .. } => "queue purge",
            AdminCommand::TopicList => "topic list",
            AdminCommand::TopicRmDurable { .. } => "topic rm-durable",
        }
    }
}

/// What a grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Permission {
    Produce,
    Consume,
    Admin,
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Permission::Produce => "produce",
            Permission::Consume => "consume",
            Permission::Admin => "admin",
        })
    }
}

impl std::str::FromStr for Permission {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "produce" => Ok(Permission::Produce),
            "consume" => Ok(Permission::Consume),
            "admin" => Ok(Permission::Admin),
            other => Err(format!("unknown permission `{other}` (expected produce, consume or admin)")),
        }
    }
}

/// One ACL entry on the wire: `permission` on destinations matching `pattern`
/// (dot-separated words; `*` matches one word, `#` any number, a `queue:` or
/// `topic:` prefix limits the kind).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AclGrant {
    pub permission: Permission,
    pub pattern: String,
}

impl std::fmt::Display for AclGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.permission, self.pattern)
    }
}

impl std::str::FromStr for AclGrant {
    type Err = String;
    /// `produce:orders.*`, `admin:#`, `consume:topic:prices.#`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (perm, pattern) = s
            .split_once(':')
            .ok_or_else(|| format!("grant `{s}` must look like PERMISSION:PATTERN, e.g. produce:orders.*"))?;
        if pattern.is_empty() {
            return Err(format!("grant `{s}` has an empty pattern"));
        }
        Ok(AclGrant { permission: perm.parse()?, pattern: pattern.to_string() })
    }
}

/// Frames a broker sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerFrame {
    Welcome {
        node_id: String,
        server_version: String,
        /// Largest frame the broker accepts, in bytes.
        max_frame_bytes: u32,
    },
    /// This node does not serve clients; try `active_hint` if any.
    NotActive {
        active_hint: Option<String>,
    },
    /// The publish `(producer_id, seq)` is durable as configured.
    Confirm {
        producer_id: u64,
        seq: u64,
    },
    /// The consumer `sub_id` is registered.
    Subscribed {
        sub_id: u32,
    },
    Deliver {
        sub_id: u32,
        message: Delivered,
    },
    /// A consumer ended by the broker (destination deleted, ...).
    ConsumerClosed {
        sub_id: u32,
        reason: String,
    },
    StatusReply {
        req: u64,
        json: String,
    },
    Done {
        req: u64,
    },
    Pong {
        nonce: u64,
    },
    Error(ErrorFrame),
    /// The answer to a listing admin command, as JSON.
    AdminReply {
        req: u64,
        json: String,
    },
}

/// A typed error. `context` says which request it answers, if one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
    pub context: ErrorContext,
}

/// Which request an error answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorContext {
    /// The connection as a whole; the broker closes it after this frame.
    Connection,
    Publish {
        producer_id: u64,
        seq: u64,
    },
    Subscribe {
        sub_id: u32,
    },
    Request {
        req: u64,
    },
}

/// Error categories a client can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Wrong user or password, or no credentials where they are required.
    NotAuthenticated,
    /// Authenticated, but not allowed to do this.
    NotAuthorized,
    UnknownDestination,
    /// Frame or message above the configured limit.
    TooLarge,
    /// The frame could not be decoded.
    Malformed,
    UnsupportedVersion,
    /// A frame that is not allowed at this point (e.g. anything before Hello).
    ProtocolViolation,
    /// This node does not serve clients (passive or isolated).
    NotActive,
    /// Queue depth, connection count or another limit reached.
    LimitReached,
    /// The broker could not make the message durable; it was not confirmed.
    StoreFailed,
    /// The broker is shutting down.
    ShuttingDown,
    InvalidRequest,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl ErrorFrame {
    pub fn new(code: ErrorCode, context: ErrorContext, message: impl Into<String>) -> Self {
        ErrorFrame { code, message: message.into(), context }
    }
}
