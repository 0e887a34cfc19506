//! `Queue`: one stored queue, durable subscription or in-memory subscription.
//!
//! Owns the queue's ready messages, its consumers with their prefetch credit,
//! and the deliveries in flight. Persistent messages enter only after the
//! store writer has made them durable (`Stored`), so a consumer never sees a
//! message that a crash could take back. Acks, expiries and dead-lettering
//! are ops in the store; so are the delivery counts of messages that came
//! back (nacked, timed out, their consumer gone), so that a count survives a
//! failover and a poison message still reaches the dead-letter queue (other
//! recovered messages are flagged `redelivered`, count unknown = 1).

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::OwnedSemaphorePermit;
use twinmq_protocol::{Delivered, Destination, ErrorCode, ErrorContext, ErrorFrame, MessageId, ServerFrame};
use twinmq_store::{MessageRef, Op, StoreError, StoredMessage, Writer};

use crate::outbound::Outbound;
use crate::{now_ms, transient_seq};

/// A consumer: (session id, subscription id).
pub type ConsumerKey = (u64, u32);

/// How a queue keeps its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueMode {
    /// Stored in the store under `key` (plain queue or durable subscription).
    Stored { key: String },
    /// In memory only: a non-durable topic subscription.
    Memory,
}

/// What a queue holds, published after every change for whoever must
/// check its limits without asking it (a topic storing into its durable
/// subscriptions, the metrics).
#[derive(Debug, Default)]
pub struct Fill {
    pub depth: AtomicUsize,
    pub bytes: AtomicUsize,
}

/// The bodies of stored messages that queues keep in memory for delivery
/// (half of `body_cache_bytes`; the store's read cache has the other half).
/// A stored message keeps its body while there is room, so that a consumer
/// that keeps up never waits for a read; past it, only its reference stays
/// and the body is read back from its record when it is delivered. What a
/// backlog costs in memory is then its index, not its bodies (DESIGN.md
/// section 5).
#[derive(Debug, Default)]
pub struct BodyBudget {
    limit: usize,
    used: AtomicUsize,
}

impl BodyBudget {
    pub fn new(limit: usize) -> BodyBudget {
        BodyBudget { limit, used: AtomicUsize::new(0) }
    }

    /// Room for `n` more bytes: taken.
    fn take(&self, n: usize) -> bool {
        self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| (u + n <= self.limit).then_some(u + n)).is_ok()
    }

    fn give(&self, n: usize) {
        let _ = self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(n)));
    }

    /// Bytes of bodies held by queues now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Subtract what was added: a miscount is a bug (tests panic on it), and
/// in production it must not wrap into a queue that is full for ever.
fn take(total: &mut usize, bytes: usize) {
    debug_assert!(*total >= bytes, "queue byte count below zero");
    *total = total.saturating_sub(bytes);
}

/// Settings every queue shares.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub max_depth: usize,
    /// Most bytes (`max_queue_bytes`), counted by [`StoredMessage::weight`].
    pub max_bytes: usize,
    pub ack_timeout: Option<Duration>,
    /// `None`: never dead-letter (dead-letter queues themselves, memory subscriptions).
    pub max_redeliveries: Option<u32>,
    /// Most consumers at once (`max_consumers_per_destination`).
    pub max_consumers: usize,
    /// `queue_full = "block"`: hold publishes to a full queue instead of refusing them.
    pub block_when_full: bool,
    /// The broker is stopping: let held publishes go (see [`crate::Shared`]).
    pub shutting_down: Arc<std::sync::atomic::AtomicBool>,
    /// Room for bodies in memory, shared by every queue.
    pub bodies: Arc<BodyBudget>,
    /// The disk limits: persistent messages wait or are refused past them.
    pub disk: Arc<crate::disk::DiskUse>,
}

impl QueueSettings {
    /// Whether held publishes must be let go now, unconfirmed (the client resends them).
    pub fn drop_held(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// A message in a queue: its reference, and its body while that is in memory.
#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    expires_at_ms: Option<NonZeroU64>,
    /// Weight against `max_queue_bytes` ([`StoredMessage::weight`]).
    bytes: u32,
    /// Deliveries so far.
    deliveries: u32,
    /// Always there for a transient message; for a stored one, while it is
    /// out for delivery or while the body budget has room for it (`charged`).
    body: Option<Arc<StoredMessage>>,
    persistent: bool,
    /// Its delivery count is in the store (to be forgotten with its ack).
    count_stored: bool,
    /// Its body counts in [`BodyBudget`].
    charged: bool,
}

impl Entry {
    fn new(m: Arc<StoredMessage>, persistent: bool) -> Entry {
        let r = MessageRef::of(&m);
        Entry {
            seq: m.seq,
            expires_at_ms: r.expires_at_ms,
            bytes: r.bytes,
            deliveries: 0,
            body: Some(m),
            persistent,
            count_stored: false,
            charged: false,
        }
    }

    /// A stored message as the index knows it (its body stays on disk), its
    /// delivery count kept in the store (0: none kept).
    fn recovered(r: MessageRef, count: u32) -> Entry {
        Entry {
            seq: r.seq,
            expires_at_ms: r.expires_at_ms,
            bytes: r.bytes,
            // Recovered messages may have been delivered before the restart
            // (count unknown: 1), or came back that many times (count stored).
            deliveries: count.max(1),
            body: None,
            persistent: true,
            count_stored: count > 0,
            charged: false,
        }
    }

    fn bytes(&self) -> usize {
        self.bytes as usize
    }

