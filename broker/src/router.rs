//! `Router`: the registry of destinations.
//!
//! Owns the map from names to `Queue` and `Topic` actors, creates queues on
//! first use (when `auto_create` is on) by storing a `PutQueue` op, creates
//! and deletes durable subscriptions, routes dead letters to `<queue>.dlq`,
//! and assembles the status report. Sessions ask it once per destination
//! and then talk to the destination actor directly.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::future::join_all;
use twinmq_protocol::{DestKind, Destination, ErrorCode, ErrorContext, ErrorFrame};
use twinmq_store::{MessageRef, Op, QueueEntry, QueueKind, QueueSpec, StoredMessage, Writer};

use crate::config::{validate_name, Config};
use crate::queue::{self, DeadLetter, Queue, QueueMode, QueueSettings, QueueStats};
use crate::status::TopicStatus;
use crate::topic::{self, Topic};
use crate::Shared;

/// Where a session sends a destination's publishes.
#[derive(Clone)]
pub enum Target {
    Queue(Addr<Queue>),
    Topic(Addr<Topic>),
}

fn queue_key(name: &str) -> String {
    format!("q/{name}")
}

fn durable_key(topic: &str, name: &str) -> String {
    format!("d/{topic}/{name}")
}

pub struct Router {
    config: Arc<Config>,
    writer: Writer,
    settings: QueueSettings,
    queues: HashMap<String, Addr<Queue>>,
    durables: HashMap<(String, String), Addr<Queue>>,
    /// Who owns each durable subscription (see `QueueKind::Durable`).
    durable_owners: HashMap<(String, String), Option<String>>,
    topics: HashMap<String, Addr<Topic>>,
    started: Instant,
    /// The pair's view (None for a single node): admin changes wait out a split.
    ha: Option<tokio::sync::watch::Receiver<twinmq_ha::HaStatus>>,
}

