//! Store behaviour across close and reopen, on real sled files.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::sync::mpsc;

use twinmq_store::*;

fn msg(producer_id: u64, producer_seq: u64, body: &str) -> StoredMessage {
    StoredMessage {
        epoch: 0,
        seq: 0,
        origin: "queue:q".into(),
        producer_id,
        producer_seq,
        headers: Default::default(),
        payload: body.as_bytes().to_vec(),
        timestamp_ms: 1,
        expires_at_ms: None,
    }
}

/// The bodies of queue `q`'s messages as recovered, in order.
fn bodies(store: &Store, rec: &Recovered) -> Vec<String> {
    rec.messages["q"]
        .iter()
        .map(|m| String::from_utf8(store.read_message(m.seq).unwrap().unwrap().payload.clone()).unwrap())
        .collect()
}

fn queue() -> QueueSpec {
    QueueSpec { kind: QueueKind::Queue }
}

fn submit(w: &Writer, ops: Vec<Op>) -> Committed {
    let (tx, rx) = mpsc::channel();
    w.submit(ops, Box::new(move |r| tx.send(r).expect("test waits")));
    rx.recv().expect("writer answers").expect("commit succeeds")
}

/// Open the store at `dir`. After a reopen, sled's background flusher may
/// hold the file lock for a moment after the last handle is gone: retry for
/// a bounded time (it flaked in CI without this).
fn try_open(dir: &std::path::Path) -> Result<(Store, Recovered), StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Store::open(&StoreConfig::new(dir)) {
            Err(StoreError::Open { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => return other,
        }
    }
}

fn open(dir: &std::path::Path) -> (Store, Recovered) {
    try_open(dir).expect("store opens")
}

#[test]
fn acked_messages_stay_gone_and_unacked_come_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut rec) = open(dir.path());
    let (w, h) = Writer::start(store.clone(), &mut rec, WriterConfig::default()).unwrap();
    submit(&w, vec![Op::PutQueue { key: "q".into(), spec: queue() }]);
    let mut seqs = Vec::new();
    for i in 0..10u64 {
        let c = submit(&w, vec![Op::Enqueue { message: msg(7, i + 1, &format!("m{i}")), queues: vec!["q".into()] }]);
        seqs.push(c.first_seq);
    }
    for s in &seqs[..4] {
        submit(&w, vec![Op::Ack { queue: "q".into(), seq: *s }]);
    }
    drop(w);
    h.join().unwrap();
    store.close().unwrap();

    let (store, rec) = open(dir.path());
    let bodies = bodies(&store, &rec);
    assert_eq!(bodies, (4..10).map(|i| format!("m{i}")).collect::<Vec<_>>());
    assert_eq!(rec.dedup.get(&7), Some(&10));
    assert!(rec.next_seq > *seqs.last().unwrap());
}

#[test]
fn a_resend_with_the_same_producer_sequence_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut rec) = open(dir.path());
    let (w, _h) = Writer::start(store, &mut rec, WriterConfig::default()).unwrap();
    submit(&w, vec![Op::PutQueue { key: "q".into(), spec: queue() }]);
    let first = submit(&w, vec![Op::Enqueue { message: msg(9, 1, "a"), queues: vec!["q".into()] }]);
    assert!(!first.duplicate);
    let again = submit(&w, vec![Op::Enqueue { message: msg(9, 1, "a"), queues: vec!["q".into()] }]);
    assert!(again.duplicate);
    drop(w);
}

