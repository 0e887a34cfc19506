//! The frame codec: `u32 length | u8 version | MessagePack body`.
//!
//! Pure: it works on `BytesMut` and does no I/O, so the network layers of the
//! broker and the client own their sockets and this module owns the bytes.
//! The length prefix is checked against the limit before anything is
//! allocated for the body (tokio-util's `LengthDelimitedCodec` does that), so
//! a hostile length costs nothing.

use std::marker::PhantomData;

use bytes::{BufMut, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::frame::PROTOCOL_VERSION;
use crate::ProtocolError;

/// Default largest frame, in bytes (length prefix excluded): 4 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// Encodes `Out` frames and decodes `In` frames.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    inner: LengthDelimitedCodec,
    max_frame_bytes: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    pub fn new(max_frame_bytes: usize) -> Self {
        let inner = LengthDelimitedCodec::builder()
            .length_field_length(4)
            .max_frame_length(max_frame_bytes)
            .new_codec();
        FrameCodec { inner, max_frame_bytes, _types: PhantomData }
    }

    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }
}

/// Decode one frame body (version byte + MessagePack) into `T`.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ProtocolError> {
    let (&version, rest) = body.split_first().ok_or(ProtocolError::Empty)?;
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion { got: version, supported: PROTOCOL_VERSION });
    }
    rmp_serde::from_slice(rest).map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// Encode `frame` as a complete wire frame (length prefix included) onto `dst`.
pub fn encode_frame<T: Serialize>(frame: &T, max_frame_bytes: usize, dst: &mut BytesMut) -> Result<(), ProtocolError> {
    let start = dst.len();
    dst.put_u32(0);
    dst.put_u8(PROTOCOL_VERSION);
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
        // Check the length ourselves first so that "too large" is a typed error
        // and not an opaque io::Error from the inner codec.
        if src.len() >= 4 {
            let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
            if len > self.max_frame_bytes {
                return Err(ProtocolError::TooLarge { len, max: self.max_frame_bytes });
            }
        }
        match self.inner.decode(src)? {
            Some(body) => decode_body(&body).map(Some),
            None => Ok(None),
        }
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = ProtocolError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        encode_frame(&item, self.max_frame_bytes, dst)
    }
}

impl<In, Out: Serialize> Encoder<&Out> for FrameCodec<In, Out> {
    type Error = ProtocolError;

    fn encode(&mut self, item: &Out, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        encode_frame(item, self.max_frame_bytes, dst)
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
    fn garbage_body_is_malformed_not_a_panic() {
        let mut server = ServerSide::new(1024);
        let mut wire = BytesMut::new();
        wire.put_u32(5);
        wire.put_u8(PROTOCOL_VERSION);
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
