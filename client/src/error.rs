//! The one error type of the client library.
//!
//! Expected refusals by the broker keep their typed [`ErrorCode`] so that an
//! application can act on them (`NotAuthenticated` is final, `NotActive`
//! means "try the other node").

use std::ops::RangeInclusive;
use std::time::Duration;

use twinmq_protocol::ProtocolError;

use crate::ErrorCode;

/// Everything that can go wrong between an application and the broker.
///
/// ```no_run
/// # async fn demo(producer: twinmq_client::Producer) {
/// use twinmq_client::{ClientError, ErrorCode, Message};
/// match producer.send(Message::persistent("x")).await {
///     Ok(confirmed) => println!("stored as {:?}", confirmed.id()),
///     Err(e) if e.code() == Some(ErrorCode::LimitReached) => println!("queue full, try later: {e}"),
///     Err(ClientError::Disconnected) => println!("no active node within failover_timeout"),
///     Err(e) => println!("refused: {e}"),
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// [`crate::ClientConfig::servers`] is empty.
    #[error("no server address configured")]
    NoServers,
    /// The TCP connection to `addr` could not be opened.
    #[error("could not connect to {addr}")]
    Connect {
        /// The address dialed.
        addr: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// `addr` answered that it does not serve clients (it is passive or isolated).
    #[error("{addr} is not the active node{}", hint_text(.active_hint))]
    NotActive {
        /// The address that answered.
        addr: String,
        /// Where it says the active node is, if it knows.
        active_hint: Option<String>,
    },
    /// `addr` shares no protocol version with this client library: one of
    /// the two must be upgraded (or downgraded). Not final: during a rolling
    /// upgrade the other node may still speak ours.
    #[error("{addr} speaks protocol versions {broker:?}, this client {client:?}: none in common")]
    NoCommonVersion {
        /// The address that answered.
        addr: String,
        /// The versions this library speaks.
        client: RangeInclusive<u8>,
        /// The versions the broker speaks.
        broker: RangeInclusive<u8>,
    },
    /// The broker refused a request (or the whole connection) with a typed error.
    #[error("broker error {code}: {message}")]
    Broker {
        /// What kind of refusal, to act on.
        code: ErrorCode,
        /// The broker's explanation, for people.
        message: String,
    },
    /// `what` did not finish within `after`.
    #[error("timed out after {after:?}: {what}")]
    Timeout {
        /// The operation.
        what: String,
        /// How long it was given.
        after: Duration,
    },
    /// No active node could be reached within `failover_timeout` after the
    /// connection was lost (or the client is gone); the operation may or may
    /// not have taken effect (a publish that was not confirmed may still be
    /// stored). A failover shorter than that never surfaces as this error.
    #[error("disconnected from the broker")]
    Disconnected,
    /// The client was closed by the application before the operation completed.
    #[error("the client is closed")]
    Closed,
    /// The broker ended this consumer (destination deleted, ...).
    #[error("the broker closed the consumer: {reason}")]
    ConsumerClosed {
        /// The broker's explanation.
        reason: String,
    },
    /// An ack or nack could not be sent: the consumer is closed, or the
    /// connection is being re-established (or the consumer's subscription
    /// not yet registered again on the new one). The broker delivers the
    /// message again.
    #[error("ack/nack not sent ({reason}); the message will be delivered again")]
    NotSettled {
        /// Why it could not be sent.
        reason: String,
    },
    /// The node this client is connected to speaks a protocol version
    /// without `what` (an older broker): nothing was sent.
    #[error("{what} needs protocol version 2; this connection speaks {protocol_version} (an older broker)")]
    Unsupported {
        /// The operation.
        what: &'static str,
        /// The connection's protocol version.
        protocol_version: u8,
    },
    /// The broker sent more unacknowledged deliveries than the prefetch allows
    /// (a broker bug); the consumer was closed.
    #[error("the broker exceeded the prefetch of {prefetch} unacknowledged deliveries")]
    PrefetchExceeded {
        /// The consumer's prefetch.
        prefetch: u32,
    },
    /// The broker sent a frame that makes no sense at this point.
    #[error("unexpected frame from the broker: {0}")]
    UnexpectedFrame(
        /// What arrived.
        String,
    ),
    /// The TLS files or options cannot be used (at [`crate::ClientTls`] construction).
    #[error("TLS setup: {message}")]
    TlsSetup {
        /// What is wrong with them.
        message: String,
    },
    /// The TLS handshake with `addr` failed: its certificate is not signed by
    /// our CA or does not name it, it refused our client certificate (or
    /// wanted one), or it does not speak TLS. A configuration problem: the
    /// client neither retries nor tries the other node.
    #[error("TLS with {addr} failed: {message}")]
    Tls {
        /// The address dialed.
        addr: String,
        /// What the TLS library said.
        message: String,
    },
    /// Bytes that could not become a frame, or a frame that could not become bytes.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

fn hint_text(hint: &Option<String>) -> String {
    match hint {
        Some(h) => format!(" (active hint: {h})"),
        None => String::new(),
    }
}

impl ClientError {
    /// The broker's error code, if this error is a refusal by the broker.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker { code, .. } => Some(*code),
            ClientError::NotActive { .. } => Some(ErrorCode::NotActive),
            ClientError::NoCommonVersion { .. } => Some(ErrorCode::UnsupportedVersion),
            _ => None,
        }
    }
}
