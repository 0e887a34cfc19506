//! Group commit and the replication protocol's I/O: the one thread that
//! writes the store.
//!
//! Submissions wait in a channel; the writer takes every one that is waiting
//! (up to a limit), gives their ops consecutive sequence numbers, writes them
//! as one batch record, syncs once (fdatasync, see [`Store::sync`]), and only
//! then lets the replication core ([`Replica`]) decide which completions run:
//! at once, or after the in-sync peer acknowledged the record. It also owns
//! the liveness index (which records can go) and the idempotence table, so
//! both change in exactly the order the log does.
//!
//! Within one commit the order of writes is: admin tree entries, the batch
//! record, sync, then deletions of dead records. sled recovers a prefix of
//! its log, so a record is never durable without its admin entries, and a
//! deletion is never durable without the ops that made it possible.
//!
//! Everything the pair decides (attach, resume or snapshot, in sync, held
//! confirms, fencing, hand-over, promotion and demotion) is the pure
//! [`Replica`]'s (see `repl::replica`); this thread performs its
//! [`Action`]s on sled and on the peer connections, in order, and when an
//! I/O action fails, performs none after it and tells the core the disk
//! failed. A snapshot for the peer is streamed from here too, a little at a
//! time between requests, and only while the connection's queue has room.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::clock::lease_now_ms;
use crate::compactor::{CompactionConfig, Compactor, Pass};
use crate::index::LiveIndex;
use crate::op::{BatchBody, Op};
use crate::repl::{Action, ConnId, Promotion, Refusal, ReplFrame, Replica, ReplicaConfig};
use crate::store::{Durability, HandoverAdmin, QueueEntry, Recovered, Store, USER_PREFIX};
use crate::{StoreError, StoredMessage};

/// Called on the writer thread once the submission is durable (or failed).
/// It must not block: send a message and return.
pub type Completion = Box<dyn FnOnce(Result<Committed, StoreError>) + Send>;

/// Called on the writer thread with an outcome. It must not block.
pub type Callback<T> = Box<dyn FnOnce(Result<T, StoreError>) + Send>;

/// Called with the state recovered after a promotion.
pub type PromoteDone = Callback<Recovered>;

/// Held by a replication frame until the writer has applied it: dropping it
/// is how the connection learns there is room for the next frame (the
/// passive's back-pressure, down to TCP).
pub type Token = Box<dyn Send>;

/// What a completed submission learns.
#[derive(Debug)]
pub struct Committed {
    pub epoch: u64,
    /// Sequence number of `ops[0]` (meaningless when `ops` is empty).
    pub first_seq: u64,
    /// The submitted ops with sequence numbers assigned to their messages,
    /// less the resends in `duplicates`; empty when the submission was a
    /// duplicate publish.
    pub ops: Vec<Op>,
    /// The submission was an idempotent resend of something already stored
    /// (every op of it was).
    pub duplicate: bool,
    /// Where in the submitted ops (ascending indexes) each enqueue left out
    /// as a resend of something already stored was. Each op is checked on
    /// its own: one resend among new messages does not make them resends,
    /// and of two with the same producer sequence the first is stored.
    pub duplicates: Vec<usize>,
}

/// What the writer sends to the peer on one connection.
#[derive(Debug)]
pub enum ToPeer {
    Repl(ReplFrame),
    /// Messages kept for the hand-over (queue key, message), one chunk.
    Handover(Vec<(String, StoredMessage)>),
    /// The users and queues kept for the hand-over, sent before the messages.
    HandoverAdmin(HandoverAdmin),
}

impl ToPeer {
    fn weight(&self) -> usize {
        match self {
            ToPeer::Repl(f) => f.weight(),
            ToPeer::Handover(ms) => ms.iter().map(|(q, m)| q.len() + m.payload.len() + 128).sum(),
            ToPeer::HandoverAdmin(a) => a.users.len() * 256 + a.queues.len() * 64,
        }
    }
}

/// A connection's outbound queue as the writer sees it: its bytes are
/// counted, so that the writer keeps memory bounded (it pauses a snapshot,
/// or detaches a follower that cannot keep up).
#[derive(Debug, Clone)]
pub struct PeerTx {
    tx: tokio::sync::mpsc::UnboundedSender<(ToPeer, usize)>,
    queued: Arc<AtomicUsize>,
    /// The peer understands a catch-up from the log (`ReplFrame::Catchup`).
    log_catchup: bool,
}

/// The connection's end of a [`PeerTx`].
#[derive(Debug)]
pub struct PeerRx {
    rx: tokio::sync::mpsc::UnboundedReceiver<(ToPeer, usize)>,
    queued: Arc<AtomicUsize>,
}

impl PeerTx {
    pub fn new() -> (PeerTx, PeerRx) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        (PeerTx { tx, queued: queued.clone(), log_catchup: true }, PeerRx { rx, queued })
    }

    /// A peer of an earlier version: it gets a snapshot where a catch-up
    /// from the log would do.
    pub fn without_log_catchup(mut self) -> PeerTx {
        self.log_catchup = false;
        self
    }

    fn send(&self, o: ToPeer) -> bool {
        let w = o.weight();
        self.queued.fetch_add(w, Ordering::Relaxed);
        self.tx.send((o, w)).is_ok()
    }

    fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

impl PeerRx {
    /// The next frame to write (its bytes leave the count once taken).
    pub async fn recv(&mut self) -> Option<ToPeer> {
        let (o, w) = self.rx.recv().await?;
        self.queued.fetch_sub(w, Ordering::Relaxed);
        Some(o)
    }

    /// As `recv`, for a thread outside any runtime.
    pub fn blocking_recv(&mut self) -> Option<ToPeer> {
        let (o, w) = self.rx.blocking_recv()?;
        self.queued.fetch_sub(w, Ordering::Relaxed);
        Some(o)
    }

    /// As `recv`, without waiting.
    pub fn try_recv(&mut self) -> Option<ToPeer> {
        let (o, w) = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(w, Ordering::Relaxed);
        Some(o)
    }
}

/// Most bytes queued for a follower's connection before it counts as lagging.
const LAG_LIMIT: usize = 64 * 1024 * 1024;
/// A snapshot streams only while its connection holds less than this.
const SNAPSHOT_QUEUE: usize = 8 * 1024 * 1024;
/// Most payload bytes of one hand-over chunk (far below the HA frame limit).
pub const HANDOVER_CHUNK: usize = 4 * 1024 * 1024;

enum Request {
    Submit(Vec<Op>, Completion),
    /// Complete once everything submitted before it is done.
    Barrier(Completion),
    Connected(ConnId, PeerTx),
    ConnectionLost(ConnId),
    Attach(ConnId),
    Frame(ConnId, ReplFrame, Token),
    PeerDown(bool),
    PeerFailed,
    ExpireInSync,
    PrimaryHolds(u64, bool),
    PeerPosition(u64, bool),
    Reaffirm,
    RaiseFloor(u64, Option<Callback<()>>),
    Promote {
        at_least: u64,
        in_sync_gen: Option<u64>,
        how: Promotion,
        done: PromoteDone,
    },
    Demote(bool, Completion),
    HandoverStored(Vec<(u64, u64)>),
    HandoverAdminStored,
    ResendHandover,
    ShuttingDown,
    NotePeer(u64, u64),
}

/// Counters readable from any thread.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub batches: AtomicU64,
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
    /// Syncs of the store (sled flush + fdatasync), and fsync calls in all.
    pub flushes: AtomicU64,
    pub fsyncs: AtomicU64,
    pub last_flush_us: AtomicU64,
    /// Lease-clock ms when the running sync began (0: none running).
    pub flush_started_ms: AtomicU64,
    pub live_batches: AtomicU64,
    pub live_bytes: AtomicU64,
    /// What the live messages weigh (all queues together): what `live_bytes` would be with no dead op.
    pub live_weight: AtomicU64,
    /// Records the compactor rewrote, and the bytes they took less.
    pub compacted_records: AtomicU64,
    pub compacted_bytes: AtomicU64,
    pub last_seq: AtomicU64,
    /// The epoch this node serves in (active) or follows.
    pub epoch: AtomicU64,
    /// The highest epoch it has heard of.
    pub floor: AtomicU64,
    /// The epoch of its last op.
    pub last_op_epoch: AtomicU64,
    /// Highest sequence the follower acknowledged (active side).
    pub peer_acked: AtomicU64,
    /// A follower is attached and has caught up (active side).
    pub follower_in_sync: AtomicBool,
    /// A follower is attached (active side), and still in its handshake.
    pub follower_linked: AtomicBool,
    pub follower_handshaking: AtomicBool,
    /// Active: (generation, counts its follower in sync), for heartbeats.
    pub holding: AtomicBool,
    pub holding_gen: AtomicU64,
    /// This (passive) store holds a complete, current copy of the active's,
    /// under this generation of the active's holding.
    pub in_sync: AtomicBool,
    pub in_sync_gen: AtomicU64,
    /// The cold-start rule (see `ReplMeta::serve_alone`).
    pub serve_alone: AtomicBool,
    /// It confirmed ops without its follower since that one was last in
    /// sync (`ReplMeta::alone_since`).
    pub confirmed_alone: AtomicBool,
    /// A follower refused for a higher epoch: this (active) node must step down.
    pub outranked: AtomicBool,
    /// A snapshot from the peer is half loaded.
    pub loading: AtomicBool,
    /// This store has served or holds a complete copy of a serving node's
    /// (its history is not empty, or it is in sync with the active, whose
    /// store may be as empty as a new pair's): it knows the pair's users.
    pub held_copy: AtomicBool,
    /// The disk failed: nothing more is confirmed here.
    pub disk_failed: AtomicBool,
    /// The data directory is over `max_disk_bytes`, or its file system has
    /// less than `min_free_disk_bytes` left (measured by the broker). Not a
    /// failure: every write still succeeds.
    pub disk_full: AtomicBool,
    /// Pair: new messages are refused for a nearly full disk, this node's
    /// or its in-sync passive's. Set by the role arbiter.
    pub refuse_full: AtomicBool,
    /// Messages kept for a hand-over to the peer.
    pub handover_pending: AtomicU64,
    /// The peer's store when last heard of (also across restarts): the epoch
    /// of its last op and its last op (0, 0: never).
    pub peer_seen_epoch: AtomicU64,
    pub peer_seen_last: AtomicU64,
    /// Pair only: the lease, in lease-clock ms (0: none). Past it nothing is
    /// written or confirmed.
    pub lease_until_ms: AtomicU64,
    failure: Mutex<Option<String>>,
    /// The store's history (which epoch wrote which ops), for status: what
    /// a lab checks a promotion against.
    history: Mutex<Vec<crate::repl::EpochStart>>,
}

