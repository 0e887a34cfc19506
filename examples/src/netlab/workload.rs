//! The workload: a producer and a consumer on the client host, each with
//! its own connection to the pair, writing what happened as JSON lines.
//!
//! Records (`ev` field), all with `t` in wall-clock microseconds:
//! - `sent` `id`: the producer handed message `id` to the client library;
//! - `ok` `id` `sent` `node`: its confirm arrived (`sent`: when it was sent;
//!   `node`: the node the producer was connected to then);
//! - `recv` `id` `redelivered` `epoch` `seq`: the consumer got it (and acks
//!   it); `epoch` and `seq` are the broker's id of the delivered message;
//! - `client` `who` `text`: a [`twinmq_client::ClientEvent`] of either client;
//! - `error` `who` `text`: an error reached the application (none should);
//! - `ready`: the first message went round (the lab waits for this);
//! - `done` with totals, after a stop: every confirm collected, the queue drained.
//!
//! Bounded: at most `max_messages`, at most `max_seconds`, then it stops
//! by itself. It stops on `stop` or end of file on stdin, and dies with
//! its parent.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use twinmq_client::{Client, ClientConfig, ClientEvent, Destination, Message, SubscribeOptions};

use super::proc::{now_us, JsonLines, LineTail};

/// What `cable-lab workload` is told (flags of the helper process, written by [`Self::to_args`]).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkloadArgs {
    #[arg(long, value_delimiter = ',')]
    pub servers: Vec<String>,
    #[arg(long)]
    pub queue: String,
    #[arg(long)]
    pub out: PathBuf,
    /// Messages per second (the producer's pace; it waits while its window is full).
    #[arg(long)]
    pub rate: u32,
    /// Unconfirmed messages in flight at most.
    #[arg(long)]
    pub window: usize,
    #[arg(long)]
    pub size: usize,
    #[arg(long)]
    pub max_messages: u64,
    #[arg(long)]
    pub max_seconds: u64,
    /// The clients' `failover_timeout`: how long a send or a consumer waits
    /// for an active node before the application gets an error.
    #[arg(long, default_value_t = 30)]
    pub failover_timeout_s: u64,
    /// Every this many messages one goes to `<queue>.slow` instead, which is
    /// consumed only when the run drains (0: none), sent with the seven
    /// before it at once: records pinned by a few live messages for the
    /// whole run, for the compactor.
    #[arg(long, default_value_t = 0)]
    pub slow_every: u64,
}

impl WorkloadArgs {
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "workload".into(),
            "--servers".into(),
            self.servers.join(","),
            "--queue".into(),
            self.queue.clone(),
            "--out".into(),
            self.out.display().to_string(),
            "--rate".into(),
            self.rate.to_string(),
            "--window".into(),
            self.window.to_string(),
            "--size".into(),
            self.size.to_string(),
            "--max-messages".into(),
            self.max_messages.to_string(),
            "--max-seconds".into(),
            self.max_seconds.to_string(),
            "--failover-timeout-s".into(),
            self.failover_timeout_s.to_string(),
            "--slow-every".into(),
            self.slow_every.to_string(),
        ]
    }
}

/// The client configuration of both clients: both nodes, a failover of up
/// to `failover` without errors (the lab's runs: 30 s), and a heartbeat
/// that notices a silent node (pulled cable, frozen process) within a second.
pub fn client_config(servers: &[String], name: &str, failover: Duration) -> ClientConfig {
    ClientConfig::new(servers.iter().cloned())
        .client_name(name)
        .failover_timeout(failover)
        .heartbeat_interval(Duration::from_millis(200))
        .heartbeat_timeout(Duration::from_millis(1000))
        .connect_timeout(Duration::from_secs(2))
}

/// `cable-lab workload`: run until stopped, then drain and exit.
pub async fn run(args: WorkloadArgs) -> anyhow::Result<()> {
    let rec = JsonLines::create(&args.out)?;
    let result = run_inner(&args, &rec).await;
    if let Err(e) = &result {
        rec.write(&json!({"ev": "error", "t": now_us(), "who": "workload", "text": format!("{e:#}")}));
    }
    rec.flush();
    result
}