    fn expires_at_ms(&self) -> Option<u64> {
        self.expires_at_ms.map(NonZeroU64::get)
    }
}

struct Consumer {
    key: ConsumerKey,
    out: Outbound,
    credit: u32,
}

struct InFlight {
    entry: Entry,
    consumer: ConsumerKey,
    since: Instant,
}

pub struct Queue {
    /// Name shown to clients and operators (`queue:x`, `topic:t/sub`).
    pub label: String,
    /// The destination consumers see in deliveries.
    destination: Destination,
    mode: QueueMode,
    settings: QueueSettings,
    writer: Writer,
    /// Where dead letters go; `None` for queues that do not dead-letter.
    dead_letters: Option<Recipient<DeadLetter>>,
    ready: VecDeque<Entry>,
    in_flight: HashMap<u64, InFlight>,
    consumers: Vec<Consumer>,
    next_consumer: usize,
    /// Deliveries taken back after an ack timeout, by sequence: the consumer
    /// still holds them, so its credit returns only when it settles them.
    timed_out: HashMap<u64, ConsumerKey>,
    /// Messages in `ready` with an expiry, so the sweep can skip queues without TTLs.
    with_ttl: usize,
    /// No message in `ready` expires before this (ms since the epoch): the
    /// sweep waits for it.
    next_expiry: u64,
    dropped_full: u64,
    /// Deleted by an operator: answers publishes with an error until it stops
    /// (sessions that cached its address then resolve the name again).
    deleted: bool,
    /// Persistent publishes handed to the store writer and not yet back: they
    /// count toward the depth, so a burst cannot overshoot `max_depth`.
    pending: usize,
    /// Publishes waiting for room (`queue_full = "block"`), unconfirmed. Each
    /// holds its connection's publish permit, so this is bounded by
    /// connections x `max_inflight_per_connection`; dropped unconfirmed when
    /// the queue stops, and the client resends them.
    held: VecDeque<Publish>,
    /// Our own address, for the store writer's completions.
    me: Option<Addr<Queue>>,
    /// The 250 ms tick (ack timeouts, expiry), running only while there is
    /// something for it: an idle queue costs no wakeups (issue 10, finding
    /// 10: 100,000 idle queues ticking took 25-60 % of a core).
    ticker: Option<SpawnHandle>,
    /// A `Wake` is on its way to start the tick.
    waking: bool,
    /// The depth, published for the topic of a durable subscription, which
    /// stores messages into this queue without asking it (see `Topic`).
    fill: Arc<Fill>,
    /// Bytes of `ready`, of `in_flight`, and of publishes at the store writer.
    ready_bytes: usize,
    in_flight_bytes: usize,
    pending_bytes: usize,
    /// Nacked with a delay, waiting for it to pass (counted in the depth).
    delayed: usize,
    delayed_bytes: usize,
}

impl Queue {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        label: String,
        destination: Destination,
        mode: QueueMode,
        settings: QueueSettings,
        writer: Writer,
        dead_letters: Option<Recipient<DeadLetter>>,
        recovered: Vec<(MessageRef, u32)>,
    ) -> Queue {
        let ready: VecDeque<Entry> = recovered.into_iter().map(|(r, count)| Entry::recovered(r, count)).collect();
        let with_ttl = ready.iter().filter(|e| e.expires_at_ms.is_some()).count();
        let next_expiry = ready.iter().filter_map(Entry::expires_at_ms).min().unwrap_or(u64::MAX);
        let ready_bytes = ready.iter().map(Entry::bytes).sum();
        let fill = Arc::new(Fill { depth: AtomicUsize::new(ready.len()), bytes: AtomicUsize::new(ready_bytes) });
        Queue {
            label,
            destination,
            mode,
            settings,
            writer,
            dead_letters,
            ready,
            in_flight: HashMap::new(),
            consumers: Vec::new(),
            next_consumer: 0,
            timed_out: HashMap::new(),
            with_ttl,
            next_expiry,
            dropped_full: 0,
            deleted: false,
            pending: 0,
            held: VecDeque::new(),
            me: None,
            ticker: None,
            waking: false,
            fill,
            ready_bytes,
            in_flight_bytes: 0,
            pending_bytes: 0,
            delayed: 0,
            delayed_bytes: 0,
        }
    }

    /// The depth as last published (after every change of it).
    pub fn fill(&self) -> Arc<Fill> {
        self.fill.clone()
    }

    fn store_key(&self) -> Option<&str> {
        match &self.mode {
            QueueMode::Stored { key } => Some(key),
            QueueMode::Memory => None,
        }
    }

    fn depth(&self) -> usize {
        self.ready.len() + self.in_flight.len() + self.pending + self.delayed
    }

    fn bytes(&self) -> usize {
        self.ready_bytes + self.in_flight_bytes + self.pending_bytes + self.delayed_bytes
    }

    /// At `max_queue_depth` or `max_queue_bytes`: why, for the refusal.
    fn full(&self) -> Option<String> {
        let s = &self.settings;
        if self.depth() >= s.max_depth {
            Some(format!("{} is full ({} messages, max_queue_depth)", self.label, s.max_depth))
        } else if self.bytes() >= s.max_bytes {
            Some(format!("{} is full ({} bytes, max_queue_bytes)", self.label, s.max_bytes))
        } else if self.store_key().is_some() {
            s.disk.full()
        } else {
            None
        }
    }

    /// Admit held publishes while there is room (`queue_full = "block"`).
    fn release_held(&mut self) {
        if self.settings.drop_held() && !self.held.is_empty() {
            tracing::info!(queue = %self.label, held = self.held.len(), "shutting down; held publishes left unconfirmed");
            self.held.clear();
        }
        while self.full().is_none() {
            let Some(p) = self.held.pop_front() else { return };
            if p.reply.is_closed() {
                // Its connection is gone: the client resends it elsewhere.
                continue;
            }
            self.accept(p);
        }
    }

    /// Store (or, for a transient message, queue) a publish there is room for.
    fn accept(&mut self, p: Publish) {
        let mut stored = Vec::new();
        self.take(p, &mut stored);
        self.store(stored);
    }

    /// A publish there is room for: a persistent one for a stored queue is
    /// counted in the depth at once (the next one's room depends on it) and
    /// added to `stored`, for [`Queue::store`]; any other is ready at once.
    fn take(&mut self, p: Publish, stored: &mut Vec<Publish>) {
        if p.persistent && self.me.is_some() && self.store_key().is_some() {
            self.pending += 1;
            self.pending_bytes += p.message.weight();
            stored.push(p);
        } else {
            self.enqueue_transient(p);
        }
    }

