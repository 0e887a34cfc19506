//! Backlogs deeper than the memory kept for bodies (issue 11): with a body
//! budget of 256 KiB and a sled cache of 1 MiB, a queue of 4,000 messages
//! of 1 KiB (four times the budget and cache together) is delivered whole,
//! once and in order, after a `kill -9` and restart of a single node and
//! after a `kill -9` of the active of a pair (the passive's index, kept as
//! records arrived, is what it serves from).

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::pair::{Pair, PairOptions};
use common::Broker;
use twinmq_client::{Client, ClientConfig, Destination, Message, SubscribeOptions};

const N: usize = 4_000;
const SMALL_MEMORY: [&str; 4] = ["--body-cache-bytes", "262144", "--cache-bytes", "1048576"];

fn body(i: usize) -> String {
    format!("{i:06}-{}", "x".repeat(1017))
}

async fn fill(config: ClientConfig, queue: &str) {
    let client = Client::connect(config).await.unwrap();
    let producer = client.producer(Destination::queue(queue));
    let mut pending = std::collections::VecDeque::new();
    for i in 0..N {
        pending.push_back(producer.send_nowait(Message::persistent(body(i))).await.unwrap());
        while pending.len() > 128 {
            pending.pop_front().unwrap().await.unwrap();
        }
    }
    for c in pending {
        c.await.unwrap();
    }
}

/// Consume and ack everything; the bodies in delivery order.
async fn drain_in_order(config: ClientConfig, queue: &str) -> Vec<String> {
    let client = Client::connect(config).await.unwrap();
    let mut c = client.subscribe(Destination::queue(queue), SubscribeOptions::default().prefetch(256)).await.unwrap();
    let mut got = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(3), c.recv()).await {
        got.push(String::from_utf8_lossy(d.payload()).into_owned());
        d.ack().await.unwrap();
    }
    got
}