async fn run_inner(args: &WorkloadArgs, rec: &JsonLines) -> anyhow::Result<()> {
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    // A plain thread: stdin is blocking.
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) if l.trim() == "stop" => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        s.store(true, Ordering::Relaxed);
    });

    let failover = Duration::from_secs(args.failover_timeout_s);
    let producer_client = Client::connect(client_config(&args.servers, "lab-producer", failover).window(args.window))
        .await
        .context("producer: connect")?;
    let consumer_client =
        Client::connect(client_config(&args.servers, "lab-consumer", failover)).await.context("consumer: connect")?;
    for (client, who) in [(&producer_client, "producer"), (&consumer_client, "consumer")] {
        let mut events = client.events();
        let rec = rec.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(e) => {
                        let gave_up = matches!(e, ClientEvent::GaveUp { .. });
                        rec.write(&json!({"ev": "client", "t": now_us(), "who": who, "text": e.to_string()}));
                        if gave_up {
                            rec.write(&json!({"ev": "error", "t": now_us(), "who": who, "text": e.to_string()}));
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        rec.write(
                            &json!({"ev": "client", "t": now_us(), "who": who, "text": format!("({n} events missed)")}),
                        );
                    }
                    Err(_) => break,
                }
            }
        });
    }

    // Consumer: ack everything, record every delivery.
    let dest = Destination::queue(args.queue.clone());
    let received: Arc<Mutex<HashSet<String>>> = Arc::default();
    let last_delivery = Arc::new(Mutex::new(Instant::now()));
    let consuming = consume(&consumer_client, dest.clone(), &received, &last_delivery, rec).await?;

    // Confirms resolve in send order: one task awaits them in that order.
    let confirmed: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (confirm_tx, mut confirm_rx) = tokio::sync::mpsc::unbounded_channel::<(String, u64, twinmq_client::Confirm)>();
    let (c, pc, crec) = (confirmed.clone(), producer_client.clone(), rec.clone());
    let confirming = tokio::spawn(async move {
        let mut first = true;
        while let Some((id, sent, confirm)) = confirm_rx.recv().await {
            match confirm.await {
                Ok(_) => {
                    let node = pc.server().node_id;
                    crec.write(&json!({"ev": "ok", "t": now_us(), "id": id, "sent": sent, "node": node}));
                    c.lock().expect("confirmed lock").insert(id);
                    if first {
                        crec.write(&json!({"ev": "ready", "t": now_us()}));
                        first = false;
                    }
                }
                Err(e) => {
                    crec.write(&json!({"ev": "error", "t": now_us(), "who": "producer", "text": format!("confirm of {id}: {e}")}));
                }
            }
        }
    });

    // Producer: a steady pace of numbered messages.
    let producer = producer_client.producer(dest);
    let slow_dest = Destination::queue(format!("{}.slow", args.queue));
    let slow = (args.slow_every > 0).then(|| producer_client.producer(slow_dest.clone()));
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1))));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let limit = Duration::from_secs(args.max_seconds);
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) && sent < args.max_messages && started.elapsed() < limit {
        // A slow message goes out right after seven busy ones, so that it
        // shares a record with some (which their acks leave mostly dead).
        let burst = args.slow_every > 7 && sent % args.slow_every > args.slow_every - 8;
        if !burst {
            pace.tick().await;
        }
        let id = format!("m{sent}");
        let mut body = format!("{id} ").into_bytes();
        body.resize(args.size.max(body.len()), b'.');
        let t = now_us();
        rec.write(&json!({"ev": "sent", "t": t, "id": id}));
        let to = match &slow {
            Some(slow) if sent % args.slow_every == args.slow_every - 1 => slow,
            _ => &producer,
        };
        match to.send_nowait(Message::persistent(body)).await {
            Ok(confirm) => {
                let _ = confirm_tx.send((id, t, confirm));
            }
            Err(e) => {
                rec.write(
                    &json!({"ev": "error", "t": now_us(), "who": "producer", "text": format!("send of {id}: {e}")}),
                );
                break;
            }
        }
        sent += 1;
    }
    drop(confirm_tx);
    // Every confirm resolves or fails within failover_timeout.
    tokio::time::timeout(Duration::from_secs(60), confirming).await.context("confirms outstanding after 60 s")??;

    // The slow queue is consumed now.
    let slow_consuming = match slow {
        Some(_) => Some(consume(&consumer_client, slow_dest, &received, &last_delivery, rec).await?),
        None => None,
    };
    // Drain: until every confirmed message arrived and deliveries went quiet,
    // or nothing arrived for 10 s (a lost message never arrives), at most 60 s.
    let drain_start = Instant::now();
    loop {
        let all_in = {
            let got = received.lock().expect("received lock");
            confirmed.lock().expect("confirmed lock").iter().all(|id| got.contains(id))
        };
        let quiet = last_delivery.lock().expect("delivery time lock").elapsed();
        if (all_in && quiet > Duration::from_millis(500))
            || quiet > Duration::from_secs(10)
            || drain_start.elapsed() > Duration::from_secs(60)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consuming.abort();
    if let Some(c) = slow_consuming {
        c.abort();
    }
    let (nc, nr) = (confirmed.lock().expect("lock").len(), received.lock().expect("lock").len());
    rec.write(&json!({"ev": "done", "t": now_us(), "sent": sent, "confirmed": nc, "received": nr}));
    let _ = tokio::time::timeout(Duration::from_secs(5), producer_client.close()).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), consumer_client.close()).await;
    Ok(())
}

