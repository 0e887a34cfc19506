//! Wire types exchanged between a client and a broker.
//!
//! Every frame on the wire is `u32 length (big endian) | u8 version | MessagePack body`
//! (see [`crate::codec`]). The body is a [`ClientFrame`] (client to broker) or a
//! [`ServerFrame`] (broker to client). Types here carry no behaviour beyond
//! small helpers, so that broker and client agree on them by construction.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::version::VersionRange;

/// The newest protocol version this crate speaks (the top of
/// [`crate::SUPPORTED_VERSIONS`]). Which version a connection uses is
/// negotiated in its handshake ([`crate::version`]); a frame carrying
/// another one is answered with [`ErrorCode::UnsupportedVersion`] and the
/// connection closed.
pub const PROTOCOL_VERSION: u8 = 2;

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

/// Most headers one message may carry. The decoder refuses a frame with
/// more before it builds them: 440,000 tiny headers in one 2.9 MiB frame
/// used to cost 52.8 MiB of memory (issue 10, finding 4). Their bytes count
/// towards the broker's `max_message_bytes` ([`OutMessage::size`]).
pub const MAX_HEADERS: usize = 64;

/// Decode a header map of at most [`MAX_HEADERS`] entries, failing at the
/// first one over (nothing more is allocated).
pub fn bounded_headers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a map of at most {MAX_HEADERS} headers")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            if map.size_hint().is_some_and(|n| n > MAX_HEADERS) {
                return Err(serde::de::Error::custom(format!("more than {MAX_HEADERS} headers")));
            }
            let mut out = BTreeMap::new();
            while let Some((k, v)) = map.next_entry::<String, String>()? {
                if out.len() == MAX_HEADERS {
                    return Err(serde::de::Error::custom(format!("more than {MAX_HEADERS} headers")));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Bounded)
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The bytes of a header map: every name and value.
pub fn headers_bytes(h: &BTreeMap<String, String>) -> usize {
    h.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// A message as a producer hands it over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct OutMessage {
    #[serde(deserialize_with = "bounded_headers")]
    pub headers: BTreeMap<String, String>,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// Time to live in milliseconds from the broker's receipt; `None`: never expires.
    pub ttl_ms: Option<u64>,
    /// Persistent messages are written to the store before they are confirmed.
    pub persistent: bool,
}

impl OutMessage {
    /// What the message weighs against `max_message_bytes`: payload and headers.
    pub fn size(&self) -> usize {
        self.payload.len() + headers_bytes(&self.headers)
    }
}

/// A message as a consumer receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivered {
    /// Broker-assigned id, unique across the pair and its epochs.
    pub id: MessageId,
    pub destination: Destination,
    /// Not bounded when decoded (unlike a publish's): the broker adds
    /// headers (dead letters: two more) and keeps messages of releases
    /// before the bound; a client must read them all.
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
        /// The protocol versions this client speaks; absent (a client older
        /// than negotiation): version 1 only.
        #[serde(default)]
        versions: VersionRange,
        /// A session-resumption ticket from an earlier `Welcome` of either
        /// node of the pair: accepted in place of the password (checked
        /// without argon2) while it is valid; else the password is checked.
        #[serde(default, with = "serde_bytes")]
        ticket: Option<Vec<u8>>,
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
        /// Version 2: answer this ack with `Done { req: receipt }` once it is
        /// stored as the durability mode says (or with an error for the
        /// request if it settled nothing). Absent: no answer, as in 1.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        receipt: Option<u64>,
        /// Version 2: also every earlier delivery this consumer holds (each
        /// whose id is below `id`): a cumulative ack.
        #[serde(default, skip_serializing_if = "is_false")]
        through: bool,
    },
    /// Give one delivery back for redelivery (counts as a delivery attempt).
    Nack {
        sub_id: u32,
        id: MessageId,
        /// Version 2: redeliver no sooner than this many milliseconds from
        /// now (absent: at once). Sent only on a connection at version 2,
        /// since a broker at 1 would ignore it and redeliver at once.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delay_ms: Option<u64>,
    },
    /// Version 2: stop delivering this message: it goes to the queue's
    /// dead-letter queue now if there is one (else it is dropped, as acked).
    Terminate {
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
    /// One page of queues and topics, by name, after `after` (at most
    /// `limit` of each, capped by the broker): JSON with `queues`, `topics`,
    /// their totals and `queues_next`/`topics_next` when more follow.
    /// `QueueList` and `TopicList` give the first page only.
    ListPage {
        after: Option<String>,
        limit: u32,
    },
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
            AdminCommand::ListPage { .. } => "list page",
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
        /// The protocol version the broker chose: the highest in both its
        /// range and the client's. Every frame after this one is framed at
        /// it. Absent (a broker older than negotiation): version 1.
        #[serde(default = "version_1")]
        protocol_version: u8,
        /// For a client that logged in as a user: a short-lived ticket to
        /// show in its next `Hello` (a reconnect after a failover).
        #[serde(default, with = "serde_bytes")]
        ticket: Option<Vec<u8>>,
    },
    /// This node does not serve clients; try `active_hint` if any.
    NotActive {
        active_hint: Option<String>,
    },
    /// The publish `(producer_id, seq)` is durable as configured.
    Confirm {
        producer_id: u64,
        seq: u64,
        /// Not stored now: this producer id and sequence were stored before
        /// (a resend after a failover, or a producer id used again, which
        /// loses the new message: use a fresh random id per producer).
        #[serde(default, skip_serializing_if = "is_false")]
        duplicate: bool,
        /// The id consumers will see the message under (stored now, or kept
        /// in memory for a transient one); absent for a duplicate and from
        /// brokers older than this field (a client reads `None`, an older
        /// client ignores it: no version bump needed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<MessageId>,
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

fn version_1() -> u8 {
    1
}

/// A typed error. `context` says which request it answers, if one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
    pub context: ErrorContext,
    /// With [`ErrorCode::UnsupportedVersion`] from the handshake: both
    /// sides' ranges. Left out of the frame when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions: Option<VersionMismatch>,
}

