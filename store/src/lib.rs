//! twinmq-store: durable state on sled.
//!
//! Owns: the op log (one record per group commit, see `op.rs`), which batch
//! records are still needed (`index.rs`), admin objects (stored queues and
//! durable subscriptions), idempotence marks, the epoch and the sequence
//! counter, recovery at open, and the group-commit writer thread
//! (`writer.rs`). Does not own: networking, actors, routing, roles.
//!
//! # What a confirmation promises
//!
//! This is the one place the durability promise is written down; code that
//! confirms to a producer points here.
//!
//! - `none`: the op is in sled's in-memory buffers; sled's background flush
//!   writes it within about 500 ms. A crash may lose confirmed messages. For
//!   tests and benchmarks that say so.
//! - `local`: before the completion runs, [`Store::sync`] made the batch
//!   record durable on this node: sled's flush (which itself ends in
//!   `sync_file_range`, no metadata and no device cache flush), then an
//!   `fdatasync` of sled's log file, and an `fsync` of every blob file sled
//!   wrote since (values over a quarter of its segment size go to files of
//!   their own under `blobs/`) and of that directory. One sync per group
//!   commit, however many messages it holds. A crash of the process or a
//!   power loss of the host loses nothing that was confirmed (checked with
//!   strace: `docs/BENCHMARKS.md`). In a pair, `local` is asynchronous
//!   replication: a takeover may serve without the newest confirms the
//!   peer had not acknowledged; they are kept (never wiped by a snapshot)
//!   and handed over when the old active returns, lost only with its disk.
//! - `replicated` (the pair's default): as `local`, and the peer made the
//!   same record durable the same way before it acknowledged it, before the
//!   confirmation. Once the peer is declared down, and only while this node
//!   sees the gateway (a majority), confirms are single-copy (the first such
//!   op is recorded durably, for the hand-over should the peer's history
//!   move on without it), or refused with `require_replica`. Without a
//!   majority nothing is confirmed.
//!
//! A sync that fails, or runs longer than `disk_stall_ms`, counts as a
//! failed disk: nothing is confirmed on this node after it (what waited is
//! refused with [`StoreError::Unconfirmed`] if it was written, or
//! [`StoreError::FailedOver`] in a pair, which sends clients to the peer).
//!
//! Every record carries a CRC32 of its body; a store whose records fail their
//! checks refuses to open ([`StoreError::Corrupt`], see
//! [`StoreError::is_corruption`]); a pair member then sets it aside and
//! resyncs from its peer (the broker does that).
//!
//! # Layout
//!
//! The op log is the store: messages live inside the batch record that first
//! stored them (a group commit is written as records of about 16 KiB, see
//! `op.rs`), keyed by that record's first sequence number. Memory holds the
//! live index (`index.rs`: per queue, each message's sequence, weight and
//! expiry), never the bodies: those are read back from their records on
//! delivery through a bounded cache (`bodies.rs`). The index is kept up to
//! date as records are written or applied, on the active and the passive
//! alike (a promotion reads no record), and checkpointed
//! (`checkpoint.rs`): a single node's restart reads the checkpoint and the
//! records after it; a pair member reads and checks every record. Records
//! die once nothing in them is live. Not done yet: a compactor that copies
//! the few live messages out of old records, so a queue nobody consumes
//! pins the records it shares with busy queues.

pub mod bodies;
pub(crate) mod checkpoint;
pub mod clock;
pub mod compactor;
pub mod index;
pub mod op;
pub mod repl;
pub mod store;
pub mod writer;

pub use index::MessageRef;
pub use op::{BatchBody, Grant, Op, Permission, QueueKind, QueueSpec, StoredMessage, UserRecord};
pub use repl::ReplFrame;
pub use store::{rss_kib_of, Durability, HandoverAdmin, QueueEntry, Recovered, Store, StoreConfig, Synced, UserEntry};
pub use writer::{
    Callback, Committed, Completion, PeerRx, PeerTx, PromoteDone, ToPeer, Token, Writer, WriterConfig, WriterStats,
    HANDOVER_CHUNK,
};

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open store at {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("record {key} is corrupt: {reason}")]
    Corrupt { key: u64, reason: String },
    /// `what` could not be encoded (a bug: our own types always encode).
    #[error("could not encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: rmp_serde::encode::Error,
    },
    /// A file operation on the data directory failed (`op` says which).
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("data directory belongs to node `{stored}`, not `{configured}`")]
    NodeMismatch { stored: String, configured: String },
    #[error("the store writer has stopped")]
    Closed,
    #[error("the store failed earlier and accepts no writes: {0}")]
    Failed(String),
    #[error("cannot start the writer thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("this node is not active")]
    NotActive,
    #[error("no in-sync replica and require_replica is set")]
    NoReplica,
    #[error("epoch {got} is older than this store's epoch {current}")]
    Fenced { got: u64, current: u64 },
    #[error("replication: {0}")]
    Replication(String),
    /// A pair member's disk failed: it confirms nothing more and hands the
    /// role to its peer if that one is in sync; a client resends there.
    #[error("this node's disk failed ({0}); its peer takes the role if it is in sync")]
    FailedOver(String),
    /// A commit was written to this node's store but its confirm was refused
    /// (`reason`): it is in the store (kept across restarts, a resend of it
    /// is deduplicated), it was just never promised.
    #[error("{reason} (written here, never confirmed)")]
    Unconfirmed { reason: Box<StoreError>, written: Box<writer::Committed> },
}

impl StoreError {
    /// The refusal itself, for a commit written but not confirmed.
    pub fn cause(&self) -> &StoreError {
        match self {
            StoreError::Unconfirmed { reason, .. } => reason.cause(),
            other => other,
        }
    }

    /// Not this node's to serve any more: the client resends to its peer.
    pub fn retry_elsewhere(&self) -> bool {
        matches!(self.cause(), StoreError::NotActive | StoreError::FailedOver(_))
    }

    /// The store's contents fail their checks (ours or sled's own).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            StoreError::Corrupt { .. }
                | StoreError::Sled(sled::Error::Corruption { .. })
                | StoreError::Open { source: sled::Error::Corruption { .. }, .. }
        )
    }
}