    /// A transient message (or one for an in-memory queue): ready at once.
    fn enqueue_transient(&mut self, p: Publish) {
        let (pid, pseq) = p.ids();
        let mut m = p.message;
        m.seq = transient_seq();
        let id = MessageId { epoch: m.epoch, seq: m.seq };
        self.push_ready(Entry::new(Arc::new(m), false), false);
        let _ = p.reply.confirm(pid, pseq, p.received, Some(id));
        self.dispatch();
    }

    /// Hand reserved publishes to the store writer as one submission (one
    /// commit, one completion), each confirmed (or refused) on its own.
    fn store(&mut self, publishes: Vec<Publish>) {
        if publishes.is_empty() {
            return;
        }
        let (Some(key), Some(me)) = (self.store_key().map(str::to_owned), self.me.clone()) else {
            // (`take` checked this for each: not reached.) Never dropped unanswered.
            for p in publishes {
                self.pending = self.pending.saturating_sub(1);
                self.pending_bytes = self.pending_bytes.saturating_sub(p.message.weight());
                let (pid, pseq) = p.ids();
                let why = format!("{} cannot store messages", self.label);
                let _ = p.reply.send(publish_error(pid, pseq, ErrorCode::StoreFailed, why));
            }
            return;
        };
        let label = self.label.clone();
        let count = publishes.len();
        let mut ops = Vec::with_capacity(count);
        let mut replies = Vec::with_capacity(count);
        let mut bytes = 0;
        for p in publishes {
            let (pid, pseq) = p.ids();
            bytes += p.message.weight();
            replies.push(Reply { pid, pseq, reply: p.reply, permit: p.permit, received: p.received });
            ops.push(Op::Enqueue { message: p.message, queues: vec![key.clone()] });
        }
        self.writer.submit(
            ops,
            Box::new(move |r| {
                let enqueued = |ops: Vec<Op>| {
                    ops.into_iter()
                        .filter_map(|op| match op {
                            Op::Enqueue { message, .. } => Some(Arc::new(message)),
                            _ => None,
                        })
                        .collect()
                };
                match r {
                    Ok(c) => {
                        // `c.ops` are the stored ones, in submission order, less the resends.
                        let ids: Vec<MessageId> = c
                            .ops
                            .iter()
                            .filter_map(|op| match op {
                                Op::Enqueue { message, .. } => Some(MessageId { epoch: message.epoch, seq: message.seq }),
                                _ => None,
                            })
                            .collect();
                        let mut ids = ids.into_iter();
                        me.do_send(Committed { messages: enqueued(c.ops), bytes, count });
                        // Durable as promised by the store's crate doc ("What a confirmation promises").
                        for (i, r) in replies.into_iter().enumerate() {
                            let duplicate = c.duplicate || c.duplicates.binary_search(&i).is_ok();
                            let _ = if duplicate {
                                r.reply.confirm_duplicate(r.pid, r.pseq, r.received)
                            } else {
                                r.reply.confirm(r.pid, r.pseq, r.received, ids.next())
                            };
                            drop(r.permit);
                        }
                    }
                    Err(e) => {
                        // Written but never confirmed: in the store all
                        // the same (a resend is deduplicated), so here too.
                        let messages = match &e {
                            StoreError::Unconfirmed { written, .. } => enqueued(written.ops.clone()),
                            _ => Vec::new(),
                        };
                        me.do_send(Committed { messages, bytes, count });
                        tracing::error!(queue = %label, error = %e, publishes = count, "store failed; publish not confirmed");
                        for r in replies {
                            let _ = r.reply.send(publish_error(r.pid, r.pseq, store_error_code(&e), e.to_string()));
                            drop(r.permit);
                        }
                    }
                }
            }),
        );
    }

    /// Record that `entry` is done here (acked, expired, dead-lettered).
    fn finish(&self, entry: &Entry) {
        let mut ops = Vec::new();
        self.ack_ops(entry, &mut ops);
        self.store_acks(ops);
    }

    /// The ops that record `entry` as done, added to `ops` (none for a
    /// transient message or an in-memory queue).
    fn ack_ops(&self, entry: &Entry, ops: &mut Vec<Op>) {
        if !entry.persistent {
            return;
        }
        if let Some(key) = self.store_key() {
            ops.push(Op::Ack { queue: key.to_string(), seq: entry.seq });
            if entry.count_stored {
                ops.push(Op::Redelivered { queue: key.to_string(), seq: entry.seq, count: 0 });
            }
        }
    }

    /// One submission of ack ops (nothing waits for it: an ack lost in a
    /// crash redelivers the message, at-least-once).
    fn store_acks(&self, ops: Vec<Op>) {
        self.store_acks_answering(ops, Vec::new());
    }

    /// Store `ops` (acks) in one submission; answer `receipts` once they
    /// are stored as promised (at once when there is nothing to store).
    fn store_acks_answering(&self, ops: Vec<Op>, receipts: Vec<Receipt>) {
        if ops.is_empty() {
            receipts.into_iter().for_each(Receipt::done);
            return;
        }
        let label = self.label.clone();
        self.writer.submit(
            ops,
            Box::new(move |r| match r {
                Ok(_) => receipts.into_iter().for_each(Receipt::done),
                Err(e) => {
                    tracing::error!(queue = %label, error = %e, "could not store an ack");
                    for r in receipts {
                        let frame = ErrorFrame::new(
                            store_error_code(&e),
                            ErrorContext::Request { req: r.req },
                            format!("ack not stored: {e}"),
                        );
                        let _ = r.reply.send(ServerFrame::Error(frame));
                    }
                }
            }),
        );
    }