impl Router {
    /// Build the registry from what the store recovered.
    pub fn start(
        config: Arc<Config>,
        shared: Shared,
        writer: Writer,
        queues: BTreeMap<String, QueueEntry>,
        mut messages: HashMap<String, Vec<MessageRef>>,
        deliveries: HashMap<(String, u64), u32>,
        ha: Option<tokio::sync::watch::Receiver<twinmq_ha::HaStatus>>,
    ) -> Addr<Router> {
        Router::create(move |ctx| {
            let settings = QueueSettings {
                max_depth: config.max_queue_depth,
                max_bytes: config.max_queue_bytes,
                ack_timeout: config.ack_timeout_ms.map(Duration::from_millis),
                max_redeliveries: Some(config.max_redeliveries),
                max_consumers: config.max_consumers_per_destination,
                block_when_full: config.queue_full == crate::config::QueueFull::Block,
                shutting_down: shared.shutting_down.clone(),
                bodies: Arc::new(crate::queue::BodyBudget::new(config.body_cache_bytes / 2)),
                disk: shared.disk.clone(),
            };
            let mut r = Router {
                config: config.clone(),
                writer,
                settings,
                queues: HashMap::new(),
                durables: HashMap::new(),
                durable_owners: HashMap::new(),
                topics: HashMap::new(),
                started: Instant::now(),
                ha,
            };
            let me = ctx.address();
            for (key, entry) in queues {
                let recovered: Vec<(MessageRef, u32)> = messages
                    .remove(&key)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|m| {
                        let count = deliveries.get(&(key.clone(), m.seq)).copied().unwrap_or(0);
                        (m, count)
                    })
                    .collect();
                let n = recovered.len();
                match entry.spec.kind {
                    QueueKind::Queue => {
                        let name = key.strip_prefix("q/").unwrap_or(&key).to_string();
                        r.spawn_queue(&name, recovered, &me);
                    }
                    QueueKind::Durable { topic, name, owner } => {
                        r.durable_owners.insert((topic.clone(), name.clone()), owner);
                        r.spawn_durable(&topic, &name, recovered, &me);
                    }
                }
                if n > 0 {
                    tracing::info!(queue = %key, messages = n, "recovered");
                }
            }
            for q in &config.queues {
                if !r.queues.contains_key(q) {
                    r.create_queue(q, &me);
                }
            }
            r
        })
    }

    /// A durable subscription with an owner is that user's alone.
    fn check_owner(&self, id: &(String, String), user: Option<&str>) -> Result<(), ErrorFrame> {
        match self.durable_owners.get(id) {
            Some(Some(owner)) if Some(owner.as_str()) != user => {
                tracing::warn!(topic = %id.0, name = %id.1, owner = %owner, user = ?user, "refused: durable subscription of another user");
                Err(ErrorFrame::new(
                    ErrorCode::NotAuthorized,
                    ErrorContext::Connection,
                    format!("durable subscription `{}` on topic:{} belongs to another user", id.1, id.0),
                ))
            }
            _ => Ok(()),
        }
    }

    fn spawn_queue(&mut self, name: &str, recovered: Vec<(MessageRef, u32)>, me: &Addr<Router>) -> Addr<Queue> {
        let is_dlq = name.ends_with(".dlq");
        let settings = QueueSettings {
            max_redeliveries: if is_dlq { None } else { self.settings.max_redeliveries },
            ..self.settings.clone()
        };
        let addr = Queue::new(
            format!("queue:{name}"),
            Destination::queue(name),
            QueueMode::Stored { key: queue_key(name) },
            settings,
            self.writer.clone(),
            (!is_dlq).then(|| me.clone().recipient()),
            recovered,
        )
        .start();
        self.queues.insert(name.to_string(), addr.clone());
        addr
    }

    fn spawn_durable(
        &mut self,
        topic: &str,
        name: &str,
        recovered: Vec<(MessageRef, u32)>,
        me: &Addr<Router>,
    ) -> Addr<Queue> {
        let key = durable_key(topic, name);
        let queue = Queue::new(
            format!("topic:{topic} (durable {name})"),
            Destination::topic(topic),
            QueueMode::Stored { key: key.clone() },
            self.settings.clone(),
            self.writer.clone(),
            Some(me.clone().recipient()),
            recovered,
        );
        let depth = queue.fill();
        let addr = queue.start();
        self.topic(topic).do_send(topic::SetDurable { key, queue: Some((addr.clone(), depth)) });
        self.durables.insert((topic.to_string(), name.to_string()), addr.clone());
        addr
    }

    /// Store the queue's definition and start its actor. The `PutQueue` op is
    /// submitted before any publish can reach the queue, so the writer
    /// stores the definition first.
    fn create_queue(&mut self, name: &str, me: &Addr<Router>) -> Addr<Queue> {
        tracing::info!(queue = %name, "creating queue");
        self.submit_admin(Op::PutQueue { key: queue_key(name), spec: QueueSpec { kind: QueueKind::Queue } });
        self.spawn_queue(name, Vec::new(), me)
    }

    fn submit_admin(&self, op: Op) {
        self.writer.submit(
            vec![op],
            Box::new(|r| {
                if let Err(e) = r {
                    tracing::error!(error = %e, "could not store an admin change");
                }
            }),
        );
    }

    /// See [`admin_change_allowed`]; implicit creations by clients are never forced.
    fn admin_change(&self, what: &str, force: bool) -> Result<(), ErrorFrame> {
        admin_change_allowed(self.ha.as_ref(), &self.config, what, force)
    }

    /// `max_destinations` (queues, topics, durable subscriptions) leaves
    /// room for one more. Dead-letter queues and queues restored after a
    /// split are made past it: dead letters and confirmed messages are never
    /// dropped for want of a name.
    fn room_for_another(&mut self) -> Result<(), ErrorFrame> {
        let max = self.config.max_destinations;
        if self.queues.len() + self.durables.len() + self.topics.len() < max {
            return Ok(());
        }
        // Topics that stopped when idle do not count.
        self.topics.retain(|_, t| t.connected());
        if self.queues.len() + self.durables.len() + self.topics.len() < max {
            return Ok(());
        }
        tracing::warn!(max_destinations = max, "destination limit reached; refusing to create another");
        Err(ErrorFrame::new(
            ErrorCode::LimitReached,
            ErrorContext::Connection,
            format!("this node holds {max} destinations (max_destinations)"),
        ))
    }

    fn topic(&mut self, name: &str) -> Addr<Topic> {
        if let Some(t) = self.topics.get(name).filter(|t| t.connected()) {
            return t.clone();
        }
        let t = Topic::new(name.to_string(), self.writer.clone(), self.settings.clone()).start();
        self.topics.insert(name.to_string(), t.clone());
        t
    }
}

