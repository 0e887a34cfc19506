//! `twinmqd`: the broker daemon (see `twinmq_broker::daemon`).

fn main() {
    #[cfg(feature = "profile")]
    profile::start();
    std::process::exit(twinmq_broker::daemon::main_with_args(std::env::args_os()));
}

/// CPU profile for benchmarks (`--features profile`, never in a release
/// package): with `TWINMQ_PROFILE=FILE`, samples every thread at 499 Hz
/// (SIGPROF) for `TWINMQ_PROFILE_SECS` (default 20) seconds and writes the
/// stacks to `FILE.<pid>` folded, one line each: `thread;outermost;...;innermost count`
/// (`docs/profile-top.py` sums them per function).
#[cfg(feature = "profile")]
mod profile {
    use std::io::Write;

    pub fn start() {
        let Some(path) = std::env::var_os("TWINMQ_PROFILE") else { return };
        let mut path = std::path::PathBuf::from(path).into_os_string();
        path.push(format!(".{}", std::process::id()));
        let secs = std::env::var("TWINMQ_PROFILE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20u64);
        let guard = match pprof::ProfilerGuardBuilder::default()
            .frequency(499)
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
        {
            Ok(g) => g,
            Err(e) => {
                eprintln!("TWINMQ_PROFILE: cannot start the profiler: {e}");
                return;
            }
        };
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(secs));
            let report = match guard.report().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("TWINMQ_PROFILE: no report: {e}");
                    return;
                }
            };
            drop(guard);
            let mut out = Vec::new();
            for (frames, count) in &report.data {
                let mut line = frames.thread_name.replace([';', ' '], "_");
                for frame in frames.frames.iter().rev() {
                    for sym in frame.iter().rev() {
                        line.push(';');
                        line.push_str(&sym.name().replace([';', ' '], "_"));
                    }
                }
                let _ = writeln!(out, "{line} {count}");
            }
            match std::fs::write(&path, out) {
                Ok(()) => eprintln!("TWINMQ_PROFILE: wrote {}", path.to_string_lossy()),
                Err(e) => eprintln!("TWINMQ_PROFILE: cannot write {}: {e}", path.to_string_lossy()),
            }
        });
    }
}
