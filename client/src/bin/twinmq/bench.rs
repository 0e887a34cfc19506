//! `twinmq bench`: throughput and confirm latency of one producer and one consumer.
//!
//! The producer keeps `window` publishes in flight on its own connection; the
//! consumer (prefetch 1024, one ack per message) drains the same queue on
//! another connection at the same time. Each payload starts with a run id
//! and the message index (16 bytes, big endian), so that the consumer can tell
//! this run's messages from leftovers of an earlier one and count duplicates
//! and missing ones. Latency is measured per message from the moment the
//! client took it (a window slot was free) to its confirm.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio::time::Instant;
use twinmq_client::{Client, ClientConfig, ClientError, Confirm, Consumer, Destination, Message, SubscribeOptions};

/// The consumer gives up when nothing arrived for this long.
const CONSUMER_IDLE: Duration = Duration::from_secs(10);
const CONSUMER_PREFETCH: u32 = 1024;
const HEADER_BYTES: usize = 16;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 200_000)]
    pub count: u64,
    /// Payload bytes per message (at least 16: run id and index).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Most unconfirmed messages in flight.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub window: u32,
    /// Queue to use.
    #[arg(long, default_value = "bench")]
    pub queue: String,
    /// Only produce.
    #[arg(long)]
    pub no_consumer: bool,
}

pub async fn run(config: ClientConfig, args: BenchArgs) -> anyhow::Result<ExitCode> {
    let run_id: u64 = rand::random();
    let destination = Destination::queue(&args.queue);
    let consumer = if args.no_consumer {
        None
    } else {
        let client = Client::connect(config.clone()).await.context("consumer connection")?;
        let options = SubscribeOptions::default().prefetch(CONSUMER_PREFETCH);
        let consumer = client.subscribe(destination.clone(), options).await.context("subscribe")?;
        Some((client, consumer))
    };
    let client = Client::connect(config.window(args.window as usize)).await.context("producer connection")?;

    let start = Instant::now();
    let consumer =
        consumer.map(|(client, consumer)| tokio::spawn(consume(client, consumer, run_id, args.count, start)));
    let produced = produce(&client, destination, &args, run_id, start).await?;
    if let Err(e) = client.close().await {
        tracing::warn!(error = %e, "closing the producer connection failed");
    }
    let consumed = match consumer {
        Some(task) => Some(task.await.context("consumer task")?),
        None => None,
    };

    let mib = |rate: f64| rate * args.size.max(HEADER_BYTES) as f64 / (1024.0 * 1024.0);
    let produce_rate = rate(produced.confirmed, produced.elapsed);
    println!(
        "producer: {}/{} confirmed in {:.2}s, {:.0} msgs/s, {:.1} MiB/s",
        produced.confirmed,
        args.count,
        produced.elapsed.as_secs_f64(),
        produce_rate,
        mib(produce_rate)
    );
    let latency = |q: f64| format_micros(produced.latency.value_at_quantile(q));
    let (p50, p99, max) = (latency(0.5), latency(0.99), format_micros(produced.latency.max()));
    println!("confirm latency: p50 {p50}, p99 {p99}, max {max}");
    let mut consume_summary = "-".to_owned();
    let mut ok = produced.error.is_none();
    if let Some(consumed) = &consumed {
        let consume_rate = rate(consumed.distinct, consumed.elapsed);
        let missing = args.count - consumed.distinct;
        println!(
            "consumer: {}/{} distinct in {:.2}s, {:.0} msgs/s, {:.1} MiB/s; duplicates {}, missing {}, stale {}",
            consumed.distinct,
            args.count,
            consumed.elapsed.as_secs_f64(),
            consume_rate,
            mib(consume_rate),
            consumed.duplicates,
            missing,
            consumed.stale
        );
        consume_summary = format!("{consume_rate:.0}/s");
        ok &= missing == 0 && consumed.error.is_none();
        if let Some(e) = &consumed.error {
            eprintln!("consumer error: {e}");
        }
    }
    println!(
        "bench count={} size={} window={} produce={:.0}/s consume={} confirm_p50={} confirm_p99={} confirm_max={}",
        args.count, args.size, args.window, produce_rate, consume_summary, p50, p99, max
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

async fn produce(
    client: &Client,
    destination: Destination,
    args: &BenchArgs,
    run_id: u64,
    start: Instant,
) -> anyhow::Result<Produced> {
    let producer = client.producer(destination);
    let mut latency = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).context("histogram")?;
    let (confirms, mut pending) = mpsc::channel::<(Instant, Confirm)>(args.window as usize);
    let send = async move {
        for i in 0..args.count {
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

struct Consumed {
    distinct: u64,
    duplicates: u64,
    /// Messages of another run (or not from the bench) found in the queue, acked too.
    stale: u64,
    /// From the start to the last message of this run.
    elapsed: Duration,
    error: Option<ClientError>,
}

async fn consume(client: Client, mut consumer: Consumer, run_id: u64, count: u64, start: Instant) -> Consumed {
    let mut seen = Seen::new(count);
    let (mut duplicates, mut stale, mut last, mut error) = (0, 0, start, None);
    while seen.distinct < count {
        let delivery = match tokio::time::timeout(CONSUMER_IDLE, consumer.recv()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(Err(e))) => {
                error = Some(e);
                break;
            }
            Ok(Some(Ok(delivery))) => delivery,
        };
        match parse_payload(delivery.payload()) {
            Some((id, i)) if id == run_id && i < count => {
                last = Instant::now();
                if !seen.insert(i) {
                    duplicates += 1;
                }
            }
            _ => stale += 1,
        }
        if let Err(e) = delivery.ack().await {
            error = Some(e);
            break;
        }
    }
    if error.is_none() {
        let _ = consumer.unsubscribe().await;
        let _ = client.close().await;
    }
    Consumed { distinct: seen.distinct, duplicates, stale, elapsed: last.duration_since(start), error }
}

/// Which indexes of this run arrived (one bit each).
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

    #[test]
    fn latency_in_milliseconds() {
        assert_eq!(format_micros(2100), "2.10ms");
        assert_eq!(format_micros(450), "0.45ms");
    }
}