    fn push_ready(&mut self, mut entry: Entry, front: bool) {
        if let Some(t) = entry.expires_at_ms() {
            self.with_ttl += 1;
            self.next_expiry = self.next_expiry.min(t);
            self.want_tick();
        }
        // A stored message keeps its body only while the budget has room.
        if entry.persistent && entry.body.is_some() && !entry.charged {
            if self.settings.bodies.take(entry.bytes()) {
                entry.charged = true;
            } else {
                entry.body = None;
            }
        }
        self.ready_bytes += entry.bytes();
        if front {
            self.ready.push_front(entry);
        } else {
            self.ready.push_back(entry);
        }
    }

    fn take_in_flight(&mut self, seq: u64) -> Option<InFlight> {
        let f = self.in_flight.remove(&seq)?;
        take(&mut self.in_flight_bytes, f.entry.bytes());
        Some(f)
    }

    fn pop_ready(&mut self) -> Option<Entry> {
        let mut e = self.ready.pop_front()?;
        if e.expires_at_ms.is_some() {
            self.with_ttl -= 1;
        }
        take(&mut self.ready_bytes, e.bytes());
        self.uncharge(&mut e);
        Some(e)
    }

    /// The entry's body no longer counts in the budget (it leaves `ready`;
    /// a body out for delivery is bounded by the consumers' prefetch).
    fn uncharge(&self, e: &mut Entry) {
        if e.charged {
            self.settings.bodies.give(e.bytes());
            e.charged = false;
        }
    }

    /// The entry's body: in memory, or read back from its record. `None`
    /// (logged): the store could not produce it; the message stays stored
    /// and comes back at the next start.
    fn load_body(&self, e: &mut Entry) -> Option<Arc<StoredMessage>> {
        if let Some(m) = &e.body {
            return Some(m.clone());
        }
        match self.writer.read_message(e.seq) {
            Ok(Some(m)) => {
                e.body = Some(m.clone());
                Some(m)
            }
            Ok(None) => {
                tracing::error!(queue = %self.label, seq = e.seq, "a queued message has no record in the store; skipped");
                None
            }
            Err(err) => {
                tracing::error!(queue = %self.label, seq = e.seq, error = %err, "cannot read a queued message; skipped until the next start");
                None
            }
        }
    }

    fn is_expired(entry: &Entry, now: u64) -> bool {
        entry.expires_at_ms().is_some_and(|t| t <= now)
    }

    /// Hand ready messages to consumers with credit, round robin.
    fn dispatch(&mut self) {
        self.dispatch_to_consumers();
        self.want_tick();
        self.fill.depth.store(self.depth(), Ordering::Relaxed);
        self.fill.bytes.store(self.bytes(), Ordering::Relaxed);
    }

    fn dispatch_to_consumers(&mut self) {
        if self.consumers.is_empty() {
            return;
        }
        let now = now_ms();
        while !self.ready.is_empty() {
            let n = self.consumers.len();
            // A consumer whose connection has a backlog waits: its queue looks again next tick.
            let Some(offset) = (0..n).find(|i| {
                let c = &self.consumers[(self.next_consumer + i) % n];
                c.credit > 0 && !c.out.backed_up()
            }) else {
                return;
            };
            let idx = (self.next_consumer + offset) % n;
            self.next_consumer = (idx + 1) % n;
            let Some(mut entry) = self.pop_ready() else { return };
            if Self::is_expired(&entry, now) {
                tracing::debug!(queue = %self.label, seq = entry.seq, "message expired");
                self.finish(&entry);
                continue;
            }
            let Some(msg) = self.load_body(&mut entry) else { continue };
            let consumer = &mut self.consumers[idx];
            let frame = ServerFrame::Deliver {
                sub_id: consumer.key.1,
                message: Delivered {
                    id: MessageId { epoch: msg.epoch, seq: msg.seq },
                    destination: self.destination.clone(),
                    headers: msg.headers.clone(),
                    payload: msg.payload.clone(),
                    timestamp_ms: msg.timestamp_ms,
                    expires_at_ms: msg.expires_at_ms,
                    persistent: entry.persistent,
                    redelivered: entry.deliveries > 0,
                    delivery_count: entry.deliveries,
                },
            };
            if consumer.out.send(frame).is_err() {
                // The connection is gone; its session will remove the consumer.
                consumer.credit = 0;
                self.push_ready(entry, true);
                continue;
            }
            consumer.credit -= 1;
            entry.deliveries += 1;
            let key = consumer.key;
            self.in_flight_bytes += entry.bytes();
            self.in_flight.insert(entry.seq, InFlight { entry, consumer: key, since: Instant::now() });
        }
    }

    /// A delivery came back unacked: redeliver, or dead-letter past the limit.
    fn requeue(&mut self, mut entry: Entry) {
        match (self.settings.max_redeliveries, &self.dead_letters) {
            (Some(max), Some(_)) if entry.deliveries <= max && entry.persistent => {
                // Kept in the store, so that the count survives a failover.
                if let Some(key) = self.store_key() {
                    let label = self.label.clone();
                    let op = Op::Redelivered { queue: key.to_string(), seq: entry.seq, count: entry.deliveries };
                    self.writer.submit(
                        vec![op],
                        Box::new(move |r| {
                            if let Err(e) = r {
                                tracing::warn!(queue = %label, error = %e, "could not store a delivery count");
                            }
                        }),
                    );
                    entry.count_stored = true;
                }
            }
            _ => {}
        }
        match (self.settings.max_redeliveries, &self.dead_letters) {
            (Some(max), Some(dlq)) if entry.deliveries > max => {
                tracing::info!(queue = %self.label, seq = entry.seq, deliveries = entry.deliveries, "dead-lettering");
                let dlq = dlq.clone();
                self.dead_letter(entry, &dlq);
            }
            _ => self.push_ready(entry, true),
        }
    }

    /// Return a consumer's in-flight deliveries to the front, in sequence order.
    fn return_in_flight(&mut self, key: ConsumerKey) {
        let mut back: Vec<u64> = self.in_flight.iter().filter(|(_, f)| f.consumer == key).map(|(s, _)| *s).collect();
        back.sort_unstable_by(|a, b| b.cmp(a));
        for seq in back {
            if let Some(f) = self.take_in_flight(seq) {
                self.requeue(f.entry);
            }
        }
    }

