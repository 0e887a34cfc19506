//! `twinmqd`: the broker daemon. Parses flags, sets up tracing, runs the
//! broker until SIGTERM or SIGINT. Exit codes: 0 after a clean shutdown,
//! 1 on a runtime failure, 2 on a configuration error.

use clap::Parser;
use twinmq_broker::{Args, BrokerError, Config};

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "bug: panic; stopping");
        std::process::exit(101);
    }));
    let config = match Config::load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("twinmqd: configuration error: {e}");
            std::process::exit(2);
        }
    };
    let system = actix_rt::System::new();
    let result = system.block_on(twinmq_broker::run(config, shutdown_signal(), None));
    match result {
        Ok(()) => {}
        Err(BrokerError::Config(e)) => {
            eprintln!("twinmqd: configuration error: {e}");
            std::process::exit(2);
        }
        Err(e) => {
            tracing::error!(error = %e, "broker failed");
            eprintln!("twinmqd: {e}");
            std::process::exit(1);
        }
    }
}

async fn shutdown_signal() {
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
