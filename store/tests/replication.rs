//! Replication between two real stores (sled, the writer thread, the
//! protocol core): snapshot, stream, resume, fencing, hand-over, disk
//! failure. The protocol's fault orders are the simulator's job
//! (`twinmq-ha`, tests/sim.rs); these check what the writer does on disk.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use twinmq_store::repl::{AttachId, History, Promotion};
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

fn open_with(dir: &std::path::Path, cfg: WriterConfig) -> (Store, Writer) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    // sled may hold its file lock for a moment after the last handle is gone.
    let (store, mut rec) = loop {
        match Store::open(&StoreConfig::new(dir)) {
            Err(StoreError::Open { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => break other.unwrap(),
        }
    };
    let (w, _h) = Writer::start(store.clone(), &mut rec, cfg).unwrap();
    // These tests hold no lease: a pair member may write whenever it is primary.
    w.set_lease(u64::MAX);
    (store, w)
}

/// A pair member (starts following nobody), `replicated`.
fn open(dir: &std::path::Path) -> (Store, Writer) {
    open_with(dir, WriterConfig { durability: Durability::Replicated, active: false, ..WriterConfig::default() })
}

/// A pair member made primary (epoch 1), with queue `q`.
fn open_active(dir: &std::path::Path) -> (Store, Writer) {
    let (s, w) = open(dir);
    promote(&w, 1);
    submit(&w, vec![Op::PutQueue { key: "q".into(), spec: QueueSpec { kind: QueueKind::Queue } }]).unwrap();
    (s, w)
}

/// [`open_active`], keeping only 64 KiB of its log in memory: a passive
/// that is behind by more gets a snapshot.
fn open_active_keeping_little(dir: &std::path::Path) -> (Store, Writer) {
    let cfg = WriterConfig {
        durability: Durability::Replicated,
        active: false,
        tail_bytes: 64 << 10,
        ..WriterConfig::default()
    };
    let (s, w) = open_with(dir, cfg);
    promote(&w, 1);
    submit(&w, vec![Op::PutQueue { key: "q".into(), spec: QueueSpec { kind: QueueKind::Queue } }]).unwrap();
    (s, w)
}

fn promote(w: &Writer, at_least: u64) -> Recovered {
    let (tx, rx) = mpsc::channel();
    w.promote(at_least, None, Promotion::Claimed, Box::new(move |r| tx.send(r).unwrap()));
    rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap()
}

fn demote(w: &Writer) {
    let (tx, rx) = mpsc::channel();
    w.demote(false, Box::new(move |r| tx.send(r.is_ok()).unwrap()));
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
}

fn submit(w: &Writer, ops: Vec<Op>) -> Result<Committed, StoreError> {
    let (tx, rx) = mpsc::channel();
    w.submit(ops, Box::new(move |r| tx.send(r).unwrap()));
    rx.recv_timeout(Duration::from_secs(10)).expect("writer answers")
}

fn enqueue(i: u64) -> Vec<Op> {
    vec![Op::Enqueue { message: msg(i, &format!("m{i}")), queues: vec!["q".into()] }]
}

fn in_sync(w: &Writer) -> bool {
    w.stats().in_sync.load(Relaxed)
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Reads a message's body back from its record (the recovered state holds references).
trait ReadBody {
    fn body(&self, seq: u64) -> Vec<u8>;
}

impl ReadBody for Writer {
    fn body(&self, seq: u64) -> Vec<u8> {
        self.read_message(seq).unwrap().expect("a live message has a record").payload.clone()
    }
}

impl ReadBody for Store {
    fn body(&self, seq: u64) -> Vec<u8> {
        self.read_message(seq).unwrap().expect("a live message has a record").payload.clone()
    }
}

fn bodies(r: &impl ReadBody, rec: &Recovered, queue: &str) -> Vec<String> {
    rec.messages
        .get(queue)
        .map_or(Vec::new(), |ms| ms.iter().map(|m| String::from_utf8_lossy(&r.body(m.seq)).into_owned()).collect())
}

static CONNECTIONS: AtomicU64 = AtomicU64::new(1);

/// One HA connection between an active and a passive writer, pumped by two
/// threads. What crosses it is recorded in order: the kinds of replication
/// frame (`<-` for the passive's), and hand-overs (`divergent: bodies`).
struct Link {
    conn: u64,
    seen: Arc<Mutex<Vec<String>>>,
}

fn connect(active: &Writer, passive: &Writer) -> Link {
    connect_at(active, passive, true)
}

/// [`connect`]; `log_catchup`: the passive speaks a protocol version with
/// the catch-up from the log (else it is of an earlier release).
fn connect_at(active: &Writer, passive: &Writer, log_catchup: bool) -> Link {
    connect_slow(active, passive, log_catchup, Duration::ZERO)
}

/// [`connect_at`], each frame to the passive taking `delay` on the way.
fn connect_slow(active: &Writer, passive: &Writer, log_catchup: bool, delay: Duration) -> Link {
    let conn = CONNECTIONS.fetch_add(1, Relaxed);
    let seen = Arc::new(Mutex::new(Vec::new()));
    for (from, to, arrow) in [(active, passive, ""), (passive, active, "<-")] {
        let (mut tx, mut rx) = PeerTx::new();
        if !log_catchup {
            tx = tx.without_log_catchup();
        }
        from.connected(conn, tx);
        let (to, seen) = (to.clone(), seen.clone());
        std::thread::spawn(move || {
            while let Some(o) = rx.blocking_recv() {
                if arrow.is_empty() && !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                match o {
                    ToPeer::Repl(f) => {
                        let kind = match &f {
                            ReplFrame::Refused { reason, .. } => format!("<-Refused: {reason}"),
                            f => format!("{arrow}{}", f.kind()),
                        };
                        seen.lock().unwrap().push(kind);
                        to.frame(conn, f, Box::new(()));
                    }
                    ToPeer::Handover(ms) => {
                        let b: Vec<String> =
                            ms.iter().map(|(_, m)| String::from_utf8_lossy(&m.payload).into()).collect();
                        seen.lock().unwrap().push(format!("divergent: {}", b.join(",")));
                    }
                    ToPeer::HandoverAdmin(a) => {
                        let users: Vec<&str> = a.users.iter().map(|(n, _)| n.as_str()).collect();
                        seen.lock().unwrap().push(format!(
                            "admin: users {}; queues {}",
                            users.join(","),
                            a.queues.join(",")
                        ));
                    }
                }
            }
        });
    }
    Link { conn, seen }
}

/// Connect and attach the passive as follower.
fn link(active: &Writer, passive: &Writer) -> Link {
    let l = connect(active, passive);
    active.attach(l.conn);
    l
}

impl Link {
    fn kinds(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
    fn has(&self, kind: &str) -> bool {
        self.kinds().iter().any(|k| k == kind)
    }
    fn handed_over(&self) -> Vec<String> {
        self.kinds().into_iter().filter(|k| k.starts_with("divergent")).collect()
    }
    /// The connection is lost (both ends learn it; the pump threads end and
    /// let go of the writers).
    fn cut(&self, a: &Writer, p: &Writer) {
        a.connection_lost(self.conn);
        p.connection_lost(self.conn);
    }
}

/// An active and its in-sync passive, holding queue `q` with `m1`.
fn in_sync_pair(da: &std::path::Path, dp: &std::path::Path) -> ((Store, Writer), (Store, Writer), Link) {
    let (sa, a) = open_active(da);
    let (sp, p) = open(dp);
    let l = link(&a, &p);
    submit(&a, enqueue(1)).unwrap();
    wait_until("the passive is in sync", || in_sync(&p));
    ((sa, a), (sp, p), l)
}

/// The connection to the passive is lost and the peer declared down: confirms are single-copy.
fn lose_peer(a: &Writer, p: &Writer, l: &Link) {
    l.cut(a, p);
    a.peer_down(true);
}

#[test]
fn passive_gets_snapshot_then_stream_and_can_take_over_with_everything() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_sa, a) = open_active(da.path());
    let (_sp, p) = open(dp.path());
    let first = submit(&a, vec![Op::Enqueue { message: msg(1, "before-link"), queues: vec!["q".into()] }]).unwrap();
    let l = link(&a, &p);
    for i in 2..=50 {
        submit(&a, enqueue(i)).unwrap();
    }
    submit(&a, vec![Op::Ack { queue: "q".into(), seq: first.first_seq }]).unwrap();
    assert!(a.stats().follower_in_sync.load(Relaxed));
    wait_until("the passive got InSync", || in_sync(&p));
    // Local submissions on the passive are refused.
    assert!(matches!(submit(&p, vec![Op::DeleteQueue { key: "q".into() }]), Err(StoreError::NotActive)));
    l.cut(&a, &p);
    let rec = promote(&p, 2);
    assert_eq!(bodies(&p, &rec, "q"), (2..=50).map(|i| format!("m{i}")).collect::<Vec<_>>());
    assert_eq!(rec.epoch, 2);
    // The idempotence marks came along: a resend of producer seq 50 is a duplicate.
    assert!(submit(&p, enqueue(50)).unwrap().duplicate);
    assert_eq!(p.stats().epoch.load(Relaxed), 2);
    let kinds = l.kinds();
    assert_eq!(&kinds[..2], ["Attach", "<-AttachReply"], "{kinds:?}");
}

#[test]
fn every_group_commit_is_fdatasynced_before_its_confirm() {
    let d = tempfile::tempdir().unwrap();
    let (_s, w) = open_with(d.path(), WriterConfig::default());
    for i in 1..=20 {
        submit(&w, vec![Op::Enqueue { message: msg(i, "x"), queues: vec!["q".into()] }]).unwrap();
    }
    let (flushes, fsyncs) = (w.stats().flushes.load(Relaxed), w.stats().fsyncs.load(Relaxed));
    assert!(flushes >= 20, "{flushes} syncs for 20 sequential commits");
    assert!(fsyncs >= flushes, "{fsyncs} fsync calls for {flushes} syncs");
}

#[test]
fn large_records_written_as_blob_files_are_fsynced_too() {
    let d = tempfile::tempdir().unwrap();
    let (_s, w) = open_with(d.path(), WriterConfig::default());
    let mut m = msg(1, "");
    m.payload = vec![7; 600 * 1024]; // over sled's blob threshold (a quarter of a 512 KiB segment)
    let before = w.stats().fsyncs.load(Relaxed);
    submit(&w, vec![Op::Enqueue { message: m, queues: vec!["q".into()] }]).unwrap();
    let blobs = std::fs::read_dir(d.path().join("blobs")).map_or(0, |r| r.count());
    assert!(blobs > 0, "the record went to a blob file (else this test proves nothing)");
    let synced = w.stats().fsyncs.load(Relaxed) - before;
    assert!(synced >= 3, "{synced} fsyncs: the log file, the blob file and its directory");
}

#[test]
fn a_gap_or_an_older_epoch_is_refused_and_the_lower_side_yields() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_sp, p) = open(dp.path());
    // The passive has heard of epoch 5 (a vote it granted, say).
    let (tx, rx) = mpsc::channel();
    p.raise_floor(5, Some(Box::new(move |r| tx.send(r.is_ok()).unwrap())));
    assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap());
    let (_sa, a) = open_active(da.path());
    let l = link(&a, &p);
    wait_until("the active learns of the higher epoch", || a.stats().outranked.load(Relaxed));
    assert!(!l.has("Snapshot") && !l.has("Resume"), "nothing is streamed to it: {:?}", l.kinds());

    // A gap in the stream: refused, once; the primary starts anew.
    let dq = tempfile::tempdir().unwrap();
    let (_sq, q) = open(dq.path());
    let conn = CONNECTIONS.fetch_add(1, Relaxed);
    let (tx, mut rx) = PeerTx::new();
    q.connected(conn, tx);
    let attach = AttachId { epoch: 7, promotion: 1, n: 1 };
    q.frame(conn, ReplFrame::Attach { attach, history: History::default(), last_seq: 0 }, Box::new(()));
    q.frame(conn, ReplFrame::Resume { attach, from_seq: 1, in_sync: None }, Box::new(()));
    let body = BatchBody { epoch: 7, first_seq: 3, ops: vec![Op::DeleteQueue { key: "x".into() }] };
    let raw = body.encode().unwrap().into();
    q.frame(conn, ReplFrame::Batch { first_seq: 3, last_seq: 3, raw }, Box::new(()));
    let mut replies = Vec::new();
    while let Some(ToPeer::Repl(f)) = rx.blocking_recv() {
        let refused = matches!(f, ReplFrame::Refused { .. });
        replies.push(f.kind());
        if refused {
            break;
        }
    }
    assert_eq!(replies, ["AttachReply", "Refused"]);
}

