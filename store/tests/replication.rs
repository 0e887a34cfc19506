//! Replication between two real stores: snapshot, stream, acks, fencing.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::sync::{mpsc, Arc, Mutex};
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
    link_kinds(active, passive);
}

/// As `link`; the kinds of frame sent ("SnapshotBegin", "Resume", "Batch", ...)
/// and the passive's refusals ("refused: ...") are recorded in order.
fn link_kinds(active: &Writer, passive: &Writer) -> Arc<Mutex<Vec<String>>> {
    link_kinds_with(active, passive, true)
}

/// `resume: false` is what the HA link asks for after the peer refused to resume.
fn link_kinds_with(active: &Writer, passive: &Writer, resume: bool) -> Arc<Mutex<Vec<String>>> {
    let kinds = Arc::new(Mutex::new(Vec::new()));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    active.attach_follower(tx, resume);
    // Each link is a connection of its own, as on the HA port.
    static CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let source = CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (a, p, seen) = (active.clone(), passive.clone(), kinds.clone());
    std::thread::spawn(move || {
        while let Some(frame) = rx.blocking_recv() {
            let kind = match &frame {
                ReplFrame::SnapshotBegin { .. } => "SnapshotBegin",
                ReplFrame::Record { .. } => "Record",
                ReplFrame::Admin { .. } => "Admin",
                ReplFrame::Producer { .. } => "Producer",
                ReplFrame::SnapshotEnd { .. } => "SnapshotEnd",
                ReplFrame::Resume { .. } => "Resume",
                ReplFrame::InSync { .. } => "InSync",
                ReplFrame::Batch { .. } => "Batch",
            };
            seen.lock().unwrap().push(kind.to_string());
            let (a, seen) = (a.clone(), seen.clone());
            p.apply(
                frame,
                source,
                Box::new(move |r| match r {
                    Ok(Applied { ack, divergent }) => {
                        if !divergent.is_empty() {
                            let bodies: Vec<String> =
                                divergent.iter().map(|(_, m)| String::from_utf8_lossy(&m.payload).into()).collect();
                            seen.lock().unwrap().push(format!("divergent: {}", bodies.join(",")));
                        }
                        if let Some(seq) = ack {
                            a.peer_ack(seq);
                        }
                    }
                    Err(e) => seen.lock().unwrap().push(format!("refused: {e}")),
                }),
            );
        }
    });
    kinds
}

