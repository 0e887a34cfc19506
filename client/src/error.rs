//! The one error type of the client library.
//!
//! Expected refusals by the broker keep their typed [`ErrorCode`] so that an
//! application can act on them (`NotAuthenticated` is final, `NotActive`
//! means "try the other node").

use std::ops::RangeInclusive;
use std::time::Duration;

use twinmq_protocol::{ErrorCode, ProtocolError};

/// Everything that can go wrong between an application and the broker.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// [`crate::ClientConfig::servers`] is empty.
    #[error("no server address configured")]
    NoServers,
    /// The TCP connection to `addr` could not be opened.
    #[error("could not connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// `addr` answered that it does not serve clients (it is passive or isolated).
    #[error("{addr} is not the active node{}", hint_text(.active_hint))]
    NotActive { addr: String, active_hint: Option<String> },
    /// `addr` shares no protocol version with this client library: one of
    /// the two must be upgraded (or downgraded). Not final: during a rolling
    /// upgrade the other node may still speak ours.
    #[error("{addr} speaks protocol versions {broker:?}, this client {client:?}: none in common")]
    NoCommonVersion { addr: String, client: RangeInclusive<u8>, broker: RangeInclusive<u8> },
    /// The broker refused a request (or the whole connection) with a typed error.
    #[error("broker error {code}: {message}")]
    Broker { code: ErrorCode, message: String },
    /// `what` did not finish within `after`.
    #[error("timed out after {after:?}: {what}")]
    Timeout { what: String, after: Duration },
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
    ConsumerClosed { reason: String },
    /// The broker sent more unacknowledged deliveries than the prefetch allows
    /// (a broker bug); the consumer was closed.
    #[error("the broker exceeded the prefetch of {prefetch} unacknowledged deliveries")]
    PrefetchExceeded { prefetch: u32 },
    /// The broker sent a frame that makes no sense at this point.
    #[error("unexpected frame from the broker: {0}")]
    UnexpectedFrame(String),
    /// The TLS files or options cannot be used (at [`crate::ClientTls`] construction).
    #[error("TLS setup: {message}")]
    TlsSetup { message: String },
    /// The TLS handshake with `addr` failed: its certificate is not signed by
    /// our CA or does not name it, it refused our client certificate (or
    /// wanted one), or it does not speak TLS. A configuration problem: the
    /// client neither retries nor tries the other node.
    #[error("TLS with {addr} failed: {message}")]
    Tls { addr: String, message: String },
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