#[test]
fn require_replica_refuses_without_a_follower() {
    let da = tempfile::tempdir().unwrap();
    let cfg = WriterConfig {
        durability: Durability::Replicated,
        active: false,
        require_replica: true,
        ..WriterConfig::default()
    };
    let (_s, w) = open_with(da.path(), cfg);
    promote(&w, 1);
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
    let (_sa, a) = open_active(da.path());
    let (_sp, p) = open(dp.path());
    // Before the link: travels in the snapshot (or the resumed tail).
    submit(&a, vec![Op::PutUser { name: "ops".into(), user: user("h1", &[(Permission::Admin, "#")]) }]).unwrap();
    submit(&a, vec![Op::PutUser { name: "gone".into(), user: user("h2", &[]) }]).unwrap();
    let l = link(&a, &p);
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
    l.cut(&a, &p);
    assert_eq!(promote(&p, 2).users, users, "a promoted passive serves with the replicated users");
}

#[test]
fn a_follower_whose_connection_moves_resumes_the_tail_and_stays_in_sync() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((_sa, a), (_sp, p), first) = in_sync_pair(da.path(), dp.path());
    for i in 2..=20 {
        submit(&a, enqueue(i)).unwrap();
    }
    // The connection is lost; the peer is not declared down.
    first.cut(&a, &p);
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
    let second = link(&a, &p);
    for _ in 21..=30 {
        held.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    }
    let kinds = second.kinds();
    assert_eq!(&kinds[..3], ["Attach", "<-AttachReply", "Resume"], "{kinds:?}");
    assert!(!kinds.iter().any(|k| k.starts_with("Snap") || k.contains("Refused")), "{kinds:?}");
    assert!(in_sync(&p), "the passive stayed in sync");
    second.cut(&a, &p);
    assert_eq!(bodies(&p, &promote(&p, 2), "q"), (1..=30).map(|i| format!("m{i}")).collect::<Vec<_>>());
}

#[test]
fn a_passive_declared_down_resumes_out_of_sync_until_it_has_caught_up() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((_sa, a), (_sp, p), l) = in_sync_pair(da.path(), dp.path());
    lose_peer(&a, &p, &l);
    for i in 2..=10 {
        submit(&a, enqueue(i)).unwrap(); // confirmed here alone
    }
    let l = link(&a, &p);
    wait_until("the passive caught up and got InSync again", || l.has("InSync") && in_sync(&p));
    let kinds = l.kinds();
    assert_eq!(kinds[2], "Resume", "{kinds:?}");
    assert!(!kinds.iter().any(|k| k.starts_with("Snap")), "{kinds:?}");
    l.cut(&a, &p);
    assert_eq!(bodies(&p, &promote(&p, 2), "q"), (1..=10).map(|i| format!("m{i}")).collect::<Vec<_>>());
}

