//! A store's history: which epoch wrote which ops.
//!
//! Every promotion starts a new epoch at the store's next sequence number and
//! records it here with a random id of that promotion. Ops are only ever
//! written by the node that promoted to their epoch, in order, so two stores
//! whose histories share an entry hold the very same ops in that entry's
//! range, up to the shorter of the two. That is what lets a returning node
//! learn exactly which of its ops its peer never had (its *fork* point), and
//! what orders two histories when both nodes are passive (DESIGN.md section
//! 4: by the epoch of the last op actually written, then the last op).

use serde::{Deserialize, Serialize};

/// From `start` on, ops were written in `epoch` by the promotion `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochStart {
    pub epoch: u64,
    /// Random, chosen at promotion: two promotions to one epoch number (a
    /// forced one during a split, or a wiped store promoting again) are
    /// never taken for the same history.
    pub id: u64,
    /// Sequence number of the first op of this epoch.
    pub start: u64,
    /// An operator forced this promotion (`promote --force`): the node may
    /// have lacked ops its peer confirmed, so a store that diverges from a
    /// history with such an entry hands over everything past the fork.
    #[serde(default)]
    pub forced: bool,
}

/// Most entries kept. Older ones are dropped; a comparison that needs them
/// finds no common history, so the whole store counts as divergent: handed
/// over (duplicates possible), never lost.
const MAX_ENTRIES: usize = 256;

/// The epochs of a store's ops, oldest first (epochs and starts ascending).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History(Vec<EpochStart>);

impl History {
    pub fn new(entries: Vec<EpochStart>) -> History {
        History(entries)
    }

    pub fn entries(&self) -> &[EpochStart] {
        &self.0
    }

    /// A new epoch begins at `start`. An earlier epoch that wrote nothing
    /// (its start is the same) is replaced: it holds no op to compare.
    pub fn begin(&mut self, mut e: EpochStart) {
        while let Some(last) = self.0.pop_if(|last| last.start >= e.start) {
            // What a forced promotion started is still what this one continues.
            e.forced |= last.forced;
        }
        self.0.push(e);
        if self.0.len() > MAX_ENTRIES {
            self.0.remove(0);
        }
    }

    /// The entry that op `seq` belongs to.
    pub fn epoch_of(&self, seq: u64) -> Option<&EpochStart> {
        self.0.iter().rev().find(|e| e.start <= seq)
    }

    /// The epoch of the last op actually written (`last_seq`), 0 for none.
    pub fn last_op_epoch(&self, last_seq: u64) -> u64 {
        if last_seq == 0 {
            return 0;
        }
        self.epoch_of(last_seq).map_or(0, |e| e.epoch)
    }

    /// The entries that cover ops up to `last_seq` (what a follower holding
    /// ops through `last_seq` of this history has).
    pub fn prefix(&self, last_seq: u64) -> History {
        History(self.0.iter().copied().filter(|e| e.start <= last_seq).collect())
    }

    /// The last sequence number up to which this history (holding ops
    /// through `my_last`) and `other` (through `other_last`) hold the same
    /// ops. Ops after it on either side are that side's own.
    pub fn fork(&self, my_last: u64, other: &History, other_last: u64) -> u64 {
        let common = self.common(other);
        if common == 0 {
            return 0;
        }
        let end = |h: &History, last: u64| h.0.get(common).map_or(last, |next| next.start.saturating_sub(1)).min(last);
        end(self, my_last).min(end(other, other_last))
    }

    /// Leading entries both histories share.
    fn common(&self, other: &History) -> usize {
        self.0.iter().zip(other.0.iter()).take_while(|(a, b)| a == b).count()
    }

    /// Whether this history moved on from `other` through a forced
    /// promotion (an entry past their common ones that an operator forced).
    pub fn forced_since(&self, other: &History) -> bool {
        self.0[self.common(other)..].iter().any(|e| e.forced)
    }
}

/// How two stores rank when both nodes are passive (DESIGN.md section 4):
/// the epoch of the last op written, then the last op. An empty store, or one
/// promoted without writing anything, never outranks one that holds data.
pub fn rank(history: &History, last_seq: u64) -> (u64, u64) {
    (history.last_op_epoch(last_seq), last_seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(epoch: u64, id: u64, start: u64) -> EpochStart {
        EpochStart { epoch, id, start, forced: false }
    }

    #[test]
    fn a_prefix_of_the_same_history_forks_at_its_own_end() {
        let h = History::new(vec![e(1, 7, 1), e(2, 8, 101)]);
        let behind = h.prefix(50);
        assert_eq!(behind.entries(), &[e(1, 7, 1)]);
        assert_eq!(h.fork(150, &behind, 50), 50);
        assert_eq!(behind.fork(50, &h, 150), 50);
        // Behind into the second epoch.
        assert_eq!(h.fork(150, &h.prefix(120), 120), 120);
    }

    #[test]
    fn diverged_epochs_fork_where_the_other_epoch_began() {
        // a wrote 1..=150 in epoch 1; b took over at 101 (epoch 2) and wrote to 300.
        let a = History::new(vec![e(1, 7, 1)]);
        let b = History::new(vec![e(1, 7, 1), e(2, 9, 101), e(3, 10, 201)]);
        assert_eq!(b.fork(300, &a, 150), 100);
        assert_eq!(a.fork(150, &b, 300), 100);
    }

    #[test]
    fn two_promotions_to_one_epoch_number_are_different_histories() {
        let a = History::new(vec![e(1, 7, 1), e(2, 11, 101)]);
        let b = History::new(vec![e(1, 7, 1), e(2, 12, 101), e(3, 13, 201)]);
        assert_eq!(a.fork(130, &b, 250), 100);
        assert_eq!(History::default().fork(0, &b, 250), 0);
        assert_eq!(History::new(vec![e(1, 5, 1)]).fork(9, &b, 250), 0);
        assert!(!b.forced_since(&a));
        let forced = History::new(vec![e(1, 7, 1), EpochStart { forced: true, ..e(2, 14, 101) }]);
        assert!(forced.forced_since(&a));
        assert!(!forced.forced_since(&forced));
    }

    #[test]
    fn an_epoch_that_wrote_nothing_is_replaced_and_does_not_rank() {
        let mut h = History::new(vec![e(1, 7, 1)]);
        h.begin(e(2, 8, 101));
        h.begin(e(3, 9, 101));
        assert_eq!(h.entries(), &[e(1, 7, 1), e(3, 9, 101)]);
        // Nothing written in epoch 3 yet: the last op is still epoch 1's.
        assert_eq!(rank(&h, 100), (1, 100));
        assert_eq!(rank(&h, 101), (3, 101));
        assert!(rank(&History::default(), 0) < rank(&h, 1));
        // A force-promoted empty store at a high epoch ranks below any data.
        let mut empty = History::default();
        empty.begin(e(9, 1, 1));
        assert!(rank(&empty, 0) < rank(&History::new(vec![e(1, 7, 1)]), 5));
    }

    #[test]
    fn old_entries_are_dropped_past_the_limit() {
        let mut h = History::default();
        for i in 0..(MAX_ENTRIES as u64 + 10) {
            h.begin(e(i + 1, i, i * 10 + 1));
        }
        assert_eq!(h.entries().len(), MAX_ENTRIES);
        assert_eq!(h.entries()[0].epoch, 11);
    }
}
