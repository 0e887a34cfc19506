//! The frame codec: `u32 length | u8 version | MessagePack body`.
//!
//! A codec frames at one protocol version: [`HANDSHAKE_VERSION`] when it is
//! made, the negotiated one once the handshake has chosen it
//! ([`FrameCodec::set_version`], see [`crate::version`]). A frame carrying
//! another version is refused with [`ProtocolError::UnsupportedVersion`].
//!
//! Pure: it works on `BytesMut` and does no I/O, so the network layers of the
//! broker and the client own their sockets and this module owns the bytes.
//! The length prefix is checked against the limit before anything is
//! allocated for the body, so a hostile length costs nothing. The decoder
//! keeps no state between calls: it peeks at the prefix and takes a frame
//! only once all of it has arrived.

use std::marker::PhantomData;

use bytes::{BufMut, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::{Decoder, Encoder};

use crate::version::{HANDSHAKE_VERSION, SUPPORTED_VERSIONS};
use crate::ProtocolError;

/// Default largest frame, in bytes (length prefix excluded): 4 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// Encodes `Out` frames and decodes `In` frames.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    max_frame_bytes: usize,
    /// The version frames are written with and must arrive with.
    version: u8,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec at [`HANDSHAKE_VERSION`], for a connection's opening frames.
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameCodec { max_frame_bytes, version: HANDSHAKE_VERSION, _types: PhantomData }
    }

    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// The version this codec frames at.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// Frame at `version` from the next frame on: the one the handshake chose.
    pub fn set_version(&mut self, version: u8) {
        self.version = version;
    }
}

/// Decode one frame body (version byte + MessagePack) into `T`, accepting
/// any version this crate speaks: for tools and tests that read frames
/// outside a connection's codec.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ProtocolError> {
    let version = *body.first().ok_or(ProtocolError::Empty)?;
    let expected = if SUPPORTED_VERSIONS.contains(version) { version } else { SUPPORTED_VERSIONS.max };
    decode_body_at(body, expected)
}