#[test]
fn a_follower_of_an_earlier_release_away_longer_than_the_kept_tail_gets_a_snapshot() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = WriterConfig {
        durability: Durability::Replicated,
        active: false,
        tail_bytes: 2 * 1024 * 1024,
        ..WriterConfig::default()
    };
    let (_sa, a) = open_with(da.path(), cfg);
    promote(&a, 1);
    submit(&a, vec![Op::PutQueue { key: "q".into(), spec: QueueSpec { kind: QueueKind::Queue } }]).unwrap();
    let (_sp, p) = open(dp.path());
    let l = link(&a, &p);
    submit(&a, enqueue(1)).unwrap();
    wait_until("in sync", || in_sync(&p));
    lose_peer(&a, &p, &l);
    // More than the 2 MiB the active keeps in memory.
    for i in 2..=8 {
        let mut m = msg(i, "");
        m.payload = vec![i as u8; 512 * 1024];
        submit(&a, vec![Op::Enqueue { message: m, queues: vec!["q".into()] }]).unwrap();
    }
    let l = connect_at(&a, &p, false);
    a.attach(l.conn);
    wait_until("the passive is in sync again", || in_sync(&p) && l.has("InSync"));
    let kinds = l.kinds();
    assert_eq!(kinds[2], "Snapshot", "{:?}", &kinds[..kinds.len().min(5)]);
    assert!(kinds.contains(&"SnapEnd".to_string()));
    l.cut(&a, &p);
    let rec = promote(&p, 2);
    assert_eq!(rec.messages["q"].len(), 8);
    assert!(p.body(rec.messages["q"][7].seq).iter().all(|b| *b == 8));
}

/// The keys of a store's log records.
fn record_keys(s: &Store) -> Vec<u64> {
    s.raw_batches_from(0).map(|r| r.unwrap().0).collect()
}

fn enqueue_sized(queue: &str, i: u64, bytes: usize) -> Vec<Op> {
    let mut m = msg(i, &format!("m{i}"));
    m.payload.resize(bytes, b'.');
    vec![Op::Enqueue { message: m, queues: vec![queue.into()] }]
}

fn ack(queue: &str, seqs: &[u64]) -> Vec<Op> {
    seqs.iter().map(|s| Op::Ack { queue: queue.into(), seq: *s }).collect()
}

/// The first bytes of each live message's body in `queue`, in order.
fn names(r: &impl ReadBody, rec: &Recovered, queue: &str) -> Vec<String> {
    bodies(r, rec, queue).into_iter().map(|b| b.trim_end_matches('.').to_string()).collect()
}

/// An active keeping 64 KiB of its log in memory and its in-sync passive
/// with m1..=m10 in `q` (one record each); then the passive is lost, and
/// the active acks m1..=m5 (their records die), writes m11..=m60 of 4 KiB
/// in `q` (past what memory keeps), acks m11..=m20 (records the passive
/// never got die before it returns), creates queue `r` with one message
/// and a user (admin-only records: never in the log). m15 is of another
/// producer (77). Returns the seqs of m1..=m60.
fn behind_by_more_than_the_tail(a: &Writer, p: &Writer) -> Vec<u64> {
    let l = link(a, p);
    let mut seqs = vec![0];
    for i in 1..=10 {
        seqs.push(submit(a, enqueue_sized("q", i, 100)).unwrap().first_seq);
    }
    wait_until("in sync", || in_sync(p));
    lose_peer(a, p, &l);
    submit(a, ack("q", &seqs[1..=5])).unwrap();
    for i in 11..=60 {
        let mut ops = enqueue_sized("q", i, 4096);
        if i == 15 {
            // Another producer: its only message's record dies before the passive returns.
            let Op::Enqueue { message, .. } = &mut ops[0] else { unreachable!() };
            message.producer_id = 77;
        }
        seqs.push(submit(a, ops).unwrap().first_seq);
    }
    submit(a, ack("q", &seqs[11..=20])).unwrap();
    submit(a, vec![Op::PutQueue { key: "r".into(), spec: QueueSpec { kind: QueueKind::Queue } }]).unwrap();
    submit(a, enqueue_sized("r", 1000, 10)).unwrap();
    submit(a, put_user("carol")).unwrap();
    seqs
}

/// Link `p` (store `sp`) to `a` (store `sa`) again; once it is in sync and
/// its log is `a`'s, cut it off and promote it to `epoch`. What crossed the
/// link, and what it recovered.
fn catch_up_then_promote(
    (sa, a): (&Store, &Writer),
    (sp, p): (&Store, &Writer),
    epoch: u64,
) -> (Vec<String>, Recovered) {
    let l = link(a, p);
    wait_until("the passive is in sync again", || in_sync(p) && l.has("InSync"));
    let kinds = l.kinds();
    assert_eq!(kinds[2], "Catchup", "{kinds:?}");
    assert!(
        !kinds.iter().any(|k| k.starts_with("Snapshot") || k == "SnapRecord" || k.contains("Refused")),
        "{kinds:?}"
    );
    // Records dead on the active are gone here too.
    wait_until("the passive's log is the active's", || record_keys(sp) == record_keys(sa));
    l.cut(a, p);
    (kinds, promote(p, epoch))
}

#[test]
fn a_follower_further_back_than_the_tail_catches_up_from_the_log_without_what_died_meanwhile() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (sa, a) = open_active_keeping_little(da.path());
    let (sp, p) = open(dp.path());
    behind_by_more_than_the_tail(&a, &p);
    let (kinds, rec) = catch_up_then_promote((&sa, &a), (&sp, &p), 2);
    for k in ["Live", "CatchupEnd", "SnapAdmin"] {
        assert!(kinds.iter().any(|x| x == k), "no {k}: {kinds:?}");
    }
    // Only what the active lacked came: 40 records of m21..=m60, m1000 and
    // the acks of m11..=m20 (which pin nothing: not sent), not the 5 live
    // ones the passive held. (The records of m1..=m5 are gone here too.)
    let batches = kinds.iter().filter(|k| *k == "Batch").count();
    assert!((41..=43).contains(&batches), "{batches} records sent: {kinds:?}");
    let want: Vec<String> = (6..=10).chain(21..=60).map(|i| format!("m{i}")).collect();
    assert_eq!(names(&p, &rec, "q"), want);
    assert_eq!(names(&p, &rec, "r"), ["m1000"]);
    assert!(rec.users.contains_key("carol"), "{:?}", rec.users.keys().collect::<Vec<_>>());
    // The idempotence mark of producer 77, whose only record died before
    // the passive returned, came along: a resend is a duplicate.
    let mut ops = enqueue_sized("q", 15, 10);
    let Op::Enqueue { message, .. } = &mut ops[0] else { unreachable!() };
    message.producer_id = 77;
    assert!(submit(&p, ops).unwrap().duplicate);
    // And a restart of the promoted node reads the same store.
    drop((sp, p));
    let (_sp, p) = open(dp.path());
    let rec = promote(&p, 3);
    assert_eq!(names(&p, &rec, "q"), want);
}