/// Issue 12 (batching publishes): one submission that holds an old resend
/// and new messages stores the new ones and names the resend; it used to be
/// taken as a duplicate whole, so the new messages were confirmed and lost.
#[test]
fn a_submission_with_one_resend_stores_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut rec) = open(dir.path());
    let (w, h) = Writer::start(store.clone(), &mut rec, WriterConfig::default()).unwrap();
    submit(&w, vec![Op::PutQueue { key: "q".into(), spec: queue() }]);
    submit(&w, vec![Op::Enqueue { message: msg(9, 1, "a"), queues: vec!["q".into()] }]);
    let enqueue = |p: u64, s: u64, body: &str| Op::Enqueue { message: msg(p, s, body), queues: vec!["q".into()] };
    // The resend in the middle; a second resend of seq 2 within the same submission.
    let c = submit(&w, vec![enqueue(9, 2, "b"), enqueue(9, 1, "a"), enqueue(4, 1, "x"), enqueue(9, 2, "b")]);
    assert!(!c.duplicate, "not a duplicate as a whole");
    // Positions in the submission: the stored (9, 2) is not named, its resend is.
    assert_eq!(c.duplicates, vec![1, 3]);
    let stored: Vec<(u64, u64)> = c
        .ops
        .iter()
        .map(|op| match op {
            Op::Enqueue { message, .. } => (message.producer_id, message.producer_seq),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(stored, vec![(9, 2), (4, 1)]);
    assert_eq!(c.ops.len(), 2);
    // All resends: a duplicate, naming each.
    let all = submit(&w, vec![enqueue(9, 1, "a"), enqueue(4, 1, "x")]);
    assert!(all.duplicate && all.ops.is_empty());
    assert_eq!(all.duplicates, vec![0, 1]);
    drop(w);
    h.join().unwrap();
    store.close().unwrap();
    let (store, rec) = open(dir.path());
    let bodies = bodies(&store, &rec);
    assert_eq!(bodies, ["a", "b", "x"]);
}

/// Issue 10, finding 5: the table of producer ids only grew (200,000 ids:
/// 45 MB on disk). An id unused for `producer_expiry` is forgotten, on disk
/// too; one in use is kept.
#[test]
fn idle_producer_ids_are_forgotten_after_the_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut rec) = open(dir.path());
    let cfg = WriterConfig { producer_expiry: std::time::Duration::from_millis(300), ..WriterConfig::default() };
    let (w, h) = Writer::start(store.clone(), &mut rec, cfg).unwrap();
    submit(&w, vec![Op::PutQueue { key: "q".into(), spec: queue() }]);
    let enqueue = |p: u64, s: u64| vec![Op::Enqueue { message: msg(p, s, "m"), queues: vec!["q".into()] }];
    let first = submit(&w, enqueue(9, 1));
    submit(&w, enqueue(5, 1));
    submit(&w, vec![Op::Ack { queue: "q".into(), seq: first.first_seq }]);
    assert!(submit(&w, enqueue(9, 1)).duplicate, "within the expiry: a resend");
    for i in 2..8 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!submit(&w, enqueue(5, i)).duplicate, "producer 5 keeps publishing");
    }
    // Producer 9 was idle for 600 ms: forgotten, so the same id and sequence
    // is a new message now (at-least-once past the window), while 5 is kept.
    assert!(!submit(&w, enqueue(9, 1)).duplicate, "an idle id was forgotten");
    assert!(submit(&w, enqueue(5, 7)).duplicate, "a live id is kept");
    drop(w);
    h.join().unwrap();
    store.close().unwrap();
    let (_store, rec) = open(dir.path());
    assert_eq!(rec.dedup.get(&5), Some(&7));
}

#[test]
fn fully_acked_records_are_deleted_and_sequence_numbers_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let last;
    {
        let (store, mut rec) = open(dir.path());
        let (w, h) = Writer::start(store.clone(), &mut rec, WriterConfig::default()).unwrap();
        submit(&w, vec![Op::PutQueue { key: "q".into(), spec: queue() }]);
        let c = submit(&w, vec![Op::Enqueue { message: msg(0, 0, "x"), queues: vec!["q".into()] }]);
        let a = submit(&w, vec![Op::Ack { queue: "q".into(), seq: c.first_seq }]);
        last = a.first_seq;
        assert_eq!(w.stats().live_batches.load(std::sync::atomic::Ordering::Relaxed), 0);
        drop(w);
        h.join().unwrap();
        store.close().unwrap();
    }
    let (store, rec) = open(dir.path());
    assert_eq!(rec.batches, 0, "every record was dead and deleted");
    assert!(rec.messages["q"].is_empty());
    assert!(rec.next_seq > last, "next_seq {} must stay above {last}", rec.next_seq);
    assert_eq!(store.raw_batches_from(0).count(), 0);
}

#[test]
fn deleted_then_recreated_queue_does_not_resurrect_old_messages() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, mut rec) = open(dir.path());
        let (w, h) = Writer::start(store.clone(), &mut rec, WriterConfig::default()).unwrap();
        submit(&w, vec![Op::PutQueue { key: "q".into(), spec: queue() }]);
        submit(&w, vec![Op::PutQueue { key: "keep".into(), spec: queue() }]);
        // One record holding a message for both queues keeps the record alive.
        submit(&w, vec![Op::Enqueue { message: msg(0, 0, "old"), queues: vec!["q".into(), "keep".into()] }]);
        submit(&w, vec![Op::DeleteQueue { key: "q".into() }]);
        submit(&w, vec![Op::PutQueue { key: "q".into(), spec: queue() }]);
        drop(w);
        h.join().unwrap();
        store.close().unwrap();
    }
    let (_s, rec) = open(dir.path());
    assert!(rec.messages["q"].is_empty());
    assert_eq!(rec.messages["keep"].len(), 1);
}

