//! twinmq-protocol: the wire types and codec shared by broker and client.
//!
//! Owns: the frame layout (`u32 length | u8 version | MessagePack`), the
//! client/server frame enums, typed error codes, the frame size limit, and
//! protocol version negotiation (`version`: pure, so that the HA handshake
//! can use the same rule); and the STOMP 1.2 frame codec (`stomp`) that the
//! broker's STOMP listener speaks.
//! Does not own: sockets, authentication, routing: those belong to the
//! broker and the client, which both depend on this crate and never on each
//! other.

pub mod codec;
pub mod frame;
pub mod stomp;
pub mod version;

pub use codec::{decode_body, encode_frame, encode_frame_as, FrameCodec, DEFAULT_MAX_FRAME_BYTES};
pub use frame::*;
pub use version::{negotiate, NoCommonVersion, VersionRange, HANDSHAKE_VERSION, SUPPORTED_VERSIONS};

/// Why bytes could not become a frame (or a frame bytes).
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// A frame whose version byte is not the connection's (`supported`).
    #[error("frame version {got} is not this connection's version ({supported})")]
    UnsupportedVersion { got: u8, supported: u8 },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("empty frame")]
    Empty,
    #[error("could not encode frame: {0}")]
    Encode(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl ProtocolError {
    /// The error code a peer should receive for this decoding failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::TooLarge { .. } => ErrorCode::TooLarge,
            ProtocolError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            ProtocolError::Malformed(_) | ProtocolError::Empty | ProtocolError::Encode(_) => ErrorCode::Malformed,
            ProtocolError::Io(_) => ErrorCode::Malformed,
        }
    }
}