#[test]
fn a_catch_up_cut_off_and_restarted_half_way_completes_at_the_next_attach() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (sa, a) = open_active_keeping_little(da.path());
    let (sp, p) = open(dp.path());
    let seqs = behind_by_more_than_the_tail(&a, &p);
    // Half a catch-up: the frames up to the 10th record, then the
    // connection is gone and the passive stops.
    let conn = CONNECTIONS.fetch_add(1, Relaxed);
    let (tx, mut to_p) = PeerTx::new();
    a.connected(conn, tx);
    let (tx, mut from_p) = PeerTx::new();
    p.connected(conn, tx);
    let back = a.clone();
    std::thread::spawn(move || {
        while let Some(o) = from_p.blocking_recv() {
            if let ToPeer::Repl(f) = o {
                back.frame(conn, f, Box::new(()));
            }
        }
    });
    a.attach(conn);
    let mut records = 0;
    while records < 10 {
        let ToPeer::Repl(f) = to_p.blocking_recv().unwrap() else { continue };
        records += usize::from(matches!(f, ReplFrame::Batch { .. }));
        p.frame(conn, f, Box::new(()));
    }
    a.connection_lost(conn);
    p.connection_lost(conn);
    wait_until("the passive applied 10 records", || p.stats().last_seq.load(Relaxed) >= seqs[30]);
    drop((sp, p));
    let (sp, p) = open(dp.path());
    assert!(!in_sync(&p));
    let (_, rec) = catch_up_then_promote((&sa, &a), (&sp, &p), 2);
    let want: Vec<String> = (6..=10).chain(21..=60).map(|i| format!("m{i}")).collect();
    assert_eq!(names(&p, &rec, "q"), want);
}

#[test]
fn a_catch_up_carries_records_of_earlier_epochs_each_of_its_own_epoch() {
    // Found by the pair simulator (seed 666 of its first version): the
    // records a catch-up reads from the log may be of an epoch before the
    // active's current one; applied as of the current epoch they were
    // refused, and the passive's history had already moved past them.
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (sa, a) = open_active_keeping_little(da.path());
    let (sp, p) = open(dp.path());
    behind_by_more_than_the_tail(&a, &p);
    // The active steps down and is promoted again: epoch 2, and the records
    // of epoch 1 the passive lacks are no longer in memory at all.
    demote(&a);
    promote(&a, 2);
    submit(&a, enqueue_sized("q", 1001, 10)).unwrap();
    let (_, rec) = catch_up_then_promote((&sa, &a), (&sp, &p), 3);
    let want: Vec<String> = (6..=10).chain(21..=60).chain([1001]).map(|i| format!("m{i}")).collect();
    assert_eq!(names(&p, &rec, "q"), want);
}

#[test]
fn a_restarted_passive_resumes_from_its_own_store() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (sa, a) = open_active(da.path());
    {
        let (sp, p) = open(dp.path());
        let l = link(&a, &p);
        for i in 1..=10 {
            submit(&a, enqueue(i)).unwrap();
        }
        wait_until("in sync", || in_sync(&p));
        lose_peer(&a, &p, &l);
        drop((sp, p));
    }
    for i in 11..=20 {
        submit(&a, enqueue(i)).unwrap(); // confirmed while the passive was down
    }
    let (_sp, p) = open(dp.path());
    assert!(!in_sync(&p), "a restarted passive is not in sync until the active says so");
    let l = link(&a, &p);
    wait_until("the passive caught up", || in_sync(&p));
    let kinds = l.kinds();
    assert_eq!(kinds[2], "Resume", "{kinds:?}");
    assert!(!kinds.iter().any(|k| k.starts_with("Snap") || k.contains("Refused")), "{kinds:?}");
    l.cut(&a, &p);
    drop((sa, a));
    assert_eq!(bodies(&p, &promote(&p, 2), "q"), (1..=20).map(|i| format!("m{i}")).collect::<Vec<_>>());
}

#[test]
fn a_passive_stopped_in_the_middle_of_a_snapshot_keeps_its_old_copy() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((_sa, a), (sp, p), l) = in_sync_pair(da.path(), dp.path());
    for i in 2..=5 {
        submit(&a, enqueue(i)).unwrap();
    }
    lose_peer(&a, &p, &l);
    // A snapshot starts and the passive stops half-way (frames by hand: the
    // first records of a store it is replaced by, then nothing more).
    let conn = CONNECTIONS.fetch_add(1, Relaxed);
    let (tx, _rx) = PeerTx::new();
    p.connected(conn, tx);
    let attach = AttachId { epoch: 1, promotion: 9, n: 1 };
    p.frame(conn, ReplFrame::Attach { attach, history: History::default(), last_seq: 100 }, Box::new(()));
    p.frame(conn, ReplFrame::Snapshot { attach, fork: None, handover_all: false, synced_at: 100 }, Box::new(()));
    let body = BatchBody { epoch: 1, first_seq: 1, ops: vec![Op::DeleteQueue { key: "q".into() }] };
    p.frame(conn, ReplFrame::SnapRecord { key: 1, raw: body.encode().unwrap().into() }, Box::new(()));
    wait_until("loading", || p.stats().loading.load(Relaxed));
    drop((sp, p));
    // Its old copy is intact: it resumes from it.
    let (_sp, p) = open(dp.path());
    assert_eq!(p.stats().last_seq.load(Relaxed), a.stats().last_seq.load(Relaxed));
    let l = link(&a, &p);
    wait_until("in sync", || in_sync(&p));
    assert_eq!(l.kinds()[2], "Resume", "{:?}", l.kinds());
    l.cut(&a, &p);
    assert_eq!(bodies(&p, &promote(&p, 10), "q"), (1..=5).map(|i| format!("m{i}")).collect::<Vec<_>>());
}

/// A (active) and B (its in-sync passive) split; both confirm alone; B is the
/// new active and A steps down with m2, m3 and `both` its peer never had.
fn split_and_step_down(da: &std::path::Path, db: &std::path::Path) -> ((Store, Writer), (Store, Writer)) {
    let ((sa, a), (sb, b), l) = in_sync_pair(da, db);
    submit(&a, vec![Op::PutQueue { key: "r".into(), spec: QueueSpec { kind: QueueKind::Queue } }]).unwrap();
    lose_peer(&a, &b, &l);
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
    let (sa, a) = open(da.path());
    let l = link(&b, &a);
    wait_until("a is in sync with b", || in_sync(&a));
    wait_until("handed over", || !l.handed_over().is_empty());
    assert_eq!(l.handed_over(), ["divergent: m2,m3,both,both"]);
    assert_eq!(a.stats().handover_pending.load(Relaxed), 4);
    // The new active never said it stored them (a lost connection, say): sent again.
    l.cut(&b, &a);
    let l = link(&b, &a);
    wait_until("the hand-over is sent again", || !l.handed_over().is_empty() && l.has("Resume"));
    assert_eq!(l.handed_over(), ["divergent: m2,m3,both,both"]);
    // Once the new active stored them, they are forgotten.
    let pending = sa.pending_handover().unwrap();
    assert_eq!(pending.len(), 4, "one entry per queue a message is in");
    a.handover_stored(pending.iter().map(|(_, m)| (m.epoch, m.seq)).collect());
    wait_until("the hand-over is forgotten", || sa.pending_handover().unwrap().is_empty());
    l.cut(&b, &a);
    let l = link(&b, &a);
    wait_until("a resumed", || l.has("Resume"));
    std::thread::sleep(Duration::from_millis(100));
    assert!(l.handed_over().is_empty(), "{:?}", l.kinds());
}

#[test]
fn a_node_that_becomes_active_again_before_its_hand_over_was_stored_keeps_those_messages() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((sa, a), (_sb, b)) = split_and_step_down(da.path(), db.path());
    let l = link(&b, &a);
    wait_until("a is in sync with b", || in_sync(&a));
    wait_until("handed over", || !l.handed_over().is_empty());
    // B dies before storing them; A takes over.
    l.cut(&b, &a);
    let rec = promote(&a, 3);
    let mut got = bodies(&a, &rec, "q");
    got.sort();
    assert_eq!(got, ["both", "m1", "m2", "m3", "m5"]);
    assert_eq!(bodies(&a, &rec, "r"), ["both"], "every queue the message was in");
    assert!(sa.pending_handover().unwrap().is_empty());
}