    /// Whether the tick has work: deliveries that may time out, messages
    /// that may expire, publishes held for room (let go when the node stops),
    /// messages ready for a consumer with credit (its connection is backed
    /// up, and only the tick looks again: without it the message waited for
    /// the next publish; review of issue 10).
    fn needs_tick(&self) -> bool {
        (self.settings.ack_timeout.is_some() && !self.in_flight.is_empty())
            || self.with_ttl > 0
            || !self.held.is_empty()
            || (!self.ready.is_empty() && self.consumers.iter().any(|c| c.credit > 0))
    }

    /// Ask for the tick if it has work and is not running (from code that
    /// has no context: the `Wake` message starts it).
    fn want_tick(&mut self) {
        if self.ticker.is_none() && !self.waking && self.needs_tick() {
            if let Some(me) = &self.me {
                self.waking = true;
                me.do_send(Wake);
            }
        }
    }

    /// Start the tick if there is work for it.
    fn wake(&mut self, ctx: &mut Context<Self>) {
        self.waking = false;
        if self.ticker.is_none() && self.needs_tick() {
            self.ticker = Some(ctx.run_interval(Duration::from_millis(250), |q, ctx| {
                q.tick();
                if !q.needs_tick() {
                    if let Some(h) = q.ticker.take() {
                        ctx.cancel_future(h);
                    }
                }
            }));
        }
    }

    fn tick(&mut self) {
        if let Some(timeout) = self.settings.ack_timeout {
            let expired: Vec<(u64, ConsumerKey)> = self
                .in_flight
                .iter()
                .filter(|(_, f)| f.since.elapsed() >= timeout)
                .map(|(s, f)| (*s, f.consumer))
                .collect();
            for (seq, consumer) in expired {
                if let Some(f) = self.take_in_flight(seq) {
                    tracing::info!(queue = %self.label, seq, "ack timeout; redelivering");
                    // No credit back: the consumer still holds the delivery and
                    // would be over its prefetch if it got another.
                    self.timed_out.insert(seq, consumer);
                    self.requeue(f.entry);
                }
            }
        }
        // The sweep walks the whole queue: only once something may have expired.
        let now = now_ms();
        if self.with_ttl > 0 && self.next_expiry <= now {
            let (keep, gone): (Vec<Entry>, Vec<Entry>) =
                std::mem::take(&mut self.ready).into_iter().partition(|e| !Self::is_expired(e, now));
            self.ready = keep.into();
            self.next_expiry = self.ready.iter().filter_map(Entry::expires_at_ms).min().unwrap_or(u64::MAX);
            self.with_ttl -= gone.len();
            take(&mut self.ready_bytes, gone.iter().map(Entry::bytes).sum());
            let expired = gone.len();
            for mut e in gone {
                self.uncharge(&mut e);
                self.finish(&e);
            }
            if expired > 0 {
                tracing::debug!(queue = %self.label, expired, "expired messages removed");
            }
        }
        self.release_held();
        self.dispatch();
    }
}

impl Actor for Queue {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.me = Some(ctx.address());
        self.wake(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.release_bodies();
    }
}

impl Queue {
    /// Give the budget back for every body `ready` holds (the queue stops or is emptied).
    fn release_bodies(&mut self) {
        let charged: usize = self.ready.iter().filter(|e| e.charged).map(Entry::bytes).sum();
        self.settings.bodies.give(charged);
        for e in self.ready.iter_mut() {
            e.charged = false;
        }
    }
}

/// Start the tick (see `Queue::want_tick`).
#[derive(Message)]
#[rtype(result = "()")]
struct Wake;

impl Handler<Wake> for Queue {
    type Result = ();
    fn handle(&mut self, _: Wake, ctx: &mut Context<Self>) {
        self.wake(ctx);
    }
}

/// A producer's message for this queue.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Publish {
    /// `producer_id` is the one the store keys idempotence by: the client's,
    /// scoped to its user and destination (see `session::scoped_producer`).
    pub message: StoredMessage,
    /// The producer id as the client sent it, for the confirm.
    pub client_producer: u64,
    pub persistent: bool,
    pub reply: Outbound,
    /// Released when the confirm (or error) is sent: bounds a connection's unconfirmed publishes.
    pub permit: Option<OwnedSemaphorePermit>,
    /// When the session received it: the confirm latency metric starts here.
    pub received: Instant,
}

impl Publish {
    /// The client's (producer id, sequence), as its confirm or error names them.
    pub fn ids(&self) -> (u64, u64) {
        (self.client_producer, self.message.producer_seq)
    }
}

/// The code a client acts on: a publish refused because this node stopped
/// serving is to be resent to the new active, not reported as a failure.
/// `NotActive` sends the client to the peer (this node stepped down, or its
/// disk failed in a pair); anything else is the store's failure.
pub fn store_error_code(e: &StoreError) -> ErrorCode {
    if e.retry_elsewhere() {
        ErrorCode::NotActive
    } else {
        ErrorCode::StoreFailed
    }
}

fn publish_error(producer_id: u64, seq: u64, code: ErrorCode, message: String) -> ServerFrame {
    ServerFrame::Error(ErrorFrame::new(code, ErrorContext::Publish { producer_id, seq }, message))
}

/// Where a stored publish's confirm goes once its commit is back.
struct Reply {
    pid: u64,
    pseq: u64,
    reply: Outbound,
    permit: Option<OwnedSemaphorePermit>,
    received: Instant,
}

