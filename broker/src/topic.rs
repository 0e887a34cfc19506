//! `Topic`: publish/subscribe fan-out.
//!
//! Owns the topic's subscribers: durable subscriptions (stored queues, one
//! `Queue` actor each, registered by the router) and in-memory subscriptions
//! (a `Queue` actor in memory mode per consumer, created here). A persistent
//! message with durable subscribers is stored once, listing every durable
//! subscription's queue key, and confirmed after that commit; with none it is
//! only fanned out to the in-memory subscribers and confirmed at once, since
//! nothing would keep it.
//!
//! Durable subscriptions are held to `max_queue_depth` too: the topic reads
//! each one's published depth (a gauge the subscription's queue updates after
//! every change) before storing a persistent message, and refuses it
//! (`queue_full = "reject"`) or holds it unconfirmed until every durable
//! subscription has room (`"block"`). The gauge lags by the commits in
//! flight, so a subscription may end up a few messages over the limit.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use twinmq_protocol::{Destination, ErrorContext, ErrorFrame, MessageId, ServerFrame};
use twinmq_store::{Op, StoredMessage, Writer};

use crate::outbound::Outbound;
use crate::queue::{self, AddConsumer, ConsumerKey, Push, Queue, QueueMode, QueueSettings, Stored};
use crate::transient_seq;

pub struct Topic {
    name: String,
    writer: Writer,
    settings: QueueSettings,
    /// Durable subscriptions by store key.
    durables: BTreeMap<String, Addr<Queue>>,
    /// Their depths (see the module doc).
    durable_depths: BTreeMap<String, Arc<queue::Fill>>,
    /// Persistent publishes waiting for room in a durable subscription
    /// (`queue_full = "block"`); each holds its connection's publish permit.
    held: VecDeque<queue::Publish>,
    /// In-memory subscriptions by consumer.
    subscribers: HashMap<ConsumerKey, Addr<Queue>>,
}

impl Topic {
    pub fn new(name: String, writer: Writer, settings: QueueSettings) -> Topic {
        Topic {
            name,
            writer,
            settings,
            durables: BTreeMap::new(),
            durable_depths: BTreeMap::new(),
            held: VecDeque::new(),
            subscribers: HashMap::new(),
        }
    }
}

impl Actor for Topic {
    type Context = Context<Self>;
}

impl Topic {
    /// Why a persistent publish has no room: the node's disk limit, or the
    /// first durable subscription at `max_queue_depth` or `max_queue_bytes`.
    fn full_durable(&self) -> Option<String> {
        if self.durable_depths.is_empty() {
            return None;
        }
        if let Some(disk) = self.settings.disk.full() {
            return Some(format!("topic:{}: {disk}", self.name));
        }
        self.durable_depths.iter().find_map(|(k, f)| {
            let limit = if f.depth.load(Ordering::Relaxed) >= self.settings.max_depth {
                "max_queue_depth"
            } else if f.bytes.load(Ordering::Relaxed) >= self.settings.max_bytes {
                "max_queue_bytes"
            } else {
                return None;
            };
            let name = k.rsplit('/').next().unwrap_or(k);
            Some(format!("durable subscription {name} on topic:{} is full ({limit})", self.name))
        })
    }

    /// Store the held publishes there is room for now; look again shortly if some remain.
    fn release_held(&mut self, ctx: &mut Context<Self>) {
        if self.settings.drop_held() && !self.held.is_empty() {
            tracing::info!(topic = %self.name, held = self.held.len(), "shutting down; held publishes left unconfirmed");
            self.held.clear();
        }
        while !self.held.is_empty() && self.full_durable().is_none() {
            if let Some(p) = self.held.pop_front() {
                if !p.reply.is_closed() {
                    self.publish(p, ctx);
                }
            }
        }
        if !self.held.is_empty() {
            ctx.run_later(Duration::from_millis(20), |t, ctx| t.release_held(ctx));
        }
    }
}

impl Handler<queue::Publish> for Topic {
    type Result = ();

    fn handle(&mut self, p: queue::Publish, ctx: &mut Context<Self>) {
        let (pid, pseq) = p.ids();
        if p.persistent && !self.durables.is_empty() {
            if let Some(why) = self.full_durable() {
                if self.settings.block_when_full {
                    let first = self.held.is_empty();
                    self.held.push_back(p);
                    if first {
                        tracing::info!(topic = %self.name, why = %why, "no room for persistent publishes; holding them");
                        self.release_held(ctx);
                    }
                } else {
                    let _ = p.reply.send(ServerFrame::Error(ErrorFrame::new(
                        twinmq_protocol::ErrorCode::LimitReached,
                        ErrorContext::Publish { producer_id: pid, seq: pseq },
                        why,
                    )));
                }
                return;
            }
            if !self.held.is_empty() {
                // Keep the order: behind those already waiting.
                self.held.push_back(p);
                return;
            }
        }
        self.publish(p, ctx);
    }
}

