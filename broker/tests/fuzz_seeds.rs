//! Seeds for the fuzz targets in `fuzz/` (see `fuzz/README.md`): a few valid
//! encoded streams per target, so that libFuzzer starts from frames the
//! decoders accept and mutates from there. Run once after a protocol change:
//!
//! ```sh
//! cargo test -p twinmq-broker --test fuzz_seeds -- --ignored
//! ```
//!
//! The not-ignored test checks that the committed seeds still decode, so a
//! protocol change that leaves them stale is noticed.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::BytesMut;
use tokio_util::codec::Decoder;
use twinmq_ha::events::{EventKind, PairEvent};
use twinmq_ha::wire::{self, HaFrame, Heartbeat, RoleMsg};
use twinmq_ha::Role;
use twinmq_protocol::*;
use twinmq_store::repl::{AttachId, EpochStart, History};
use twinmq_store::{BatchBody, Op, QueueKind, QueueSpec, ReplFrame, StoredMessage};

fn seeds_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds").join(target)
}

fn enc<T: serde::Serialize>(frames: &[T], max: usize) -> Vec<u8> {
    let mut b = BytesMut::new();
    for f in frames {
        encode_frame(f, max, &mut b).unwrap();
    }
    b.to_vec()
}

fn client_frames() -> Vec<ClientFrame> {
    let mut headers = BTreeMap::new();
    headers.insert("k".to_string(), "v".to_string());
    vec![
        ClientFrame::Hello {
            client_name: "seed".into(),
            user: Some("app".into()),
            password: Some("pw".into()),
            admin: false,
            versions: VersionRange::new(1, 3),
            ticket: Some(vec![1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 3, b'a', b'p', b'p']),
        },
        ClientFrame::Publish {
            producer_id: 7,
            seq: 1,
            destination: twinmq_protocol::Destination::queue("orders"),
            message: OutMessage { headers, payload: b"hello".to_vec(), ttl_ms: Some(1000), persistent: true },
        },
        ClientFrame::Subscribe {
            sub_id: 1,
            destination: twinmq_protocol::Destination::topic("news"),
            durable: Some("d1".into()),
            prefetch: 64,
        },
        ClientFrame::Ack { sub_id: 1, id: MessageId { epoch: 1, seq: 9 }, receipt: None, through: false },
        ClientFrame::Ack { sub_id: 1, id: MessageId { epoch: 1, seq: 13 }, receipt: Some(8), through: true },
        ClientFrame::Nack { sub_id: 1, id: MessageId { epoch: 1, seq: 10 }, delay_ms: None },
        ClientFrame::Nack { sub_id: 1, id: MessageId { epoch: 1, seq: 11 }, delay_ms: Some(5000) },
        ClientFrame::Terminate { sub_id: 1, id: MessageId { epoch: 1, seq: 12 } },
        ClientFrame::Unsubscribe { sub_id: 1 },
        ClientFrame::DeleteDurable { req: 3, topic: "news".into(), name: "d1".into() },
        ClientFrame::Status { req: 4 },
        ClientFrame::Admin { req: 5, command: AdminCommand::Promote { force: true }, force: false },
        ClientFrame::Admin {
            req: 6,
            command: AdminCommand::UserAdd {
                name: "app".into(),
                password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
                grants: vec!["produce:orders.*".parse().expect("grant"), "consume:#".parse().expect("grant")],
            },
            force: true,
        },
        ClientFrame::Admin {
            req: 7,
            command: AdminCommand::AclRevoke { user: "app".into(), grant: "admin:topic:x.#".parse().expect("grant") },
            force: false,
        },
        ClientFrame::Ping { nonce: 42 },
        ClientFrame::Bye,
    ]
}