impl Queue {
    /// `p` if there is room for it now; else refused, or held
    /// (`queue_full = "block"`).
    fn admit(&mut self, p: Publish) -> Option<Publish> {
        let (pid, pseq) = p.ids();
        if self.deleted {
            let _ = p.reply.send(publish_error(
                pid,
                pseq,
                ErrorCode::UnknownDestination,
                format!("{} was deleted", self.label),
            ));
            return None;
        }
        let full = self.full();
        if full.is_some() || !self.held.is_empty() {
            if self.settings.block_when_full {
                if self.held.is_empty() {
                    tracing::info!(queue = %self.label, why = ?full, "queue full; holding publishes");
                }
                self.held.push_back(p);
                self.want_tick();
                return None;
            }
            let why = full.unwrap_or_else(|| format!("{} is full (publishes are waiting for room)", self.label));
            let _ = p.reply.send(publish_error(pid, pseq, ErrorCode::LimitReached, why));
            return None;
        }
        Some(p)
    }
}

impl Handler<Publish> for Queue {
    type Result = ();

    fn handle(&mut self, p: Publish, _: &mut Context<Self>) {
        if let Some(p) = self.admit(p) {
            self.accept(p);
        }
    }
}

/// Publishes for this queue a session read in one go, in their order:
/// those there is room for are stored in one submission (one commit, one
/// completion, one `Committed`), each confirmed on its own.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Publishes(pub Vec<Publish>);

impl Handler<Publishes> for Queue {
    type Result = ();

    fn handle(&mut self, ps: Publishes, _: &mut Context<Self>) {
        let mut stored = Vec::with_capacity(ps.0.len());
        for p in ps.0 {
            if let Some(p) = self.admit(p) {
                self.take(p, &mut stored);
            }
        }
        self.store(stored);
    }
}

/// Publishes this queue submitted are back from the store writer (`messages`
/// empty: they failed and were not confirmed).
#[derive(Message)]
#[rtype(result = "()")]
struct Committed {
    messages: Vec<Arc<StoredMessage>>,
    /// What the submission counted in `pending_bytes`.
    bytes: usize,
    /// What it counted in `pending` (its publishes).
    count: usize,
}

impl Handler<Committed> for Queue {
    type Result = ();
    fn handle(&mut self, c: Committed, _: &mut Context<Self>) {
        self.pending = self.pending.saturating_sub(c.count);
        self.pending_bytes = self.pending_bytes.saturating_sub(c.bytes);
        for m in c.messages {
            self.push_ready(Entry::new(m, true), false);
        }
        self.release_held();
        self.dispatch();
    }
}

/// Messages now durable in this queue (from the writer or a topic's commit).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stored {
    pub messages: Vec<Arc<StoredMessage>>,
}

impl Handler<Stored> for Queue {
    type Result = ();
    fn handle(&mut self, s: Stored, _: &mut Context<Self>) {
        for m in s.messages {
            self.push_ready(Entry::new(m, true), false);
        }
        self.dispatch();
    }
}

/// A message fanned out from a topic to an in-memory subscription (or a
/// non-persistent message to a durable one).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Push {
    pub message: Arc<StoredMessage>,
}

impl Handler<Push> for Queue {
    type Result = ();
    fn handle(&mut self, p: Push, _: &mut Context<Self>) {
        if self.full().is_some() {
            // A subscriber that does not keep up loses messages past the limit
            // instead of growing the broker without bound.
            self.dropped_full += 1;
            if self.dropped_full.is_power_of_two() {
                tracing::warn!(queue = %self.label, dropped = self.dropped_full, "subscription full; dropping messages");
            }
            return;
        }
        self.push_ready(Entry::new(p.message, false), false);
        self.dispatch();
    }
}

/// Add a consumer. The queue answers the client itself (`Subscribed`, or a
/// `LimitReached` error past `max_consumers_per_destination`), so that
/// `Subscribed` goes out before the first delivery.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct AddConsumer {
    pub key: ConsumerKey,
    pub out: Outbound,
    pub prefetch: u32,
}

