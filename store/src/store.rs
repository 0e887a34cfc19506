//! Opening the sled database and recovering live state from it.
//!
//! Trees: `log` (batch records by first sequence), `admin` (stored queues and
//! durable subscriptions under their queue keys `q/..`, `d/..`; users and
//! their grants under `u/<name>`; materialised), `producers` (idempotence high-water
//! marks that outlived their batches), `meta` (node id, the replication
//! state [`ReplMeta`], sequence floor), `handover` (messages kept for a
//! peer), and the `staging_*` copies of the first three where a snapshot
//! from the peer is loaded beside the store until it is complete.
//!
//! "Flushed" means fdatasync'd: sled 0.34 ends its flush with
//! `sync_file_range` (no metadata, no device cache flush), and writes values
//! over a quarter of a segment to files under `blobs/` without any fsync.
//! [`Store::sync`] follows sled's flush with an fdatasync of its log file and
//! an fsync of every blob file it created (and of their directory).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex};

use crate::bodies::BodyCache;
use crate::index::{LiveIndex, MessageRef};
use crate::op::{BatchBody, Op, QueueSpec, StoredMessage, UserRecord};
use crate::repl::{EpochStart, History, ReplMeta};
use crate::StoreError;

/// Before the replication state was one record (`repl`): kept to migrate.
const META_EPOCH: &[u8] = b"epoch";
const META_ALONE_SINCE: &[u8] = b"alone_since";
const META_NEXT_SEQ: &[u8] = b"next_seq";
const META_NODE_ID: &[u8] = b"node_id";
/// The replication state ([`ReplMeta`]), MessagePack.
const META_REPL: &[u8] = b"repl";
/// A complete staged snapshot is being swapped in (its next sequence):
/// redone at open if a crash interrupted it.
const META_STAGED: &[u8] = b"staged";
/// Which of the trees `log` and `staging_log` holds the log (absent: `log`):
/// a snapshot from the peer is staged in the other and swapped in by
/// flipping this, not by copying it.
const META_LOG_TREE: &[u8] = b"log_tree";
/// This node's compactor rewrote a record once (see [`Store::note_compacted`]).
const META_COMPACTED: &[u8] = b"compacted";
/// This store dropped its own ops past a fork and has not yet received the
/// records they had changed (see [`Store::set_wanting`]).
const META_WANTING: &[u8] = b"wanting";
const LOG_TREES: [&str; 2] = ["log", "staging_log"];

/// What records said as they were applied to an index, read at open or
/// staged from a snapshot (see [`Store::recover_staged`]).
#[derive(Debug, Default)]
pub(crate) struct StagedRecords {
    /// The highest producer sequence of each producer id in them.
    pub dedup: HashMap<u64, u64>,
    /// The sequence after the last of them.
    pub next_seq: u64,
    pub count: usize,
    /// Records found dead as they were applied (deleted once swapped in).
    pub dead: Vec<u64>,
}

impl StagedRecords {
    /// Note a record applied to the staged index (`dead`: what that made dead).
    pub fn note(&mut self, body: &BatchBody, dead: Vec<u64>) {
        self.count += 1;
        self.next_seq = self.next_seq.max(body.last_seq() + 1);
        self.dead.extend(dead);
        for op in &body.ops {
            if let Op::Enqueue { message, .. } = op {
                if message.producer_id != 0 {
                    let e = self.dedup.entry(message.producer_id).or_insert(0);
                    *e = (*e).max(message.producer_seq);
                }
            }
        }
    }
}

/// The log and the tree a snapshot is staged in (they trade places when one is swapped in).
struct Logs {
    log: sled::Tree,
    staging: sled::Tree,
}

/// When a write counts as done. The promise each mode makes is written once,
/// in the crate documentation (see `lib.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Confirmed once written to sled's buffers, before any flush.
    None,
    /// Confirmed once flushed (fsync) on this node.
    Local,
    /// Confirmed once flushed here and on the in-sync peer (the pair).
    Replicated,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Durability::None),
            "local" => Ok(Durability::Local),
            "replicated" => Ok(Durability::Replicated),
            other => Err(format!("unknown durability `{other}` (expected none, local or replicated)")),
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Durability::None => "none",
            Durability::Local => "local",
            Durability::Replicated => "replicated",
        })
    }
}

/// Options for [`Store::open`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
    /// sled page cache, bytes.
    pub cache_bytes: u64,
    /// Message bodies read back from their records and kept for the
    /// deliveries that follow (see `bodies.rs`), bytes.
    pub read_cache_bytes: usize,
    /// Start from the index checkpoint (fast; records it covers are checked
    /// when read), or read and check every record at open (a pair member: a
    /// copy that fails its checks is set aside and resynced from the peer).
    pub checkpoints: bool,
}

impl StoreConfig {
    pub fn new(path: impl AsRef<Path>) -> Self {
        StoreConfig {
            path: path.as_ref().to_path_buf(),
            cache_bytes: 64 << 20,
            read_cache_bytes: 32 << 20,
            checkpoints: true,
        }
    }
}

/// sled's segment size for stores this version makes: 2 MiB, so that a
/// page of 16 records of [`crate::op::RECORD_TARGET_BYTES`] stays below
/// its blob threshold (a quarter of a segment) and counts in its cache.
pub const SEGMENT_BYTES: usize = 2 << 20;

/// The segment size the store at `path` was made with (`None`: no store yet).
fn made_with_segment_size(path: &Path) -> Option<usize> {
    std::fs::read(path.join("conf")).ok().and_then(|raw| {
        String::from_utf8_lossy(&raw)
            .lines()
            .find_map(|l| l.strip_prefix("segment_size: ").and_then(|v| v.trim().parse::<usize>().ok()))
    })
}

