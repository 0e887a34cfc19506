//! [`Replica`]: one node's side of replication, as a state machine.
//!
//! Events come in as method calls (a local commit was written, a frame
//! arrived, a connection was lost, the peer was declared down, promote,
//! demote, the disk failed); what must happen comes out as [`Action`]s, in
//! order, for the caller (the store writer, or the simulator) to perform.
//! No I/O, no clock: times are passed in. The durable part of the state is
//! [`ReplMeta`]; `Action::PersistMeta` asks the caller to write it.
//!
//! The rules, in one place:
//! - A primary ships every record after its local flush. With `replicated`
//!   durability and an in-sync follower it confirms a commit only once the
//!   follower acknowledged it (after its own flush); if the follower's
//!   connection is lost, confirms keep waiting until it resumes or the peer
//!   is declared down; then they are confirmed single-copy (first recording
//!   durably from which op on: `alone_since`) or failed (`require_replica`).
//! - A follower counts itself in sync only after the primary's `InSync`
//!   (or a `Resume` that keeps it in sync); anything that breaks the stream
//!   clears it, and the primary's heartbeats say when it stopped holding.
//! - On attach the primary compares histories ([`History::fork`]): a
//!   follower holding a prefix of the primary's history resumes from its
//!   last op when the primary still has the records in memory, or else
//!   catches up from the primary's log (the live records after its last op,
//!   then the admin and idempotence entries and the list of live records);
//!   any other gets a snapshot, staged beside its old copy until complete. Ops the
//!   follower holds past the fork are its own: those it may have confirmed
//!   alone are kept for the hand-over before its copy is replaced.
//! - A node never follows a primary below the highest epoch it has heard of
//!   (`floor`), and never promotes at or below it.
//! - A failed disk stops everything on that node: a primary confirms
//!   nothing more, a follower tells the primary, which stops waiting for it.

use std::collections::VecDeque;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::frame::{AttachId, ReplFrame};
use super::history::{EpochStart, History};
use crate::store::Durability;

/// A connection to the peer, as the caller numbers them.
pub type ConnId = u64;

/// What the store keeps durably for the protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplMeta {
    /// The epoch of this store's position: the one it serves in (primary)
    /// or the one of the primary it follows.
    pub epoch: u64,
    /// The highest epoch this node has heard of (its own, the peer's
    /// reports, a vote it granted). It never promotes at or below it and
    /// never follows a primary below it.
    pub floor: u64,
    pub history: History,
    /// Cold start: this node was serving with no in-sync follower when it
    /// stopped, so nobody can have taken over since (DESIGN.md section 4).
    pub serve_alone: bool,
    /// The first op this node confirmed without its peer since a follower
    /// was last in sync (`replicated`): what it hands over should the peer's
    /// history move on without it. With `local` or `none`, every op past the
    /// fork may have been confirmed and is handed over.
    pub alone_since: Option<u64>,
    /// The peer's store when last heard of: (epoch of its last op, last op).
    /// For an operator about to force this node: what may be lost.
    #[serde(default)]
    pub peer_seen: Option<(u64, u64)>,
}

/// How a node comes to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promotion {
    /// A takeover, a cold start, a switchover: in an epoch above every one
    /// heard of (`at_least` or higher).
    Claimed,
    /// The peer granted its vote for exactly `at_least`: in that epoch or
    /// not at all (a higher one is not covered by the peer's promise).
    Voted,
    /// The operator's `promote --force`.
    Forced,
}

/// Why a local commit (or a held confirm) is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotActive,
    NoReplica,
    Failed(String),
}

/// Options of the protocol.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub durability: Durability,
    pub require_replica: bool,
    /// A pair member (replication, leases); a single node is always primary.
    pub pair: bool,
    /// Most bytes of recent records kept in memory for a follower to resume from.
    pub tail_bytes: usize,
}

/// What the caller must do, in order. If an I/O action fails, the caller
/// performs none of the actions after it and reports the failure
/// ([`Replica::disk_failed`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send a frame on a connection (dropped if the connection is gone).
    Send(ConnId, ReplFrame),
    /// Write [`Replica::meta`]; with `flush`, durably before what follows.
    PersistMeta { flush: bool },
    /// Confirm every local commit through this sequence number.
    Confirm { through: u64 },
    /// Fail every local commit not yet confirmed.
    FailHeld(Refusal),
    /// Primary: stream the snapshot (records through `through`, admin
    /// entries, idempotence marks) on `conn`, then call
    /// [`Replica::snapshot_streamed`]. New records are interleaved meanwhile.
    StreamSnapshot { conn: ConnId, attach: AttachId, through: u64 },
    /// Primary: send the live records of the log from `from` on as `Batch`,
    /// in order, on `conn`, up to the end of the log, including records
    /// written meanwhile (none are sent otherwise until it ends). At the
    /// end, in one go with nothing written between: every admin entry
    /// (`SnapAdmin`) and idempotence mark (`SnapProducer`), `Live` lists of
    /// the live records through the end, then [`Replica::catchup_streamed`].
    /// First, as `SnapRecord`, the records keyed `wanted` that are still
    /// live (a follower that dropped its own ops past the fork asked for them).
    StreamLog { conn: ConnId, attach: AttachId, from: u64, wanted: Vec<u64> },
    /// Primary: send `Live` lists of the live records through `through` on
    /// `conn` (to a follower dropping its own ops past it).
    ListLive { conn: ConnId, through: u64 },
    /// Follower: write this record (of `epoch`) to the store (unflushed).
    ApplyBatch { first_seq: u64, last_seq: u64, epoch: u64, raw: Bytes },
    /// Follower: flush what was applied (an `Ack` follows).
    Flush,
    /// Follower: keep, durably, the messages this store holds after `after`
    /// that may have been confirmed, for the hand-over, before its copy is
    /// replaced: with `all`, or a durability other than `replicated`, every
    /// one; otherwise those from [`ReplMeta::alone_since`] on.
    KeepHandover { after: u64, all: bool },
    /// Follower: a catch-up from the primary's log begins.
    BeginCatchup,
    /// Follower: drop this store's ops past `after` (kept for the hand-over
    /// first); then, with the `Live` lists through `after`, answer `Want` on
    /// `conn` (records it lacks or holds rewritten), and read its index again
    /// once those arrived. Its next sequence is `after + 1`.
    Truncate { conn: ConnId, attach: AttachId, after: u64 },
    /// Follower: an admin entry, idempotence mark or `Live` list of a catch-up.
    Catchup(ReplFrame),
    /// Follower: the catch-up is complete (the store is the primary's
    /// through `next_seq - 1`): drop the admin entries the primary did not
    /// send, keep `next_seq` as a floor, write [`Replica::meta`], flush.
    EndCatchup { next_seq: u64 },
    /// Follower: start a staged copy beside the current store.
    BeginStaging,
    /// Follower: one snapshot frame (or interleaved record) into staging.
    Stage(ReplFrame),
    /// Follower: the staged copy is complete (through `next_seq - 1`):
    /// replace the store with it and flush, with [`Replica::meta`].
    CommitStaging { next_seq: u64 },
    /// Follower: forget a half-loaded staged copy.
    DiscardStaging,
    /// Follower: send what is kept for the hand-over, on `conn` (the caller
    /// also resends it now and then until the primary says it stored it).
    SendHandover(ConnId),
}