impl WriterStats {
    /// Why the disk counts as failed, if it does.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_failure(&self, reason: &str) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert_with(|| reason.to_string());
        self.disk_failed.store(true, Ordering::SeqCst);
    }

    /// The store's history as last published: (epoch, start, forced) per
    /// promotion, oldest first.
    pub fn history(&self) -> Vec<crate::repl::EpochStart> {
        self.history.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Handle to the writer thread. Cloning it is cheap; the thread ends when
/// every handle is dropped, after finishing what was submitted.
#[derive(Clone)]
pub struct Writer {
    tx: Sender<Request>,
    /// For reads of admin objects from other threads (sled is thread-safe).
    store: Store,
    stats: Arc<WriterStats>,
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
    /// Start as the primary (a single node); a pair member starts following nobody.
    pub active: bool,
    /// With `replicated`: refuse to confirm when no in-sync follower is attached.
    pub require_replica: bool,
    /// Bytes of recent records kept for a follower to resume from.
    pub tail_bytes: usize,
    /// A producer id unused this long is forgotten: a resend of it later is
    /// stored again (DESIGN.md: at-least-once beyond the window).
    pub producer_expiry: std::time::Duration,
    /// How often the index is checkpointed while records arrive (see `checkpoint.rs`).
    pub checkpoint_every: std::time::Duration,
    /// The compactor's bounds (see `compactor.rs`).
    pub compaction: CompactionConfig,
}

/// The audit log of a follower (target `twinmq::audit`, as the active's
/// operator commands in the broker): each admin change it applies. Names
/// were validated by the active; `{:?}` escapes whatever else.
fn audit_replicated(body: &BatchBody) {
    for op in &body.ops {
        let what = match op {
            Op::PutQueue { key, .. } => format!("queue or durable subscription {key:?} created"),
            Op::DeleteQueue { key } => format!("queue or durable subscription {key:?} deleted"),
            Op::PutUser { name, user } => format!("user {name:?} set ({} grants)", user.grants.len()),
            Op::DeleteUser { name } => format!("user {name:?} removed"),
            _ => continue,
        };
        tracing::info!(target: "twinmq::audit", seq = body.first_seq, %what, "audit: admin change replicated from the active");
    }
}

/// A writer idle this long with records not in the index checkpoint writes one.
const CHECKPOINT_WHEN_IDLE: Duration = Duration::from_secs(1);
/// Bytes of records after which a checkpoint is written before
/// `checkpoint_every` (at most once per [`CHECKPOINT_MIN_GAP`]): what a
/// restart after a crash reads is about this much log, or twice the last
/// checkpoint's size when that is larger (so that checkpoints cost at most
/// half as much writing as the log itself).
const CHECKPOINT_LOG_BYTES: u64 = 64 << 20;
const CHECKPOINT_MIN_GAP: Duration = Duration::from_secs(1);
/// The compactor's log line comes at most this often (when it did something).
const COMPACTION_LOG_EVERY: Duration = Duration::from_secs(10);
/// How often an idle writer wakes up for the compactor while it has work.
const COMPACT_WHEN_IDLE: Duration = Duration::from_millis(50);

/// How long a producer id's idempotence mark outlives its last publish.
pub const PRODUCER_EXPIRY: std::time::Duration = std::time::Duration::from_secs(3600);

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            durability: Durability::Local,
            max_batch_ops: 1024,
            active: true,
            require_replica: false,
            tail_bytes: 32 * 1024 * 1024,
            producer_expiry: PRODUCER_EXPIRY,
            checkpoint_every: crate::checkpoint::CHECKPOINT_EVERY,
            compaction: CompactionConfig::default(),
        }
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
        let meta = store.repl_meta()?;
        let replica = Replica::new(
            ReplicaConfig {
                durability: config.durability,
                require_replica: config.require_replica,
                pair: !config.active,
                tail_bytes: config.tail_bytes,
            },
            meta,
            recovered.next_seq,
            rand::random(),
        );
        let compactor = Compactor::new(config.compaction.clone());
        let state = WriterState {
            store: store.clone(),
            config,
            compactor,
            compacted_since_checkpoint: false,
            delete_failed: false,
            last_request: Instant::now(),
            compaction_unlogged: Pass::default(),
            // The first pass that rewrites something logs at once.
            compaction_logged: Instant::now().checked_sub(COMPACTION_LOG_EVERY).unwrap_or_else(Instant::now),
            staging: None,
            catchup: None,
            replica,
            index: std::mem::take(&mut recovered.index),
            dedup: recovered.dedup.clone(),
            dirty_dedup: HashMap::new(),
            dedup_used: HashMap::new(),
            dedup_since: std::time::Instant::now(),
            last_prune: std::time::Instant::now(),
            applied_through: recovered.next_seq.saturating_sub(1),
            checkpointed_through: recovered.next_seq.saturating_sub(1),
            last_checkpoint: std::time::Instant::now(),
            records_since_checkpoint: 0,
            last_checkpoint_bytes: 0,
            stats: stats.clone(),
            held: VecDeque::new(),
            conns: HashMap::new(),
            snapshot: None,
        };
        state.publish_stats();
        state.count_handover();
        let handle = std::thread::Builder::new()
            .name("twinmq-store-writer".into())
            .spawn(move || state.run(rx))
            .map_err(StoreError::Thread)?;
        Ok((Writer { tx, store, stats }, handle))
    }

    fn send(&self, r: Request) {
        if let Err(crossbeam_channel::SendError(r)) = self.tx.send(r) {
            match r {
                Request::Submit(_, done) | Request::Barrier(done) | Request::Demote(_, done) => {
                    done(Err(StoreError::Closed))
                }
                Request::Promote { done, .. } => done(Err(StoreError::Closed)),
                Request::RaiseFloor(_, Some(done)) => done(Err(StoreError::Closed)),
                _ => {}
            }
        }
    }

    /// Whether the message `(epoch, seq)` another node handed over was stored
    /// into `queue` already (see `Op::HandedIn`).
    pub fn handed_in(&self, epoch: u64, seq: u64, queue: &str) -> Result<bool, StoreError> {
        self.store.handed_in(epoch, seq, queue)
    }

    /// The users as stored now (committed here, or applied from the active).
    /// The body of the live message `seq` (see [`Store::read_message`]); safe from any thread.
    pub fn read_message(&self, seq: u64) -> Result<Option<std::sync::Arc<StoredMessage>>, StoreError> {
        self.store.read_message(seq)
    }

    /// The store's read cache: bytes held, hits, misses (for metrics).
    pub fn read_cache(&self) -> &crate::bodies::BodyCache {
        self.store.read_cache()
    }

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

    /// A connection to the peer is up: the writer may send on it.
    pub fn connected(&self, conn: ConnId, tx: PeerTx) {
        self.send(Request::Connected(conn, tx));
    }

    /// A connection to the peer is gone.
    pub fn connection_lost(&self, conn: ConnId) {
        self.send(Request::ConnectionLost(conn));
    }

    /// Active: attach the peer as follower on `conn` (DESIGN.md section 5,
    /// catch-up: it resumes, or gets a snapshot).
    pub fn attach(&self, conn: ConnId) {
        self.send(Request::Attach(conn));
    }

    /// A replication frame arrived on `conn`; `token` is dropped once applied.
    pub fn frame(&self, conn: ConnId, frame: ReplFrame, token: Token) {
        self.send(Request::Frame(conn, frame, token));
    }

    /// Active: the peer is down (the role arbiter's verdict): confirms that
    /// wait for it are released as single-copy (or failed with `require_replica`).
    /// `alone`: this node sees the gateway (see `Replica::peer_down`).
    pub fn peer_down(&self, alone: bool) {
        self.send(Request::PeerDown(alone));
    }

    /// Active: the peer's heartbeat says its disk failed: stop waiting for it.
    pub fn peer_failed(&self) {
        self.send(Request::PeerFailed);
    }

    /// Passive: in sync expired (this node stood still, or was isolated).
    pub fn expire_in_sync(&self) {
        self.send(Request::ExpireInSync);
    }

    /// Passive: the active's heartbeat says how it holds for this node.
    pub fn primary_holds(&self, gen: u64, holds: bool) {
        self.send(Request::PrimaryHolds(gen, holds));
    }

    /// Passive: the peer's epoch and whether it serves (see
    /// `Replica::peer_position`).
    pub fn peer_position(&self, epoch: u64, serving: bool) {
        self.send(Request::PeerPosition(epoch, serving));
    }

    /// Active: tell the in-sync follower again that it is.
    pub fn reaffirm_in_sync(&self) {
        self.send(Request::Reaffirm);
    }

    /// The highest epoch heard of rose; `done` once it is durable.
    pub fn raise_floor(&self, epoch: u64, done: Option<Callback<()>>) {
        self.send(Request::RaiseFloor(epoch, done));
    }

    /// Passive: the active stored these handed-over messages (`(epoch, seq)`); forget them.
    pub fn handover_stored(&self, ids: Vec<(u64, u64)>) {
        self.send(Request::HandoverStored(ids));
    }

    /// Passive: the active created what it lacked of the users and queues handed over.
    pub fn handover_admin_stored(&self) {
        self.send(Request::HandoverAdminStored);
    }

    /// Passive: send what is kept for the hand-over again (on the followed connection).
    pub fn resend_handover(&self) {
        self.send(Request::ResendHandover);
    }

    /// What the peer's store held when last heard of (epoch of its last op,
    /// last op): kept for an operator about to force this node.
    pub fn note_peer(&self, last_op_epoch: u64, last_seq: u64) {
        self.send(Request::NotePeer(last_op_epoch, last_seq));
    }

    /// The node is stopping and nobody will declare the peer down: every
    /// connection counts as lost and the peer as down, so what waits for it
    /// is confirmed single-copy (it is durable here), not kept waiting.
    pub fn shutting_down(&self) {
        self.send(Request::ShuttingDown);
    }

    /// Become active in an epoch of at least `at_least` (persisted before
    /// `done` runs). `in_sync_gen`: only if still in sync under it (a takeover);
    /// `how`: see [`Promotion`] (a voted one is in exactly `at_least`).
    pub fn promote(&self, at_least: u64, in_sync_gen: Option<u64>, how: Promotion, done: PromoteDone) {
        self.send(Request::Promote { at_least, in_sync_gen, how, done });
    }

    /// Become passive; `done` runs once no further local op will be written.
    pub fn demote(&self, still_last_active: bool, done: Completion) {
        self.send(Request::Demote(still_last_active, done));
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// The counters, to keep beyond this handle (the disk-use thread).
    pub fn stats_handle(&self) -> Arc<WriterStats> {
        self.stats.clone()
    }

    /// Pair: this node may write and confirm until `until_ms` (lease clock:
    /// the last time it heard its peer or the gateway, plus
    /// `isolation_timeout`). A process that was frozen past its lease refuses
    /// to write or confirm before its role arbiter has even run (DESIGN.md
    /// section 4, leases).
    pub fn set_lease(&self, until_ms: u64) {
        self.stats.lease_until_ms.store(until_ms.max(1), Ordering::Relaxed);
    }

    /// The disk counts as failed (a sync slower than `disk_stall_ms`, seen by
    /// the role arbiter while this thread may be hung in it): nothing more is
    /// confirmed here, even if the sync returns.
    pub fn disk_failed(&self, reason: &str) {
        self.stats.set_failure(reason);
    }
}

