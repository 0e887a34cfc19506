//! Which batch records are still needed.
//!
//! A batch record stays in the log while it holds a message that is live in
//! some queue, or an ack whose target batch still exists (deleting the ack
//! first would bring the acked message back after a restart). When the last
//! such reason goes, the batch is dead and is deleted; its death may free the
//! batches whose acks pointed at it, hence the cascade. Admin ops never keep
//! a batch alive: they are materialised in the admin tree before the record
//! is written (see `writer.rs`).

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU64;

use crate::op::{BatchBody, Op, StoredMessage};

/// What memory keeps of a live message: enough to count it against a
/// queue's limits, to order it and to expire it, never its body (DESIGN.md
/// section 5, "Memory holds indexes, not bodies"). The body is read from
/// its batch record when it is delivered ([`crate::Store::read_message`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRef {
    pub seq: u64,
    /// What the message weighs against `max_queue_bytes` ([`StoredMessage::weight`]).
    pub bytes: u32,
    pub expires_at_ms: Option<NonZeroU64>,
}

impl MessageRef {
    pub fn of(m: &StoredMessage) -> MessageRef {
        MessageRef {
            seq: m.seq,
            bytes: u32::try_from(m.weight()).unwrap_or(u32::MAX),
            expires_at_ms: m.expires_at_ms.and_then(NonZeroU64::new),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct BatchLive {
    /// Live (message, queue) pairs in this batch plus acks in it that point at other live batches.
    pending: u64,
    bytes: u64,
    /// What its live (message, queue) pairs weigh: the compactor rewrites
    /// a record that is mostly dead (see `writer.rs`).
    live: u64,
    /// `pending` when the compactor last looked at it (`u64::MAX`: never):
    /// it looks again only once something more in it died.
    checked: u64,
}

/// Liveness of batches and of (queue, message) pairs. Owned by the writer
/// thread; checkpointed (see `checkpoint.rs`).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LiveIndex {
    batches: BTreeMap<u64, BatchLive>,
    /// Batches holding acks that point at the key batch.
    referrers: HashMap<u64, Vec<u64>>,
    /// Live messages per queue key: sequence number -> weight. Ordered, so
    /// that a promotion hands each queue its messages without sorting.
    live: HashMap<String, BTreeMap<u64, u32>>,
    /// Expiry of the live messages that have one (few do), by sequence.
    expiring: BTreeMap<u64, NonZeroU64>,
    live_bytes: u64,
    /// What the live (message, queue) pairs weigh, all queues together.
    live_weight: u64,
}

impl LiveIndex {
    /// Account for a newly written batch; returns the batches (possibly this
    /// one) that are now dead and should be deleted.
    pub fn apply(&mut self, body: &BatchBody, record_bytes: u64) -> Vec<u64> {
        self.apply_ops(body.first_seq, &body.ops, record_bytes)
    }

    /// [`Self::apply`] for the record of `ops` keyed `key` (its first sequence).
    pub fn apply_ops(&mut self, key: u64, ops: &[Op], record_bytes: u64) -> Vec<u64> {
        let mut own_pending: u64 = 0;
        let mut own_live: u64 = 0;
        let mut dead = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let seq = key + i as u64;
            match op {
                Op::Enqueue { queues, message } => {
                    let r = MessageRef::of(message);
                    for q in queues {
                        if self.live.entry(q.clone()).or_default().insert(seq, r.bytes).is_none() {
                            own_pending += 1;
                            own_live += u64::from(r.bytes);
                        }
                    }
                    if let Some(t) = r.expires_at_ms {
                        self.expiring.insert(seq, t);
                    }
                }
                Op::Ack { queue, seq: target } => {
                    let Some(weight) = self.live.get_mut(queue).and_then(|set| set.remove(target)) else {
                        continue;
                    };
                    match self.batch_of(*target) {
                        _ if *target >= key => {
                            own_pending -= 1;
                            own_live -= u64::from(weight);
                        }
                        Some(t) => {
                            self.unlive(t, weight);
                            if self.release(t) {
                                dead.push(t);
                            } else {
                                // The ack must outlive the batch it acknowledges.
                                own_pending += 1;
                                self.referrers.entry(t).or_default().push(key);
                            }
                        }
                        None => {}
                    }
                }
                Op::PutQueue { key: q, .. } => {
                    self.live.entry(q.clone()).or_default();
                }
                Op::PutUser { .. }
                | Op::DeleteUser { .. }
                | Op::Redelivered { .. }
                | Op::HandedIn { .. }
                | Op::Nothing => {}
                Op::DeleteQueue { key: q } => {
                    let seqs = self.live.remove(q).unwrap_or_default();
                    for (s, weight) in seqs {
                        match self.batch_of(s) {
                            _ if s >= key => {
                                own_pending -= 1;
                                own_live -= u64::from(weight);
                            }
                            Some(t) => {
                                self.unlive(t, weight);
                                if self.release(t) {
                                    dead.push(t);
                                }
                            }
                            None => {}
                        }
                    }
                }
            }
        }
        self.live_bytes += record_bytes;
        self.live_weight += own_live;
        self.batches
            .insert(key, BatchLive { pending: own_pending, bytes: record_bytes, live: own_live, checked: u64::MAX });
        if own_pending == 0 {
            dead.push(key);
        }
        self.cascade(dead)
    }

    /// Forget a queue's live messages without an op (recovery: messages of
    /// queues that no longer exist). Returns newly dead batches.
    pub fn drop_messages(&mut self, queue: &str, keep: impl Fn(u64) -> bool) -> Vec<u64> {
        let mut dead = Vec::new();
        let Some(set) = self.live.get_mut(queue) else { return dead };
        let gone: Vec<(u64, u32)> = set.iter().map(|(s, w)| (*s, *w)).filter(|(s, _)| !keep(*s)).collect();
        for (s, _) in &gone {
            set.remove(s);
        }
        for (s, weight) in gone {
            if let Some(t) = self.batch_of(s) {
                self.unlive(t, weight);
                if self.release(t) {
                    dead.push(t);
                }
            }
        }
        self.cascade(dead)
    }

    /// The records `keys` are gone from the log (a restart from an index
    /// checkpoint learns of records that died after it): their messages are
    /// no longer live, and they no longer pin the records holding acks of
    /// them. Returns the records that die with them.
    pub fn forget_records(&mut self, keys: &[u64]) -> Vec<u64> {
        let mut dead = Vec::new();
        for &k in keys {
            if !self.batches.contains_key(&k) {
                continue;
            }
            let end = self.batches.range(k + 1..).next().map_or(u64::MAX, |(n, _)| *n);
            for set in self.live.values_mut() {
                let gone: Vec<u64> = set.range(k..end).map(|(s, _)| *s).collect();
                for s in gone {
                    set.remove(&s);
                }
            }
            if let Some(b) = self.batches.get_mut(&k) {
                b.pending = 0;
                self.live_weight -= std::mem::take(&mut b.live);
            }
            dead.push(k);
        }
        self.cascade(dead)
    }

    fn batch_of(&self, seq: u64) -> Option<u64> {
        self.batches.range(..=seq).next_back().map(|(k, _)| *k)
    }

    /// A live pair of batch `t` weighing `weight` is gone.
    fn unlive(&mut self, t: u64, weight: u32) {
        if let Some(b) = self.batches.get_mut(&t) {
            b.live -= u64::from(weight).min(b.live);
        }
        self.live_weight -= u64::from(weight).min(self.live_weight);
    }

    /// One reason fewer to keep batch `t`; true when it just died.
    fn release(&mut self, t: u64) -> bool {
        match self.batches.get_mut(&t) {
            Some(b) if b.pending > 0 => {
                b.pending -= 1;
                b.pending == 0
            }
            _ => false,
        }
    }

    fn cascade(&mut self, mut work: Vec<u64>) -> Vec<u64> {
        let mut dead = Vec::new();
        while let Some(d) = work.pop() {
            let Some(b) = self.batches.remove(&d) else { continue };
            if !self.expiring.is_empty() {
                let end = self.batches.range(d..).next().map_or(u64::MAX, |(k, _)| *k);
                let gone: Vec<u64> = self.expiring.range(d..end).map(|(s, _)| *s).collect();
                for s in gone {
                    self.expiring.remove(&s);
                }
            }
            self.live_bytes -= b.bytes;
            self.live_weight -= b.live.min(self.live_weight);
            dead.push(d);
            for r in self.referrers.remove(&d).unwrap_or_default() {
                if self.release(r) {
                    work.push(r);
                }
            }
        }
        dead.sort_unstable();
        dead
    }

    pub fn queue_depth(&self, queue: &str) -> usize {
        self.live.get(queue).map_or(0, BTreeMap::len)
    }

    /// A queue's live messages in sequence order.
    pub fn live_refs(&self, queue: &str) -> impl Iterator<Item = MessageRef> + '_ {
        self.live.get(queue).into_iter().flat_map(move |s| {
            s.iter().map(move |(seq, bytes)| MessageRef {
                seq: *seq,
                bytes: *bytes,
                expires_at_ms: self.expiring.get(seq).copied(),
            })
        })
    }

