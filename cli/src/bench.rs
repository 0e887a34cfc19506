//! `twinmq bench`: throughput and confirm latency of producers and consumers.
//!
//! Each producer keeps `window` publishes in flight on its own connection;
//! the consumers (prefetch 1024, one ack per message) drain the queues on
//! connections of their own at the same time. With `--queues N`, producer
//! and consumer `i` use queue `i % N`; with `--fan-out N`, the producers
//! publish to a topic and each of its N subscribers receives every message.
//! Each payload starts with a run id and the message index (16 bytes, big
//! endian), so that the consumers can tell this run's messages from leftovers
//! of an earlier one and count duplicates and missing ones. Latency is
//! measured per message from the moment the client took it (a window slot
//! was free) to its confirm.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use twinmq_client::{Client, ClientConfig, ClientError, Confirm, Consumer, Destination, Message, SubscribeOptions};

/// A consumer gives up when nothing arrived for this long.
const CONSUMER_IDLE: Duration = Duration::from_secs(10);
const CONSUMER_PREFETCH: u32 = 1024;
const HEADER_BYTES: usize = 16;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Messages in all (split between the producers).
    #[arg(long, default_value_t = 200_000)]
    pub count: u64,
    /// Payload bytes per message (at least 16: run id and index).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Most unconfirmed messages in flight, per producer.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub window: u32,
    /// Queue to use (QUEUE-0, QUEUE-1, ... with --queues; the topic's name with --fan-out).
    #[arg(long, default_value = "bench")]
    pub queue: String,
    /// Only produce.
    #[arg(long)]
    pub no_consumer: bool,
    /// Only consume: drain `count` messages an earlier `bench --no-consumer`
    /// left (of any run), measuring delivery and ack alone.
    #[arg(long, conflicts_with_all = ["no_consumer", "fan_out"])]
    pub no_producer: bool,
    /// Producers, each on its own connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub producers: u32,
    /// Consumers, each on its own connection (at least one per queue).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub consumers: u32,
    /// Queues: producer and consumer i use queue i % N.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub queues: u32,
    /// Publish to a topic with N subscribers, each receiving every message
    /// (instead of --consumers and --queues).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000),
          conflicts_with_all = ["consumers", "queues", "no_consumer"])]
    pub fan_out: Option<u32>,
    /// With --fan-out: durable subscriptions (named QUEUE-sub-0, ...), so
    /// that each subscriber's copy is stored.
    #[arg(long, requires = "fan_out")]
    pub durable: bool,
}

impl BenchArgs {
    /// Where producer or consumer `i` goes.
    fn destination(&self, i: u32) -> Destination {
        match (self.fan_out, self.queues) {
            (Some(_), _) => Destination::topic(&self.queue),
            (None, 1) => Destination::queue(&self.queue),
            (None, n) => Destination::queue(format!("{}-{}", self.queue, i % n)),
        }
    }