#[test]
fn a_corrupted_record_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let key;
    {
        let (store, mut rec) = open(dir.path());
        let (w, h) = Writer::start(store.clone(), &mut rec, WriterConfig::default()).unwrap();
        submit(&w, vec![Op::PutQueue { key: "q".into(), spec: queue() }]);
        key = submit(&w, vec![Op::Enqueue { message: msg(0, 0, "x"), queues: vec!["q".into()] }]).first_seq;
        drop(w);
        h.join().unwrap();
        store.close().unwrap();
    }
    {
        // Flip one byte of our record through sled itself, so sled's own log stays valid
        // and only our checksum can notice.
        // sled's background flusher may hold the file lock for a moment after
        // the last handle is gone: retry for a bounded time.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match sled::Config::new().path(dir.path()).segment_size(twinmq_store::store::SEGMENT_BYTES).open() {
                Ok(db) => break db,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("sled not yet released ({e}); retrying");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("sled still locked after 5 s: {e}"),
            }
        };
        let log = db.open_tree("log").unwrap();
        let mut raw = log.get(key.to_be_bytes()).unwrap().expect("record exists").to_vec();
        let n = raw.len() - 1;
        raw[n] ^= 1;
        log.insert(key.to_be_bytes(), raw).unwrap();
        db.flush().unwrap();
    }
    // The index checkpoint covers the record: it is checked when it is read.
    {
        let (store, rec) = open(dir.path());
        assert_eq!(rec.messages["q"].len(), 1);
        match store.read_message(key) {
            Err(StoreError::Corrupt { key: k, .. }) => assert_eq!(k, key),
            other => panic!("expected Corrupt on read, got {other:?}"),
        }
    }
    // Without a checkpoint every record is read, and checked, at open.
    std::fs::remove_file(dir.path().join("index.ckpt")).unwrap();
    match try_open(dir.path()) {
        Err(StoreError::Corrupt { key: k, .. }) => assert_eq!(k, key),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn users_survive_reopen_and_their_sequence_is_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut rec) = open(dir.path());
    let (w, h) = Writer::start(store.clone(), &mut rec, WriterConfig::default()).unwrap();
    let u = UserRecord {
        password_hash: "$argon2id$fake".into(),
        grants: vec![Grant { permission: Permission::Consume, pattern: "#".into() }],
    };
    let c = submit(&w, vec![Op::PutUser { name: "app".into(), user: u.clone() }]);
    submit(&w, vec![Op::PutUser { name: "tmp".into(), user: u.clone() }]);
    submit(&w, vec![Op::DeleteUser { name: "tmp".into() }]);
    drop(w);
    h.join().unwrap();
    store.close().unwrap();

    let (_store, rec) = open(dir.path());
    assert_eq!(rec.users.len(), 1);
    assert_eq!(rec.users["app"], u);
    assert!(rec.next_seq > c.first_seq);
    assert!(rec.queues.is_empty(), "user entries are not mistaken for queues");
}

/// What a reopen recovers (messages per queue, idempotence marks, next
/// sequence), comparable across the two ways of reading it.
type State = (Vec<(String, Vec<MessageRef>)>, Vec<(u64, u64)>, u64);

fn state(rec: &Recovered) -> State {
    let mut messages: Vec<_> = rec.messages.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    messages.sort_by(|a, b| a.0.cmp(&b.0));
    let mut dedup: Vec<_> = rec.dedup.iter().map(|(k, v)| (*k, *v)).collect();
    dedup.sort();
    (messages, dedup, rec.next_seq)
}

