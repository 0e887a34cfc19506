//! Fuzz the HA link decoder (`twinmq_ha::wire`) as the link runs it: first
//! with the small pre-authentication limit (what a stranger on the HA port
//! can reach), then with the post-authentication limit (what an
//! authenticated peer sends). Replication frames go further: into the
//! replication core (`twinmq_store::repl::Replica`, as a follower and as a
//! primary: whatever a peer sends, it must not panic), and into what the
//! passive does with them before storing: the batch record decoder
//! (`BatchBody::decode`) and the admin entry decoder. The pair's events and
//! what the peer advertises (HA 6) go through the checks that bound what is
//! kept of them, then into an event ring. Byte 0 picks the stage and the
//! piece size; the rest is the stream.
//!
//! The record decoder checks a CRC first, which random bytes never pass; so
//! every input is also wrapped as a record with a correct checksum, to reach
//! the MessagePack decoding behind it.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use twinmq_ha::events::{self, EventRing, EVENT_RING, MAX_REASON_BYTES};
use twinmq_ha::wire::{self, HaCodec, HaFrame};
use twinmq_store::op::RECORD_FORMAT;
use twinmq_store::repl::{Promotion, ReplMeta, Replica, ReplicaConfig};
use twinmq_store::{BatchBody, Durability, QueueEntry, ReplFrame};

/// Authenticated HA frames may be up to `MAX_HA_FRAME` (64 MiB, a snapshot
/// record); a stranger's only up to `MAX_HANDSHAKE_FRAME`. Above 80 MiB is a bug.
#[global_allocator]
static ALLOC: twinmq_fuzz::CappedAlloc<{ 80 * 1024 * 1024 }> = twinmq_fuzz::CappedAlloc;

/// A follower and a primary (attached on connection 1) as the frames' targets.
fn cores() -> (Replica, Replica) {
    let cfg =
        ReplicaConfig { durability: Durability::Replicated, require_replica: false, pair: true, tail_bytes: 1 << 20 };
    let follower = Replica::new(cfg.clone(), ReplMeta::default(), 1, 1);
    let mut primary = Replica::new(cfg, ReplMeta::default(), 1, 2);
    let mut out = Vec::new();
    primary.promote(1, 2, None, Promotion::Claimed, &mut out).expect("an empty store promotes");
    primary.attach(1, true, &mut out);
    (follower, primary)
}

fn stream(mut codec: HaCodec, piece: usize, bytes: &[u8]) {
    let max = codec.max_frame_bytes();
    let (mut follower, mut primary) = cores();
    let mut src = BytesMut::new();
    for chunk in bytes.chunks(piece) {
        src.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut src) {
                Ok(Some(frame)) => {
                    if let HaFrame::Repl(f) = &frame {
                        let mut out = Vec::new();
                        follower.on_frame(1, f.clone(), 0, &mut out);
                        follower.flush_point(&mut out);
                        primary.on_frame(1, f.clone(), 0, &mut out);
                    }
                    follow(frame)
                }
                Ok(None) => {
                    assert!(src.capacity() <= 2 * (4 + max) + bytes.len(), "buffer beyond one frame");
                    break;
                }
                Err(_) => return,
            }
        }
    }
}

/// What the passive does with a replication frame before it touches sled.
fn follow(frame: HaFrame) {
    match frame {
        HaFrame::Repl(ReplFrame::Batch { first_seq, raw, .. })
        | HaFrame::Repl(ReplFrame::SnapRecord { key: first_seq, raw }) => {
            if let Ok(body) = BatchBody::decode(first_seq, &raw) {
                check_body(&body);
            }
        }
        HaFrame::Repl(ReplFrame::SnapAdmin { value, .. }) => {
            let _ = rmp_serde::from_slice::<QueueEntry>(&value);
        }
        HaFrame::Events { events } => {
            let kept = events::from_peer(events);
            assert!(kept.len() <= EVENT_RING);
            assert!(kept.iter().all(|e| e.reason.len() <= MAX_REASON_BYTES && !e.reason.chars().any(char::is_control)));
            let mut ring = EventRing::new(EVENT_RING);
            ring.merge(kept);
            assert!(ring.len() <= EVENT_RING);
        }
        HaFrame::NodeInfo { stomp: Some(s) } => {
            let _ = wire::valid_advertised(&s);
        }
        _ => {}
    }
}

fn check_body(body: &BatchBody) {
    assert!(!body.ops.is_empty(), "decode refuses an empty batch");
    let _ = body.last_seq();
}

/// `bytes` as the body of a record with a valid header and checksum.
fn as_record(bytes: &[u8]) {
    let mut raw = vec![RECORD_FORMAT];
    raw.extend_from_slice(&crc32fast::hash(bytes).to_be_bytes());
    raw.extend_from_slice(bytes);
    // Learn the key the body claims, then decode as the passive would.
    let claimed = rmp_serde::from_slice::<BatchBody>(bytes).map(|b| b.first_seq).unwrap_or(0);
    if let Ok(body) = BatchBody::decode(claimed, &raw) {
        check_body(&body);
    }
    let _ = rmp_serde::from_slice::<QueueEntry>(bytes);
}

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else { return };
    let piece = usize::from(mode >> 2).max(1);
    match mode & 3 {
        0 | 1 => stream(wire::handshake_codec(), piece, rest),
        2 => stream(wire::codec(), piece, rest),
        _ => as_record(rest),
    }
});