/// Recent records, oldest first, contiguous.
#[derive(Debug, Default)]
struct Tail {
    records: VecDeque<(u64, u64, Bytes)>,
    bytes: usize,
    limit: usize,
}

impl Tail {
    fn push(&mut self, first: u64, last: u64, raw: Bytes) {
        self.bytes += raw.len();
        self.records.push_back((first, last, raw));
        while self.bytes > self.limit {
            let Some((_, _, old)) = self.records.pop_front() else { break };
            self.bytes -= old.len();
        }
    }

    /// The records from `from` on, if every one of them is still here.
    fn from(&self, from: u64, next_seq: u64) -> Option<Vec<(u64, u64, Bytes)>> {
        if from == next_seq {
            return Some(Vec::new());
        }
        let start = self.records.iter().position(|(first, _, _)| *first == from)?;
        Some(self.records.iter().skip(start).cloned().collect())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkPhase {
    /// `Attach` sent, waiting for the follower's reply.
    Handshake,
    /// The snapshot (through `synced_at`) is being streamed.
    Snapshot { synced_at: u64 },
    /// The live records the follower lacks are read from the log.
    Log,
    /// The follower holds ops past `fork` (its own): it drops them, checks
    /// its records through `fork` against the `Live` lists sent, and says
    /// which it wants.
    Want { fork: u64 },
    /// Records flow; in sync once the follower acknowledged `synced_at`.
    Streaming { synced_at: u64 },
}

#[derive(Debug)]
struct Link {
    conn: ConnId,
    attach: AttachId,
    phase: LinkPhase,
    acked: u64,
    in_sync: bool,
    /// The follower understands a catch-up from the log.
    log_catchup: bool,
}

#[derive(Debug)]
struct Primary {
    epoch: u64,
    promotion: u64,
    attaches: u64,
    link: Option<Link>,
    /// An in-sync follower's connection was lost: confirms wait until it
    /// resumes or the peer is declared down.
    awaiting: bool,
    /// Local commits are flushed through here.
    flushed: u64,
    /// Confirms announced through here.
    confirmed: u64,
    tail: Tail,
    /// Changes of holding (see `ReplFrame::InSync`), and whether it holds now.
    gen: u64,
    /// The follower refused the stream: the next attach sends a snapshot.
    force_snapshot: bool,
    /// A follower answered with a higher epoch: this node must step down.
    outranked: bool,
    /// Peer declared down and no gateway: no majority, nothing is
    /// confirmed (until the gateway or the peer returns, or the step-down).
    no_majority: bool,
}

#[derive(Debug)]
enum FollowerPhase {
    /// Following nobody.
    Idle,
    /// Replied to `Attach` (the primary's history); waiting for `Resume` or `Snapshot`.
    Handshake { history: History },
    /// Loading a snapshot into staging; the next interleaved record is `next`.
    Loading { next: u64 },
    /// Catching up from the primary's log: records with gaps, then its admin
    /// entries and live lists (first, the records it wanted, if it dropped
    /// its own ops).
    CatchingUp { history: History },
    /// Applying records of the primary's history.
    Streaming { history: History },
    /// A frame was refused: nothing more until a new attach.
    Refused,
}

#[derive(Debug)]
struct Follower {
    source: Option<(ConnId, AttachId)>,
    /// The primary (epoch, promotion) that in-sync generations refer to.
    primary: Option<(u64, u64)>,
    phase: FollowerPhase,
    /// In sync under this generation of the primary's holding.
    in_sync: Option<u64>,
    /// Generations below this are not trusted (in sync expired).
    gen_floor: u64,
    /// Something was applied since the last flush point.
    applied: bool,
}

impl Follower {
    /// Following nobody yet: at start, and after a demotion.
    fn idle() -> Follower {
        Follower {
            source: None,
            primary: None,
            phase: FollowerPhase::Idle,
            in_sync: None,
            gen_floor: 0,
            applied: false,
        }
    }
}

#[derive(Debug)]
enum State {
    Primary(Primary),
    Follower(Follower),
}

/// One node's replication state. See the module documentation.
#[derive(Debug)]
pub struct Replica {
    cfg: ReplicaConfig,
    meta: ReplMeta,
    next_seq: u64,
    failed: Option<String>,
    /// Pair: commits and confirms only before this time (ms, the lease clock).
    lease_until: Option<u64>,
    state: State,
}

/// What a primary's commit may go ahead with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub epoch: u64,
    pub first_seq: u64,
    /// The meta changed (`alone_since`): write it with the record, in the same flush.
    pub persist_meta: bool,
}

impl Replica {
    /// A replica over a store recovered with `meta` and `next_seq`. A single
    /// node starts as primary; a pair member starts following nobody.
    pub fn new(cfg: ReplicaConfig, meta: ReplMeta, next_seq: u64, promotion: u64) -> Replica {
        let state = if cfg.pair {
            State::Follower(Follower::idle())
        } else {
            State::Primary(Primary::new(meta.epoch, promotion, next_seq, cfg.tail_bytes))
        };
        Replica { cfg, meta, next_seq: next_seq.max(1), failed: None, lease_until: None, state }
    }