impl Topic {
    fn publish(&mut self, p: queue::Publish, ctx: &mut Context<Self>) {
        let (pid, pseq) = p.ids();
        if !p.persistent || self.durables.is_empty() {
            let mut m = p.message;
            m.seq = transient_seq();
            let id = MessageId { epoch: m.epoch, seq: m.seq };
            let m = Arc::new(m);
            for d in self.durables.values() {
                d.do_send(Push { message: m.clone() });
            }
            self.fan_out(m);
            let _ = p.reply.confirm(pid, pseq, p.received, Some(id));
            return;
        }
        let keys: Vec<String> = self.durables.keys().cloned().collect();
        let targets: Vec<Addr<Queue>> = self.durables.values().cloned().collect();
        let me = ctx.address();
        let reply = p.reply;
        let permit = p.permit;
        let received = p.received;
        let name = self.name.clone();
        self.writer.submit(
            vec![Op::Enqueue { message: p.message, queues: keys }],
            Box::new(move |r| {
                let _permit = permit;
                let stored = |ops: Vec<Op>| {
                    for op in ops {
                        if let Op::Enqueue { message, .. } = op {
                            let m = Arc::new(message);
                            for t in &targets {
                                t.do_send(Stored { messages: vec![m.clone()] });
                            }
                            me.do_send(FanOut { message: m });
                        }
                    }
                };
                match r {
                    Ok(c) => {
                        let id = c.ops.first().and_then(|op| match op {
                            Op::Enqueue { message, .. } => Some(MessageId { epoch: message.epoch, seq: message.seq }),
                            _ => None,
                        });
                        stored(c.ops);
                        let _ = if c.duplicate {
                            reply.confirm_duplicate(pid, pseq, received)
                        } else {
                            reply.confirm(pid, pseq, received, id)
                        };
                    }
                    Err(e) => {
                        // Written but never confirmed: in the store all the
                        // same (a resend is deduplicated), so in the queues too.
                        if let twinmq_store::StoreError::Unconfirmed { written, .. } = &e {
                            stored(written.ops.clone());
                        }
                        tracing::error!(topic = %name, error = %e, "store failed; publish not confirmed");
                        let _ = reply.send(ServerFrame::Error(ErrorFrame::new(
                            crate::queue::store_error_code(&e),
                            ErrorContext::Publish { producer_id: pid, seq: pseq },
                            e.to_string(),
                        )));
                    }
                }
            }),
        );
    }
}

impl Topic {
    fn fan_out(&mut self, message: Arc<StoredMessage>) {
        self.subscribers.retain(|_, q| q.connected());
        for q in self.subscribers.values() {
            q.do_send(Push { message: message.clone() });
        }
    }
}

/// A stored message to hand to the in-memory subscribers.
#[derive(Message)]
#[rtype(result = "()")]
struct FanOut {
    message: Arc<StoredMessage>,
}

impl Handler<FanOut> for Topic {
    type Result = ();
    fn handle(&mut self, f: FanOut, _: &mut Context<Self>) {
        self.fan_out(f.message);
    }
}

/// Subscribe a consumer without a durable name; returns its queue for acks,
/// or `None` when the topic has `max_consumers_per_destination` subscribers
/// already (the client is told so).
#[derive(Message)]
#[rtype(result = "Option<Addr<Queue>>")]
pub struct Subscribe {
    pub key: ConsumerKey,
    pub out: Outbound,
    pub prefetch: u32,
}

impl Handler<Subscribe> for Topic {
    type Result = MessageResult<Subscribe>;
    fn handle(&mut self, s: Subscribe, _: &mut Context<Self>) -> Self::Result {
        self.subscribers.retain(|_, q| q.connected());
        if self.subscribers.len() >= self.settings.max_consumers {
            tracing::warn!(topic = %self.name, limit = self.settings.max_consumers, "subscriber limit reached; refusing");
            let _ = s.out.send(ServerFrame::Error(ErrorFrame::new(
                twinmq_protocol::ErrorCode::LimitReached,
                ErrorContext::Subscribe { sub_id: s.key.1 },
                format!(
                    "topic:{} has {} subscribers (max_consumers_per_destination)",
                    self.name, self.settings.max_consumers
                ),
            )));
            return MessageResult(None);
        }
        let settings = QueueSettings { max_redeliveries: None, ..self.settings.clone() };
        let q = Queue::new(
            format!("topic:{} (subscriber {}/{})", self.name, s.key.0, s.key.1),
            Destination::topic(self.name.clone()),
            QueueMode::Memory,
            settings,
            self.writer.clone(),
            None,
            Vec::new(),
        )
        .start();
        q.do_send(AddConsumer { key: s.key, out: s.out, prefetch: s.prefetch });
        self.subscribers.insert(s.key, q.clone());
        MessageResult(Some(q))
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    pub key: ConsumerKey,
}

impl Handler<Unsubscribe> for Topic {
    type Result = ();
    fn handle(&mut self, u: Unsubscribe, _: &mut Context<Self>) {
        if let Some(q) = self.subscribers.remove(&u.key) {
            q.do_send(queue::RemoveConsumer { key: u.key });
        }
    }
}

/// Register (or with `queue: None`, remove) a durable subscription.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetDurable {
    pub key: String,
    pub queue: Option<(Addr<Queue>, Arc<queue::Fill>)>,
}

impl Handler<SetDurable> for Topic {
    type Result = ();
    fn handle(&mut self, d: SetDurable, _: &mut Context<Self>) {
        match d.queue {
            Some((q, depth)) => {
                self.durable_depths.insert(d.key.clone(), depth);
                self.durables.insert(d.key, q);
            }
            None => {
                self.durable_depths.remove(&d.key);
                self.durables.remove(&d.key);
            }
        }
    }
}

#[derive(Message)]
#[rtype(result = "(usize, usize)")]
pub struct TopicStats;

impl Handler<TopicStats> for Topic {
    type Result = MessageResult<TopicStats>;
    fn handle(&mut self, _: TopicStats, _: &mut Context<Self>) -> Self::Result {
        MessageResult((self.subscribers.len(), self.durables.len()))
    }
}