    pub fn is_live(&self, queue: &str, seq: u64) -> bool {
        self.live.get(queue).is_some_and(|s| s.contains_key(&seq))
    }

    pub fn live_seqs(&self, queue: &str) -> impl Iterator<Item = u64> + '_ {
        self.live.get(queue).into_iter().flat_map(|s| s.keys().copied())
    }

    /// Live (queue, message) pairs in all queues.
    pub fn live_messages(&self) -> usize {
        self.live.values().map(BTreeMap::len).sum()
    }

    pub fn queues(&self) -> impl Iterator<Item = &String> {
        self.live.keys()
    }

    /// Number of batch records still in the log.
    /// The keys of the records still needed in `from..=to`, in order.
    pub fn record_keys_in(&self, from: u64, to: u64) -> impl Iterator<Item = u64> + '_ {
        self.batches.range(from..=to.max(from)).map(|(k, _)| *k).filter(move |k| *k <= to)
    }

    /// The keys of the records still needed, in order.
    pub fn record_keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.batches.keys().copied()
    }

    pub fn live_batches(&self) -> usize {
        self.batches.len()
    }

    /// Bytes of batch records still in the log.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// What the live (message, queue) pairs weigh, all queues together.
    pub fn live_weight(&self) -> u64 {
        self.live_weight
    }

    /// Records worth rewriting without their dead ops (less than half of
    /// their bytes are live messages) among at most `scan` records from
    /// `from` on that are older than `before`; and where the next look
    /// starts (0: from the oldest again).
    pub fn compactable(&self, from: u64, before: u64, scan: usize) -> (Vec<u64>, u64) {
        let mut found = Vec::new();
        let mut next = 0;
        for (seen, (k, b)) in self.batches.range(from..).enumerate() {
            if *k >= before {
                break;
            }
            if seen == scan {
                next = *k;
                break;
            }
            if b.live * 2 < b.bytes && b.pending < b.checked {
                found.push(*k);
            }
        }
        (found, next)
    }

    /// Whether an ack of `target` written in record `key` still keeps
    /// `key` alive (or might: an ack is dropped only once no record it
    /// could point at is left before it).
    pub fn ack_pins(&self, key: u64, target: u64) -> bool {
        target < key && self.batch_of(target).is_some()
    }

    /// The compactor looked at record `key` and left it `bytes` long.
    pub fn compacted(&mut self, key: u64, bytes: u64) {
        if let Some(b) = self.batches.get_mut(&key) {
            self.live_bytes = self.live_bytes - b.bytes + bytes;
            b.bytes = bytes;
            b.checked = b.pending;
        }
    }

    /// The compactor looked at record `key` and found nothing to drop.
    pub fn looked_at(&mut self, key: u64) {
        if let Some(b) = self.batches.get_mut(&key) {
            b.checked = b.pending;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::StoredMessage;

    fn msg() -> StoredMessage {
        StoredMessage {
            epoch: 1,
            seq: 0,
            origin: "queue:q".into(),
            producer_id: 0,
            producer_seq: 0,
            headers: Default::default(),
            payload: vec![],
            timestamp_ms: 0,
            expires_at_ms: None,
        }
    }
    fn enq(queues: &[&str]) -> Op {
        Op::Enqueue { message: msg(), queues: queues.iter().map(|s| s.to_string()).collect() }
    }
    fn ack(q: &str, seq: u64) -> Op {
        Op::Ack { queue: q.into(), seq }
    }
    fn body(first_seq: u64, ops: Vec<Op>) -> BatchBody {
        BatchBody { epoch: 1, first_seq, ops }
    }

    #[test]
    fn batch_dies_when_all_messages_acked_and_frees_its_ackers() {
        let mut ix = LiveIndex::default();
        assert!(ix.apply(&body(1, vec![enq(&["a"]), enq(&["a", "b"])]), 10).is_empty());
        // Batch 3 acks seq 1 in a: batch 1 still has 2 live pairs, batch 3 pinned.
        assert!(ix.apply(&body(3, vec![ack("a", 1)]), 10).is_empty());
        assert!(ix.apply(&body(4, vec![ack("a", 2)]), 10).is_empty());
        assert_eq!(ix.queue_depth("a"), 0);
        assert_eq!(ix.queue_depth("b"), 1);
        // Last live pair goes: batch 1 dies, and with it the ack batches 3, 4 and this one.
        assert_eq!(ix.apply(&body(5, vec![ack("b", 2)]), 10), vec![1, 3, 4, 5]);
        assert_eq!(ix.live_batches(), 0);
        assert_eq!(ix.live_bytes(), 0);
    }

    #[test]
    fn double_ack_and_ack_of_unknown_message_change_nothing() {
        let mut ix = LiveIndex::default();
        ix.apply(&body(1, vec![enq(&["a"]), enq(&["a"])]), 1);
        assert!(ix.apply(&body(3, vec![ack("a", 1), ack("a", 1), ack("a", 99), ack("zz", 2)]), 1).is_empty());
        assert_eq!(ix.queue_depth("a"), 1);
        assert_eq!(ix.live_batches(), 2);
    }

    #[test]
    fn delete_queue_frees_its_messages() {
        let mut ix = LiveIndex::default();
        ix.apply(&body(1, vec![enq(&["a"]), enq(&["a"])]), 1);
        assert_eq!(ix.apply(&body(3, vec![Op::DeleteQueue { key: "a".into() }]), 1), vec![1, 3]);
    }

    #[test]
    fn ack_in_the_same_batch_as_its_enqueue() {
        let mut ix = LiveIndex::default();
        assert_eq!(ix.apply(&body(1, vec![enq(&["a"]), ack("a", 1)]), 1), vec![1]);
    }
}
