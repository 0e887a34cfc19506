//! The data directory's disk use and its limits (issue 11): a queue is
//! bounded by disk, not memory, so the broker refuses new messages (a clear
//! `LimitReached`, or holds them with `queue_full = "block"`) before the
//! disk is full: once the data directory (store, blobs, index checkpoint,
//! snapshot staging: everything in it) reaches `max_disk_bytes`, or the
//! file system has less than `min_free_disk_bytes` left. Acks, deletes and
//! admin changes still go through (they are what frees the disk). Measured
//! once a second by a thread of its own; shown in `/status` and `/metrics`.
//!
//! In a pair the limit is the pair's: the passive writes every record too,
//! so the active refuses while its own disk or its in-sync passive's is
//! nearly full (the measure goes to the role arbiter through the store
//! writer's `disk_full` and the heartbeats; its verdict comes back through
//! `refuse_full`). A nearly full disk moves no role; a disk whose writes
//! fail is a failed node (DESIGN.md section 4).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use twinmq_store::WriterStats;

/// How often the disk use is measured.
const EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct DiskUse {
    dir: PathBuf,
    /// 0: no limit of our own.
    max_bytes: u64,
    min_free: u64,
    used: AtomicU64,
    free: AtomicU64,
    /// Over a limit at the last measurement.
    over: AtomicBool,
    full: AtomicBool,
    /// The store writer's counters: `disk_full` is told there.
    stats: Option<Arc<WriterStats>>,
    /// A pair member: the role arbiter's verdict (`refuse_full` in `stats`)
    /// decides the refusals, not this node's measure alone.
    pair: bool,
}

/// Bytes the files under `dir` take on disk (blocks, not apparent size).
fn du(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => du(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

impl DiskUse {
    /// No limits, nothing measured (tests, and until the broker starts).
    pub fn unlimited() -> Arc<DiskUse> {
        Arc::default()
    }

    /// Measure `dir` now and then once a second, on a thread of its own,
    /// telling the store writer's counters (`pair`: the role arbiter decides
    /// whether a full disk refuses new messages).
    pub fn start(dir: &Path, max_bytes: u64, min_free: u64, stats: Arc<WriterStats>, pair: bool) -> Arc<DiskUse> {
        let d = Arc::new(DiskUse {
            dir: dir.to_path_buf(),
            max_bytes,
            min_free,
            stats: Some(stats),
            pair,
            ..DiskUse::default()
        });
        d.refresh();
        d.refresh();
        let weak = Arc::downgrade(&d);
        let spawned = std::thread::Builder::new().name("twinmq-disk".into()).spawn(move || loop {
            std::thread::sleep(EVERY);
            match weak.upgrade() {
                Some(d) => d.refresh(),
                None => return,
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the disk-use thread; disk limits are checked at start only");
        }
        d
    }

    pub fn refresh(&self) {
        let used = du(&self.dir);
        let free = rustix::fs::statvfs(&self.dir).map_or(u64::MAX, |s| s.f_bavail.saturating_mul(s.f_frsize));
        self.used.store(used, Ordering::Relaxed);
        self.free.store(free, Ordering::Relaxed);
        let over = (self.max_bytes > 0 && used >= self.max_bytes) || free < self.min_free;
        // Clear again only a margin (1/32 of each limit) below it: a node
        // hovering at its limit does not accept and refuse by turns.
        let under_margin = (self.max_bytes == 0 || used < self.max_bytes - self.max_bytes / 32)
            && free > self.min_free + self.min_free / 32;
        // Full after two measurements in a row: a disk that fails at once
        // (a write gets ENOSPC) fails the store first, and in a pair the
        // role moves to the peer, whose disk may have room.
        let was_over = self.over.swap(over, Ordering::Relaxed);
        let full = if self.full.load(Ordering::Relaxed) { !under_margin } else { over && was_over };
        if let Some(stats) = &self.stats {
            stats.disk_full.store(full, Ordering::Relaxed);
        }
        if full != self.full.swap(full, Ordering::Relaxed) {
            if full {
                tracing::warn!(
                    used,
                    free,
                    max_disk_bytes = self.max_bytes,
                    min_free_disk_bytes = self.min_free,
                    "disk limit reached: new messages are refused until space is freed (in a pair, by the active)"
                );
            } else {
                tracing::info!(used, free, "below the disk limit again: new messages are accepted");
            }
        }
    }

    /// Over a limit (two measurements in a row).
    pub fn over_limit(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// Why new messages are refused, if they are.
    pub fn full(&self) -> Option<String> {
        let judged = match &self.stats {
            Some(stats) if self.pair => stats.refuse_full.load(Ordering::Relaxed),
            _ => self.over_limit(),
        };
        if !judged {
            return None;
        }
        if !self.over_limit() {
            // The in-sync passive's disk (the role arbiter's verdict).
            return Some(
                "the passive's disk is nearly full (its max_disk_bytes or min_free_disk_bytes); \
                 the pair accepts new messages again once it has room"
                    .to_string(),
            );
        }
        let (used, free) = (self.used(), self.free());
        Some(if self.max_bytes > 0 && used >= self.max_bytes {
            format!(
                "the node's disk limit is reached ({used} bytes in its data directory, max_disk_bytes {})",
                self.max_bytes
            )
        } else {
            format!("the node's disk is nearly full ({free} bytes free, min_free_disk_bytes {})", self.min_free)
        })
    }

    /// Bytes the data directory takes.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes free on its file system (for this user).
    pub fn free(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    /// Bytes that may still be written before new messages are refused.
    pub fn headroom(&self) -> u64 {
        let by_free = self.free().saturating_sub(self.min_free);
        if self.max_bytes > 0 {
            by_free.min(self.max_bytes.saturating_sub(self.used()))
        } else {
            by_free
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(dir: &Path, bytes: usize) {
        std::fs::write(dir.join("data"), vec![1u8; bytes]).expect("write");
    }

    #[test]
    fn full_after_two_measurements_and_clear_only_a_margin_below_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limit = 1 << 20;
        let d = DiskUse { dir: dir.path().to_path_buf(), max_bytes: limit, ..DiskUse::default() };
        fill(dir.path(), limit as usize + 4096);
        d.refresh();
        assert!(!d.over_limit(), "one measurement is not enough");
        d.refresh();
        assert!(d.over_limit());
        assert!(d.full().is_some_and(|why| why.contains("max_disk_bytes")), "{:?}", d.full());
        // Just under the limit, within 1/32 of it: still full.
        fill(dir.path(), limit as usize - 8192);
        d.refresh();
        assert!(d.over_limit(), "hovering at the limit does not clear it");
        // Well under: clear at once.
        fill(dir.path(), limit as usize / 2);
        d.refresh();
        assert!(!d.over_limit());
        assert_eq!(d.full(), None);
    }
}
