//! `cable-lab`: the cable-pull lab for a twinmq pair (root only).
//!
//! ```text
//! cable-lab demo                 build the lab, run a load, walk through the faults
//! cable-lab up                   build the lab and keep it, with a command prompt
//! cable-lab pull a-switch        (another terminal) a command for the running lab
//! cable-lab nemesis --faults N --seed S [--dir DIR] [--failback manual|auto]
//!                                N faults in an order the seed chooses, then the checker
//! cable-lab clean                remove labs left behind by a killed cable-lab
//! cable-lab check DIR            run the checker on a run's files
//! ```
//!
//! `nemesis` mixes every fault of the lab under a steady load: pulled
//! cables (any combination), `kill -9` of the active, the passive or both
//! (restarted in random order, one often alone past the takeover delay),
//! freezes shorter and longer than `peer_timeout`, the stale passive
//! (frozen past `peer_timeout`, then the active killed), wiped disks while
//! the other node serves, and, where faultfs can mount (root, `/dev/fuse`),
//! failing disks (EIO, ENOSPC, read-only, full, stalled fsyncs), some
//! overlapping, each repaired after a random hold. It prints one line per
//! fault and the checker's report (lost, never sent, duplicates, two
//! actives, promotions lacking confirmed messages, stuck), keeps the run's
//! files in `--dir` (or, if it fails, in the temporary directory it names)
//! and exits 1 on any violation. See `twinmq_examples::netlab::nemesis`.
//!
//! The same binary is every process of the lab: `broker ARGS` (the daemon),
//! `gateway-serve`, `monitor` and `workload` are started by the lab itself
//! under `ip netns exec`. See `twinmq_examples::netlab` for the topology.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use twinmq_examples::netlab::lab::{Lab, LabOptions, Node, Timings};
use twinmq_examples::netlab::{checker, demo, lab, monitor, nemesis, net, operator, proc, workload};

