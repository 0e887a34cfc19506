//! A failing disk under a real pair: two daemon processes on loopback, each
//! data directory on a faultfs mount served by this test (root and
//! /dev/fuse, else every test prints `SKIPPED: <why>` and passes). I/O
//! errors, a full disk and a stalled fsync, on the active and on the passive,
//! under a stream of confirmed publishes. What must hold (issue 9):
//! - confirms resume on the healthy node within takeover_delay + 1 s of the
//!   disk being found failed (at once for an error, after disk_stall_ms for
//!   a stall), never a silent hang; the failed node says why in its status;
//! - the application sees no error: what the failed node refused (written or
//!   not) the client resends to the peer;
//! - once the disk is repaired and the node restarted it resyncs, and every
//!   confirmed message is delivered.
//!
//! The cases run one at a time (about 15 s each): the gaps they measure
//! would grow with a second pair competing for the 2 cores.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use twinmq_client::{Client, Destination, Message, SubscribeOptions};
use twinmq_examples::faultfs::{self, Fault, FaultMount, MountOptions};
use twinmq_examples::lab::{Node, Pair, Timings};

const DEMO: &str = env!("CARGO_BIN_EXE_demo");
const WAIT: Duration = Duration::from_secs(20);
const DISK_STALL_MS: u64 = 1000;

/// One pair at a time (see the module documentation).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn skip() -> bool {
    match faultfs::preflight() {
        Ok(()) => false,
        Err(e) => {
            println!("SKIPPED: {e}");
            true
        }
    }
}

/// A pair whose data directories are faultfs mounts (`mounts[0]` is a's).
/// Declared after the pair: the mounts go once both processes are killed.
struct FaultyPair {
    pair: Pair,
    mounts: [FaultMount; 2],
}

impl FaultyPair {
    fn start() -> FaultyPair {
        let stall = DISK_STALL_MS.to_string();
        let extra = ["--durability", "replicated", "--disk-stall-ms", &stall];
        let mut pair = Pair::new(Timings::DEFAULT, &extra).unwrap();
        let root = pair.dir.path().to_path_buf();
        let mount = |node: &mut Node, name: &str| {
            let (backing, mnt) = (root.join(format!("{name}-backing")), root.join(format!("{name}-data")));
            std::fs::create_dir_all(&backing).unwrap();
            std::fs::create_dir_all(&mnt).unwrap();
            node.data_dir = mnt.clone();
            node.exe = DEMO.into();
            faultfs::mount(&MountOptions::new(backing, mnt)).unwrap()
        };
        let mounts = [mount(&mut pair.a, "a"), mount(&mut pair.b, "b")];
        pair.a.start().unwrap();
        pair.b.start().unwrap();
        FaultyPair { pair, mounts }
    }

    fn node(&mut self, i: usize) -> &mut Node {
        if i == 0 {
            &mut self.pair.a
        } else {
            &mut self.pair.b
        }
    }
}

impl Drop for FaultyPair {
    fn drop(&mut self) {
        // The processes first: a mount in use by a stalled fsync must not hang the unmount.
        for m in &self.mounts {
            let _ = m.set(Fault::Ok);
        }
        self.pair.a.kill9();
        self.pair.b.kill9();
    }
}

/// A producer sending numbered messages with up to 16 in flight, recording
/// when each confirm arrived and every error the application saw.
/// When each confirm arrived, and its body.
type Confirms = Arc<Mutex<Vec<(Instant, String)>>>;

struct Load {
    confirms: Confirms,
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    async fn start(pair: &Pair, queue: &str) -> Load {
        let client = Client::connect(pair.client_config()).await.unwrap();
        let producer = client.producer(Destination::queue(queue));
        let (confirms, errors): (Confirms, Arc<Mutex<Vec<String>>>) = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, e, s) = (confirms.clone(), errors.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut pending = std::collections::VecDeque::new();
            let mut i = 0u64;
            let settle = |body: String, r: Result<twinmq_client::Confirmed, twinmq_client::ClientError>| match r {
                Ok(_) => c.lock().unwrap().push((Instant::now(), body)),
                Err(err) => e.lock().unwrap().push(format!("{body}: {err}")),
            };
            while !s.load(Ordering::Relaxed) {
                let body = format!("m{i}");
                i += 1;
                match producer.send_nowait(Message::persistent(body.clone())).await {
                    Ok(confirm) => pending.push_back((body, confirm)),
                    Err(err) => settle(body, Err(err)),
                }
                while pending.len() >= 16 {
                    let (body, confirm) = pending.pop_front().unwrap();
                    settle(body, confirm.await);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            for (body, confirm) in pending {
                settle(body, confirm.await);
            }
            drop(client);
        });
        Load { confirms, errors, stop, task }
    }