/// Decode one frame body that must carry `version`.
fn decode_body_at<T: DeserializeOwned>(body: &[u8], version: u8) -> Result<T, ProtocolError> {
    let (&got, rest) = body.split_first().ok_or(ProtocolError::Empty)?;
    if got != version {
        return Err(ProtocolError::UnsupportedVersion { got, supported: version });
    }
    rmp_serde::from_slice(rest).map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// Encode `frame` at [`HANDSHAKE_VERSION`] as a complete wire frame (length
/// prefix included) onto `dst`: the opening frames of a connection.
pub fn encode_frame<T: Serialize>(frame: &T, max_frame_bytes: usize, dst: &mut BytesMut) -> Result<(), ProtocolError> {
    encode_frame_as(frame, HANDSHAKE_VERSION, max_frame_bytes, dst)
}

/// Encode `frame` at `version` (the negotiated one) onto `dst`.
pub fn encode_frame_as<T: Serialize>(
    frame: &T,
    version: u8,
    max_frame_bytes: usize,
    dst: &mut BytesMut,
) -> Result<(), ProtocolError> {
    let start = dst.len();
    dst.put_u32(0);
    dst.put_u8(version);
    let mut writer = dst.writer();
    rmp_serde::encode::write_named(&mut writer, frame).map_err(|e| ProtocolError::Encode(e.to_string()))?;
    let dst = writer.into_inner();
    let body_len = dst.len() - start - 4;
    if body_len > max_frame_bytes {
        dst.truncate(start);
        return Err(ProtocolError::TooLarge { len: body_len, max: max_frame_bytes });
    }
    let len = u32::try_from(body_len).expect("body_len <= max_frame_bytes, which fits u32 by construction");
    dst[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, ProtocolError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame_bytes {
            return Err(ProtocolError::TooLarge { len, max: self.max_frame_bytes });
        }
        if src.len() < 4 + len {
            // Room for the rest of this frame only: bounded by the check above.
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        let frame = src.split_to(4 + len);
        decode_body_at(&frame[4..], self.version).map(Some)
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = ProtocolError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        encode_frame_as(&item, self.version, self.max_frame_bytes, dst)
    }
}

impl<In, Out: Serialize> Encoder<&Out> for FrameCodec<In, Out> {
    type Error = ProtocolError;

    fn encode(&mut self, item: &Out, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        encode_frame_as(item, self.version, self.max_frame_bytes, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::*;

    type ServerSide = FrameCodec<ClientFrame, ServerFrame>;

    fn publish() -> ClientFrame {
        ClientFrame::Publish {
            producer_id: 7,
            seq: 3,
            destination: Destination::queue("orders"),
            message: OutMessage { payload: vec![1, 2, 3], persistent: true, ..Default::default() },
        }
    }

    #[test]
    fn round_trip_in_pieces() {
        let mut client: FrameCodec<ServerFrame, ClientFrame> = FrameCodec::new(1024);
        let mut server = ServerSide::new(1024);
        let mut wire = BytesMut::new();
        client.encode(publish(), &mut wire).unwrap();
        client.encode(ClientFrame::Ping { nonce: 9 }, &mut wire).unwrap();
        // Feed one byte at a time: no frame until it is complete.
        let mut src = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            src.put_u8(*b);
            while let Some(f) = server.decode(&mut src).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, vec![publish(), ClientFrame::Ping { nonce: 9 }]);
    }

    #[test]
    fn a_body_arriving_after_its_header_is_not_read_as_a_length() {
        let mut server = ServerSide::new(1024);
        let mut wire = BytesMut::new();
        encode_frame(&publish(), 1024, &mut wire).unwrap();
        let mut src = BytesMut::from(&wire[..4]);
        assert!(server.decode(&mut src).unwrap().is_none());
        src.extend_from_slice(&[0xff; 4]);
        assert!(server.decode(&mut src).unwrap().is_none(), "still waiting for the body");
        let mut src = BytesMut::from(&wire[..4]);
        src.extend_from_slice(&wire[4..]);
        assert_eq!(server.decode(&mut src).unwrap(), Some(publish()));
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        let mut server = ServerSide::new(1024);
        let mut src = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        match server.decode(&mut src) {
            Err(ProtocolError::TooLarge { len, max: 1024 }) => assert_eq!(len, u32::MAX as usize),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn future_version_is_a_typed_error() {
        let mut server = ServerSide::new(1024);
        let mut wire = BytesMut::new();
        encode_frame(&ClientFrame::Ping { nonce: 1 }, 1024, &mut wire).unwrap();
        wire[4] = PROTOCOL_VERSION + 1;
        assert!(matches!(server.decode(&mut wire), Err(ProtocolError::UnsupportedVersion { .. })));
    }

    #[test]
    fn a_codec_frames_at_the_version_it_was_set_to() {
        let mut client: FrameCodec<ServerFrame, ClientFrame> = FrameCodec::new(1024);
        let mut server = ServerSide::new(1024);
        assert_eq!(client.version(), HANDSHAKE_VERSION);
        client.set_version(7);
        let mut wire = BytesMut::new();
        client.encode(ClientFrame::Ping { nonce: 1 }, &mut wire).unwrap();
        assert_eq!(wire[4], 7, "the version byte");
        let mut copy = wire.clone();
        assert!(
            matches!(server.decode(&mut copy), Err(ProtocolError::UnsupportedVersion { got: 7, supported: 1 })),
            "a codec still at the handshake version refuses it"
        );
        server.set_version(7);
        assert_eq!(server.decode(&mut wire).unwrap(), Some(ClientFrame::Ping { nonce: 1 }));
    }

    #[test]
    fn garbage_body_is_malformed_not_a_panic() {
        let mut server = ServerSide::new(1024);
        let mut wire = BytesMut::new();
        wire.put_u32(5);
        wire.put_u8(HANDSHAKE_VERSION);
        wire.put_slice(&[0xc1, 0xff, 0x00, 0x13]);
        assert!(matches!(server.decode(&mut wire), Err(ProtocolError::Malformed(_))));
    }

    #[test]
    fn encoding_above_the_limit_is_refused_and_leaves_nothing() {
        let mut client: FrameCodec<ServerFrame, ClientFrame> = FrameCodec::new(64);
        let mut wire = BytesMut::new();
        let big = ClientFrame::Publish {
            producer_id: 1,
            seq: 1,
            destination: Destination::queue("q"),
            message: OutMessage { payload: vec![0; 200], ..Default::default() },
        };
        assert!(matches!(client.encode(big, &mut wire), Err(ProtocolError::TooLarge { .. })));
        assert!(wire.is_empty());
    }
}