/// Consume `dest`, acking everything and recording every delivery. If the
/// broker ends the subscription with an error (it should not during a
/// failover), the error is recorded (the checker fails the run on it) and
/// the consumer subscribes again, so that the loss count stays a true one.
async fn consume(
    client: &Client,
    dest: Destination,
    received: &Arc<Mutex<HashSet<String>>>,
    last_delivery: &Arc<Mutex<Instant>>,
    rec: &JsonLines,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let options = SubscribeOptions::default().prefetch(64);
    let mut consumer = client.subscribe(dest.clone(), options.clone()).await.context("consumer: subscribe")?;
    let (r, last, crec, cclient, cdest) = (received.clone(), last_delivery.clone(), rec.clone(), client.clone(), dest);
    Ok(tokio::spawn(async move {
        let mut resubscribes = 0;
        loop {
            while let Some(d) = consumer.recv().await {
                let d = match d {
                    Ok(d) => d,
                    Err(e) => {
                        crec.write(&json!({"ev": "error", "t": now_us(), "who": "consumer", "text": e.to_string()}));
                        break;
                    }
                };
                let payload = String::from_utf8_lossy(d.payload());
                let id = payload.split(' ').next().unwrap_or_default().to_string();
                let (redelivered, mid) = (d.message().redelivered, d.message().id);
                crec.write(&json!({"ev": "recv", "t": now_us(), "id": id, "redelivered": redelivered, "epoch": mid.epoch(), "seq": mid.seq()}));
                r.lock().expect("received lock").insert(id.clone());
                *last.lock().expect("delivery time lock") = Instant::now();
                match d.ack().await {
                    Ok(()) => {}
                    // Between connections: the message comes back (at-least-once), not an error.
                    Err(twinmq_client::ClientError::NotSettled { reason }) => {
                        crec.write(&json!({"ev": "ack-not-sent", "t": now_us(), "id": id, "reason": reason}));
                    }
                    Err(e) => {
                        crec.write(
                            &json!({"ev": "error", "t": now_us(), "who": "consumer", "text": format!("ack: {e}")}),
                        );
                    }
                }
            }
            resubscribes += 1;
            if resubscribes > 100 {
                break;
            }
            consumer = match cclient.subscribe(cdest.clone(), options.clone()).await {
                Ok(c) => c,
                Err(e) => {
                    crec.write(&json!({"ev": "error", "t": now_us(), "who": "consumer", "text": format!("subscribe again: {e}")}));
                    break;
                }
            };
        }
    }))
}