fn in_sync(w: &Writer) -> bool {
    w.stats().in_sync.load(std::sync::atomic::Ordering::Relaxed)
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn promote(w: &Writer, epoch: u64) -> Recovered {
    let (tx, rx) = mpsc::channel();
    w.promote(epoch, Box::new(move |r| tx.send(r).unwrap()));
    rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap()
}

fn bodies(rec: &Recovered, queue: &str) -> Vec<String> {
    rec.messages
        .get(queue)
        .map_or(Vec::new(), |ms| ms.iter().map(|m| String::from_utf8_lossy(&m.payload).into_owned()).collect())
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
        p.apply(frame, 1, Box::new(move |r| tx.send(r).unwrap()));
        rx.recv_timeout(Duration::from_secs(5)).unwrap().map(|a| a.ack)
    };
    let attaches = std::sync::atomic::AtomicU64::new(1);
    use std::sync::atomic::Ordering::Relaxed;
    let snapshot = |next_seq| {
        let begin = ReplFrame::SnapshotBegin { epoch: 3, stream: 1, attach: attaches.fetch_add(1, Relaxed) };
        assert_eq!(apply(begin).unwrap(), None, "nothing to acknowledge mid-snapshot");
        assert_eq!(apply(ReplFrame::SnapshotEnd { next_seq, epoch: 3, stream: 1 }).unwrap(), Some(next_seq - 1));
    };
    let batch = |epoch, first_seq| {
        let body = BatchBody { epoch, first_seq, ops: vec![Op::DeleteQueue { key: "x".into() }] };
        ReplFrame::Batch { first_seq, last_seq: first_seq, raw: body.encode().unwrap() }
    };
    snapshot(10);
    assert!(apply(batch(2, 10)).is_err(), "epoch 2 < 3 is fenced");
    // One refusal is enough: what the old stream still sends is dropped, unacknowledged.
    assert_eq!(apply(batch(3, 10)).unwrap(), None, "nothing is applied until the active starts anew");
    let resume = ReplFrame::Resume { stream: 1, from_seq: 10, in_sync: true, attach: attaches.fetch_add(1, Relaxed) };
    assert!(apply(resume).is_err(), "no resume after a refusal");
    snapshot(10);
    assert!(apply(batch(3, 12)).is_err(), "a gap is refused");
    snapshot(10);
    assert_eq!(apply(batch(3, 10)).unwrap(), Some(10));
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
    // Once in sync, a confirm means the passive has it.
    wait_until("the passive is in sync", || in_sync(&p));
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

fn enqueue(i: u64) -> Vec<Op> {
    vec![Op::Enqueue { message: msg(i, &format!("m{i}")), queues: vec!["q".into()] }]
}

#[test]
fn a_follower_whose_connection_moves_resumes_the_tail_and_stays_in_sync() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_sa, a) = open(da.path(), true);
    let (_sp, p) = open(dp.path(), false);
    submit(&a, vec![Op::PutQueue { key: "q".into(), spec: QueueSpec { kind: QueueKind::Queue } }]).unwrap();
    let first = link_kinds(&a, &p);
    for i in 1..=20 {
        submit(&a, enqueue(i)).unwrap();
    }
    wait_until("the passive is in sync", || in_sync(&p));
    assert_eq!(first.lock().unwrap()[0], "SnapshotBegin", "a new follower starts with a snapshot");

    // The connection is lost; the peer is not declared down.
    a.detach_follower();
    let (tx, held) = mpsc::channel();
    for i in 21..=30 {
        let tx = tx.clone();
        a.submit(enqueue(i), Box::new(move |r| tx.send(r.map(|c| c.first_seq)).unwrap()));
    }
    assert!(
        held.recv_timeout(Duration::from_millis(300)).is_err(),
        "a confirm went out while the in-sync passive lacked it"
    );
    assert!(in_sync(&p), "a lost connection alone does not make the passive fall out of sync");

    // A new connection: the tail only, and the held confirms follow the passive's ack.
    let second = link_kinds(&a, &p);
    for _ in 21..=30 {
        held.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    }
    let kinds = second.lock().unwrap().clone();
    assert_eq!(kinds.first().map(String::as_str), Some("Resume"), "{kinds:?}");
    assert!(!kinds.iter().any(|k| k.starts_with("Snapshot") || k.starts_with("refused")), "{kinds:?}");
    assert!(in_sync(&p), "the passive stayed in sync");
    for i in 31..=40 {
        submit(&a, enqueue(i)).unwrap();
    }

    // The copy is complete: the passive takes over with every message.
    a.detach_follower();
    let rec = promote(&p, 2);
    assert_eq!(bodies(&rec, "q"), (1..=40).map(|i| format!("m{i}")).collect::<Vec<_>>());
}

/// An active and its in-sync passive, holding queue `q` with `m1`.
fn in_sync_pair(da: &std::path::Path, dp: &std::path::Path) -> ((Store, Writer), (Store, Writer)) {
    let (sa, a) = open(da, true);
    let (sp, p) = open(dp, false);
    submit(&a, vec![Op::PutQueue { key: "q".into(), spec: QueueSpec { kind: QueueKind::Queue } }]).unwrap();
    link(&a, &p);
    submit(&a, enqueue(1)).unwrap();
    wait_until("the passive is in sync", || in_sync(&p));
    ((sa, a), (sp, p))
}

/// The connection to the passive is lost and the peer declared down: confirms are single-copy.
fn lose_peer(a: &Writer) {
    a.detach_follower();
    a.peer_down();
}

#[test]
fn a_passive_declared_down_resumes_out_of_sync_until_it_has_caught_up() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((_sa, a), (_sp, p)) = in_sync_pair(da.path(), dp.path());
    lose_peer(&a);
    // Degraded: confirmed here alone.
    for i in 2..=10 {
        submit(&a, enqueue(i)).unwrap();
    }
    let kinds = link_kinds(&a, &p);
    wait_until("the passive caught up and got InSync again", || {
        kinds.lock().unwrap().iter().any(|k| k == "InSync") && in_sync(&p)
    });
    let kinds = kinds.lock().unwrap().clone();
    assert_eq!(kinds[0], "Resume", "{kinds:?}");
    assert!(!kinds.iter().any(|k| k.starts_with("Snapshot")), "{kinds:?}");
    a.detach_follower();
    let rec = promote(&p, 2);
    assert_eq!(bodies(&rec, "q"), (1..=10).map(|i| format!("m{i}")).collect::<Vec<_>>());
}

