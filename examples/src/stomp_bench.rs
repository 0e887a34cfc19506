//! `stomp-bench`: throughput and receipt latency over the STOMP port, the
//! same load as `twinmq bench` (docs/BENCHMARKS.md): one producer with
//! `--window` SENDs awaiting their RECEIPT (a receipt means confirmed, as a
//! native confirm), one consumer acking every MESSAGE (`client-individual`).
//!
//! ```sh
//! cargo run --release -p twinmq-examples --bin stomp-bench -- --hosts 127.0.0.1:61613 --count 200000
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use twinmq_protocol::stomp::{Command, StompCodec, StompFrame, StompItem, StompLimits};

#[derive(Parser)]
#[command(about = "STOMP throughput and receipt latency against a twinmq STOMP port")]
struct Args {
    /// The STOMP address (stomp_listen) of the active node.
    #[arg(long, default_value = "127.0.0.1:61613")]
    hosts: String,
    /// Messages to send and receive.
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Payload bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// SENDs in flight (awaiting RECEIPT).
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// The consumer's prefetch (activemq.prefetchSize).
    #[arg(long, default_value_t = 1000)]
    prefetch: u32,
    #[arg(long, default_value = "stomp.bench")]
    queue: String,
    #[arg(long)]
    user: Option<String>,
    #[arg(long)]
    password: Option<String>,
}

type Conn = Framed<TcpStream, StompCodec>;

async fn connect(args: &Args) -> anyhow::Result<Conn> {
    let stream = TcpStream::connect(&args.hosts).await.with_context(|| format!("connect {}", args.hosts))?;
    stream.set_nodelay(true)?;
    let mut conn = Framed::new(stream, StompCodec::new(StompLimits::default()));
    let mut f = StompFrame::new(Command::Connect).header("accept-version", "1.2").header("host", "twinmq");
    if let (Some(u), Some(p)) = (&args.user, &args.password) {
        f = f.header("login", u.clone()).header("passcode", p.clone());
    }
    conn.send(StompItem::Frame(f)).await?;
    loop {
        match conn.next().await {
            Some(Ok(StompItem::Frame(f))) if f.command == Command::Connected => return Ok(conn),
            Some(Ok(StompItem::Frame(f))) => bail!("refused: {:?}", f.get("message")),
            Some(Ok(StompItem::Heartbeat)) => continue,
            Some(Err(e)) => bail!("{e}"),
            None => bail!("closed before CONNECTED"),
        }
    }
}

fn error(f: &StompFrame) -> anyhow::Error {
    anyhow::anyhow!("ERROR from the broker: {}", f.get("message").unwrap_or("?"))
}

async fn produce(args: &Args) -> anyhow::Result<(Duration, hdrhistogram::Histogram<u64>)> {
    let mut conn = connect(args).await?;
    let destination = format!("/queue/{}", args.queue);
    let body = bytes::Bytes::from(vec![b'x'; args.size]);
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut sent_at: HashMap<u64, Instant> = HashMap::new();
    let start = Instant::now();
    let (mut next, mut done) = (0u64, 0u64);
    while done < args.count {
        while next < args.count && sent_at.len() < args.window {
            let f = StompFrame::new(Command::Send)
                .header("destination", destination.clone())
                .header("receipt", next.to_string())
                .body(body.clone());
            sent_at.insert(next, Instant::now());
            conn.feed(StompItem::Frame(f)).await?;
            next += 1;
        }
        conn.flush().await?;
        match conn.next().await {
            Some(Ok(StompItem::Frame(f))) if f.command == Command::Receipt => {
                let id: u64 = f.get("receipt-id").and_then(|r| r.parse().ok()).context("receipt-id")?;
                let at = sent_at.remove(&id).context("a receipt for nothing sent")?;
                hist.record(at.elapsed().as_micros() as u64)?;
                done += 1;
            }
            Some(Ok(StompItem::Frame(f))) if f.command == Command::Error => return Err(error(&f)),
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("{e}"),
            None => bail!("the producer's connection closed"),
        }
    }
    let elapsed = start.elapsed();
    conn.send(StompItem::Frame(StompFrame::new(Command::Disconnect))).await?;
    Ok((elapsed, hist))
}

async fn consume(args: &Args) -> anyhow::Result<Duration> {
    let mut conn = connect(args).await?;
    let sub = StompFrame::new(Command::Subscribe)
        .header("id", "0")
        .header("destination", format!("/queue/{}", args.queue))
        .header("ack", "client-individual")
        .header("activemq.prefetchSize", args.prefetch.to_string());
    conn.send(StompItem::Frame(sub)).await?;
    let start = Instant::now();
    let mut got = 0;
    while got < args.count {
        match conn.next().await {
            Some(Ok(StompItem::Frame(f))) if f.command == Command::Message => {
                let ack = f.get("ack").context("MESSAGE without ack")?.to_string();
                conn.feed(StompItem::Frame(StompFrame::new(Command::Ack).header("id", ack))).await?;
                got += 1;
                if got % 64 == 0 {
                    conn.flush().await?;
                }
            }
            Some(Ok(StompItem::Frame(f))) if f.command == Command::Error => return Err(error(&f)),
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("{e}"),
            None => bail!("the consumer's connection closed"),
        }
    }
    conn.flush().await?;
    let elapsed = start.elapsed();
    conn.send(StompItem::Frame(StompFrame::new(Command::Disconnect))).await?;
    Ok(elapsed)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (produced, consumed) = tokio::join!(produce(&args), consume(&args));
    let (p_elapsed, hist) = produced?;
    let c_elapsed = consumed?;
    let rate = |d: Duration| args.count as f64 / d.as_secs_f64();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "stomp-bench: {} x {} B: receipted {:.0} msgs/s, consumed {:.0} msgs/s; receipt latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
        args.count,
        args.size,
        rate(p_elapsed),
        rate(c_elapsed),
        ms(0.5),
        ms(0.99),
        hist.max() as f64 / 1000.0
    );
    Ok(())
}
