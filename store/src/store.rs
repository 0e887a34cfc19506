//! Opening the sled database and recovering live state from it.
//!
//! Trees: `log` (batch records by first sequence), `admin` (stored queues and
//! durable subscriptions under their queue keys `q/..`, `d/..`; users and
//! their grants under `u/<name>`; materialised), `producers` (idempotence high-water
//! marks that outlived their batches), `meta` (node id, epoch, sequence floor).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::index::LiveIndex;
use crate::op::{BatchBody, Op, QueueSpec, StoredMessage, UserRecord};
use crate::StoreError;

const META_EPOCH: &[u8] = b"epoch";
const META_NEXT_SEQ: &[u8] = b"next_seq";
const META_NODE_ID: &[u8] = b"node_id";
const META_LAST_ACTIVE: &[u8] = b"last_active";
/// Passive: the active's replication stream this store is a consistent copy of.
const META_FOLLOWING: &[u8] = b"following";
/// A node that stepped down after a split: its peer acknowledged through here.
const META_DIVERGED_AFTER: &[u8] = b"diverged_after";
/// An active confirming without its peer: records from here on may be missing
/// there (kept across a crash, so that the node hands them over on its return).
const META_ALONE_SINCE: &[u8] = b"alone_since";

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
}

impl StoreConfig {
    pub fn new(path: impl AsRef<Path>) -> Self {
        StoreConfig { path: path.as_ref().to_path_buf(), cache_bytes: 256 * 1024 * 1024 }
    }
}

/// A stored queue as recovered: its definition and the sequence of the op that created it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueEntry {
    pub spec: QueueSpec,
    /// Messages with a lower sequence belong to an earlier queue of the same name.
    pub created_seq: u64,
}

/// Admin tree key prefix of users.
pub(crate) const USER_PREFIX: &str = "u/";

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
    pub(crate) log: sled::Tree,
    pub(crate) admin: sled::Tree,
    pub(crate) producers: sled::Tree,
    pub(crate) meta: sled::Tree,
    /// Messages this node confirmed during a split that its peer never had,
    /// kept until the new active says it stored them (not cleared by a
    /// snapshot). Key: the message's epoch and sequence.
    pub(crate) handover: sled::Tree,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// Everything the broker needs after [`Store::open`].
#[derive(Debug)]
pub struct Recovered {
    pub epoch: u64,
    /// Sequence number the next op gets.
    pub next_seq: u64,
    pub queues: BTreeMap<String, QueueEntry>,
    /// Users by name.
    pub users: BTreeMap<String, UserRecord>,
    /// Live messages per queue key, in sequence order.
    pub messages: HashMap<String, Vec<StoredMessage>>,
    /// Producer id -> highest producer sequence stored.
    pub dedup: HashMap<u64, u64>,
    pub(crate) index: LiveIndex,
    /// Batch records read.
    pub batches: usize,
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

