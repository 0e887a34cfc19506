//! Crash safety: `kill -9` at random moments during confirmed sends never
//! loses a confirmed message (`durability = local`).

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Broker;
use rand::Rng;
use twinmq_client::{Destination, Message, SubscribeOptions};

const ROUNDS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_sends_never_loses_a_confirmed_message() {
    let mut broker = Broker::start(&["--durability", "local"]);
    let q = Destination::queue("crash");
    let mut rng = rand::thread_rng();
    let mut total_confirmed = 0;
    let mut total_unconfirmed_stored = 0;
    for round in 0..ROUNDS {
        let confirmed: Arc<Mutex<HashSet<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let client = broker.client().await;
        let producer = client.producer(q.clone());
        let (record, stopping) = (confirmed.clone(), stop.clone());
        let sender = tokio::spawn(async move {
            let mut pending = std::collections::VecDeque::new();
            let mut i = 0;
            while !stopping.load(Ordering::Relaxed) {
                let body = format!("r{round}-{i}");
                i += 1;
                match producer.send_nowait(Message::persistent(body.clone())).await {
                    Ok(c) => pending.push_back((body, c)),
                    Err(_) => break,
                }
                // Record confirms as they come, in order.
                while pending.len() > 64 {
                    let (body, c) = pending.pop_front().expect("non-empty");
                    if c.await.is_err() {
                        return;
                    }
                    record.lock().expect("lock").insert(body);
                }
            }
            // The client resends what the killed broker never confirmed.
            for (body, c) in pending {
                if c.await.is_ok() {
                    record.lock().expect("lock").insert(body);
                }
            }
        });
        let delay = rng.gen_range(30..400);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        broker.kill9();
        broker.restart();
        stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(60), sender).await.expect("sender finishes").unwrap();
        client.close().await.unwrap();

        let confirmed = confirmed.lock().expect("lock").clone();
        let client = broker.client().await;
        let mut consumer = client.subscribe(q.clone(), SubscribeOptions::default().prefetch(512)).await.unwrap();
        let mut received = HashSet::new();
        while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(700), consumer.recv()).await {
            let body = String::from_utf8_lossy(d.payload()).into_owned();
            assert!(
                body.starts_with(&format!("r{round}-")),
                "message {body} from an earlier round came back after its ack"
            );
            received.insert(body);
            d.ack().await.unwrap();
        }
        let lost: Vec<&String> = confirmed.difference(&received).collect();
        assert!(
            lost.is_empty(),
            "round {round} (kill after {delay} ms): {} confirmed messages lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        total_confirmed += confirmed.len();
        total_unconfirmed_stored += received.len().saturating_sub(confirmed.len());
        consumer.unsubscribe().await.unwrap();
        client.close().await.unwrap();
    }
    eprintln!("{ROUNDS} kills: {total_confirmed} confirmed messages, none lost; {total_unconfirmed_stored} stored but never confirmed (none expected: the client resends)");
    assert!(total_confirmed > 1000, "the sender made progress between kills ({total_confirmed})");
}