/// The lab's handle on a running workload process.
pub struct Workload {
    child: Child,
    stdin: Option<ChildStdin>,
    pub out: PathBuf,
    tail: LineTail,
    /// Every record read so far, in file order.
    pub records: Vec<serde_json::Value>,
    /// How many of `records` `new_client_events` has looked at.
    seen: usize,
}

impl Workload {
    /// Start it in the client namespace (`command`: `ip netns exec ... cable-lab`).
    pub fn spawn(mut command: std::process::Command, args: &WorkloadArgs, log: &Path) -> anyhow::Result<Workload> {
        let log = std::fs::File::create(log)?;
        let mut child = command
            .args(args.to_args())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start the workload")?;
        let stdin = child.stdin.take();
        Ok(Workload {
            child,
            stdin,
            out: args.out.clone(),
            tail: LineTail::new(&args.out),
            records: Vec::new(),
            seen: 0,
        })
    }

    /// Read what the workload wrote since the last call.
    pub fn refresh(&mut self) {
        for line in self.tail.read() {
            if let Ok(v) = serde_json::from_str(&line) {
                self.records.push(v);
            }
        }
    }

    fn errors(&self) -> Vec<String> {
        self.records.iter().filter(|r| r["ev"] == "error").map(|r| r["text"].to_string()).collect()
    }

    /// Wait for the first message to go round.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.refresh();
            if self.records.iter().any(|r| r["ev"] == "ready") {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("the workload exited ({status}) before it was ready: {:?}", self.errors());
            }
            if Instant::now() > deadline {
                bail!("the workload was not ready within {timeout:?}: {:?}", self.errors());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first confirm of a message sent at or after `t` (microseconds):
    /// its confirm time.
    pub fn first_confirm_sent_after(&self, t: u64) -> Option<u64> {
        self.records
            .iter()
            .filter(|r| r["ev"] == "ok" && r["sent"].as_u64().is_some_and(|s| s >= t))
            .filter_map(|r| r["t"].as_u64())
            .next()
    }

    /// Wait until a message sent after `t` is confirmed; returns how long
    /// after `t` its confirm came.
    pub fn wait_confirm_after(&mut self, t: u64, timeout: Duration) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            self.refresh();
            if let Some(c) = self.first_confirm_sent_after(t) {
                return Ok(Duration::from_micros(c.saturating_sub(t)));
            }
            if Instant::now() > deadline {
                bail!(
                    "no message sent after the last event was confirmed within {timeout:?}; errors: {:?}",
                    self.errors()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Client events (`who: text`) not returned before.
    pub fn new_client_events(&mut self) -> Vec<(u64, String)> {
        self.refresh();
        let new = self.records[self.seen..]
            .iter()
            .filter(|r| r["ev"] == "client" || r["ev"] == "error")
            .map(|r| {
                let who = r["who"].as_str().unwrap_or("?");
                let text = r["text"].as_str().unwrap_or("?");
                let prefix = if r["ev"] == "error" { "ERROR " } else { "" };
                (r["t"].as_u64().unwrap_or(0), format!("{prefix}{who}: {text}"))
            })
            .collect();
        self.seen = self.records.len();
        new
    }

    /// Confirmed so far.
    pub fn confirmed(&self) -> usize {
        self.records.iter().filter(|r| r["ev"] == "ok").count()
    }

    /// Tell it to stop, and wait for its drain to finish.
    pub fn stop(&mut self, timeout: Duration) -> anyhow::Result<()> {
        if let Some(mut stdin) = self.stdin.take() {
            use std::io::Write;
            let _ = writeln!(stdin, "stop");
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.refresh();
                if !status.success() {
                    bail!("the workload exited with {status}: {:?}", self.errors());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.refresh();
                bail!("the workload did not finish within {timeout:?} of the stop");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