impl Handler<AddConsumer> for Queue {
    type Result = bool;
    fn handle(&mut self, c: AddConsumer, _: &mut Context<Self>) -> bool {
        if self.deleted {
            let _ = c.out.send(ServerFrame::Error(ErrorFrame::new(
                ErrorCode::UnknownDestination,
                ErrorContext::Subscribe { sub_id: c.key.1 },
                format!("{} was deleted", self.label),
            )));
            return false;
        }
        self.consumers.retain(|x| x.key != c.key);
        let sub_id = c.key.1;
        if self.consumers.len() >= self.settings.max_consumers {
            tracing::warn!(queue = %self.label, limit = self.settings.max_consumers, "consumer limit reached; refusing");
            let _ = c.out.send(ServerFrame::Error(ErrorFrame::new(
                ErrorCode::LimitReached,
                ErrorContext::Subscribe { sub_id },
                format!("{} has {} consumers (max_consumers_per_destination)", self.label, self.settings.max_consumers),
            )));
            return false;
        }
        let _ = c.out.send(ServerFrame::Subscribed { sub_id });
        self.consumers.push(Consumer { key: c.key, out: c.out, credit: c.prefetch.max(1) });
        self.dispatch();
        true
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoveConsumer {
    pub key: ConsumerKey,
}

impl Handler<RemoveConsumer> for Queue {
    type Result = ();
    fn handle(&mut self, c: RemoveConsumer, ctx: &mut Context<Self>) {
        self.consumers.retain(|x| x.key != c.key);
        self.timed_out.retain(|_, k| *k != c.key);
        self.return_in_flight(c.key);
        if self.mode == QueueMode::Memory && self.consumers.is_empty() {
            // An in-memory subscription lives as long as its consumer.
            ctx.stop();
            return;
        }
        self.dispatch();
    }
}

/// A consumer settles a delivery (one of a [`Settles`] batch).
pub struct Settle {
    pub key: ConsumerKey,
    /// The delivered message's id: its epoch as well as its sequence, so
    /// that an ack for a delivery of another history (before a failover
    /// after a split) never settles a different message with the same seq.
    pub id: MessageId,
    pub how: SettleHow,
    /// Answer once settled and stored (an ack with a receipt, protocol 2).
    pub receipt: Option<Receipt>,
}

/// Where to say that a settle is done: `Done { req }` once its ops are
/// stored as the durability mode says, or an error for the request.
pub struct Receipt {
    pub req: u64,
    pub reply: Outbound,
}

impl Receipt {
    /// It settled nothing: the delivery is not (or no longer) this consumer's.
    pub fn refuse(self, why: &str) {
        let message = format!("ack not taken: {why}; the message is delivered again unless acked where it is now");
        let frame = ErrorFrame::new(ErrorCode::InvalidRequest, ErrorContext::Request { req: self.req }, message);
        let _ = self.reply.send(ServerFrame::Error(frame));
    }

    fn done(self) {
        let _ = self.reply.send(ServerFrame::Done { req: self.req });
    }
}

/// What a consumer does with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleHow {
    /// Done: the queue forgets it.
    Ack,
    /// Done with it and with every earlier delivery (lower id) the same
    /// consumer holds: a cumulative ack.
    AckThrough,
    /// Redeliver it (a delivery attempt), at once or after `delay`.
    Nack { delay: Option<Duration> },
    /// Never deliver it again: to the dead-letter queue now if there is
    /// one, else dropped as if acked.
    Terminate,
}

/// The longest a nack may hold a message back (longer asks are cut to it).
pub const MAX_NACK_DELAY: Duration = Duration::from_secs(3600);

/// Settles for this queue a session read in one go: their acks are stored
/// in one submission, and deliveries resume once, after all of them.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Settles(pub Vec<Settle>);

impl Handler<Settles> for Queue {
    type Result = ();
    fn handle(&mut self, s: Settles, ctx: &mut Context<Self>) {
        let mut acks = Vec::new();
        let mut receipts = Vec::new();
        for mut s in s.0 {
            let receipt = s.receipt.take();
            let settled = self.settle(s, &mut acks, ctx);
            match (receipt, settled) {
                (Some(r), true) => receipts.push(r),
                (Some(r), false) => {
                    r.refuse("not a delivery this consumer holds (acked before, timed out or redelivered)")
                }
                (None, _) => {}
            }
        }
        self.store_acks_answering(acks, receipts);
        self.release_held();
        self.dispatch();
    }
}

impl Queue {
    /// Ack (its ops added to `acks`), nack (redeliver, at once or after a
    /// delay) or terminate (dead-letter) a delivery, if it is still the
    /// settling consumer's; deliveries resume after the caller's settles.
    fn settle(&mut self, s: Settle, acks: &mut Vec<Op>, ctx: &mut Context<Self>) -> bool {
        if s.how == SettleHow::AckThrough {
            // Every delivery this consumer holds up to and including `id`, oldest first.
            let mut held: Vec<MessageId> = self
                .in_flight
                .iter()
                .filter(|(_, f)| f.consumer == s.key)
                .filter_map(|(&seq, f)| f.entry.body.as_ref().map(|m| MessageId { epoch: m.epoch, seq }))
                .filter(|held| *held <= s.id)
                .collect();
            held.sort_unstable();
            let mut settled = false;
            for id in held {
                let one = Settle { key: s.key, id, how: SettleHow::Ack, receipt: None };
                settled |= self.settle(one, acks, ctx);
            }
            return settled;
        }
        let seq = s.id.seq;
        // Only the consumer it was delivered to may settle it (a late ack after
        // an ack timeout refers to a delivery that is no longer its own).
        match self.in_flight.get(&seq) {
            Some(f) if f.consumer == s.key && f.entry.body.as_ref().is_some_and(|m| m.epoch == s.id.epoch) => {}
            _ => {
                // A late settle of a timed-out delivery gives its credit back.
                if self.timed_out.get(&seq) == Some(&s.key) {
                    self.timed_out.remove(&seq);
                    if let Some(c) = self.consumers.iter_mut().find(|c| c.key == s.key) {
                        c.credit += 1;
                    }
                    self.dispatch();
                }
                return false;
            }
        }
        let Some(f) = self.take_in_flight(seq) else { return false };
        if let Some(c) = self.consumers.iter_mut().find(|c| c.key == s.key) {
            c.credit += 1;
        }
        match s.how {
            SettleHow::Ack | SettleHow::AckThrough => self.ack_ops(&f.entry, acks),
            SettleHow::Nack { delay: None } => self.requeue(f.entry),
            SettleHow::Nack { delay: Some(delay) } => {
                // Held back, still counted in the depth; in the store all
                // along, so a failover meanwhile redelivers it at once.
                self.delayed += 1;
                self.delayed_bytes += f.entry.bytes();
                ctx.run_later(delay, move |q, _| {
                    q.delayed -= 1;
                    take(&mut q.delayed_bytes, f.entry.bytes());
                    q.requeue(f.entry);
                    q.dispatch();
                });
            }
            SettleHow::Terminate => self.terminate(f.entry, acks),
        }
        true
    }

    /// A consumer gave up on `entry`: dead-letter it now (its ack goes with
    /// the move), or without a dead-letter queue drop it (its ack in `acks`).
    fn terminate(&mut self, entry: Entry, acks: &mut Vec<Op>) {
        let Some(dlq) = self.dead_letters.clone() else {
            tracing::info!(queue = %self.label, seq = entry.seq, "terminated by its consumer; no dead-letter queue: dropped");
            self.ack_ops(&entry, acks);
            return;
        };
        tracing::info!(queue = %self.label, seq = entry.seq, "terminated by its consumer: dead-lettering");
        self.dead_letter(entry, &dlq);
    }

    /// Move `entry` to the dead-letter queue `dlq` (its ack goes with the move).
    fn dead_letter(&mut self, mut entry: Entry, dlq: &Recipient<DeadLetter>) {
        let Some(message) = self.load_body(&mut entry) else { return };
        dlq.do_send(DeadLetter {
            from_key: self.store_key().map(str::to_string),
            from_label: self.label.clone(),
            message,
            persistent: entry.persistent,
            deliveries: entry.deliveries,
        });
    }
}

/// A message that exceeded its redeliveries, for the dead-letter queue.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DeadLetter {
    /// Store key of the queue it leaves (its ack goes in the same commit).
    pub from_key: Option<String>,
    pub from_label: String,
    pub message: Arc<StoredMessage>,
    pub persistent: bool,
    pub deliveries: u32,
}

