//! Ops and the batch record: the unit of durability and of replication.
//!
//! A batch record is what one group commit writes: `[format u8][crc32 u32 BE]
//! [MessagePack BatchBody]`, stored in the `log` tree under the big-endian
//! sequence number of its first op. The passive stores the very same bytes.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::StoreError;

/// Version of the batch record layout.
pub const RECORD_FORMAT: u8 = 1;

/// What one batch record holds at most, roughly (a single larger message
/// gets a record of its own). A group commit larger than this is written as
/// several records in one flush. Small records keep sled's pages small,
/// and sled's cache can only evict pages of many records: with records of
/// a whole group commit (~128 KiB), a leaf of 16 of them was a 2 MiB page
/// that its cache (256 shards, never evicting a shard's last page, and
/// counting such pages, stored as blobs, as a few bytes) kept in memory for
/// good, so that memory grew with the backlog (issue 11). Measured (1 KiB
/// messages, one producer and one consumer): 8 KiB records cost ~15 % of
/// throughput against whole-commit records, 16 KiB ones within noise.
pub const RECORD_TARGET_BYTES: usize = 16 * 1024;

/// A batch record's body, borrowed: encodes exactly as [`BatchBody`].
#[derive(Serialize)]
struct BatchRef<'a> {
    epoch: u64,
    first_seq: u64,
    ops: &'a [Op],
}

/// A message as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Epoch in which the message was first stored; with `seq` its unique id.
    pub epoch: u64,
    /// Sequence number of the op that stored it (assigned by the writer).
    pub seq: u64,
    /// The destination the producer named (`queue:x` or `topic:x`), for consumers.
    pub origin: String,
    pub producer_id: u64,
    pub producer_seq: u64,
    pub headers: BTreeMap<String, String>,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub timestamp_ms: u64,
    pub expires_at_ms: Option<u64>,
}

impl StoredMessage {
    /// Bytes kept beside a message wherever it is queued (its entry, its
    /// index, the reference), so that ten thousand 10-byte messages count
    /// for what they cost.
    pub const OVERHEAD: usize = 128;

    /// What one message weighs against a queue's `max_queue_bytes`: its
    /// payload, headers and names, and [`Self::OVERHEAD`].
    pub fn weight(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.payload.len() + headers + self.origin.len() + Self::OVERHEAD
    }
}

/// What kind of stored queue a queue key is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueKind {
    /// A plain queue named by applications.
    Queue,
    /// The durable subscription `name` on `topic`.
    Durable {
        topic: String,
        name: String,
        /// The user who made it: only that user attaches to it or deletes it
        /// (an operator may delete it). `None`: made anonymously on an open
        /// broker, or before owners were kept: anyone with consume rights.
        #[serde(default)]
        owner: Option<String>,
    },
}

/// An admin object: a stored queue (plain or durable subscription).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSpec {
    pub kind: QueueKind,
}

/// What a grant allows on the destinations its pattern matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Permission {
    /// Publish to the destination.
    Produce,
    /// Subscribe to the destination (and receive from it).
    Consume,
    /// Create, delete and purge the destination; on `#`, manage the pair,
    /// users and ACLs.
    Admin,
}

/// One ACL entry: `permission` on every destination `pattern` matches (see
/// the broker's `security` module for the pattern language).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Grant {
    pub permission: Permission,
    pub pattern: String,
}

/// An admin object: a user allowed to connect, and what they may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// argon2 PHC string; the password itself is never stored or replicated.
    pub password_hash: String,
    pub grants: Vec<Grant>,
}

/// One change to the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Store `message` once, live in each of `queues` until acked there.
    Enqueue { message: StoredMessage, queues: Vec<String> },
    /// The message `seq` is done in `queue` (consumed, expired or dead-lettered).
    Ack { queue: String, seq: u64 },
    /// Create (or redefine) the stored queue `key`.
    PutQueue { key: String, spec: QueueSpec },
    /// Delete the stored queue `key` with every message it holds.
    DeleteQueue { key: String },
    /// Create or replace the user `name` (password hash and grants).
    PutUser { name: String, user: UserRecord },
    /// Remove the user `name`.
    DeleteUser { name: String },
    /// The message `seq` of `queue` was delivered `count` times and came
    /// back (nacked, timed out, its consumer gone): kept, so that the count
    /// survives a failover and a poison message still reaches the dead-letter
    /// queue. `count == 0` forgets it (the message was acked).
    Redelivered { queue: String, seq: u64, count: u32 },
    /// A message another node handed over (its `(epoch, seq)` there) was
    /// stored into `queue`: a hand-over sent again stores only what is not.
    HandedIn { epoch: u64, seq: u64, queue: String },
    /// What the compactor leaves where it dropped an op that no longer
    /// matters (a message acked everywhere, an ack of a record gone): the
    /// record keeps its key and the sequence numbers of the ops it keeps.
    Nothing,
}

impl Op {
    /// Admin ops are materialised in the admin tree and do not keep their batch alive.
    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            Op::PutQueue { .. }
                | Op::DeleteQueue { .. }
                | Op::PutUser { .. }
                | Op::DeleteUser { .. }
                | Op::Redelivered { .. }
                | Op::HandedIn { .. }
        )
    }
}

/// The body of a batch record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchBody {
    pub epoch: u64,
    /// Sequence number of `ops[0]`; op `i` has sequence `first_seq + i`.
    pub first_seq: u64,
    pub ops: Vec<Op>,
}