#[test]
fn a_restart_from_an_index_checkpoint_and_the_log_after_it_recovers_what_a_full_read_does() {
    let dir = tempfile::tempdir().unwrap();
    let ttl = |mut m: StoredMessage| {
        m.expires_at_ms = Some(4_000_000_000_000);
        m
    };
    // First run: stopped cleanly, so it leaves a checkpoint.
    let (store, mut rec) = open(dir.path());
    let (w, h) = Writer::start(store.clone(), &mut rec, WriterConfig::default()).unwrap();
    submit(&w, vec![Op::PutQueue { key: "q".into(), spec: queue() }, Op::PutQueue { key: "r".into(), spec: queue() }]);
    let mut seqs = Vec::new();
    for i in 0..40u64 {
        let m = if i % 7 == 0 { ttl(msg(3, i + 1, &format!("m{i}"))) } else { msg(3, i + 1, &format!("m{i}")) };
        let queues = if i % 5 == 0 { vec!["q".into(), "r".into()] } else { vec!["q".into()] };
        seqs.push(submit(&w, vec![Op::Enqueue { message: m, queues }]).first_seq);
    }
    for s in &seqs[..10] {
        submit(&w, vec![Op::Ack { queue: "q".into(), seq: *s }]);
    }
    drop(w);
    h.join().unwrap();
    store.close().unwrap();
    let ckpt = dir.path().join("index.ckpt");
    assert!(ckpt.exists(), "a clean stop leaves an index checkpoint");

    // Second run: more records (enqueues, acks of messages the checkpoint
    // holds, a deleted queue, a new producer); its files copied while it
    // runs are what a crash before its next checkpoint leaves.
    let crashed = tempfile::tempdir().unwrap();
    let (store, mut rec) = open(dir.path());
    assert_eq!(rec.batches, 0, "nothing after the checkpoint to read");
    assert_eq!(rec.messages["q"].len(), 30);
    let (w, h) = Writer::start(store.clone(), &mut rec, WriterConfig::default()).unwrap();
    for s in &seqs[10..20] {
        submit(&w, vec![Op::Ack { queue: "q".into(), seq: *s }]);
    }
    submit(&w, vec![Op::DeleteQueue { key: "r".into() }]);
    for i in 0..5u64 {
        submit(&w, vec![Op::Enqueue { message: ttl(msg(9, i + 1, &format!("n{i}"))), queues: vec!["q".into()] }]);
    }
    store.sync().unwrap();
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let f = f.unwrap();
        if f.file_type().unwrap().is_file() {
            std::fs::copy(f.path(), crashed.path().join(f.file_name())).unwrap();
        }
    }
    assert!(crashed.path().join("index.ckpt").exists());
    drop(w);
    h.join().unwrap();
    store.close().unwrap();
    let ckpt = crashed.path().join("index.ckpt");
    let (store, from_ckpt) = open(crashed.path());
    assert!(from_ckpt.batches > 0, "the records after the old checkpoint were read");
    let with_ckpt = state(&from_ckpt);
    drop((store, from_ckpt));

    std::fs::remove_file(&ckpt).unwrap();
    let (store, full) = open(crashed.path());
    assert_eq!(with_ckpt, state(&full), "checkpoint + tail == the whole log");
    assert_eq!(full.messages["q"].len(), 25);
    assert!(!full.messages.contains_key("r"));
    assert_eq!(full.dedup.get(&9), Some(&5));
    assert!(full.messages["q"].iter().filter(|m| m.expires_at_ms.is_some()).count() >= 5, "expiries kept");
    // Bodies are read from their records, not kept.
    let first = full.messages["q"][0];
    assert_eq!(store.read_message(first.seq).unwrap().unwrap().payload, b"m20");

    // A checkpoint that cannot be read is ignored: the whole log is read.
    drop(store);
    std::fs::write(&ckpt, b"garbage").unwrap();
    let (_store, again) = open(crashed.path());
    assert_eq!(state(&again), state(&full));
    // The cleanly stopped copy, from its own checkpoint, agrees too.
    let (_s, clean) = open(dir.path());
    assert_eq!(clean.batches, 0);
    assert_eq!(state(&clean), state(&full));
}

#[test]
fn a_store_made_with_the_earlier_segment_size_is_migrated_at_open_and_the_old_copy_kept() {
    let dir = tempfile::tempdir().unwrap();
    let made = dir.path().join("made");
    let (store, mut rec) = open(&made);
    let (w, h) = Writer::start(store.clone(), &mut rec, WriterConfig::default()).unwrap();
    submit(&w, vec![Op::PutQueue { key: "q".into(), spec: queue() }]);
    for i in 0..20u64 {
        submit(&w, vec![Op::Enqueue { message: msg(5, i + 1, &format!("m{i}")), queues: vec!["q".into()] }]);
    }
    drop(w);
    h.join().unwrap();
    store.close().unwrap();

    // The same trees in a store with the earlier version's 512 KiB segments.
    let old = dir.path().join("data");
    {
        let open_sled = |p: &std::path::Path, segment: usize| loop {
            match sled::Config::new().path(p).segment_size(segment).open() {
                Ok(db) => break db,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        };
        let src = open_sled(&made, twinmq_store::store::SEGMENT_BYTES);
        let dst = open_sled(&old, 512 * 1024);
        for name in src.tree_names() {
            let (a, b) = (src.open_tree(&name).unwrap(), dst.open_tree(&name).unwrap());
            for kv in a.iter() {
                let (k, v) = kv.unwrap();
                b.insert(k, v).unwrap();
            }
        }
        dst.flush().unwrap();
    }
    let conf = String::from_utf8_lossy(&std::fs::read(old.join("conf")).unwrap()).into_owned();
    assert!(conf.contains("segment_size: 524288"), "{conf}");

    let (store, rec) = open(&old);
    let bodies = bodies(&store, &rec);
    assert_eq!(bodies, (0..20).map(|i| format!("m{i}")).collect::<Vec<_>>());
    assert_eq!(rec.dedup.get(&5), Some(&20));
    let conf = String::from_utf8_lossy(&std::fs::read(old.join("conf")).unwrap()).into_owned();
    assert!(conf.contains(&format!("segment_size: {}", twinmq_store::store::SEGMENT_BYTES)), "{conf}");
    assert!(dir.path().join("data.pre-migration").join("conf").exists(), "the old copy is kept");
    assert!(!dir.path().join("data.migrating").exists());
}