fn server_frames() -> Vec<ServerFrame> {
    vec![
        ServerFrame::Welcome {
            node_id: "n1".into(),
            server_version: "0.1.0".into(),
            max_frame_bytes: 4 << 20,
            protocol_version: 1,
            ticket: Some(vec![1; 46]),
        },
        ServerFrame::Confirm { producer_id: 7, seq: 1, duplicate: false, id: Some(MessageId { epoch: 1, seq: 1 }) },
        ServerFrame::Subscribed { sub_id: 1 },
        ServerFrame::Deliver {
            sub_id: 1,
            message: Delivered {
                id: MessageId { epoch: 1, seq: 9 },
                destination: twinmq_protocol::Destination::queue("orders"),
                headers: BTreeMap::new(),
                payload: b"hello".to_vec(),
                timestamp_ms: 1_700_000_000_000,
                expires_at_ms: None,
                persistent: true,
                redelivered: true,
                delivery_count: 2,
            },
        },
        ServerFrame::Error(ErrorFrame::new(
            ErrorCode::LimitReached,
            ErrorContext::Publish { producer_id: 7, seq: 2 },
            "full",
        )),
        ServerFrame::NotActive { active_hint: Some("127.0.0.1:7001".into()) },
        ServerFrame::StatusReply { req: 4, json: "{}".into() },
        ServerFrame::Pong { nonce: 42 },
        ServerFrame::AdminReply { req: 6, json: r#"{"users":[]}"#.into() },
        ServerFrame::Error(ErrorFrame::no_common_version(VersionRange::new(2, 3), VersionRange::V1)),
    ]
}

fn batch() -> BatchBody {
    let message = StoredMessage {
        epoch: 2,
        seq: 10,
        origin: "queue:orders".into(),
        producer_id: 7,
        producer_seq: 1,
        headers: BTreeMap::new(),
        payload: b"hello".to_vec(),
        timestamp_ms: 1_700_000_000_000,
        expires_at_ms: Some(1_700_000_001_000),
    };
    BatchBody {
        epoch: 2,
        first_seq: 10,
        ops: vec![
            Op::Enqueue { message, queues: vec!["q/orders".into()] },
            Op::Ack { queue: "q/orders".into(), seq: 3 },
            Op::PutQueue {
                key: "d/news/d1".into(),
                spec: QueueSpec {
                    kind: QueueKind::Durable { topic: "news".into(), name: "d1".into(), owner: Some("app".into()) },
                },
            },
            Op::DeleteQueue { key: "q/old".into() },
        ],
    }
}

fn handshake_frames() -> Vec<HaFrame> {
    vec![
        HaFrame::Hello { node_id: "a".into(), priority: 100, nonce: vec![1; 32], versions: wire::HA_VERSIONS },
        HaFrame::Challenge { node_id: "b".into(), priority: 50, nonce: vec![2; 32], version: Some(4) },
        HaFrame::Proof { proof: vec![4; 32] },
        HaFrame::Accepted { proof: vec![3; 32] },
        HaFrame::Refused { reason: "bad proof".into() },
    ]
}

fn link_frames() -> Vec<HaFrame> {
    let body = batch();
    let raw = body.encode().unwrap();
    let message = match &body.ops[0] {
        Op::Enqueue { message, .. } => message.clone(),
        _ => unreachable!(),
    };
    let raw = bytes::Bytes::from(raw);
    let attach = AttachId { epoch: 2, promotion: 7, n: 1 };
    let history = History::new(vec![EpochStart { epoch: 2, id: 7, start: 1, forced: false }]);
    vec![
        HaFrame::Heartbeat(Heartbeat {
            role: Role::Active,
            epoch: 2,
            floor: 2,
            last_seq: 13,
            last_op_epoch: 2,
            sees_gateway: true,
            in_sync: true,
            holding: true,
            holding_gen: 3,
            serviceable: true,
            disk_failed: false,
            confirmed_alone: false,
            disk_full: false,
        }),
        HaFrame::Repl(ReplFrame::Attach { attach, history: history.clone(), last_seq: 9 }),
        HaFrame::Repl(ReplFrame::AttachReply { attach, floor: 2, history: history.clone(), last_seq: 0 }),
        HaFrame::Repl(ReplFrame::Snapshot { attach, fork: Some(4), handover_all: false, synced_at: 9 }),
        HaFrame::Repl(ReplFrame::SnapRecord { key: 10, raw: raw.clone() }),
        HaFrame::Repl(ReplFrame::SnapAdmin { key: b"q/orders"[..].into(), value: b"an admin entry"[..].into() }),
        HaFrame::Repl(ReplFrame::SnapEnd { next_seq: 14, history }),
        HaFrame::Repl(ReplFrame::Resume { attach, from_seq: 10, in_sync: Some(3) }),
        HaFrame::Repl(ReplFrame::InSync { gen: 3 }),
        HaFrame::Repl(ReplFrame::Batch { first_seq: 10, last_seq: 13, raw }),
        HaFrame::Repl(ReplFrame::Ack { attach, seq: 13 }),
        HaFrame::Repl(ReplFrame::Refused { attach: Some(attach), reason: "gap".into() }),
        HaFrame::Repl(ReplFrame::Failed { reason: "EIO".into() }),
        HaFrame::Role(RoleMsg::VoteRequest { epoch: 3, rank: (2, 13) }),
        HaFrame::Role(RoleMsg::VoteReply { epoch: 3, granted: true }),
        HaFrame::Role(RoleMsg::TakeOver { epoch: 2, last_seq: 13 }),
        HaFrame::Divergent { messages: vec![("q/orders".into(), message)] },
        HaFrame::DivergentStored { ids: vec![(2, 13)] },
        HaFrame::DivergentAdmin(twinmq_store::HandoverAdmin {
            users: vec![(
                "app".into(),
                twinmq_store::UserRecord { password_hash: "$argon2id$x".into(), grants: vec![] },
            )],
            queues: vec!["orders".into()],
        }),
        HaFrame::DivergentAdminStored,
        HaFrame::NodeInfo { stomp: Some("10.0.0.1:61613".into()) },
        HaFrame::NodeInfo { stomp: None },
        HaFrame::Events {
            events: vec![
                PairEvent::new(1_780_000_000_000, "a", EventKind::Switchover, "asked by an operator"),
                PairEvent::new(1_780_000_000_005, "b", EventKind::Promotion, "passive -> active"),
            ],
        },
    ]
}

/// (target, file name, bytes) for every seed.
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let max = DEFAULT_MAX_FRAME_BYTES;
    let mut out = Vec::new();
    // client_frame: [limit (odd: 4 MiB)] [piece size] stream
    let mut push_client = |name: &str, stream: Vec<u8>| {
        for (limit, piece) in [(1u8, 255u8), (0, 7)] {
            let mut b = vec![limit, piece];
            b.extend_from_slice(&stream);
            out.push(("client_frame", format!("{name}-{limit}-{piece}"), b));
        }
    };
    push_client("client-all", enc(&client_frames(), max));
    for (i, f) in client_frames().iter().enumerate() {
        push_client(&format!("client-{i}"), enc(std::slice::from_ref(f), max));
    }
    push_client("server-all", enc(&server_frames(), max));
    for (i, f) in server_frames().iter().enumerate() {
        push_client(&format!("server-{i}"), enc(std::slice::from_ref(f), max));
    }
    // ha_frame: [piece << 2 | stage] stream; stage 0: handshake, 2: link, 3: record body.
    let mut push_ha = |name: String, mode: u8, stream: Vec<u8>| {
        let mut b = vec![mode];
        b.extend_from_slice(&stream);
        out.push(("ha_frame", name, b));
    };
    push_ha("handshake-all".into(), 0xfc, enc(&handshake_frames(), wire::MAX_HANDSHAKE_FRAME));
    for (i, f) in handshake_frames().iter().enumerate() {
        push_ha(format!("handshake-{i}"), 0x1c, enc(std::slice::from_ref(f), wire::MAX_HANDSHAKE_FRAME));
    }
    push_ha("link-all".into(), 0xfe, enc(&link_frames(), wire::MAX_HA_FRAME));
    for (i, f) in link_frames().iter().enumerate() {
        push_ha(format!("link-{i}"), 0x1e, enc(std::slice::from_ref(f), wire::MAX_HA_FRAME));
    }
    let raw = batch().encode().unwrap();
    push_ha("record-body".into(), 0x03, raw[5..].to_vec());
    out
}