/// A snapshot (or a catch-up from the log) being streamed to the follower.
struct SnapshotCursor {
    conn: ConnId,
    attach: crate::repl::AttachId,
    through: u64,
    /// A catch-up: only the log, as `Batch`, to its end; then the admin
    /// entries, idempotence marks and live lists in one go.
    catchup: bool,
    stage: u8,
    after: Option<Vec<u8>>,
    /// For the rate in the log line at its end.
    started: Instant,
    bytes: u64,
}

/// "N MB in S s (R MB/s)" for a snapshot's log lines.
fn rate(bytes: u64, since: Instant) -> String {
    let secs = since.elapsed().as_secs_f64();
    let mb = bytes as f64 / 1e6;
    format!("{mb:.1} MB in {secs:.2} s ({:.1} MB/s)", mb / secs.max(1e-3))
}

/// A snapshot from the peer being staged: its index is built as its records
/// arrive, so that swapping it in reads nothing back.
struct Staging {
    started: Instant,
    bytes: u64,
    index: LiveIndex,
    records: crate::store::StagedRecords,
    /// Records streamed while the snapshot was sent (after every snapshot
    /// record in the log): applied to the index after them, in order.
    late: Vec<u64>,
    /// Something could not be applied as it came: read the log once swapped in.
    broken: bool,
}

/// A catch-up from the peer's log being applied (see `ReplFrame::Catchup`).
struct Catchup {
    started: Instant,
    /// Admin entries the peer sent: the others are dropped at its end.
    admin: std::collections::HashSet<Vec<u8>>,
    records: u64,
    bytes: u64,
    /// Records held here that the peer no longer holds.
    dropped: u64,
    /// This store's own ops past the fork were dropped: its index is read
    /// from the log again before the first record of the catch-up is applied
    /// (after the records it wanted arrived).
    reread: bool,
    /// ... and until the `Live` lists through the fork are in, the records
    /// it wants (see `ReplFrame::Want`).
    wanting: Option<Wanting>,
    /// `Want` was sent on this catch-up: the records it names come first.
    want_sent: bool,
}

struct Wanting {
    conn: ConnId,
    attach: crate::repl::AttachId,
    after: u64,
    keys: Vec<u64>,
}

/// How many record keys one `Live` frame lists.
const LIVE_KEYS_PER_FRAME: usize = 8192;

/// Send `keys` (the live records, in order, none past `through`) as `Live`
/// lists covering `1..=through`; returns the bytes sent.
fn send_live(tx: &PeerTx, keys: impl Iterator<Item = u64>, through: u64) -> u64 {
    let mut bytes = 0;
    let mut from = 1;
    let mut chunk = Vec::with_capacity(LIVE_KEYS_PER_FRAME);
    let mut keys = keys.peekable();
    while keys.peek().is_some() || from <= through {
        chunk.extend(keys.by_ref().take(LIVE_KEYS_PER_FRAME));
        let to = if keys.peek().is_some() { chunk.last().copied().unwrap_or(through) } else { through };
        let f = ReplFrame::Live { from, to, keys: std::mem::take(&mut chunk) };
        bytes += f.weight() as u64;
        tx.send(ToPeer::Repl(f));
        from = to + 1;
        if to == through {
            break;
        }
    }
    bytes
}

/// A completion waiting for the confirm horizon to pass `seq`.
struct Held {
    seq: u64,
    done: Completion,
    result: Committed,
}

struct WriterState {
    store: Store,
    config: WriterConfig,
    replica: Replica,
    index: LiveIndex,
    dedup: HashMap<u64, u64>,
    /// Idempotence marks not yet written to the producers tree.
    dirty_dedup: HashMap<u64, u64>,
    /// When each producer id was last used here; ids without an entry count
    /// from `dedup_since` (the store's opening or loading).
    dedup_used: HashMap<u64, std::time::Instant>,
    dedup_since: std::time::Instant,
    last_prune: std::time::Instant,
    /// Every record up to this sequence is in `index`.
    applied_through: u64,
    /// ... and in the last index checkpoint, written at `last_checkpoint`.
    checkpointed_through: u64,
    last_checkpoint: std::time::Instant,
    /// Bytes of records written since the last checkpoint.
    records_since_checkpoint: u64,
    last_checkpoint_bytes: u64,
    stats: Arc<WriterStats>,
    held: VecDeque<Held>,
    conns: HashMap<ConnId, PeerTx>,
    snapshot: Option<SnapshotCursor>,
    compactor: Compactor,
    /// Records rewritten since the last index checkpoint (their sizes there are stale).
    compacted_since_checkpoint: bool,
    /// A delete of dead records failed since the store was opened (see [`Compactor::pass`]).
    delete_failed: bool,
    /// When the last request came (a writer idle for [`CHECKPOINT_WHEN_IDLE`] checkpoints).
    last_request: Instant,
    /// What the compactor did since its last log line, at `compaction_logged`.
    compaction_unlogged: Pass,
    compaction_logged: Instant,
    /// A snapshot from the peer being staged.
    staging: Option<Staging>,
    /// A catch-up from the peer's log being applied.
    catchup: Option<Catchup>,
}

