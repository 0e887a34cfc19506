//! Soak: a real pair (replicated durability) holding 1,000 idle client
//! connections while producers and consumers run at a steady rate for
//! `TWINMQ_SOAK_SECS` seconds (default 120). Checks that every idle
//! connection is still held at the end, that every confirmed message was
//! received (lost = 0), and that the active broker's memory stays bounded:
//! its RSS, sampled every second, stays below a stated bound and does not
//! keep growing (the last third's peak is not above the middle third's by
//! more than a margin). The figures are printed; docs/SOAK.md has a run's.
//!
//! ```sh
//! cargo test -p twinmq-broker --test soak -- --nocapture
//! TWINMQ_SOAK_SECS=30 cargo test -p twinmq-broker --test soak -- --nocapture
//! ```

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pair::{Pair, PairOptions};
use common::rss_kib;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use twinmq_client::{Client, Destination, Message, SubscribeOptions};
use twinmq_protocol::{ClientFrame, FrameCodec, ServerFrame, DEFAULT_MAX_FRAME_BYTES};

const IDLE_CONNECTIONS: usize = 1_000;
const QUEUES: usize = 4;
const CONSUMERS_PER_QUEUE: usize = 2;
/// Messages per second per producer (one producer per queue).
const RATE_PER_PRODUCER: u64 = 200;
const PAYLOAD_BYTES: usize = 1024;
/// Idle connections ping this often; the broker closes a connection silent
/// for `IDLE_TIMEOUT_MS`, so a ping that stopped would show as a lost connection.
const PING_EVERY: Duration = Duration::from_secs(3);
const IDLE_TIMEOUT_MS: &str = "10000";
/// The active broker's RSS must stay below this (see docs/SOAK.md for the measured peak).
const RSS_BOUND_MIB: u64 = 256;

type Codec = FrameCodec<ServerFrame, ClientFrame>;

/// One idle client: Hello, then only a Ping every few seconds. Returns
/// whether the connection was still held (answering a Ping) at the end.
async fn idle_client(addr: SocketAddr, i: usize, stop: Arc<AtomicBool>) -> Result<(), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let mut framed = Framed::new(stream, Codec::new(DEFAULT_MAX_FRAME_BYTES));
    framed
        .send(ClientFrame::Hello {
            client_name: format!("idle-{i}"),
            user: None,
            password: None,
            admin: false,
            versions: twinmq_protocol::SUPPORTED_VERSIONS,
            ticket: None,
        })
        .await
        .map_err(|e| format!("hello: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(20), framed.next()).await {
        Ok(Some(Ok(ServerFrame::Welcome { protocol_version, .. }))) => framed.codec_mut().set_version(protocol_version),
        other => return Err(format!("no welcome: {other:?}")),
    }
    // Spread the pings over the interval.
    let offset = PING_EVERY * (i as u32 % 100) / 100;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + offset, PING_EVERY);
    let mut nonce = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            f = framed.next() => match f {
                Some(Ok(ServerFrame::Pong { .. })) => {}
                other => return Err(format!("connection lost: {other:?}")),
            },
            _ = ping.tick() => {
                nonce += 1;
                framed.send(ClientFrame::Ping { nonce }).await.map_err(|e| format!("ping: {e}"))?;
            }
        }
    }
    // Still held: a last ping is answered.
    framed.send(ClientFrame::Ping { nonce: u64::MAX }).await.map_err(|e| format!("last ping: {e}"))?;
    loop {
        match tokio::time::timeout(Duration::from_secs(20), framed.next()).await {
            Ok(Some(Ok(ServerFrame::Pong { nonce: u64::MAX }))) => return Ok(()),
            Ok(Some(Ok(ServerFrame::Pong { .. }))) => {}
            other => return Err(format!("last ping unanswered: {other:?}")),
        }
    }
}

