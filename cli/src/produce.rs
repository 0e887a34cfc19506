//! `twinmq pub`: publish numbered messages, pipelined, and count the confirmed prefix.

use std::process::ExitCode;

use clap::Args;
use tokio::sync::mpsc;
use twinmq_client::{Client, ClientConfig, ClientError, Confirm, Message};

#[derive(Debug, Args)]
pub struct PubArgs {
    /// Queue name (a topic with --topic).
    pub dest: String,
    /// How many messages to send.
    #[arg(long)]
    pub count: u64,
    /// Pad each body with a space and `x`s up to this many bytes (0: no padding).
    #[arg(long, default_value_t = 0)]
    pub size: usize,
    /// Bodies are `<prefix>-<i>`, i from 0.
    #[arg(long, default_value = "msg")]
    pub prefix: String,
    /// DEST is a topic.
    #[arg(long)]
    pub topic: bool,
    /// Most unconfirmed messages in flight.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub window: u32,
}

/// Body of message `i`: `<prefix>-<i>`, then a space and `x`s up to `size`
/// bytes if it is shorter than that.
pub fn body(prefix: &str, i: u64, size: usize) -> Vec<u8> {
    let mut body = format!("{prefix}-{i}").into_bytes();
    if body.len() < size {
        body.push(b' ');
        body.resize(size, b'x');
    }
    body
}

/// Prints `confirmed K` (K: how many messages from the first on are all
/// confirmed); exit 1 with the error on stderr if that is not all of them.
pub async fn run(config: ClientConfig, args: PubArgs) -> anyhow::Result<ExitCode> {
    let window = args.window as usize;
    let client = match Client::connect(config.window(window)).await {
        Ok(client) => client,
        Err(e) => {
            println!("confirmed 0");
            return Err(e.into());
        }
    };
    let producer = client.producer(crate::destination(&args.dest, args.topic));
    // Confirms in send order; the window already bounds them, the channel just carries them.
    let (confirms, mut pending) = mpsc::channel::<Confirm>(window);
    let send = async move {
        for i in 0..args.count {
            let confirm = producer.send_nowait(Message::persistent(body(&args.prefix, i, args.size))).await?;
            if confirms.send(confirm).await.is_err() {
                break; // a confirm failed: stop sending
            }
        }
        Ok::<_, ClientError>(())
    };
    let collect = async {
        let mut confirmed = 0u64;
        while let Some(confirm) = pending.recv().await {
            if let Err(e) = confirm.await {
                return (confirmed, Some(e));
            }
            confirmed += 1;
        }
        (confirmed, None)
    };
    let (sent, (confirmed, failed)) = tokio::join!(send, collect);
    if let Err(e) = client.close().await {
        tracing::warn!(error = %e, "close failed");
    }
    println!("confirmed {confirmed}");
    match failed.or(sent.err()) {
        Some(e) => Err(e.into()),
        None if confirmed == args.count => Ok(ExitCode::SUCCESS),
        None => Err(anyhow::anyhow!("only {confirmed} of {} messages confirmed", args.count)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::body;

    #[test]
    fn body_without_padding() {
        assert_eq!(body("msg", 0, 0), b"msg-0");
        assert_eq!(body("msg", 12, 3), b"msg-12");
    }

    #[test]
    fn body_padded_with_space_and_x() {
        assert_eq!(body("msg", 7, 10), b"msg-7 xxxx");
        assert_eq!(body("a", 1, 1024).len(), 1024);
    }

    #[test]
    fn padding_edge_cases() {
        // Exactly the size: untouched. One short: only the space.
        assert_eq!(body("msg", 7, 5), b"msg-7");
        assert_eq!(body("msg", 7, 6), b"msg-7 ");
        assert_eq!(body("msg", 7, 7), b"msg-7 x");
    }
}