#[test]
fn a_store_that_is_not_a_copy_of_the_stream_refuses_to_resume_and_gets_a_snapshot() {
    let (da, dp, dq) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((_sa, a), (_sp, _p)) = in_sync_pair(da.path(), dp.path());
    lose_peer(&a);
    submit(&a, enqueue(2)).unwrap();
    // The peer comes back with another store (replaced, or restarted from scratch).
    let (_sq, q) = open(dq.path(), false);
    let kinds = link_kinds_with(&a, &q, true);
    wait_until("the new store refuses to resume", || kinds.lock().unwrap().iter().any(|k| k.starts_with("refused")));
    let refusal = kinds.lock().unwrap().iter().find(|k| k.starts_with("refused")).cloned().unwrap();
    assert!(refusal.contains("cannot resume"), "{refusal}");
    // What the HA link does on a refusal: attach again, with a snapshot.
    let kinds = link_kinds_with(&a, &q, false);
    wait_until("the new store is in sync", || in_sync(&q));
    assert_eq!(kinds.lock().unwrap()[0], "SnapshotBegin");
    a.detach_follower();
    assert_eq!(bodies(&promote(&q, 2), "q"), ["m1", "m2"]);
}

#[test]
fn a_follower_away_longer_than_the_kept_tail_gets_a_snapshot() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((_sa, a), (_sp, p)) = in_sync_pair(da.path(), dp.path());
    lose_peer(&a);
    // More than the 32 MiB the active keeps in memory.
    for i in 2..=40 {
        let mut m = msg(i, "");
        m.payload = vec![i as u8; 1024 * 1024];
        submit(&a, vec![Op::Enqueue { message: m, queues: vec!["q".into()] }]).unwrap();
    }
    let kinds = link_kinds(&a, &p);
    wait_until("the passive is in sync again", || in_sync(&p) && kinds.lock().unwrap().iter().any(|k| k == "InSync"));
    let kinds = kinds.lock().unwrap().clone();
    assert_eq!(kinds[0], "SnapshotBegin", "{:?}", &kinds[..kinds.len().min(5)]);
    a.detach_follower();
    let rec = promote(&p, 2);
    assert_eq!(rec.messages["q"].len(), 40);
    assert!(rec.messages["q"][39].payload.iter().all(|b| *b == 40));
}

/// Open a passive store again after its writer stopped (sled may hold its
/// file lock for a moment after the last handle is gone).
fn reopen_passive(dir: &std::path::Path) -> (Store, Writer) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (store, mut rec) = loop {
        match Store::open(&StoreConfig::new(dir)) {
            Err(StoreError::Open { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => break other.unwrap(),
        }
    };
    let cfg = WriterConfig { durability: Durability::Replicated, active: false, ..WriterConfig::default() };
    let (w, _h) = Writer::start(store.clone(), &mut rec, cfg).unwrap();
    (store, w)
}

#[test]
fn a_restarted_passive_resumes_from_its_own_store() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_sa, a) = open(da.path(), true);
    {
        let (sp, p) = open(dp.path(), false);
        submit(&a, vec![Op::PutQueue { key: "q".into(), spec: QueueSpec { kind: QueueKind::Queue } }]).unwrap();
        link(&a, &p);
        for i in 1..=10 {
            submit(&a, enqueue(i)).unwrap();
        }
        wait_until("the passive is in sync", || in_sync(&p));
        submit(&a, enqueue(11)).unwrap(); // in sync: the passive has flushed it
        a.detach_follower(); // the pump thread ends and lets go of the passive
        a.peer_down();
        drop((sp, p));
    }
    // Confirmed while the passive was down.
    for i in 12..=20 {
        submit(&a, enqueue(i)).unwrap();
    }
    let (_sp, p) = reopen_passive(dp.path());
    assert!(!in_sync(&p), "a restarted passive is not in sync until the active says so");
    let kinds = link_kinds(&a, &p);
    wait_until("the passive caught up", || in_sync(&p));
    let kinds = kinds.lock().unwrap().clone();
    assert_eq!(kinds[0], "Resume", "{kinds:?}");
    assert!(!kinds.iter().any(|k| k.starts_with("Snapshot") || k.starts_with("refused")), "{kinds:?}");
    a.detach_follower();
    assert_eq!(bodies(&promote(&p, 2), "q"), (1..=20).map(|i| format!("m{i}")).collect::<Vec<_>>());
}