/// A store made by an earlier version (sled segments of another size: sled
/// refuses to open it with ours) is copied, tree by tree, into a new store
/// beside it (`<dir>.migrating`), which then takes its place; the old one
/// is kept as `<dir>.pre-migration` until the operator removes it. A crash
/// at any point leaves either the old store in place (the copy is made
/// again) or the complete copy ready to be moved in (done at the next open).
fn migrate_if_needed(path: &Path) -> Result<(), StoreError> {
    let io = |e: std::io::Error| StoreError::Open { path: path.to_path_buf(), source: sled::Error::Io(e) };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let new = path.with_file_name(format!("{name}.migrating"));
    let old = path.with_file_name(format!("{name}.pre-migration"));
    let complete = new.join("twinmq-migration-complete");
    if !path.exists() && complete.exists() {
        std::fs::rename(&new, path).map_err(io)?;
        std::fs::remove_file(path.join("twinmq-migration-complete")).map_err(io)?;
        tracing::warn!(path = %path.display(), "finished moving a migrated store into place");
        return Ok(());
    }
    let Some(from) = made_with_segment_size(path).filter(|n| *n != SEGMENT_BYTES) else { return Ok(()) };
    if old.exists() {
        return Err(io(std::io::Error::other(format!(
            "{} needs migrating but {} is in the way: move it elsewhere",
            path.display(),
            old.display()
        ))));
    }
    let started = std::time::Instant::now();
    tracing::warn!(path = %path.display(), segment_size = from, "migrating a store made by an earlier version (sled segments of {from} bytes, now {SEGMENT_BYTES}); the old copy is kept as {}", old.display());
    let _ = std::fs::remove_dir_all(&new);
    let open = |p: &Path, segment: usize| {
        sled::Config::new()
            .path(p)
            .segment_size(segment)
            .open()
            .map_err(|e| StoreError::Open { path: p.to_path_buf(), source: e })
    };
    let (src, dst) = (open(path, from)?, open(&new, SEGMENT_BYTES)?);
    let mut items = 0u64;
    for tree_name in src.tree_names() {
        let (a, b) = (src.open_tree(&tree_name)?, dst.open_tree(&tree_name)?);
        for kv in a.iter() {
            let (k, v) = kv?;
            b.insert(k, v)?;
            items += 1;
        }
    }
    dst.flush()?;
    drop((src, dst));
    std::fs::File::create(&complete).and_then(|f| f.sync_all()).map_err(io)?;
    std::fs::rename(path, &old).map_err(io)?;
    std::fs::rename(&new, path).map_err(io)?;
    std::fs::remove_file(path.join("twinmq-migration-complete")).map_err(io)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io)?;
    }
    tracing::warn!(items, ms = started.elapsed().as_millis() as u64, old = %old.display(), "store migrated; remove the old copy once the node runs well");
    Ok(())
}

/// What one read of a body from disk reads ahead (see [`Store::read_message`]).
const READ_AHEAD_BYTES: usize = 64 * 1024;

/// How long [`Store::open`] waits for a store locked by another process.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A stored queue as recovered: its definition and the sequence of the op that created it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueEntry {
    pub spec: QueueSpec,
    /// Messages with a lower sequence belong to an earlier queue of the same name.
    pub created_seq: u64,
}

/// Admin tree key prefix of users.
pub(crate) const USER_PREFIX: &str = "u/";
/// Admin tree key prefix of delivery counts: `r/<queue key>\0<seq BE>`.
const REDELIVERED_PREFIX: &str = "r/";
/// Admin tree key prefix of handed-in messages: `h/<epoch BE><seq BE><queue key>`.
const HANDED_IN_PREFIX: &str = "h/";

fn redelivered_key(queue: &str, seq: u64) -> Vec<u8> {
    let mut k = format!("{REDELIVERED_PREFIX}{queue}\0").into_bytes();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn handed_in_key(epoch: u64, seq: u64, queue: &str) -> Vec<u8> {
    let mut k = HANDED_IN_PREFIX.as_bytes().to_vec();
    k.extend_from_slice(&epoch.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k.extend_from_slice(queue.as_bytes());
    k
}

/// A stored user as recovered: the record and the sequence of the op that wrote it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UserEntry {
    pub user: UserRecord,
    pub seq: u64,
}

/// Handle on the database. Cheap to clone (sled trees are reference counted).
#[derive(Clone)]
pub struct Store {
    pub(crate) db: sled::Db,
    logs: Arc<std::sync::RwLock<Logs>>,
    pub(crate) admin: sled::Tree,
    pub(crate) producers: sled::Tree,
    pub(crate) meta: sled::Tree,
    /// Messages this node may have confirmed that its peer's history lacks,
    /// kept until the active says it stored them (not cleared by a
    /// snapshot). Key: the message's epoch, sequence and queue.
    pub(crate) handover: sled::Tree,
    /// With `handover`: this node's users (`u/<name>`) and queues
    /// (`q/<name>`) as they were when its history was replaced, for the
    /// active to create those it lacks.
    pub(crate) handover_admin: sled::Tree,
    /// Keys of records deleted since the index checkpoint that holds them.
    pub(crate) dead: sled::Tree,
    /// The index checkpoint covers the records up to this key (0: none).
    ckpt_through: Arc<std::sync::atomic::AtomicU64>,
    /// This node's compactor ever rewrote a record here.
    compacted: Arc<std::sync::atomic::AtomicBool>,
    /// See [`META_WANTING`].
    wanting: Arc<std::sync::atomic::AtomicBool>,
    /// A snapshot from the peer, loaded here until complete (its log in `logs`).
    pub(crate) staging_admin: sled::Tree,
    pub(crate) staging_producers: sled::Tree,
    /// sled's log file, fdatasync'd after each flush.
    db_file: Arc<std::fs::File>,
    blobs: Arc<Mutex<BlobSync>>,
    checkpoints: bool,
    /// Bodies read back for delivery.
    pub(crate) bodies: Arc<BodyCache>,
    path: PathBuf,
}

/// Which of sled's blob files are known to be synced.
#[derive(Debug, Default)]
struct BlobSync {
    synced: std::collections::HashSet<std::ffi::OsString>,
    dir_mtime: Option<std::time::SystemTime>,
    checked_at: Option<std::time::SystemTime>,
}

/// What one [`Store::sync`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Synced {
    /// fdatasync/fsync calls made.
    pub fsyncs: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// Users and queues a node held when its history was replaced by its
/// peer's, handed to the active with its messages (DESIGN.md section 5):
/// the active creates those it lacks and keeps its own where both exist.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HandoverAdmin {
    pub users: Vec<(String, UserRecord)>,
    /// Queue names (without the `q/` prefix).
    pub queues: Vec<String>,
}