impl WriterState {
    fn run(mut self, rx: Receiver<Request>) {
        let mut pending: Vec<Request> = Vec::new();
        loop {
            // Idle: wake up for a snapshot being sent, for the compactor,
            // and to checkpoint records once nothing came for a while.
            let wait = if self.snapshot.is_some() {
                Some(Duration::from_millis(2))
            } else if self.compactor.wanted(&self.index) {
                Some(COMPACT_WHEN_IDLE)
            } else if self.checkpoint_due() {
                Some(CHECKPOINT_WHEN_IDLE)
            } else {
                None
            };
            let first = match wait {
                Some(wait) => match rx.recv_timeout(wait) {
                    Ok(r) => Some(r),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match rx.recv() {
                    Ok(r) => Some(r),
                    Err(_) => break,
                },
            };
            if first.is_some() {
                self.last_request = Instant::now();
            } else if self.checkpoint_due() && self.last_request.elapsed() >= CHECKPOINT_WHEN_IDLE {
                self.checkpoint();
            }
            match first {
                Some(r @ (Request::Submit(..) | Request::Barrier(_))) => {
                    pending.push(r);
                    let mut ops = count_ops(&pending[0]);
                    let mut bytes = count_bytes(&pending[0]);
                    // Group commit: take what is waiting, but stop at anything
                    // that is not a submission (it must see the commit first).
                    let mut next = None;
                    while ops < self.config.max_batch_ops && bytes < MAX_BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(r @ (Request::Submit(..) | Request::Barrier(_))) => {
                                ops += count_ops(&r);
                                bytes += count_bytes(&r);
                                pending.push(r);
                            }
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.commit(&mut pending);
                    if let Some(other) = next {
                        self.handle(other, &rx);
                    }
                }
                Some(other) => self.handle(other, &rx),
                None => {}
            }
            self.stream_snapshot();
            self.compact();
            self.publish_stats();
            let since = self.last_checkpoint.elapsed();
            if since >= self.config.checkpoint_every
                || (since >= CHECKPOINT_MIN_GAP
                    && self.records_since_checkpoint >= CHECKPOINT_LOG_BYTES.max(2 * self.last_checkpoint_bytes))
            {
                self.checkpoint();
            }
        }
        if let Err(e) = self.store.sync() {
            tracing::error!(error = %e, "final store sync failed");
        }
        self.checkpoint();
        tracing::debug!("store writer stopped");
    }

    fn handle(&mut self, r: Request, rx: &Receiver<Request>) {
        self.check_watchdog();
        let now = lease_now_ms();
        self.refresh_lease();
        let mut out = Vec::new();
        match r {
            Request::Submit(..) | Request::Barrier(_) => {
                let mut v = vec![r];
                self.commit(&mut v);
            }
            Request::Connected(conn, tx) => {
                self.conns.insert(conn, tx);
            }
            Request::ConnectionLost(conn) => {
                self.conns.remove(&conn);
                if self.snapshot.as_ref().is_some_and(|s| s.conn == conn) {
                    self.snapshot = None;
                }
                self.replica.connection_lost(conn, &mut out);
            }
            Request::Attach(conn) => {
                self.snapshot = None;
                let log_catchup = self.conns.get(&conn).is_some_and(|t| t.log_catchup);
                self.replica.attach(conn, log_catchup, &mut out);
            }
            Request::Frame(conn, frame, token) => {
                // One frame at a time (what it writes is done before the next
                // is looked at); one sync for all that are waiting.
                self.replica.on_frame(conn, frame, now, &mut out);
                let _ = self.perform(std::mem::take(&mut out));
                drop(token);
                loop {
                    match rx.try_recv() {
                        Ok(Request::Frame(conn, frame, token)) => {
                            self.replica.on_frame(conn, frame, now, &mut out);
                            let _ = self.perform(std::mem::take(&mut out));
                            drop(token);
                        }
                        Ok(other) => {
                            self.replica.flush_point(&mut out);
                            let _ = self.perform(std::mem::take(&mut out));
                            self.handle(other, rx);
                            return;
                        }
                        Err(_) => break,
                    }
                }
                self.replica.flush_point(&mut out);
            }
            Request::PeerDown(alone) => self.replica.peer_down(now, alone, &mut out),
            Request::PeerFailed => {
                let held = self.replica.holding().1;
                self.replica.peer_failed(now, &mut out);
                if held && !self.replica.holding().1 {
                    tracing::warn!("the peer says its disk failed: confirms no longer wait for it");
                }
            }
            Request::ExpireInSync => self.replica.expire_in_sync(),
            Request::PrimaryHolds(gen, holds) => self.replica.primary_holds(gen, holds),
            Request::PeerPosition(epoch, serving) => self.replica.peer_position(epoch, serving, &mut out),
            Request::Reaffirm => self.replica.reaffirm_in_sync(&mut out),
            Request::RaiseFloor(epoch, done) => {
                let possible = self.replica.raise_floor(epoch, done.is_some(), &mut out);
                let result = self.perform(std::mem::take(&mut out));
                if let Some(done) = done {
                    done(match (possible, result) {
                        (false, _) => Err(StoreError::Failed("the store failed; nothing can be promised".into())),
                        (true, r) => r,
                    });
                }
            }
            Request::Promote { at_least, in_sync_gen, how, done } => done(self.promote(at_least, in_sync_gen, how)),
            Request::Demote(still_last_active, done) => {
                self.snapshot = None;
                self.replica.demote(still_last_active, &mut out);
                let result = self.perform(std::mem::take(&mut out));
                done(result.map(|_| self.nothing()));
            }
            Request::HandoverStored(ids) => {
                let n = ids.len();
                match self.store.handed_over(&ids).and_then(|_| self.sync()) {
                    Ok(()) => tracing::info!(messages = n, "the new active stored the messages handed over"),
                    Err(e) => {
                        tracing::error!(error = %e, "could not forget handed-over messages; they will be sent again")
                    }
                }
                self.count_handover();
            }
            Request::HandoverAdminStored => match self.store.handed_over_admin().and_then(|_| self.sync()) {
                Ok(()) => tracing::info!("the new active created the users and queues handed over that it lacked"),
                Err(e) => {
                    tracing::error!(error = %e, "could not forget the handed-over users; they will be sent again")
                }
            },
            Request::ResendHandover => {
                if let Some(conn) = self.replica.source() {
                    out.push(Action::SendHandover(conn));
                }
            }
            Request::NotePeer(epoch, last) => self.replica.note_peer(epoch, last, &mut out),
            Request::ShuttingDown => {
                for conn in self.conns.keys().copied().collect::<Vec<_>>() {
                    self.replica.connection_lost(conn, &mut out);
                }
                self.conns.clear();
                // A stop, not a loss of the peer: what the cold-start rule
                // says stays as it was.
                self.replica.peer_down(now, false, &mut out);
            }
        }
        let _ = self.perform(out);
    }

    /// Perform the core's actions in order. On an I/O failure none after it
    /// runs, and the core learns that the disk failed.
    fn perform(&mut self, actions: Vec<Action>) -> Result<(), StoreError> {
        for a in actions {
            if let Err(e) = self.act(a) {
                self.fail_disk(&e.to_string());
                return Err(e);
            }
        }
        Ok(())
    }

    /// The disk failed: the core decides what stops; only what needs no disk runs.
    fn fail_disk(&mut self, reason: &str) {
        if self.replica.failed().is_some() {
            return;
        }
        tracing::error!(reason, "the store failed: this node confirms nothing more");
        self.stats.set_failure(reason);
        let mut out = Vec::new();
        self.replica.disk_failed(reason.to_string(), &mut out);
        for a in out {
            match a {
                Action::Send(..) | Action::FailHeld(_) => {
                    let _ = self.act(a);
                }
                _ => {}
            }
        }
        self.snapshot = None;
    }

    /// A failure the role arbiter's watchdog saw (a hung sync).
    fn check_watchdog(&mut self) {
        if self.stats.disk_failed.load(Ordering::SeqCst) && self.replica.failed().is_none() {
            let reason = self.stats.failure().unwrap_or_else(|| "the disk failed".into());
            self.fail_disk(&reason);
        }
    }

    fn act(&mut self, a: Action) -> Result<(), StoreError> {
        match a {
            Action::Send(conn, frame) => {
                match &frame {
                    ReplFrame::Resume { from_seq, in_sync, .. } => tracing::info!(
                        conn,
                        from_seq,
                        in_sync = in_sync.is_some(),
                        "peer resumes the replication stream"
                    ),
                    ReplFrame::InSync { gen } => {
                        tracing::info!(conn, gen, "peer in sync: every confirm now waits for it")
                    }
                    ReplFrame::Refused { reason, .. } => {
                        tracing::warn!(conn, reason, "refusing the replication stream; the active starts anew")
                    }
                    ReplFrame::Failed { .. } => tracing::warn!(conn, "telling the active this node's disk failed"),
                    _ => {}
                }
                let Some(tx) = self.conns.get(&conn) else { return Ok(()) };
                if matches!(frame, ReplFrame::Batch { .. }) && tx.queued() > LAG_LIMIT {
                    tracing::warn!(conn, "the peer does not keep up with replication; detaching it");
                    let mut out = Vec::new();
                    self.replica.follower_lagging(conn, &mut out);
                    return self.perform(out);
                }
                tx.send(ToPeer::Repl(frame));
            }
            Action::PersistMeta { flush } => {
                self.store.set_repl_meta(self.replica.meta())?;
                if flush {
                    self.sync()?;
                }
            }
            Action::Confirm { through } => {
                while self.held.front().is_some_and(|h| h.seq <= through) {
                    let h = self.held.pop_front().expect("front exists");
                    (h.done)(Ok(h.result));
                }
            }
            Action::FailHeld(refusal) => {
                let pair = !self.config.active;
                for h in self.held.drain(..) {
                    let reason = Box::new(refusal_error(&refusal, pair));
                    (h.done)(Err(StoreError::Unconfirmed { reason, written: Box::new(h.result) }));
                }
            }
            Action::StreamSnapshot { conn, attach, through } => {
                tracing::info!(through, live_batches = self.index.live_batches(), "sending the peer a snapshot");
                self.snapshot = Some(SnapshotCursor {
                    conn,
                    attach,
                    through,
                    catchup: false,
                    stage: 0,
                    after: None,
                    started: Instant::now(),
                    bytes: 0,
                });
            }
            Action::StreamLog { conn, attach, from, wanted } => {
                tracing::info!(from, live_batches = self.index.live_batches(), "the peer catches up from the log");
                self.send_wanted(conn, &wanted)?;
                self.snapshot = Some(SnapshotCursor {
                    conn,
                    attach,
                    through: u64::MAX,
                    catchup: true,
                    stage: 2,
                    after: Some(from.saturating_sub(1).to_be_bytes().to_vec()),
                    started: Instant::now(),
                    bytes: 0,
                });
            }
            Action::ListLive { conn, through } => {
                // The admin entries first: the follower reads its index
                // again after these, and it keeps only the messages of
                // queues that exist.
                if let Some(tx) = self.conns.get(&conn) {
                    for kv in self.store.admin.iter() {
                        let (k, v) = kv?;
                        let (key, value) = (Bytes::copy_from_slice(&k), Bytes::copy_from_slice(&v));
                        tx.send(ToPeer::Repl(ReplFrame::SnapAdmin { key, value }));
                    }
                    send_live(tx, self.index.record_keys().take_while(|k| *k <= through), through);
                }
            }
            Action::Truncate { conn, attach, after } => self.truncate(conn, attach, after)?,
            Action::BeginCatchup => {
                tracing::info!(from = self.replica.next_seq(), "catching up from the active's log");
                self.catchup = Some(Catchup {
                    started: Instant::now(),
                    admin: Default::default(),
                    records: 0,
                    bytes: 0,
                    dropped: 0,
                    reread: false,
                    wanting: None,
                    want_sent: false,
                });
            }
            Action::Catchup(frame) => self.catch_up(frame)?,
            Action::EndCatchup { next_seq } => self.end_catchup(next_seq)?,
            Action::ApplyBatch { first_seq, last_seq, epoch, raw } => {
                if let Some(reason) = self.lacking() {
                    return self.apply_failed(first_seq, reason);
                }
                self.reread_after_truncation()?;
                let body = match BatchBody::decode(first_seq, &raw) {
                    Ok(b) if b.epoch == epoch && b.last_seq() == last_seq => b,
                    Ok(b) => {
                        let reason = format!("record {first_seq} is of epoch {}, expected {epoch}", b.epoch);
                        return self.apply_failed(first_seq, reason);
                    }
                    Err(e) => return self.apply_failed(first_seq, e.to_string()),
                };
                Store::materialise(&self.store.admin, &body)?;
                self.store.log().insert(first_seq.to_be_bytes(), raw.as_ref())?;
                if let Some(c) = &mut self.catchup {
                    c.records += 1;
                    c.bytes += raw.len() as u64;
                }
                audit_replicated(&body);
                self.note_producers(&body);
                self.count(body.ops.len(), 1, raw.len() as u64);
                let dead = self.index.apply(&body, raw.len() as u64);
                self.applied_through = self.applied_through.max(last_seq);
                self.records_since_checkpoint += raw.len() as u64;
                self.delete(&dead, last_seq + 1);
            }
            Action::Flush => {
                if self.config.durability != Durability::None {
                    self.sync()?;
                }
            }
            Action::KeepHandover { after, all } => self.keep_handover(after, all)?,
            Action::BeginStaging => {
                self.store.begin_staging()?;
                self.stats.loading.store(true, Ordering::Relaxed);
                self.staging = Some(Staging {
                    started: Instant::now(),
                    bytes: 0,
                    index: LiveIndex::default(),
                    records: Default::default(),
                    late: Vec::new(),
                    broken: false,
                });
            }
            Action::Stage(frame) => self.stage(frame)?,
            Action::CommitStaging { next_seq } => {
                let mut staged = self.staging.take();
                if let Some(st) = &mut staged {
                    for key in std::mem::take(&mut st.late) {
                        let body = match self.store.staging_log().get(key.to_be_bytes())? {
                            Some(raw) => BatchBody::decode(key, &raw).map(|b| (b, raw.len() as u64)),
                            None => Err(StoreError::Corrupt { key, reason: "a staged record is missing".into() }),
                        };
                        match body {
                            Ok((body, len)) => {
                                let dead = st.index.apply(&body, len);
                                st.records.note(&body, dead);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "the staged index is incomplete; reading the log instead");
                                st.broken = true;
                                break;
                            }
                        }
                    }
                }
                self.store.commit_staging(next_seq, self.replica.meta())?;
                // Whatever it lacked, the snapshot holds.
                self.store.set_wanting(false)?;
                let (started, bytes) = staged.as_ref().map_or((Instant::now(), 0), |st| (st.started, st.bytes));
                let mut recovered = match staged {
                    Some(st) if !st.broken => self.store.recover_staged(st.index, st.records)?,
                    _ => self.store.recover()?,
                };
                self.index = std::mem::take(&mut recovered.index);
                self.dedup = recovered.dedup;
                self.dirty_dedup.clear();
                self.dedup_used.clear();
                self.dedup_since = std::time::Instant::now();
                self.stats.loading.store(false, Ordering::Relaxed);
                self.stats.last_seq.store(next_seq - 1, Ordering::Relaxed);
                // A new history: the next checkpoint describes it (the old one is gone).
                self.applied_through = next_seq - 1;
                self.checkpointed_through = 0;
                let received = rate(bytes, started);
                tracing::info!(next_seq, batches = recovered.batches, received, "snapshot from the peer loaded");
            }
            Action::DiscardStaging => {
                self.staging = None;
                self.store.begin_staging()?;
                self.stats.loading.store(false, Ordering::Relaxed);
            }
            Action::SendHandover(conn) => {
                let admin = self.store.pending_handover_admin()?;
                let pending = self.store.pending_handover()?;
                let Some(tx) = self.conns.get(&conn) else { return Ok(()) };
                if !admin.is_empty() {
                    tracing::warn!(
                        users = admin.users.len(),
                        queues = admin.queues.len(),
                        "handing over users and queues for the active to create those it lacks"
                    );
                    tx.send(ToPeer::HandoverAdmin(admin));
                }
                if pending.is_empty() {
                    return Ok(());
                }
                tracing::warn!(messages = pending.len(), "handing over messages the active's history lacks");
                let mut chunk = Vec::new();
                let mut bytes = 0;
                for m in pending {
                    bytes += m.0.len() + m.1.payload.len() + 128;
                    chunk.push(m);
                    if bytes >= HANDOVER_CHUNK {
                        tx.send(ToPeer::Handover(std::mem::take(&mut chunk)));
                        bytes = 0;
                    }
                }
                if !chunk.is_empty() {
                    tx.send(ToPeer::Handover(chunk));
                }
            }
        }
        Ok(())
    }

