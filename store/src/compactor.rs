//! The compactor (DESIGN.md section 5, "Compaction"): a record pinned by a
//! few live messages (a slow queue next to busy ones, a durable subscriber
//! away) is rewritten without its dead ops, so that disk use follows the
//! live data rather than the oldest unconsumed message.
//!
//! A record is rewritten **in place**: under the same key, with the same
//! epoch and the same number of ops, each op it drops replaced by
//! [`Op::Nothing`]. So every message keeps its sequence number (its id, its
//! place in its queue, an in-flight delivery still settles), the live index
//! changes only in the record's size, and a read finds the message where it
//! was. What is dropped: a message no longer live in any queue (and the
//! queues it is done in, from a message live in others), and an ack that no
//! longer keeps its record (its target's record is gone). Admin ops stay.
//!
//! Each node compacts its own store on its writer thread, between group
//! commits, bounded in bytes per second: the rewrite changes no op, no key
//! and no live message, so the two stores stay the same copy of the log
//! (what a snapshot or a catch-up sends is the rewritten record, which
//! decodes to the same live state).
//!
//! **Off by default.** Measured with `docs/compaction-bench.sh`: the records
//! shrink as intended (a slow queue's 16 KiB records to ~1 KiB), but sled
//! 0.34's file then grows with every round of traffic (its segments holding
//! the rewritten leaves are not reclaimed), where without compaction it
//! levels off. A compactor that frees disk under sled needs another layout
//! (docs/BENCHMARKS.md, "Compaction").

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::index::LiveIndex;
use crate::op::{BatchBody, Op};
use crate::{Store, StoreError};

/// Compaction settings (broker keys `compaction_*`).
#[derive(Debug, Clone)]
pub struct CompactionConfig {
    /// Bytes read and written per second at most (0: no compaction).
    pub bytes_per_sec: u64,
    /// No compaction while the records in the log take less than this.
    pub min_bytes: u64,
    /// A record younger than this is left alone (its messages may still be consumed).
    pub min_age: Duration,
}

impl Default for CompactionConfig {
    /// Off: with sled 0.34 the rewrites make its file grow (docs/BENCHMARKS.md, "Compaction").
    fn default() -> Self {
        CompactionConfig { bytes_per_sec: 0, min_bytes: 64 << 20, min_age: Duration::from_secs(10) }
    }
}

/// Records looked at per pass at most (the scan of the index is bounded too).
const SCAN: usize = 4096;
/// Bytes read and written per pass at most: a pass holds up the group commits behind it.
const PASS_BYTES: u64 = 512 << 10;
/// A pass starts only with this much budget (a scan of the index costs too).
const MIN_PASS: u64 = 16 << 10;
/// Most budget saved up while there was nothing to do.
const MAX_BURST: u64 = 1 << 20;

#[derive(Debug)]
pub struct Compactor {
    config: CompactionConfig,
    /// Where the next scan of the index starts.
    cursor: u64,
    budget: u64,
    last_pass: Instant,
    /// (when, the next sequence then), one a second: which records are old enough.
    marks: VecDeque<(Instant, u64)>,
    /// Stopped after an error of the store (logged); a restart tries again.
    stopped: bool,
}

/// What a pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub rewritten: u64,
    /// Bytes the rewritten records took less.
    pub freed: u64,
}

impl Compactor {
    pub fn new(config: CompactionConfig) -> Compactor {
        Compactor { config, cursor: 0, budget: 0, last_pass: Instant::now(), marks: VecDeque::new(), stopped: false }
    }

    /// Whether the log is large and dead enough that passes should run
    /// (the writer then wakes up for them while idle).
    pub fn wanted(&self, index: &LiveIndex) -> bool {
        let bytes = index.live_bytes();
        !self.stopped
            && self.config.bytes_per_sec > 0
            && bytes >= self.config.min_bytes.max(1)
            && bytes.saturating_mul(2) > index.live_weight().saturating_mul(3)
    }

    /// Rewrite what the budget allows of the records worth it. `next_seq`:
    /// the sequence after everything applied; `keep_acks`: drop no ack
    /// (a delete of dead records failed: one of them may still be on disk).
    pub fn pass(&mut self, store: &Store, index: &mut LiveIndex, next_seq: u64, keep_acks: bool) -> Pass {
        if self.config.bytes_per_sec == 0 {
            return Pass::default();
        }
        let now = Instant::now();
        let elapsed = now.duration_since(self.last_pass);
        self.last_pass = now;
        if self.marks.back().is_none_or(|(t, _)| now.duration_since(*t) >= Duration::from_secs(1)) {
            self.marks.push_back((now, next_seq));
        }
        while self.marks.len() > 1 && now.duration_since(self.marks[1].0) >= self.config.min_age {
            self.marks.pop_front();
        }
        if !self.wanted(index) {
            return Pass::default();
        }
        let rate = self.config.bytes_per_sec;
        let earned = (elapsed.as_secs_f64() * rate as f64) as u64;
        self.budget = (self.budget + earned).min(MAX_BURST.max(rate / 10));
        if self.budget < MIN_PASS {
            return Pass::default();
        }
        let before = if self.config.min_age.is_zero() {
            next_seq
        } else {
            match self.marks.front() {
                Some((t, seq)) if now.duration_since(*t) >= self.config.min_age => *seq,
                _ => return Pass::default(),
            }
        };
        let (found, next) = index.compactable(self.cursor, before, SCAN);
        let mut done = Pass::default();
        let mut spent = 0;
        for key in found {
            if spent >= self.budget.min(PASS_BYTES) {
                self.cursor = key;
                self.budget -= spent.min(self.budget);
                return done;
            }
            match rewrite(store, index, key, keep_acks) {
                Ok((old, new)) => {
                    spent += old + new;
                    if new < old {
                        done.rewritten += 1;
                        done.freed += old - new;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, record = key, "compaction stopped: could not rewrite a record");
                    self.stopped = true;
                    return done;
                }
            }
        }
        self.cursor = next;
        self.budget -= spent.min(self.budget);
        done
    }
}

/// Rewrite record `key` without what no longer matters; returns its size
/// before and after (the same when nothing could go, and then it is not written).
pub fn rewrite(store: &Store, index: &mut LiveIndex, key: u64, keep_acks: bool) -> Result<(u64, u64), StoreError> {
    let Some(raw) = store.log().get(key.to_be_bytes())? else {
        index.looked_at(key);
        return Ok((0, 0));
    };
    let old = raw.len() as u64;
    let body = BatchBody::decode(key, &raw)?;
    let mut changed = false;
    let ops: Vec<Op> = body
        .ops
        .into_iter()
        .enumerate()
        .map(|(i, op)| {
            let seq = key + i as u64;
            match op {
                Op::Enqueue { message, queues } => {
                    let live: Vec<String> = queues.iter().filter(|q| index.is_live(q, seq)).cloned().collect();
                    if live.len() == queues.len() {
                        return Op::Enqueue { message, queues };
                    }
                    changed = true;
                    if live.is_empty() {
                        Op::Nothing
                    } else {
                        Op::Enqueue { message, queues: live }
                    }
                }
                Op::Ack { seq: target, .. } if !keep_acks && !index.ack_pins(key, target) => {
                    changed = true;
                    Op::Nothing
                }
                other => other,
            }
        })
        .collect();
    if !changed {
        index.compacted(key, old);
        return Ok((old, old));
    }
    let raw = BatchBody::encode_ops(body.epoch, key, &ops)?;
    store.log().insert(key.to_be_bytes(), raw.as_slice())?;
    let new = raw.len() as u64;
    index.compacted(key, new);
    Ok((old, new))
}