/// The ranges of a client and a broker that share no protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionMismatch {
    pub client: VersionRange,
    pub broker: VersionRange,
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
        ErrorFrame { code, message: message.into(), context, versions: None }
    }

    /// The handshake's refusal of a client that shares no version with the
    /// broker; the broker closes the connection after it.
    pub fn no_common_version(client: VersionRange, broker: VersionRange) -> Self {
        ErrorFrame {
            code: ErrorCode::UnsupportedVersion,
            message: format!(
                "no common protocol version: the client speaks {client}, the broker {broker}; upgrade one of them"
            ),
            context: ErrorContext::Connection,
            versions: Some(VersionMismatch { client, broker }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    //! Frames of releases before version negotiation still decode, and the
    //! new fields do not trouble those releases.
    use super::*;
    use crate::{decode_body, encode_frame, DEFAULT_MAX_FRAME_BYTES};

    /// The opening frames as releases before negotiation declared them.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum OldClientFrame {
        Hello { client_name: String, user: Option<String>, password: Option<String>, admin: bool },
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum OldServerFrame {
        Welcome {
            node_id: String,
            server_version: String,
            max_frame_bytes: u32,
        },
        Confirm {
            producer_id: u64,
            seq: u64,
            #[serde(default, skip_serializing_if = "is_false")]
            duplicate: bool,
        },
        Error(OldErrorFrame),
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct OldErrorFrame {
        code: ErrorCode,
        message: String,
        context: ErrorContext,
    }

    /// Encode as one side, decode as the other: what crosses the wire.
    fn across<A: Serialize, B: serde::de::DeserializeOwned>(frame: &A) -> B {
        let mut wire = bytes::BytesMut::new();
        encode_frame(frame, DEFAULT_MAX_FRAME_BYTES, &mut wire).unwrap();
        decode_body(&wire[4..]).unwrap()
    }

    /// Issue 10, finding 4: 440,000 tiny headers in one frame cost 52.8 MiB.
    #[test]
    fn a_frame_with_too_many_headers_is_refused_before_they_are_built() {
        let publish = |n: usize| ClientFrame::Publish {
            producer_id: 1,
            seq: 1,
            destination: Destination::queue("q"),
            message: OutMessage {
                headers: (0..n).map(|i| (i.to_string(), String::new())).collect(),
                payload: b"x".to_vec(),
                ..Default::default()
            },
        };
        let mut wire = bytes::BytesMut::new();
        encode_frame(&publish(MAX_HEADERS), DEFAULT_MAX_FRAME_BYTES, &mut wire).unwrap();
        assert_eq!(decode_body::<ClientFrame>(&wire[4..]).unwrap(), publish(MAX_HEADERS));
        let mut wire = bytes::BytesMut::new();
        encode_frame(&publish(200_000), DEFAULT_MAX_FRAME_BYTES, &mut wire).unwrap();
        let err = decode_body::<ClientFrame>(&wire[4..]).unwrap_err();
        assert!(err.to_string().contains("more than 64 headers"), "{err}");
        let m =
            OutMessage { headers: [("ab".into(), "cde".into())].into(), payload: vec![0; 10], ..Default::default() };
        assert_eq!(m.size(), 15, "headers count towards the size");
    }

    #[test]
    fn an_old_hello_speaks_version_1_only() {
        let old = OldClientFrame::Hello { client_name: "old".into(), user: None, password: None, admin: true };
        match across::<_, ClientFrame>(&old) {
            ClientFrame::Hello { client_name, admin, versions, .. } => {
                assert_eq!((client_name.as_str(), admin), ("old", true));
                assert_eq!(versions, VersionRange::V1);
            }
            other => panic!("{other:?}"),
        }
        // An old broker reads a new Hello, ignoring the range it does not know.
        let new = ClientFrame::Hello {
            client_name: "new".into(),
            user: Some("u".into()),
            password: None,
            admin: false,
            versions: VersionRange::new(1, 4),
            ticket: Some(vec![1, 2, 3]),
        };
        assert_eq!(across::<_, ClientFrame>(&new), new, "the range and the ticket travel");
        let seen: OldClientFrame = across(&new);
        assert_eq!(
            seen,
            OldClientFrame::Hello { client_name: "new".into(), user: Some("u".into()), password: None, admin: false }
        );
    }

    #[test]
    fn an_old_welcome_chose_version_1_and_old_clients_read_new_frames() {
        let old = OldServerFrame::Welcome { node_id: "n".into(), server_version: "0.1.0".into(), max_frame_bytes: 64 };
        match across::<_, ServerFrame>(&old) {
            ServerFrame::Welcome { protocol_version, .. } => assert_eq!(protocol_version, 1),
            other => panic!("{other:?}"),
        }
        let new = ServerFrame::Welcome {
            node_id: "n".into(),
            server_version: "0.2.0".into(),
            max_frame_bytes: 64,
            protocol_version: 1,
            ticket: Some(vec![9; 46]),
        };
        assert_eq!(across::<_, ServerFrame>(&new), new);
        assert!(matches!(across::<_, OldServerFrame>(&new), OldServerFrame::Welcome { .. }));
        // The refusal is a plain error frame to an old client, typed to a new one.
        let refusal = ServerFrame::Error(ErrorFrame::no_common_version(VersionRange::V1, VersionRange::new(2, 3)));
        match across::<_, OldServerFrame>(&refusal) {
            OldServerFrame::Error(e) => {
                assert_eq!(e.code, ErrorCode::UnsupportedVersion);
                assert!(e.message.contains("client speaks 1, the broker 2..=3"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(across::<_, ServerFrame>(&refusal), refusal, "typed ranges survive");
        // Other error frames carry no `versions` at all: byte for byte what they were.
        let plain = ErrorFrame::new(ErrorCode::LimitReached, ErrorContext::Connection, "full");
        let old =
            OldErrorFrame { code: ErrorCode::LimitReached, message: "full".into(), context: ErrorContext::Connection };
        let (mut a, mut b) = (bytes::BytesMut::new(), bytes::BytesMut::new());
        encode_frame(&ServerFrame::Error(plain), 1024, &mut a).unwrap();
        encode_frame(&OldServerFrame::Error(old), 1024, &mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn a_confirm_gained_the_message_id_without_troubling_either_side() {
        let old = OldServerFrame::Confirm { producer_id: 7, seq: 3, duplicate: false };
        let from_old_broker = across::<_, ServerFrame>(&old);
        assert_eq!(from_old_broker, ServerFrame::Confirm { producer_id: 7, seq: 3, duplicate: false, id: None });
        let id = Some(MessageId { epoch: 2, seq: 99 });
        let new = ServerFrame::Confirm { producer_id: 7, seq: 3, duplicate: false, id };
        assert_eq!(across::<_, ServerFrame>(&new), new, "the id travels");
        assert_eq!(across::<_, OldServerFrame>(&new), old, "an old client ignores it");
    }
}
