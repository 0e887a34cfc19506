//! Message bodies read back from their batch records, through a bounded
//! cache (DESIGN.md section 5, "Memory holds indexes, not bodies").
//!
//! A read that misses decodes the record holding the message and keeps it
//! and the messages after it in that record (read-ahead: a queue drains in
//! sequence order, so its next deliveries come from the same record). The
//! cache is first in, first out, bounded in bytes by `body_cache_bytes`;
//! it is emptied whenever the store's history is replaced (a snapshot from
//! the peer), since a sequence number then names another message.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::op::StoredMessage;

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<u64, Arc<StoredMessage>>,
    order: VecDeque<(u64, usize)>,
    bytes: usize,
}

/// The read cache; shared by every clone of the store.
#[derive(Debug, Default)]
pub struct BodyCache {
    limit: usize,
    inner: Mutex<Inner>,
    /// Reads answered from the cache, and records decoded for a miss.
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

impl BodyCache {
    pub fn new(limit: usize) -> BodyCache {
        BodyCache { limit, ..BodyCache::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, seq: u64) -> Option<Arc<StoredMessage>> {
        let found = self.lock().map.get(&seq).cloned();
        if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Keep `messages` (read from one record), evicting the oldest past the limit.
    pub fn insert(&self, messages: Vec<Arc<StoredMessage>>) {
        self.misses.fetch_add(1, Ordering::Relaxed);
        if self.limit == 0 {
            return;
        }
        let mut inner = self.lock();
        for m in messages {
            let (seq, bytes) = (m.seq, m.weight());
            if inner.map.insert(seq, m).is_none() {
                inner.order.push_back((seq, bytes));
                inner.bytes += bytes;
            }
        }
        while inner.bytes > self.limit {
            let Some((seq, bytes)) = inner.order.pop_front() else { break };
            inner.map.remove(&seq);
            inner.bytes -= bytes;
        }
        if inner.map.is_empty() {
            inner.order = VecDeque::new();
            inner.map = HashMap::new();
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Forget everything (the store's history was replaced).
    pub fn clear(&self) {
        *self.lock() = Inner::default();
    }
}
