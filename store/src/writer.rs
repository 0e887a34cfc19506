//! Group commit and replication: the one thread that writes the log.
//!
//! Submissions wait in a channel; the writer takes every one that is waiting
//! (up to a limit), gives their ops consecutive sequence numbers, writes them
//! as one batch record, flushes once (durability `local`/`replicated`), and
//! only then calls each submission's completion, in order. It also owns the
//! liveness index (which records can go) and the idempotence table, so both
//! change in exactly the order the log does.
//!
//! Within one commit the order of writes is: admin tree entries, the batch
//! record, flush, then deletions of dead records. sled recovers a prefix of
//! its log, so a record is never durable without its admin entries, and a
//! deletion is never durable without the ops that made it possible.
//!
//! # The pair
//!
//! On the active node a follower (the HA link to the passive) may be
//! attached: the writer first sends it a snapshot of everything live (the
//! log records, admin entries, idempotence marks), then every new record
//! right after its local flush. With `durability = replicated` and an
//! in-sync follower, completions wait until the follower acknowledges a
//! sequence at or past their record (it acknowledges after its own flush).
//! If the follower's connection is lost they keep waiting: a new connection
//! resumes the stream from the records kept in memory (`Resume`, no new
//! snapshot). Once the peer is declared down they are released as local
//! confirms (degraded), or failed with `require_replica`.
//!
//! On the passive node local submissions are refused; the writer applies
//! the records the active sends (same bytes, same keys), with the same
//! liveness index, so both stores delete the same records. Records of an
//! older epoch, or out of sequence, are refused (fencing).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use crate::index::LiveIndex;
use crate::op::{BatchBody, Op};
use crate::store::{Durability, QueueEntry, Recovered, Store, UserEntry, USER_PREFIX};
use crate::StoreError;

/// Called on the writer thread once the submission is durable (or failed).
/// It must not block: send a message and return.
pub type Completion = Box<dyn FnOnce(Result<Committed, StoreError>) + Send>;

/// Called on the writer thread once a replication frame is applied.
pub type ApplyDone = Box<dyn FnOnce(Result<Applied, StoreError>) + Send>;

/// What applying a replication frame produced.
#[derive(Debug, Default)]
pub struct Applied {
    /// The highest sequence now durable here, or `None` while a snapshot is
    /// still loading (nothing to acknowledge yet).
    pub ack: Option<u64>,
    /// Messages this node stored while it was active that its peer never
    /// acknowledged (a healed split), by queue key, taken out before the
    /// snapshot replaced them: the caller sends them to the new active.
    pub divergent: Vec<(String, crate::StoredMessage)>,
}

/// Called with the state recovered after a promotion.
pub type PromoteDone = Box<dyn FnOnce(Result<Recovered, StoreError>) + Send>;

/// What a completed submission learns.
#[derive(Debug)]
pub struct Committed {
    pub epoch: u64,
    /// Sequence number of `ops[0]` (meaningless when `ops` is empty).
    pub first_seq: u64,
    /// The submitted ops with sequence numbers assigned to their messages;
    /// empty when the submission was a duplicate publish.
    pub ops: Vec<Op>,
    /// The submission was an idempotent resend of something already stored.
    pub duplicate: bool,
}

/// What the active sends its follower, in order.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ReplFrame {
    /// A snapshot follows: the receiver forgets its replicated state.
    /// `stream` and `attach` (counting the active's attaches) name this
    /// attach: the receiver follows the latest one and ignores what an older
    /// connection still delivers.
    SnapshotBegin { epoch: u64, stream: u64, attach: u64 },
    /// One live log record (snapshot).
    Record {
        key: u64,
        #[serde(with = "serde_bytes")]
        raw: Vec<u8>,
    },
    /// One admin tree entry (snapshot).
    Admin {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// One idempotence mark (snapshot).
    Producer {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// The snapshot is complete; the receiver acknowledges `next_seq - 1`.
    /// `stream` names the active's replication stream, so that a follower
    /// whose connection moves can resume it rather than load a new snapshot.
    SnapshotEnd { next_seq: u64, epoch: u64, stream: u64 },
    /// Instead of a snapshot, on a new connection: the tail of `stream` follows
    /// from `from_seq` (the follower skips what it already holds). `in_sync`:
    /// every confirm waited for this follower while it was away, so it stays a
    /// takeover candidate; otherwise it is not in sync until the next `InSync`.
    Resume { stream: u64, from_seq: u64, in_sync: bool, attach: u64 },
    /// From here on the active holds every confirm for this follower's ack:
    /// only now may the passive count itself in sync (a takeover candidate).
    InSync { seq: u64 },
    /// A new record, after the snapshot (same bytes as in the active's log).
    Batch {
        first_seq: u64,
        last_seq: u64,
        #[serde(with = "serde_bytes")]
        raw: Vec<u8>,
    },
}

/// Where the writer sends replication frames (the HA link's sending task).
pub type FollowerTx = tokio::sync::mpsc::UnboundedSender<ReplFrame>;

enum Request {
    Submit(Vec<Op>, Completion),
    /// Complete once everything submitted before it is done.
    Barrier(Completion),
    /// `true`: the follower may resume the stream's tail instead of a snapshot.
    AttachFollower(FollowerTx, bool),
    DetachFollower,
    /// The peer is declared down (not just a connection lost): release what
    /// waits for it as single-copy confirms, or fail it (`require_replica`).
    PeerDown,
    /// The follower has flushed everything up to this sequence.
    PeerAck(u64),
    /// Passive: apply a frame from the active, received on connection `source`.
    Apply(ReplFrame, u64, ApplyDone),
    /// Become active in `epoch`, and recover the live state for serving.
    Promote(u64, PromoteDone),
    /// The new active stored these handed-over messages (epoch, seq).
    HandoverStored(Vec<(u64, u64)>),
    /// Become passive: refuse local submissions from now on. `true`: this node
    /// stays the last active one (it stepped down for lack of a majority, and
    /// nobody is known to have taken over).
    Demote(bool, Completion),
}

/// Counters readable from any thread.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub batches: AtomicU64,
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub last_flush_us: AtomicU64,
    pub live_batches: AtomicU64,
    pub live_bytes: AtomicU64,
    pub last_seq: AtomicU64,
    pub epoch: AtomicU64,
    /// Highest sequence the follower acknowledged (active side).
    pub peer_acked: AtomicU64,
    /// A follower is attached and has caught up (active side).
    pub follower_in_sync: AtomicBool,
    /// This (passive) store holds a complete, current copy of the active's.
    pub in_sync: AtomicBool,
    /// Pair only: the active's lease, in milliseconds since `lease_base`
    /// (0: no lease, a single node). Past it nothing is written or confirmed.
    pub lease_until_ms: AtomicU64,
}