#[test]
fn a_hand_over_larger_than_a_frame_goes_in_chunks() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((sa, a), (_sb, b), l) = in_sync_pair(da.path(), db.path());
    lose_peer(&a, &b, &l);
    for i in 2..=13 {
        let mut m = msg(i, "");
        m.payload = vec![i as u8; 1024 * 1024];
        submit(&a, vec![Op::Enqueue { message: m, queues: vec!["q".into()] }]).unwrap();
    }
    promote(&b, 2);
    // b writes in its epoch, so its history outranks a's and a hands over.
    submit(&b, enqueue(14)).unwrap();
    demote(&a);
    let l = link(&b, &a);
    wait_until("handed over", || l.handed_over().len() >= 3);
    let pending = sa.pending_handover().unwrap();
    assert_eq!(pending.len(), 12);
    assert!(
        l.handed_over().len() >= 3,
        "12 MiB in chunks of at most {HANDOVER_CHUNK} bytes: {}",
        l.handed_over().len()
    );
}

#[test]
fn frames_an_old_connection_delivers_late_are_ignored() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((_sa, a), (_sp, p), old) = in_sync_pair(da.path(), dp.path());
    // The stream moves to a new connection (resumed)...
    old.cut(&a, &p);
    let l = link(&a, &p);
    submit(&a, enqueue(2)).unwrap();
    wait_until("resumed", || l.has("Resume"));
    // ...and the old one still delivers something: a record out of place.
    let stale = BatchBody { epoch: 1, first_seq: 1, ops: vec![Op::DeleteQueue { key: "q".into() }] };
    p.frame(
        old.conn,
        ReplFrame::Batch { first_seq: 1, last_seq: 1, raw: stale.encode().unwrap().into() },
        Box::new(()),
    );
    // The followed stream goes on: confirms (which wait for the in-sync passive) keep coming.
    for i in 3..=5 {
        submit(&a, enqueue(i)).unwrap();
    }
    assert!(in_sync(&p));
    assert!(!l.kinds().iter().any(|k| k.contains("Refused")), "{:?}", l.kinds());
    l.cut(&a, &p);
    assert_eq!(bodies(&p, &promote(&p, 2), "q"), ["m1", "m2", "m3", "m4", "m5"]);
}

#[test]
fn an_active_that_crashed_while_confirming_alone_hands_those_records_over_on_its_return() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((sa, a), (_sb, b), l) = in_sync_pair(da.path(), db.path());
    lose_peer(&a, &b, &l);
    submit(&a, enqueue(2)).unwrap(); // confirmed with a single copy
    submit(&a, enqueue(3)).unwrap();
    promote(&b, 2); // the peer took over meanwhile
    submit(&b, enqueue(4)).unwrap();
    drop((sa, a)); // a crash: no step-down
    let (_sa, a) = open(da.path());
    let l = link(&b, &a);
    wait_until("a is in sync with b", || in_sync(&a));
    wait_until("handed over", || !l.handed_over().is_empty());
    assert_eq!(l.handed_over(), ["divergent: m2,m3"]);
    // Dropped from a's store after they were kept for the hand-over: its
    // catch-up is from b's log, not a snapshot.
    assert!(l.has("Catchup") && !l.has("Snapshot"), "{:?}", l.kinds());
}

#[test]
fn a_promotion_that_wrote_nothing_yields_to_a_follower_that_holds_more() {
    // A wiped or stale store forced active (DESIGN.md section 4): the
    // history ranked higher, (epoch of the last op written, last op), is kept.
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((sa, a), (_sb, b), l) = in_sync_pair(da.path(), db.path());
    lose_peer(&a, &b, &l);
    submit(&a, enqueue(2)).unwrap(); // confirmed with a single copy
    submit(&a, enqueue(3)).unwrap();
    let (tx, rx) = mpsc::channel();
    b.promote(2, None, Promotion::Forced, Box::new(move |r| tx.send(r.is_ok()).unwrap()));
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "forced; it writes nothing");
    demote(&a);
    let l = link(&b, &a);
    wait_until("b finds itself outranked", || b.stats().outranked.load(Relaxed));
    assert!(!l.kinds().iter().any(|k| k.contains("Snapshot")), "a keeps its history: {:?}", l.kinds());
    assert!(sa.pending_handover().unwrap().is_empty(), "nothing to hand over: a's history is kept");
    drop(b);
    let mut got = bodies(&a, &promote(&a, 3), "q");
    got.sort();
    assert_eq!(got, ["m1", "m2", "m3"]);
}

#[test]
fn a_claimed_promotion_that_wrote_nothing_keeps_the_role_over_a_follower_with_unconfirmed_ops() {
    // The active wrote ops its in-sync passive never got (never confirmed)
    // and crashed; the passive took over and is idle when it returns: the
    // role does not move back (review of issue 10: a needless second failover).
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((sa, a), (_sb, b), l) = in_sync_pair(da.path(), db.path());
    lose_peer(&a, &b, &l);
    submit(&a, enqueue(2)).unwrap(); // written alone, as if never shipped
    drop((sa, a));
    let (_sa, a) = open(da.path());
    promote(&b, 2);
    let l = link(&b, &a);
    wait_until("a follows b", || in_sync(&a));
    assert!(!b.stats().outranked.load(Relaxed), "{:?}", l.kinds());
}

fn put_user(name: &str) -> Vec<Op> {
    let user = twinmq_store::UserRecord { password_hash: format!("$argon2id${name}"), grants: vec![] };
    vec![Op::PutUser { name: name.into(), user }]
}

#[test]
fn only_users_made_past_the_fork_are_handed_over_and_kept_ones_come_back_on_promotion() {
    // Review of issue 10: every user was handed over, so one deleted on the
    // other side came back; and a node promoted before the hand-over was
    // stored lost its own users.
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((sa, a), (_sb, b), l) = in_sync_pair(da.path(), db.path());
    submit(&a, put_user("old")).unwrap(); // both have it
    lose_peer(&a, &b, &l);
    submit(&a, put_user("made-alone")).unwrap();
    let (tx, rx) = mpsc::channel();
    b.promote(2, None, Promotion::Forced, Box::new(move |r| tx.send(r.is_ok()).unwrap()));
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    submit(&b, vec![Op::DeleteUser { name: "old".into() }]).unwrap();
    submit(&b, enqueue(5)).unwrap(); // b's history ranks first
    demote(&a);
    let l = link(&b, &a);
    wait_until("a hands over", || l.kinds().iter().any(|k| k.starts_with("admin:")));
    assert!(l.has("admin: users made-alone; queues "), "{:?}", l.kinds());
    wait_until("a follows b's history", || in_sync(&a));
    // b dies before it stored them: a, promoted, makes them its own again.
    l.cut(&b, &a);
    drop(b);
    let recovered = promote(&a, 3);
    assert!(recovered.users.contains_key("made-alone"), "{:?}", recovered.users.keys());
    assert!(!recovered.users.contains_key("old"), "b's history, where `old` was deleted, was kept");
    assert!(sa.pending_handover_admin().unwrap().is_empty(), "nothing left to hand over");
}

#[test]
fn an_in_sync_active_that_crashed_hands_nothing_over() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((sa, a), (_sb, b), l) = in_sync_pair(da.path(), db.path());
    submit(&a, enqueue(2)).unwrap(); // held for b's ack: b has it
    l.cut(&a, &b);
    drop((sa, a));
    let (_sa, a) = open(da.path());
    promote(&b, 2);
    let l = link(&b, &a);
    wait_until("a is in sync with b", || in_sync(&a));
    std::thread::sleep(Duration::from_millis(100));
    assert!(l.handed_over().is_empty(), "{:?}", l.kinds());
    l.cut(&b, &a);
    let mut got = bodies(&a, &promote(&a, 3), "q");
    got.sort();
    assert_eq!(got, ["m1", "m2"]);
}