impl Actor for Router {
    type Context = Context<Self>;
}

/// Admin changes (destinations, users, ACLs) are refused while the pair is
/// split, so the two stores never disagree on them (DESIGN.md section 4),
/// unless forced by the operator or `admin_when_split = true`.
pub fn admin_change_allowed(
    ha: Option<&tokio::sync::watch::Receiver<twinmq_ha::HaStatus>>,
    config: &Config,
    what: &str,
    force: bool,
) -> Result<(), ErrorFrame> {
    let split = ha.is_some_and(|h| h.borrow().role == twinmq_ha::Role::ActiveAlone);
    if split && !force && !config.admin_when_split {
        tracing::warn!(what, "admin change refused: the pair is split");
        return Err(ErrorFrame::new(
            ErrorCode::InvalidRequest,
            ErrorContext::Connection,
            format!(
                "{what} refused: the pair is split (peer down); admin changes wait for the peer unless forced (--force) or admin_when_split = true"
            ),
        ));
    }
    Ok(())
}

fn unknown(dest: &Destination) -> ErrorFrame {
    ErrorFrame::new(ErrorCode::UnknownDestination, ErrorContext::Connection, format!("{dest} does not exist"))
}

/// Find (or create) the actor serving `destination`.
#[derive(Message)]
#[rtype(result = "Result<Target, ErrorFrame>")]
pub struct Resolve {
    pub destination: Destination,
}

impl Handler<Resolve> for Router {
    type Result = Result<Target, ErrorFrame>;
    fn handle(&mut self, r: Resolve, ctx: &mut Context<Self>) -> Self::Result {
        let name = &r.destination.name;
        // An existing queue first: the dead-letter queues of durable
        // subscriptions (`topic/name.dlq`) have a name no client may make.
        if let (DestKind::Queue, Some(q)) = (r.destination.kind, self.queues.get(name)) {
            return Ok(Target::Queue(q.clone()));
        }
        // So does a topic of an older name (its durable subscriptions are stored).
        if let (DestKind::Topic, Some(t)) = (r.destination.kind, self.topics.get(name).filter(|t| t.connected())) {
            return Ok(Target::Topic(t.clone()));
        }
        validate_name(name).map_err(|m| ErrorFrame::new(ErrorCode::InvalidRequest, ErrorContext::Connection, m))?;
        match r.destination.kind {
            DestKind::Queue => {
                if !self.config.auto_create {
                    return Err(unknown(&r.destination));
                }
                self.room_for_another()?;
                self.admin_change(&format!("creating queue:{name}"), false)?;
                Ok(Target::Queue(self.create_queue(name, &ctx.address())))
            }
            DestKind::Topic => {
                if !self.topics.get(name).is_some_and(Addr::connected) {
                    self.room_for_another()?;
                }
                Ok(Target::Topic(self.topic(name)))
            }
        }
    }
}

/// Find or create the durable subscription `name` on `topic`.
#[derive(Message)]
#[rtype(result = "Result<Addr<Queue>, ErrorFrame>")]
pub struct OpenDurable {
    /// Who asks: a new subscription is theirs; an existing one must be.
    pub user: Option<String>,
    pub topic: String,
    pub name: String,
}

impl Handler<OpenDurable> for Router {
    type Result = Result<Addr<Queue>, ErrorFrame>;
    fn handle(&mut self, d: OpenDurable, ctx: &mut Context<Self>) -> Self::Result {
        let bad = |m| ErrorFrame::new(ErrorCode::InvalidRequest, ErrorContext::Connection, m);
        let id = (d.topic.clone(), d.name.clone());
        // An existing one first: made before the name alphabet, it keeps working.
        if let Some(q) = self.durables.get(&id) {
            self.check_owner(&id, d.user.as_deref())?;
            return Ok(q.clone());
        }
        validate_name(&d.topic).map_err(bad)?;
        validate_name(&d.name).map_err(bad)?;
        self.room_for_another()?;
        self.admin_change(&format!("creating durable subscription {} on topic:{}", d.name, d.topic), false)?;
        tracing::info!(topic = %d.topic, name = %d.name, owner = ?d.user, "creating durable subscription");
        self.submit_admin(Op::PutQueue {
            key: durable_key(&d.topic, &d.name),
            spec: QueueSpec {
                kind: QueueKind::Durable { topic: d.topic.clone(), name: d.name.clone(), owner: d.user.clone() },
            },
        });
        self.durable_owners.insert(id, d.user);
        Ok(self.spawn_durable(&d.topic, &d.name, Vec::new(), &ctx.address()))
    }
}

