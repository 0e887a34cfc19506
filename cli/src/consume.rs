//! `twinmq sub`: consume and ack until N distinct messages arrived.
//!
//! Every delivery is acked, but `received K` counts distinct bodies: after a
//! failover the broker redelivers what it had not seen acked, and a body
//! counted once is not counted again (nor printed again with `--print`).

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use twinmq_client::{Client, ClientConfig, ClientError, SubscribeOptions};

#[derive(Debug, Args)]
pub struct SubArgs {
    /// Queue name (a topic with --topic).
    pub dest: String,
    /// Stop after this many distinct messages (by body).
    #[arg(long)]
    pub count: u64,
    /// Stop when no message arrived for this many seconds.
    #[arg(long, default_value = "10", value_parser = crate::parse_seconds)]
    pub timeout: Duration,
    /// Print each distinct body (lossy UTF-8) on its own line as it first arrives.
    #[arg(long)]
    pub print: bool,
    /// DEST is a topic.
    #[arg(long)]
    pub topic: bool,
    /// Use (or create) the durable subscription NAME of the topic.
    #[arg(long, value_name = "NAME", requires = "topic")]
    pub durable: Option<String>,
    /// Most unacknowledged messages in flight (default: COUNT, at most 256).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub prefetch: Option<u32>,
}

/// Prints `received K` (K distinct bodies, each acked); exit 0 if K == COUNT.
pub async fn run(config: ClientConfig, args: SubArgs) -> anyhow::Result<ExitCode> {
    let client = Client::connect(config).await?;
    // No more in flight than we will take: the rest stays for other consumers.
    let prefetch = args.prefetch.unwrap_or_else(|| u32::try_from(args.count.clamp(1, 256)).unwrap_or(256));
    let mut options = SubscribeOptions::default().prefetch(prefetch);
    if let Some(name) = &args.durable {
        options = options.durable(name.clone());
    }
    let mut consumer = client.subscribe(crate::destination(&args.dest, args.topic), options).await?;
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let mut failure = None;
    while (seen.len() as u64) < args.count {
        let delivery = match tokio::time::timeout(args.timeout, consumer.recv()).await {
            Err(_) => {
                eprintln!("no message for {:?}", args.timeout);
                break;
            }
            Ok(None) => {
                eprintln!("the consumer ended");
                break;
            }
            Ok(Some(Err(e))) => {
                failure = Some(e);
                break;
            }
            Ok(Some(Ok(delivery))) => delivery,
        };
        let body = delivery.payload().to_vec();
        match delivery.ack().await {
            Ok(()) => {}
            // Not sent while the client reconnects: it comes back and is counted then.
            Err(ClientError::NotSettled { .. }) => continue,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
        if !seen.contains(&body) {
            if args.print {
                println!("{}", String::from_utf8_lossy(&body));
            }
            seen.insert(body);
        }
    }
    let received = seen.len() as u64;
    // Unsubscribe, then close: the acks go out before the Bye.
    if failure.is_none() {
        let _ = consumer.unsubscribe().await;
        if let Err(e) = client.close().await {
            tracing::warn!(error = %e, "close failed; acks may not have reached the broker");
        }
    }
    println!("received {received}");
    match failure {
        Some(e) => Err(e.into()),
        None if received == args.count => Ok(ExitCode::SUCCESS),
        None => Ok(ExitCode::FAILURE),
    }
}
