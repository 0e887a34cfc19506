//! Failover time, as a client sees it: from the fault (SIGKILL or SIGSTOP of
//! the active process) to the first confirmed send on the new active.
//!
//! `cargo run --release -p twinmq-examples --bin failover-bench -- --kind kill --runs 20`
//! Prints each run and the median and max; checks at the end that no
//! confirmed message was lost. Measures, asserts no timing.

use twinmq_examples::lab;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use twinmq_client::{Client, ClientEvent, Destination, Message, SubscribeOptions};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Kind {
    /// kill -9 of the active process (its host stays up: the fast path).
    Kill,
    /// SIGSTOP of the active process (a silent failure: the lease wait).
    Freeze,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Speed {
    /// DESIGN.md defaults: heartbeat 100 ms, peer_timeout 1 s, takeover_delay 1.5 s.
    Default,
    /// Heartbeat 20 ms, peer_timeout 150 ms, isolation 150 ms, takeover_delay 200 ms.
    Tight,
}

#[derive(Parser, Debug)]
#[command(about = "measure twinmq failover time as a client sees it")]
struct Args {
    #[arg(long, value_enum, default_value = "kill")]
    kind: Kind,
    #[arg(long, value_enum, default_value = "default")]
    timings: Speed,
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Messages of 1 KiB stored (queue `backlog`, no consumer) before the
    /// first fault: failover time with a backlog (issue 11).
    #[arg(long, default_value_t = 0)]
    backlog: u64,
    /// How long to wait for the killed node to rejoin in sync, seconds.
    #[arg(long, default_value_t = 20)]
    rejoin_secs: u64,
    /// After the backlog: kill -9 the passive, wipe its data directory,
    /// restart it, and report its catch-up (time to in sync, the snapshot's
    /// MB/s, peak RSS of both nodes meanwhile).
    #[arg(long)]
    fresh_passive: bool,
    /// After the backlog: kill -9 the passive (its data kept), store this
    /// many more 1 KiB messages, restart it, and report its catch-up (time
    /// to in sync, peak RSS of both nodes meanwhile).
    #[arg(long, default_value_t = 0)]
    returning_passive: u64,
}

fn main() -> anyhow::Result<()> {
    lab::run_as_broker_if_asked(|| {});
    let args = Args::parse();
    lab::init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(bench(args))
}

/// Store `n` messages of 1 KiB in queue `backlog` (256 in flight).
async fn fill(pair: &lab::Pair, n: u64) -> anyhow::Result<()> {
    let filler = Client::connect(pair.client_config().window(256)).await?;
    let producer = filler.producer(Destination::queue("backlog"));
    let body = vec![b'b'; 1024];
    let mut pending = std::collections::VecDeque::new();
    for _ in 0..n {
        pending.push_back(producer.send_nowait(Message::persistent(body.clone())).await?);
        while pending.len() >= 256 {
            pending.pop_front().expect("non-empty").await?;
        }
    }
    for c in pending {
        c.await?;
    }
    Ok(())
}

/// Wait for b to be in sync, sampling both nodes' RSS every 50 ms: the peaks, KiB.
async fn until_in_sync(pair: &lab::Pair, started: Instant, timeout: Duration) -> anyhow::Result<(u64, u64)> {
    let (mut peak_a, mut peak_b) = (0, 0);
    loop {
        peak_a = peak_a.max(pair.a.rss_kib());
        peak_b = peak_b.max(pair.b.rss_kib());
        if pair.b.wait_in_sync_passive(Duration::from_millis(50)).await.is_ok() {
            return Ok((peak_a, peak_b));
        }
        if started.elapsed() > timeout {
            bail!("b was not in sync within {timeout:?}");
        }
    }
}

/// A wiped passive catches up: kill -9 of b, its data directory removed, b
/// started again; peak RSS of both sampled every 50 ms until b is in sync.
async fn fresh_passive(pair: &mut lab::Pair, timeout: Duration) -> anyhow::Result<()> {
    pair.b.kill9();
    std::fs::remove_dir_all(&pair.b.data_dir).context("wipe b's data directory")?;
    let started = Instant::now();
    pair.b.start()?;
    let (peak_a, peak_b) = until_in_sync(pair, started, timeout).await?;
    println!(
        "fresh passive: wiped b in sync {:.1} s after its restart; peak RSS a {} MiB, b {} MiB",
        started.elapsed().as_secs_f64(),
        peak_a / 1024,
        peak_b / 1024
    );
    print_catch_up(&pair.a, &pair.b);
    Ok(())
}

/// The log lines that tell how `passive` caught up from `active` (a
/// snapshot or a catch-up from the log: sizes and rates), and its store's opening.
fn print_catch_up(active: &lab::Node, passive: &lab::Node) {
    for (node, what) in [
        (passive, "store opened"),
        (active, "snapshot sent to the peer"),
        (passive, "snapshot from the peer loaded"),
        (passive, "dropped this store's own ops past the fork"),
        (passive, "asking the active for the records this store's own ops changed"),
        (passive, "index read again after dropping this store's own ops"),
        (active, "the peer's catch-up from the log sent"),
        (passive, "caught up from the active's log"),
    ] {
        let log = node.data_dir.with_file_name(format!("{}-{}.log", node.name, node.starts()));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().rev().find(|l| l.contains(what)) {
            println!("  {}: {}", node.name, line.split_once("Z ").map_or(line, |(_, rest)| rest).trim());
        }
    }
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let timings = match args.timings {
        Speed::Default => lab::Timings::DEFAULT,
        Speed::Tight => lab::Timings::TIGHT,
    };
    let mut pair = lab::Pair::start(timings, &[])?;
    pair.a.wait_active(Duration::from_secs(10)).await?;
    pair.b.wait_in_sync_passive(Duration::from_secs(10)).await?;

    if args.backlog > 0 {
        let started = Instant::now();
        fill(&pair, args.backlog).await?;
        let secs = started.elapsed().as_secs_f64();
        println!("backlog: {} x 1 KiB stored in {secs:.1} s ({:.0} msgs/s)", args.backlog, args.backlog as f64 / secs);
        for n in [&pair.a, &pair.b] {
            println!("  {}: RSS {} MiB", n.name, n.rss_kib() / 1024);
        }
        pair.b.wait_in_sync_passive(Duration::from_secs(60)).await?;
    }
    if args.fresh_passive {
        fresh_passive(&mut pair, Duration::from_secs(args.rejoin_secs)).await?;
    }
    if args.returning_passive > 0 {
        pair.b.kill9();
        fill(&pair, args.returning_passive).await?;
        let started = Instant::now();
        pair.b.start()?;
        let (peak_a, peak_b) = until_in_sync(&pair, started, Duration::from_secs(args.rejoin_secs)).await?;
        println!(
            "returning passive: b, down while {} messages were stored, in sync {:.1} s after its restart; peak RSS a {} MiB, b {} MiB",
            args.returning_passive,
            started.elapsed().as_secs_f64(),
            peak_a / 1024,
            peak_b / 1024
        );
        print_catch_up(&pair.a, &pair.b);
    }

    // The client notices a silent broker by its own heartbeat; scale it with the pair's.
    let (hb, hb_timeout) = match args.timings {
        Speed::Default => (Duration::from_millis(250), Duration::from_millis(1500)),
        Speed::Tight => (Duration::from_millis(30), Duration::from_millis(150)),
    };
    let client = Client::connect(
        pair.client_config()
            .window(16)
            .heartbeat_interval(hb)
            .heartbeat_timeout(hb_timeout)
            .failover_timeout(Duration::from_secs(30)),
    )
    .await?;
    let mut events = client.events();
    let reconnects: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let r = reconnects.clone();
    tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            if matches!(e, ClientEvent::Connected { .. }) {
                r.lock().expect("lock").push(Instant::now());
            }
        }
    });

    // A steady producer: confirms recorded with their time.
    let confirms: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let producer = client.producer(Destination::queue("failover"));
    let (c, s) = (confirms.clone(), stop.clone());
    let sender = tokio::spawn(async move {
        let mut pending = std::collections::VecDeque::new();
        let mut i = 0u64;
        while !s.load(Ordering::Relaxed) {
            let body = format!("f-{i}");
            i += 1;
            pending.push_back((body.clone(), producer.send_nowait(Message::persistent(body)).await?));
            while pending.len() >= 8 {
                let (body, confirm) = pending.pop_front().expect("non-empty");
                confirm.await?;
                c.lock().expect("lock").push((Instant::now(), body));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for (body, confirm) in pending {
            confirm.await?;
            c.lock().expect("lock").push((Instant::now(), body));
        }
        anyhow::Ok(())
    });

    let mut times = Vec::new();
    for run in 1..=args.runs {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let Some(active) = pair.active().await.map(|n| n.name.clone()) else {
            bail!("run {run}: no single active node")
        };
        let (victim, survivor) = if active == pair.a.name { (&mut pair.a, &pair.b) } else { (&mut pair.b, &pair.a) };
        let fault = Instant::now();
        match args.kind {
            Kind::Kill => victim.kill9(),
            Kind::Freeze => victim.signal("STOP"),
        }
        // The first confirm after the client reconnected, as the client saw it.
        let deadline = fault + Duration::from_secs(20);
        let took = loop {
            let reconnected = reconnects.lock().expect("lock").iter().copied().find(|t| *t > fault);
            if let Some(rc) = reconnected {
                if let Some((t, _)) = confirms.lock().expect("lock").iter().find(|(t, _)| *t >= rc) {
                    break t.duration_since(fault);
                }
            }
            if Instant::now() > deadline {
                bail!("run {run}: no confirmed send within 20 s of the fault");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let survivor_role = survivor.role().await;
        println!(
            "run {run:2}: {:?} of {active} -> first confirm on {} after {:>7.1} ms",
            args.kind,
            survivor.name,
            took.as_secs_f64() * 1e3
        );
        if !survivor_role.starts_with("active") {
            bail!("run {run}: {} is {survivor_role}, not active", survivor.name);
        }
        times.push(took);
        // Bring the victim back as the in-sync passive.
        let victim_name = victim.name.clone();
        match args.kind {
            Kind::Kill => victim.start()?,
            Kind::Freeze => victim.signal("CONT"),
        }
        let victim = if victim_name == pair.a.name { &pair.a } else { &pair.b };
        let rejoin = Instant::now();
        victim
            .wait_in_sync_passive(Duration::from_secs(args.rejoin_secs))
            .await
            .with_context(|| format!("run {run}: rejoin"))?;
        if args.backlog > 0 {
            println!(
                "        {victim_name} restarted -> in sync in {:.1} s; RSS {} MiB, {} {} MiB",
                rejoin.elapsed().as_secs_f64(),
                victim.rss_kib() / 1024,
                survivor.name,
                survivor.rss_kib() / 1024
            );
            print_catch_up(survivor, victim);
        }
    }

    stop.store(true, Ordering::Relaxed);
    sender.await??;
    let confirmed: HashSet<String> = confirms.lock().expect("lock").iter().map(|(_, b)| b.clone()).collect();
    let consumer_client = Client::connect(pair.client_config()).await?;
    let mut consumer =
        consumer_client.subscribe(Destination::queue("failover"), SubscribeOptions::default().prefetch(1024)).await?;
    let mut received = HashSet::new();
    let mut deliveries = 0usize;
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await {
        deliveries += 1;
        received.insert(String::from_utf8_lossy(d.payload()).into_owned());
        match d.ack().await {
            // Not sent while the client reconnects: it comes back (at-least-once).
            Ok(()) | Err(twinmq_client::ClientError::NotSettled { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let lost = confirmed.difference(&received).count();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median = times[times.len() / 2];
    println!(
        "failover kind={:?} timings={:?} runs={} median={:.1}ms max={:.1}ms min={:.1}ms confirmed={} delivered={} duplicates={} lost={}",
        args.kind,
        args.timings,
        times.len(),
        ms(median),
        ms(*times.last().expect("runs > 0")),
        ms(times[0]),
        confirmed.len(),
        deliveries,
        deliveries - received.len(),
        lost
    );
    if lost > 0 {
        bail!("{lost} confirmed messages lost");
    }
    Ok(())
}