impl HandoverAdmin {
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.queues.is_empty()
    }
}

/// What the admin tree holds (see [`Store::recover_admin`]).
#[derive(Debug)]
pub(crate) struct AdminState {
    pub queues: BTreeMap<String, QueueEntry>,
    pub users: BTreeMap<String, UserRecord>,
    pub deliveries: HashMap<(String, u64), u32>,
    /// No op may get a sequence number below this.
    pub floor: u64,
}

/// Everything the broker needs after [`Store::open`] or a promotion.
#[derive(Debug)]
pub struct Recovered {
    pub epoch: u64,
    /// Sequence number the next op gets.
    pub next_seq: u64,
    pub queues: BTreeMap<String, QueueEntry>,
    /// Users by name.
    pub users: BTreeMap<String, UserRecord>,
    /// Live messages per queue key, in sequence order: references, not
    /// bodies (read on delivery with [`Store::read_message`]).
    pub messages: HashMap<String, Vec<MessageRef>>,
    /// Delivery counts kept for messages that came back (queue key, seq).
    pub deliveries: HashMap<(String, u64), u32>,
    /// Producer id -> highest producer sequence stored.
    pub dedup: HashMap<u64, u64>,
    pub(crate) index: LiveIndex,
    /// Batch records read.
    pub batches: usize,
}

impl Recovered {
    /// The live state the index describes: each stored queue's messages
    /// (only those of queues that exist), their kept delivery counts.
    pub(crate) fn from_index(
        epoch: u64,
        next_seq: u64,
        admin: AdminState,
        dedup: HashMap<u64, u64>,
        index: &LiveIndex,
        batches: usize,
    ) -> Recovered {
        let mut messages: HashMap<String, Vec<MessageRef>> = HashMap::new();
        for q in admin.queues.keys() {
            messages.insert(q.clone(), index.live_refs(q).collect());
        }
        let mut deliveries = admin.deliveries;
        deliveries.retain(|(q, s), _| index.is_live(q, *s));
        Recovered {
            epoch,
            next_seq,
            queues: admin.queues,
            users: admin.users,
            messages,
            deliveries,
            dedup,
            index: LiveIndex::default(),
            batches,
        }
    }
}

/// A message's epoch and sequence, the prefix of its hand-over entries.
fn handover_prefix(epoch: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&epoch.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// One entry per queue a message is in: a topic message stored for several
/// durable subscriptions shares its epoch and sequence across them.
fn handover_key(epoch: u64, seq: u64, queue: &str) -> Vec<u8> {
    let mut k = handover_prefix(epoch, seq).to_vec();
    k.extend_from_slice(queue.as_bytes());
    k
}

/// This process's resident memory, KiB (0 where /proc is not there).
pub fn rss_kib() -> u64 {
    rss_kib_of("self")
}

/// Resident memory of process `pid` ("self", or a number), KiB (0 once it
/// is gone or where /proc is not there). Tests and benchmarks read their
/// brokers' with it.
pub fn rss_kib_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok()))
        .unwrap_or(0)
}

fn be_u64(v: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes)
}

fn decode_user(key: &str, raw: &[u8]) -> Result<UserEntry, StoreError> {
    rmp_serde::from_slice(raw).map_err(|e| StoreError::Corrupt { key: 0, reason: format!("admin entry {key}: {e}") })
}

impl Store {
    /// The users as stored right now. Safe from any thread: the broker reads
    /// them while the writer thread works (a passive node's admin logins).
    pub fn users(&self) -> Result<BTreeMap<String, UserRecord>, StoreError> {
        let mut users = BTreeMap::new();
        for kv in self.admin.scan_prefix(USER_PREFIX.as_bytes()) {
            let (k, v) = kv?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let entry = decode_user(&key, &v)?;
            users.insert(key[USER_PREFIX.len()..].to_string(), entry.user);
        }
        Ok(users)
    }

    /// Users last changed at or after op `since` (their stored entries carry
    /// the op that made them).
    pub(crate) fn users_changed_since(&self, since: u64) -> Result<BTreeMap<String, UserRecord>, StoreError> {
        let mut users = BTreeMap::new();
        for kv in self.admin.scan_prefix(USER_PREFIX.as_bytes()) {
            let (k, v) = kv?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let entry = decode_user(&key, &v)?;
            if entry.seq >= since {
                users.insert(key[USER_PREFIX.len()..].to_string(), entry.user);
            }
        }
        Ok(users)
    }

