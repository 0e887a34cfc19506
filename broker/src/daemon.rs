//! The `twinmqd` process: flags, tracing, panic hook, signals, exit codes.
//! Kept in the library so that other binaries (the demos in `examples/`)
//! can run a real daemon process by re-executing themselves.
//!
//! Exit codes: 0 after a clean shutdown, 1 on a runtime failure (a port
//! that cannot be bound included), 2 on a configuration error.
//! `--check-config FILE` validates and exits (0 or 2) without binding or
//! opening anything; SIGHUP reloads what can be reloaded (see
//! `reload_on_sighup`).
//!
//! The ports: sockets passed by socket activation (`LISTEN_FDS`, see
//! `sockets.rs`) where there are some, otherwise bound from the
//! configuration, before the store is opened. Readiness: with
//! `NOTIFY_SOCKET` set (systemd `Type=notify`, our test harnesses) the
//! daemon sends `READY=1` there once every port is served.

use clap::Parser;

use crate::sockets::{Activated, Listeners};
use crate::{BrokerError, Config, Settings};

/// Parse `argv` (program name first) and run the daemon to its end; returns the exit code.
pub fn main_with_args<I, T>(argv: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    // First, while no other thread of ours reads the environment: it removes LISTEN_*.
    let activated = Activated::from_env();
    let args = match Settings::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        // Colours only for a terminal: a log file or the journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "bug: panic; stopping");
        std::process::exit(101);
    }));
    if let Some(path) = &args.check_config {
        return match Config::load_layered(&args) {
            Ok(_) => {
                println!("twinmqd: {}: configuration OK", path.display());
                0
            }
            Err(e) => {
                eprintln!("twinmqd: {}: configuration error: {e}", path.display());
                2
            }
        };
    }
    let (settings, config) = match Config::load_layered(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("twinmqd: configuration error: {e}");
            return 2;
        }
    };
    let listeners = match activated.map_err(BrokerError::from).and_then(|a| Listeners::activated_or_bind(&config, a)) {
        Ok(l) => l,
        Err(BrokerError::Config(e)) => {
            eprintln!("twinmqd: configuration error: {e}");
            return 2;
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot listen");
            eprintln!("twinmqd: {e}");
            return 1;
        }
    };
    raise_open_files_limit(config.max_connections);
    let system = actix_rt::System::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
    let served = system.block_on(async move {
        actix_rt::spawn(async move {
            if ready_rx.await.is_ok() {
                notify_ready();
            }
        });
        actix_rt::spawn(reload_on_sighup(args, settings, reload_tx));
        crate::server::run_reloadable(config, listeners, shutdown_signal(), Some(ready_tx), reload_rx).await
    });
    match served {
        Ok(()) => 0,
        Err(BrokerError::Config(e)) => {
            eprintln!("twinmqd: configuration error: {e}");
            2
        }
        Err(e) => {
            tracing::error!(error = %e, "broker failed");
            eprintln!("twinmqd: {e}");
            1
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

/// On each SIGHUP (`systemctl reload`): read the configuration again as at
/// start (file, environment, flags) and hand what can change while running
/// to the broker (`server::apply_reload`): the client port's TLS
/// certificate, key and client CA, and the `[[users]]` of the
/// configuration. Every other changed key is logged as needing a restart and
/// left as it was. An invalid file changes nothing (logged, with its key).
async fn reload_on_sighup(
    args: crate::Settings,
    mut running: crate::Settings,
    reloads: tokio::sync::mpsc::UnboundedSender<crate::server::Reload>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler: reloading is off");
        return;
    };
    while hup.recv().await.is_some() {
        let (settings, config) = match Config::load_layered(&args) {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: the configuration is invalid; nothing reloaded");
                continue;
            }
        };
        let restart: Vec<String> = crate::config::changed_keys(&running, &settings)
            .into_iter()
            .filter(|k| !crate::server::RELOADABLE.contains(&k.as_str()))
            .collect();
        if !restart.is_empty() {
            tracing::warn!(keys = ?restart, "SIGHUP: these keys changed and need a restart; not applied");
        }
        // What was applied becomes the running value; the rest keeps being reported.
        running.tls_cert.clone_from(&settings.tls_cert);
        running.tls_key.clone_from(&settings.tls_key);
        running.tls_client_ca.clone_from(&settings.tls_client_ca);
        running.users.clone_from(&settings.users);
        if reloads.send(crate::server::Reload { config }).is_err() {
            return;
        }
    }
}

/// Tell whoever started us with `NOTIFY_SOCKET` (a path, or `@name` in the
/// abstract namespace) that we serve: one `READY=1` datagram, as systemd's
/// `sd_notify` sends it. Without the variable, nothing.
fn notify_ready() {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let send = || -> std::io::Result<usize> {
        let socket = UnixDatagram::unbound()?;
        #[cfg(target_os = "linux")]
        if let Some(name) = path.as_bytes().strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            return socket.send_to_addr(b"READY=1", &addr);
        }
        socket.send_to(b"READY=1", &path)
    };
    match send() {
        Ok(_) => tracing::debug!("readiness notified"),
        Err(e) => tracing::warn!(error = %e, notify_socket = ?path, "cannot notify readiness"),
    }
}

/// Raise the soft limit on open files to the hard limit: every client
/// connection is a descriptor, and the usual soft limit (1024) is far below
/// the default `max_connections`. Logged, and a warning when the limit still
/// cannot hold `max_connections` (plus the store's and the HA link's files).
fn raise_open_files_limit(max_connections: usize) {
    let (soft, hard) = match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open files limit");
            return;
        }
    };
    let now = match rlimit::increase_nofile_limit(hard) {
        Ok(now) => now,
        Err(e) => {
            tracing::warn!(error = %e, soft, hard, "cannot raise the open files limit");
            soft
        }
    };
    tracing::info!(was = soft, now, hard, "open files limit");
    let needed = max_connections as u64 + 256;
    if now < needed {
        tracing::warn!(
            limit = now,
            max_connections,
            "the open files limit is below max_connections + 256: connections past it fail to be accepted"
        );
    }
}