    fn apply_failed(&mut self, first_seq: u64, reason: String) -> Result<(), StoreError> {
        tracing::warn!(first_seq, reason, "a replicated record cannot be applied; refusing the stream");
        let mut out = Vec::new();
        self.replica.apply_failed(first_seq, reason, &mut out);
        self.perform(out)
    }

    /// An admin entry, idempotence mark or live list of a catch-up from the
    /// peer's log.
    fn catch_up(&mut self, frame: ReplFrame) -> Result<(), StoreError> {
        if let ReplFrame::SnapRecord { key, raw } = frame {
            // A record it wanted (dropped or rewritten here by its own ops
            // past the fork): the primary's copy replaces it.
            if let Err(e) = BatchBody::decode(key, &raw) {
                return self.apply_failed(self.replica.next_seq(), e.to_string());
            }
            self.store.log().insert(key.to_be_bytes(), raw.as_ref())?;
            return Ok(());
        }
        if let Some(after) = self.catchup.as_ref().and_then(|c| c.wanting.as_ref()).map(|w| w.after) {
            match &frame {
                ReplFrame::Live { from, to, keys } if *to <= after => return self.want(*from, *to, keys),
                ReplFrame::SnapAdmin { .. } => {}
                _ => return self.apply_failed(self.replica.next_seq(), format!("a {} before `Live`", frame.kind())),
            }
        } else {
            if let Some(reason) = self.lacking() {
                return self.apply_failed(self.replica.next_seq(), reason);
            }
            self.reread_after_truncation()?;
        }
        match frame {
            ReplFrame::SnapAdmin { key, value } => {
                self.store.admin.insert(key.as_ref(), value.as_ref())?;
                if let Some(c) = &mut self.catchup {
                    c.admin.insert(key.to_vec());
                }
            }
            ReplFrame::SnapProducer { key, value } => {
                let (Some(p), Some(seq)) = (be_u64(&key), be_u64(&value)) else { return Ok(()) };
                if self.dedup.get(&p).is_none_or(|s| *s < seq) {
                    self.dedup.insert(p, seq);
                    self.dirty_dedup.insert(p, seq);
                }
            }
            ReplFrame::Live { from, to, keys } => {
                // Records held here that the peer no longer holds: their
                // messages died by ops in records that died too (never
                // sent). (One of the peer's may be missing here: an ack
                // record whose targets its compactor had already dropped
                // from the records sent is dead here at once.) Those held
                // are the index's: nothing is read (a record dead here
                // whose delete failed is found dead again at the next open).
                let held: Vec<u64> = self.index.record_keys_in(from, to).collect();
                let wanted: std::collections::HashSet<u64> = keys.into_iter().collect();
                let gone: Vec<u64> = held.into_iter().filter(|k| !wanted.contains(k)).collect();
                if gone.is_empty() {
                    return Ok(());
                }
                let mut dead = self.index.forget_records(&gone);
                dead.extend(&gone);
                dead.sort_unstable();
                dead.dedup();
                if let Some(c) = &mut self.catchup {
                    c.dropped += dead.len() as u64;
                }
                self.delete(&dead, self.replica.next_seq());
            }
            _ => {}
        }
        Ok(())
    }

    /// A catch-up from the peer's log is complete: this store is the peer's
    /// through `next_seq - 1`.
    fn end_catchup(&mut self, next_seq: u64) -> Result<(), StoreError> {
        if let Some(reason) = self.lacking() {
            return self.apply_failed(next_seq, reason);
        }
        self.reread_after_truncation()?;
        let c = self.catchup.take();
        if let Some(c) = &c {
            self.replace_admin(&c.admin)?;
        }
        self.store.persist_floor(next_seq, self.dirty_dedup.iter())?;
        self.dirty_dedup.clear();
        self.store.set_repl_meta(self.replica.meta())?;
        self.store.set_wanting(false)?;
        self.applied_through = self.applied_through.max(next_seq - 1);
        self.stats.last_seq.store(next_seq - 1, Ordering::Relaxed);
        if self.config.durability != Durability::None {
            self.sync()?;
        }
        if let Some(c) = c {
            let received = rate(c.bytes, c.started);
            tracing::info!(
                next_seq,
                records = c.records,
                dropped = c.dropped,
                received,
                "caught up from the active's log"
            );
        }
        Ok(())
    }

    /// Follower dropping its own ops past the fork: one `Live` list of the
    /// primary's records through it. Its own ops may have made records die
    /// here (gone) or rewritten them (the compactor's `Nothing`): it wants
    /// those the primary holds as they are there. Records the primary no
    /// longer holds go. After the last list, `Want`.
    fn want(&mut self, from: u64, to: u64, keys: &[u64]) -> Result<(), StoreError> {
        let mut gone = Vec::new();
        let mut held = std::collections::HashSet::new();
        let wanted: std::collections::HashSet<u64> = keys.iter().copied().collect();
        if self.store.ever_compacted() {
            for kv in self.store.log().range(from.to_be_bytes()..=to.to_be_bytes()) {
                let (k, v) = kv?;
                let key = be_u64(&k).unwrap_or(u64::MAX);
                if !wanted.contains(&key) {
                    gone.push(key);
                    continue;
                }
                // One its own compactor may have rewritten (by an index
                // that held its own ops) is wanted, and one that does not read.
                if BatchBody::decode(key, &v).is_ok_and(|b| !b.ops.iter().any(|o| matches!(o, Op::Nothing))) {
                    held.insert(key);
                }
            }
        } else {
            // Never rewritten here: what it holds is what its index holds
            // (a record dead here whose delete failed is wanted: harmless).
            for key in self.index.record_keys_in(from, to) {
                if wanted.contains(&key) {
                    held.insert(key);
                } else {
                    gone.push(key);
                }
            }
        }
        self.store.delete_records(&gone)?;
        let Some(c) = self.catchup.as_mut() else { return Ok(()) };
        c.dropped += gone.len() as u64;
        let Some(w) = c.wanting.as_mut() else { return Ok(()) };
        w.keys.extend(keys.iter().filter(|k| !held.contains(k)));
        if to == w.after {
            let w = c.wanting.take().expect("wanting");
            c.want_sent = true;
            // The admin entries came first: the index read again keeps the
            // messages of the queues the active has. They come again at the end.
            let seen = std::mem::take(&mut c.admin);
            self.replace_admin(&seen)?;
            tracing::info!(records = w.keys.len(), "asking the active for the records this store's own ops changed");
            if let Some(tx) = self.conns.get(&w.conn) {
                tx.send(ToPeer::Repl(ReplFrame::Want { attach: w.attach, keys: w.keys }));
            }
        }
        Ok(())
    }

