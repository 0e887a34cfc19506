//! The status JSON carries the store's history (`[epoch, first op, forced]`
//! per promotion), on the active and the passive alike: what the cable
//! lab's checker reads to tell whether a node held every confirmed message
//! when it started serving.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::pair::{Pair, PairOptions};
use twinmq_client::{Client, Destination, Message};

const WAIT: Duration = Duration::from_secs(15);

fn history(s: &serde_json::Value) -> Vec<(u64, u64, bool)> {
    serde_json::from_value(s["history"].clone()).unwrap_or_else(|e| panic!("no history in the status ({e}): {s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_history_a_promotion_extends_and_a_follower_copies() {
    let mut pair = Pair::start(PairOptions::default()).await;
    pair.wait_a_active_b_in_sync().await;
    let client = Client::connect(pair.client_config()).await.unwrap();
    let producer = client.producer(Destination::queue("h"));
    for i in 0..50 {
        producer.send(Message::persistent(format!("h-{i}"))).await.unwrap();
    }
    drop(client);
    let a = pair.a.status().await.unwrap();
    let before = history(&a);
    let (epoch, _, forced) = *before.last().expect("a promoted once: its history has an entry");
    assert_eq!(a["epoch"].as_u64(), Some(epoch), "the active serves in its history's last epoch: {a}");
    assert!(!forced, "no operator forced it: {a}");
    let b = pair.b.wait_for("b caught up", WAIT, |s| s["last_op"] == a["last_op"]).await;
    assert_eq!(history(&b), before, "the follower holds the active's history: {b}");

    pair.a.kill9();
    let b = pair.b.wait_for("active", WAIT, |s| s["role"].as_str().is_some_and(|r| r.starts_with("active"))).await;
    let after = history(&b);
    assert_eq!(after[..after.len() - 1], before[..], "the promotion keeps what was there: {b}");
    let (e, start, forced) = *after.last().unwrap();
    assert_eq!(Some(e), b["epoch"].as_u64(), "{b}");
    assert!(e > epoch && !forced, "a new, unforced epoch: {b}");
    assert!(start > a["last_op"].as_u64().unwrap(), "it starts after every op the old active wrote: {b}");
}
