//! `Topic`: publish/subscribe fan-out.
//!
//! Owns the topic's subscribers: durable subscriptions (stored queues, one
//! `Queue` actor each, registered by the router) and in-memory subscriptions
//! (a `Queue` actor in memory mode per consumer, created here). A persistent
//! message with durable subscribers is stored once, listing every durable
//! subscription's queue key, and confirmed after that commit; with none it is
//! only fanned out to the in-memory subscribers and confirmed at once, since
//! nothing would keep it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use actix::prelude::*;
use twinmq_protocol::{Destination, ErrorContext, ErrorFrame, ServerFrame};
use twinmq_store::{Op, StoredMessage, Writer};

use crate::queue::{self, AddConsumer, ConsumerKey, Push, Queue, QueueMode, QueueSettings, Stored};
use crate::session::Outbound;
use crate::transient_seq;

pub struct Topic {
    name: String,
    writer: Writer,
    settings: QueueSettings,
    /// Durable subscriptions by store key.
    durables: BTreeMap<String, Addr<Queue>>,
    /// In-memory subscriptions by consumer.
    subscribers: HashMap<ConsumerKey, Addr<Queue>>,
}

impl Topic {
    pub fn new(name: String, writer: Writer, settings: QueueSettings) -> Topic {
        Topic { name, writer, settings, durables: BTreeMap::new(), subscribers: HashMap::new() }
    }
}

impl Actor for Topic {
    type Context = Context<Self>;
}

impl Handler<queue::Publish> for Topic {
    type Result = ();

    fn handle(&mut self, p: queue::Publish, ctx: &mut Context<Self>) {
        let (pid, pseq) = (p.message.producer_id, p.message.producer_seq);
        if !p.persistent || self.durables.is_empty() {
            let mut m = p.message;
            m.seq = transient_seq();
            let m = Arc::new(m);
            for d in self.durables.values() {
                d.do_send(Push { message: m.clone() });
            }
            self.fan_out(m);
            let _ = p.reply.send(ServerFrame::Confirm { producer_id: pid, seq: pseq });
            return;
        }
        let keys: Vec<String> = self.durables.keys().cloned().collect();
        let targets: Vec<Addr<Queue>> = self.durables.values().cloned().collect();
        let me = ctx.address();
        let reply = p.reply;
        let permit = p.permit;
        let name = self.name.clone();
        self.writer.submit(
            vec![Op::Enqueue { message: p.message, queues: keys }],
            Box::new(move |r| {
                let _permit = permit;
                match r {
                    Ok(c) => {
                        for op in c.ops {
                            if let Op::Enqueue { message, .. } = op {
                                let m = Arc::new(message);
                                for t in &targets {
                                    t.do_send(Stored { messages: vec![m.clone()] });
                                }
                                me.do_send(FanOut { message: m });
                            }
                        }
                        let _ = reply.send(ServerFrame::Confirm { producer_id: pid, seq: pseq });
                    }
                    Err(e) => {
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
    pub queue: Option<Addr<Queue>>,
}

impl Handler<SetDurable> for Topic {
    type Result = ();
    fn handle(&mut self, d: SetDurable, _: &mut Context<Self>) {
        match d.queue {
            Some(q) => {
                self.durables.insert(d.key, q);
            }
            None => {
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