#[derive(Default)]
struct Tally {
    confirmed: HashSet<String>,
    received: HashMap<String, u32>,
    send_errors: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_a_thousand_idle_connections_and_steady_traffic_lose_nothing_and_stay_bounded() {
    let secs: u64 = std::env::var("TWINMQ_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(120).max(10);
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    let nofile = rlimit::increase_nofile_limit(hard).unwrap();
    println!("soak: {secs} s; open files limit of the test process {soft} -> {nofile} (hard {hard})");
    assert!(nofile as usize > IDLE_CONNECTIONS + 200, "the test needs {IDLE_CONNECTIONS}+ descriptors");

    let opts = PairOptions {
        extra: vec!["--idle-timeout-ms".into(), IDLE_TIMEOUT_MS.into(), "--max-connections".into(), "5000".into()],
        ..Default::default()
    };
    let pair = Pair::start(opts).await;
    pair.wait_a_active_b_in_sync().await;
    let (pid_a, pid_b) = (pair.a.pid(), pair.b.pid());
    let addr = pair.a.client;
    let rss_at_start = rss_kib(pid_a);

    // RSS of both nodes, every second, from the start.
    let sampling = Arc::new(AtomicBool::new(true));
    let samples: Arc<Mutex<Vec<(f64, u64, u64)>>> = Arc::default();
    let sampler = {
        let (on, samples) = (sampling.clone(), samples.clone());
        let t0 = Instant::now();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while on.load(Ordering::Relaxed) {
                tick.tick().await;
                samples.lock().unwrap().push((t0.elapsed().as_secs_f64(), rss_kib(pid_a), rss_kib(pid_b)));
            }
        })
    };

