//! The pair demo: two twinmq brokers on loopback watching each other and a
//! (pretend) gateway, a producer and a consumer running through a `kill -9`
//! of the active broker, its return as the passive, and an operator
//! switchover back. One line per event; at the end, what was confirmed,
//! what was received, and how many confirmed messages were lost (0).
//!
//! `cargo run --release` runs it; `--help` lists flags.

use twinmq_examples::lab;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use twinmq_client::{AdminClient, Client, ClientEvent, Destination, Message, SubscribeOptions};

#[derive(Parser, Debug)]
#[command(about = "twinmq pair demo: failover under load on loopback")]
struct Args {
    /// Seconds of traffic before each step.
    #[arg(long, default_value_t = 2.0)]
    step: f64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
}

fn main() -> anyhow::Result<()> {
    lab::run_as_broker_if_asked(|| {});
    let args = Args::parse();
    lab::init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(demo(args))
}

fn say(start: Instant, line: impl std::fmt::Display) {
    println!("[{:6.2}s] {line}", start.elapsed().as_secs_f64());
}

async fn demo(args: Args) -> anyhow::Result<()> {
    let start = Instant::now();
    let step = Duration::from_secs_f64(args.step);
    let mut pair = lab::Pair::start(lab::Timings::DEFAULT, &[])?;
    say(
        start,
        format!(
            "started node-a (client {}, preferred) and node-b (client {}); gateway tcp://{}",
            pair.a.client, pair.b.client, pair.gateway.addr
        ),
    );
    pair.a.wait_active(Duration::from_secs(10)).await?;
    pair.b.wait_in_sync_passive(Duration::from_secs(10)).await?;
    say(start, "node-a is active, node-b is passive and in sync (durability: replicated)");
    say(
        start,
        format!("status pages: http://{}/ and http://{}/ (`--step 10` to watch them)", pair.a.http, pair.b.http),
    );

    let producer_client = Client::connect(pair.client_config()).await?;
    let consumer_client = Client::connect(pair.client_config()).await?;
    let mut events = producer_client.events();
    let connected_at: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let ca = connected_at.clone();
    tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            if matches!(e, ClientEvent::Connected { .. }) {
                ca.lock().expect("lock").push(Instant::now());
            }
            say(start, format!("client: {e}"));
        }
    });

    // Consumer: counts distinct messages and duplicates.
    let received: Arc<Mutex<HashSet<String>>> = Arc::default();
    let deliveries = Arc::new(AtomicU64::new(0));
    let mut consumer =
        consumer_client.subscribe(Destination::queue("demo.orders"), SubscribeOptions::default().prefetch(256)).await?;
    let (r, n) = (received.clone(), deliveries.clone());
    let consuming = tokio::spawn(async move {
        while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await {
            let body = String::from_utf8_lossy(&d.payload()[..d.payload().len().min(20)]).into_owned();
            let id = body.split(' ').next().unwrap_or_default().to_string();
            n.fetch_add(1, Ordering::Relaxed);
            r.lock().expect("lock").insert(id);
            match d.ack().await {
                // Not sent while the client reconnects: it comes back (at-least-once).
                Ok(()) | Err(twinmq_client::ClientError::NotSettled { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::Ok(())
    });

    // Producer: numbered messages, confirms recorded with their time.
    let confirmed: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let producer = producer_client.producer(Destination::queue("demo.orders"));
    let (c, s, size) = (confirmed.clone(), stop.clone(), args.size);
    let producing = tokio::spawn(async move {
        let mut pending = std::collections::VecDeque::new();
        let mut i = 0u64;
        while !s.load(Ordering::Relaxed) {
            let id = format!("order-{i}");
            let mut body = format!("{id} ").into_bytes();
            body.resize(size.max(body.len()), b'x');
            i += 1;
            pending.push_back((id, producer.send_nowait(Message::persistent(body)).await?));
            while pending.len() >= 32 {
                let (id, confirm) = pending.pop_front().expect("non-empty");
                confirm.await?;
                c.lock().expect("lock").push((Instant::now(), id));
            }
            if i.is_multiple_of(16) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        for (id, confirm) in pending {
            confirm.await?;
            c.lock().expect("lock").push((Instant::now(), id));
        }
        anyhow::Ok(())
    });
    let confirmed_count = || confirmed.lock().expect("lock").len();

    tokio::time::sleep(step).await;
    say(start, format!("{} messages confirmed so far; now: kill -9 node-a (the active)", confirmed_count()));
    let fault = Instant::now();
    pair.a.kill9();
    pair.b.wait_active(Duration::from_secs(10)).await?;
    say(start, format!("node-b is active ({:.0} ms after the kill)", fault.elapsed().as_secs_f64() * 1e3));
    // The first confirm the client got after reconnecting to the new active.
    let first = loop {
        let reconnected = connected_at.lock().expect("lock").iter().copied().find(|t| *t > fault);
        if let Some(rc) = reconnected {
            if let Some((t, _)) = confirmed.lock().expect("lock").iter().find(|(t, _)| *t >= rc) {
                break t.duration_since(fault);
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    say(
        start,
        format!(
            "first confirmed send after the kill: {:.0} ms after it, as the client saw it",
            first.as_secs_f64() * 1e3
        ),
    );

    tokio::time::sleep(step).await;
    say(start, "restarting node-a: it comes back passive and catches up from node-b");
    let t = Instant::now();
    pair.a.start()?;
    pair.a.wait_in_sync_passive(Duration::from_secs(20)).await?;
    say(start, format!("node-a is passive and in sync ({:.0} ms)", t.elapsed().as_secs_f64() * 1e3));

    tokio::time::sleep(step).await;
    say(start, "operator: twinmq switchover (hand the role back to node-a)");
    let t = Instant::now();
    AdminClient::switchover_any(&pair.client_config()).await?;
    pair.a.wait_active(Duration::from_secs(10)).await?;
    say(
        start,
        format!("node-a is active again, node-b {} ({:.0} ms)", pair.b.role().await, t.elapsed().as_secs_f64() * 1e3),
    );

    tokio::time::sleep(step).await;
    stop.store(true, Ordering::Relaxed);
    producing.await??;
    consuming.await??;
    let confirmed: HashSet<String> = confirmed.lock().expect("lock").iter().map(|(_, id)| id.clone()).collect();
    let received = received.lock().expect("lock").clone();
    let lost = confirmed.difference(&received).count();
    let dup = deliveries.load(Ordering::Relaxed) as usize - received.len();
    say(
        start,
        format!(
            "confirmed {} | received {} distinct | duplicates {dup} | messages lost: {lost}",
            confirmed.len(),
            received.len()
        ),
    );
    if lost > 0 {
        bail!("{lost} confirmed messages were lost");
    }
    say(start, "demo done (both brokers are stopped now)");
    Ok(())
}