/// Handle to the writer thread. Cloning it is cheap; the thread ends when
/// every handle is dropped, after finishing what was submitted.
#[derive(Clone)]
pub struct Writer {
    tx: Sender<Request>,
    /// For reads of admin objects from other threads (sled is thread-safe).
    store: Store,
    stats: Arc<WriterStats>,
    lease_base: Instant,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

/// Writer options.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub durability: Durability,
    /// Most ops in one batch record.
    pub max_batch_ops: usize,
    /// Start accepting local submissions (a single node); a pair member starts passive.
    pub active: bool,
    /// With `replicated`: refuse to confirm when no in-sync follower is attached.
    pub require_replica: bool,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig { durability: Durability::Local, max_batch_ops: 1024, active: true, require_replica: false }
    }
}

impl Writer {
    /// Start the writer thread over `store`, continuing from `recovered`.
    pub fn start(
        store: Store,
        recovered: &mut Recovered,
        config: WriterConfig,
    ) -> Result<(Writer, JoinHandle<()>), StoreError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let stats = Arc::new(WriterStats::default());
        stats.last_seq.store(recovered.next_seq - 1, Ordering::Relaxed);
        stats.epoch.store(recovered.epoch, Ordering::Relaxed);
        let lease_base = Instant::now();
        let config_active = config.active;
        let state = WriterState {
            lease_base,
            store: store.clone(),
            active: config.active,
            config,
            epoch: recovered.epoch,
            next_seq: recovered.next_seq,
            index: std::mem::take(&mut recovered.index),
            dedup: recovered.dedup.clone(),
            dirty_dedup: HashMap::new(),
            stats: stats.clone(),
            failed: None,
            follower: None,
            held: VecDeque::new(),
            awaiting_peer: false,
            snapshot_loading: false,
            // Survives a restart: the hand-over must not be forgotten.
            // A node that crashed while confirming alone hands those records over too.
            diverged_after: if config_active {
                None
            } else {
                [store.diverged_after()?, store.alone_since()?.map(|a| a.saturating_sub(1))].into_iter().flatten().min()
            },
            divergent: Vec::new(),
            stream: rand::random(),
            tail: None,
            resume_at: None,
            // Survives a restart: a passive that was a consistent copy resumes.
            following: if config_active { None } else { store.following()? },
            resumed_from: None,
            resync_needed: false,
            attaches: 0,
            alone_since: store.alone_since()?,
            source: None,
            begun: None,
        };
        state.publish_stats();
        let handle = std::thread::Builder::new()
            .name("twinmq-store-writer".into())
            .spawn(move || state.run(rx))
            .map_err(StoreError::Thread)?;
        Ok((Writer { tx, store, stats, lease_base }, handle))
    }

    fn send(&self, r: Request) {
        if let Err(crossbeam_channel::SendError(r)) = self.tx.send(r) {
            match r {
                Request::Submit(_, done) | Request::Barrier(done) | Request::Demote(_, done) => {
                    done(Err(StoreError::Closed))
                }
                Request::Apply(_, _, done) => done(Err(StoreError::Closed)),
                Request::Promote(_, done) => done(Err(StoreError::Closed)),
                Request::AttachFollower(..)
                | Request::HandoverStored(_)
                | Request::DetachFollower
                | Request::PeerDown
                | Request::PeerAck(_) => {}
            }
        }
    }

    /// The users as stored now (committed here, or applied from the active).
    pub fn users(&self) -> Result<std::collections::BTreeMap<String, crate::UserRecord>, StoreError> {
        self.store.users()
    }

    /// Queue `ops` for the next group commit; `done` runs when they are durable.
    /// Enqueues carrying a producer id already stored with an equal or higher
    /// producer sequence make the whole submission a duplicate.
    pub fn submit(&self, ops: Vec<Op>, done: Completion) {
        self.send(Request::Submit(ops, done));
    }

    /// `done` runs after everything submitted before this call has completed.
    pub fn barrier(&self, done: Completion) {
        self.send(Request::Barrier(done));
    }

    /// Active: send a snapshot and then every new record to `tx`. With
    /// `resume`, a follower that held a consistent copy of this node's current
    /// stream (its connection moved) gets only the records it lacks, when the
    /// writer still has them in memory (DESIGN.md section 5, catch-up).
    pub fn attach_follower(&self, tx: FollowerTx, resume: bool) {
        self.send(Request::AttachFollower(tx, resume));
    }

    /// Active: the follower is gone; release (or fail) what waits for it.
    pub fn detach_follower(&self) {
        self.send(Request::DetachFollower);
    }

    /// Active: the peer is down (the role arbiter's verdict): confirms that
    /// wait for it are released as single-copy (or failed with `require_replica`).
    pub fn peer_down(&self) {
        self.send(Request::PeerDown);
    }

    /// Active: the follower flushed everything through `seq`.
    pub fn peer_ack(&self, seq: u64) {
        self.send(Request::PeerAck(seq));
    }

    /// Passive: apply a replication frame that arrived on connection `source`
    /// (any id unique among this node's connections); `done` gets the highest
    /// durable sequence. Only the connection that delivered the latest
    /// `SnapshotBegin`/`Resume` is followed: frames an older one still
    /// delivers are ignored.
    pub fn apply(&self, frame: ReplFrame, source: u64, done: ApplyDone) {
        self.send(Request::Apply(frame, source, done));
    }

    /// Passive after a split: the new active stored these messages this node
    /// handed over (`(epoch, seq)` of each); they are forgotten here.
    pub fn handover_stored(&self, ids: Vec<(u64, u64)>) {
        self.send(Request::HandoverStored(ids));
    }

    /// Become active in `epoch` (persisted before `done` runs).
    pub fn promote(&self, epoch: u64, done: PromoteDone) {
        self.send(Request::Promote(epoch, done));
    }

    /// Become passive; `done` runs once no further local op will be written.
    pub fn demote(&self, still_last_active: bool, done: Completion) {
        self.send(Request::Demote(still_last_active, done));
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Pair: this node may write and confirm until `until` (its lease: the last
    /// time it heard its peer or the gateway, plus `isolation_timeout`). A
    /// process that was frozen past its lease refuses to write or confirm
    /// before its role arbiter has even run (DESIGN.md section 4, leases).
    pub fn renew_lease(&self, until: Instant) {
        let ms = until.saturating_duration_since(self.lease_base).as_millis() as u64;
        self.stats.lease_until_ms.store(ms.max(1), Ordering::Relaxed);
    }
}

struct Follower {
    tx: FollowerTx,
    /// The sequence whose ack means the follower has caught up with the snapshot.
    synced_at: u64,
    acked: u64,
    in_sync: bool,
    /// The follower holds a consistent prefix of the stream through `acked`
    /// (it resumed, or acknowledged the end of its snapshot).
    consistent: bool,
}

/// Most bytes of recent records kept in memory for a follower to resume from.
const TAIL_BYTES: usize = 32 * 1024 * 1024;

/// The active's recent records, oldest first, contiguous.
#[derive(Default)]
struct Tail {
    records: VecDeque<(u64, u64, Vec<u8>)>,
    bytes: usize,
}

impl Tail {
    fn push(&mut self, first_seq: u64, last_seq: u64, raw: Vec<u8>) {
        self.bytes += raw.len();
        self.records.push_back((first_seq, last_seq, raw));
        while self.bytes > TAIL_BYTES {
            let Some((_, _, old)) = self.records.pop_front() else { break };
            self.bytes -= old.len();
        }
    }

    /// The records from `from_seq` on, if every one of them is still here.
    fn from(&self, from_seq: u64, next_seq: u64) -> Option<impl Iterator<Item = &(u64, u64, Vec<u8>)>> {
        let covered = from_seq == next_seq || self.records.iter().any(|(first, _, _)| *first == from_seq);
        covered.then(|| self.records.iter().filter(move |(first, _, _)| *first >= from_seq))
    }
}

/// Completions waiting for the follower's ack of `seq`.
struct Held {
    seq: u64,
    done: Completion,
    result: Committed,
}

struct WriterState {
    lease_base: Instant,
    store: Store,
    config: WriterConfig,
    /// Local submissions are accepted (this node is active).
    active: bool,
    epoch: u64,
    next_seq: u64,
    index: LiveIndex,
    dedup: HashMap<u64, u64>,
    /// Idempotence marks not yet written to the producers tree.
    dirty_dedup: HashMap<u64, u64>,
    stats: Arc<WriterStats>,
    /// After a failed write or flush nothing more is accepted: what is on
    /// disk can no longer be known to match what was confirmed.
    failed: Option<String>,
    follower: Option<Follower>,
    held: VecDeque<Held>,
    /// An in-sync follower went away: confirms keep waiting until it is back
    /// in sync or the peer is declared down (a lost connection is not a lost peer).
    awaiting_peer: bool,
    /// Passive: between SnapshotBegin and SnapshotEnd.
    snapshot_loading: bool,
    /// Set when this node stepped down: messages above this sequence were
    /// never acknowledged by the peer and must be handed to it before a
    /// snapshot overwrites them.
    diverged_after: Option<u64>,
    divergent: Vec<(String, crate::StoredMessage)>,
    /// Active: this node's replication stream since it became active.
    stream: u64,
    /// Active: recent records, kept once a follower has attached.
    tail: Option<Tail>,
    /// Active: the last follower's consistent acknowledgement in `stream`.
    resume_at: Option<u64>,
    /// Passive: the stream this store is a consistent copy of, if any.
    following: Option<u64>,
    /// Passive: after a `Resume` from this sequence, records already held are skipped.
    resumed_from: Option<u64>,
    /// Passive: a frame was refused; nothing but a new snapshot or resume is
    /// applied (or acknowledged) until the active starts anew.
    resync_needed: bool,
    /// Active: attaches so far (named in `SnapshotBegin`/`Resume`).
    attaches: u64,
    /// The first record confirmed without the peer since it was last in sync
    /// (persisted: see `mark_alone_since`).
    alone_since: Option<u64>,
    /// Passive: the connection, and the (stream, attach), of the latest
    /// `SnapshotBegin`/`Resume`: the one replication stream followed.
    source: Option<u64>,
    begun: Option<(u64, u64)>,
}

impl WriterState {
    fn run(mut self, rx: Receiver<Request>) {
        let mut pending: Vec<Request> = Vec::new();
        while let Ok(first) = rx.recv() {
            match first {
                r @ (Request::Submit(..) | Request::Barrier(_)) => {
                    pending.push(r);
                    let mut ops = count_ops(&pending[0]);
                    let mut bytes = count_bytes(&pending[0]);
                    // Group commit: take what is waiting, but stop at anything
                    // that is not a submission (it must see the commit first).
                    while ops < self.config.max_batch_ops && bytes < MAX_BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(r @ (Request::Submit(..) | Request::Barrier(_))) => {
                                ops += count_ops(&r);
                                bytes += count_bytes(&r);
                                pending.push(r);
                            }
                            Ok(other) => {
                                self.commit(&mut pending);
                                self.handle_control(other, &rx);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if !pending.is_empty() {
                        self.commit(&mut pending);
                    }
                }
                other => self.handle_control(other, &rx),
            }
        }
        if let Err(e) = self.store.db.flush() {
            tracing::error!(error = %e, "final store flush failed");
        }
        tracing::debug!("store writer stopped");
    }

    fn handle_control(&mut self, r: Request, rx: &Receiver<Request>) {
        match r {
            Request::Submit(..) | Request::Barrier(_) => {
                let mut v = vec![r];
                self.commit(&mut v);
            }
            Request::AttachFollower(tx, resume) => self.attach(tx, resume),
            Request::DetachFollower => self.detach(),
            Request::PeerDown => self.peer_down(),
            Request::PeerAck(seq) => self.peer_ack(seq),
            Request::HandoverStored(ids) => {
                let n = ids.len();
                if let Err(e) = self.store.handed_over(&ids).and_then(|_| Ok(self.store.db.flush()?)) {
                    tracing::error!(error = %e, "could not forget handed-over messages; they will be sent again");
                } else {
                    tracing::info!(messages = n, "the new active stored the messages handed over after the split");
                }
            }
            Request::Apply(frame, source, done) => {
                // Group the waiting record frames: one flush for all of them.
                let mut batch = vec![(frame, source, done)];
                while let Ok(next) = rx.try_recv() {
                    match next {
                        Request::Apply(f, src, d) => batch.push((f, src, d)),
                        other => {
                            self.apply_all(batch);
                            self.handle_control(other, rx);
                            return;
                        }
                    }
                }
                self.apply_all(batch);
            }
            Request::Promote(epoch, done) => done(self.promote(epoch)),
            Request::Demote(still_last_active, done) => {
                if self.active {
                    // Every record below `alone_since` waited for the peer's ack.
                    let acked = self.stats.peer_acked.load(Ordering::Relaxed);
                    let acked = self.alone_since.map_or(acked, |a| acked.max(a.saturating_sub(1)));
                    if self.next_seq - 1 > acked {
                        self.diverged_after = Some(acked);
                        if let Err(e) = self.store.set_diverged_after(Some(acked)) {
                            tracing::error!(error = %e, "could not record what the peer never acknowledged");
                        }
                    }
                    self.forget_stream();
                }
                self.follower = None;
                self.awaiting_peer = false;
                self.stats.follower_in_sync.store(false, Ordering::Relaxed);
                self.active = false;
                for h in self.held.drain(..) {
                    (h.done)(Err(StoreError::NotActive));
                }
                if let Err(e) = self.store.set_last_active(still_last_active).and_then(|_| Ok(self.store.db.flush()?)) {
                    tracing::error!(error = %e, "could not record the step-down");
                }
                self.stats.in_sync.store(false, Ordering::Relaxed);
                done(Ok(self.nothing()));
            }
        }
    }

    fn commit(&mut self, pending: &mut Vec<Request>) {
        let refusal = if let Some(reason) = &self.failed {
            Some(StoreError::Failed(reason.clone()))
        } else if !self.active || !self.lease_valid() {
            Some(StoreError::NotActive)
        } else if self.config.require_replica
            && self.config.durability == Durability::Replicated
            && !self.follower.as_ref().is_some_and(|f| f.in_sync)
        {
            Some(StoreError::NoReplica)
        } else {
            None
        };
        if let Some(err) = refusal {
            for r in pending.drain(..) {
                let e = match &err {
                    StoreError::Failed(s) => StoreError::Failed(s.clone()),
                    StoreError::NoReplica => StoreError::NoReplica,
                    _ => StoreError::NotActive,
                };
                complete(r, Err(e));
            }
            return;
        }
        // Assign sequence numbers, skipping idempotent duplicates.
        let first_seq = self.next_seq;
        let mut all_ops: Vec<Op> = Vec::new();
        let mut plan: Vec<(Request, Option<(u64, usize)>)> = Vec::with_capacity(pending.len());
        for r in pending.drain(..) {
            match r {
                Request::Submit(ops, done) => {
                    if ops.is_empty() || self.is_duplicate(&ops) {
                        plan.push((Request::Submit(Vec::new(), done), None));
                        continue;
                    }
                    let start = self.next_seq;
                    let n = ops.len();
                    for mut op in ops {
                        if let Op::Enqueue { message, .. } = &mut op {
                            message.epoch = self.epoch;
                            message.seq = self.next_seq;
                            if message.producer_id != 0 {
                                self.dedup.insert(message.producer_id, message.producer_seq);
                                self.dirty_dedup.insert(message.producer_id, message.producer_seq);
                            }
                        }
                        all_ops.push(op);
                        self.next_seq += 1;
                    }
                    plan.push((Request::Submit(Vec::new(), done), Some((start, n))));
                }
                other => plan.push((other, None)),
            }
        }

        let mut results: Vec<(Request, Committed)> = Vec::with_capacity(plan.len());
        if !all_ops.is_empty() {
            if !self.holds_for_peer() {
                // Confirmed here alone: durable with the record (same flush).
                self.mark_alone_since(first_seq);
            }
            let body = BatchBody { epoch: self.epoch, first_seq, ops: all_ops };
            match self.write(&body) {
                Ok((dead, raw)) => {
                    self.delete(&dead);
                    let last_seq = body.last_seq();
                    if let Some(tail) = &mut self.tail {
                        tail.push(first_seq, last_seq, raw.clone());
                    }
                    self.ship(ReplFrame::Batch { first_seq, last_seq, raw });
                }
                Err(e) => {
                    let reason = e.to_string();
                    tracing::error!(error = %e, first_seq, "store write failed; refusing further writes");
                    self.failed = Some(reason.clone());
                    for (r, _) in plan {
                        complete(r, Err(StoreError::Failed(reason.clone())));
                    }
                    return;
                }
            }
            let mut ops = body.ops.into_iter();
            for (r, slot) in plan {
                let c = match slot {
                    Some((start, n)) => Committed {
                        epoch: self.epoch,
                        first_seq: start,
                        ops: ops.by_ref().take(n).collect(),
                        duplicate: false,
                    },
                    None => self.duplicate(),
                };
                results.push((r, c));
            }
        } else {
            for (r, _) in plan {
                let c = self.duplicate();
                results.push((r, c));
            }
        }
        let hold = self.holds_for_peer();
        let seq = self.next_seq - 1;
        for (r, c) in results {
            let done = match r {
                Request::Submit(_, done) | Request::Barrier(done) => done,
                _ => continue,
            };
            if hold || !self.held.is_empty() {
                // Keep order with what is already waiting.
                self.held.push_back(Held { seq, done, result: c });
            } else {
                done(Ok(c));
            }
        }
        if !hold {
            self.release_held(u64::MAX);
        } else if let Some(f) = self.follower.as_ref().filter(|f| f.consistent) {
            // What the follower already acknowledged (a barrier with nothing new) goes now.
            let acked = f.acked;
            self.release_held(acked);
        }
    }

    /// Durability `replicated` with an in-sync follower, or one whose
    /// connection was lost but which is not declared down: confirm after its ack.
    fn holds_for_peer(&self) -> bool {
        self.config.durability == Durability::Replicated
            && (self.awaiting_peer || self.follower.as_ref().is_some_and(|f| f.in_sync))
    }

    /// A pair member confirms from `seq` on without its peer: recorded (not
    /// flushed here) so that, should this node crash and the peer take over,
    /// it hands those records over when it returns (DESIGN.md section 5).
    fn mark_alone_since(&mut self, seq: u64) {
        if self.config.durability != Durability::Replicated || self.alone_since.is_some_and(|s| s <= seq) {
            return;
        }
        match self.store.set_alone_since(Some(seq)) {
            Ok(()) => self.alone_since = Some(seq),
            Err(e) => tracing::error!(error = %e, "could not record confirming without the peer"),
        }
    }

    fn lease_valid(&self) -> bool {
        let until = self.stats.lease_until_ms.load(Ordering::Relaxed);
        until == 0 || (self.lease_base.elapsed().as_millis() as u64) < until
    }

    fn is_duplicate(&self, ops: &[Op]) -> bool {
        ops.iter().any(|op| match op {
            Op::Enqueue { message, .. } if message.producer_id != 0 => {
                self.dedup.get(&message.producer_id).is_some_and(|&last| message.producer_seq <= last)
            }
            _ => false,
        })
    }

    fn duplicate(&self) -> Committed {
        Committed { epoch: self.epoch, first_seq: 0, ops: Vec::new(), duplicate: true }
    }

    fn nothing(&self) -> Committed {
        Committed { epoch: self.epoch, first_seq: 0, ops: Vec::new(), duplicate: false }
    }

    /// Admin entries, the record, one flush. Returns the records now dead and the raw record.
    fn write(&mut self, body: &BatchBody) -> Result<(Vec<u64>, Vec<u8>), StoreError> {
        self.materialise_admin(body)?;
        let raw = body.encode()?;
        let len = raw.len() as u64;
        self.store.log.insert(body.first_seq.to_be_bytes(), raw.as_slice())?;
        if self.config.durability != Durability::None {
            self.flush()?;
        }
        self.count(body, len);
        Ok((self.index.apply(body, len), raw))
    }

    fn materialise_admin(&self, body: &BatchBody) -> Result<(), StoreError> {
        for (i, op) in body.ops.iter().enumerate() {
            match op {
                Op::PutQueue { key, spec } => {
                    let entry = QueueEntry { spec: spec.clone(), created_seq: body.first_seq + i as u64 };
                    let raw = rmp_serde::to_vec(&entry).map_err(|e| StoreError::Encode(e.to_string()))?;
                    self.store.admin.insert(key.as_bytes(), raw)?;
                }
                Op::DeleteQueue { key } => {
                    self.store.admin.remove(key.as_bytes())?;
                }
                Op::PutUser { name, user } => {
                    let entry = UserEntry { user: user.clone(), seq: body.first_seq + i as u64 };
                    let raw = rmp_serde::to_vec(&entry).map_err(|e| StoreError::Encode(e.to_string()))?;
                    self.store.admin.insert(format!("{USER_PREFIX}{name}").as_bytes(), raw)?;
                }
                Op::DeleteUser { name } => {
                    self.store.admin.remove(format!("{USER_PREFIX}{name}").as_bytes())?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        let t = Instant::now();
        self.store.db.flush()?;
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.stats.last_flush_us.store(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn count(&self, body: &BatchBody, len: u64) {
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.ops.fetch_add(body.ops.len() as u64, Ordering::Relaxed);
        self.stats.bytes.fetch_add(len, Ordering::Relaxed);
        self.stats.last_seq.store(body.last_seq(), Ordering::Relaxed);
    }

    /// Delete dead records (not a failure of what was confirmed if it fails:
    /// the records stay and are found dead again at the next open).
    fn delete(&mut self, dead: &[u64]) {
        if !dead.is_empty() {
            if let Err(e) = self.try_delete(dead) {
                tracing::error!(error = %e, "could not delete dead batch records");
            }
        }
        self.publish_stats();
    }

    fn try_delete(&mut self, dead: &[u64]) -> Result<(), StoreError> {
        self.store.persist_floor(self.next_seq, self.dirty_dedup.iter())?;
        self.dirty_dedup.clear();
        let mut b = sled::Batch::default();
        for d in dead {
            b.remove(&d.to_be_bytes());
        }
        self.store.log.apply_batch(b)?;
        Ok(())
    }

    fn publish_stats(&self) {
        self.stats.live_batches.store(self.index.live_batches() as u64, Ordering::Relaxed);
        self.stats.live_bytes.store(self.index.live_bytes(), Ordering::Relaxed);
        self.stats.epoch.store(self.epoch, Ordering::Relaxed);
    }

    // ----- the active side of replication -----

    fn ship(&mut self, frame: ReplFrame) {
        if let Some(f) = &self.follower {
            if f.tx.send(frame).is_err() {
                self.detach();
            }
        }
    }

    fn attach(&mut self, tx: FollowerTx, resume: bool) {
        if !self.active {
            tracing::warn!("a follower asked to attach to a passive store; ignored");
            return;
        }
        if self.follower.is_some() {
            self.detach();
        }
        self.attaches += 1;
        let attach = self.attaches;
        let tail = self.tail.get_or_insert_with(Tail::default);
        let synced_at = self.next_seq - 1;
        if let Some(acked) = self.resume_at.filter(|_| resume) {
            if let Some(records) = tail.from(acked + 1, self.next_seq) {
                let frames = std::iter::once(ReplFrame::Resume {
                    stream: self.stream,
                    from_seq: acked + 1,
                    in_sync: self.awaiting_peer,
                    attach,
                })
                .chain(records.map(|(first_seq, last_seq, raw)| ReplFrame::Batch {
                    first_seq: *first_seq,
                    last_seq: *last_seq,
                    raw: raw.clone(),
                }));
                let mut sent = 0u64;
                for f in frames {
                    if tx.send(f).is_err() {
                        return;
                    }
                    sent += 1;
                }
                tracing::info!(
                    from_seq = acked + 1,
                    synced_at,
                    records = sent - 1,
                    "peer resumes the replication stream"
                );
                self.follower = Some(Follower { tx, synced_at, acked, in_sync: false, consistent: true });
                return;
            }
            tracing::info!(acked, "the records the peer lacks are no longer in memory; sending a snapshot");
        }
        match self.snapshot(&tx, attach) {
            Ok(()) => {
                tracing::info!(synced_at, live_batches = self.index.live_batches(), "snapshot sent to the peer");
                self.follower = Some(Follower { tx, synced_at, acked: 0, in_sync: false, consistent: false });
            }
            Err(e) => tracing::error!(error = %e, "could not send a snapshot to the peer"),
        }
    }

    /// The stream ends (a role change): a follower of it must load a snapshot.
    fn forget_stream(&mut self) {
        self.stream = rand::random();
        self.tail = None;
        self.resume_at = None;
        self.following = None;
        self.resumed_from = None;
    }

    fn snapshot(&self, tx: &FollowerTx, attach: u64) -> Result<(), StoreError> {
        let gone = |_| StoreError::Closed;
        tx.send(ReplFrame::SnapshotBegin { epoch: self.epoch, stream: self.stream, attach }).map_err(gone)?;
        for kv in self.store.admin.iter() {
            let (k, v) = kv?;
            tx.send(ReplFrame::Admin { key: k.to_vec(), value: v.to_vec() }).map_err(gone)?;
        }
        // Marks not yet persisted are covered by the records still in the log.
        for kv in self.store.producers.iter() {
            let (k, v) = kv?;
            tx.send(ReplFrame::Producer { key: k.to_vec(), value: v.to_vec() }).map_err(gone)?;
        }
        for kv in self.store.raw_batches_from(0) {
            let (key, raw) = kv?;
            tx.send(ReplFrame::Record { key, raw }).map_err(gone)?;
        }
        tx.send(ReplFrame::SnapshotEnd { next_seq: self.next_seq, epoch: self.epoch, stream: self.stream })
            .map_err(gone)?;
        Ok(())
    }

    fn detach(&mut self) {
        if let Some(f) = self.follower.take() {
            tracing::info!("peer detached from replication");
            self.resume_at = f.consistent.then_some(f.acked);
            if f.in_sync && self.config.durability == Durability::Replicated {
                // The passive may still count itself in sync: what waits for it
                // keeps waiting until it is back, or declared down.
                self.awaiting_peer = true;
            }
        }
        self.stats.follower_in_sync.store(false, Ordering::Relaxed);
        if !self.awaiting_peer {
            self.peer_down();
        }
    }

    fn peer_down(&mut self) {
        if self.follower.is_some() {
            // A stale verdict: the peer is attached again (maybe still catching
            // up on a resumed stream that told it it is in sync). A dead or
            // silent connection is detached first; the verdict, repeated every
            // arbiter tick while the peer is down, applies then.
            return;
        }
        self.awaiting_peer = false;
        if !self.lease_valid() {
            // Frozen past the lease: the peer may have taken over without these.
            for h in self.held.drain(..) {
                (h.done)(Err(StoreError::NotActive));
            }
        } else if self.config.require_replica {
            for h in self.held.drain(..) {
                (h.done)(Err(StoreError::NoReplica));
            }
        } else {
            // Degraded: what waited for the peer is durable here; confirm it.
            if !self.held.is_empty() {
                self.mark_alone_since(self.stats.peer_acked.load(Ordering::Relaxed) + 1);
                if let Err(e) = self.flush() {
                    tracing::error!(error = %e, "could not record confirming without the peer");
                }
            }
            self.release_held(u64::MAX);
        }
    }

    fn peer_ack(&mut self, seq: u64) {
        // Never believe an ack beyond what was shipped.
        let seq = seq.min(self.next_seq - 1);
        let Some(f) = &mut self.follower else { return };
        f.acked = f.acked.max(seq);
        self.stats.peer_acked.store(f.acked, Ordering::Relaxed);
        if !f.in_sync && f.acked >= f.synced_at {
            f.in_sync = true;
            f.consistent = true;
            self.awaiting_peer = false;
            self.stats.follower_in_sync.store(true, Ordering::Relaxed);
            tracing::info!(seq = f.acked, "peer in sync");
            // The peer holds everything: nothing is ours alone any more.
            if self.alone_since.take().is_some() {
                if let Err(e) = self.store.set_alone_since(None) {
                    tracing::error!(error = %e, "could not record that the peer is in sync");
                }
            }
            // From now on every commit is held for this follower; tell it so.
            let marker = ReplFrame::InSync { seq: self.next_seq - 1 };
            self.ship(marker);
        }
        self.release_held(seq);
    }

    fn release_held(&mut self, seq: u64) {
        while self.held.front().is_some_and(|h| h.seq <= seq) {
            let h = self.held.pop_front().expect("front exists");
            (h.done)(Ok(h.result));
        }
    }

    fn promote(&mut self, epoch: u64) -> Result<Recovered, StoreError> {
        if self.snapshot_loading {
            return Err(StoreError::Replication("a snapshot is half loaded; this store cannot serve".into()));
        }
        if epoch <= self.epoch {
            return Err(StoreError::Fenced { got: epoch, current: self.epoch });
        }
        self.store.set_epoch_unflushed(epoch)?;
        self.store.set_last_active(true)?;
        self.store.set_next_seq(self.next_seq)?;
        self.store.set_following(None)?;
        self.store.set_diverged_after(None)?;
        self.diverged_after = None;
        self.take_back_handover(epoch)?;
        self.flush()?;
        let mut recovered = self.store.recover()?;
        self.epoch = epoch;
        recovered.epoch = epoch;
        self.next_seq = recovered.next_seq;
        self.index = std::mem::take(&mut recovered.index);
        self.dedup = recovered.dedup.clone();
        self.dirty_dedup.clear();
        self.active = true;
        self.awaiting_peer = false;
        self.snapshot_loading = false;
        self.forget_stream();
        self.stats.in_sync.store(false, Ordering::Relaxed);
        self.publish_stats();
        Ok(recovered)
    }

    /// Becoming active with messages it handed over after a split that the
    /// peer never confirmed storing: they are stored here again, in the
    /// queues they were in (at-least-once: the peer may have them too).
    fn take_back_handover(&mut self, epoch: u64) -> Result<(), StoreError> {
        let pending = self.store.pending_handover()?;
        if pending.is_empty() {
            return Ok(());
        }
        let ids: Vec<(u64, u64)> = pending.iter().map(|(_, m)| (m.epoch, m.seq)).collect();
        let mut ops = Vec::new();
        let mut created = std::collections::HashSet::new();
        let mut seq = self.next_seq;
        for (key, mut message) in pending {
            if self.store.admin.get(key.as_bytes())?.is_none() && !created.contains(&key) {
                if !key.starts_with("q/") {
                    tracing::warn!(queue = %key, "a message kept for the hand-over names a subscription that no longer exists");
                    continue;
                }
                ops.push(Op::PutQueue { key: key.clone(), spec: crate::QueueSpec { kind: crate::QueueKind::Queue } });
                created.insert(key.clone());
                seq += 1;
            }
            message.epoch = epoch;
            message.seq = seq;
            message.producer_id = 0;
            ops.push(Op::Enqueue { message, queues: vec![key] });
            seq += 1;
        }
        if !ops.is_empty() {
            // A commit like any other (the index it updates is rebuilt by the promotion).
            let body = BatchBody { epoch, first_seq: self.next_seq, ops };
            self.write(&body)?;
            self.next_seq = body.last_seq() + 1;
            self.store.set_next_seq(self.next_seq)?;
        }
        self.store.handed_over(&ids)?;
        tracing::warn!(
            messages = ids.len(),
            "messages handed over after a split were never stored by the peer; stored here"
        );
        Ok(())
    }

    // ----- the passive side of replication -----

    /// Live messages stored above `after` (the peer's last acknowledgement).
    fn divergent_messages(&self, after: u64) -> Result<Vec<(String, crate::StoredMessage)>, StoreError> {
        let recovered = self.store.recover()?;
        let mut out = Vec::new();
        for (queue, messages) in recovered.messages {
            out.extend(messages.into_iter().filter(|m| m.seq > after).map(|m| (queue.clone(), m)));
        }
        out.sort_by_key(|(_, m)| m.seq);
        Ok(out)
    }

    fn apply_all(&mut self, frames: Vec<(ReplFrame, u64, ApplyDone)>) {
        // Per frame: ignored (another connection's, or dropped while a resync
        // is needed), applied, or refused (the refusal goes back on its own
        // connection; one is enough for the active to start anew).
        let mut dones: Vec<(ApplyDone, Result<bool, StoreError>)> = Vec::with_capacity(frames.len());
        let mut flush_needed = false;
        for (frame, source, done) in frames {
            let starts_anew = matches!(frame, ReplFrame::SnapshotBegin { .. } | ReplFrame::Resume { .. });
            let outcome = if !self.follows(&frame, source) || (self.resync_needed && !starts_anew) {
                Ok(false)
            } else {
                match self.apply_one(frame) {
                    Ok(needs_flush) => {
                        flush_needed |= needs_flush;
                        Ok(true)
                    }
                    Err(e) => {
                        self.need_resync(&e);
                        Err(e)
                    }
                }
            };
            dones.push((done, outcome));
        }
        if flush_needed && self.config.durability != Durability::None {
            if let Err(e) = self.flush() {
                self.need_resync(&e);
                if let Some(last) = dones.iter_mut().rev().find(|(_, o)| matches!(o, Ok(true))) {
                    last.1 = Err(e);
                }
            }
        }
        // While a snapshot loads, `next_seq` is the old store's: never acknowledge it.
        let through = (!self.snapshot_loading && !self.resync_needed).then(|| self.next_seq - 1);
        for (done, outcome) in dones {
            match outcome {
                Err(e) => done(Err(StoreError::Replication(e.to_string()))),
                Ok(false) => done(Ok(Applied::default())),
                Ok(true) => done(Ok(Applied { ack: through, divergent: std::mem::take(&mut self.divergent) })),
            }
        }
        self.publish_stats();
    }

    /// A frame was refused: whatever half-applied state that left is no copy
    /// to resume from, not even after a restart.
    fn need_resync(&mut self, e: &StoreError) {
        self.following = None;
        self.resumed_from = None;
        self.resync_needed = true;
        if let Err(e) = self.store.set_following(None).and_then(|_| Ok(self.store.db.flush()?)) {
            tracing::error!(error = %e, "could not record that this store needs a resync");
        }
        tracing::warn!(error = %e, "replication frame refused; a resync is needed");
        self.stats.in_sync.store(false, Ordering::Relaxed);
    }

    /// Is `frame`, from connection `source`, part of the stream this node
    /// follows? A `SnapshotBegin`/`Resume` newer than the last one starts
    /// following its connection; anything else must come from that connection.
    fn follows(&mut self, frame: &ReplFrame, source: u64) -> bool {
        let begins = match frame {
            ReplFrame::SnapshotBegin { stream, attach, .. } | ReplFrame::Resume { stream, attach, .. } => {
                Some((*stream, *attach))
            }
            _ => None,
        };
        match begins {
            Some((stream, attach)) => {
                if self.begun.is_some_and(|(s, a)| s == stream && attach <= a) {
                    tracing::debug!(source, stream, attach, "an older attach of the stream arrived late; ignored");
                    return false;
                }
                self.begun = Some((stream, attach));
                self.source = Some(source);
                true
            }
            None => {
                let ok = self.source.is_none_or(|s| s == source);
                if !ok {
                    tracing::debug!(source, "a frame from a connection no longer followed; ignored");
                }
                ok
            }
        }
    }

    /// Apply one frame; true when it wrote something that must be flushed.
    fn apply_one(&mut self, frame: ReplFrame) -> Result<bool, StoreError> {
        if self.active {
            return Err(StoreError::Replication("this node is active; it does not take replicated records".into()));
        }
        match frame {
            ReplFrame::SnapshotBegin { epoch, .. } => {
                if epoch < self.epoch {
                    return Err(StoreError::Fenced { got: epoch, current: self.epoch });
                }
                self.stats.in_sync.store(false, Ordering::Relaxed);
                if let Some(after) = self.diverged_after {
                    // Kept durably (below, before the store is cleared) until the
                    // new active says it stored them.
                    let divergent = self.divergent_messages(after)?;
                    if !divergent.is_empty() {
                        tracing::warn!(
                            messages = divergent.len(),
                            after,
                            "this node stored messages its peer never acknowledged; handing them to the new active"
                        );
                    }
                    self.store.keep_for_handover(&divergent)?;
                    self.store.set_diverged_after(None)?;
                }
                // This store's own records are handed over or replaced now.
                self.alone_since = None;
                self.store.set_alone_since(None)?;
                // Durably not a candidate for the cold-start rule, and no copy
                // to resume from, while half loaded.
                self.store.set_last_active(false)?;
                self.store.set_following(None)?;
                self.store.db.flush()?;
                self.diverged_after = None;
                // Every attach sends what is still waiting (an earlier hand-over may have been lost).
                self.divergent = self.store.pending_handover()?;
                self.store.clear_for_snapshot()?;
                self.snapshot_loading = true;
                self.following = None;
                self.resumed_from = None;
                self.resync_needed = false;
                Ok(false)
            }
            ReplFrame::Admin { key, value } if self.snapshot_loading => {
                self.store.admin.insert(key, value)?;
                Ok(false)
            }
            ReplFrame::Producer { key, value } if self.snapshot_loading => {
                self.store.producers.insert(key, value)?;
                Ok(false)
            }
            ReplFrame::Record { key, raw } if self.snapshot_loading => {
                // Verify before storing: a corrupt copy must not become our store.
                BatchBody::decode(key, &raw)?;
                self.store.log.insert(key.to_be_bytes(), raw)?;
                Ok(false)
            }
            ReplFrame::SnapshotEnd { next_seq, epoch, stream } if self.snapshot_loading => {
                self.store.set_next_seq(next_seq)?;
                self.store.set_epoch_unflushed(epoch)?;
                self.store.set_last_active(false)?;
                self.store.set_following(Some(stream))?;
                self.flush()?;
                let mut recovered = self.store.recover()?;
                self.epoch = recovered.epoch;
                self.next_seq = recovered.next_seq;
                self.index = std::mem::take(&mut recovered.index);
                self.dedup = recovered.dedup;
                self.dirty_dedup.clear();
                self.snapshot_loading = false;
                self.following = Some(stream);
                // Not in sync yet: the active confirms without waiting for us
                // until it has our ack and sends InSync.
                self.stats.last_seq.store(self.next_seq - 1, Ordering::Relaxed);
                tracing::info!(epoch, next_seq, batches = recovered.batches, "snapshot from the peer loaded");
                Ok(true)
            }
            ReplFrame::Resume { stream, from_seq, in_sync, .. } if !self.snapshot_loading => {
                if self.following != Some(stream) {
                    return Err(StoreError::Replication(
                        "cannot resume a stream this store is not a copy of; a snapshot is needed".into(),
                    ));
                }
                if from_seq > self.next_seq {
                    return Err(StoreError::Replication(format!(
                        "cannot resume from {from_seq}: this store holds only through {}",
                        self.next_seq - 1
                    )));
                }
                if !in_sync {
                    // The active confirmed without us while we were away.
                    self.stats.in_sync.store(false, Ordering::Relaxed);
                }
                tracing::info!(from_seq, holds = self.next_seq - 1, in_sync, "the active resumes its stream");
                self.resumed_from = Some(from_seq);
                self.divergent = self.store.pending_handover()?;
                Ok(false)
            }
            ReplFrame::InSync { seq } if !self.snapshot_loading => {
                tracing::info!(seq, "in sync with the active: every confirm now waits for this node");
                self.stats.in_sync.store(true, Ordering::Relaxed);
                Ok(false)
            }
            ReplFrame::Batch { first_seq, last_seq, .. }
                if self.resumed_from.is_some_and(|from| first_seq >= from) && last_seq < self.next_seq =>
            {
                Ok(false) // resumed: this store already holds it
            }
            ReplFrame::Batch { first_seq, raw, .. } if !self.snapshot_loading => {
                let body = BatchBody::decode(first_seq, &raw)?;
                if body.epoch < self.epoch {
                    return Err(StoreError::Fenced { got: body.epoch, current: self.epoch });
                }
                if first_seq != self.next_seq {
                    return Err(StoreError::Replication(format!(
                        "record {first_seq} does not follow {} (a gap or a replay)",
                        self.next_seq - 1
                    )));
                }
                self.materialise_admin(&body)?;
                self.store.log.insert(first_seq.to_be_bytes(), raw.as_slice())?;
                for op in &body.ops {
                    if let Op::Enqueue { message, .. } = op {
                        if message.producer_id != 0 {
                            self.dedup.insert(message.producer_id, message.producer_seq);
                            self.dirty_dedup.insert(message.producer_id, message.producer_seq);
                        }
                    }
                }
                if body.epoch > self.epoch {
                    self.epoch = body.epoch;
                    self.store.set_epoch_unflushed(body.epoch)?;
                }
                self.next_seq = body.last_seq() + 1;
                self.count(&body, raw.len() as u64);
                let dead = self.index.apply(&body, raw.len() as u64);
                self.delete(&dead);
                Ok(true)
            }
            other => Err(StoreError::Replication(format!(
                "unexpected {} frame",
                match other {
                    ReplFrame::Batch { .. } | ReplFrame::InSync { .. } | ReplFrame::Resume { .. } => {
                        "stream frame (snapshot still loading)"
                    }
                    _ => "snapshot (no snapshot begun)",
                }
            ))),
        }
    }
}

fn count_ops(r: &Request) -> usize {
    match r {
        Request::Submit(ops, _) => ops.len().max(1),
        _ => 1,
    }
}

/// Payload bytes of a request, so that one record (and the replication frame
/// carrying it) stays far below the HA link's frame limit.
fn count_bytes(r: &Request) -> usize {
    match r {
        Request::Submit(ops, _) => ops
            .iter()
            .map(|op| match op {
                Op::Enqueue { message, .. } => message.payload.len() + 256,
                _ => 64,
            })
            .sum(),
        _ => 0,
    }
}

/// Most payload bytes gathered into one group commit.
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

fn complete(r: Request, result: Result<Committed, StoreError>) {
    match r {
        Request::Submit(_, done) | Request::Barrier(done) | Request::Demote(_, done) => done(result),
        Request::Apply(_, _, done) => done(result.map(|_| Applied::default())),
        Request::Promote(_, done) => done(Err(result.err().unwrap_or(StoreError::Closed))),
        Request::AttachFollower(..)
        | Request::HandoverStored(_)
        | Request::DetachFollower
        | Request::PeerDown
        | Request::PeerAck(_) => {}
    }
}
