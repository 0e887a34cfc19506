//! The local demo: one twinmq broker (in this process, on a temp data
//! directory, `durability = local`), a producer and a consumer running at
//! the same time, and a summary of what was confirmed and received.
//!
//! `cargo run --release` runs it with the defaults; `--help` lists flags.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use twinmq_client::{Client, ClientConfig, Destination, Message, SubscribeOptions};

#[derive(Parser, Debug)]
#[command(about = "twinmq local demo: a broker, a producer and a consumer")]
struct Args {
    /// Messages to send.
    #[arg(long, default_value_t = 20_000)]
    count: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Unconfirmed messages in flight.
    #[arg(long, default_value_t = 256)]
    window: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let dir = tempfile::tempdir().context("temp dir")?;
    let mut config = twinmq_broker::Config::from_toml("listen = \"127.0.0.1:0\"\nnode_id = \"demo\"")?;
    config.data_dir = dir.path().join("data");
    println!("twinmq demo: starting a broker on {} (durability {})", config.data_dir.display(), config.durability);

    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let broker = std::thread::spawn(move || {
        actix_rt::System::new().block_on(twinmq_broker::run(
            config,
            async {
                let _ = stop_rx.await;
            },
            Some(ready_tx),
        ))
    });

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let outcome = rt.block_on(async {
        let addr = ready_rx.await.context("broker failed to start")?;
        println!("broker listening on {addr}");
        exchange(addr.to_string(), &args).await
    });
    let _ = stop_tx.send(());
    let stopped = broker.join().map_err(|_| anyhow::anyhow!("broker thread panicked"))?;
    stopped.context("broker")?;
    outcome?;
    println!("broker stopped cleanly; demo done");
    Ok(())
}

async fn exchange(addr: String, args: &Args) -> anyhow::Result<()> {
    let config = ClientConfig::new([addr]).window(args.window);
    let producer_client = Client::connect(config.clone()).await?;
    let consumer_client = Client::connect(config).await?;
    let queue = Destination::queue("demo.orders");
    let mut consumer = consumer_client.subscribe(queue.clone(), SubscribeOptions::default().prefetch(512)).await?;

    let count = args.count;
    let receiver = tokio::spawn(async move {
        let mut seen = HashSet::new();
        let start = Instant::now();
        while seen.len() < count {
            match tokio::time::timeout(Duration::from_secs(10), consumer.recv()).await {
                Ok(Some(Ok(d))) => {
                    let body = String::from_utf8_lossy(&d.payload()[..d.payload().len().min(24)]).into_owned();
                    let id = body.split(' ').next().unwrap_or_default().to_string();
                    d.ack().await?;
                    seen.insert(id);
                }
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) | Err(_) => break,
            }
        }
        anyhow::Ok((seen.len(), start.elapsed()))
    });

    let producer = producer_client.producer(queue);
    let start = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    let mut confirmed = 0usize;
    for i in 0..count {
        let mut body = format!("order-{i} ").into_bytes();
        body.resize(args.size.max(body.len()), b'x');
        pending.push_back(producer.send_nowait(Message::persistent(body)).await?);
        if pending.len() >= args.window {
            pending.pop_front().expect("non-empty").await?;
            confirmed += 1;
            if confirmed.is_multiple_of((count / 4).max(1)) {
                println!("  producer: {confirmed} confirmed");
            }
        }
    }
    for c in pending {
        c.await?;
        confirmed += 1;
    }
    let send_time = start.elapsed();
    let (received, recv_time) = receiver.await??;
    println!(
        "producer: {confirmed} messages of {} bytes confirmed in {:.2} s ({:.0} msg/s; each confirmed only after its group commit was fsync'd)",
        args.size,
        send_time.as_secs_f64(),
        confirmed as f64 / send_time.as_secs_f64()
    );
    println!("consumer: {received} distinct messages received and acked in {:.2} s", recv_time.as_secs_f64());
    let status: serde_json::Value = serde_json::from_str(&producer_client.status().await?)?;
    println!(
        "broker: role {}, last op {}, store records still live {}",
        status["role"], status["last_op"], status["store"]["live_batches"]
    );
    if received != count {
        bail!("expected {count} messages, received {received}");
    }
    println!("messages lost: 0");
    producer_client.close().await?;
    consumer_client.close().await?;
    Ok(())
}