/// A (active) and B in sync with m1..=m10 in `q`, m1..=m3 acked; the link
/// is cut and A writes `ops` B never gets (never confirmed: held for B),
/// then dies. B takes over and writes m12..=m40 of 4 KiB; A restarts on its
/// store. Returns A's dir's store and writer, B, and m1..=m10's seqs.
fn returning_active_with_its_own_ops(
    da: &std::path::Path,
    db: &std::path::Path,
    ops: impl Fn(&[u64]) -> Vec<Op>,
) -> ((Store, Writer), (Store, Writer)) {
    let ((sa, a), (sb, b), l) = in_sync_pair(da, db);
    let mut seqs = vec![0, 0];
    for i in 2..=10 {
        seqs.push(submit(&a, enqueue_sized("q", i, 100)).unwrap().first_seq);
    }
    submit(&a, ack("q", &[seqs[2], seqs[3]])).unwrap();
    wait_until("b has everything", || b.stats().last_seq.load(Relaxed) == a.stats().last_seq.load(Relaxed));
    l.cut(&a, &b);
    let before = a.stats().last_seq.load(Relaxed);
    a.submit(ops(&seqs), Box::new(|_| {}));
    wait_until("a wrote its own ops", || a.stats().last_seq.load(Relaxed) > before);
    drop((sa, a)); // a crash: no step-down
    promote(&b, 2);
    for i in 12..=40 {
        submit(&b, enqueue_sized("q", i, 4096)).unwrap();
    }
    (open(da), (sb, b))
}

#[test]
fn a_killed_active_returning_with_ops_the_new_active_lacks_drops_them_and_catches_up_from_the_log() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Its own ops: m11, and acks of m4 and m5 (their records die on a).
    let own = |seqs: &[u64]| {
        let mut ops = enqueue_sized("q", 11, 100);
        ops.extend(ack("q", &[seqs[4], seqs[5]]));
        ops
    };
    let ((sa, a), (sb, b)) = returning_active_with_its_own_ops(da.path(), db.path(), own);
    let l = link(&b, &a);
    wait_until("a is in sync with b", || in_sync(&a) && l.has("InSync"));
    let kinds = l.kinds();
    assert_eq!(&kinds[..6], ["Attach", "<-AttachReply", "Catchup", "SnapAdmin", "Live", "<-Want"], "{kinds:?}");
    // The records of m4 and m5, which its own acks had dropped, came back.
    assert_eq!(kinds.iter().filter(|k| *k == "SnapRecord").count(), 2, "{kinds:?}");
    assert!(!kinds.iter().any(|k| k == "Snapshot" || k.contains("Refused")), "{kinds:?}");
    // Never confirmed (held for b): nothing to hand over.
    assert!(l.handed_over().is_empty(), "{kinds:?}");
    wait_until("a's log is b's", || record_keys(&sa) == record_keys(&sb));
    l.cut(&b, &a);
    let want: Vec<String> = [1].into_iter().chain(4..=10).chain(12..=40).map(|i| format!("m{i}")).collect();
    assert_eq!(names(&a, &promote(&a, 3), "q"), want);
    // And from its store alone, after a restart.
    drop((sa, a));
    let (_sa, a) = open(da.path());
    assert_eq!(names(&a, &promote(&a, 4), "q"), want);
}

#[test]
fn a_returning_active_whose_compactor_dropped_a_message_its_own_ack_made_dead_gets_that_record_back() {
    let eager =
        twinmq_store::compactor::CompactionConfig { bytes_per_sec: 256 << 20, min_bytes: 0, min_age: Duration::ZERO };
    let cfg = WriterConfig {
        durability: Durability::Replicated,
        active: false,
        compaction: eager,
        ..WriterConfig::default()
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (sa, a) = open_with(da.path(), cfg.clone());
    promote(&a, 1);
    submit(&a, vec![Op::PutQueue { key: "q".into(), spec: QueueSpec { kind: QueueKind::Queue } }]).unwrap();
    let (sb, b) = open_with(db.path(), cfg.clone());
    let l = link(&a, &b);
    // One record of m100..=m109; m100..=m106 acked on both (both compact it).
    let ops: Vec<Op> = (0..10).flat_map(|i| enqueue_sized("q", 100 + i, 1000)).collect();
    let first = submit(&a, ops).unwrap().first_seq;
    submit(&a, ack("q", &(first..first + 7).collect::<Vec<_>>())).unwrap();
    wait_until("both compacted it", || [&a, &b].iter().all(|w| w.stats_handle().compacted_records.load(Relaxed) >= 1));
    // Cut off, a acks m107 and m108 on its own (never confirmed) and
    // compacts again: its record no longer holds them.
    l.cut(&a, &b);
    let compacted = a.stats_handle().compacted_records.load(Relaxed);
    a.submit(ack("q", &[first + 7, first + 8]), Box::new(|_| {}));
    wait_until("a compacted them away", || a.stats_handle().compacted_records.load(Relaxed) > compacted);
    drop((sa, a));
    promote(&b, 2);
    submit(&b, enqueue_sized("q", 200, 10)).unwrap();
    let (sa, a) = open_with(da.path(), cfg);
    let l = link(&b, &a);
    wait_until("a is in sync with b", || in_sync(&a) && l.has("InSync"));
    let kinds = l.kinds();
    assert!(kinds.contains(&"SnapRecord".to_string()) && !l.has("Snapshot"), "{kinds:?}");
    // (b keeps the record of the acks of m100..=m106: its index had them
    // pinned by the record it compacted since; a, reading the compacted
    // copy, holds it dead.)
    let (ka, kb) = (record_keys(&sa), record_keys(&sb));
    assert!(ka.iter().all(|k| kb.contains(k)), "{ka:?} {kb:?}");
    l.cut(&b, &a);
    assert_eq!(names(&a, &promote(&a, 3), "q"), ["m107", "m108", "m109", "m200"]);
}

#[test]
fn a_returning_active_cut_off_before_the_records_it_wanted_came_gets_a_snapshot_even_after_a_restart() {
    // Review: it had dropped its own ops (and with them the records of m4
    // and m5, acked by its own op only); cut off before those records came,
    // it then held a prefix of the active's history, resumed it, and never
    // got them back.
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let own = |seqs: &[u64]| ack("q", &[seqs[4], seqs[5]]);
    let ((sa, a), (_sb, b)) = returning_active_with_its_own_ops(da.path(), db.path(), own);
    let conn = CONNECTIONS.fetch_add(1, Relaxed);
    let (tx, mut to_a) = PeerTx::new();
    b.connected(conn, tx);
    let (tx, mut from_a) = PeerTx::new();
    a.connected(conn, tx);
    let back = b.clone();
    std::thread::spawn(move || {
        while let Some(o) = from_a.blocking_recv() {
            if let ToPeer::Repl(f) = o {
                back.frame(conn, f, Box::new(()));
            }
        }
    });
    b.attach(conn);
    loop {
        let ToPeer::Repl(f) = to_a.blocking_recv().unwrap() else { continue };
        if matches!(f, ReplFrame::SnapRecord { .. }) {
            break; // the connection is gone before the records it wanted
        }
        a.frame(conn, f, Box::new(()));
    }
    b.connection_lost(conn);
    a.connection_lost(conn);
    std::thread::sleep(Duration::from_millis(100));
    drop((sa, a));
    let (_sa, a) = open(da.path());
    let l = link(&b, &a);
    // It refuses the resume b offers (a prefix of b's history); b's next
    // attach (the peer monitor's, here by hand) sends a snapshot.
    let refused = |l: &Link| l.kinds().iter().any(|k| k.contains("Refused: this store dropped its own ops"));
    wait_until("a is in sync with b", || {
        if refused(&l) && !l.has("Snapshot") {
            b.attach(l.conn);
            std::thread::sleep(Duration::from_millis(20));
        }
        in_sync(&a) && l.has("InSync")
    });
    let kinds = l.kinds();
    l.cut(&b, &a);
    let want: Vec<String> = [1].into_iter().chain(4..=10).chain(12..=40).map(|i| format!("m{i}")).collect();
    assert_eq!(names(&a, &promote(&a, 3), "q"), want, "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "Snapshot"), "{kinds:?}");
}

#[test]
fn a_returning_active_that_deleted_a_queue_past_the_fork_gets_its_records_back() {
    // Its own op deleted `q` (every record of q's messages died and went,
    // and so did the record of the delete itself: nothing past the fork
    // tells what it did). The live lists through the fork do.
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let own = |_: &[u64]| vec![Op::DeleteQueue { key: "q".into() }];
    let ((sa, a), (sb, b)) = returning_active_with_its_own_ops(da.path(), db.path(), own);
    let l = link(&b, &a);
    wait_until("a is in sync with b", || in_sync(&a) && l.has("InSync"));
    let kinds = l.kinds();
    assert_eq!(&kinds[..6], ["Attach", "<-AttachReply", "Catchup", "SnapAdmin", "Live", "<-Want"], "{kinds:?}");
    assert!(kinds.iter().filter(|k| *k == "SnapRecord").count() >= 8, "{kinds:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(record_keys(&sa), record_keys(&sb), "{kinds:?}");
    l.cut(&b, &a);
    let want: Vec<String> = [1].into_iter().chain(4..=10).chain(12..=40).map(|i| format!("m{i}")).collect();
    assert_eq!(names(&a, &promote(&a, 3), "q"), want);
}

#[test]
fn a_passive_whose_disk_fails_says_so_and_the_active_stops_waiting_for_it() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((_sa, a), (_sp, p), l) = in_sync_pair(da.path(), dp.path());
    // The passive's watchdog saw a sync hang (or a write failed).
    p.disk_failed("test: EIO");
    let (tx, rx) = mpsc::channel();
    a.submit(enqueue(2), Box::new(move |r| tx.send(r.is_ok()).unwrap()));
    assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), "confirmed single-copy once the passive said it failed");
    assert!(l.has("<-Failed"), "{:?}", l.kinds());
    wait_until("neither counts the passive in sync", || !in_sync(&p) && !a.stats().follower_in_sync.load(Relaxed));
    // A failed store serves nothing.
    let (tx, rx) = mpsc::channel();
    p.promote(9, None, Promotion::Claimed, Box::new(move |r| tx.send(r.is_ok()).unwrap()));
    assert!(!rx.recv_timeout(Duration::from_secs(5)).unwrap());
}

