//! An application's worker on `twinmq-client`: it consumes orders from a
//! queue, applies each one to a ledger on disk exactly once, and acks it
//! only after the ledger has it, so that it rides through a failover of the
//! pair without losing or doubling an order.
//!
//! Why each step:
//! - Delivery is at-least-once: after a failover the new active node
//!   delivers again what it did not see acked (and an ack made between
//!   connections is not sent: `ClientError::NotSettled`). So the worker is
//!   idempotent: the ledger remembers every order id it applied (the
//!   `order-id` header, else the broker's message id, which is the same in
//!   every delivery of a message) and only acks a delivery it applied before.
//! - The ledger line is written and fdatasync'd before the ack: a worker
//!   killed between the two gets the order again and skips it; one killed
//!   before the write gets it again and applies it.
//! - The client is given both nodes' addresses and does the rest (reconnect,
//!   resubscribe); the worker sees nothing of a failover but redeliveries.
//!
//! Two ways to run it:
//! - `worker --servers HOST:PORT,HOST:PORT [--queue orders] [--ledger FILE]`
//!   against a pair you started (publish with `twinmq pub orders ...`);
//!   it stops after `--idle` seconds without a delivery.
//! - `worker --demo [--orders N]`: starts a local pair, publishes N
//!   confirmed orders, runs the worker, `kill -9`s the active node when half
//!   are applied, and checks at the end that the ledger holds every order
//!   exactly once. Exit 1 otherwise.

use twinmq_examples::lab;

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use futures_util::StreamExt;
use twinmq_client::{Client, ClientConfig, ClientError, Delivery, Destination, Message, SubscribeOptions};

#[derive(Parser, Debug)]
#[command(about = "twinmq example worker: consume, apply once, ack; rides through a failover")]
struct Args {
    /// Client addresses of both nodes (not with --demo).
    #[arg(long, env = "TWINMQ_SERVERS", value_delimiter = ',', required_unless_present = "demo")]
    servers: Vec<String>,
    /// The queue of orders.
    #[arg(long, default_value = "orders")]
    queue: String,
    /// The ledger file (appended; read at start, so a restarted worker skips
    /// what it applied). Default: worker-ledger.txt, or a fresh one in the
    /// demo's temporary directory with --demo.
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// Stop after this many seconds without a delivery.
    #[arg(long, default_value_t = 10.0)]
    idle: f64,
    /// Start a local pair, publish orders, kill the active mid-way, check the ledger.
    #[arg(long)]
    demo: bool,
    /// Orders the demo publishes.
    #[arg(long, default_value_t = 2000)]
    orders: u64,
}

fn main() -> anyhow::Result<()> {
    lab::run_as_broker_if_asked(|| {});
    let args = Args::parse();
    lab::init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        if args.demo {
            demo(&args).await
        } else {
            let client = Client::connect(ClientConfig::new(args.servers.clone())).await?;
            let path = args.ledger.clone().unwrap_or_else(|| PathBuf::from("worker-ledger.txt"));
            let ledger = Arc::new(Mutex::new(Ledger::open(&path)?));
            let stats = work(&client, &args.queue, &ledger, Duration::from_secs_f64(args.idle), None).await?;
            println!("{stats}");
            client.close().await?;
            Ok(())
        }
    })
}

/// What the worker did with its deliveries.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    applied: u64,
    /// Redeliveries of orders already in the ledger: acked, not applied again.
    skipped: u64,
    /// Acks not sent because the client was between connections (the order comes back).
    acks_not_sent: u64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "applied {} | redelivered and skipped {} | acks not sent {}",
            self.applied, self.skipped, self.acks_not_sent
        )
    }
}

/// Orders applied, one line each (`ORDER-ID AMOUNT`), fdatasync'd before the ack.
struct Ledger {
    file: File,
    applied: HashSet<String>,
    total: u64,
}

impl Ledger {
    fn open(path: &Path) -> anyhow::Result<Ledger> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .with_context(|| format!("ledger {}", path.display()))?;
        let (mut applied, mut total) = (HashSet::new(), 0);
        for line in BufReader::new(&file).lines() {
            let line = line?;
            let Some((order, amount)) = line.split_once(' ') else { continue };
            total += amount.parse::<u64>().unwrap_or(0);
            applied.insert(order.to_owned());
        }
        Ok(Ledger { file, applied, total })
    }

    /// Apply `order` unless it was before; `true` if applied now.
    fn apply(&mut self, order: &str, amount: u64) -> anyhow::Result<bool> {
        if self.applied.contains(order) {
            return Ok(false);
        }
        writeln!(self.file, "{order} {amount}")?;
        self.file.sync_data()?;
        self.applied.insert(order.to_owned());
        self.total += amount;
        Ok(true)
    }
}

