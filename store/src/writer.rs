//! Group commit: the one thread that writes the log.
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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use crate::index::LiveIndex;
use crate::op::{BatchBody, Op};
use crate::store::{Durability, QueueEntry, Recovered, Store};
use crate::StoreError;

/// Called on the writer thread once the submission is durable (or failed).
/// It must not block: send a message and return.
pub type Completion = Box<dyn FnOnce(Result<Committed, StoreError>) + Send>;

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

enum Request {
    Submit(Vec<Op>, Completion),
    /// Complete once everything submitted before it is done.
    Barrier(Completion),
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
}

/// Handle to the writer thread. Cloning it is cheap; the thread ends when
/// every handle is dropped, after finishing what was submitted.
#[derive(Clone)]
pub struct Writer {
    tx: Sender<Request>,
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
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig { durability: Durability::Local, max_batch_ops: 1024 }
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
        let state = WriterState {
            store,
            config,
            epoch: recovered.epoch,
            next_seq: recovered.next_seq,
            index: std::mem::take(&mut recovered.index),
            dedup: recovered.dedup.clone(),
            dirty_dedup: HashMap::new(),
            stats: stats.clone(),
            failed: None,
        };
        state.publish_stats();
        let handle = std::thread::Builder::new()
            .name("twinmq-store-writer".into())
            .spawn(move || state.run(rx))
            .map_err(StoreError::Thread)?;
        Ok((Writer { tx, stats }, handle))
    }

    /// Queue `ops` for the next group commit; `done` runs when they are durable.
    /// Enqueues carrying a producer id already stored with an equal or higher
    /// producer sequence make the whole submission a duplicate.
    pub fn submit(&self, ops: Vec<Op>, done: Completion) {
        if let Err(crossbeam_channel::SendError(Request::Submit(_, done))) = self.tx.send(Request::Submit(ops, done)) {
            done(Err(StoreError::Closed));
        }
    }

    /// `done` runs after everything submitted before this call has completed.
    pub fn barrier(&self, done: Completion) {
        if let Err(crossbeam_channel::SendError(Request::Barrier(done))) = self.tx.send(Request::Barrier(done)) {
            done(Err(StoreError::Closed));
        }
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }
}

struct WriterState {
    store: Store,
    config: WriterConfig,
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
}

impl WriterState {
    fn run(mut self, rx: Receiver<Request>) {
        let mut pending: Vec<Request> = Vec::new();
        while let Ok(first) = rx.recv() {
            pending.push(first);
            let mut ops = count_ops(&pending[0]);
            while ops < self.config.max_batch_ops {
                match rx.try_recv() {
                    Ok(r) => {
                        ops += count_ops(&r);
                        pending.push(r);
                    }
                    Err(_) => break,
                }
            }
            self.commit(&mut pending);
        }
        if let Err(e) = self.store.db.flush() {
            tracing::error!(error = %e, "final store flush failed");
        }
        tracing::debug!("store writer stopped");
    }

    fn commit(&mut self, pending: &mut Vec<Request>) {
        if let Some(reason) = &self.failed {
            for r in pending.drain(..) {
                complete(r, Err(StoreError::Failed(reason.clone())));
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
                barrier @ Request::Barrier(_) => plan.push((barrier, None)),
            }
        }

        if !all_ops.is_empty() {
            let body = BatchBody { epoch: self.epoch, first_seq, ops: all_ops };
            match self.write(&body) {
                Ok(dead) => self.delete(&dead),
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
                match (r, slot) {
                    (Request::Submit(_, done), Some((start, n))) => {
                        let mine: Vec<Op> = ops.by_ref().take(n).collect();
                        done(Ok(Committed { epoch: self.epoch, first_seq: start, ops: mine, duplicate: false }));
                    }
                    (r, _) => complete(r, Ok(self.duplicate())),
                }
            }
        } else {
            for (r, _) in plan {
                complete(r, Ok(self.duplicate()));
            }
        }
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

    /// Admin entries, the record, one flush. Returns the records now dead.
    fn write(&mut self, body: &BatchBody) -> Result<Vec<u64>, StoreError> {
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
                _ => {}
            }
        }
        let raw = body.encode()?;
        let len = raw.len() as u64;
        self.store.log.insert(body.first_seq.to_be_bytes(), raw)?;
        if self.config.durability != Durability::None {
            let t = Instant::now();
            self.store.db.flush()?;
            self.stats.flushes.fetch_add(1, Ordering::Relaxed);
            self.stats.last_flush_us.store(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.ops.fetch_add(body.ops.len() as u64, Ordering::Relaxed);
        self.stats.bytes.fetch_add(len, Ordering::Relaxed);
        self.stats.last_seq.store(body.last_seq(), Ordering::Relaxed);
        Ok(self.index.apply(body, len))
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
        if !self.dirty_dedup.is_empty() {
            self.store.persist_floor(self.next_seq, self.dirty_dedup.iter())?;
            self.dirty_dedup.clear();
        } else {
            self.store.persist_floor(self.next_seq, std::iter::empty())?;
        }
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
    }
}

fn count_ops(r: &Request) -> usize {
    match r {
        Request::Submit(ops, _) => ops.len().max(1),
        Request::Barrier(_) => 1,
    }
}

fn complete(r: Request, result: Result<Committed, StoreError>) {
    match r {
        Request::Submit(_, done) | Request::Barrier(done) => done(result),
    }
}
