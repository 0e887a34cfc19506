//! Replication between two real stores: snapshot, stream, acks, fencing.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::sync::mpsc;
use std::time::Duration;

use twinmq_store::*;

fn msg(producer_seq: u64, body: &str) -> StoredMessage {
    StoredMessage {
        epoch: 0,
        seq: 0,
        origin: "queue:q".into(),
        producer_id: 42,
        producer_seq,
        headers: Default::default(),
        payload: body.as_bytes().to_vec(),
        timestamp_ms: 1,
        expires_at_ms: None,
    }
}

fn open(dir: &std::path::Path, active: bool) -> (Store, Writer) {
    let (store, mut rec) = Store::open(&StoreConfig::new(dir)).unwrap();
    let cfg = WriterConfig { durability: Durability::Replicated, active, ..WriterConfig::default() };
    let (w, _h) = Writer::start(store.clone(), &mut rec, cfg).unwrap();
    (store, w)
}

/// Pump replication frames from the active to the passive and acks back, on a thread.
fn link(active: &Writer, passive: &Writer) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    active.attach_follower(tx);
    let (a, p) = (active.clone(), passive.clone());
    std::thread::spawn(move || {
        while let Some(frame) = rx.blocking_recv() {
            let a = a.clone();
            p.apply(
                frame,
                Box::new(move |r| {
                    if let Ok(Applied { ack: Some(seq), .. }) = r {
                        a.peer_ack(seq);
                    }
                }),
            );
        }
    });
}

fn submit(w: &Writer, ops: Vec<Op>) -> Result<Committed, StoreError> {
    let (tx, rx) = mpsc::channel();
    w.submit(ops, Box::new(move |r| tx.send(r).unwrap()));
    rx.recv_timeout(Duration::from_secs(10)).expect("writer answers")
}

#[test]
fn passive_gets_snapshot_then_stream_and_can_take_over_with_everything() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_sa, a) = open(da.path(), true);
    let (_sp, p) = open(dp.path(), false);
    let q = QueueSpec { kind: QueueKind::Queue };
    submit(&a, vec![Op::PutQueue { key: "q".into(), spec: q }]).unwrap();
    let first = submit(&a, vec![Op::Enqueue { message: msg(1, "before-link"), queues: vec!["q".into()] }]).unwrap();
    link(&a, &p);
    for i in 2..=50 {
        submit(&a, vec![Op::Enqueue { message: msg(i, &format!("m{i}")), queues: vec!["q".into()] }]).unwrap();
    }
    submit(&a, vec![Op::Ack { queue: "q".into(), seq: first.first_seq }]).unwrap();
    // With replicated durability and an in-sync follower, a confirm means the passive has it.
    assert!(a.stats().follower_in_sync.load(std::sync::atomic::Ordering::Relaxed));
    // The passive counts itself in sync only once the active's InSync marker arrived.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !p.stats().in_sync.load(std::sync::atomic::Ordering::Relaxed) {
        assert!(std::time::Instant::now() < deadline, "the passive never got the InSync marker");
        std::thread::sleep(Duration::from_millis(5));
    }

    // Local submissions on the passive are refused.
    assert!(matches!(submit(&p, vec![Op::DeleteQueue { key: "q".into() }]), Err(StoreError::NotActive)));

    let (tx, rx) = mpsc::channel();
    p.promote(2, Box::new(move |r| tx.send(r).unwrap()));
    let rec = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    let bodies: Vec<String> = rec.messages["q"].iter().map(|m| String::from_utf8_lossy(&m.payload).into()).collect();
    assert_eq!(bodies, (2..=50).map(|i| format!("m{i}")).collect::<Vec<_>>());
    assert_eq!(rec.epoch, 2);
    // The idempotence marks came along: a resend of producer seq 50 is a duplicate.
    let again = submit(&p, vec![Op::Enqueue { message: msg(50, "m50"), queues: vec!["q".into()] }]).unwrap();
    assert!(again.duplicate);
}