fn assert_whole_and_in_order(got: &[String], what: &str) {
    assert_eq!(got.len(), N, "{what}: every message once");
    for (i, b) in got.iter().enumerate() {
        assert!(*b == body(i), "{what}: message {i} out of order or altered: {}", &b[..12.min(b.len())]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_deeper_than_memory_is_delivered_whole_and_in_order_after_a_restart() {
    let mut args = vec!["--durability", "local", "--auto-create", "true"];
    args.extend(SMALL_MEMORY);
    let mut b = Broker::start(&args);
    fill(b.config(), "deep").await;
    b.kill9();
    b.restart();
    let got = drain_in_order(b.config(), "deep").await;
    assert_whole_and_in_order(&got, "after kill -9 and restart");
    assert!(b.log().contains("live state recovered"), "{}", b.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_deeper_than_memory_is_delivered_whole_and_in_order_after_a_failover() {
    let extra: Vec<String> = SMALL_MEMORY.iter().map(|s| s.to_string()).collect();
    let mut pair = Pair::start(PairOptions { extra, ..Default::default() }).await;
    pair.wait_a_active_b_in_sync().await;
    fill(pair.client_config(), "deep").await;
    pair.a.kill9();
    pair.b
        .wait_for("active", Duration::from_secs(15), |s| s["role"].as_str().is_some_and(|r| r.starts_with("active")))
        .await;
    assert!(
        pair.b.log().contains("live state taken from the index kept while passive"),
        "the promotion read no records:\n{}",
        pair.b.log()
    );
    let got = drain_in_order(pair.client_config(), "deep").await;
    assert_whole_and_in_order(&got, "after kill -9 of the active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_limit_refuses_new_messages_clearly_and_loses_none_it_confirmed() {
    let b = Broker::start(&["--durability", "local", "--auto-create", "true", "--max-disk-bytes", "8000000"]);
    let client = b.client().await;
    let producer = client.producer(Destination::queue("disk"));
    let mut confirmed = Vec::new();
    let refusal = loop {
        assert!(confirmed.len() < 100_000, "the disk limit never refused anything");
        let i = confirmed.len();
        match producer.send(Message::persistent(body(i))).await {
            Ok(_) => confirmed.push(body(i)),
            Err(e) => break e,
        }
    };
    assert_eq!(refusal.code(), Some(twinmq_client::ErrorCode::LimitReached), "{refusal}");
    assert!(refusal.to_string().contains("max_disk_bytes"), "the refusal names the limit: {refusal}");
    let status: serde_json::Value = serde_json::from_str(client.status().await.unwrap().json()).unwrap();
    assert_eq!(status["store"]["disk_full"], true, "{status}");
    assert!(status["store"]["disk_bytes"].as_u64().unwrap() >= 8_000_000, "{status}");
    // Everything confirmed before the limit is there, in order.
    let got = drain_in_order(b.config(), "disk").await;
    assert_eq!(got, confirmed, "every confirmed message, once, in order");
}

const EAGER_COMPACTION: [&str; 6] =
    ["--compaction-bytes-per-sec", "33554432", "--compaction-min-bytes", "0", "--compaction-min-age-ms", "0"];

/// 3,000 messages to a busy queue consumed as they come, 300 to a slow one
/// sent among them and never consumed; then wait until every ack is stored
/// and the records take at most 2x what their live messages weigh.
/// Returns the store's status then.
async fn slow_beside_busy<F, Fut>(config: ClientConfig, status: F) -> serde_json::Value
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = serde_json::Value>,
{
    let client = Client::connect(config).await.unwrap();
    // A consumer keeps the busy queue empty; nobody consumes the slow one.
    let mut busy =
        client.subscribe(Destination::queue("busy"), SubscribeOptions::default().prefetch(256)).await.unwrap();
    let consumed = tokio::spawn(async move {
        let mut n = 0;
        while n < 3_000 {
            let d = busy.recv().await.unwrap().unwrap();
            d.ack().await.unwrap();
            n += 1;
        }
    });
    let (to_busy, to_slow) = (client.producer(Destination::queue("busy")), client.producer(Destination::queue("slow")));
    let mut pending = std::collections::VecDeque::new();
    for i in 0..3_300 {
        let send = if i % 11 == 5 { &to_slow } else { &to_busy };
        pending.push_back(send.send_nowait(Message::persistent(body(i / 11))).await.unwrap());
        while pending.len() > 64 {
            pending.pop_front().unwrap().await.unwrap();
        }
    }
    for c in pending {
        c.await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(30), consumed).await.unwrap().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let store = status().await["store"].clone();
        let (records, live) = (store["live_bytes"].as_u64().unwrap(), store["live_message_bytes"].as_u64().unwrap());
        // Every ack is stored (only the 300 slow messages are live, 1 KiB
        // + "queue:slow" + 128 each: an ack is answered before it is
        // stored), and the records take at most 2x what they hold: the
        // compactor rewrites a record once less than half of it is live,
        // so a record 55% live stays as it is. (Where the slow messages
        // fall among the records depends on the group commits: 1.27x to
        // 1.50x here on 2 cores, 1.53x once in CI; 3.6x before compaction.)
        if live == 300 * (1024 + 10 + 128) && records <= live * 2 {
            assert!(store["compacted_records"].as_u64().unwrap() > 0, "{store}");
            return store;
        }
        assert!(std::time::Instant::now() < deadline, "records still take {records} bytes for {live}: {store}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compactor_frees_records_pinned_by_a_slow_queue_while_a_busy_one_runs() {
    let mut args = vec!["--durability", "local", "--auto-create", "true"];
    args.extend(EAGER_COMPACTION);
    let mut b = Broker::start(&args);
    let client = b.client().await;
    let status = || async { serde_json::from_str(client.status().await.unwrap().json()).unwrap() };
    slow_beside_busy(b.config(), status).await;
    drop(client);
    // What was rewritten reads back after a kill -9: the slow queue whole, in order.
    b.kill9();
    b.restart();
    let got = drain_in_order(b.config(), "slow").await;
    assert_eq!(got, (0..300).map(body).collect::<Vec<_>>(), "every slow message once, in order");
    assert!(drain_in_order(b.config(), "busy").await.is_empty(), "a consumed message came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_pair_both_nodes_compact_and_the_passive_serves_the_slow_queue_after_a_kill() {
    let extra: Vec<String> = EAGER_COMPACTION.iter().map(|s| s.to_string()).collect();
    let mut pair = Pair::start(PairOptions { extra, ..Default::default() }).await;
    pair.wait_a_active_b_in_sync().await;
    let a_status = || async { pair.a.status().await.unwrap() };
    slow_beside_busy(pair.client_config(), a_status).await;
    // The passive compacts its own copy.
    pair.b
        .wait_for("b compacted", Duration::from_secs(20), |s| s["store"]["compacted_records"].as_u64() > Some(0))
        .await;
    pair.a.kill9();
    pair.b
        .wait_for("active", Duration::from_secs(15), |s| s["role"].as_str().is_some_and(|r| r.starts_with("active")))
        .await;
    let got = drain_in_order(pair.client_config(), "slow").await;
    assert_eq!(got, (0..300).map(body).collect::<Vec<_>>(), "every slow message once, in order");
}