#[test]
fn an_active_whose_disk_failed_confirms_nothing_more() {
    let da = tempfile::tempdir().unwrap();
    let (_sa, a) = open_active(da.path());
    submit(&a, enqueue(1)).unwrap();
    a.disk_failed("test: a sync hung past disk_stall_ms");
    // A pair member: the client is sent to the peer (which takes the role).
    let refused = submit(&a, enqueue(2));
    assert!(matches!(&refused, Err(e @ StoreError::FailedOver(_)) if e.retry_elsewhere()), "{refused:?}");
    assert!(a.stats().disk_failed.load(Relaxed));
}

#[test]
fn a_single_node_whose_disk_failed_says_so_to_the_client() {
    let da = tempfile::tempdir().unwrap();
    let (_s, w) = open_with(da.path(), WriterConfig { active: true, ..WriterConfig::default() });
    w.disk_failed("test: EIO");
    let refused = submit(&w, vec![Op::DeleteQueue { key: "x".into() }]);
    assert!(matches!(&refused, Err(e @ StoreError::Failed(_)) if !e.retry_elsewhere()), "{refused:?}");
}

/// A commit held for the follower, which stops answering (its connection
/// is cut, the active does not know yet).
fn held(a: &Writer, p: &Writer, l: &Link, i: u64) -> mpsc::Receiver<Result<Committed, StoreError>> {
    l.cut(p, p); // only the passive's end: the active still waits for it
    let (tx, rx) = mpsc::channel();
    a.submit(enqueue(i), Box::new(move |r| tx.send(r).unwrap()));
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "held for the follower");
    rx
}

#[test]
fn what_waited_for_a_peer_declared_down_is_confirmed_under_the_lease_renewed_meanwhile() {
    // The lease is renewed by the role arbiter while every publish is held
    // (no commit renews the writer's copy): the peer declared down, what
    // waited is confirmed single-copy, not refused as "not active".
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((_sa, a), (_sp, p), l) = in_sync_pair(da.path(), dp.path());
    a.set_lease(clock::lease_now_ms() + 150);
    let rx = held(&a, &p, &l, 2);
    std::thread::sleep(Duration::from_millis(300));
    a.set_lease(clock::lease_now_ms() + 1000);
    lose_peer(&a, &p, &l);
    let r = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(r.is_ok(), "confirmed single-copy: {r:?}");
}

