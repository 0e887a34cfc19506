//! Fuzz the client protocol decoder exactly as the broker and the client run
//! it: `FrameCodec` over a byte stream that arrives in pieces, decoding
//! `ClientFrame` (the broker's side) and `ServerFrame` (the client's side).
//!
//! Input: byte 0 picks the frame limit (a small one, so the `TooLarge` path is
//! reached, or the default 4 MiB) and byte 1 the size of the pieces the
//! stream arrives in; the rest is the stream. Checked: no panic; a decoder
//! waiting for a frame never holds more than one frame's worth of buffer
//! (the length prefix is checked before anything is reserved); a frame that
//! decodes re-encodes and decodes to the same value. libFuzzer's
//! `-malloc_limit_mb` catches an allocation driven by a length prefix.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::Decoder;
use twinmq_protocol::{encode_frame, ClientFrame, FrameCodec, ProtocolError, ServerFrame, DEFAULT_MAX_FRAME_BYTES};

/// The largest buffer a 4 MiB frame may need (the frame, its prefix, and
/// `BytesMut`'s rounding), with room to spare; anything above is a bug.
#[global_allocator]
static ALLOC: twinmq_fuzz::CappedAlloc<{ 12 * 1024 * 1024 }> = twinmq_fuzz::CappedAlloc;

fn run<T>(max: usize, piece: usize, stream: &[u8])
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let mut codec: FrameCodec<T, T> = FrameCodec::new(max);
    let mut src = BytesMut::new();
    for chunk in stream.chunks(piece) {
        src.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut src) {
                Ok(Some(frame)) => round_trip(max, &frame),
                Ok(None) => {
                    // Waiting for the rest of one frame: bounded by the limit, not by the prefix.
                    assert!(
                        src.capacity() <= 2 * (4 + max) + stream.len(),
                        "buffer of {} bytes for a limit of {max}",
                        src.capacity()
                    );
                    break;
                }
                // The connection is closed after the first error.
                Err(ProtocolError::TooLarge { len, max: m }) => {
                    assert!(len > m && m == max);
                    return;
                }
                Err(_) => return,
            }
        }
    }
}

fn round_trip<T>(max: usize, frame: &T)
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let mut wire = BytesMut::new();
    match encode_frame(frame, max, &mut wire) {
        Ok(()) => {}
        // The named encoding may be longer than the compact one that arrived.
        Err(ProtocolError::TooLarge { .. }) => return,
        Err(e) => panic!("a decoded frame does not encode: {e}: {frame:?}"),
    }
    let mut codec: FrameCodec<T, T> = FrameCodec::new(max);
    let again = codec.decode(&mut wire).expect("our own encoding decodes").expect("a complete frame");
    assert_eq!(&again, frame, "round trip changed the frame");
    assert!(wire.is_empty());
}

fuzz_target!(|data: &[u8]| {
    let [limit, piece, stream @ ..] = data else { return };
    let max = if limit & 1 == 0 { 1024 } else { DEFAULT_MAX_FRAME_BYTES };
    let piece = usize::from(*piece).max(1);
    run::<ClientFrame>(max, piece, stream);
    run::<ServerFrame>(max, piece, stream);
});