#[test]
fn records_of_an_older_epoch_are_refused() {
    let dp = tempfile::tempdir().unwrap();
    let (_sp, p) = open(dp.path(), false);
    let apply = |frame| {
        let (tx, rx) = mpsc::channel();
        p.apply(frame, Box::new(move |r| tx.send(r).unwrap()));
        rx.recv_timeout(Duration::from_secs(5)).unwrap().map(|a| a.ack)
    };
    assert_eq!(apply(ReplFrame::SnapshotBegin { epoch: 3 }).unwrap(), None, "nothing to acknowledge mid-snapshot");
    apply(ReplFrame::SnapshotEnd { next_seq: 10, epoch: 3 }).unwrap();
    let old = BatchBody { epoch: 2, first_seq: 10, ops: vec![Op::DeleteQueue { key: "x".into() }] };
    let raw = old.encode().unwrap();
    assert!(apply(ReplFrame::Batch { first_seq: 10, last_seq: 10, raw }).is_err(), "epoch 2 < 3 is fenced");
    let gap = BatchBody { epoch: 3, first_seq: 12, ops: vec![Op::DeleteQueue { key: "x".into() }] };
    assert!(
        apply(ReplFrame::Batch { first_seq: 12, last_seq: 12, raw: gap.encode().unwrap() }).is_err(),
        "a gap is refused"
    );
    let ok = BatchBody { epoch: 3, first_seq: 10, ops: vec![Op::DeleteQueue { key: "x".into() }] };
    assert_eq!(apply(ReplFrame::Batch { first_seq: 10, last_seq: 10, raw: ok.encode().unwrap() }).unwrap(), Some(10));
}

#[test]
fn require_replica_refuses_without_a_follower() {
    let da = tempfile::tempdir().unwrap();
    let (store, mut rec) = Store::open(&StoreConfig::new(da.path())).unwrap();
    let cfg = WriterConfig { durability: Durability::Replicated, require_replica: true, ..WriterConfig::default() };
    let (w, _h) = Writer::start(store, &mut rec, cfg).unwrap();
    assert!(matches!(submit(&w, vec![Op::DeleteQueue { key: "x".into() }]), Err(StoreError::NoReplica)));
}

fn user(hash: &str, grants: &[(Permission, &str)]) -> UserRecord {
    UserRecord {
        password_hash: hash.into(),
        grants: grants.iter().map(|(p, pat)| Grant { permission: *p, pattern: pat.to_string() }).collect(),
    }
}

#[test]
fn users_and_grants_reach_the_passive_by_snapshot_and_by_stream() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_sa, a) = open(da.path(), true);
    let (_sp, p) = open(dp.path(), false);
    // Before the link: travels in the snapshot.
    submit(&a, vec![Op::PutUser { name: "ops".into(), user: user("h1", &[(Permission::Admin, "#")]) }]).unwrap();
    submit(&a, vec![Op::PutUser { name: "gone".into(), user: user("h2", &[]) }]).unwrap();
    link(&a, &p);
    // After the link: travels in the stream, including a change and a removal.
    submit(&a, vec![Op::PutUser { name: "app".into(), user: user("h3", &[(Permission::Produce, "orders.*")]) }])
        .unwrap();
    submit(&a, vec![Op::PutUser { name: "ops".into(), user: user("h4", &[(Permission::Admin, "#")]) }]).unwrap();
    submit(&a, vec![Op::DeleteUser { name: "gone".into() }]).unwrap();

    let users = p.users().unwrap();
    assert_eq!(users.keys().collect::<Vec<_>>(), vec!["app", "ops"]);
    assert_eq!(users["ops"].password_hash, "h4");
    assert_eq!(users["app"].grants, vec![Grant { permission: Permission::Produce, pattern: "orders.*".into() }]);

    let (tx, rx) = mpsc::channel();
    p.promote(2, Box::new(move |r| tx.send(r).unwrap()));
    let rec = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(rec.users, users, "a promoted passive serves with the replicated users");
}