#[test]
#[ignore = "writes fuzz/seeds; run after a protocol change"]
fn write_fuzz_seeds() {
    for (target, name, bytes) in seeds() {
        let dir = seeds_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
fn committed_fuzz_seeds_still_decode() {
    for (target, name, _) in seeds() {
        let path = seeds_dir(target).join(&name);
        let Ok(bytes) = std::fs::read(&path) else { panic!("{} missing: run write_fuzz_seeds", path.display()) };
        let decoded = match target {
            "client_frame" => {
                let max = if bytes[0] & 1 == 0 { 1024 } else { DEFAULT_MAX_FRAME_BYTES };
                let mut src = BytesMut::from(&bytes[2..]);
                let mut cs = FrameCodec::<ClientFrame, ClientFrame>::new(max);
                let mut ss = FrameCodec::<ServerFrame, ServerFrame>::new(max);
                let (c, s) = (cs.decode(&mut src.clone()), ss.decode(&mut src));
                // A small limit may refuse a long frame: that path is a seed too.
                (max == 1024) || c.is_ok_and(|f| f.is_some()) || s.is_ok_and(|f| f.is_some())
            }
            _ => match bytes[0] & 3 {
                0 | 1 => wire::handshake_codec().decode(&mut BytesMut::from(&bytes[1..])).is_ok_and(|f| f.is_some()),
                2 => wire::codec().decode(&mut BytesMut::from(&bytes[1..])).is_ok_and(|f| f.is_some()),
                _ => true,
            },
        };
        assert!(decoded, "{}: the committed seed no longer decodes; run write_fuzz_seeds", path.display());
    }
}