#[test]
fn a_passive_that_stopped_during_a_snapshot_does_not_resume_over_it() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_sa, a) = open(da.path(), true);
    submit(&a, vec![Op::PutQueue { key: "q".into(), spec: QueueSpec { kind: QueueKind::Queue } }]).unwrap();
    submit(&a, enqueue(1)).unwrap();
    {
        let (sp, p) = open(dp.path(), false);
        link(&a, &p);
        wait_until("the passive is in sync", || in_sync(&p));
        a.detach_follower();
        a.peer_down();
        // A new snapshot begins (the stream was refused, say) and the passive stops half-way.
        let (tx, rx) = mpsc::channel();
        let begin = ReplFrame::SnapshotBegin { epoch: 1, stream: 99, attach: 1 };
        p.apply(begin, 1_000, Box::new(move |r| tx.send(r.is_ok()).unwrap()));
        assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap());
        drop((sp, p));
    }
    let (_sp, p) = reopen_passive(dp.path());
    let kinds = link_kinds(&a, &p);
    wait_until("the passive refused to resume", || kinds.lock().unwrap().iter().any(|k| k.starts_with("refused")));
    let kinds = link_kinds_with(&a, &p, false);
    wait_until("the passive is in sync again", || in_sync(&p));
    assert_eq!(kinds.lock().unwrap()[0], "SnapshotBegin");
    a.detach_follower();
    assert_eq!(bodies(&promote(&p, 2), "q"), ["m1"]);
}

fn demote(w: &Writer) {
    let (tx, rx) = mpsc::channel();
    w.demote(false, Box::new(move |r| tx.send(r.is_ok()).unwrap()));
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
}

fn handed_over(kinds: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    kinds.lock().unwrap().iter().filter(|k| k.starts_with("divergent")).cloned().collect()
}

/// A (active) and B (its in-sync passive) split; both confirm alone; B is the
/// new active and A steps down with m2 and m3 its peer never had.
fn split_and_step_down(da: &std::path::Path, db: &std::path::Path) -> ((Store, Writer), (Store, Writer)) {
    let (sa, a) = open(da, true);
    let (sb, b) = open(db, false);
    submit(&a, vec![Op::PutQueue { key: "q".into(), spec: QueueSpec { kind: QueueKind::Queue } }]).unwrap();
    submit(&a, vec![Op::PutQueue { key: "r".into(), spec: QueueSpec { kind: QueueKind::Queue } }]).unwrap();
    link(&a, &b);
    wait_until("b is in sync", || in_sync(&b));
    submit(&a, enqueue(1)).unwrap();
    lose_peer(&a);
    submit(&a, enqueue(2)).unwrap();
    submit(&a, enqueue(3)).unwrap();
    // One message in two queues (a topic with two durable subscriptions): one seq, two copies.
    submit(&a, vec![Op::Enqueue { message: msg(4, "both"), queues: vec!["q".into(), "r".into()] }]).unwrap();
    promote(&b, 2);
    submit(&b, enqueue(5)).unwrap();
    demote(&a);
    ((sa, a), (sb, b))
}

#[test]
fn a_node_that_stepped_down_hands_over_until_the_new_active_stored_it_even_across_a_restart() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((sa, a), (_sb, b)) = split_and_step_down(da.path(), db.path());
    // A restarts before the new active attaches it: what diverged is not forgotten.
    drop((sa, a));
    let (sa, a) = reopen_passive(da.path());
    let kinds = link_kinds(&b, &a);
    wait_until("a is in sync with b", || in_sync(&a));
    assert_eq!(handed_over(&kinds), ["divergent: m2,m3,both,both"]);
    // The new active never said it stored them (a lost connection, say): sent again.
    b.detach_follower();
    let kinds = link_kinds(&b, &a);
    wait_until("a resumed", || kinds.lock().unwrap().iter().any(|k| k == "Resume"));
    wait_until("the hand-over is sent again", || !handed_over(&kinds).is_empty());
    assert_eq!(handed_over(&kinds), ["divergent: m2,m3,both,both"]);
    // Once the new active stored them, they are forgotten.
    let pending = sa.pending_handover().unwrap();
    assert_eq!(pending.len(), 4, "one entry per queue a message is in");
    a.handover_stored(pending.iter().map(|(_, m)| (m.epoch, m.seq)).collect());
    wait_until("the hand-over is forgotten", || sa.pending_handover().unwrap().is_empty());
    b.detach_follower();
    let kinds = link_kinds(&b, &a);
    wait_until("a resumed", || kinds.lock().unwrap().iter().any(|k| k == "Resume"));
    std::thread::sleep(Duration::from_millis(100));
    assert!(handed_over(&kinds).is_empty(), "{:?}", kinds.lock().unwrap());
}