    /// Open (or create) the store at `config.path` and recover its live state.
    ///
    /// Fails with [`StoreError::Corrupt`] if any record fails its checksum: a
    /// node must not serve from a store it cannot trust (a pair member sets
    /// it aside and resyncs from its peer: see the broker).
    pub fn open(config: &StoreConfig) -> Result<(Store, Recovered), StoreError> {
        let started = std::time::Instant::now();
        migrate_if_needed(&config.path)?;
        let sled_config = sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_bytes)
            .segment_size(SEGMENT_BYTES)
            // We flush explicitly after each group commit; the background
            // flusher only bounds the loss window of `durability = none`.
            .flush_every_ms(Some(500));
        // A process killed a moment ago holds the lock until its threads are
        // gone: wait for it a bounded time rather than fail the restart.
        let mut warned = false;
        let db = loop {
            match sled_config.open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock") && started.elapsed() < LOCK_WAIT =>
                {
                    if !warned {
                        tracing::warn!(path = %config.path.display(), "the store is locked (a process that just stopped still holds it?); waiting up to {} s", LOCK_WAIT.as_secs());
                        warned = true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(StoreError::Open { path: config.path.clone(), source: e }),
            }
        };
        let open_err = |e: std::io::Error| StoreError::Open { path: config.path.clone(), source: sled::Error::Io(e) };
        let db_file = std::fs::File::open(config.path.join("db")).map_err(open_err)?;
        // The directory entries of sled's files themselves.
        std::fs::File::open(&config.path).and_then(|d| d.sync_all()).map_err(open_err)?;
        let meta = db.open_tree("meta")?;
        let current = usize::from(meta.get(META_LOG_TREE)?.is_some_and(|v| v.as_ref() == LOG_TREES[1].as_bytes()));
        let logs = Logs { log: db.open_tree(LOG_TREES[current])?, staging: db.open_tree(LOG_TREES[1 - current])? };
        let compacted = meta.contains_key(META_COMPACTED)?;
        let wanting = meta.contains_key(META_WANTING)?;
        let store = Store {
            logs: Arc::new(std::sync::RwLock::new(logs)),
            admin: db.open_tree("admin")?,
            producers: db.open_tree("producers")?,
            meta,
            handover: db.open_tree("handover")?,
            handover_admin: db.open_tree("handover_admin")?,
            dead: db.open_tree("dead")?,
            ckpt_through: Arc::default(),
            compacted: Arc::new(std::sync::atomic::AtomicBool::new(compacted)),
            wanting: Arc::new(std::sync::atomic::AtomicBool::new(wanting)),
            staging_admin: db.open_tree("staging_admin")?,
            staging_producers: db.open_tree("staging_producers")?,
            db,
            db_file: Arc::new(db_file),
            blobs: Arc::default(),
            bodies: Arc::new(BodyCache::new(config.read_cache_bytes)),
            checkpoints: config.checkpoints,
            path: config.path.clone(),
        };
        if let Some(next_seq) = store.meta_u64(META_STAGED)? {
            tracing::warn!(
                next_seq,
                "a snapshot from the peer was being swapped in when this node stopped; finishing it"
            );
            store.swap_in_staging(next_seq)?;
        }
        tracing::info!(ms = started.elapsed().as_millis() as u64, rss_kib = rss_kib(), "sled database open");
        let recovered = store.recover()?;
        tracing::info!(rss_kib = rss_kib(), "live state recovered");
        Ok((store, recovered))
    }

    /// The replication state (migrated from the keys of earlier versions).
    pub fn repl_meta(&self) -> Result<ReplMeta, StoreError> {
        if let Some(raw) = self.meta.get(META_REPL)? {
            return rmp_serde::from_slice(&raw)
                .map_err(|e| StoreError::Corrupt { key: 0, reason: format!("replication state: {e}") });
        }
        let epoch = self.meta_u64(META_EPOCH)?.unwrap_or(0);
        let history = if epoch > 0 {
            History::new(vec![EpochStart { epoch, id: 0, start: 1, forced: false }])
        } else {
            History::default()
        };
        // An earlier version's store may not serve alone at a cold start: wait for the peer.
        Ok(ReplMeta {
            epoch,
            floor: epoch,
            history,
            serve_alone: false,
            alone_since: self.meta_u64(META_ALONE_SINCE)?,
            peer_seen: None,
        })
    }

    /// Write the replication state (unflushed).
    pub(crate) fn set_repl_meta(&self, meta: &ReplMeta) -> Result<(), StoreError> {
        let raw =
            rmp_serde::to_vec(meta).map_err(|source| StoreError::Encode { what: "the replication meta", source })?;
        self.meta.insert(META_REPL, raw)?;
        Ok(())
    }

    /// Make everything written so far durable: sled's flush, then an
    /// fdatasync of its log file and an fsync of every blob file it created
    /// since the last call (and of the blob directory).
    pub fn sync(&self) -> Result<Synced, StoreError> {
        self.db.flush()?;
        self.db_file.sync_data().map_err(|source| StoreError::Io { op: "fdatasync the sled file", source })?;
        let blobs = self.sync_blobs().map_err(|source| StoreError::Io { op: "fsync sled's blob files", source })?;
        Ok(Synced { fsyncs: 1 + blobs })
    }