/// Delete a durable subscription and what it holds.
#[derive(Message)]
#[rtype(result = "Result<(), ErrorFrame>")]
pub struct DeleteDurable {
    pub topic: String,
    pub name: String,
    pub force: bool,
    /// `Some(user)`: a client deleting it, who must own it; `None`: an operator.
    pub by_client: Option<Option<String>>,
}

impl Handler<DeleteDurable> for Router {
    type Result = Result<(), ErrorFrame>;
    fn handle(&mut self, d: DeleteDurable, _: &mut Context<Self>) -> Self::Result {
        self.admin_change(&format!("deleting durable subscription {} on topic:{}", d.name, d.topic), d.force)?;
        let id = (d.topic.clone(), d.name.clone());
        if let (Some(user), true) = (&d.by_client, self.durables.contains_key(&id)) {
            self.check_owner(&id, user.as_deref())?;
        }
        self.durable_owners.remove(&id);
        let Some(q) = self.durables.remove(&id) else {
            return Err(ErrorFrame::new(
                ErrorCode::UnknownDestination,
                ErrorContext::Connection,
                format!("no durable subscription `{}` on topic:{}", d.name, d.topic),
            ));
        };
        let key = durable_key(&d.topic, &d.name);
        tracing::info!(topic = %d.topic, name = %d.name, "deleting durable subscription");
        self.topic(&d.topic).do_send(topic::SetDurable { key: key.clone(), queue: None });
        self.submit_admin(Op::DeleteQueue { key });
        q.do_send(queue::Close { reason: Some("durable subscription deleted".into()) });
        Ok(())
    }
}

impl Handler<DeadLetter> for Router {
    type Result = ();
    fn handle(&mut self, d: DeadLetter, ctx: &mut Context<Self>) {
        let base = match d.from_key.as_deref().and_then(|k| k.strip_prefix("q/")) {
            Some(name) => name.to_string(),
            // Durable subscription `d/topic/name` -> `topic/name`: a name no
            // client can give a queue, so it never mixes with the dead letters
            // of a queue `topic.name`, and its ACL is the topic's
            // (`SecurityDb::allows`).
            None => d.from_key.as_deref().and_then(|k| k.strip_prefix("d/")).unwrap_or("orphan").to_string(),
        };
        let dlq_name = format!("{base}.dlq");
        let dlq = match self.queues.get(&dlq_name) {
            Some(q) => q.clone(),
            None => self.create_queue(&dlq_name, &ctx.address()),
        };
        dlq.do_send(d);
    }
}

/// An operator creates a queue.
#[derive(Message)]
#[rtype(result = "Result<(), ErrorFrame>")]
pub struct CreateQueue {
    pub name: String,
    pub force: bool,
}

impl Handler<CreateQueue> for Router {
    type Result = Result<(), ErrorFrame>;
    fn handle(&mut self, c: CreateQueue, ctx: &mut Context<Self>) -> Self::Result {
        validate_name(&c.name).map_err(|m| ErrorFrame::new(ErrorCode::InvalidRequest, ErrorContext::Connection, m))?;
        if self.queues.contains_key(&c.name) {
            return Err(ErrorFrame::new(
                ErrorCode::InvalidRequest,
                ErrorContext::Connection,
                format!("queue:{} already exists", c.name),
            ));
        }
        self.room_for_another()?;
        self.admin_change(&format!("creating queue:{}", c.name), c.force)?;
        self.create_queue(&c.name, &ctx.address());
        Ok(())
    }
}

/// An operator deletes a queue and every message it holds.
#[derive(Message)]
#[rtype(result = "Result<(), ErrorFrame>")]
pub struct DeleteQueue {
    pub name: String,
    pub force: bool,
}

