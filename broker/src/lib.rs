//! twinmq-broker: the actors that serve clients, the configuration and the
//! `twinmqd` daemon.
//!
//! Owns: the client port (`listener`, `connection`), sessions, destinations
//! (`queue`, `topic`), the destination registry (`router`), configuration,
//! authentication and authorization (`auth`, `security`: users and ACLs,
//! whose current snapshot the `node` owns and publishes), the admin HTTP endpoint (`http`) and the metrics it
//! serves (`metrics`), and which listening sockets a node serves on
//! (`sockets`: bound from the configuration or passed by socket
//! activation). Does not own: how bytes become durable (twinmq-store,
//! whose crate doc states what a confirmation promises), the wire format
//! (twinmq-protocol), or the pair's roles (twinmq-ha).
//!
//! Threads: the actix System arbiter runs the router and destination actors;
//! `io_threads` arbiters run connections and sessions; the store writer has
//! a thread of its own for group commit and fsync.

pub mod audit;
pub mod auth;
pub mod config;
pub mod connection;
pub mod daemon;
pub mod disk;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod node;
pub mod outbound;
pub mod queue;
pub mod router;
pub mod security;
pub mod series;
pub mod server;
pub mod session;
pub mod sockets;
pub mod status;
pub mod stomp;
pub mod ticket;
pub mod topic;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use twinmq_ha::Role;

pub use config::{Config, ConfigError, Settings};
pub use server::run;
pub use sockets::{Activated, Listeners};

/// Broker failures.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("store: {0}")]
    Store(#[from] twinmq_store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The sockets given to `run` do not fit its configuration (a caller's bug).
    #[error("listeners: {0}")]
    Listeners(&'static str),
    #[error("authentication setup: {0}")]
    Auth(String),
    #[error("internal: {0}")]
    Internal(String),
}

/// Small read-mostly facts every part of the broker may look at.
#[derive(Clone)]
pub struct Shared {
    /// Open client connections, logged in or not.
    pub connections: Arc<AtomicUsize>,
    /// Logged-in client connections (`max_connections` bounds these, at the
    /// Hello: sockets that never log in cannot take their places).
    pub sessions: Arc<AtomicUsize>,
    pub epoch: Arc<AtomicU64>,
    /// Set when the broker starts shutting down: destinations let go of
    /// publishes they hold for room (`queue_full = "block"`), unconfirmed,
    /// so that connections need not wait for them.
    pub shutting_down: Arc<std::sync::atomic::AtomicBool>,
    /// The data directory's disk use and limits (see `disk.rs`).
    pub disk: Arc<disk::DiskUse>,
    role: watch::Receiver<Role>,
}

impl Shared {
    pub fn new(role: watch::Receiver<Role>, epoch: u64) -> Shared {
        Shared {
            connections: Arc::new(AtomicUsize::new(0)),
            sessions: Arc::new(AtomicUsize::new(0)),
            epoch: Arc::new(AtomicU64::new(epoch)),
            shutting_down: Arc::default(),
            disk: disk::DiskUse::unlimited(),
            role,
        }
    }

    /// Whether this node serves clients right now (`active`) or not (`passive`).
    pub fn role(&self) -> Role {
        *self.role.borrow()
    }

    pub fn role_watch(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Ids for messages that are never stored (non-persistent), from a range
/// stored sequence numbers never reach.
pub fn transient_seq() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1 << 62);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// An untrusted string as it may appear in a log line: at most `max`
/// characters, every control, format (zero-width, bidirectional) or other
/// non-printing character escaped (`\n`, `\u{1b}`), so that no client can
/// forge a line or send escape sequences to an operator's terminal.
pub fn log_safe(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if invisible(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A control, zero-width, bidirectional or other format character: what
/// must not reach a log line as it is, nor a destination name.
pub fn invisible(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}')
}