    fn confirmed(&self) -> usize {
        self.confirms.lock().unwrap().len()
    }

    /// Stop sending; the confirmed bodies, the longest time without a
    /// confirm from `since` on, and the errors.
    async fn finish(self, since: Instant) -> (HashSet<String>, Duration, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(60), self.task).await.expect("the load finishes").unwrap();
        let confirms = self.confirms.lock().unwrap().clone();
        let mut last = since;
        let mut gap = Duration::ZERO;
        for (t, _) in confirms.iter().filter(|(t, _)| *t >= since) {
            gap = gap.max(t.duration_since(last));
            last = *t;
        }
        let bodies = confirms.into_iter().map(|(_, b)| b).collect();
        (bodies, gap, self.errors.lock().unwrap().clone())
    }
}

async fn consume_all(pair: &Pair, queue: &str) -> HashSet<String> {
    let client = Client::connect(pair.client_config()).await.unwrap();
    let mut c = client.subscribe(Destination::queue(queue), SubscribeOptions::default().prefetch(512)).await.unwrap();
    let mut got = HashSet::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(1500), c.recv()).await {
        got.insert(String::from_utf8_lossy(d.payload()).into_owned());
        d.ack().await.unwrap();
    }
    got
}

fn is_active(s: &serde_json::Value) -> bool {
    s["role"].as_str().is_some_and(|r| r.starts_with("active"))
}

async fn status_of(node: &Node) -> serde_json::Value {
    node.status().await.unwrap_or(serde_json::Value::Null)
}