#[derive(Parser, Debug)]
#[command(name = "cable-lab", about = "the twinmq cable-pull lab (network namespaces; needs root)", after_help = operator::HELP)]
struct Cli {
    /// The running lab a command is for (its tag; default: the only one).
    #[arg(long, global = true)]
    lab: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build the lab, start a load, pull cables, kill and freeze nodes, report.
    Demo {
        /// Keep the run's files (logs, data, records) in DIR.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Build the lab and keep it running with a command prompt (`help` lists the commands).
    Up {
        /// Keep the run's files in DIR (default: a temporary directory removed at exit).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// `auto`: the preferred node (a) takes the role back once caught up.
        #[arg(long, default_value = "manual")]
        failback: String,
        /// Start the producer/consumer load at once.
        #[arg(long)]
        load: bool,
    },
    /// Build the lab, start a load, inject N faults in an order the seed chooses, check.
    Nemesis {
        /// Faults to inject (a second fault overlapping a first counts as one more).
        #[arg(long)]
        faults: usize,
        /// Seed of the fault order, targets and timings.
        #[arg(long)]
        seed: u64,
        /// Keep the run's files in DIR (default: a temporary directory, kept only if the run fails).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// `auto`: the preferred node (a) takes the role back once caught up.
        #[arg(long, default_value = "manual", value_parser = ["manual", "auto"])]
        failback: String,
        /// The brokers' disk_stall_ms: a flush slower than this counts as a failed disk.
        #[arg(long, default_value_t = nemesis::DISK_STALL_MS)]
        disk_stall_ms: u64,
        /// Fault kinds to leave out, comma-separated: pull-one, pull-several, kill-active,
        /// kill-passive, kill-both, kill-staggered, freeze-active, freeze-passive,
        /// stale-passive, wipe-passive, wipe-active, disk-active, disk-passive.
        #[arg(long, value_delimiter = ',')]
        exclude: Vec<String>,
    },
    /// Remove the namespaces (and their processes) of labs whose cable-lab is gone.
    Clean {
        /// Every lab's namespaces, running or not.
        #[arg(long)]
        all: bool,
    },
    /// Run the checker on the files of a run.
    Check { dir: PathBuf },
    #[command(hide = true)]
    GatewayServe { port: u16 },
    #[command(hide = true)]
    Monitor {
        #[arg(long)]
        node: String,
        #[arg(long)]
        addr: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
    },
    #[command(hide = true)]
    Workload(workload::WorkloadArgs),
    /// A command for the running lab: pull, replug, kill, restart, freeze, thaw, netem, status, load, report.
    #[command(external_subcommand)]
    Lab(Vec<String>),
}

fn main() {
    // `broker ARGS`: the daemon itself, ending with the lab that started it.
    twinmq_examples::lab::run_as_broker_if_asked(proc::exit_with_parent);
    let cli = Cli::parse();
    twinmq_examples::lab::init_tracing();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cable-lab: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Cmd::GatewayServe { port } => {
            proc::exit_with_parent();
            gateway_serve(port)
        }
        Cmd::Monitor { node, addr, out, interval_ms } => {
            proc::exit_with_parent();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(monitor::run(&node, &addr, &out, Duration::from_millis(interval_ms)))?;
            Ok(0)
        }
        Cmd::Workload(args) => {
            proc::exit_with_parent();
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(workload::run(args))?;
            Ok(0)
        }
        Cmd::Demo { dir } => {
            if let Err(e) = net::preflight() {
                println!("cable-lab demo: {e}");
                return Ok(1);
            }
            let (opts, _tmp) = options(dir, true)?;
            let passed = demo::run(opts)?;
            Ok(if passed { 0 } else { 1 })
        }
        Cmd::Up { dir, failback, load } => {
            net::preflight()?;
            let (opts, _tmp) = options(dir, failback == "auto")?;
            let tag = opts.tag.clone();
            let files = opts.dir.clone();
            println!("building lab {tag} (namespaces {}-{tag}-*; files in {})", net::PREFIX, files.display());
            let mut lab = Lab::start(opts)?;
            lab.wait_stable(Node::A, proc::now_us(), Duration::from_secs(30))?;
            let mut session = operator::Session { lab, workload: None };
            println!("{}", session.execute(operator::Op::Status)?);
            if load {
                println!("{}", session.execute(operator::Op::LoadStart)?);
            }
            println!("type `help` for the commands; from another terminal: cable-lab --lab {tag} pull a-switch");
            operator::serve(session, &|line| println!("{line}"))?;
            println!("tearing lab {tag} down");
            Ok(0)
        }
        Cmd::Nemesis { faults, seed, dir, failback, disk_stall_ms, exclude } => {
            if let Err(e) = net::preflight() {
                println!("cable-lab nemesis: {e}");
                return Ok(1);
            }
            let (opts, tmp) = options(dir, failback == "auto")?;
            let n = nemesis::Options { disk_stall_ms, exclude, ..nemesis::Options::new(faults, seed) };
            let outcome = nemesis::run(opts, &n)?;
            print!("{}", outcome.report);
            println!("fault mix ({} faults in {} rounds):", outcome.faults, outcome.rounds);
            for (kind, n) in &outcome.mix {
                println!("  {n:5}  {kind}");
            }
            if let Some(why) = &outcome.disks_skipped {
                println!("SKIPPED: disk faults: {why}");
            }
            for (round, what) in &outcome.stuck_rounds {
                println!("STUCK after round {round}: the nemesis then did as an operator would: {what}");
            }
            if let Some(why) = &outcome.aborted {
                println!("the run stopped early: {why}");
            }
            println!(
                "nemesis | seed | faults | confirmed | lost | never sent | duplicates | double-active | stuck | promotions checked | lacking | wall | verdict"
            );
            println!("nemesis | {}", outcome.summary_line(seed));
            let passed = outcome.passed();
            if let (false, Some(tmp)) = (passed, tmp) {
                println!("files kept in {}", tmp.keep().display());
            }
            Ok(if passed { 0 } else { 1 })
        }
        Cmd::Clean { all } => {
            let tags: Vec<String> = if all {
                let every: std::collections::BTreeSet<String> = net::existing_namespaces()
                    .into_iter()
                    .filter_map(|ns| {
                        ns.strip_prefix(&format!("{}-", net::PREFIX))?.rsplit_once('-').map(|(t, _)| t.to_string())
                    })
                    .collect();
                every.into_iter().collect()
            } else {
                net::stale_tags()
            };
            // Control sockets of labs that are gone.
            let alive = net::existing_namespaces();
            for sock in std::fs::read_dir(operator::SOCKET_DIR).into_iter().flatten().flatten() {
                let path = sock.path();
                let tag = path.file_stem().map(|t| t.to_string_lossy().into_owned()).unwrap_or_default();
                if all || !alive.iter().any(|ns| ns.starts_with(&format!("{}-{tag}-", net::PREFIX))) {
                    let _ = std::fs::remove_file(&path);
                }
            }
            // Data directories left on faultfs by a nemesis that was killed.
            for mount in lab::stale_disk_mounts() {
                match twinmq_examples::faultfs::umount(&mount) {
                    Ok(()) => println!("unmounted the stale faultfs at {}", mount.display()),
                    Err(e) => println!("could not unmount {}: {e:#}", mount.display()),
                }
            }
            if tags.is_empty() {
                println!("no lab namespaces to clean");
            }
            for tag in tags {
                net::destroy(&tag);
                println!("removed lab {tag}");
            }
            Ok(0)
        }
        Cmd::Check { dir } => {
            let report = checker::check(&dir, &dir.display().to_string());
            print!("{report}");
            Ok(if report.passed() { 0 } else { 1 })
        }
        Cmd::Lab(words) => {
            println!("{}", operator::send(cli.lab.as_deref(), &words)?);
            Ok(0)
        }
    }
}

/// Lab options for the operator's runs: the tag is our pid (so `clean` can
/// tell a lab whose process is gone), default timings, files in `dir` or in
/// a temporary directory that lives as long as the returned guard.
fn options(dir: Option<PathBuf>, failback_auto: bool) -> anyhow::Result<(LabOptions, Option<tempfile::TempDir>)> {
    let tag = std::process::id().to_string();
    let (dir, tmp) = match dir {
        Some(d) => (d, None),
        None => {
            let t = tempfile::Builder::new().prefix("cable-lab-").tempdir()?;
            net::remove_on_signal(t.path());
            (t.path().to_path_buf(), Some(t))
        }
    };
    let exe = std::env::current_exe()?;
    Ok((LabOptions { tag, dir, exe, timings: Timings::DEFAULT, failback_auto }, tmp))
}

/// The gateway host's TCP port: accept and close, forever.
fn gateway_serve(port: u16) -> anyhow::Result<i32> {
    let listener = std::net::TcpListener::bind(("0.0.0.0", port))?;
    for conn in listener.incoming() {
        drop(conn);
    }
    Ok(0)
}