/// The order a delivery carries: its `order-id` header (or the broker's
/// message id) and the amount in its payload (`amount=N`).
fn order_of(delivery: &Delivery) -> (String, u64) {
    let order = delivery.message().headers.get("order-id").cloned().unwrap_or_else(|| delivery.id().to_string());
    let payload = String::from_utf8_lossy(delivery.payload());
    let amount = payload.strip_prefix("amount=").and_then(|a| a.trim().parse().ok()).unwrap_or(0);
    (order, amount)
}

/// Consume `queue` until `idle` passes without a delivery (or, once the
/// ledger holds `enough` orders, a short quiet spell that acks the last
/// redeliveries): apply, then ack.
async fn work(
    client: &Client,
    queue: &str,
    ledger: &Mutex<Ledger>,
    idle: Duration,
    enough: Option<u64>,
) -> anyhow::Result<Stats> {
    let mut consumer = client.subscribe(Destination::queue(queue), SubscribeOptions::default().prefetch(64)).await?;
    let mut stats = Stats::default();
    let quiet = |ledger: &Mutex<Ledger>| {
        let applied = ledger.lock().map(|l| l.applied.len() as u64).unwrap_or(0);
        if enough.is_some_and(|n| applied >= n) {
            idle.min(Duration::from_millis(300))
        } else {
            idle
        }
    };
    while let Ok(next) = tokio::time::timeout(quiet(ledger), consumer.next()).await {
        let Some(delivery) = next else { break };
        let delivery = delivery.context("the consumer ended")?;
        let (order, amount) = order_of(&delivery);
        let applied = ledger.lock().map_err(|_| anyhow::anyhow!("ledger lock poisoned"))?.apply(&order, amount)?;
        if applied {
            stats.applied += 1;
        } else {
            stats.skipped += 1;
        }
        match delivery.ack().await {
            Ok(()) => {}
            // Between connections: the order comes back and is skipped then.
            Err(ClientError::NotSettled { .. }) => stats.acks_not_sent += 1,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(stats)
}

fn say(start: Instant, line: impl std::fmt::Display) {
    println!("[{:6.2}s] {line}", start.elapsed().as_secs_f64());
}

async fn demo(args: &Args) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut pair = lab::Pair::start(lab::Timings::DEFAULT, &[])?;
    pair.a.wait_active(Duration::from_secs(10)).await?;
    pair.b.wait_in_sync_passive(Duration::from_secs(10)).await?;
    say(start, format!("pair up: node-a {} active, node-b {} passive and in sync", pair.a.client, pair.b.client));

    let producer_client = Client::connect(pair.client_config()).await?;
    let producer = producer_client.producer(Destination::queue(&args.queue));
    let orders = (0..args.orders)
        .map(|i| Message::persistent(format!("amount={}", i % 100 + 1)).header("order-id", format!("order-{i}")));
    for confirm in producer.send_batch(orders).await? {
        confirm.await?;
    }
    let expected_total: u64 = (0..args.orders).map(|i| i % 100 + 1).sum();
    say(start, format!("{} orders published and confirmed", args.orders));

    let path = args.ledger.clone().unwrap_or_else(|| pair.dir.path().join("ledger.txt"));
    let ledger = Arc::new(Mutex::new(Ledger::open(&path)?));
    let client = Client::connect(pair.client_config()).await?;
    let (l, queue, idle, n) = (ledger.clone(), args.queue.clone(), Duration::from_secs_f64(args.idle), args.orders);
    let worker = tokio::spawn(async move { work(&client, &queue, &l, idle, Some(n)).await });
    let applied = || ledger.lock().map(|l| l.applied.len() as u64).unwrap_or(0);
    while applied() < args.orders / 2 {
        if worker.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    say(start, format!("{} orders applied; now: kill -9 node-a (the active)", applied()));
    let fault = Instant::now();
    pair.a.kill9();
    pair.b.wait_active(Duration::from_secs(10)).await?;
    say(
        start,
        format!(
            "node-b is active ({:.0} ms after the kill); the worker carries on",
            fault.elapsed().as_secs_f64() * 1e3
        ),
    );
    let stats = worker.await??;
    say(start, format!("worker: {stats}"));

    let ledger = ledger.lock().map_err(|_| anyhow::anyhow!("ledger lock poisoned"))?;
    let lines = BufReader::new(File::open(&path)?).lines().count() as u64;
    let missing = (0..args.orders).filter(|i| !ledger.applied.contains(&format!("order-{i}"))).count();
    let twice = lines.saturating_sub(ledger.applied.len() as u64);
    say(
        start,
        format!(
            "ledger: {} orders, total {} (expected {expected_total}) | orders lost: {missing} | applied twice: {twice}",
            ledger.applied.len(),
            ledger.total
        ),
    );
    if missing > 0 || twice > 0 || ledger.total != expected_total {
        bail!("the ledger does not hold every order exactly once");
    }
    say(start, "worker demo done (both brokers are stopped now)");
    Ok(())
}