    /// fsync blob files sled wrote since the last look. The directory is read
    /// only when its modification time changed, or was recent enough that a
    /// file made in the same clock tick could hide behind it.
    fn sync_blobs(&self) -> std::io::Result<u64> {
        let dir = self.path.join("blobs");
        let Ok(meta) = std::fs::metadata(&dir) else { return Ok(0) };
        let mtime = meta.modified()?;
        let mut state = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::SystemTime::now();
        let settled = state.checked_at.is_some_and(|c| c.duration_since(mtime).is_ok_and(|d| d.as_millis() > 50));
        if state.dir_mtime == Some(mtime) && settled {
            return Ok(0);
        }
        let mut fsyncs = 0;
        let mut present = std::collections::HashSet::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if !state.synced.contains(&name) {
                std::fs::File::open(entry.path())?.sync_all()?;
                fsyncs += 1;
            }
            present.insert(name);
        }
        if fsyncs > 0 {
            std::fs::File::open(&dir)?.sync_all()?;
            fsyncs += 1;
        }
        state.synced = present;
        state.dir_mtime = Some(mtime);
        state.checked_at = Some(now);
        Ok(fsyncs)
    }

    /// Queues, users and kept delivery counts, from the admin tree (small:
    /// no message is read), and the sequence floor they imply.
    pub(crate) fn recover_admin(&self) -> Result<AdminState, StoreError> {
        let mut queues = BTreeMap::new();
        let mut user_seq = 0;
        let mut deliveries = HashMap::new();
        for kv in self.admin.iter() {
            let (k, v) = kv?;
            if k.starts_with(HANDED_IN_PREFIX.as_bytes()) {
                continue;
            }
            if let Some(rest) = k.strip_prefix(REDELIVERED_PREFIX.as_bytes()) {
                if let (Some(split), Some(count)) = (rest.len().checked_sub(9), be_u64(&v)) {
                    let (queue, seq) = (&rest[..split], &rest[split + 1..]);
                    if let Some(seq) = be_u64(seq) {
                        deliveries.insert((String::from_utf8_lossy(queue).into_owned(), seq), count as u32);
                    }
                }
                continue;
            }
            let key = String::from_utf8_lossy(&k).into_owned();
            if key.starts_with(USER_PREFIX) {
                let entry = decode_user(&key, &v)?;
                user_seq = user_seq.max(entry.seq);
                continue;
            }
            let entry: QueueEntry = rmp_serde::from_slice(&v)
                .map_err(|e| StoreError::Corrupt { key: 0, reason: format!("admin entry {key}: {e}") })?;
            queues.insert(key, entry);
        }
        let users = self.users()?;
        // An admin entry is written before its batch record; if the record was
        // lost in a crash, its sequence number must still never be reused.
        let floor = queues.values().map(|e: &QueueEntry| e.created_seq + 1).max().unwrap_or(1).max(user_seq + 1);
        Ok(AdminState { queues, users, deliveries, floor })
    }

    pub(crate) fn recover(&self) -> Result<Recovered, StoreError> {
        let started = std::time::Instant::now();
        let epoch = self.repl_meta()?.epoch;
        let admin = self.recover_admin()?;
        let mut next_seq = self.meta.get(META_NEXT_SEQ)?.and_then(|v| be_u64(&v)).unwrap_or(1).max(admin.floor);

        let mut dedup: HashMap<u64, u64> = HashMap::new();
        for kv in self.producers.iter() {
            let (k, v) = kv?;
            if let (Some(p), Some(s)) = (be_u64(&k), be_u64(&v)) {
                dedup.insert(p, s);
            }
        }

        // The index as of the last checkpoint, then the records after it.
        let mut dead_at_open = Vec::new();
        let ckpt = if self.checkpoints {
            crate::checkpoint::read(&self.path)
        } else {
            crate::checkpoint::remove(&self.path)?;
            None
        };
        let (mut index, from) = match ckpt {
            Some(c) => {
                next_seq = next_seq.max(c.next_seq);
                for (p, s) in c.dedup {
                    let e = dedup.entry(p).or_insert(0);
                    *e = (*e).max(s);
                }
                let mut index = c.index;
                // Records the checkpoint holds that died (and were deleted) since.
                let mut gone = Vec::new();
                for kv in self.dead.iter() {
                    let (k, _) = kv?;
                    gone.extend(be_u64(&k));
                }
                dead_at_open.extend(index.forget_records(&gone));
                self.ckpt_through.store(c.through, std::sync::atomic::Ordering::SeqCst);
                tracing::info!(through = c.through, died_since = gone.len(), "index checkpoint loaded");
                (index, c.through + 1)
            }
            None => {
                self.ckpt_through.store(0, std::sync::atomic::Ordering::SeqCst);
                self.dead.clear()?;
                (LiveIndex::default(), 0)
            }
        };
        let mut read = StagedRecords::default();
        for kv in self.log().range(from.to_be_bytes()..) {
            let (k, v) = kv?;
            let key = be_u64(&k).ok_or(StoreError::Corrupt { key: 0, reason: "log key is not 8 bytes".into() })?;
            let body = BatchBody::decode(key, &v)?;
            let dead = index.apply(&body, v.len() as u64);
            read.note(&body, dead);
        }
        tracing::info!(records = read.count, from, ms = started.elapsed().as_millis() as u64, "store log read");
        for (p, s) in read.dedup {
            let e = dedup.entry(p).or_insert(0);
            *e = (*e).max(s);
        }
        dead_at_open.extend(read.dead);
        let next_seq = next_seq.max(read.next_seq);
        self.recovered(epoch, admin, dedup, index, next_seq, read.count, dead_at_open)
    }

    /// [`Self::recover`] for a snapshot just swapped in whose index was
    /// built while its records were staged (see `writer.rs`): nothing is
    /// read from the log. `records`: what the staged records say of
    /// producers, the next sequence, how many there are, which died.
    pub(crate) fn recover_staged(&self, index: LiveIndex, records: StagedRecords) -> Result<Recovered, StoreError> {
        let epoch = self.repl_meta()?.epoch;
        let admin = self.recover_admin()?;
        let next_seq = self.meta_u64(META_NEXT_SEQ)?.unwrap_or(1).max(admin.floor).max(records.next_seq);
        let mut dedup = records.dedup;
        for kv in self.producers.iter() {
            let (k, v) = kv?;
            if let (Some(p), Some(s)) = (be_u64(&k), be_u64(&v)) {
                let e = dedup.entry(p).or_insert(0);
                *e = (*e).max(s);
            }
        }
        self.recovered(epoch, admin, dedup, index, next_seq, records.count, records.dead)
    }

    /// The end of a recovery: messages of queues that are gone dropped, dead records deleted.
    #[allow(clippy::too_many_arguments)]
    fn recovered(
        &self,
        epoch: u64,
        admin: AdminState,
        dedup: HashMap<u64, u64>,
        mut index: LiveIndex,
        next_seq: u64,
        batches: usize,
        mut dead_at_open: Vec<u64>,
    ) -> Result<Recovered, StoreError> {
        // Messages of queues deleted (or deleted and re-created) after they were stored.
        let known: Vec<String> = index.queues().cloned().collect();
        for q in known {
            let created = admin.queues.get(&q).map(|e: &QueueEntry| e.created_seq);
            dead_at_open.extend(index.drop_messages(&q, |s| created.is_some_and(|c| s > c)));
        }

        if !dead_at_open.is_empty() {
            // Possible when a crash came between an ack and the deletion it allowed.
            self.persist_floor(next_seq, dedup.iter())?;
            self.delete_records(&dead_at_open)?;
        }
        let mut recovered = Recovered::from_index(epoch, next_seq, admin, dedup, &index, batches);
        recovered.index = index;
        Ok(recovered)
    }

    /// Checkpoint `index` and `dedup` as of the record ending at `through`
    /// (after making the store durable, so that the checkpoint never
    /// describes records a crash could take back). Returns its size, bytes.
    /// Whether this store keeps index checkpoints (see [`StoreConfig::checkpoints`]).
    pub fn checkpoints(&self) -> bool {
        self.checkpoints
    }

    pub(crate) fn checkpoint(
        &self,
        through: u64,
        next_seq: u64,
        index: &LiveIndex,
        dedup: &HashMap<u64, u64>,
    ) -> Result<u64, StoreError> {
        self.sync()?;
        // Written borrowed: the index of a large backlog is not copied.
        #[derive(serde::Serialize)]
        struct Borrowed<'a> {
            format: u8,
            through: u64,
            next_seq: u64,
            dedup: &'a HashMap<u64, u64>,
            index: &'a LiveIndex,
        }
        let bytes = crate::checkpoint::write_with(
            &self.path,
            &Borrowed { format: crate::checkpoint::FORMAT, through, next_seq, dedup, index },
        )?;
        // Deaths the new checkpoint already knows.
        self.ckpt_through.store(through, std::sync::atomic::Ordering::SeqCst);
        self.dead.clear()?;
        Ok(bytes)
    }

    /// Delete dead records. Those the index checkpoint holds are noted in
    /// the `dead` tree first: a restart from that checkpoint must not
    /// bring their messages back (the acks that killed them may be gone too).
    pub(crate) fn delete_records(&self, keys: &[u64]) -> Result<(), StoreError> {
        let through = self.ckpt_through.load(std::sync::atomic::Ordering::SeqCst);
        let mut noted = sled::Batch::default();
        let mut any = false;
        for k in keys.iter().filter(|k| **k <= through) {
            noted.insert(&k.to_be_bytes(), &[]);
            any = true;
        }
        if any {
            self.dead.apply_batch(noted)?;
        }
        let mut b = sled::Batch::default();
        for d in keys {
            b.remove(&d.to_be_bytes());
        }
        self.log().apply_batch(b)?;
        Ok(())
    }

    /// Write what must survive the deletion of batch records: the next
    /// sequence number (ids are never reused) and the idempotence marks.
    pub(crate) fn persist_floor<'a>(
        &self,
        next_seq: u64,
        dedup: impl IntoIterator<Item = (&'a u64, &'a u64)>,
    ) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        for (p, s) in dedup {
            b.insert(&p.to_be_bytes(), &s.to_be_bytes());
        }
        self.producers.apply_batch(b)?;
        self.meta.insert(META_NEXT_SEQ, &next_seq.to_be_bytes())?;
        Ok(())
    }

    fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        Ok(self.meta.get(key)?.and_then(|v| be_u64(&v)))
    }

    /// Keep `messages` (queue key, message) for the hand-over (unflushed).
    pub(crate) fn keep_for_handover(&self, messages: &[(String, StoredMessage)]) -> Result<(), StoreError> {
        for (queue, m) in messages {
            let raw = rmp_serde::to_vec(&(queue, m))
                .map_err(|source| StoreError::Encode { what: "a message kept for the hand-over", source })?;
            self.handover.insert(handover_key(m.epoch, m.seq, queue), raw)?;
        }
        Ok(())
    }

    /// Keep this store's users and queue names for the hand-over (unflushed).
    pub(crate) fn keep_admin_for_handover(
        &self,
        users: &BTreeMap<String, UserRecord>,
        queues: &BTreeMap<String, QueueEntry>,
    ) -> Result<(), StoreError> {
        for (name, user) in users {
            let raw = rmp_serde::to_vec(user).map_err(|source| StoreError::Encode { what: "a user record", source })?;
            self.handover_admin.insert(format!("{USER_PREFIX}{name}"), raw)?;
        }
        for key in queues.keys().filter(|k| k.starts_with("q/")) {
            self.handover_admin.insert(key.as_bytes(), &[])?;
        }
        Ok(())
    }

    /// The users and queue names kept for the hand-over.
    pub fn pending_handover_admin(&self) -> Result<HandoverAdmin, StoreError> {
        let mut out = HandoverAdmin::default();
        for kv in self.handover_admin.iter() {
            let (k, v) = kv?;
            let key = String::from_utf8_lossy(&k);
            if let Some(name) = key.strip_prefix(USER_PREFIX) {
                let user = rmp_serde::from_slice(&v)
                    .map_err(|e| StoreError::Corrupt { key: 0, reason: format!("handover user {name}: {e}") })?;
                out.users.push((name.to_string(), user));
            } else if let Some(name) = key.strip_prefix("q/") {
                out.queues.push(name.to_string());
            }
        }
        Ok(out)
    }

    /// The peer created what it lacked of the kept users and queues (unflushed).
    pub(crate) fn handed_over_admin(&self) -> Result<(), StoreError> {
        self.handover_admin.clear()?;
        Ok(())
    }

    /// Every message still waiting for the peer to store it, oldest first.
    pub fn pending_handover(&self) -> Result<Vec<(String, StoredMessage)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.handover.iter() {
            let (_, v) = kv?;
            let m: (String, StoredMessage) = rmp_serde::from_slice(&v)
                .map_err(|e| StoreError::Corrupt { key: 0, reason: format!("handover entry: {e}") })?;
            out.push(m);
        }
        Ok(out)
    }

    /// The peer stored these (epoch, seq), in every queue they were in (unflushed).
    pub(crate) fn handed_over(&self, ids: &[(u64, u64)]) -> Result<(), StoreError> {
        for (epoch, seq) in ids {
            for kv in self.handover.scan_prefix(handover_prefix(*epoch, *seq)) {
                let (k, _) = kv?;
                self.handover.remove(k)?;
            }
        }
        Ok(())
    }

    /// Start loading a snapshot beside the store: empty staging trees.
    /// The op log (a handle: after a snapshot is swapped in, ask again).
    pub(crate) fn log(&self) -> sled::Tree {
        self.logs.read().unwrap_or_else(|p| p.into_inner()).log.clone()
    }

    /// Where a snapshot from the peer is staged.
    pub(crate) fn staging_log(&self) -> sled::Tree {
        self.logs.read().unwrap_or_else(|p| p.into_inner()).staging.clone()
    }

    pub(crate) fn begin_staging(&self) -> Result<(), StoreError> {
        self.bodies.clear();
        self.staging_log().clear()?;
        self.staging_admin.clear()?;
        self.staging_producers.clear()?;
        Ok(())
    }

    /// The staged copy is complete (through `next_seq - 1`): it replaces the
    /// store, with `meta`, durably. A crash in between is finished at open.
    pub(crate) fn commit_staging(&self, next_seq: u64, meta: &ReplMeta) -> Result<(), StoreError> {
        self.set_repl_meta(meta)?;
        self.meta.insert(META_STAGED, &next_seq.to_be_bytes())?;
        self.sync()?;
        self.swap_in_staging(next_seq)
    }

    /// This node's compactor rewrote a record: from now on its records may
    /// lack messages its own ops made dead (kept durably, once).
    pub(crate) fn note_compacted(&self) -> Result<(), StoreError> {
        if !self.compacted.swap(true, std::sync::atomic::Ordering::Relaxed) {
            self.meta.insert(META_COMPACTED, &[1])?;
        }
        Ok(())
    }

    /// This store drops its own ops past a fork (`true`, durably with the
    /// drop) until the records they had changed arrived and its catch-up is
    /// complete, or a snapshot replaced it (`false`). Meanwhile it may lack
    /// records the active holds live: it takes nothing else from the active.
    pub(crate) fn set_wanting(&self, wanting: bool) -> Result<(), StoreError> {
        if self.wanting.swap(wanting, std::sync::atomic::Ordering::Relaxed) != wanting {
            if wanting {
                self.meta.insert(META_WANTING, &[1])?;
            } else {
                self.meta.remove(META_WANTING)?;
            }
        }
        Ok(())
    }

    pub(crate) fn wanting(&self) -> bool {
        self.wanting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether this node's compactor ever rewrote a record here.
    pub(crate) fn ever_compacted(&self) -> bool {
        self.compacted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The log is about to change under the index (a snapshot swapped in,
    /// this store's own ops past a fork truncated): the index checkpoint and
    /// the cached bodies describe the old one.
    pub(crate) fn forget_checkpoint(&self) -> Result<(), StoreError> {
        self.bodies.clear();
        crate::checkpoint::remove(&self.path)?;
        self.ckpt_through.store(0, std::sync::atomic::Ordering::SeqCst);
        self.dead.clear()?;
        Ok(())
    }

    fn swap_in_staging(&self, next_seq: u64) -> Result<(), StoreError> {
        self.forget_checkpoint()?;
        // The admin and producer trees are small: copied.
        for (from, to) in [(&self.staging_admin, &self.admin), (&self.staging_producers, &self.producers)] {
            to.clear()?;
            for kv in from.iter() {
                let (k, v) = kv?;
                to.insert(k, v)?;
            }
        }
        // The log is not: the staging tree becomes the log, in one atomic
        // change of `meta` (with the end of the swap), and the old log is
        // cleared as the next staging tree.
        let mut logs = self.logs.write().unwrap_or_else(|p| p.into_inner());
        let mut b = sled::Batch::default();
        b.insert(META_LOG_TREE, logs.staging.name());
        b.insert(META_NEXT_SEQ, &next_seq.to_be_bytes());
        b.remove(META_STAGED);
        self.meta.apply_batch(b)?;
        self.sync()?;
        let Logs { log, staging } = &mut *logs;
        std::mem::swap(log, staging);
        drop(logs);
        self.begin_staging()?;
        Ok(())
    }

    /// The node id this data directory belongs to, recording `node_id` on first use.
    /// A data directory moved to another node is refused.
    pub fn claim_node_id(&self, node_id: &str) -> Result<(), StoreError> {
        match self.meta.get(META_NODE_ID)? {
            Some(v) if v.as_ref() != node_id.as_bytes() => Err(StoreError::NodeMismatch {
                stored: String::from_utf8_lossy(&v).into_owned(),
                configured: node_id.to_string(),
            }),
            Some(_) => Ok(()),
            None => {
                self.meta.insert(META_NODE_ID, node_id.as_bytes())?;
                self.db.flush()?;
                Ok(())
            }
        }
    }

    /// The body of the live message `seq`, from the read cache or from its
    /// batch record (`None`: no record holds it). A miss keeps the messages
    /// after it in the same record too, for the deliveries that follow.
    pub fn read_message(&self, seq: u64) -> Result<Option<Arc<StoredMessage>>, StoreError> {
        if let Some(m) = self.bodies.get(seq) {
            return Ok(Some(m));
        }
        let Some(first) = self.log().range(..=seq.to_be_bytes()).next_back() else { return Ok(None) };
        // Read ahead: this record from `seq` on and the records after it, up
        // to READ_AHEAD_BYTES (a queue drains in order; one lookup backwards
        // in sled costs more than reading forwards).
        let mut found = None;
        let mut keep = Vec::new();
        let mut read = 0;
        let start = first.as_ref().ok().and_then(|(k, _)| be_u64(k)).map_or(u64::MAX, |k| k.saturating_add(1));
        for kv in std::iter::once(first).chain(self.log().range(start.to_be_bytes()..)) {
            let (k, v) = kv?;
            let key = be_u64(&k).ok_or(StoreError::Corrupt { key: 0, reason: "log key is not 8 bytes".into() })?;
            let body = BatchBody::decode(key, &v)?;
            read += v.len();
            for (i, op) in body.ops.into_iter().enumerate() {
                let s = key + i as u64;
                if s < seq {
                    continue;
                }
                if let Op::Enqueue { message, .. } = op {
                    let m = Arc::new(message);
                    if s == seq {
                        found = Some(m.clone());
                    }
                    keep.push(m);
                }
            }
            if found.is_none() || read >= READ_AHEAD_BYTES {
                break;
            }
        }
        if found.is_some() {
            self.bodies.insert(keep);
        }
        Ok(found)
    }

    /// The read cache (for metrics).
    pub fn read_cache(&self) -> &BodyCache {
        &self.bodies
    }

    /// Raw batch records with first sequence >= `from`, in order (for replication catch-up).
    pub fn raw_batches_from(&self, from: u64) -> impl Iterator<Item = Result<(u64, Vec<u8>), StoreError>> {
        self.log().range(from.to_be_bytes()..).map(|kv| {
            let (k, v) = kv?;
            let key = be_u64(&k).ok_or(StoreError::Corrupt { key: 0, reason: "log key is not 8 bytes".into() })?;
            Ok((key, v.to_vec()))
        })
    }

    /// Flush everything and report the error, instead of trusting `Drop`.
    pub fn close(self) -> Result<(), StoreError> {
        self.sync()?;
        Ok(())
    }

    /// Materialise the admin ops of `body` into `tree` (the admin tree, or its staging copy).
    pub(crate) fn materialise(tree: &sled::Tree, body: &BatchBody) -> Result<(), StoreError> {
        for (i, op) in body.ops.iter().enumerate() {
            match op {
                Op::PutQueue { key, spec } => {
                    let entry = QueueEntry { spec: spec.clone(), created_seq: body.first_seq + i as u64 };
                    let raw = rmp_serde::to_vec(&entry)
                        .map_err(|source| StoreError::Encode { what: "a queue or durable entry", source })?;
                    tree.insert(key.as_bytes(), raw)?;
                }
                Op::DeleteQueue { key } => {
                    tree.remove(key.as_bytes())?;
                }
                Op::PutUser { name, user } => {
                    let entry = UserEntry { user: user.clone(), seq: body.first_seq + i as u64 };
                    let raw = rmp_serde::to_vec(&entry)
                        .map_err(|source| StoreError::Encode { what: "a queue or durable entry", source })?;
                    tree.insert(format!("{USER_PREFIX}{name}").as_bytes(), raw)?;
                }
                Op::DeleteUser { name } => {
                    tree.remove(format!("{USER_PREFIX}{name}").as_bytes())?;
                }
                Op::Redelivered { queue, seq, count: 0 } => {
                    tree.remove(redelivered_key(queue, *seq))?;
                }
                Op::Redelivered { queue, seq, count } => {
                    tree.insert(redelivered_key(queue, *seq), &u64::from(*count).to_be_bytes())?;
                }
                Op::HandedIn { epoch, seq, queue } => {
                    tree.insert(handed_in_key(*epoch, *seq, queue), &[])?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether the message `(epoch, seq)` another node handed over was
    /// stored into `queue` already.
    pub fn handed_in(&self, epoch: u64, seq: u64, queue: &str) -> Result<bool, StoreError> {
        Ok(self.admin.contains_key(handed_in_key(epoch, seq, queue))?)
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