impl Handler<DeleteQueue> for Router {
    type Result = Result<(), ErrorFrame>;
    fn handle(&mut self, d: DeleteQueue, _: &mut Context<Self>) -> Self::Result {
        if !self.queues.contains_key(&d.name) {
            return Err(unknown(&Destination::queue(d.name)));
        }
        self.admin_change(&format!("deleting queue:{}", d.name), d.force)?;
        let Some(q) = self.queues.remove(&d.name) else { return Ok(()) };
        tracing::info!(queue = %d.name, "deleting queue");
        self.submit_admin(Op::DeleteQueue { key: queue_key(&d.name) });
        q.do_send(queue::Close { reason: Some(format!("queue:{} was deleted", d.name)) });
        Ok(())
    }
}

/// An operator drops the waiting messages of a queue; answers how many.
#[derive(Message)]
#[rtype(result = "Result<usize, ErrorFrame>")]
pub struct PurgeQueue {
    pub name: String,
}

impl Handler<PurgeQueue> for Router {
    type Result = ResponseFuture<Result<usize, ErrorFrame>>;
    fn handle(&mut self, p: PurgeQueue, _: &mut Context<Self>) -> Self::Result {
        let q = self.queues.get(&p.name).cloned();
        Box::pin(async move {
            let q = q.ok_or_else(|| unknown(&Destination::queue(p.name)))?;
            q.send(queue::Purge)
                .await
                .map_err(|_| ErrorFrame::new(ErrorCode::ShuttingDown, ErrorContext::Connection, "queue stopped"))
        })
    }
}

/// Most destinations of each kind in one listing or status report: a
/// listing of more goes page by page (`after`), so that no reply outgrows a
/// frame (issue 10, finding 10: 100,000 queues made a 36 MB `/status`).
pub const LIST_PAGE: usize = 1000;

/// Queues (durable subscriptions included) with depth and consumers, and
/// topics with their subscribers, for listings: by name, those after
/// `after`, at most `limit` of each kind. The reply says how many there
/// are in all (`queues_total`, `topics_total`) and where the next page
/// starts (`queues_next`, `topics_next`: the last name of this page, when
/// more follow).
#[derive(Message)]
#[rtype(result = "serde_json::Value")]
pub struct ListDestinations {
    pub after: Option<String>,
    pub limit: usize,
}

impl Handler<ListDestinations> for Router {
    type Result = ResponseFuture<serde_json::Value>;
    fn handle(&mut self, l: ListDestinations, _: &mut Context<Self>) -> Self::Result {
        let status = self.status_parts(l.after, l.limit.clamp(1, LIST_PAGE));
        Box::pin(async move { serde_json::to_value(status.await).unwrap_or_default() })
    }
}

/// One page of destinations.
#[derive(serde::Serialize)]
struct Page {
    queues: Vec<QueueStats>,
    topics: Vec<TopicStatus>,
    queues_total: usize,
    topics_total: usize,
    queues_next: Option<String>,
    topics_next: Option<String>,
}

/// The destinations' part of the node's status: the first page of queues
/// and topics, and how long the node has run.
#[derive(Message)]
#[rtype(result = "Destinations")]
pub struct GetStatus;

/// What [`GetStatus`] answers.
#[derive(Debug, Default)]
pub struct Destinations {
    pub queues: Vec<QueueStats>,
    pub topics: Vec<TopicStatus>,
    pub queues_total: usize,
    pub topics_total: usize,
    pub uptime_s: u64,
}