    /// Open (or create) the store at `config.path` and recover its live state.
    ///
    /// Fails with [`StoreError::Corrupt`] if any record fails its checksum: a
    /// node must not serve from a store it cannot trust.
    pub fn open(config: &StoreConfig) -> Result<(Store, Recovered), StoreError> {
        let db = sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_bytes)
            // We flush explicitly after each group commit; the background
            // flusher only bounds the loss window of `durability = none`.
            .flush_every_ms(Some(500))
            .open()
            .map_err(|e| StoreError::Open { path: config.path.clone(), source: e })?;
        let store = Store {
            log: db.open_tree("log")?,
            admin: db.open_tree("admin")?,
            producers: db.open_tree("producers")?,
            meta: db.open_tree("meta")?,
            handover: db.open_tree("handover")?,
            db,
        };
        let recovered = store.recover()?;
        Ok((store, recovered))
    }

    pub(crate) fn recover(&self) -> Result<Recovered, StoreError> {
        let epoch = self.meta.get(META_EPOCH)?.and_then(|v| be_u64(&v)).unwrap_or(0);
        let mut next_seq = self.meta.get(META_NEXT_SEQ)?.and_then(|v| be_u64(&v)).unwrap_or(1).max(1);

        let mut queues = BTreeMap::new();
        let mut user_seq = 0;
        for kv in self.admin.iter() {
            let (k, v) = kv?;
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
        next_seq = next_seq.max(queues.values().map(|e: &QueueEntry| e.created_seq + 1).max().unwrap_or(1));
        next_seq = next_seq.max(user_seq + 1);

        let mut dedup: HashMap<u64, u64> = HashMap::new();
        for kv in self.producers.iter() {
            let (k, v) = kv?;
            if let (Some(p), Some(s)) = (be_u64(&k), be_u64(&v)) {
                dedup.insert(p, s);
            }
        }

        let mut index = LiveIndex::default();
        let mut bodies: HashMap<u64, StoredMessage> = HashMap::new();
        let mut batches = 0;
        let mut dead_at_open = Vec::new();
        for kv in self.log.iter() {
            let (k, v) = kv?;
            let key = be_u64(&k).ok_or(StoreError::Corrupt { key: 0, reason: "log key is not 8 bytes".into() })?;
            let body = BatchBody::decode(key, &v)?;
            batches += 1;
            next_seq = next_seq.max(body.last_seq() + 1);
            dead_at_open.extend(index.apply(&body, v.len() as u64));
            for (i, op) in body.ops.into_iter().enumerate() {
                if let Op::Enqueue { message, .. } = op {
                    let seq = key + i as u64;
                    if message.producer_id != 0 {
                        let e = dedup.entry(message.producer_id).or_insert(0);
                        *e = (*e).max(message.producer_seq);
                    }
                    bodies.insert(seq, message);
                }
            }
        }

        // Messages of queues deleted (or deleted and re-created) after they were stored.
        let known: Vec<String> = index.queues().cloned().collect();
        for q in known {
            let created = queues.get(&q).map(|e: &QueueEntry| e.created_seq);
            dead_at_open.extend(index.drop_messages(&q, |s| created.is_some_and(|c| s > c)));
        }

        let mut messages: HashMap<String, Vec<StoredMessage>> = HashMap::new();
        for q in queues.keys() {
            let mut seqs: Vec<u64> = index.live_seqs(q).collect();
            seqs.sort_unstable();
            let list = seqs.into_iter().filter_map(|s| bodies.get(&s).cloned()).collect();
            messages.insert(q.clone(), list);
        }

        if !dead_at_open.is_empty() {
            // Possible when a crash came between an ack and the deletion it allowed.
            self.persist_floor(next_seq, &dedup)?;
            let mut b = sled::Batch::default();
            for d in &dead_at_open {
                b.remove(&d.to_be_bytes());
            }
            self.log.apply_batch(b)?;
        }

        Ok(Recovered { epoch, next_seq, queues, users, messages, dedup, index, batches })
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

    /// The epoch recorded in the store.
    pub fn epoch(&self) -> Result<u64, StoreError> {
        Ok(self.meta.get(META_EPOCH)?.and_then(|v| be_u64(&v)).unwrap_or(0))
    }

    /// Record a new epoch durably (flushed before returning).
    pub fn set_epoch(&self, epoch: u64) -> Result<(), StoreError> {
        self.meta.insert(META_EPOCH, &epoch.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// Whether this node was the last active one (the cold-start rule).
    pub fn was_last_active(&self) -> Result<bool, StoreError> {
        Ok(self.meta.get(META_LAST_ACTIVE)?.is_some_and(|v| v.as_ref() == [1]))
    }

    pub(crate) fn set_last_active(&self, active: bool) -> Result<(), StoreError> {
        self.meta.insert(META_LAST_ACTIVE, &[u8::from(active)])?;
        Ok(())
    }

    pub(crate) fn set_next_seq(&self, next_seq: u64) -> Result<(), StoreError> {
        self.meta.insert(META_NEXT_SEQ, &next_seq.to_be_bytes())?;
        Ok(())
    }

    pub(crate) fn set_epoch_unflushed(&self, epoch: u64) -> Result<(), StoreError> {
        self.meta.insert(META_EPOCH, &epoch.to_be_bytes())?;
        Ok(())
    }

    /// The replication stream this (passive) store is a copy of, if any: a
    /// restarted passive resumes it instead of loading a new snapshot.
    pub(crate) fn following(&self) -> Result<Option<u64>, StoreError> {
        self.meta_u64(META_FOLLOWING)
    }

    pub(crate) fn set_following(&self, stream: Option<u64>) -> Result<(), StoreError> {
        self.set_meta_u64(META_FOLLOWING, stream)
    }

    /// Set when a node steps down with records its peer never acknowledged,
    /// so that a restart before the hand-over does not forget them.
    pub(crate) fn diverged_after(&self) -> Result<Option<u64>, StoreError> {
        self.meta_u64(META_DIVERGED_AFTER)
    }

    pub(crate) fn set_diverged_after(&self, after: Option<u64>) -> Result<(), StoreError> {
        self.set_meta_u64(META_DIVERGED_AFTER, after)
    }

    /// The first record this node may have confirmed without its peer, since
    /// a follower was last in sync.
    pub(crate) fn alone_since(&self) -> Result<Option<u64>, StoreError> {
        self.meta_u64(META_ALONE_SINCE)
    }

    pub(crate) fn set_alone_since(&self, seq: Option<u64>) -> Result<(), StoreError> {
        self.set_meta_u64(META_ALONE_SINCE, seq)
    }

    fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        Ok(self.meta.get(key)?.and_then(|v| be_u64(&v)))
    }

    /// Set `key` to `value`, or remove it (unflushed).
    fn set_meta_u64(&self, key: &[u8], value: Option<u64>) -> Result<(), StoreError> {
        match value {
            Some(v) => self.meta.insert(key, &v.to_be_bytes())?,
            None => self.meta.remove(key)?,
        };
        Ok(())
    }

    /// Keep `messages` (queue key, message) for the hand-over (unflushed).
    pub(crate) fn keep_for_handover(&self, messages: &[(String, StoredMessage)]) -> Result<(), StoreError> {
        for (queue, m) in messages {
            let raw = rmp_serde::to_vec(&(queue, m)).map_err(|e| StoreError::Encode(e.to_string()))?;
            self.handover.insert(handover_key(m.epoch, m.seq, queue), raw)?;
        }
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

    /// Forget all replicated state before a snapshot is loaded (node id stays).
    pub(crate) fn clear_for_snapshot(&self) -> Result<(), StoreError> {
        self.log.clear()?;
        self.admin.clear()?;
        self.producers.clear()?;
        self.meta.remove(META_NEXT_SEQ)?;
        self.meta.remove(META_FOLLOWING)?;
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

    /// Raw batch records with first sequence >= `from`, in order (for replication catch-up).
    pub fn raw_batches_from(&self, from: u64) -> impl Iterator<Item = Result<(u64, Vec<u8>), StoreError>> {
        self.log.range(from.to_be_bytes()..).map(|kv| {
            let (k, v) = kv?;
            let key = be_u64(&k).ok_or(StoreError::Corrupt { key: 0, reason: "log key is not 8 bytes".into() })?;
            Ok((key, v.to_vec()))
        })
    }

    /// Flush everything and report the error, instead of trusting `Drop`.
    pub fn close(self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}
