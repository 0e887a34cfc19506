//! `twinmq sub`: consume and ack up to N messages.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use twinmq_client::{Client, ClientConfig, SubscribeOptions};

#[derive(Debug, Args)]
pub struct SubArgs {
    /// Queue name (a topic with --topic).
    pub dest: String,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: u64,
    /// Stop when no message arrived for this many seconds.
    #[arg(long, default_value = "10", value_parser = parse_seconds)]
    pub timeout: Duration,
    /// Print each body (lossy UTF-8) on its own line as it arrives.
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

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text.parse().map_err(|e| format!("{e}"))?;
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{e}"))
}

/// Prints `received K`; exit 0 if K == COUNT.
pub async fn run(config: ClientConfig, args: SubArgs) -> anyhow::Result<ExitCode> {
    let client = Client::connect(config).await?;
    // No more in flight than we will take: the rest stays for other consumers.
    let prefetch = args.prefetch.unwrap_or_else(|| u32::try_from(args.count.clamp(1, 256)).unwrap_or(256));
    let options = SubscribeOptions { durable: args.durable.clone(), prefetch };
    let mut consumer = client.subscribe(crate::destination(&args.dest, args.topic), options).await?;
    let mut received = 0u64;
    let mut failure = None;
    while received < args.count {
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
        if args.print {
            println!("{}", String::from_utf8_lossy(delivery.payload()));
        }
        if let Err(e) = delivery.ack().await {
            failure = Some(e);
            break;
        }
        received += 1;
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::parse_seconds;
    use std::time::Duration;

    #[test]
    fn timeout_takes_fractions_and_refuses_negatives() {
        assert_eq!(parse_seconds("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_seconds("0.25"), Ok(Duration::from_millis(250)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
    }
}