impl Router {
    /// One page of queue and topic statistics (see [`ListDestinations`]),
    /// gathered from their actors.
    fn status_parts(&self, after: Option<String>, limit: usize) -> impl std::future::Future<Output = Page> + 'static {
        fn page<T>(
            mut all: Vec<(String, T)>,
            after: &Option<String>,
            limit: usize,
        ) -> (Vec<(String, T)>, usize, Option<String>) {
            let total = all.len();
            all.sort_by(|a, b| a.0.cmp(&b.0));
            let rest: Vec<(String, T)> =
                all.into_iter().filter(|(k, _)| after.as_ref().is_none_or(|a| k > a)).collect();
            let more = rest.len() > limit;
            let page: Vec<(String, T)> = rest.into_iter().take(limit).collect();
            let next = if more { page.last().map(|(k, _)| k.clone()) } else { None };
            (page, total, next)
        }
        let queues: Vec<(String, Addr<Queue>)> = self
            .queues
            .iter()
            .map(|(k, v)| (format!("queue:{k}"), v.clone()))
            .chain(self.durables.iter().map(|((t, n), v)| (format!("topic:{t} (durable {n})"), v.clone())))
            .collect();
        let topics: Vec<(String, Addr<Topic>)> =
            self.topics.iter().filter(|(_, v)| v.connected()).map(|(k, v)| (format!("topic:{k}"), v.clone())).collect();
        let (queues, queues_total, queues_next) = page(queues, &after, limit);
        let (topics, topics_total, topics_next) = page(topics, &after, limit);
        async move {
            let mut q_stats: Vec<QueueStats> = join_all(queues.iter().map(|(_, q)| q.send(queue::GetStats)))
                .await
                .into_iter()
                .filter_map(Result::ok)
                .collect();
            q_stats.sort_by(|a, b| a.name.cmp(&b.name));
            let mut t_stats = Vec::new();
            for (name, t) in topics {
                if let Ok((subs, durables)) = t.send(topic::TopicStats).await {
                    t_stats.push(TopicStatus { name, subscribers: subs, durable_subscriptions: durables });
                }
            }
            Page { queues: q_stats, topics: t_stats, queues_total, topics_total, queues_next, topics_next }
        }
    }
}

impl Handler<GetStatus> for Router {
    type Result = ResponseFuture<Destinations>;
    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> Self::Result {
        let parts = self.status_parts(None, LIST_PAGE);
        let uptime_s = self.started.elapsed().as_secs();
        Box::pin(async move {
            let page = parts.await;
            Destinations {
                queues: page.queues,
                topics: page.topics,
                queues_total: page.queues_total,
                topics_total: page.topics_total,
                uptime_s,
            }
        })
    }
}

/// The node stopped serving: close every destination and stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopAll;

impl Handler<StopAll> for Router {
    type Result = ();
    fn handle(&mut self, _: StopAll, ctx: &mut Context<Self>) {
        for q in self.queues.values().chain(self.durables.values()) {
            q.do_send(queue::Close { reason: None });
        }
        self.queues.clear();
        self.durables.clear();
        self.topics.clear();
        ctx.stop();
    }
}

/// Queues the peer held before its history was replaced: create those missing.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct RestoreQueues(pub Vec<String>);

impl Handler<RestoreQueues> for Router {
    type Result = bool;
    fn handle(&mut self, m: RestoreQueues, ctx: &mut Context<Self>) -> bool {
        let me = ctx.address();
        for name in m.0 {
            if !self.queues.contains_key(&name) {
                tracing::warn!(queue = %name, "re-creating a queue the peer held and this node's history lacks");
                self.create_queue(&name, &me);
            }
        }
        true
    }
}

/// Messages the peer stored during a split (see twinmq-ha's `DivergentMessages`).
/// `true` once every one is stored, or dropped because its subscription was deleted.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct RestoreDivergent(pub Vec<(String, StoredMessage)>);

impl Handler<RestoreDivergent> for Router {
    type Result = ResponseFuture<bool>;
    fn handle(&mut self, m: RestoreDivergent, ctx: &mut Context<Self>) -> Self::Result {
        let me = ctx.address();
        let mut stored = Vec::with_capacity(m.0.len());
        for (key, message) in m.0 {
            let target = if let Some(name) = key.strip_prefix("q/") {
                Some(match self.queues.get(name) {
                    Some(q) => q.clone(),
                    None => self.create_queue(name, &me),
                })
            } else if let Some((topic, name)) = key.strip_prefix("d/").and_then(|r| r.split_once('/')) {
                self.durables.get(&(topic.to_string(), name.to_string())).cloned()
            } else {
                None
            };
            match target {
                Some(q) => stored.push(q.send(queue::Restore { message })),
                None => {
                    tracing::warn!(queue = %key, "a message handed over after a split names a queue that no longer exists")
                }
            }
        }
        Box::pin(async move {
            let mut all = true;
            for s in stored {
                all &= matches!(s.await, Ok(true));
            }
            all
        })
    }
}
