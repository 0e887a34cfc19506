//! Fuzz the STOMP 1.2 decoder (`twinmq_protocol::stomp::StompCodec`) as the
//! broker's STOMP listener runs it: over a byte stream that arrives in
//! pieces, with small limits (a 64 KiB frame, and a 256-byte one so that
//! every limit is reached by short inputs).
//!
//! Input: the stream itself, as a client would send it (so the seeds are
//! plain STOMP). Each stream is decoded whole, one byte at a time, and in
//! pieces of a size taken from its bytes. Checked: no panic; the three give
//! the same items and the same error (the decoder does not depend on how
//! the bytes arrive); a decoder waiting for more never holds more than one
//! frame limit of bytes; every decoded frame re-encodes and decodes to
//! itself (with the `content-length` the encoder adds to a body that came
//! without one).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};
use twinmq_protocol::stomp::{StompCodec, StompFrame, StompItem, StompLimits};

/// Inputs are at most 64 KiB (`-max_len` in run.sh) and the frame limit is
/// 64 KiB, so nothing here needs a large allocation: the biggest is the list
/// of decoded items. A decoder reserving what a content-length announces
/// before checking it against the limit would pass this cap.
#[global_allocator]
static ALLOC: twinmq_fuzz::CappedAlloc<{ 4 * 1024 * 1024 }> = twinmq_fuzz::CappedAlloc;

const LIMITS: [StompLimits; 2] = [
    StompLimits { max_frame_bytes: 64 * 1024, max_headers: 16, max_header_bytes: 1024 },
    StompLimits { max_frame_bytes: 256, max_headers: 4, max_header_bytes: 64 },
];

/// What one decoding of a stream gave; runs of heart-beats are counted, not
/// listed, so that a stream of newlines costs no memory.
#[derive(Debug, PartialEq)]
enum Seen {
    Heartbeats(usize),
    Frame(StompFrame),
}

fn decode(limits: StompLimits, piece: usize, stream: &[u8]) -> (Vec<Seen>, Option<String>) {
    let mut codec = StompCodec::new(limits);
    let mut src = BytesMut::new();
    let mut seen = Vec::new();
    for chunk in stream.chunks(piece) {
        src.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut src) {
                Ok(Some(StompItem::Heartbeat)) => match seen.last_mut() {
                    Some(Seen::Heartbeats(n)) => *n += 1,
                    _ => seen.push(Seen::Heartbeats(1)),
                },
                Ok(Some(StompItem::Frame(frame))) => {
                    round_trip(limits, &frame);
                    seen.push(Seen::Frame(frame));
                }
                Ok(None) => {
                    // Waiting for the rest of one frame: all of the buffer is that frame.
                    assert!(
                        src.len() <= limits.max_frame_bytes,
                        "holding {} bytes for a limit of {}",
                        src.len(),
                        limits.max_frame_bytes
                    );
                    break;
                }
                // The listener closes the connection after the first error.
                Err(e) => {
                    let message = e.to_string();
                    assert!(!message.contains(['\n', '\r']), "an error message must fit a header: {message:?}");
                    return (seen, Some(message));
                }
            }
        }
    }
    (seen, None)
}

fn round_trip(limits: StompLimits, frame: &StompFrame) {
    let mut wire = BytesMut::new();
    StompCodec::new(limits).encode(StompItem::Frame(frame.clone()), &mut wire).expect("the encoder refuses nothing");
    // Re-encoding may make a frame larger (a raw ':' in a value becomes `\c`,
    // a content-length is added), so it is read back with room for that.
    let roomy = StompLimits {
        max_frame_bytes: 4 * limits.max_frame_bytes,
        max_headers: limits.max_headers + 1,
        max_header_bytes: 2 * limits.max_header_bytes + 2,
    };
    let again = StompCodec::new(roomy)
        .decode(&mut wire)
        .unwrap_or_else(|e| panic!("our own encoding does not decode: {e}: {frame:?}"))
        .expect("a whole frame");
    let mut expected = frame.clone();
    if frame.get("content-length").is_none() && !frame.body.is_empty() {
        expected.headers.push(("content-length".to_string(), frame.body.len().to_string()));
    }
    assert_eq!(again, StompItem::Frame(expected), "round trip changed the frame");
    assert!(wire.is_empty(), "the encoding holds more than one frame");
}

fuzz_target!(|stream: &[u8]| {
    let odd = 1 + stream.iter().map(|&b| usize::from(b)).sum::<usize>() % 61;
    for limits in LIMITS {
        let whole = decode(limits, stream.len().max(1), stream);
        assert_eq!(decode(limits, 1, stream), whole, "one byte at a time differs");
        assert_eq!(decode(limits, odd, stream), whole, "pieces of {odd} differ");
    }
});