impl Handler<DeadLetter> for Queue {
    type Result = ();
    fn handle(&mut self, d: DeadLetter, ctx: &mut Context<Self>) {
        let mut copy = (*d.message).clone();
        copy.headers.insert("x-dead-letter-from".into(), d.from_label.clone());
        copy.headers.insert("x-delivery-count".into(), d.deliveries.to_string());
        copy.producer_id = 0;
        copy.expires_at_ms = None;
        match (&self.mode, d.persistent, d.from_key) {
            (QueueMode::Stored { key }, true, Some(from_key)) => {
                let me = ctx.address();
                let label = self.label.clone();
                // Move and ack in one commit: the message is in exactly one of the two queues.
                self.writer.submit(
                    vec![
                        Op::Enqueue { message: copy, queues: vec![key.clone()] },
                        Op::Ack { queue: from_key.clone(), seq: d.message.seq },
                        Op::Redelivered { queue: from_key, seq: d.message.seq, count: 0 },
                    ],
                    Box::new(move |r| match r {
                        Ok(c) => {
                            for op in c.ops {
                                if let Op::Enqueue { message, .. } = op {
                                    me.do_send(Stored { messages: vec![Arc::new(message)] });
                                }
                            }
                        }
                        Err(e) => tracing::error!(queue = %label, error = %e, "could not store a dead letter"),
                    }),
                );
            }
            _ => {
                copy.seq = transient_seq();
                self.push_ready(Entry::new(Arc::new(copy), false), false);
                self.dispatch();
            }
        }
    }
}

/// Depth and consumers, for status.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueStats {
    pub name: String,
    pub depth: usize,
    pub in_flight: usize,
    pub consumers: usize,
}

#[derive(Message)]
#[rtype(result = "QueueStats")]
pub struct GetStats;

impl Handler<GetStats> for Queue {
    type Result = MessageResult<GetStats>;
    fn handle(&mut self, _: GetStats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(QueueStats {
            name: self.label.clone(),
            depth: self.depth(),
            in_flight: self.in_flight.len(),
            consumers: self.consumers.len(),
        })
    }
}

/// Stop the queue. `reason: Some(_)`: the queue was deleted, its consumers
/// are told. `None`: this node stopped serving; the consumers' connections
/// close and their clients re-create them on the new active, so they must
/// not hear that their consumer ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Close {
    pub reason: Option<String>,
}

/// How long a deleted queue keeps answering publishes sent to its old address.
const DELETED_GRACE: Duration = Duration::from_secs(2);

impl Handler<Close> for Queue {
    type Result = ();
    fn handle(&mut self, c: Close, ctx: &mut Context<Self>) {
        let Some(reason) = &c.reason else {
            ctx.stop();
            return;
        };
        for consumer in self.consumers.drain(..) {
            let _ = consumer.out.send(ServerFrame::ConsumerClosed { sub_id: consumer.key.1, reason: reason.clone() });
        }
        // The store forgets its messages with the DeleteQueue op; so do we.
        self.release_bodies();
        self.ready.clear();
        self.in_flight.clear();
        (self.ready_bytes, self.in_flight_bytes) = (0, 0);
        self.timed_out.clear();
        self.deleted = true;
        // Publishes held for room (`queue_full = "block"`) will never get it.
        for p in self.held.drain(..) {
            let (pid, pseq) = p.ids();
            let _ = p.reply.send(publish_error(pid, pseq, ErrorCode::UnknownDestination, reason.clone()));
        }
        ctx.run_later(DELETED_GRACE, |_, ctx| ctx.stop());
    }
}

/// Drop every message waiting in the queue (not those out for delivery).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Purge;

impl Handler<Purge> for Queue {
    type Result = usize;
    fn handle(&mut self, _: Purge, _: &mut Context<Self>) -> usize {
        self.release_bodies();
        let purged: Vec<Entry> = self.ready.drain(..).collect();
        self.ready_bytes = 0;
        for e in &purged {
            self.finish(e);
        }
        self.with_ttl = 0;
        tracing::info!(queue = %self.label, messages = purged.len(), "purged");
        purged.len()
    }
}

/// A message another node stored during a split and this node may lack.
/// Answers `true` once the message is durable here.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Restore {
    pub message: StoredMessage,
}

impl Handler<Restore> for Queue {
    type Result = ResponseFuture<bool>;
    fn handle(&mut self, r: Restore, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let QueueMode::Stored { key } = &self.mode else {
            return Box::pin(async { false });
        };
        let me = ctx.address();
        let label = self.label.clone();
        // Not through the producer's idempotence mark: it only says how far the
        // producer got on this node, and the split may have gone further on the
        // other. A message both sides have arrives twice (at-least-once).
        let mut message = r.message;
        let (epoch, seq) = (message.epoch, message.seq);
        match self.writer.handed_in(epoch, seq, key) {
            Ok(true) => return Box::pin(async { true }), // stored by an earlier hand-over
            Ok(false) => {}
            Err(e) => tracing::warn!(queue = %label, error = %e, "cannot tell whether a handed-over message is stored"),
        }
        message.producer_id = 0;
        self.writer.submit(
            vec![Op::Enqueue { message, queues: vec![key.clone()] }, Op::HandedIn { epoch, seq, queue: key.clone() }],
            Box::new(move |res| match res {
                Ok(c) => {
                    for op in c.ops {
                        if let Op::Enqueue { message, .. } = op {
                            me.do_send(Stored { messages: vec![Arc::new(message)] });
                        }
                    }
                    let _ = tx.send(true);
                }
                Err(e) => {
                    tracing::error!(queue = %label, error = %e, "could not store a message handed over after a split");
                    let _ = tx.send(false);
                }
            }),
        );
        Box::pin(async move { rx.await == Ok(true) })
    }
}