#[test]
fn a_commit_written_but_refused_is_kept_and_says_so() {
    // require_replica: the follower is gone, what waited for it is refused;
    // it was written here all the same, and the refusal says what.
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = WriterConfig {
        durability: Durability::Replicated,
        active: false,
        require_replica: true,
        ..WriterConfig::default()
    };
    let (sa, a) = open_with(da.path(), cfg);
    promote(&a, 1);
    let (_sp, p) = open(dp.path());
    let l = link(&a, &p);
    wait_until("the passive is in sync", || in_sync(&p));
    submit(&a, vec![Op::PutQueue { key: "q".into(), spec: QueueSpec { kind: QueueKind::Queue } }]).unwrap();
    let rx = held(&a, &p, &l, 2);
    lose_peer(&a, &p, &l);
    match rx.recv_timeout(Duration::from_secs(5)).unwrap() {
        Err(StoreError::Unconfirmed { reason, written }) => {
            assert!(matches!(*reason, StoreError::NoReplica), "{reason:?}");
            assert!(matches!(&written.ops[..], [Op::Enqueue { message, .. }] if message.payload == b"m2"));
        }
        other => panic!("expected a written, unconfirmed commit: {other:?}"),
    }
    drop((a, sa, p, l));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (store, rec) = loop {
        match Store::open(&StoreConfig::new(da.path())) {
            Ok(opened) => break opened,
            Err(e) => assert!(std::time::Instant::now() < deadline, "reopen: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(bodies(&store, &rec, "q"), ["m2"], "in the store, as the refusal said");
}

#[test]
fn what_was_handed_in_is_known_on_both_nodes_so_a_hand_over_sent_again_is_not_stored_twice() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((_sa, a), (_sp, p), _l) = in_sync_pair(da.path(), dp.path());
    let mut m = msg(0, "from the other side");
    m.producer_id = 0;
    submit(
        &a,
        vec![
            Op::Enqueue { message: m, queues: vec!["q".into()] },
            Op::HandedIn { epoch: 1, seq: 77, queue: "q".into() },
        ],
    )
    .unwrap();
    assert!(a.handed_in(1, 77, "q").unwrap());
    assert!(!a.handed_in(1, 78, "q").unwrap() && !a.handed_in(1, 77, "r").unwrap());
    assert!(p.handed_in(1, 77, "q").unwrap(), "replicated with the message");
}

#[test]
fn records_the_compactor_rewrote_on_both_nodes_reach_a_new_passive_and_every_promotion_finds_the_same_messages() {
    let eager =
        twinmq_store::compactor::CompactionConfig { bytes_per_sec: 256 << 20, min_bytes: 0, min_age: Duration::ZERO };
    let cfg = WriterConfig {
        durability: Durability::Replicated,
        active: false,
        compaction: eager,
        ..WriterConfig::default()
    };
    let (da, dp, dn) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The active keeps little of its log in memory: a new passive gets a snapshot.
    let (_sa, a) = open_with(da.path(), WriterConfig { tail_bytes: 64 << 10, ..cfg.clone() });
    promote(&a, 1);
    for q in ["q", "busy"] {
        submit(&a, vec![Op::PutQueue { key: q.into(), spec: QueueSpec { kind: QueueKind::Queue } }]).unwrap();
    }
    let (_sp, p) = open_with(dp.path(), cfg.clone());
    let l = link(&a, &p);
    // Each record: 10 busy messages, acked, and one in q, never consumed.
    let mut kept = Vec::new();
    for r in 0..60u64 {
        let mut ops = Vec::new();
        for i in 0..11 {
            let mut m = msg(r * 11 + i + 1, &format!("{}-{r}-{i}", if i == 3 { "kept" } else { "busy" }));
            m.payload.extend_from_slice(&[b'.'; 1000]);
            ops.push(Op::Enqueue { message: m, queues: vec![if i == 3 { "q" } else { "busy" }.into()] });
        }
        let c = submit(&a, ops).unwrap();
        kept.push(format!("kept-{r}-3{}", ".".repeat(1000)));
        let acks =
            (0..11).filter(|i| *i != 3).map(|i| Op::Ack { queue: "busy".into(), seq: c.first_seq + i }).collect();
        submit(&a, acks).unwrap();
    }
    wait_until("the passive is in sync", || in_sync(&p));
    for (who, w) in [("active", &a), ("passive", &p)] {
        let s = w.stats_handle();
        // It compacts until the records take at most 1.5x what their live messages weigh.
        wait_until(&format!("the {who}'s records are small"), || {
            s.live_bytes.load(Relaxed) * 2 <= s.live_weight.load(Relaxed) * 3
        });
        assert!(s.compacted_records.load(Relaxed) >= 50, "{who}: {}", s.compacted_records.load(Relaxed));
    }
    // A new passive gets the active's rewritten records by snapshot.
    l.cut(&a, &p);
    a.peer_down(true);
    let (_sn, n) = open_with(dn.path(), cfg);
    let ln = link(&a, &n);
    wait_until("the new passive is in sync", || in_sync(&n) && ln.has("InSync"));
    assert!(ln.has("Snapshot"), "{:?}", ln.kinds());
    ln.cut(&a, &n);
    for (who, w, epoch) in [("the old passive", &p, 2), ("the new passive", &n, 3)] {
        let rec = promote(w, epoch);
        assert_eq!(bodies(w, &rec, "q"), kept, "{who}");
        assert!(rec.messages.get("busy").is_none_or(Vec::is_empty), "{who}: an acked message came back");
    }
}

#[test]
fn a_snapshot_is_swapped_in_by_trading_trees_and_a_reopened_passive_finds_it_each_time() {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_sa, a) = open_active_keeping_little(da.path());
    let mut want = Vec::new();
    // Three times: the active writes more than its tail while the passive
    // is away, the passive gets a snapshot (the log and the staging tree
    // trade places), then stops.
    for round in 0..3u64 {
        for i in 0..20 {
            let mut m = msg(round * 100 + i + 1, &format!("r{round}-{i}"));
            m.payload.extend_from_slice(&[b'.'; 8 << 10]);
            want.push(String::from_utf8(m.payload.clone()).unwrap());
            submit(&a, vec![Op::Enqueue { message: m, queues: vec!["q".into()] }]).unwrap();
        }
        let (sp, p) = open(dp.path());
        // Of an earlier release (a catch-up from the log would do otherwise).
        let l = connect_at(&a, &p, false);
        a.attach(l.conn);
        wait_until("the passive is in sync", || in_sync(&p) && l.has("InSync"));
        assert!(l.has("Snapshot"), "round {round}: {:?}", l.kinds());
        lose_peer(&a, &p, &l);
        drop((sp, p));
    }
    // Reopened cold after its third snapshot: the log it swapped in last.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (store, rec) = loop {
        match Store::open(&StoreConfig::new(dp.path())) {
            Ok(opened) => break opened,
            Err(e) => assert!(std::time::Instant::now() < deadline, "reopen: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(bodies(&store, &rec, "q"), want);
}

#[test]
fn records_written_while_a_snapshot_streams_reach_the_index_built_as_it_is_staged() {
    records_written_while_the_passive_catches_up(false);
}

#[test]
fn records_written_while_a_catch_up_from_the_log_streams_reach_the_passive_after_it() {
    records_written_while_the_passive_catches_up(true);
}

/// A passive that was away gets ~13 MB (a snapshot, or a catch-up from the
/// log) while the active acks messages in it and writes new ones.
fn records_written_while_the_passive_catches_up(log_catchup: bool) {
    let (da, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_sa, a) = open_active_keeping_little(da.path());
    let (sp, p) = open(dp.path());
    let l = link(&a, &p);
    wait_until("in sync", || in_sync(&p));
    lose_peer(&a, &p, &l);
    drop((sp, p));
    let big = |i: u64| {
        let mut m = msg(i, &format!("m{i}"));
        m.payload.extend_from_slice(&[b'.'; 16 << 10]);
        m
    };
    // A snapshot of ~13 MB: more than the active queues for the link, sent
    // over many turns of its writer.
    let mut seqs = Vec::new();
    for i in 1..=800 {
        seqs.push(submit(&a, vec![Op::Enqueue { message: big(i), queues: vec!["q".into()] }]).unwrap().first_seq);
    }
    let (_sp, p) = open(dp.path());
    // A slow link: the active reads ahead of it only so far.
    let l = connect_slow(&a, &p, log_catchup, Duration::from_micros(500));
    a.attach(l.conn);
    // Meanwhile: acks of messages in the snapshot's records, and new messages.
    for (n, s) in seqs[..400].iter().enumerate() {
        let mut ops = vec![Op::Ack { queue: "q".into(), seq: *s }];
        if n % 4 == 0 {
            ops.push(Op::Enqueue { message: big(1000 + n as u64), queues: vec!["q".into()] });
        }
        submit(&a, ops).unwrap();
    }
    wait_until("the passive is in sync", || in_sync(&p) && l.has("InSync"));
    let kinds = l.kinds();
    if log_catchup {
        // Records written meanwhile are read from the log by the catch-up:
        // more records than the 800 there were when it began.
        let end = kinds.iter().position(|k| k == "CatchupEnd").expect("a catch-up was sent");
        assert!(!kinds.iter().any(|k| k.starts_with("Snapshot") || k.contains("Refused")), "{kinds:?}");
        let during = kinds[..end].iter().filter(|k| *k == "Batch").count();
        assert!(during > 800, "no record written during the catch-up came with it: {during}");
    } else {
        let end = kinds.iter().position(|k| k == "SnapEnd").expect("a snapshot was sent");
        assert!(kinds[..end].iter().any(|k| k == "Batch"), "no record streamed during the snapshot: {kinds:?}");
    }
    l.cut(&a, &p);
    let want: Vec<String> = (401..=800)
        .chain((0..400).filter(|n| n % 4 == 0).map(|n| 1000 + n))
        .map(|i| String::from_utf8(big(i).payload).unwrap())
        .collect();
    let rec = promote(&p, 2);
    assert_eq!(bodies(&p, &rec, "q"), want, "the index built while staging");
}