    /// Drop the admin entries the active did not send (`seen` are those it did).
    fn replace_admin(&self, seen: &std::collections::HashSet<Vec<u8>>) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        for k in self.store.admin.iter().keys() {
            let k = k?;
            if !seen.contains(k.as_ref()) {
                b.remove(k);
            }
        }
        self.store.admin.apply_batch(b)?;
        Ok(())
    }

    /// Primary: the records keyed `wanted` still in the log, as `SnapRecord`.
    fn send_wanted(&self, conn: ConnId, wanted: &[u64]) -> Result<(), StoreError> {
        let Some(tx) = self.conns.get(&conn) else { return Ok(()) };
        let mut sent = 0;
        for key in wanted {
            if let Some(raw) = self.store.log().get(key.to_be_bytes())? {
                tx.send(ToPeer::Repl(ReplFrame::SnapRecord { key: *key, raw: Bytes::copy_from_slice(&raw) }));
                sent += 1;
            }
        }
        if !wanted.is_empty() {
            tracing::info!(wanted = wanted.len(), sent, "sent the peer the records its own ops had changed");
        }
        Ok(())
    }

    /// Follower: drop this store's ops past `after` (what may have been
    /// confirmed was kept for the hand-over just before). Its idempotence
    /// marks go too (those of the primary come with the catch-up), and its
    /// index is read from the log again before anything is applied.
    fn truncate(&mut self, conn: ConnId, attach: crate::repl::AttachId, after: u64) -> Result<(), StoreError> {
        let keys: Vec<u64> = self
            .store
            .log()
            .range((after + 1).to_be_bytes()..)
            .keys()
            .map(|k| k.map(|k| be_u64(&k).unwrap_or(u64::MAX)))
            .collect::<Result<_, _>>()?;
        self.store.forget_checkpoint()?;
        self.store.set_wanting(true)?;
        self.store.delete_records(&keys)?;
        self.store.producers.clear()?;
        self.dedup.clear();
        self.dirty_dedup.clear();
        self.dedup_used.clear();
        self.store.persist_floor(after + 1, std::iter::empty())?;
        self.sync()?;
        if let Some(c) = &mut self.catchup {
            c.reread = true;
            c.wanting = Some(Wanting { conn, attach, after, keys: Vec::new() });
        }
        tracing::warn!(
            after,
            records = keys.len(),
            "dropped this store's own ops past the fork with the active's history"
        );
        Ok(())
    }

    /// Why nothing but the records it wanted may be taken now: this store
    /// dropped its own ops past a fork and has not received those records
    /// (a catch-up cut off after the drop, maybe before a restart). Refused,
    /// the active sends a snapshot instead.
    fn lacking(&self) -> Option<String> {
        let asked = self.catchup.as_ref().is_some_and(|c| c.want_sent);
        (self.store.wanting() && !asked)
            .then(|| "this store dropped its own ops and lacks records they had changed: a snapshot is needed".into())
    }

    /// After a truncation, once: the index as the log now has it.
    fn reread_after_truncation(&mut self) -> Result<(), StoreError> {
        if !self.catchup.as_ref().is_some_and(|c| c.reread) {
            return Ok(());
        }
        if let Some(c) = &mut self.catchup {
            c.reread = false;
        }
        let started = Instant::now();
        self.index = LiveIndex::default(); // (not two at once)
        let recovered = self.store.recover()?;
        self.index = recovered.index;
        self.dedup = recovered.dedup;
        self.applied_through = self.replica.next_seq() - 1;
        self.checkpointed_through = 0;
        tracing::info!(
            batches = recovered.batches,
            ms = started.elapsed().as_millis() as u64,
            "index read again after dropping this store's own ops"
        );
        Ok(())
    }

    /// One snapshot frame (or a record interleaved with it) into staging.
    fn stage(&mut self, frame: ReplFrame) -> Result<(), StoreError> {
        if let Some(st) = &mut self.staging {
            st.bytes += frame.weight() as u64;
        }
        match frame {
            ReplFrame::SnapRecord { key, raw } => {
                // Verify before storing: a corrupt copy must not become our store.
                let body = match BatchBody::decode(key, &raw) {
                    Ok(b) => b,
                    Err(e) => return self.apply_failed(key, e.to_string()),
                };
                self.store.staging_log().insert(key.to_be_bytes(), raw.as_ref())?;
                if let Some(st) = &mut self.staging {
                    let dead = st.index.apply(&body, raw.len() as u64);
                    st.records.note(&body, dead);
                }
            }
            ReplFrame::SnapAdmin { key, value } => {
                self.store.staging_admin.insert(key.as_ref(), value.as_ref())?;
            }
            ReplFrame::SnapProducer { key, value } => {
                self.store.staging_producers.insert(key.as_ref(), value.as_ref())?;
            }
            ReplFrame::Batch { first_seq, raw, .. } => {
                let body = match BatchBody::decode(first_seq, &raw) {
                    Ok(b) => b,
                    Err(e) => return self.apply_failed(first_seq, e.to_string()),
                };
                Store::materialise(&self.store.staging_admin, &body)?;
                self.store.staging_log().insert(first_seq.to_be_bytes(), raw.as_ref())?;
                if let Some(st) = &mut self.staging {
                    st.late.push(first_seq);
                }
                for op in &body.ops {
                    if let Op::Enqueue { message, .. } = op {
                        if message.producer_id != 0 {
                            let key = message.producer_id.to_be_bytes();
                            let newer = self.store.staging_producers.get(key)?.and_then(|v| be_u64(&v))
                                < Some(message.producer_seq);
                            if newer {
                                self.store.staging_producers.insert(key, &message.producer_seq.to_be_bytes())?;
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Keep, durably, the messages this store holds after `after` that may
    /// have been confirmed, before its copy is replaced by the peer's.
    fn keep_handover(&mut self, after: u64, all: bool) -> Result<(), StoreError> {
        let from = if all || self.config.durability != Durability::Replicated {
            Some(0)
        } else {
            self.replica.meta().alone_since
        };
        let Some(from) = from else {
            tracing::info!(after, "this store's ops past the fork were never confirmed: nothing to hand over");
            return Ok(());
        };
        // Only the records past the fork: a message enqueued past it can
        // only be acked past it too, so they tell which of them are live.
        let mut own = LiveIndex::default();
        let mut records = 0;
        for kv in self.store.log().range((after + 1).to_be_bytes()..) {
            let (k, v) = kv?;
            let key = be_u64(&k).ok_or(StoreError::Corrupt { key: 0, reason: "log key is not 8 bytes".into() })?;
            own.apply(&BatchBody::decode(key, &v)?, v.len() as u64);
            records += 1;
        }
        let admin = self.store.recover_admin()?;
        let recovered = Recovered::from_index(0, 0, admin, HashMap::new(), &own, records);
        let mut kept = Vec::new();
        for (queue, messages) in &recovered.messages {
            for r in messages.iter().filter(|m| m.seq > after && m.seq >= from) {
                match self.store.read_message(r.seq)? {
                    Some(m) => kept.push((queue.clone(), (*m).clone())),
                    None => tracing::error!(queue, seq = r.seq, "a live message has no record; not handed over"),
                }
            }
        }
        kept.sort_by_key(|(_, m)| m.seq);
        if !kept.is_empty() {
            tracing::warn!(
                messages = kept.len(),
                after,
                "this node holds messages the active's history lacks; handing them to the new active"
            );
        }
        self.store.keep_for_handover(&kept)?;
        // Users, ACLs and queues made or changed on this side past the fork
        // are not lost with its history either (DESIGN.md section 5). Only
        // those: one made before the fork and deleted on the other side
        // since must stay deleted.
        let since = (after + 1).max(from);
        let users = self.store.users_changed_since(since)?;
        let queues: BTreeMap<String, QueueEntry> =
            recovered.queues.into_iter().filter(|(_, q)| q.created_seq >= since).collect();
        if !users.is_empty() || !queues.is_empty() {
            tracing::warn!(
                users = users.len(),
                queues = queues.len(),
                after,
                "this node made users or queues the active's history lacks; handing them over too"
            );
        }
        self.store.keep_admin_for_handover(&users, &queues)?;
        self.sync()?;
        self.count_handover();
        Ok(())
    }

    /// Pair: the lease the role arbiter renews, as of now. Every decision
    /// that depends on it (admit, confirm what waited for a peer gone) must
    /// see the latest, not the one of the last commit: with every publish
    /// held, no commit renews it.
    fn refresh_lease(&mut self) {
        if !self.config.active {
            self.replica.set_lease(self.stats.lease_until_ms.load(Ordering::Relaxed));
        }
    }

    fn commit(&mut self, pending: &mut Vec<Request>) {
        self.check_watchdog();
        let now = lease_now_ms();
        self.refresh_lease();
        let admitted = match self.replica.admit(now) {
            Ok(a) => a,
            Err(refusal) => {
                for r in pending.drain(..) {
                    complete(r, Err(refusal_error(&refusal, !self.config.active)));
                }
                return;
            }
        };
        // Assign sequence numbers, skipping idempotent duplicates.
        let first_seq = admitted.first_seq;
        let mut next_seq = first_seq;
        let mut all_ops: Vec<Op> = Vec::new();
        // Per submission: its completion, (first seq, ops stored), the resends left out.
        type Planned = (Completion, Option<(u64, usize)>, Vec<usize>);
        let mut plan: Vec<Planned> = Vec::with_capacity(pending.len());
        for r in pending.drain(..) {
            match r {
                Request::Submit(ops, done) => {
                    let start = next_seq;
                    let mut skipped = Vec::new();
                    for (i, mut op) in ops.into_iter().enumerate() {
                        if let Op::Enqueue { message, .. } = &mut op {
                            if message.producer_id != 0 {
                                let (id, seq) = (message.producer_id, message.producer_seq);
                                if self.dedup.get(&id).is_some_and(|&last| seq <= last) {
                                    skipped.push(i);
                                    continue;
                                }
                                self.dedup.insert(id, seq);
                                self.dirty_dedup.insert(id, seq);
                                self.dedup_used.insert(id, std::time::Instant::now());
                            }
                            message.epoch = admitted.epoch;
                            message.seq = next_seq;
                        }
                        all_ops.push(op);
                        next_seq += 1;
                    }
                    let n = (next_seq - start) as usize;
                    plan.push((done, (n > 0).then_some((start, n)), skipped));
                }
                Request::Barrier(done) => plan.push((done, None, Vec::new())),
                other => complete(other, Err(StoreError::Replication("not a submission".into()))),
            }
        }
        let epoch = admitted.epoch;
        let dup = |duplicates| Committed { epoch, first_seq: 0, ops: Vec::new(), duplicate: true, duplicates };
        if all_ops.is_empty() {
            // Duplicates and barriers: done once everything before them is.
            let seq = self.replica.next_seq() - 1;
            for (done, _, skipped) in plan {
                self.hold(seq, done, dup(skipped));
            }
            return;
        }
        let body = BatchBody { epoch, first_seq, ops: all_ops };
        let last_seq = body.last_seq();
        let written = (|| {
            if admitted.persist_meta {
                self.store.set_repl_meta(self.replica.meta())?;
            }
            self.write(&body)
        })();
        let records = match written {
            Ok(records) => records,
            Err(e) => {
                tracing::error!(error = %e, first_seq, "store write failed; refusing further writes");
                self.fail_disk(&e.to_string());
                let pair = !self.config.active;
                for (done, _, _) in plan {
                    done(Err(disk_error(e.to_string(), pair)));
                }
                return;
            }
        };
        let mut ops = body.ops.into_iter();
        for (done, slot, skipped) in plan {
            let c = match slot {
                Some((start, n)) => Committed {
                    epoch,
                    first_seq: start,
                    ops: ops.by_ref().take(n).collect(),
                    duplicate: false,
                    duplicates: skipped,
                },
                None => dup(skipped),
            };
            self.held.push_back(Held { seq: last_seq, done, result: c });
        }
        let mut out = Vec::new();
        for (first, last, raw) in records {
            self.replica.committed(first, last, raw, &mut out);
        }
        // Counters are current before anyone hears of the confirm.
        self.publish_stats();
        let _ = self.perform(out);
    }

    /// Complete `done` once the confirm horizon reaches `seq` (now, if it has).
    fn hold(&mut self, seq: u64, done: Completion, result: Committed) {
        if self.held.is_empty() && self.replica.confirmed_through().is_none_or(|c| c >= seq) {
            done(Ok(result));
        } else {
            self.held.push_back(Held { seq, done, result });
        }
    }

    fn nothing(&self) -> Committed {
        Committed {
            epoch: self.replica.epoch(),
            first_seq: 0,
            ops: Vec::new(),
            duplicate: false,
            duplicates: Vec::new(),
        }
    }

    /// Write the index checkpoint if records arrived since the last one
    /// (never while a snapshot is loading or after the disk failed).
    fn checkpoint(&mut self) {
        self.last_checkpoint = Instant::now();
        self.records_since_checkpoint = 0;
        if !(self.checkpoint_due() || self.store.checkpoints() && self.compacted_since_checkpoint)
            || self.stats.loading.load(Ordering::Relaxed)
            || self.stats.disk_failed.load(Ordering::SeqCst)
        {
            return;
        }
        let started = Instant::now();
        let next_seq = self.applied_through + 1;
        match self.store.checkpoint(self.applied_through, next_seq, &self.index, &self.dedup) {
            Ok(bytes) => {
                self.checkpointed_through = self.applied_through;
                self.compacted_since_checkpoint = false;
                self.last_checkpoint_bytes = bytes;
                tracing::debug!(
                    through = self.applied_through,
                    bytes,
                    ms = started.elapsed().as_millis() as u64,
                    "index checkpoint written"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not write the index checkpoint; a restart reads more of the log")
            }
        }
    }

    /// Records were written since the last index checkpoint. (Records the
    /// compactor rewrote wait for the next checkpoint that is due anyway,
    /// or the one at stop: a checkpoint with their old sizes only makes the
    /// compactor read them once more after a restart.)
    fn checkpoint_due(&self) -> bool {
        self.store.checkpoints() && self.applied_through != self.checkpointed_through
    }

    /// A bounded pass of the compactor (not while a snapshot is sent or
    /// loaded, or after the disk failed).
    fn compact(&mut self) {
        // (Not during a catch-up either: a follower that dropped its own ops
        // reads its index again, and rewrites by the index before it would
        // drop messages its own ops had made dead.)
        if self.snapshot.is_some()
            || self.catchup.is_some()
            || self.stats.loading.load(Ordering::Relaxed)
            || self.stats.disk_failed.load(Ordering::SeqCst)
        {
            return;
        }
        let pass = self.compactor.pass(&self.store, &mut self.index, self.applied_through + 1, self.delete_failed);
        if pass.rewritten > 0 {
            if let Err(e) = self.store.note_compacted() {
                tracing::warn!(error = %e, "could not note that the compactor ran");
            }
            self.compacted_since_checkpoint = true;
            self.stats.compacted_records.fetch_add(pass.rewritten, Ordering::Relaxed);
            self.stats.compacted_bytes.fetch_add(pass.freed, Ordering::Relaxed);
            self.compaction_unlogged.rewritten += pass.rewritten;
            self.compaction_unlogged.freed += pass.freed;
        }
        // (The clock is read only once something was rewritten.)
        let done = self.compaction_unlogged;
        if done.rewritten > 0 && self.compaction_logged.elapsed() >= COMPACTION_LOG_EVERY {
            let since = self.compaction_logged.elapsed();
            tracing::info!(
                records = done.rewritten,
                freed_bytes = done.freed,
                secs = since.as_secs(),
                live_record_bytes = self.index.live_bytes(),
                live_message_bytes = self.index.live_weight(),
                "compacted records pinned by a few live messages"
            );
            self.compaction_unlogged = Pass::default();
            self.compaction_logged = Instant::now();
        }
    }

    /// Admin entries, the records (see [`BatchBody::records`]), one sync,
    /// dead records deleted. Returns each record: first and last sequence, bytes.
    fn write(&mut self, body: &BatchBody) -> Result<Vec<(u64, u64, Bytes)>, StoreError> {
        Store::materialise(&self.store.admin, body)?;
        let mut records = Vec::new();
        for run in body.records() {
            let first = body.first_seq + run.start as u64;
            let raw = Bytes::from(BatchBody::encode_ops(body.epoch, first, &body.ops[run.clone()])?);
            self.store.log().insert(first.to_be_bytes(), raw.as_ref())?;
            records.push((run, first, raw));
        }
        if self.config.durability != Durability::None {
            self.sync()?;
        }
        let mut dead = Vec::new();
        let mut out = Vec::with_capacity(records.len());
        self.count(body.ops.len(), records.len(), records.iter().map(|(_, _, raw)| raw.len() as u64).sum());
        for (run, first, raw) in records {
            let len = raw.len() as u64;
            dead.extend(self.index.apply_ops(first, &body.ops[run.clone()], len));
            self.records_since_checkpoint += len;
            out.push((first, first + run.len() as u64 - 1, raw));
        }
        self.applied_through = self.applied_through.max(body.last_seq());
        self.delete(&dead, body.last_seq() + 1);
        Ok(out)
    }

    /// The store's sync, timed (a watchdog reads how long it has run), and
    /// checked against that watchdog afterwards: a sync that hung past
    /// `disk_stall_ms` confirms nothing even when it returns.
    fn sync(&self) -> Result<(), StoreError> {
        let t = Instant::now();
        self.stats.flush_started_ms.store(lease_now_ms().max(1), Ordering::SeqCst);
        let result = self.store.sync();
        self.stats.flush_started_ms.store(0, Ordering::SeqCst);
        let synced = result?;
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.stats.fsyncs.fetch_add(synced.fsyncs, Ordering::Relaxed);
        self.stats.last_flush_us.store(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        if self.stats.disk_failed.load(Ordering::SeqCst) {
            return Err(StoreError::Failed(self.stats.failure().unwrap_or_else(|| "the disk failed".into())));
        }
        Ok(())
    }

    fn note_producers(&mut self, body: &BatchBody) {
        for op in &body.ops {
            if let Op::Enqueue { message, .. } = op {
                if message.producer_id != 0 {
                    self.dedup.insert(message.producer_id, message.producer_seq);
                    self.dirty_dedup.insert(message.producer_id, message.producer_seq);
                    self.dedup_used.insert(message.producer_id, std::time::Instant::now());
                }
            }
        }
    }

    /// `ops` written in `records` records of `bytes` bytes in all.
    fn count(&self, ops: usize, records: usize, bytes: u64) {
        self.stats.batches.fetch_add(records as u64, Ordering::Relaxed);
        self.stats.ops.fetch_add(ops as u64, Ordering::Relaxed);
        self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Delete dead records (not a failure of what was confirmed if it fails:
    /// the records stay and are found dead again at the next open).
    /// `next_seq`: the sequence after everything written so far (kept as a
    /// floor: numbers are never reused, even once their records are gone).
    fn delete(&mut self, dead: &[u64], next_seq: u64) {
        self.prune_producers();
        if !dead.is_empty() {
            if let Err(e) = self.try_delete(dead, next_seq) {
                self.delete_failed = true;
                tracing::error!(error = %e, "could not delete dead batch records");
            }
        }
    }

    /// Forget the producer ids unused for `producer_expiry` (looked at once a
    /// minute at most): the table would otherwise grow with every producer
    /// that ever was (the probe: 200,000 ids, 45 MB on disk, 40 MB of RAM).
    fn prune_producers(&mut self) {
        let every = (self.config.producer_expiry / 60).min(std::time::Duration::from_secs(60));
        if self.last_prune.elapsed() < every || self.snapshot.is_some() {
            return;
        }
        self.last_prune = std::time::Instant::now();
        let expiry = self.config.producer_expiry;
        let since = self.dedup_since;
        let used = &self.dedup_used;
        let old: Vec<u64> =
            self.dedup.keys().filter(|p| used.get(p).copied().unwrap_or(since).elapsed() >= expiry).copied().collect();
        if old.is_empty() {
            return;
        }
        let mut b = sled::Batch::default();
        for p in &old {
            self.dedup.remove(p);
            self.dirty_dedup.remove(p);
            self.dedup_used.remove(p);
            b.remove(&p.to_be_bytes());
        }
        match self.store.producers.apply_batch(b) {
            Ok(()) => tracing::debug!(forgotten = old.len(), "idle producer ids forgotten"),
            Err(e) => tracing::warn!(error = %e, "could not forget idle producer ids"),
        }
    }

    fn try_delete(&mut self, dead: &[u64], next_seq: u64) -> Result<(), StoreError> {
        self.store.persist_floor(next_seq, self.dirty_dedup.iter())?;
        self.dirty_dedup.clear();
        self.store.delete_records(dead)
    }

    /// How many messages wait for a hand-over (read after each change of the tree).
    fn count_handover(&self) {
        self.stats.handover_pending.store(self.store.handover.len() as u64, Ordering::Relaxed);
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        let r = &self.replica;
        let last_seq = r.next_seq() - 1;
        s.live_batches.store(self.index.live_batches() as u64, Ordering::Relaxed);
        s.live_bytes.store(self.index.live_bytes(), Ordering::Relaxed);
        s.live_weight.store(self.index.live_weight(), Ordering::Relaxed);
        s.last_seq.store(last_seq, Ordering::Relaxed);
        s.epoch.store(r.epoch(), Ordering::Relaxed);
        s.floor.store(r.meta().floor, Ordering::Relaxed);
        s.last_op_epoch.store(r.meta().history.last_op_epoch(last_seq), Ordering::Relaxed);
        let follower = r.follower();
        s.peer_acked.store(follower.map_or(0, |f| f.0), Ordering::Relaxed);
        s.follower_in_sync.store(follower.is_some_and(|f| f.1), Ordering::Relaxed);
        s.follower_linked.store(follower.is_some(), Ordering::Relaxed);
        s.follower_handshaking.store(r.handshaking(), Ordering::Relaxed);
        let (gen, holds) = r.holding();
        s.holding_gen.store(gen, Ordering::Relaxed);
        s.holding.store(holds, Ordering::Relaxed);
        let in_sync = r.in_sync();
        s.in_sync_gen.store(in_sync.unwrap_or(0), Ordering::Relaxed);
        s.in_sync.store(in_sync.is_some(), Ordering::Relaxed);
        s.serve_alone.store(r.meta().serve_alone, Ordering::Relaxed);
        s.confirmed_alone.store(r.meta().alone_since.is_some(), Ordering::Relaxed);
        let (pe, pl) = r.meta().peer_seen.unwrap_or((0, 0));
        s.peer_seen_epoch.store(pe, Ordering::Relaxed);
        s.peer_seen_last.store(pl, Ordering::Relaxed);
        s.outranked.store(r.outranked(), Ordering::Relaxed);
        s.loading.store(r.loading(), Ordering::Relaxed);
        s.held_copy.store(!r.meta().history.entries().is_empty() || in_sync.is_some(), Ordering::Relaxed);
        let entries = r.meta().history.entries();
        let mut h = s.history.lock().unwrap_or_else(|p| p.into_inner());
        if h.as_slice() != entries {
            *h = entries.to_vec();
        }
    }

    /// Stream the next part of a snapshot, while its connection has room.
    fn stream_snapshot(&mut self) {
        let Some(cursor) = &self.snapshot else { return };
        if !self.replica.snapshot_wanted(&cursor.attach) {
            self.snapshot = None;
            return;
        }
        let Some(tx) = self.conns.get(&cursor.conn).cloned() else {
            self.snapshot = None;
            return;
        };
        let mut budget: usize = 1024 * 1024;
        while tx.queued() < SNAPSHOT_QUEUE && budget > 0 {
            let cursor = self.snapshot.as_mut().expect("streaming");
            if cursor.catchup && cursor.stage != 2 {
                return self.end_log_stream();
            }
            let tree = match cursor.stage {
                0 => self.store.admin.clone(),
                1 => self.store.producers.clone(),
                2 => self.store.log(),
                _ => {
                    let (attach, through) = (cursor.attach, cursor.through);
                    let sent = rate(cursor.bytes, cursor.started);
                    self.snapshot = None;
                    tracing::info!(through, sent, "snapshot sent to the peer");
                    let mut out = Vec::new();
                    self.replica.snapshot_streamed(attach, &mut out);
                    let _ = self.perform(out);
                    return;
                }
            };
            let start = match &cursor.after {
                Some(k) => Bound::Excluded(k.clone()),
                None => Bound::Unbounded,
            };
            let next = match tree.range::<Vec<u8>, _>((start, Bound::Unbounded)).next() {
                None => None,
                Some(Err(e)) => {
                    tracing::error!(error = %e, "cannot read the store for a snapshot");
                    self.fail_disk(&e.to_string());
                    return;
                }
                Some(Ok((k, v))) => Some((k, v)),
            };
            let frame = match next {
                Some((k, v)) if cursor.catchup => {
                    let key = be_u64(&k).unwrap_or(u64::MAX);
                    cursor.after = Some(k.to_vec());
                    match BatchBody::last_seq_of(key, &v) {
                        Ok(last_seq) => {
                            Some(ReplFrame::Batch { first_seq: key, last_seq, raw: Bytes::copy_from_slice(&v) })
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot read the log for the peer's catch-up");
                            self.fail_disk(&e.to_string());
                            return;
                        }
                    }
                }
                Some((k, v)) if cursor.stage == 2 => {
                    let key = be_u64(&k).unwrap_or(u64::MAX);
                    if key > cursor.through {
                        None
                    } else {
                        cursor.after = Some(k.to_vec());
                        Some(ReplFrame::SnapRecord { key, raw: Bytes::copy_from_slice(&v) })
                    }
                }
                Some((k, v)) => {
                    cursor.after = Some(k.to_vec());
                    let (key, value) = (Bytes::copy_from_slice(&k), Bytes::copy_from_slice(&v));
                    Some(if cursor.stage == 0 {
                        ReplFrame::SnapAdmin { key, value }
                    } else {
                        ReplFrame::SnapProducer { key, value }
                    })
                }
                None => None,
            };
            match frame {
                Some(f) => {
                    cursor.bytes += f.weight() as u64;
                    budget = budget.saturating_sub(f.weight());
                    tx.send(ToPeer::Repl(f));
                }
                None => {
                    cursor.stage += 1;
                    cursor.after = None;
                }
            }
        }
    }

    /// A catch-up reached the end of the log: in one go, nothing written
    /// between, every admin entry and idempotence mark, the live records,
    /// and its end. The trees are small next to the log (users, queues,
    /// producer ids); the live lists are 8 bytes a record.
    fn end_log_stream(&mut self) {
        let Some(cursor) = self.snapshot.take() else { return };
        let Some(tx) = self.conns.get(&cursor.conn).cloned() else { return };
        let mut bytes = cursor.bytes;
        let mut send = |f: ReplFrame| {
            bytes += f.weight() as u64;
            tx.send(ToPeer::Repl(f));
        };
        let entries = |tree: &sled::Tree| -> Result<Vec<(Bytes, Bytes)>, sled::Error> {
            tree.iter().map(|e| e.map(|(k, v)| (Bytes::copy_from_slice(&k), Bytes::copy_from_slice(&v)))).collect()
        };
        let (admin, producers) = match (entries(&self.store.admin), entries(&self.store.producers)) {
            (Ok(a), Ok(p)) => (a, p),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot read the store for the peer's catch-up");
                self.fail_disk(&e.to_string());
                return;
            }
        };
        for (key, value) in admin {
            send(ReplFrame::SnapAdmin { key, value });
        }
        for (key, value) in producers {
            send(ReplFrame::SnapProducer { key, value });
        }
        // Marks not yet written to the producers tree.
        for (p, s) in &self.dirty_dedup {
            send(ReplFrame::SnapProducer {
                key: Bytes::copy_from_slice(&p.to_be_bytes()),
                value: Bytes::copy_from_slice(&s.to_be_bytes()),
            });
        }
        let end = self.replica.next_seq() - 1;
        bytes += send_live(&tx, self.index.record_keys(), end);
        tracing::info!(through = end, sent = rate(bytes, cursor.started), "the peer's catch-up from the log sent");
        let mut out = Vec::new();
        self.replica.catchup_streamed(cursor.attach, &mut out);
        let _ = self.perform(out);
    }

    fn promote(&mut self, at_least: u64, in_sync_gen: Option<u64>, how: Promotion) -> Result<Recovered, StoreError> {
        let mut out = Vec::new();
        let epoch = self
            .replica
            .promote(at_least, rand::random(), in_sync_gen, how, &mut out)
            .map_err(StoreError::Replication)?;
        self.perform(out)?;
        self.snapshot = None;
        self.take_back_handover(epoch)?;
        // Hot standby (DESIGN.md section 5): the index was kept up to date
        // as records arrived; nothing is read per message here.
        let started = Instant::now();
        let admin = self.store.recover_admin()?;
        let next_seq = self.replica.next_seq();
        let recovered =
            Recovered::from_index(epoch, next_seq, admin, self.dedup.clone(), &self.index, self.index.live_batches());
        tracing::info!(
            messages = self.index.live_messages(),
            ms = started.elapsed().as_millis() as u64,
            "live state taken from the index kept while passive"
        );
        self.publish_stats();
        Ok(recovered)
    }

    /// Becoming active with messages kept for a hand-over the peer never
    /// confirmed storing: they are stored here again, in the queues they were
    /// in (at-least-once: the peer may have them too).
    fn take_back_handover(&mut self, epoch: u64) -> Result<(), StoreError> {
        let pending = self.store.pending_handover()?;
        let admin = self.store.pending_handover_admin()?;
        if pending.is_empty() && admin.is_empty() {
            return Ok(());
        }
        let ids: Vec<(u64, u64)> = pending.iter().map(|(_, m)| (m.epoch, m.seq)).collect();
        let admitted = self.replica.admit(lease_now_ms()).map_err(|r| refusal_error(&r, !self.config.active))?;
        let mut ops = Vec::new();
        let mut created = std::collections::HashSet::new();
        let mut seq = admitted.first_seq;
        // Users and queues it made that the history it followed lacked: its own again.
        for (name, user) in admin.users {
            if self.store.admin.get(format!("{USER_PREFIX}{name}").as_bytes())?.is_none() {
                ops.push(Op::PutUser { name, user });
                seq += 1;
            }
        }
        for name in admin.queues {
            let key = format!("q/{name}");
            if self.store.admin.get(key.as_bytes())?.is_none() && created.insert(key.clone()) {
                ops.push(Op::PutQueue { key, spec: crate::QueueSpec { kind: crate::QueueKind::Queue } });
                seq += 1;
            }
        }
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
            if admitted.persist_meta {
                self.store.set_repl_meta(self.replica.meta())?;
            }
            let body = BatchBody { epoch, first_seq: admitted.first_seq, ops };
            let records = self.write(&body)?;
            let mut out = Vec::new();
            for (first, last, raw) in records {
                self.replica.committed(first, last, raw, &mut out);
            }
            self.perform(out)?;
        }
        self.store.handed_over(&ids)?;
        self.store.handed_over_admin()?;
        self.sync()?;
        self.count_handover();
        tracing::warn!(messages = ids.len(), "what was kept for a hand-over the peer never stored is stored here");
        Ok(())
    }
}

fn be_u64(v: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes)
}

/// `pair`: a failed disk sends clients to the peer.
fn refusal_error(r: &Refusal, pair: bool) -> StoreError {
    match r {
        Refusal::NotActive => StoreError::NotActive,
        Refusal::NoReplica => StoreError::NoReplica,
        Refusal::Failed(reason) => disk_error(reason.clone(), pair),
    }
}

fn disk_error(reason: String, pair: bool) -> StoreError {
    if pair {
        StoreError::FailedOver(reason)
    } else {
        StoreError::Failed(reason)
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
        Request::Promote { done, .. } => done(Err(result.err().unwrap_or(StoreError::Closed))),
        Request::RaiseFloor(_, Some(done)) => done(result.map(|_| ())),
        _ => {}
    }
}