    pub fn meta(&self) -> &ReplMeta {
        &self.meta
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn is_primary(&self) -> bool {
        matches!(self.state, State::Primary(_))
    }

    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// The epoch a primary serves in (or the followed one).
    pub fn epoch(&self) -> u64 {
        match &self.state {
            State::Primary(p) => p.epoch,
            State::Follower(_) => self.meta.epoch,
        }
    }

    /// Follower: in sync, under this generation of the primary's holding.
    pub fn in_sync(&self) -> Option<u64> {
        match &self.state {
            State::Follower(f) if self.failed.is_none() => f.in_sync,
            _ => None,
        }
    }

    /// Follower: a snapshot is half loaded (the store cannot serve yet).
    pub fn loading(&self) -> bool {
        matches!(&self.state, State::Follower(Follower { phase: FollowerPhase::Loading { .. }, .. }))
    }

    /// Primary: (generation, whether it counts its follower in sync: with
    /// `replicated`, whether every confirm waits for it). Heartbeats carry it.
    pub fn holding(&self) -> (u64, bool) {
        match &self.state {
            State::Primary(p) => (p.gen, p.awaiting || p.link.as_ref().is_some_and(|l| l.in_sync)),
            State::Follower(_) => (0, false),
        }
    }

    /// Primary: the follower's acknowledgement, and whether it is in sync.
    pub fn follower(&self) -> Option<(u64, bool)> {
        match &self.state {
            State::Primary(p) => p.link.as_ref().map(|l| (l.acked, l.in_sync)),
            State::Follower(_) => None,
        }
    }

    /// Primary: confirms were announced through here.
    pub fn confirmed_through(&self) -> Option<u64> {
        match &self.state {
            State::Primary(p) => Some(p.confirmed),
            State::Follower(_) => None,
        }
    }

    /// Follower: the connection of the stream it follows.
    pub fn source(&self) -> Option<ConnId> {
        match &self.state {
            State::Follower(f) => f.source.map(|(c, _)| c),
            State::Primary(_) => None,
        }
    }

    /// Primary: the follower's link is still waiting for its `AttachReply`.
    pub fn handshaking(&self) -> bool {
        matches!(&self.state, State::Primary(p) if p.link.as_ref().is_some_and(|l| l.phase == LinkPhase::Handshake))
    }

    /// Primary: a follower's store is at a higher epoch: this node must step down.
    pub fn outranked(&self) -> bool {
        matches!(&self.state, State::Primary(p) if p.outranked)
    }

    /// Pair: the lease (the caller renews it while it hears peer or gateway).
    pub fn set_lease(&mut self, until: u64) {
        self.lease_until = Some(until);
    }

    /// Primary: could confirm at `now` (lease valid, disk working).
    pub fn can_confirm(&self, now: u64) -> bool {
        self.is_primary() && self.failed.is_none() && self.lease_valid(now)
    }

    fn lease_valid(&self, now: u64) -> bool {
        self.lease_until.is_none_or(|until| now < until)
    }

    fn holds(&self, p: &Primary) -> bool {
        self.cfg.pair
            && self.cfg.durability == Durability::Replicated
            && (p.awaiting || p.link.as_ref().is_some_and(|l| l.in_sync))
    }

    // ----- primary: local commits -----

    /// May a local commit of `ops` ops be written now, and under which
    /// epoch and sequence numbers?
    pub fn admit(&mut self, now: u64) -> Result<Admitted, Refusal> {
        if let Some(reason) = &self.failed {
            return Err(Refusal::Failed(reason.clone()));
        }
        if !self.lease_valid(now) {
            return Err(Refusal::NotActive);
        }
        let State::Primary(p) = &self.state else { return Err(Refusal::NotActive) };
        let replicated = self.cfg.pair && self.cfg.durability == Durability::Replicated;
        if replicated && self.cfg.require_replica && !p.link.as_ref().is_some_and(|l| l.in_sync) {
            return Err(Refusal::NoReplica);
        }
        let mut persist_meta = false;
        if replicated && !self.holds(p) && self.meta.alone_since.is_none() {
            // Confirmed here alone: recorded durably with the record itself.
            self.meta.alone_since = Some(self.next_seq);
            persist_meta = true;
        }
        Ok(Admitted { epoch: p.epoch, first_seq: self.next_seq, persist_meta })
    }

    /// A local commit of ops `first..=last` was written and flushed (`raw`
    /// is its record): ship it, and confirm or hold.
    pub fn committed(&mut self, first: u64, last: u64, raw: Bytes, out: &mut Vec<Action>) {
        let State::Primary(p) = &mut self.state else { return };
        debug_assert_eq!(first, self.next_seq);
        self.next_seq = last + 1;
        p.flushed = last;
        if self.cfg.pair {
            p.tail.push(first, last, raw.clone());
            if let Some(l) = &p.link {
                if matches!(l.phase, LinkPhase::Snapshot { .. } | LinkPhase::Streaming { .. }) {
                    out.push(Action::Send(l.conn, ReplFrame::Batch { first_seq: first, last_seq: last, raw }));
                }
            }
        }
        self.confirm(out);
    }

    /// Confirm what may be confirmed now.
    fn confirm(&mut self, out: &mut Vec<Action>) {
        let holds = match &self.state {
            State::Primary(p) => self.holds(p),
            State::Follower(_) => return,
        };
        let State::Primary(p) = &mut self.state else { return };
        let horizon = if p.no_majority {
            p.confirmed
        } else if !holds {
            p.flushed
        } else {
            match &p.link {
                Some(l) if l.in_sync => p.flushed.min(l.acked),
                _ => p.confirmed,
            }
        };
        if horizon > p.confirmed {
            p.confirmed = horizon;
            out.push(Action::Confirm { through: horizon });
        }
    }

    // ----- primary: the follower -----

    /// Attach the peer as follower on `conn` (a new attach replaces the old).
    /// `log_catchup`: the peer understands a catch-up from the log.
    pub fn attach(&mut self, conn: ConnId, log_catchup: bool, out: &mut Vec<Action>) {
        if !self.cfg.pair {
            return;
        }
        self.detach_link();
        if self.failed.is_some() {
            // A failed store attaches no one: it could not make a follower's
            // in-sync state durable, and a follower in sync from before keeps
            // it while no primary says otherwise (to take the role over).
            return;
        }
        let last_seq = self.next_seq - 1;
        let history = self.meta.history.clone();
        let State::Primary(p) = &mut self.state else { return };
        // The peer is back: a majority again.
        p.no_majority = false;
        p.attaches += 1;
        let attach = AttachId { epoch: p.epoch, promotion: p.promotion, n: p.attaches };
        p.link = Some(Link { conn, attach, phase: LinkPhase::Handshake, acked: 0, in_sync: false, log_catchup });
        out.push(Action::Send(conn, ReplFrame::Attach { attach, history, last_seq }));
    }

    /// The connection `conn` is gone.
    pub fn connection_lost(&mut self, conn: ConnId, out: &mut Vec<Action>) {
        match &mut self.state {
            State::Primary(p) => {
                if p.link.as_ref().is_some_and(|l| l.conn == conn) {
                    self.detach_link();
                }
            }
            State::Follower(f) => {
                if f.source.is_some_and(|(c, _)| c == conn) {
                    if matches!(f.phase, FollowerPhase::Loading { .. }) {
                        out.push(Action::DiscardStaging);
                    }
                    // Still in sync if it was: the primary holds confirms for
                    // it until it resumes or declares it down.
                    f.source = None;
                    f.phase = FollowerPhase::Idle;
                }
            }
        }
    }

    /// The link ends; an in-sync follower is awaited (confirms keep waiting).
    fn detach_link(&mut self) {
        let State::Primary(p) = &mut self.state else { return };
        if let Some(l) = p.link.take() {
            if l.in_sync {
                p.awaiting = true;
            }
        }
    }

    /// The peer is declared down (not just a connection lost). `alone`:
    /// this node sees the gateway (active alone, DESIGN.md section 4): what
    /// waits for the peer is confirmed single-copy (or failed with
    /// `require_replica`), and a restart may serve alone, as nobody can take
    /// over without it knowing, short of a split. Without the gateway it has
    /// no majority: nothing changes, its peer may be taking over.
    pub fn peer_down(&mut self, now: u64, alone: bool, out: &mut Vec<Action>) {
        let lease_ok = self.lease_valid(now);
        let State::Primary(p) = &mut self.state else { return };
        if p.link.is_some() {
            // A stale verdict: the peer is attached again. A dead connection
            // is lost first; the verdict, repeated while the peer is down, applies then.
            return;
        }
        // Neither peer nor gateway: no majority, nothing more is confirmed,
        // single-copy or not (the peer, which may see the gateway, takes over
        // once this lease is over). What waits keeps waiting: for the peer's
        // return, the gateway's (then single-copy), or the step-down that
        // refuses it.
        p.no_majority = !alone;
        if alone {
            self.release_for_peer_gone(lease_ok, alone, out);
        }
    }

    /// The peer is gone (declared down, or its disk failed): this node is
    /// alone now; what waits for the peer is confirmed single-copy, or failed.
    fn release_for_peer_gone(&mut self, lease_ok: bool, alone: bool, out: &mut Vec<Action>) {
        let replicated = self.cfg.pair && self.cfg.durability == Durability::Replicated;
        let require = self.cfg.require_replica;
        let State::Primary(p) = &mut self.state else { return };
        if p.awaiting {
            p.awaiting = false;
            p.gen += 1;
        }
        let mut persist = None;
        if alone && !self.meta.serve_alone {
            self.meta.serve_alone = true;
            persist = Some(false);
        }
        if p.flushed > p.confirmed {
            if !lease_ok || require {
                out.push(Action::FailHeld(if lease_ok { Refusal::NoReplica } else { Refusal::NotActive }));
                p.confirmed = p.flushed;
            } else {
                // Degraded: what waited for the peer is durable here. Say so
                // durably before confirming it.
                if replicated && self.meta.alone_since.is_none_or(|a| a > p.confirmed + 1) {
                    self.meta.alone_since = Some(p.confirmed + 1);
                }
                persist = Some(true);
            }
        }
        if let Some(flush) = persist {
            out.push(Action::PersistMeta { flush });
        }
        self.confirm(out);
    }

    /// Primary: whether the snapshot or catch-up of `attach` is still
    /// wanted (its link stands and is at that stage); the caller stops
    /// streaming otherwise.
    pub fn snapshot_wanted(&self, attach: &AttachId) -> bool {
        matches!(&self.state, State::Primary(p)
            if p.link.as_ref().is_some_and(|l| l.attach == *attach
                && matches!(l.phase, LinkPhase::Snapshot { .. } | LinkPhase::Log)))
    }

    /// Primary: the peer says its disk failed (a heartbeat that it is not
    /// serviceable, while its store may be hung and unable to answer):
    /// stop waiting for it, as if it had sent `Failed`.
    pub fn peer_failed(&mut self, now: u64, out: &mut Vec<Action>) {
        let lease_ok = self.lease_valid(now);
        let State::Primary(p) = &mut self.state else { return };
        if !p.awaiting && !p.link.as_ref().is_some_and(|l| l.in_sync) {
            return;
        }
        if p.link.take().is_some_and(|l| l.in_sync) {
            p.gen += 1;
        }
        // A failed peer cannot take over.
        self.release_for_peer_gone(lease_ok, true, out);
    }

    /// Primary: the snapshot of `attach` was streamed; the end follows.
    pub fn snapshot_streamed(&mut self, attach: AttachId, out: &mut Vec<Action>) {
        let next_seq = self.next_seq;
        let history = self.meta.history.clone();
        let State::Primary(p) = &mut self.state else { return };
        let Some(l) = p.link.as_mut().filter(|l| l.attach == attach) else { return };
        if let LinkPhase::Snapshot { .. } = l.phase {
            l.phase = LinkPhase::Streaming { synced_at: next_seq - 1 };
            out.push(Action::Send(l.conn, ReplFrame::SnapEnd { next_seq, history }));
        }
    }

    /// Primary: the catch-up of `attach` was streamed through the end of the
    /// log (nothing was written since): its end follows, and from now on
    /// records are sent as they are written.
    pub fn catchup_streamed(&mut self, attach: AttachId, out: &mut Vec<Action>) {
        let next_seq = self.next_seq;
        let State::Primary(p) = &mut self.state else { return };
        let Some(l) = p.link.as_mut().filter(|l| l.attach == attach) else { return };
        if l.phase == LinkPhase::Log {
            l.phase = LinkPhase::Streaming { synced_at: next_seq - 1 };
            out.push(Action::Send(l.conn, ReplFrame::CatchupEnd { next_seq }));
        }
    }

    /// Primary: the follower cannot keep up (its queue overflowed): detach it.
    pub fn follower_lagging(&mut self, conn: ConnId, out: &mut Vec<Action>) {
        self.connection_lost(conn, out);
    }

    fn primary_frame(&mut self, conn: ConnId, frame: ReplFrame, now: u64, out: &mut Vec<Action>) {
        let lease_ok = self.lease_valid(now);
        let next_seq = self.next_seq;
        let State::Primary(p) = &mut self.state else { return };
        let ours = |l: &Link, attach: &AttachId| l.conn == conn && l.attach == *attach;
        match frame {
            ReplFrame::AttachReply { attach, floor, history, last_seq } => {
                let Some(l) = p.link.as_mut().filter(|l| ours(l, &attach) && l.phase == LinkPhase::Handshake) else {
                    return;
                };
                if floor > p.epoch {
                    // The lower side yields (DESIGN.md section 4): this node
                    // learns of a newer epoch and must step down.
                    p.outranked = true;
                    p.link = None;
                    return;
                }
                // Histories rank by (epoch of the last op written, last op):
                // a forced promotion that wrote nothing yet (a wiped store
                // forced active, say) never outranks a follower that holds
                // more. Stepping down loses nothing: this node confirmed
                // nothing in its epoch; the follower, ranking first, takes
                // over. Only a forced one: a claimed or voted promotion held
                // every confirmed op, and a follower's longer tail is ops it
                // wrote but never had confirmed (no reason to move the role).
                let theirs = (history.last_op_epoch(last_seq), last_seq);
                let ours = (self.meta.history.last_op_epoch(next_seq - 1), next_seq - 1);
                let forced_idle = self.meta.history.entries().last().is_some_and(|e| e.epoch == p.epoch && e.forced)
                    && ours.0 < p.epoch;
                if forced_idle && theirs > ours {
                    p.outranked = true;
                    p.link = None;
                    return;
                }
                let fork = self.meta.history.fork(next_seq - 1, &history, last_seq);
                let resumable = last_seq <= fork && !p.force_snapshot;
                let tail = if resumable { p.tail.from(last_seq + 1, next_seq) } else { None };
                match tail {
                    Some(records) => {
                        // Every confirm waited for it while it was away: it stays in sync.
                        let in_sync = p.awaiting;
                        out.push(Action::Send(
                            conn,
                            ReplFrame::Resume { attach, from_seq: last_seq + 1, in_sync: in_sync.then_some(p.gen) },
                        ));
                        for (first, last, raw) in records {
                            out.push(Action::Send(conn, ReplFrame::Batch { first_seq: first, last_seq: last, raw }));
                        }
                        l.phase = LinkPhase::Streaming { synced_at: next_seq - 1 };
                        l.acked = last_seq;
                        l.in_sync = in_sync;
                        if in_sync {
                            p.awaiting = false;
                        } else {
                            // It may hold everything already (nothing to send).
                            self.caught_up(out);
                        }
                    }
                    None if last_seq > fork && fork > 0 && !p.force_snapshot && l.log_catchup => {
                        // Its own ops past the fork: dropped after the
                        // hand-over; then it says which records it wants.
                        let handover_all = self.meta.history.forced_since(&history);
                        out.push(Action::Send(conn, ReplFrame::Catchup { attach, from_seq: fork + 1, handover_all }));
                        out.push(Action::ListLive { conn, through: fork });
                        l.phase = LinkPhase::Want { fork };
                    }
                    None if resumable && l.log_catchup && last_seq > 0 => {
                        // Further back than memory: the live records it
                        // lacks come from the log. Not in sync until it
                        // holds everything (every confirm still waits for
                        // it if it was, as for a snapshot). (An empty store
                        // gets a snapshot: staged with its index built as
                        // it comes, it loads faster, in less memory.)
                        let from = last_seq + 1;
                        out.push(Action::Send(
                            conn,
                            ReplFrame::Catchup { attach, from_seq: from, handover_all: false },
                        ));
                        out.push(Action::StreamLog { conn, attach, from, wanted: Vec::new() });
                        l.phase = LinkPhase::Log;
                        l.acked = last_seq;
                    }
                    None => {
                        let synced_at = next_seq - 1;
                        let handover_all = self.meta.history.forced_since(&history);
                        let fork = (last_seq > fork).then_some(fork);
                        out.push(Action::Send(conn, ReplFrame::Snapshot { attach, fork, handover_all, synced_at }));
                        out.push(Action::StreamSnapshot { conn, attach, through: synced_at });
                        l.phase = LinkPhase::Snapshot { synced_at };
                        p.force_snapshot = false;
                    }
                }
            }
            ReplFrame::Want { attach, keys } => {
                let Some(l) = p.link.as_mut().filter(|l| ours(l, &attach)) else { return };
                let LinkPhase::Want { fork } = l.phase else { return };
                out.push(Action::StreamLog { conn, attach, from: fork + 1, wanted: keys });
                l.phase = LinkPhase::Log;
                l.acked = fork;
            }
            ReplFrame::Ack { attach, seq } => {
                let Some(l) = p.link.as_mut().filter(|l| ours(l, &attach)) else { return };
                if !matches!(l.phase, LinkPhase::Streaming { .. }) {
                    return;
                }
                // Never believe an ack beyond what was shipped.
                l.acked = l.acked.max(seq.min(next_seq - 1));
                self.caught_up(out);
            }
            ReplFrame::Refused { attach, .. } => {
                if p.link.as_ref().is_some_and(|l| l.conn == conn && attach.is_none_or(|a| a == l.attach)) {
                    // The follower dropped its in-sync state before refusing.
                    p.link = None;
                    p.force_snapshot = true;
                }
            }
            ReplFrame::Failed { .. } => {
                if let Some(l) = p.link.take_if(|l| l.conn == conn) {
                    if l.in_sync {
                        p.gen += 1;
                    }
                    // A failed peer cannot take over.
                    self.release_for_peer_gone(lease_ok, true, out);
                }
                return;
            }
            _ => return,
        }
        self.confirm(out);
    }

    /// Primary: the follower acknowledged everything up to where it was
    /// attached: from now on every confirm waits for it (with `replicated`).
    fn caught_up(&mut self, out: &mut Vec<Action>) {
        if self.failed.is_some() {
            // The meta below cannot be made durable: a follower told it is in
            // sync could take over while this store still says it may serve
            // alone on a cold start.
            return;
        }
        let State::Primary(p) = &mut self.state else { return };
        let Some(l) = p.link.as_mut() else { return };
        let LinkPhase::Streaming { synced_at } = l.phase else { return };
        if l.in_sync || l.acked < synced_at {
            return;
        }
        l.in_sync = true;
        p.awaiting = false;
        p.gen += 1;
        // Nothing is this node's alone any more, and a cold start alone is
        // off: durably, before the follower counts itself a takeover candidate.
        self.meta.alone_since = None;
        self.meta.serve_alone = false;
        out.push(Action::PersistMeta { flush: true });
        out.push(Action::Send(l.conn, ReplFrame::InSync { gen: p.gen }));
    }

    // ----- follower -----

    fn follower_frame(&mut self, conn: ConnId, frame: ReplFrame, out: &mut Vec<Action>) {
        let State::Follower(f) = &mut self.state else { return };
        if let ReplFrame::Attach { attach, history, .. } = frame {
            if f.source.is_some_and(|(_, a)| !attach.supersedes(&a)) {
                return; // an older attach arrived late
            }
            if matches!(f.phase, FollowerPhase::Loading { .. }) {
                out.push(Action::DiscardStaging);
            }
            if let Some(reason) = &self.failed {
                out.push(Action::Send(conn, ReplFrame::Failed { reason: reason.clone() }));
                return;
            }
            let reply = ReplFrame::AttachReply {
                attach,
                floor: self.meta.floor,
                history: self.meta.history.clone(),
                last_seq: self.next_seq - 1,
            };
            if attach.epoch < self.meta.floor {
                // Fenced: the primary learns of the higher epoch and steps down.
                f.source = None;
                f.phase = FollowerPhase::Idle;
                out.push(Action::Send(conn, reply));
                return;
            }
            f.source = Some((conn, attach));
            f.phase = FollowerPhase::Handshake { history };
            if f.primary != Some((attach.epoch, attach.promotion)) {
                // Another primary: in sync only once it says so.
                f.primary = Some((attach.epoch, attach.promotion));
                f.in_sync = None;
                f.gen_floor = 0;
            }
            if self.meta.epoch != attach.epoch || self.meta.serve_alone {
                // Durably a follower of this primary before it hears so.
                self.meta.epoch = attach.epoch;
                self.meta.floor = self.meta.floor.max(attach.epoch);
                self.meta.serve_alone = false;
                out.push(Action::PersistMeta { flush: true });
            }
            out.push(Action::Send(conn, reply));
            out.push(Action::SendHandover(conn));
            return;
        }
        let Some((source, attach)) = f.source else { return };
        if source != conn || self.failed.is_some() {
            return; // not the connection followed
        }
        let refuse = |f: &mut Follower, out: &mut Vec<Action>, reason: String| {
            if matches!(f.phase, FollowerPhase::Loading { .. }) {
                out.push(Action::DiscardStaging);
            }
            f.phase = FollowerPhase::Refused;
            f.in_sync = None;
            out.push(Action::Send(conn, ReplFrame::Refused { attach: Some(attach), reason }));
        };
        match (&mut f.phase, frame) {
            (FollowerPhase::Refused, _) => {}
            (FollowerPhase::Handshake { history }, ReplFrame::Resume { attach: a, from_seq, in_sync })
                if a == attach =>
            {
                if from_seq != self.next_seq {
                    let reason =
                        format!("cannot resume from {from_seq}: this store holds through {}", self.next_seq - 1);
                    refuse(f, out, reason);
                    return;
                }
                f.in_sync = in_sync.filter(|g| *g >= f.gen_floor);
                let history = std::mem::take(history);
                f.phase = FollowerPhase::Streaming { history };
            }
            (FollowerPhase::Handshake { history }, ReplFrame::Catchup { attach: a, from_seq, handover_all })
                if a == attach =>
            {
                if from_seq > self.next_seq || from_seq < self.next_seq && from_seq < 2 {
                    let reason =
                        format!("cannot catch up from {from_seq}: this store holds through {}", self.next_seq - 1);
                    refuse(f, out, reason);
                    return;
                }
                // Not a takeover candidate until the catch-up is complete:
                // its live lists and admin entries come last.
                f.in_sync = None;
                let history = std::mem::take(history);
                out.push(Action::BeginCatchup);
                if from_seq < self.next_seq {
                    // Its own ops past the fork: what may have been
                    // confirmed is kept for the hand-over, then they go.
                    let after = from_seq - 1;
                    out.push(Action::KeepHandover { after, all: handover_all });
                    out.push(Action::SendHandover(conn));
                    out.push(Action::Truncate { conn, attach, after });
                    // (`alone_since` stays until the end: the hand-over
                    // above reads it, and so would one after a restart.)
                    self.next_seq = from_seq;
                    self.meta.history = history.prefix(after);
                    out.push(Action::PersistMeta { flush: true });
                }
                f.phase = FollowerPhase::CatchingUp { history };
            }
            (FollowerPhase::CatchingUp { history }, ReplFrame::Batch { first_seq, last_seq, raw }) => {
                if last_seq < self.next_seq {
                    return; // already held
                }
                if first_seq < self.next_seq || last_seq < first_seq {
                    let reason =
                        format!("record {first_seq} overlaps what this store holds (through {})", self.next_seq - 1);
                    refuse(f, out, reason);
                    return;
                }
                // A gap is a record that died on the primary. Records of
                // earlier epochs come too: each is of its history's epoch.
                let Some(epoch) = history.epoch_of(first_seq).map(|e| e.epoch) else {
                    refuse(f, out, format!("record {first_seq} is before the primary's history"));
                    return;
                };
                f.applied = true;
                apply_record(&mut self.next_seq, &mut self.meta, history, (first_seq, last_seq, epoch, raw), out);
            }
            (
                FollowerPhase::CatchingUp { .. },
                frame @ (ReplFrame::SnapAdmin { .. }
                | ReplFrame::SnapProducer { .. }
                | ReplFrame::SnapRecord { .. }
                | ReplFrame::Live { .. }),
            ) => {
                out.push(Action::Catchup(frame));
            }
            (FollowerPhase::CatchingUp { history }, ReplFrame::CatchupEnd { next_seq }) => {
                if next_seq < self.next_seq {
                    let reason =
                        format!("the catch-up ends at {next_seq} but records arrived through {}", self.next_seq - 1);
                    refuse(f, out, reason);
                    return;
                }
                self.next_seq = next_seq;
                self.meta.history = history.prefix(next_seq - 1);
                self.meta.alone_since = None;
                self.meta.serve_alone = false;
                let history = std::mem::take(history);
                f.phase = FollowerPhase::Streaming { history };
                f.applied = false;
                out.push(Action::EndCatchup { next_seq });
                out.push(Action::Send(conn, ReplFrame::Ack { attach, seq: next_seq - 1 }));
            }
            (FollowerPhase::Handshake { .. }, ReplFrame::Snapshot { attach: a, fork, handover_all, synced_at })
                if a == attach =>
            {
                f.in_sync = None;
                if let Some(after) = fork {
                    out.push(Action::KeepHandover { after, all: handover_all });
                    out.push(Action::SendHandover(conn));
                }
                out.push(Action::BeginStaging);
                f.phase = FollowerPhase::Loading { next: synced_at + 1 };
            }
            (
                FollowerPhase::Loading { .. },
                frame @ (ReplFrame::SnapRecord { .. } | ReplFrame::SnapAdmin { .. } | ReplFrame::SnapProducer { .. }),
            ) => {
                out.push(Action::Stage(frame));
            }
            (FollowerPhase::Loading { next }, ReplFrame::Batch { first_seq, last_seq, raw }) => {
                if last_seq < *next {
                    return;
                }
                if first_seq != *next || last_seq < first_seq {
                    let reason = format!("record {first_seq} does not follow {} (a gap)", *next - 1);
                    refuse(f, out, reason);
                    return;
                }
                *next = last_seq + 1;
                out.push(Action::Stage(ReplFrame::Batch { first_seq, last_seq, raw }));
            }
            (FollowerPhase::Loading { next }, ReplFrame::SnapEnd { next_seq, history }) => {
                if next_seq != *next {
                    let reason = format!("snapshot ends at {next_seq} but records arrived through {}", *next - 1);
                    refuse(f, out, reason);
                    return;
                }
                self.next_seq = next_seq;
                self.meta.history = history.clone();
                self.meta.alone_since = None;
                self.meta.serve_alone = false;
                f.phase = FollowerPhase::Streaming { history };
                out.push(Action::CommitStaging { next_seq });
                out.push(Action::Send(conn, ReplFrame::Ack { attach, seq: next_seq - 1 }));
            }
            (FollowerPhase::Streaming { history }, ReplFrame::Batch { first_seq, last_seq, raw }) => {
                if last_seq < self.next_seq {
                    return; // already held
                }
                if first_seq != self.next_seq || last_seq < first_seq {
                    let reason = format!("record {first_seq} does not follow {} (a gap)", self.next_seq - 1);
                    refuse(f, out, reason);
                    return;
                }
                f.applied = true;
                let record = (first_seq, last_seq, attach.epoch, raw);
                apply_record(&mut self.next_seq, &mut self.meta, history, record, out);
            }
            (FollowerPhase::Streaming { .. }, ReplFrame::InSync { gen }) => {
                if gen >= f.gen_floor {
                    f.in_sync = Some(gen);
                }
            }
            (_, other) => {
                let reason = format!("unexpected {} frame here", other.kind());
                refuse(f, out, reason);
            }
        }
    }

    /// Follower: after a group of frames, flush what was applied and
    /// acknowledge it.
    pub fn flush_point(&mut self, out: &mut Vec<Action>) {
        let next_seq = self.next_seq;
        let State::Follower(f) = &mut self.state else { return };
        if !std::mem::take(&mut f.applied) {
            return;
        }
        // (A catch-up is made durable and acknowledged at its end: sled
        // keeps what it writes in order, so a crash before takes back a
        // suffix, and the next attach resumes from what is left.)
        if let (Some((conn, attach)), FollowerPhase::Streaming { .. }) = (f.source, &f.phase) {
            out.push(Action::Flush);
            out.push(Action::Send(conn, ReplFrame::Ack { attach, seq: next_seq - 1 }));
        }
    }

    /// A frame arrived on `conn`.
    pub fn on_frame(&mut self, conn: ConnId, frame: ReplFrame, now: u64, out: &mut Vec<Action>) {
        match &self.state {
            State::Primary(_) => self.primary_frame(conn, frame, now, out),
            State::Follower(_) => self.follower_frame(conn, frame, out),
        }
    }

    /// Follower: the caller could not apply the record starting at
    /// `first_seq` (corrupt, or of another epoch): it is not part of this
    /// store; refuse the stream.
    pub fn apply_failed(&mut self, first_seq: u64, reason: String, out: &mut Vec<Action>) {
        let State::Follower(f) = &mut self.state else { return };
        if let FollowerPhase::Streaming { history } | FollowerPhase::CatchingUp { history } = &f.phase {
            if first_seq < self.next_seq {
                self.next_seq = first_seq;
                self.meta.history = history.prefix(first_seq - 1);
                out.push(Action::PersistMeta { flush: false });
            }
        }
        let Some((conn, attach)) = f.source else { return };
        if matches!(f.phase, FollowerPhase::Loading { .. }) {
            out.push(Action::DiscardStaging);
        }
        f.phase = FollowerPhase::Refused;
        f.in_sync = None;
        f.applied = false;
        out.push(Action::Send(conn, ReplFrame::Refused { attach: Some(attach), reason }));
    }

    /// Follower: in sync expires (this node stood still, or was isolated):
    /// not a takeover candidate until the primary says so again.
    pub fn expire_in_sync(&mut self) {
        if let State::Follower(f) = &mut self.state {
            if let Some(g) = f.in_sync.take() {
                f.gen_floor = f.gen_floor.max(g + 1);
            }
        }
    }

    /// Follower: the primary's heartbeat says how it holds now.
    pub fn primary_holds(&mut self, gen: u64, holds: bool) {
        if let State::Follower(f) = &mut self.state {
            if !holds && f.in_sync.is_some_and(|g| gen >= g) {
                f.in_sync = None;
                f.gen_floor = f.gen_floor.max(gen + 1);
            }
        }
    }

    /// Primary: the follower says it is not in sync though this node holds
    /// for it (its in-sync expired): tell it again, under a new generation.
    pub fn reaffirm_in_sync(&mut self, out: &mut Vec<Action>) {
        if self.failed.is_some() {
            // Its in-sync state may never have been made durable here
            // (`caught_up` failing at its meta): tell nothing new.
            return;
        }
        let State::Primary(p) = &mut self.state else { return };
        if let Some(l) = p.link.as_ref().filter(|l| l.in_sync) {
            p.gen += 1;
            out.push(Action::Send(l.conn, ReplFrame::InSync { gen: p.gen }));
        }
    }

    /// The highest epoch heard of (a peer's report, a vote granted) rises.
    /// With `durable` (a vote: the grant goes out only after this), the
    /// floor is made durable even if it was already that high. Returns false
    /// when it cannot be (the disk failed): then no grant may go out.
    pub fn raise_floor(&mut self, epoch: u64, durable: bool, out: &mut Vec<Action>) -> bool {
        if self.failed.is_some() {
            return false;
        }
        if epoch > self.meta.floor {
            self.meta.floor = epoch;
            if epoch > self.epoch() {
                // A newer epoch than this node's: in sync only once its
                // primary says so, and someone may serve without this node.
                self.expire_in_sync();
                self.meta.serve_alone = false;
            }
            out.push(Action::PersistMeta { flush: true });
        } else if durable {
            out.push(Action::PersistMeta { flush: true });
        }
        true
    }

    /// Passive: the peer's position. A node that claims to have served last
    /// (the cold-start rule) keeps the claim only over a peer that serves
    /// nothing and is in an older epoch. A peer that serves took the role
    /// after this node; a peer in the same epoch may have been promoted by
    /// force into it without knowing of this node's (seed 75023), or follow
    /// it: either way the two elect by rank while both are up, and a node
    /// that then loses its peer waits rather than serve on a claim that may
    /// be stale. (A newer epoch clears the claim as the floor rises.)
    pub fn peer_position(&mut self, epoch: u64, serving: bool, out: &mut Vec<Action>) {
        if self.failed.is_none() && !self.is_primary() && self.meta.serve_alone && (serving || epoch >= self.meta.epoch)
        {
            self.meta.serve_alone = false;
            out.push(Action::PersistMeta { flush: true });
        }
    }

    /// What the peer's store held when last heard of (kept for operators).
    pub fn note_peer(&mut self, last_op_epoch: u64, last_seq: u64, out: &mut Vec<Action>) {
        if self.meta.peer_seen != Some((last_op_epoch, last_seq)) {
            self.meta.peer_seen = Some((last_op_epoch, last_seq));
            out.push(Action::PersistMeta { flush: false });
        }
    }

    // ----- roles -----

    /// Become primary in an epoch of at least `at_least`, above every epoch
    /// heard of (promotion id `promotion`); returns the epoch. `in_sync_gen`:
    /// the promotion relies on this node being in sync under that generation
    /// (a takeover); `None` for a forced or cold-start promotion.
    pub fn promote(
        &mut self,
        at_least: u64,
        promotion: u64,
        in_sync_gen: Option<u64>,
        how: Promotion,
        out: &mut Vec<Action>,
    ) -> Result<u64, String> {
        if let Some(reason) = &self.failed {
            return Err(format!("the store failed: {reason}"));
        }
        let State::Follower(f) = &self.state else { return Err("already primary".into()) };
        if matches!(f.phase, FollowerPhase::Loading { .. }) {
            return Err("a snapshot is half loaded; this store cannot serve".into());
        }
        if let Some(g) = in_sync_gen {
            if f.in_sync != Some(g) {
                return Err("this node is no longer in sync".into());
            }
        }
        let epoch = match how {
            // The granter's heartbeat raises the floor to exactly the voted
            // epoch; anything past it, or this store in it already, voids
            // the vote: ask again (seed 122091).
            Promotion::Voted if self.meta.floor > at_least || self.meta.epoch >= at_least => {
                return Err(format!("the vote for epoch {at_least} is stale (heard of epoch {})", self.meta.floor));
            }
            Promotion::Voted => at_least,
            Promotion::Claimed | Promotion::Forced => at_least.max(self.meta.floor + 1),
        };
        let forced = how == Promotion::Forced;
        self.meta.epoch = epoch;
        self.meta.floor = epoch;
        self.meta.history.begin(EpochStart { epoch, id: promotion, start: self.next_seq, forced });
        self.meta.serve_alone = true;
        self.state = State::Primary(Primary::new(epoch, promotion, self.next_seq, self.cfg.tail_bytes));
        out.push(Action::PersistMeta { flush: true });
        Ok(epoch)
    }

    /// Become follower. `still_last_active`: it stepped down for lack of a
    /// majority, and nobody is known to have taken over: the cold-start rule
    /// keeps what it said.
    pub fn demote(&mut self, still_last_active: bool, out: &mut Vec<Action>) {
        if let State::Primary(p) = &self.state {
            if p.flushed > p.confirmed {
                out.push(Action::FailHeld(Refusal::NotActive));
            }
        }
        self.state = State::Follower(Follower::idle());
        self.meta.serve_alone = still_last_active && self.meta.serve_alone;
        out.push(Action::PersistMeta { flush: true });
    }

    /// The disk failed (a write, flush or fsync error, or a stall): nothing
    /// is confirmed after this on this node.
    pub fn disk_failed(&mut self, reason: String, out: &mut Vec<Action>) {
        if self.failed.is_some() {
            return;
        }
        self.failed = Some(reason.clone());
        match &mut self.state {
            State::Primary(p) => {
                // Nothing more is confirmed here. The follower keeps counting
                // as in sync (it holds everything confirmed so far), so that it
                // can take the role over at once.
                if p.flushed > p.confirmed {
                    out.push(Action::FailHeld(Refusal::Failed(reason)));
                }
            }
            State::Follower(f) => {
                f.in_sync = None;
                if matches!(f.phase, FollowerPhase::Loading { .. }) {
                    out.push(Action::DiscardStaging);
                }
                f.phase = FollowerPhase::Refused;
                if let Some((conn, _)) = f.source {
                    out.push(Action::Send(conn, ReplFrame::Failed { reason }));
                }
            }
        }
    }
}

/// Follower: apply the record `(first_seq, last_seq, epoch, raw)` of the
/// primary's `history`: this store now holds through `last_seq`.
fn apply_record(
    next_seq: &mut u64,
    meta: &mut ReplMeta,
    history: &History,
    (first_seq, last_seq, epoch, raw): (u64, u64, u64, Bytes),
    out: &mut Vec<Action>,
) {
    *next_seq = last_seq + 1;
    let prefix = history.prefix(last_seq);
    if prefix != meta.history {
        meta.history = prefix;
        out.push(Action::PersistMeta { flush: false });
    }
    out.push(Action::ApplyBatch { first_seq, last_seq, epoch, raw });
}

impl Primary {
    fn new(epoch: u64, promotion: u64, next_seq: u64, tail_bytes: usize) -> Primary {
        Primary {
            epoch,
            promotion,
            attaches: 0,
            link: None,
            awaiting: false,
            flushed: next_seq - 1,
            confirmed: next_seq - 1,
            tail: Tail { limit: tail_bytes, ..Tail::default() },
            gen: 0,
            force_snapshot: false,
            outranked: false,
            no_majority: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONN: ConnId = 1;

    fn node(promotion: u64) -> Replica {
        let cfg = ReplicaConfig {
            durability: Durability::Replicated,
            require_replica: false,
            pair: true,
            tail_bytes: 1 << 20,
        };
        Replica::new(cfg, ReplMeta::default(), 1, promotion)
    }

    fn frames(out: Vec<Action>) -> Vec<ReplFrame> {
        out.into_iter()
            .filter_map(|a| match a {
                Action::Send(_, f) => Some(f),
                _ => None,
            })
            .collect()
    }

    /// Deliver `out`'s frames to `to`, then its flush point; its answers.
    fn deliver(to: &mut Replica, out: Vec<Action>) -> Vec<Action> {
        let mut answers = Vec::new();
        for f in frames(out) {
            to.on_frame(CONN, f, 0, &mut answers);
        }
        to.flush_point(&mut answers);
        answers
    }

    /// a primary with one op committed, b attached and streaming (not yet in sync).
    fn streaming_pair() -> (Replica, Replica, Vec<Action>) {
        let (mut a, mut b) = (node(7), node(8));
        let mut out = Vec::new();
        a.promote(1, 7, None, Promotion::Claimed, &mut out).expect("promotes");
        a.set_lease(u64::MAX);
        a.admit(0).expect("admitted");
        a.committed(1, 1, Bytes::from_static(b"op"), &mut out);
        let mut out = Vec::new();
        a.attach(CONN, true, &mut out);
        let reply = deliver(&mut b, out);
        let resume = deliver(&mut a, reply);
        assert!(frames(resume.clone()).iter().any(|f| matches!(f, ReplFrame::Resume { in_sync: None, .. })));
        (a, b, resume)
    }

    #[test]
    fn a_primary_whose_disk_failed_tells_no_follower_it_is_in_sync() {
        let (mut a, mut b, resume) = streaming_pair();
        a.disk_failed("EIO".into(), &mut Vec::new());
        // The follower acknowledges everything: it caught up, but the
        // primary cannot make that durable (its cold-start state) any more.
        let ack = deliver(&mut b, resume);
        let told = deliver(&mut a, ack);
        assert!(!frames(told).iter().any(|f| matches!(f, ReplFrame::InSync { .. })), "InSync from a failed store");
        let mut again = Vec::new();
        a.reaffirm_in_sync(&mut again);
        assert!(again.is_empty(), "reaffirmed from a failed store: {again:?}");
        assert_eq!(b.in_sync(), None);
    }

    #[test]
    fn a_healthy_primary_tells_the_follower_once_its_meta_is_durable() {
        let (mut a, mut b, resume) = streaming_pair();
        let ack = deliver(&mut b, resume);
        let told = deliver(&mut a, ack);
        let persist = told.iter().position(|a| matches!(a, Action::PersistMeta { flush: true }));
        let insync = told.iter().position(|a| matches!(a, Action::Send(_, ReplFrame::InSync { .. })));
        assert!(persist.is_some() && persist < insync, "{told:?}");
        deliver(&mut b, told);
        assert!(b.in_sync().is_some());
    }

    fn commit(a: &mut Replica, now: u64) -> Vec<Action> {
        let adm = a.admit(now).expect("admitted");
        let mut out = Vec::new();
        a.committed(adm.first_seq, adm.first_seq, Bytes::from_static(b"op"), &mut out);
        out
    }

    fn confirms(out: &[Action]) -> bool {
        out.iter().any(|a| matches!(a, Action::Confirm { .. }))
    }

    #[test]
    fn a_voted_promotion_is_in_the_voted_epoch_or_not_at_all() {
        let mut a = node(7);
        // The granter's heartbeat raised the floor to exactly the voted epoch.
        a.raise_floor(4, false, &mut Vec::new());
        assert_eq!(a.promote(4, 7, None, Promotion::Voted, &mut Vec::new()), Ok(4));
        // Heard of epoch 5 before the promotion ran: the vote for 4 is void
        // (a claimed promotion would have gone to 6, past the peer's promise).
        let mut b = node(8);
        b.raise_floor(5, false, &mut Vec::new());
        assert!(b.promote(4, 8, None, Promotion::Voted, &mut Vec::new()).is_err());
        assert!(!b.is_primary());
        assert_eq!(b.promote(4, 8, None, Promotion::Claimed, &mut Vec::new()), Ok(6));
    }

    #[test]
    fn a_claim_to_have_served_last_stands_only_over_an_older_idle_peer() {
        // Promoted alone, then stepped down for lack of a majority: it claims.
        let claimant = || {
            let mut a = node(7);
            a.promote(3, 7, None, Promotion::Claimed, &mut Vec::new()).expect("promotes");
            a.demote(true, &mut Vec::new());
            assert!(a.meta().serve_alone);
            a
        };
        for (epoch, serving, stands) in [(2, false, true), (3, false, false), (4, false, false), (2, true, false)] {
            let mut a = claimant();
            let mut out = Vec::new();
            a.peer_position(epoch, serving, &mut out);
            assert_eq!(a.meta().serve_alone, stands, "peer in epoch {epoch}, serving {serving}");
            let persisted = out.iter().any(|a| matches!(a, Action::PersistMeta { flush: true }));
            assert_eq!(persisted, !stands, "{out:?}");
        }
    }

    #[test]
    fn without_peer_or_gateway_nothing_is_confirmed_single_copy() {
        let (mut a, mut b, resume) = streaming_pair();
        let ack = deliver(&mut b, resume);
        let told = deliver(&mut a, ack);
        deliver(&mut b, told);
        // The follower's connection is lost: what comes now waits for it.
        a.connection_lost(CONN, &mut Vec::new());
        let held = commit(&mut a, 0);
        assert!(!confirms(&held), "{held:?}");
        // Declared down, but the gateway is gone too: no majority, it waits on.
        let mut out = Vec::new();
        a.peer_down(0, false, &mut out);
        assert!(!confirms(&out), "confirmed without a majority: {out:?}");
        assert!(!confirms(&commit(&mut a, 0)));
        // The gateway answers again: single-copy, as active-alone.
        let mut out = Vec::new();
        a.peer_down(0, true, &mut out);
        assert!(confirms(&out), "{out:?}");
        assert!(confirms(&commit(&mut a, 0)));
        // Alone, then the gateway goes: nothing more is confirmed.
        a.peer_down(0, false, &mut Vec::new());
        assert!(!confirms(&commit(&mut a, 0)));
    }

    #[test]
    fn a_failed_primary_attaches_no_one_and_its_in_sync_follower_can_take_over() {
        let (mut a, mut b, resume) = streaming_pair();
        let ack = deliver(&mut b, resume);
        let told = deliver(&mut a, ack);
        deliver(&mut b, told);
        let gen = b.in_sync().expect("in sync");
        a.disk_failed("EIO".into(), &mut Vec::new());
        // The connection drops and comes back: the failed store attaches no
        // one (a Resume from it could not be trusted), and b stays in sync.
        a.connection_lost(CONN, &mut Vec::new());
        b.connection_lost(CONN, &mut Vec::new());
        let mut out = Vec::new();
        a.attach(CONN + 1, true, &mut out);
        assert!(out.is_empty(), "a failed store attached its peer: {out:?}");
        assert_eq!(b.in_sync(), Some(gen));
        assert!(b.promote(2, 8, Some(gen), Promotion::Claimed, &mut Vec::new()).is_ok());
    }
}
