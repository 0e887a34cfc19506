//! The client's own public types: destinations, message ids, error codes.
//!
//! They mirror the wire types of `twinmq-protocol` but are not them, so
//! that a change to the wire (a new field, a new frame) is absorbed here
//! and does not break applications (see `docs/COMPATIBILITY.md`). Enums are
//! `#[non_exhaustive]`: a later release may add a variant.

use std::fmt;

use twinmq_protocol as wire;

/// Which kind of destination a name refers to.
///
/// ```
/// use twinmq_client::{Destination, DestinationKind};
/// assert_eq!(Destination::topic("prices").kind(), DestinationKind::Topic);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DestinationKind {
    /// Point to point: each message goes to one consumer.
    Queue,
    /// Publish/subscribe: every subscriber gets every message.
    Topic,
}

/// A queue or a topic, by name.
///
/// ```
/// use twinmq_client::{Destination, DestinationKind};
/// let orders = Destination::queue("orders");
/// assert_eq!((orders.kind(), orders.name()), (DestinationKind::Queue, "orders"));
/// assert_eq!(orders.to_string(), "queue:orders");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    kind: DestinationKind,
    name: String,
}

impl Destination {
    /// The queue `name`: each message goes to one of its consumers.
    pub fn queue(name: impl Into<String>) -> Self {
        Destination { kind: DestinationKind::Queue, name: name.into() }
    }

    /// The topic `name`: each message goes to every subscriber.
    pub fn topic(name: impl Into<String>) -> Self {
        Destination { kind: DestinationKind::Topic, name: name.into() }
    }

    /// Queue or topic.
    pub fn kind(&self) -> DestinationKind {
        self.kind
    }

    /// The name, as given.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn to_wire(&self) -> wire::Destination {
        match self.kind {
            DestinationKind::Queue => wire::Destination::queue(self.name.clone()),
            DestinationKind::Topic => wire::Destination::topic(self.name.clone()),
        }
    }

    pub(crate) fn from_wire(destination: wire::Destination) -> Self {
        let kind = match destination.kind {
            wire::DestKind::Queue => DestinationKind::Queue,
            wire::DestKind::Topic => DestinationKind::Topic,
        };
        Destination { kind, name: destination.name }
    }
}

/// `queue:NAME` or `topic:NAME`.
impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            DestinationKind::Queue => write!(f, "queue:{}", self.name),
            DestinationKind::Topic => write!(f, "topic:{}", self.name),
        }
    }
}

/// The broker's id of a message: unique across the pair and its failovers,
/// the same in a confirm ([`crate::Confirmed::id`]) and in every delivery
/// of the message ([`crate::Delivery::id`]), so that a consumer can
/// deduplicate redeliveries by it. Ordered by when the broker stored it.
///
/// ```
/// # fn demo(delivery: &twinmq_client::Delivery) {
/// let id = delivery.id();
/// println!("{id} = epoch {} seq {}", id.epoch(), id.seq());
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    epoch: u64,
    seq: u64,
}

impl MessageId {
    /// The pair's epoch when the message was stored (it grows at each failover).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The store's sequence number of the message within the pair.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub(crate) fn to_wire(self) -> wire::MessageId {
        wire::MessageId { epoch: self.epoch, seq: self.seq }
    }

    pub(crate) fn from_wire(id: wire::MessageId) -> Self {
        MessageId { epoch: id.epoch, seq: id.seq }
    }
}

/// `EPOCH:SEQ`, as the broker's logs and status write it.
impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.seq)
    }
}

/// Why the broker refused something, for an application to act on
/// ([`crate::ClientError::code`]).
///
/// ```
/// use twinmq_client::{ClientError, ErrorCode};
/// fn retry_later(error: &ClientError) -> bool {
///     matches!(error.code(), Some(ErrorCode::LimitReached | ErrorCode::StoreFailed))
/// }
/// # assert!(!retry_later(&ClientError::Closed));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Wrong user or password, or no credentials where they are required. Final.
    NotAuthenticated,
    /// Authenticated, but the user's grants do not allow this.
    NotAuthorized,
    /// No such destination (the broker does not create it on use).
    UnknownDestination,
    /// A frame or message above the broker's limit.
    TooLarge,
    /// The broker could not decode what we sent.
    Malformed,
    /// The broker and this client share no protocol version.
    UnsupportedVersion,
    /// A frame not allowed at this point (a client bug).
    ProtocolViolation,
    /// This node does not serve clients (passive or isolated); the client
    /// moves to the other node by itself.
    NotActive,
    /// A queue's depth, the connections or another limit is reached; the
    /// message is not stored.
    LimitReached,
    /// The broker could not make the message durable; it was not confirmed.
    StoreFailed,
    /// The node is shutting down; the client moves to the other node by itself.
    ShuttingDown,
    /// The request makes no sense (a bad name, a durable subscription on a queue, ...).
    InvalidRequest,
}

impl ErrorCode {
    pub(crate) fn from_wire(code: wire::ErrorCode) -> Self {
        use wire::ErrorCode as W;
        match code {
            W::NotAuthenticated => ErrorCode::NotAuthenticated,
            W::NotAuthorized => ErrorCode::NotAuthorized,
            W::UnknownDestination => ErrorCode::UnknownDestination,
            W::TooLarge => ErrorCode::TooLarge,
            W::Malformed => ErrorCode::Malformed,
            W::UnsupportedVersion => ErrorCode::UnsupportedVersion,
            W::ProtocolViolation => ErrorCode::ProtocolViolation,
            W::NotActive => ErrorCode::NotActive,
            W::LimitReached => ErrorCode::LimitReached,
            W::StoreFailed => ErrorCode::StoreFailed,
            W::ShuttingDown => ErrorCode::ShuttingDown,
            W::InvalidRequest => ErrorCode::InvalidRequest,
        }
    }
}

/// The variant's name, as the broker's error frames and logs write it.
impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_and_ids_round_trip_through_the_wire_types() {
        for d in [Destination::queue("a.b"), Destination::topic("t")] {
            assert_eq!(Destination::from_wire(d.to_wire()), d);
            assert_eq!(d.to_wire().to_string(), d.to_string());
        }
        let id = MessageId { epoch: 3, seq: 9 };
        assert_eq!(MessageId::from_wire(id.to_wire()), id);
        assert_eq!(id.to_string(), id.to_wire().to_string());
    }

    #[test]
    fn error_codes_keep_their_wire_names() {
        assert_eq!(ErrorCode::from_wire(wire::ErrorCode::LimitReached).to_string(), "LimitReached");
        assert_eq!(ErrorCode::from_wire(wire::ErrorCode::NotActive), ErrorCode::NotActive);
    }
}
