//! The compactor (DESIGN.md section 5, "Compaction") on real sled files: a
//! slow queue next to a busy one no longer pins the busy one's records, and
//! what it rewrote reads back the same after a restart.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::time::Duration;

use twinmq_store::compactor::CompactionConfig;
use twinmq_store::*;

fn msg(producer_seq: u64, body: String) -> StoredMessage {
    StoredMessage {
        epoch: 0,
        seq: 0,
        origin: "queue:q".into(),
        producer_id: 9,
        producer_seq,
        headers: Default::default(),
        payload: body.into_bytes(),
        timestamp_ms: 1,
        expires_at_ms: None,
    }
}

fn submit(w: &Writer, ops: Vec<Op>) -> Committed {
    let (tx, rx) = mpsc::channel();
    w.submit(ops, Box::new(move |r| tx.send(r).expect("test waits")));
    rx.recv_timeout(Duration::from_secs(10)).expect("writer answers").expect("commit succeeds")
}

fn open(dir: &std::path::Path) -> (Store, Recovered) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match Store::open(&StoreConfig::new(dir)) {
            Err(StoreError::Open { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => return other.unwrap(),
        }
    }
}

/// Compaction at once and fast: every record qualifies by age and size.
pub fn eager() -> CompactionConfig {
    CompactionConfig { bytes_per_sec: 256 << 20, min_bytes: 0, min_age: Duration::ZERO }
}

/// A body of about 1 KiB that says which message it is.
fn body(queue: &str, i: u64) -> String {
    format!("{queue}-{i}-{}", "x".repeat(1000))
}

/// `rounds` x 20 group commits of 10 messages to `busy` and 1 to `slow`,
/// each round's busy messages acked at its end (the busy queue runs, the
/// slow one is never consumed). Returns the slow messages' sequences.
fn traffic(w: &Writer, rounds: u64, producer_seq: &mut u64) -> Vec<u64> {
    let mut slow = Vec::new();
    for _ in 0..rounds {
        let mut busy = Vec::new();
        for _ in 0..20 {
            let mut ops = Vec::new();
            for i in 0..11 {
                *producer_seq += 1;
                let q = if i == 5 { "slow" } else { "busy" };
                ops.push(Op::Enqueue { message: msg(*producer_seq, body(q, *producer_seq)), queues: vec![q.into()] });
            }
            let c = submit(w, ops);
            for (i, op) in c.ops.iter().enumerate() {
                let seq = c.first_seq + i as u64;
                match op {
                    Op::Enqueue { queues, .. } if queues[0] == "slow" => slow.push(seq),
                    _ => busy.push(seq),
                }
            }
        }
        submit(w, busy.iter().map(|s| Op::Ack { queue: "busy".into(), seq: *s }).collect());
    }
    slow
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn payloads(store: &Store, rec: &Recovered, queue: &str) -> Vec<String> {
    rec.messages.get(queue).map_or(Vec::new(), |ms| {
        ms.iter()
            .map(|m| {
                String::from_utf8(store.read_message(m.seq).unwrap().expect("a live message reads").payload.clone())
                    .unwrap()
            })
            .collect()
    })
}

#[test]
fn the_compactor_frees_records_pinned_by_a_slow_queue_while_another_queue_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut rec) = open(dir.path());
    let cfg = WriterConfig { compaction: eager(), ..WriterConfig::default() };
    let (w, h) = Writer::start(store.clone(), &mut rec, cfg).unwrap();
    for q in ["busy", "slow"] {
        submit(&w, vec![Op::PutQueue { key: q.into(), spec: QueueSpec { kind: QueueKind::Queue } }]);
    }
    let mut producer_seq = 0;
    let mut slow = Vec::new();
    // The busy queue keeps running while the compactor works behind it.
    for _ in 0..5 {
        slow.extend(traffic(&w, 2, &mut producer_seq));
    }
    let stats = w.stats_handle();
    let ratio = || stats.live_bytes.load(Relaxed) as f64 / stats.live_weight.load(Relaxed) as f64;
    // Without compaction each record is ~11 KiB for one live 1 KiB message.
    wait_until("the records take at most 1.5x the live messages", || ratio() <= 1.5);
    assert!(stats.compacted_records.load(Relaxed) >= 100, "{}", stats.compacted_records.load(Relaxed));
    assert!(stats.compacted_bytes.load(Relaxed) > 1 << 20);
    // Deliveries read the slow messages from the rewritten records.
    for s in &slow {
        let m = w.read_message(*s).unwrap().expect("a slow message is still there");
        assert!(String::from_utf8_lossy(&m.payload).starts_with("slow-"));
    }
    drop(w);
    h.join().unwrap();
    store.close().unwrap();

    let want: Vec<String> = {
        let mut n = 0;
        let mut out = Vec::new();
        for _ in 0..10 * 20 {
            for i in 0..11 {
                n += 1;
                if i == 5 {
                    out.push(body("slow", n));
                }
            }
        }
        out
    };
    // From the index checkpoint written at the stop, then from the whole log.
    for from_checkpoint in [true, false] {
        if !from_checkpoint {
            std::fs::remove_file(dir.path().join("index.ckpt")).unwrap();
        }
        let (store, rec) = open(dir.path());
        assert_eq!(payloads(&store, &rec, "slow"), want, "from checkpoint: {from_checkpoint}");
        assert!(rec.messages.get("busy").is_none_or(Vec::is_empty), "an acked message came back");
        assert_eq!(rec.messages["slow"].iter().map(|m| m.seq).collect::<Vec<_>>(), slow);
        store.close().unwrap();
    }
}

