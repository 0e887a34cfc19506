//! What the two replicas say to each other on the HA link.
//!
//! One attach, in order, on one connection (the primary picks it):
//!
//! ```text
//! primary                                   follower
//!   Attach{attach, history, last_seq} ---->
//!                                     <---- AttachReply{attach, floor, history, last_seq}
//!   Resume{from_seq, in_sync} + Batch...  (the follower holds a prefix of this history
//!                                          and the records it lacks are still in memory)
//!   or Catchup{from_seq}, Batch... (the follower holds a prefix of this
//!      history, further back than memory: the live records it lacks are read
//!      from the log, with gaps where records died), then SnapAdmin*,
//!      SnapProducer*, Live*, CatchupEnd{next_seq}
//!   or Snapshot{fork, synced_at}, Snap* and Batch interleaved, SnapEnd{next_seq, history}
//!                                     <---- Ack{seq} (after its flush), ...
//!   InSync{gen}                            (from now on every confirm waits for it)
//!   Batch ...                         <---- Ack ...
//! ```
//!
//! A follower that cannot apply a frame answers `Refused` (the primary
//! detaches and starts anew with a snapshot); one whose disk failed answers
//! `Failed` (the primary stops waiting for it).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::history::History;

/// Names one attach: the primary's epoch and promotion, and a counter of its
/// attaches. A follower follows the latest attach of a primary; frames that
/// an older connection still delivers are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachId {
    pub epoch: u64,
    pub promotion: u64,
    pub n: u64,
}

impl AttachId {
    /// Whether `self` comes after `other` from the same primary.
    pub fn supersedes(&self, other: &AttachId) -> bool {
        self.epoch != other.epoch || self.promotion != other.promotion || self.n > other.n
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReplFrame {
    // ----- primary to follower -----
    /// An attach begins on this connection: the primary's history and last op.
    Attach { attach: AttachId, history: History, last_seq: u64 },
    /// The follower holds a prefix of the primary's history: the records from
    /// `from_seq` on follow. `in_sync`: every confirm waited for this follower
    /// while it was away, so it stays a takeover candidate, under this
    /// generation of the primary's holding (see `InSync`).
    Resume { attach: AttachId, from_seq: u64, in_sync: Option<u64> },
    /// A snapshot of everything through `synced_at` follows, with the new
    /// records after it interleaved as `Batch`. `fork`: the follower holds ops
    /// after this sequence that the primary does not have (its own: kept for
    /// the hand-over before its copy is replaced); `handover_all`: the
    /// primary's history moved on through a forced promotion, so every one
    /// of them may have been confirmed.
    Snapshot { attach: AttachId, fork: Option<u64>, handover_all: bool, synced_at: u64 },
    /// One live log record of the snapshot.
    SnapRecord { key: u64, raw: Bytes },
    /// One admin tree entry of the snapshot.
    SnapAdmin { key: Bytes, value: Bytes },
    /// One idempotence mark of the snapshot.
    SnapProducer { key: Bytes, value: Bytes },
    /// The snapshot is complete: the follower's copy is the primary's store
    /// through `next_seq - 1`, with this history.
    SnapEnd { next_seq: u64, history: History },
    /// From here on the primary holds every confirm for this follower's ack:
    /// only now may the follower count itself in sync (a takeover candidate).
    /// `gen` numbers the primary's changes of holding; heartbeats carry the
    /// current one, so that a follower learns when the primary stopped.
    InSync { gen: u64 },
    /// A new record (the same bytes as in the primary's log).
    Batch { first_seq: u64, last_seq: u64, raw: Bytes },

    // ----- follower to primary -----
    /// The follower's answer to `Attach`: the highest epoch it knows of, its
    /// history and last op.
    AttachReply { attach: AttachId, floor: u64, history: History, last_seq: u64 },
    /// Flushed everything through `seq` (of this attach).
    Ack { attach: AttachId, seq: u64 },
    /// A frame could not be applied; start anew.
    Refused { attach: Option<AttachId>, reason: String },
    /// This node's disk failed: it confirms nothing; do not wait for it.
    Failed { reason: String },

    // ----- primary to follower, a catch-up from the log (appended last:
    // the variants above keep their wire numbers) -----
    /// The follower holds the primary's history through `from_seq - 1`, but
    /// the records after it are no longer in memory: the live ones are read
    /// from the log and follow as `Batch`, in order, with gaps where records
    /// died; then the admin and idempotence entries (`SnapAdmin`,
    /// `SnapProducer`: the primary's whole trees), `Live`, and `CatchupEnd`.
    /// Nothing else is sent meanwhile. A follower holding ops past
    /// `from_seq - 1` (its own, after the fork) keeps those that may have
    /// been confirmed for the hand-over (`handover_all`: as for `Snapshot`)
    /// and drops them; its own ops may have dropped or rewritten records
    /// before the fork too, so first come `Live` lists through the fork, it
    /// answers `Want` with the records it lacks or holds rewritten, and those
    /// come as `SnapRecord` before the rest.
    Catchup { attach: AttachId, from_seq: u64, handover_all: bool },
    /// Of the records keyed `from..=to`, the primary holds exactly `keys`:
    /// the follower drops the others (their messages died in records it
    /// never got).
    Live { from: u64, to: u64, keys: Vec<u64> },
    /// The catch-up is complete: the follower's copy is the primary's store
    /// through `next_seq - 1`; records follow as they are written.
    CatchupEnd { next_seq: u64 },

    // ----- follower to primary, appended last too -----
    /// A follower that dropped its own ops past the fork, after the `Live`
    /// lists through it: the records (keys) it lacks or holds rewritten.
    Want { attach: AttachId, keys: Vec<u64> },
}

impl ReplFrame {
    /// A short name, for logs and tests (never the payload).
    pub fn kind(&self) -> &'static str {
        match self {
            ReplFrame::Attach { .. } => "Attach",
            ReplFrame::Resume { .. } => "Resume",
            ReplFrame::Snapshot { .. } => "Snapshot",
            ReplFrame::Catchup { .. } => "Catchup",
            ReplFrame::Live { .. } => "Live",
            ReplFrame::CatchupEnd { .. } => "CatchupEnd",
            ReplFrame::Want { .. } => "Want",
            ReplFrame::SnapRecord { .. } => "SnapRecord",
            ReplFrame::SnapAdmin { .. } => "SnapAdmin",
            ReplFrame::SnapProducer { .. } => "SnapProducer",
            ReplFrame::SnapEnd { .. } => "SnapEnd",
            ReplFrame::InSync { .. } => "InSync",
            ReplFrame::Batch { .. } => "Batch",
            ReplFrame::AttachReply { .. } => "AttachReply",
            ReplFrame::Ack { .. } => "Ack",
            ReplFrame::Refused { .. } => "Refused",
            ReplFrame::Failed { .. } => "Failed",
        }
    }

    /// Bytes this frame holds in memory (for bounded queues).
    pub fn weight(&self) -> usize {
        64 + match self {
            ReplFrame::SnapRecord { raw, .. } | ReplFrame::Batch { raw, .. } => raw.len(),
            ReplFrame::SnapAdmin { key, value } | ReplFrame::SnapProducer { key, value } => key.len() + value.len(),
            ReplFrame::Attach { history, .. }
            | ReplFrame::AttachReply { history, .. }
            | ReplFrame::SnapEnd { history, .. } => history.entries().len() * 24,
            ReplFrame::Live { keys, .. } => keys.len() * 8,
            ReplFrame::Want { keys, .. } => keys.len() * 8,
            _ => 0,
        }
    }
}