    // The idle connections, opened 100 at a time.
    let opened = Instant::now();
    let stop_idle = Arc::new(AtomicBool::new(false));
    let mut idle = Vec::new();
    for i in 0..IDLE_CONNECTIONS {
        idle.push(tokio::spawn(idle_client(addr, i, stop_idle.clone())));
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!("soak: {IDLE_CONNECTIONS} idle connections started in {:?}", opened.elapsed());

    // Producers and consumers.
    let tally: Arc<Mutex<Tally>> = Arc::default();
    let stop_producing = Arc::new(AtomicBool::new(false));
    let stop_consuming = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let config = pair.client_config();
    let mut consumers = Vec::new();
    for q in 0..QUEUES {
        for c in 0..CONSUMERS_PER_QUEUE {
            let client = Client::connect(config.clone().client_name(format!("consumer-{q}-{c}"))).await.unwrap();
            let (tally, stop) = (tally.clone(), stop_consuming.clone());
            consumers.push(tokio::spawn(async move {
                let mut sub = client
                    .subscribe(Destination::queue(format!("soak-{q}")), SubscribeOptions::default().prefetch(100))
                    .await
                    .unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
                        Ok(Some(Ok(d))) => {
                            let id = d.message().headers.get("id").cloned().unwrap_or_default();
                            *tally.lock().unwrap().received.entry(id).or_default() += 1;
                            d.ack().await.unwrap();
                        }
                        Ok(Some(Err(e))) => panic!("consumer {q}/{c} failed: {e}"),
                        Ok(None) => panic!("consumer {q}/{c} ended"),
                        Err(_) => {}
                    }
                }
                client.close().await.ok();
            }));
        }
    }
    let mut producers = Vec::new();
    for q in 0..QUEUES {
        let client = Client::connect(config.clone().client_name(format!("producer-{q}"))).await.unwrap();
        let (tally, stop, sent) = (tally.clone(), stop_producing.clone(), sent.clone());
        producers.push(tokio::spawn(async move {
            let producer = client.producer(Destination::queue(format!("soak-{q}")));
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE_PER_PRODUCER));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut confirms = Vec::new();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                seq += 1;
                let id = format!("{q}-{seq}");
                let m = Message::persistent(vec![b'x'; PAYLOAD_BYTES]).header("id", id.clone());
                let confirm = producer.send_nowait(m).await.unwrap();
                sent.fetch_add(1, Ordering::Relaxed);
                let tally = tally.clone();
                confirms.push(tokio::spawn(async move {
                    let r = confirm.await;
                    let mut t = tally.lock().unwrap();
                    match r {
                        Ok(_) => {
                            t.confirmed.insert(id);
                        }
                        Err(e) => t.send_errors.push(format!("{id}: {e}")),
                    }
                }));
            }
            for c in confirms {
                c.await.unwrap();
            }
            client.close().await.ok();
        }));
    }

    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop_producing.store(true, Ordering::Relaxed);
    for p in producers {
        tokio::time::timeout(Duration::from_secs(60), p).await.expect("producers finish").unwrap();
    }
    // Let the consumers drain what was confirmed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing = {
            let t = tally.lock().unwrap();
            t.confirmed.iter().filter(|id| !t.received.contains_key(*id)).count()
        };
        if missing == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_consuming.store(true, Ordering::Relaxed);
    for c in consumers {
        c.await.unwrap();
    }
    let status = pair.a.status().await.unwrap_or_default();
    stop_idle.store(true, Ordering::Relaxed);
    let mut held = 0;
    let mut failures = Vec::new();
    for h in idle {
        match h.await.unwrap() {
            Ok(()) => held += 1,
            Err(e) => failures.push(e),
        }
    }
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();

    let t = tally.lock().unwrap();
    let lost: Vec<&String> = t.confirmed.iter().filter(|id| !t.received.contains_key(*id)).collect();
    let duplicates: u32 = t.received.values().map(|n| n - 1).sum();
    let unknown = t.received.keys().filter(|id| !t.confirmed.contains(*id)).count();
    let samples = samples.lock().unwrap();
    let mib = |k: u64| k / 1024;
    let peak_a = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let peak_b = samples.iter().map(|s| s.2).max().unwrap_or(0);
    let n = samples.len();
    let third = |k: usize| samples[n * k / 3..n * (k + 1) / 3].iter().map(|s| s.1).max().unwrap_or(0);
    let (first, middle, last) = (third(0), third(1), third(2));
    println!(
        "soak: idle connections held at the end: {held} of {IDLE_CONNECTIONS}; broker status connections = {}",
        status["connections"]
    );
    println!(
        "soak: messages sent {}, confirmed {}, received {} distinct ({} duplicates), lost {}, received but never confirmed {}, send errors {}",
        sent.load(Ordering::Relaxed),
        t.confirmed.len(),
        t.received.len(),
        duplicates,
        lost.len(),
        unknown,
        t.send_errors.len()
    );
    println!(
        "soak: active RSS start {} MiB, peak {} MiB, end {} MiB; max per third {} / {} / {} MiB; passive peak {} MiB; {} samples",
        mib(rss_at_start),
        mib(peak_a),
        mib(samples.last().map_or(0, |s| s.1)),
        mib(first),
        mib(middle),
        mib(last),
        mib(peak_b),
        n
    );

    assert!(failures.is_empty(), "{} idle connections lost, e.g. {:?}", failures.len(), failures.first());
    assert_eq!(held, IDLE_CONNECTIONS);
    assert!(t.send_errors.is_empty(), "send errors: {:?}", &t.send_errors[..t.send_errors.len().min(5)]);
    assert!(lost.is_empty(), "{} confirmed messages never received, e.g. {:?}", lost.len(), lost.first());
    assert!(t.confirmed.len() as u64 >= secs * RATE_PER_PRODUCER * QUEUES as u64 / 2, "the producers ran");
    assert!(mib(peak_a) < RSS_BOUND_MIB, "active RSS peak {} MiB above {RSS_BOUND_MIB} MiB", mib(peak_a));
    let margin = (middle / 10).max(32 * 1024);
    assert!(
        last <= middle + margin,
        "RSS still growing: last third peak {} MiB above the middle third's {} MiB by more than {} MiB",
        mib(last),
        mib(middle),
        mib(margin)
    );
}