#[test]
fn a_message_live_in_two_queues_keeps_the_one_it_is_still_in() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut rec) = open(dir.path());
    let cfg = WriterConfig { compaction: eager(), ..WriterConfig::default() };
    let (w, h) = Writer::start(store.clone(), &mut rec, cfg).unwrap();
    for q in ["a", "b"] {
        submit(&w, vec![Op::PutQueue { key: q.into(), spec: QueueSpec { kind: QueueKind::Queue } }]);
    }
    // Messages in both queues, acked in `a` only, with dead ones around them.
    let mut both = Vec::new();
    let mut gone = Vec::new();
    for i in 0..40u64 {
        let ops = (0..10)
            .map(|j| {
                let queues = if j == 0 { vec!["a".into(), "b".into()] } else { vec!["a".into()] };
                Op::Enqueue { message: msg(i * 10 + j + 1, body("m", i * 10 + j)), queues }
            })
            .collect();
        let c = submit(&w, ops);
        both.push(c.first_seq);
        gone.extend(c.first_seq..c.first_seq + 10);
    }
    submit(&w, gone.iter().map(|s| Op::Ack { queue: "a".into(), seq: *s }).collect());
    let stats = w.stats_handle();
    // It compacts until the records take at most 1.5x what their live messages weigh.
    wait_until("the records take at most 1.5x the live messages", || {
        stats.live_bytes.load(Relaxed) * 2 <= stats.live_weight.load(Relaxed) * 3
    });
    assert!(stats.compacted_records.load(Relaxed) >= 30, "{}", stats.compacted_records.load(Relaxed));
    drop(w);
    h.join().unwrap();
    store.close().unwrap();
    std::fs::remove_file(dir.path().join("index.ckpt")).unwrap();
    let (store, rec) = open(dir.path());
    assert_eq!(rec.messages["b"].iter().map(|m| m.seq).collect::<Vec<_>>(), both);
    assert!(rec.messages.get("a").is_none_or(Vec::is_empty), "a message acked in a came back there");
    let want: Vec<String> = (0..40).map(|i| body("m", i * 10)).collect();
    assert_eq!(payloads(&store, &rec, "b"), want);
}