impl BatchBody {
    /// Sequence number of the last op (the batch is never empty).
    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.ops.len() as u64 - 1
    }

    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        BatchBody::encode_ops(self.epoch, self.first_seq, &self.ops)
    }

    /// The record of `ops`, the first of which has sequence `first_seq`.
    pub fn encode_ops(epoch: u64, first_seq: u64, ops: &[Op]) -> Result<Vec<u8>, StoreError> {
        let mut out = vec![RECORD_FORMAT, 0, 0, 0, 0];
        rmp_serde::encode::write(&mut out, &BatchRef { epoch, first_seq, ops })
            .map_err(|source| StoreError::Encode { what: "a batch record", source })?;
        let crc = crc32fast::hash(&out[5..]);
        out[1..5].copy_from_slice(&crc.to_be_bytes());
        Ok(out)
    }

    /// The ops split into runs of about [`RECORD_TARGET_BYTES`] each, one record per run.
    pub fn records(&self) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (i, op) in self.ops.iter().enumerate() {
            let size = match op {
                Op::Enqueue { message, queues } => message.weight() + queues.iter().map(String::len).sum::<usize>(),
                _ => 64,
            };
            if bytes > 0 && bytes + size > RECORD_TARGET_BYTES {
                out.push(start..i);
                (start, bytes) = (i, 0);
            }
            bytes += size;
        }
        out.push(start..self.ops.len());
        out
    }

    /// The last sequence number of the record `raw` read from `key`, from its
    /// header alone (its op count), without decoding its ops or checking its
    /// checksum (whoever applies it decodes and verifies it).
    pub fn last_seq_of(key: u64, raw: &[u8]) -> Result<u64, StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt { key, reason: reason.into() };
        if raw.len() < 5 || raw[0] != RECORD_FORMAT {
            return Err(corrupt("not a record of this format"));
        }
        let mut rd = &raw[5..];
        let fields = rmp::decode::read_array_len(&mut rd).map_err(|_| corrupt("unreadable header"))?;
        let _epoch: u64 = rmp::decode::read_int(&mut rd).map_err(|_| corrupt("unreadable epoch"))?;
        let first: u64 = rmp::decode::read_int(&mut rd).map_err(|_| corrupt("unreadable first sequence"))?;
        let ops = rmp::decode::read_array_len(&mut rd).map_err(|_| corrupt("unreadable op count"))?;
        if fields != 3 || first != key || ops == 0 {
            return Err(corrupt("record does not match its key"));
        }
        key.checked_add(u64::from(ops) - 1).ok_or_else(|| corrupt("sequence overflow"))
    }

    /// Decode and verify a record read from `key`.
    pub fn decode(key: u64, raw: &[u8]) -> Result<BatchBody, StoreError> {
        if raw.len() < 5 {
            return Err(StoreError::Corrupt { key, reason: "record shorter than its header".into() });
        }
        if raw[0] != RECORD_FORMAT {
            return Err(StoreError::Corrupt { key, reason: format!("unknown record format {}", raw[0]) });
        }
        let crc = u32::from_be_bytes([raw[1], raw[2], raw[3], raw[4]]);
        if crc32fast::hash(&raw[5..]) != crc {
            return Err(StoreError::Corrupt { key, reason: "checksum mismatch".into() });
        }
        let body: BatchBody =
            rmp_serde::from_slice(&raw[5..]).map_err(|e| StoreError::Corrupt { key, reason: e.to_string() })?;
        if body.first_seq != key || body.ops.is_empty() || body.first_seq.checked_add(body.ops.len() as u64).is_none() {
            return Err(StoreError::Corrupt { key, reason: "record does not match its key".into() });
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enqueue(bytes: usize) -> Op {
        Op::Enqueue {
            message: StoredMessage {
                epoch: 1,
                seq: 0,
                origin: String::new(),
                producer_id: 0,
                producer_seq: 0,
                headers: BTreeMap::new(),
                payload: vec![0; bytes],
                timestamp_ms: 0,
                expires_at_ms: None,
            },
            queues: vec!["q".into()],
        }
    }

    #[test]
    fn a_large_group_commit_is_split_into_records_of_about_the_target_size() {
        let n = 10 * RECORD_TARGET_BYTES / 1024;
        let body = BatchBody { epoch: 1, first_seq: 1, ops: (0..n).map(|_| enqueue(1024)).collect() };
        let runs = body.records();
        assert!(runs.len() >= 10, "{runs:?}");
        assert_eq!(runs.first().unwrap().start, 0);
        assert_eq!(runs.last().unwrap().end, n);
        for w in runs.windows(2) {
            assert_eq!(w[0].end, w[1].start, "contiguous");
        }
        for r in &runs {
            let raw = BatchBody::encode_ops(1, 1 + r.start as u64, &body.ops[r.clone()]).unwrap();
            assert!(raw.len() <= RECORD_TARGET_BYTES + 1024, "{} bytes", raw.len());
        }
        // One message larger than the target is a record of its own, never an empty one.
        let big =
            BatchBody { epoch: 1, first_seq: 1, ops: vec![enqueue(10), enqueue(RECORD_TARGET_BYTES * 3), enqueue(10)] };
        assert_eq!(big.records(), vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn record_round_trip_and_checksum() {
        let body = BatchBody {
            epoch: 2,
            first_seq: 10,
            ops: vec![Op::Ack { queue: "q".into(), seq: 3 }, Op::DeleteQueue { key: "x".into() }],
        };
        let mut raw = body.encode().unwrap();
        assert_eq!(BatchBody::decode(10, &raw).unwrap(), body);
        assert_eq!(BatchBody::encode_ops(2, 10, &body.ops).unwrap(), raw);
        assert!(BatchBody::decode(11, &raw).is_err(), "key mismatch is corruption");
        let last = raw.len() - 1;
        raw[last] ^= 0x40;
        assert!(matches!(BatchBody::decode(10, &raw), Err(StoreError::Corrupt { .. })));
    }
}
