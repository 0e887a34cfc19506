//! `faultfs`: a fault-injecting FUSE passthrough for disk-fault tests (see
//! `twinmq_examples::faultfs`).
//!
//! ```text
//! faultfs mount --backing DIR --mountpoint MNT --control SOCKET [--threads N] [--attr-ttl-ms MS]
//! faultfs ctl SOCKET ok|eio|enospc|readonly|stall MS [writes]|full BYTES|status
//! faultfs umount MNT
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use twinmq_examples::faultfs;

/// fuser logs at warn a redundant umount(2) it tries after the session ends
/// (EINVAL, the mount is already gone).
const DEFAULT_LOG: &str = "warn,fuser=error";

#[derive(Parser)]
#[command(name = "faultfs", about = "Fault-injecting FUSE passthrough (run as root)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve DIR at MNT until unmounted or sent SIGTERM/SIGINT/SIGHUP.
    Mount {
        /// Directory whose contents are served.
        #[arg(long)]
        backing: PathBuf,
        /// Empty directory to mount on.
        #[arg(long)]
        mountpoint: PathBuf,
        /// Unix socket for `faultfs ctl`.
        #[arg(long)]
        control: PathBuf,
        /// FUSE worker threads (fsyncs and stalls always run on threads of their own).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// How long the kernel may cache attributes and names, in ms.
        #[arg(long, default_value_t = 1000)]
        attr_ttl_ms: u64,
    },
    /// Send a command to a running faultfs and print its answer (the status).
    Ctl {
        socket: PathBuf,
        /// ok, eio, enospc, readonly, "stall MS", "stall MS writes", "full BYTES" or status
        #[arg(required = true, num_args = 1..)]
        command: Vec<String>,
    },
    /// Remove a faultfs mount, also the stale one a killed faultfs left.
    Umount { mountpoint: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT_LOG.into()))
        .init();
    let result = match cli.command {
        Command::Mount { backing, mountpoint, control, threads, attr_ttl_ms } => {
            // Modes asked for by creators apply unchanged to the backing files.
            nix::sys::stat::umask(nix::sys::stat::Mode::empty());
            let mut opts = faultfs::MountOptions::new(backing, mountpoint).control(control);
            opts.threads = threads;
            opts.attr_ttl = Duration::from_millis(attr_ttl_ms);
            faultfs::serve(&opts)
        }
        Command::Ctl { socket, command } => {
            faultfs::control(&socket, &command.join(" ")).map(|answer| println!("{answer}"))
        }
        Command::Umount { mountpoint } => faultfs::umount(&mountpoint),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("faultfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}