fn logs(dir: &Path) -> String {
    let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).collect();
    names.sort();
    names
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            format!("--- {}\n{}", p.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The disk of node `victim` (0: a, the active; 1: b, the passive) gets
/// `fault` under load. Confirms must resume within `bound` of the fault;
/// then the disk is repaired, the node restarted, and nothing confirmed is
/// missing.
async fn disk_fault(victim: usize, fault: Fault, bound: Duration) {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut fp = FaultyPair::start();
    let (healthy, failing) = (1 - victim, victim);
    fp.pair.a.wait_active(WAIT).await.unwrap();
    fp.pair.b.wait_in_sync_passive(WAIT).await.unwrap();

    let load = Load::start(&fp.pair, "orders").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(load.confirmed() > 0, "the load confirms before the fault");
    fp.mounts[failing].set(fault).unwrap();
    let at = Instant::now();

    // The failing node says so; the healthy one serves (it already did if
    // the passive failed).
    let failed = fp.node(failing).wait_for(WAIT, |s| !s["store"]["disk_failure"].is_null()).await;
    let found_after = at.elapsed();
    if let Err(e) = failed {
        panic!("{fault}: the failing node never reported it: {e}\n{}", logs(fp.pair.dir.path()));
    }
    fp.node(healthy).wait_active(WAIT).await.unwrap();
    let failing_status = status_of(fp.node(failing)).await;
    assert!(!is_active(&failing_status), "{fault}: the node whose disk failed still serves: {failing_status}");
    // A passive moves to `waiting` at its next role decision (one heartbeat
    // after its store failed): wait for it rather than race it (CI saw it
    // still `passive` with `disk_failure` already set).
    if let Err(e) = fp.node(failing).wait_for(WAIT, |s| s["role"] == "waiting").await {
        panic!("{fault}: the node whose disk failed never said `waiting`: {e}\n{}", status_of(fp.node(failing)).await);
    }
    // Some confirms on the healthy node, then stop.
    let before = load.confirmed();
    let deadline = Instant::now() + WAIT;
    while load.confirmed() < before + 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (confirmed, gap, errors) = load.finish(at).await;
    println!(
        "{fault} on {}: found failed after {found_after:?}; longest wait for a confirm from the fault on {gap:?} \
         (bound {bound:?}); {} confirmed; application errors: {errors:?}",
        ["a (active)", "b (passive)"][victim],
        confirmed.len()
    );
    assert!(gap <= bound, "{fault}: no confirm for {gap:?} (bound {bound:?})\n{}", logs(fp.pair.dir.path()));
    // With an in-sync peer to take over, the client resends what the failed
    // node refused there: the application sees no error at all.
    assert!(errors.is_empty(), "{fault}: the application saw errors: {errors:?}");

    // Repair: the disk works again, the node restarts on it and resyncs.
    fp.mounts[failing].set(Fault::Ok).unwrap();
    fp.node(failing).kill9();
    fp.node(failing).start().unwrap();
    fp.node(failing).wait_in_sync_passive(WAIT).await.unwrap();
    let received = consume_all(&fp.pair, "orders").await;
    let lost: Vec<&String> = confirmed.difference(&received).collect();
    assert!(
        lost.is_empty(),
        "{fault}: {} confirmed messages lost, e.g. {:?}\n{}",
        lost.len(),
        &lost[..lost.len().min(5)],
        logs(fp.pair.dir.path())
    );
}

/// Errors are found at the next write: a takeover's worth plus a second.
fn error_bound() -> Duration {
    Duration::from_millis(Timings::DEFAULT.takeover_delay + 1000)
}

/// A stall is found after disk_stall_ms.
fn stall_bound() -> Duration {
    Duration::from_millis(DISK_STALL_MS + Timings::DEFAULT.takeover_delay + 1000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_io_error_on_the_active_hands_the_role_to_the_passive() {
    if skip() {
        return;
    }
    disk_fault(0, Fault::Eio, error_bound()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_on_the_active_hands_the_role_to_the_passive() {
    if skip() {
        return;
    }
    disk_fault(0, Fault::Enospc, error_bound()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_fsync_on_the_active_hands_the_role_to_the_passive() {
    if skip() {
        return;
    }
    disk_fault(0, Fault::Stall { ms: 6000, writes: false }, stall_bound()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_io_error_on_the_passive_stops_the_active_waiting_for_it() {
    if skip() {
        return;
    }
    disk_fault(1, Fault::Eio, error_bound()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_fsync_on_the_passive_stops_the_active_waiting_for_it() {
    if skip() {
        return;
    }
    disk_fault(1, Fault::Stall { ms: 6000, writes: false }, stall_bound()).await;
}

/// A node's file system drops under `min_free_disk_bytes` (256 MiB by
/// default) while every write still succeeds: the disk has not failed, and
/// no role moves. The limit is the pair's (the passive writes every record
/// too): the active refuses new messages with a clear `LimitReached` naming
/// it, whichever node's disk it is, and accepts them again once there is
/// room; nothing confirmed is lost.
async fn nearly_full(victim: usize) {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut fp = FaultyPair::start();
    fp.pair.a.wait_active(WAIT).await.unwrap();
    fp.pair.b.wait_in_sync_passive(WAIT).await.unwrap();
    let load = Load::start(&fp.pair, "orders").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(load.confirmed() > 0, "the load confirms before the fault");

    // 64 MiB of room left: every write of this test still fits.
    let name = ["a", "b"][victim];
    let used = twinmq_examples::netlab::nemesis::dir_size(&fp.pair.dir.path().join(format!("{name}-backing")));
    fp.mounts[victim].set(Fault::Full { bytes: used + (64 << 20) }).unwrap();
    let refusing = fp.pair.a.wait_for(WAIT, |s| s["store"]["refusing_new_messages"] == true).await;
    if let Err(e) = refusing {
        panic!("{name}'s disk nearly full: the active never refused: {e}\n{}", logs(fp.pair.dir.path()));
    }
    let victim_status = status_of(fp.node(victim)).await;
    assert_eq!(victim_status["store"]["disk_full"], true, "{victim_status}");
    assert!(victim_status["store"]["disk_failure"].is_null(), "nothing failed: {victim_status}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!load.errors.lock().unwrap().is_empty(), "publishes are refused while the disk is nearly full");
    assert!(is_active(&status_of(&fp.pair.a).await), "a nearly full disk moves no role");
    assert_eq!(status_of(&fp.pair.b).await["role"], "passive", "b stays the in-sync passive");

    // Room again: accepted again.
    fp.mounts[victim].set(Fault::Ok).unwrap();
    fp.pair.a.wait_for(WAIT, |s| s["store"]["refusing_new_messages"] == false).await.unwrap();
    let before = load.confirmed();
    let deadline = Instant::now() + WAIT;
    while load.confirmed() < before + 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(load.confirmed() >= before + 200, "confirms resume once there is room");
    let (confirmed, _, errors) = load.finish(Instant::now()).await;
    println!("{name}'s disk nearly full: {} refused, {} confirmed", errors.len(), confirmed.len());
    let unclear: Vec<&String> =
        errors.iter().filter(|e| !(e.contains("LimitReached") && e.contains("min_free_disk_bytes"))).collect();
    assert!(unclear.is_empty(), "every refusal names the limit: {unclear:?}");
    let received = consume_all(&fp.pair, "orders").await;
    let lost: Vec<&String> = confirmed.difference(&received).collect();
    assert!(lost.is_empty(), "{} confirmed messages lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_disk_on_the_active_refuses_new_messages_clearly_and_moves_no_role() {
    if skip() {
        return;
    }
    nearly_full(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_disk_on_the_passive_refuses_new_messages_too() {
    if skip() {
        return;
    }
    nearly_full(1).await;
}