#[test]
fn a_node_that_becomes_active_again_before_its_hand_over_was_stored_keeps_those_messages() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((sa, a), (_sb, b)) = split_and_step_down(da.path(), db.path());
    let kinds = link_kinds(&b, &a);
    wait_until("a is in sync with b", || in_sync(&a));
    assert_eq!(handed_over(&kinds), ["divergent: m2,m3,both,both"]);
    // B dies before storing them; A takes over.
    b.detach_follower();
    let rec = promote(&a, 3);
    let mut got = bodies(&rec, "q");
    got.sort();
    assert_eq!(got, ["both", "m1", "m2", "m3", "m5"]);
    assert_eq!(bodies(&rec, "r"), ["both"], "every queue the message was in");
    assert!(sa.pending_handover().unwrap().is_empty());
}

#[test]
fn frames_an_old_connection_delivers_late_are_ignored() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((_sa, a), (_sp, p)) = in_sync_pair(da.path(), dp.path());
    // The stream moves to a new connection (resumed)...
    a.detach_follower();
    let kinds = link_kinds(&a, &p);
    submit(&a, enqueue(2)).unwrap();
    wait_until("resumed", || kinds.lock().unwrap().iter().any(|k| k == "Resume"));
    // ...and the old one still delivers something: a record out of place.
    let stale = BatchBody { epoch: 0, first_seq: 1, ops: vec![Op::DeleteQueue { key: "q".into() }] };
    let frame = ReplFrame::Batch { first_seq: 1, last_seq: 1, raw: stale.encode().unwrap() };
    let (tx, rx) = mpsc::channel();
    p.apply(frame, 0, Box::new(move |r| tx.send(r.map(|a| a.ack)).unwrap()));
    let answer = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(matches!(answer, Ok(None)), "ignored: neither applied, acknowledged nor refused: {answer:?}");
    // The followed stream goes on: confirms (which wait for the in-sync passive) keep coming.
    for i in 3..=5 {
        submit(&a, enqueue(i)).unwrap();
    }
    assert!(in_sync(&p));
    a.detach_follower();
    assert_eq!(bodies(&promote(&p, 2), "q"), ["m1", "m2", "m3", "m4", "m5"]);
}

/// Stop a node's writer as a crash would (no step-down), and open its store again as a passive.
fn crash_and_restart_passive(node: (Store, Writer), dir: &std::path::Path) -> (Store, Writer) {
    drop(node);
    reopen_passive(dir)
}

#[test]
fn an_active_that_crashed_while_confirming_alone_hands_those_records_over_on_its_return() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((sa, a), (_sb, b)) = in_sync_pair(da.path(), db.path());
    lose_peer(&a);
    submit(&a, enqueue(2)).unwrap(); // confirmed with a single copy
    submit(&a, enqueue(3)).unwrap();
    promote(&b, 2); // the peer took over meanwhile
    submit(&b, enqueue(4)).unwrap();
    let (_sa, a) = crash_and_restart_passive((sa, a), da.path());
    let kinds = link_kinds(&b, &a);
    wait_until("a is in sync with b", || in_sync(&a));
    assert_eq!(handed_over(&kinds), ["divergent: m2,m3"]);
}

#[test]
fn an_in_sync_active_that_crashed_hands_nothing_over() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((sa, a), (_sb, b)) = in_sync_pair(da.path(), db.path());
    submit(&a, enqueue(2)).unwrap(); // held for b's ack: b has it
    a.detach_follower(); // the connection dies with the process (and lets go of it here)
    let (_sa, a) = crash_and_restart_passive((sa, a), da.path());
    promote(&b, 2);
    let kinds = link_kinds(&b, &a);
    wait_until("a is in sync with b", || in_sync(&a));
    assert!(handed_over(&kinds).is_empty(), "{:?}", kinds.lock().unwrap());
    b.detach_follower();
    let mut got = bodies(&promote(&a, 3), "q");
    got.sort();
    assert_eq!(got, ["m1", "m2"]);
}
