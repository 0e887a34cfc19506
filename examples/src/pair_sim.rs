//! `pair-sim`: the pair's deterministic simulator (`twinmq_ha::sim`) for
//! long runs: many seeds, each a different order of faults, across all
//! cores. Prints what ran and what it checked; on the first broken
//! invariant, prints the seed's replay (the last events before it) and
//! exits 1. `--replay SEED` runs one seed again with its trace.
//!
//! ```sh
//! cargo run --release -p twinmq-examples --bin pair-sim -- --seeds 100000
//! cargo run --release -p twinmq-examples --bin pair-sim -- --replay 4242
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Parser;
use twinmq_ha::sim::{run, SimConfig, SimStats, Violation};
use twinmq_store::Durability;

#[derive(Debug, Parser)]
#[command(name = "pair-sim", about = "Run the pair simulator over many seeds (or replay one)")]
struct Args {
    /// How many seeds to run.
    #[arg(long, default_value_t = 10_000)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Steps (5 simulated ms each) with faults, per seed; then the pair settles.
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    /// Chance of a new fault per step.
    #[arg(long, default_value_t = 0.01)]
    fault_rate: f64,
    /// The pair's durability: replicated (promotions checked) or local.
    #[arg(long, default_value = "replicated")]
    durability: Durability,
    /// Threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Run this one seed with its trace and print it.
    #[arg(long)]
    replay: Option<u64>,
    /// How many of the last events a replay prints.
    #[arg(long, default_value_t = 400)]
    trace_lines: usize,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let cfg = SimConfig {
        steps: args.steps,
        fault_rate: args.fault_rate,
        durability: args.durability,
        trace_lines: args.trace_lines,
        ..SimConfig::default()
    };
    if let Some(seed) = args.replay {
        return match run(seed, &cfg, true) {
            Ok(s) => {
                println!(
                    "seed {seed}: no invariant broken ({} steps, {} faults, {} confirmed)",
                    s.steps, s.faults, s.confirmed
                );
                std::process::ExitCode::SUCCESS
            }
            Err(v) => {
                print!("{v}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(args.first));
    let end = args.first + args.seeds;
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(Mutex::new(SimStats::default()));
    let failure: Arc<Mutex<Option<Violation>>> = Arc::default();
    let done = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (next, stop, total, failure, done, cfg) =
                (next.clone(), stop.clone(), total.clone(), failure.clone(), done.clone(), cfg.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= end {
                        break;
                    }
                    match run(seed, &cfg, false) {
                        Ok(s) => {
                            let mut t = total.lock().unwrap_or_else(|p| p.into_inner());
                            t.steps += s.steps;
                            t.faults += s.faults;
                            t.confirmed += s.confirmed;
                            t.promotions += s.promotions;
                            t.splits += s.splits;
                            t.destroyed += s.destroyed;
                            t.catchups += s.catchups;
                            t.snapshots += s.snapshots;
                        }
                        Err(_) => {
                            stop.store(true, Ordering::Relaxed);
                            // Replayed with its trace for the report.
                            let v = run(seed, &cfg, true).err();
                            failure
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert_with(|| v.expect("replays"));
                        }
                    }
                    let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if n % (args.seeds / 10).max(1) == 0 {
                        eprintln!("{n} of {} seeds ({:.0?})", args.seeds, started.elapsed());
                    }
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let t = total.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(v) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        print!("{v}");
        println!("replay: pair-sim --replay {} --steps {} --durability {}", v.seed, args.steps, args.durability);
        return std::process::ExitCode::FAILURE;
    }
    println!(
        "{} seeds ({}..{}), durability {}: {} steps ({} simulated s), {} faults, {} confirmed messages, {} promotions, {} splits, {} messages only on a wiped disk, {} catch-ups from the log, {} snapshots; every invariant held ({:.1?}, {threads} threads)",
        args.seeds,
        args.first,
        end - 1,
        args.durability,
        t.steps,
        t.steps * 5 / 1000,
        t.faults,
        t.confirmed,
        t.promotions,
        t.splits,
        t.destroyed,
        t.catchups,
        t.snapshots,
        started.elapsed()
    );
    std::process::ExitCode::SUCCESS
}