    /// Consumers sharing one tally (a queue's competing consumers), per group.
    fn groups(&self) -> Vec<Vec<u32>> {
        match self.fan_out {
            _ if self.no_consumer => Vec::new(),
            Some(n) => (0..n).map(|i| vec![i]).collect(),
            None => vec![(0..self.consumers).collect()],
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.fan_out.is_none() && !self.no_consumer && self.consumers < self.queues {
            anyhow::bail!(
                "--consumers {} is fewer than --queues {}: some queue would never be drained",
                self.consumers,
                self.queues
            );
        }
        if self.count < u64::from(self.producers) {
            anyhow::bail!("--count {} is fewer than --producers {}", self.count, self.producers);
        }
        Ok(())
    }

    /// The indexes producer `p` sends.
    fn share(&self, p: u32) -> std::ops::Range<u64> {
        let n = u64::from(self.producers);
        let (each, extra) = (self.count / n, self.count % n);
        let p = u64::from(p);
        let start = p * each + p.min(extra);
        start..start + each + u64::from(p < extra)
    }
}

pub async fn run(config: ClientConfig, args: BenchArgs) -> anyhow::Result<ExitCode> {
    args.check()?;
    let run_id: u64 = rand::random();
    let (done_tx, done) = watch::channel(false);
    let mut groups = Vec::new();
    let mut consumers = Vec::new();
    for members in args.groups() {
        let tally = Arc::new(Mutex::new(Tally::new(args.count)));
        for i in members {
            let client = Client::connect(config.clone()).await.context("consumer connection")?;
            let mut options = SubscribeOptions::default().prefetch(CONSUMER_PREFETCH);
            if args.durable {
                options = options.durable(format!("{}-sub-{i}", args.queue));
            }
            let consumer = client.subscribe(args.destination(i), options).await.context("subscribe")?;
            consumers.push((client, consumer, tally.clone()));
        }
        groups.push(tally);
    }
    let mut producers = Vec::new();
    for _ in 0..if args.no_producer { 0 } else { args.producers } {
        let client =
            Client::connect(config.clone().window(args.window as usize)).await.context("producer connection")?;
        producers.push(client);
    }

    let start = Instant::now();
    let consumers: Vec<_> = consumers
        .into_iter()
        .map(|(client, consumer, tally)| {
            let (done, all) = (done.clone(), groups.clone());
            let run = (!args.no_producer).then_some(run_id);
            tokio::spawn(consume(client, consumer, run, tally, all, done, done_tx.clone(), start))
        })
        .collect();
    drop(done_tx);
    let produced = futures_util::future::join_all(producers.iter().enumerate().map(|(p, client)| {
        let p = p as u32;
        produce(client, args.destination(p), args.share(p), &args, run_id, start)
    }))
    .await;
    for client in &producers {
        if let Err(e) = client.close().await {
            tracing::warn!(error = %e, "closing a producer connection failed");
        }
    }
    let mut errors = Vec::new();
    for task in consumers {
        if let Some(e) = task.await.context("consumer task")? {
            errors.push(e);
        }
    }
    let produced = Produced::merge(produced)?;

    let mib = |rate: f64| rate * args.size.max(HEADER_BYTES) as f64 / (1024.0 * 1024.0);
    let produce_rate = rate(produced.confirmed, produced.elapsed);
    let latency = |q: f64| format_micros(produced.latency.value_at_quantile(q));
    let (mut p50, mut p99, mut max) = (latency(0.5), latency(0.99), format_micros(produced.latency.max()));
    let mut produce_summary = format!("{produce_rate:.0}/s");
    if args.no_producer {
        [p50, p99, max, produce_summary] = ["-", "-", "-", "-"].map(String::from);
    } else {
        println!(
            "producers: {}/{} confirmed in {:.2}s, {:.0} msgs/s, {:.1} MiB/s",
            produced.confirmed,
            args.count,
            produced.elapsed.as_secs_f64(),
            produce_rate,
            mib(produce_rate)
        );
        println!("confirm latency: p50 {p50}, p99 {p99}, max {max}");
    }
    let mut consume_summary = "-".to_owned();
    let mut ok = produced.error.is_none() && (args.no_producer || produced.confirmed == args.count);
    if !groups.is_empty() {
        let tallies: Vec<Tally> = groups.iter().map(|g| lock(g).clone()).collect();
        let last = tallies.iter().map(|t| t.last).max().unwrap_or(start);
        let elapsed = last.duration_since(start);
        let distinct: u64 = tallies.iter().map(|t| t.seen.distinct).sum();
        let consume_rate = rate(distinct, elapsed);
        let missing: u64 = tallies.iter().map(|t| args.count - t.seen.distinct).sum();
        let (duplicates, stale) = tallies.iter().fold((0, 0), |(d, s), t| (d + t.duplicates, s + t.stale));
        let of = args.count * tallies.len() as u64;
        println!(
            "consumers: {distinct}/{of} distinct in {:.2}s, {consume_rate:.0} msgs/s, {:.1} MiB/s; duplicates {duplicates}, missing {missing}, stale {stale}",
            elapsed.as_secs_f64(),
            mib(consume_rate),
        );
        consume_summary = format!("{consume_rate:.0}/s");
        ok &= missing == 0 && errors.is_empty();
        for e in &errors {
            eprintln!("consumer error: {e}");
        }
    }
    let producers = if args.no_producer { 0 } else { args.producers };
    let shape = match args.fan_out {
        Some(n) => format!("producers={producers} fan_out={n}{}", if args.durable { " durable" } else { "" }),
        None => format!(
            "producers={producers} consumers={} queues={}",
            if args.no_consumer { 0 } else { args.consumers },
            args.queues
        ),
    };
    println!(
        "bench count={} size={} window={} {shape} produce={produce_summary} consume={consume_summary} confirm_p50={p50} confirm_p99={p99} confirm_max={max}",
        args.count, args.size, args.window
    );
    if let Some(e) = &produced.error {
        eprintln!("producer error: {e}");
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

struct Produced {
    confirmed: u64,
    /// From the start to the last confirm.
    elapsed: Duration,
    /// Microseconds from send to confirm.
    latency: Histogram<u64>,
    error: Option<ClientError>,
}

impl Produced {
    /// The producers' figures together (the first error, the last confirm).
    fn merge(all: Vec<anyhow::Result<Produced>>) -> anyhow::Result<Produced> {
        let mut merged = Produced { confirmed: 0, elapsed: Duration::ZERO, latency: histogram()?, error: None };
        for p in all {
            let p = p?;
            merged.confirmed += p.confirmed;
            merged.elapsed = merged.elapsed.max(p.elapsed);
            merged.latency.add(&p.latency).context("histogram")?;
            merged.error = merged.error.or(p.error);
        }
        Ok(merged)
    }
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).context("histogram")
}

async fn produce(
    client: &Client,
    destination: Destination,
    share: std::ops::Range<u64>,
    args: &BenchArgs,
    run_id: u64,
    start: Instant,
) -> anyhow::Result<Produced> {
    let producer = client.producer(destination);
    let mut latency = histogram()?;
    let (confirms, mut pending) = mpsc::channel::<(Instant, Confirm)>(args.window as usize);
    let send = async move {
        for i in share {
            let confirm = producer.send_nowait(Message::persistent(payload(run_id, i, args.size))).await?;
            if confirms.send((Instant::now(), confirm)).await.is_err() {
                break;
            }
        }
        Ok::<_, ClientError>(())
    };
    let collect = async {
        let (mut confirmed, mut last) = (0u64, start);
        while let Some((sent_at, confirm)) = pending.recv().await {
            if let Err(e) = confirm.await {
                // The sender stops at once (else it waits forever for room
                // in the channel nobody reads any more).
                pending.close();
                return (confirmed, last, Some(e));
            }
            last = Instant::now();
            latency.saturating_record(u64::try_from(last.duration_since(sent_at).as_micros()).unwrap_or(u64::MAX));
            confirmed += 1;
        }
        (confirmed, last, None)
    };
    let (sent, (confirmed, last, failed)) = tokio::join!(send, collect);
    Ok(Produced { confirmed, elapsed: last.duration_since(start), latency, error: failed.or(sent.err()) })
}

/// What the consumers of one group (a queue's, or one topic subscriber) received.
#[derive(Clone)]
struct Tally {
    seen: Seen,
    duplicates: u64,
    /// Messages of another run (or not from the bench) found in the queue, acked too.
    stale: u64,
    /// When the last message of this run arrived.
    last: Instant,
    count: u64,
}

impl Tally {
    fn new(count: u64) -> Self {
        Tally { seen: Seen::new(count), duplicates: 0, stale: 0, last: Instant::now(), count }
    }

    fn complete(&self) -> bool {
        self.seen.distinct >= self.count
    }
}

/// A tally (a consumer that panicked holding it left it as it was).
fn lock(tally: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    tally.lock().unwrap_or_else(|e| e.into_inner())
}

/// Receive and ack until every group has all of this run's messages (of
/// any run if `run_id` is `None`), or nothing came for [`CONSUMER_IDLE`], or
/// an error. Returns the error.
#[allow(clippy::too_many_arguments)]
async fn consume(
    client: Client,
    mut consumer: Consumer,
    run_id: Option<u64>,
    tally: Arc<Mutex<Tally>>,
    all: Vec<Arc<Mutex<Tally>>>,
    mut done: watch::Receiver<bool>,
    done_tx: watch::Sender<bool>,
    start: Instant,
) -> Option<ClientError> {
    lock(&tally).last = start;
    let mut error = None;
    loop {
        let delivery = tokio::select! {
            _ = done.wait_for(|d| *d) => break,
            r = tokio::time::timeout(CONSUMER_IDLE, consumer.recv()) => match r {
                Err(_) | Ok(None) => break,
                Ok(Some(Err(e))) => {
                    error = Some(e);
                    break;
                }
                Ok(Some(Ok(delivery))) => delivery,
            },
        };
        let complete = {
            let mut t = lock(&tally);
            match parse_payload(delivery.payload()) {
                Some((id, i)) if run_id.is_none_or(|r| r == id) && i < t.count => {
                    t.last = Instant::now();
                    if !t.seen.insert(i) {
                        t.duplicates += 1;
                    }
                }
                _ => t.stale += 1,
            }
            t.complete()
        };
        match delivery.ack().await {
            // Not sent while the client reconnects: it comes back (at-least-once).
            Ok(()) | Err(ClientError::NotSettled { .. }) => {}
            Err(e) => {
                error = Some(e);
                break;
            }
        }
        if complete && all.iter().all(|t| lock(t).complete()) {
            done_tx.send_replace(true);
        }
    }
    if error.is_none() {
        let _ = consumer.unsubscribe().await;
        let _ = client.close().await;
    }
    error
}

/// Which indexes of this run arrived (one bit each).
#[derive(Clone)]
struct Seen {
    bits: Vec<u64>,
    distinct: u64,
}

impl Seen {
    fn new(count: u64) -> Self {
        Seen { bits: vec![0; usize::try_from(count.div_ceil(64)).unwrap_or(0)], distinct: 0 }
    }

    /// True if `i` is new.
    fn insert(&mut self, i: u64) -> bool {
        let (word, bit) = ((i / 64) as usize, 1u64 << (i % 64));
        let new = self.bits[word] & bit == 0;
        self.bits[word] |= bit;
        self.distinct += u64::from(new);
        new
    }
}

/// Run id and index, big endian, then `x` up to `size` bytes.
fn payload(run_id: u64, i: u64, size: usize) -> Vec<u8> {
    let mut payload = Vec::with_capacity(size.max(HEADER_BYTES));
    payload.extend_from_slice(&run_id.to_be_bytes());
    payload.extend_from_slice(&i.to_be_bytes());
    payload.resize(size.max(HEADER_BYTES), b'x');
    payload
}

fn parse_payload(payload: &[u8]) -> Option<(u64, u64)> {
    let run_id = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    let i = u64::from_be_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((run_id, i))
}

fn rate(count: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        0.0
    } else {
        count as f64 / elapsed.as_secs_f64()
    }
}

fn format_micros(micros: u64) -> String {
    format!("{:.2}ms", micros as f64 / 1000.0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_and_has_the_size() {
        let p = payload(42, 7, 1024);
        assert_eq!(p.len(), 1024);
        assert_eq!(parse_payload(&p), Some((42, 7)));
        assert_eq!(payload(1, 2, 3).len(), HEADER_BYTES);
        assert_eq!(parse_payload(b"short"), None);
    }

    #[test]
    fn seen_counts_distinct_and_duplicates() {
        let mut seen = Seen::new(130);
        assert!(seen.insert(0));
        assert!(seen.insert(129));
        assert!(!seen.insert(129));
        assert_eq!(seen.distinct, 2);
    }

    fn args(extra: &[&str]) -> BenchArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        Cli::try_parse_from(std::iter::once("bench").chain(extra.iter().copied())).unwrap().bench
    }

    #[test]
    fn producers_split_the_count_without_gaps_or_overlap() {
        let a = args(&["--count", "10", "--producers", "3"]);
        assert_eq!((0..3).map(|p| a.share(p)).collect::<Vec<_>>(), vec![0..4, 4..7, 7..10]);
        let a = args(&["--count", "2", "--producers", "3"]);
        assert!(a.check().is_err(), "a producer with nothing to send");
    }

    #[test]
    fn queues_and_fan_out_pick_destinations_and_groups() {
        let a = args(&["--queues", "2", "--consumers", "4", "--producers", "4"]);
        assert_eq!(a.destination(3), Destination::queue("bench-1"));
        assert_eq!(a.groups(), vec![vec![0, 1, 2, 3]]);
        assert!(args(&["--queues", "3", "--consumers", "2"]).check().is_err(), "a queue nobody drains");
        assert_eq!(args(&[]).destination(5), Destination::queue("bench"));
        let a = args(&["--fan-out", "3"]);
        assert_eq!(a.destination(2), Destination::topic("bench"));
        assert_eq!(a.groups(), vec![vec![0], vec![1], vec![2]]);
        assert!(args(&["--no-consumer"]).groups().is_empty());
    }

    #[test]
    fn latency_in_milliseconds() {
        assert_eq!(format_micros(2100), "2.10ms");
        assert_eq!(format_micros(450), "0.45ms");
    }
}
