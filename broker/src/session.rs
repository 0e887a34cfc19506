//! `Session`: one authenticated client connection.
//!
//! Owns the connection's subscriptions and its cache of destination actors.
//! Frames arrive from the connection's reader task (`connection.rs`), which
//! waits for each to be handled before reading the next: that is the
//! connection's back-pressure. Replies, confirms and deliveries go to the
//! connection's outbound channel, drained by its writer task; deliveries are
//! bounded by each consumer's prefetch and confirms by the connection's
//! publish permits, so the channel cannot grow without bound.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::watch;
use tokio::sync::OwnedSemaphorePermit;
use twinmq_protocol::{
    ClientFrame, DestKind, Destination, ErrorCode, ErrorContext, ErrorFrame, MessageId, OutMessage, Permission,
    ServerFrame,
};
use twinmq_store::StoredMessage;

use crate::config::Config;
use crate::node::Node;
use crate::now_ms;
use crate::outbound::{Closed, Outbound};
use crate::queue::{self, ConsumerKey, Queue};
use crate::router::{self, Router, Target};
use crate::security::SecurityDb;
use crate::topic::{self, Topic};

/// The producer id the store keys idempotence by: the client's, scoped to
/// its user, so that one user's publishes can never be taken for another
/// user's resends (issue 10, finding 5: user `dyn` reusing user `app`'s
/// producer id got confirms for messages that were never stored), and to
/// the destination: the store keeps one high-water sequence per id, and
/// publishes to different destinations reach it through different actors,
/// in any order (issue 12: one producer id over three queues had messages
/// confirmed as duplicates and never stored). The mapping is an XOR with a
/// hash of the user and destination names: the same on both nodes and
/// across restarts (resends after a failover still match), and the confirm
/// names the client's id again. 0 (no idempotence) stays 0.
pub fn scoped_producer(scope: u64, producer_id: u64) -> u64 {
    if producer_id == 0 {
        return 0;
    }
    producer_id ^ scope
}

/// The key [`scoped_producer`] XORs with: a hash of the user and destination
/// names, made once per destination a session publishes to (not per publish).
pub fn producer_scope(user: Option<&str>, destination: &Destination) -> u64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"twinmq producer scope\0");
    match user {
        Some(u) => h.update(u.as_bytes()),
        None => h.update([0xff]),
    }
    // Kind, then the name, each unambiguous (names never hold a NUL).
    h.update([0, matches!(destination.kind, DestKind::Topic) as u8, 0]);
    h.update(destination.name.as_bytes());
    let d = h.finalize();
    let mut k = [0u8; 8];
    k.copy_from_slice(&d[..8]);
    u64::from_be_bytes(k)
}

struct Subscription {
    /// What the client subscribed to: consume rights are checked against it
    /// again whenever the ACLs change.
    destination: Destination,
    queue: Addr<Queue>,
    /// Set for in-memory topic subscriptions, which the topic owns.
    topic: Option<Addr<Topic>>,
}

/// Add `item` to `queue`'s group (made at its first item; a turn names few queues).
fn add_to<T>(groups: &mut Vec<(Addr<Queue>, Vec<T>)>, queue: Addr<Queue>, item: T) {
    match groups.iter_mut().find(|(q, _)| *q == queue) {
        Some((_, batch)) => batch.push(item),
        None => groups.push((queue, vec![item])),
    }
}

/// Destinations whose [`producer_scope`] a session keeps at most.
const MAX_SCOPES: usize = 1024;

pub struct Session {
    pub id: u64,
    peer: SocketAddr,
    user: Option<String>,
    /// See [`producer_scope`], by destination (cleared past
    /// [`MAX_SCOPES`] entries).
    producer_scopes: HashMap<Destination, u64>,
    out: Outbound,
    router: Addr<Router>,
    node: Addr<Node>,
    config: Arc<Config>,
    targets: HashMap<Destination, Target>,
    /// Publishes to known queues read in this turn, grouped by queue in
    /// arrival order: sent as one `queue::Publishes` each before the turn
    /// ends or waits (see [`Session::send_batched`]).
    publishes: Vec<(Addr<Queue>, Vec<queue::Publish>)>,
    /// Settles read in this turn, likewise grouped by queue.
    settles: Vec<(Addr<Queue>, Vec<queue::Settle>)>,
    subs: HashMap<u32, Subscription>,
    /// Subscribes asked for and not answered yet: they count towards
    /// `max_subscriptions_per_connection` too (a client may pipeline them).
    subscribing: usize,
    /// The users and ACLs of the moment; every operation is checked against them.
    security: watch::Receiver<Arc<SecurityDb>>,
    /// Decisions already taken for this session's user, per destination
    /// (produce, consume), cleared whenever the ACLs change: the publish path
    /// pays one hash lookup, not a pattern match.
    allowed: HashMap<Destination, [Option<bool>; 2]>,
    /// Destinations already refused once (later refusals log at debug, not warn).
    refused_logged: std::collections::HashSet<(Destination, u8)>,
}

/// Most cached ACL decisions (and logged refusals) per session before they are forgotten.
const MAX_CACHED_DECISIONS: usize = 4096;

/// The ACLs changed.
#[derive(Message)]
#[rtype(result = "()")]
struct SecurityChanged;

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        peer: SocketAddr,
        user: Option<String>,
        out: Outbound,
        router: Addr<Router>,
        node: Addr<Node>,
        config: Arc<Config>,
        security: watch::Receiver<Arc<SecurityDb>>,
    ) -> Session {
        Session {
            id,
            peer,
            producer_scopes: HashMap::new(),
            user,
            out,
            router,
            node,
            config,
            targets: HashMap::new(),
            publishes: Vec::new(),
            settles: Vec::new(),
            subs: HashMap::new(),
            subscribing: 0,
            security,
            allowed: HashMap::new(),
            refused_logged: Default::default(),
        }
    }

    /// May this session's user produce to or consume from `dest`, by the current ACLs?
    fn permitted(&mut self, permission: Permission, dest: &Destination) -> bool {
        if self.security.has_changed().unwrap_or(false) {
            self.security.borrow_and_update();
            self.allowed.clear();
            self.refused_logged.clear();
        }
        // A client naming endless destinations must not grow these without bound.
        if self.allowed.len() >= MAX_CACHED_DECISIONS {
            self.allowed.clear();
        }
        if self.refused_logged.len() >= MAX_CACHED_DECISIONS {
            self.refused_logged.clear();
        }
        let slot = match permission {
            Permission::Produce => 0,
            Permission::Consume => 1,
            Permission::Admin => return self.security.borrow().allows(self.user.as_deref(), permission, dest),
        };
        if let Some(ok) = self.allowed.get(dest).and_then(|a| a[slot]) {
            return ok;
        }
        let ok = self.security.borrow().allows(self.user.as_deref(), permission, dest);
        self.allowed.entry(dest.clone()).or_default()[slot] = Some(ok);
        if !ok {
            let first = self.refused_logged.insert((dest.clone(), slot as u8));
            if first {
                tracing::warn!(session = self.id, user = ?self.user, %dest, %permission, "refused: not authorized");
            } else {
                tracing::debug!(session = self.id, user = ?self.user, %dest, %permission, "refused: not authorized");
            }
        }
        ok
    }

    fn not_authorized(&self, permission: Permission, dest: &Destination) -> String {
        format!("user `{}` may not {permission} {dest}", self.user.as_deref().unwrap_or("anonymous"))
    }

    fn send(&self, frame: ServerFrame) {
        // A closed channel means the connection is going away; nothing to do.
        let _ = self.out.send(frame);
    }

    fn error(&self, code: ErrorCode, context: ErrorContext, message: impl Into<String>) {
        self.send(ServerFrame::Error(ErrorFrame::new(code, context, message)));
    }

    fn key(&self, sub_id: u32) -> ConsumerKey {
        (self.id, sub_id)
    }

    fn publish_to(target: &Target, p: queue::Publish) {
        match target {
            Target::Queue(q) => q.do_send(p),
            Target::Topic(t) => t.do_send(p),
        }
    }

    /// Queue `p` for `queue` with the turn's other publishes to it.
    fn batch_publish(&mut self, queue: Addr<Queue>, p: queue::Publish) {
        add_to(&mut self.publishes, queue, p);
    }

    /// Hand each queue the settles and publishes this turn read for it, in
    /// one message each (one store submission for its acks, one for its
    /// publishes). Settles first: an ack read before a publish may be what
    /// makes room for it in a full queue (review: a publish refused with
    /// LimitReached behind the acks that freed the room); one read after a
    /// publish only frees the room a little earlier.
    fn send_batched(&mut self) {
        for (queue, batch) in self.settles.drain(..) {
            queue.do_send(queue::Settles(batch));
        }
        for (queue, batch) in self.publishes.drain(..) {
            queue.do_send(queue::Publishes(batch));
        }
    }

    /// [`producer_scope`] for this session's user and `destination`.
    fn producer_scope(&mut self, destination: &Destination) -> u64 {
        if let Some(&scope) = self.producer_scopes.get(destination) {
            return scope;
        }
        if self.producer_scopes.len() >= MAX_SCOPES {
            self.producer_scopes.clear();
        }
        let scope = producer_scope(self.user.as_deref(), destination);
        self.producer_scopes.insert(destination.clone(), scope);
        scope
    }

    fn handle_publish(
        &mut self,
        producer_id: u64,
        seq: u64,
        destination: Destination,
        message: OutMessage,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Option<ResponseActFuture<Self, ()>> {
        let ctx_err = ErrorContext::Publish { producer_id, seq };
        // The name first: nothing below (ACLs, logs) sees a name outside the
        // alphabet. A destination already resolved was checked then.
        if !self.targets.contains_key(&destination) {
            if let Err(why) = crate::config::validate_destination(&destination) {
                self.error(ErrorCode::InvalidRequest, ctx_err, why);
                return None;
            }
        }
        if !self.permitted(Permission::Produce, &destination) {
            let why = self.not_authorized(Permission::Produce, &destination);
            self.error(ErrorCode::NotAuthorized, ctx_err, why);
            return None;
        }
        // Headers count: a small payload with megabytes of headers is no small message.
        if message.size() > self.config.max_message_bytes || message.headers.len() > twinmq_protocol::MAX_HEADERS {
            self.error(
                ErrorCode::TooLarge,
                ctx_err,
                format!(
                    "message of {} bytes ({} of payload, {} headers) exceeds max_message_bytes {} (headers count, at most {} of them)",
                    message.size(),
                    message.payload.len(),
                    message.headers.len(),
                    self.config.max_message_bytes,
                    twinmq_protocol::MAX_HEADERS
                ),
            );
            return None;
        }
        let now = now_ms();
        let stored = StoredMessage {
            epoch: 0,
            seq: 0,
            origin: destination.to_string(),
            producer_id: scoped_producer(self.producer_scope(&destination), producer_id),
            producer_seq: seq,
            headers: message.headers,
            payload: message.payload,
            timestamp_ms: now,
            expires_at_ms: message.ttl_ms.map(|t| now.saturating_add(t)),
        };
        let p = queue::Publish {
            message: stored,
            client_producer: producer_id,
            persistent: message.persistent,
            reply: self.out.clone(),
            permit,
            received: Instant::now(),
        };
        if let Some(t) = self.targets.get(&destination) {
            let live = match t {
                Target::Queue(q) => q.connected(),
                Target::Topic(t) => t.connected(),
            };
            if live {
                match t {
                    Target::Queue(q) => self.batch_publish(q.clone(), p),
                    Target::Topic(_) => Self::publish_to(t, p),
                }
                return None;
            }
            // Deleted since: resolve the name again.
            self.targets.remove(&destination);
        }
        let resolve = self.router.send(router::Resolve { destination: destination.clone() });
        Some(Box::pin(resolve.into_actor(self).map(move |res, act, _| match res {
            Ok(Ok(target)) => {
                Self::publish_to(&target, p);
                act.targets.insert(destination, target);
            }
            Ok(Err(mut e)) => {
                e.context = ctx_err;
                act.send(ServerFrame::Error(e));
            }
            Err(_) => act.error(ErrorCode::ShuttingDown, ctx_err, "broker is shutting down"),
        })))
    }

    fn handle_subscribe(
        &mut self,
        sub_id: u32,
        destination: Destination,
        durable: Option<String>,
        prefetch: u32,
    ) -> ResponseActFuture<Self, ()> {
        let ctx_err = ErrorContext::Subscribe { sub_id };
        let names = crate::config::validate_destination(&destination).and_then(|()| {
            durable.as_deref().map_or(Ok(()), |n| crate::config::validate_destination(&Destination::topic(n)))
        });
        if let Err(why) = names {
            self.error(ErrorCode::InvalidRequest, ctx_err, why);
            return Box::pin(fut::ready(()));
        }
        if self.subs.contains_key(&sub_id) {
            self.error(ErrorCode::InvalidRequest, ctx_err, format!("subscription id {sub_id} is already in use"));
            return Box::pin(fut::ready(()));
        }
        let limit = self.config.max_subscriptions_per_connection;
        if self.subs.len() + self.subscribing >= limit {
            // Subscriptions whose queue was deleted (the client was told
            // `ConsumerClosed`) hold no place.
            self.subs.retain(|_, s| s.queue.connected());
        }
        if self.subs.len() + self.subscribing >= limit {
            self.error(
                ErrorCode::LimitReached,
                ctx_err,
                format!("this connection holds {limit} subscriptions (max_subscriptions_per_connection)"),
            );
            return Box::pin(fut::ready(()));
        }
        self.subscribing += 1;
        Box::pin(self.subscribe(sub_id, destination, durable, prefetch).map(|(), act, _| act.subscribing -= 1))
    }

    fn subscribe(
        &mut self,
        sub_id: u32,
        destination: Destination,
        durable: Option<String>,
        prefetch: u32,
    ) -> ResponseActFuture<Self, ()> {
        let ctx_err = ErrorContext::Subscribe { sub_id };
        if !self.permitted(Permission::Consume, &destination) {
            let why = self.not_authorized(Permission::Consume, &destination);
            self.error(ErrorCode::NotAuthorized, ctx_err, why);
            return Box::pin(fut::ready(()));
        }
        let subscribed_to = destination.clone();
        let prefetch = prefetch.clamp(1, 65_536);
        let key = self.key(sub_id);
        let out = self.out.clone();
        match (destination.kind, durable) {
            (DestKind::Queue, Some(_)) => {
                self.error(ErrorCode::InvalidRequest, ctx_err, "durable subscriptions are for topics");
                Box::pin(fut::ready(()))
            }
            (DestKind::Topic, Some(name)) => {
                let open = self.router.send(router::OpenDurable {
                    topic: destination.name.clone(),
                    name,
                    user: self.user.clone(),
                });
                Box::pin(open.into_actor(self).then(move |res, act, _| match res {
                    Ok(Ok(q)) => act.attach(sub_id, subscribed_to, q, key, out, prefetch),
                    Ok(Err(mut e)) => {
                        e.context = ctx_err;
                        act.send(ServerFrame::Error(e));
                        Box::pin(fut::ready(()))
                    }
                    Err(_) => {
                        act.error(ErrorCode::ShuttingDown, ctx_err, "broker is shutting down");
                        Box::pin(fut::ready(()))
                    }
                }))
            }
            (_, None) => {
                let resolve = self.router.send(router::Resolve { destination });
                Box::pin(resolve.into_actor(self).then(move |res, act, _| {
                    let fut: ResponseActFuture<Self, ()> = match res {
                        Ok(Ok(Target::Queue(q))) => act.attach(sub_id, subscribed_to, q, key, out, prefetch),
                        Ok(Ok(Target::Topic(t))) => {
                            // The topic's subscriber queue answers Subscribed (or the limit's error).
                            let sub = t.send(topic::Subscribe { key, out: out.clone(), prefetch });
                            Box::pin(sub.into_actor(act).map(move |res, act, _| match res {
                                Ok(Some(q)) => {
                                    let s = Subscription { destination: subscribed_to, queue: q, topic: Some(t) };
                                    act.subs.insert(sub_id, s);
                                    act.recheck_consumer(sub_id);
                                }
                                Ok(None) => {}
                                Err(_) => act.error(ErrorCode::ShuttingDown, ctx_err, "broker is shutting down"),
                            }))
                        }
                        Ok(Err(mut e)) => {
                            e.context = ctx_err;
                            act.send(ServerFrame::Error(e));
                            Box::pin(fut::ready(()))
                        }
                        Err(_) => {
                            act.error(ErrorCode::ShuttingDown, ctx_err, "broker is shutting down");
                            Box::pin(fut::ready(()))
                        }
                    };
                    fut
                }))
            }
        }
    }

    /// Add the consumer to a stored queue; the queue answers `Subscribed`
    /// before its first delivery, or refuses past its consumer limit.
    fn attach(
        &mut self,
        sub_id: u32,
        destination: Destination,
        q: Addr<Queue>,
        key: ConsumerKey,
        out: Outbound,
        prefetch: u32,
    ) -> ResponseActFuture<Self, ()> {
        let add = q.send(queue::AddConsumer { key, out, prefetch });
        Box::pin(add.into_actor(self).map(move |res, act, _| match res {
            Ok(true) => {
                act.subs.insert(sub_id, Subscription { destination, queue: q, topic: None });
                act.recheck_consumer(sub_id);
            }
            Ok(false) => {}
            Err(_) => act.error(ErrorCode::ShuttingDown, ErrorContext::Subscribe { sub_id }, "broker is shutting down"),
        }))
    }

    fn drop_subscription(&mut self, sub_id: u32) -> bool {
        let key = self.key(sub_id);
        match self.subs.remove(&sub_id) {
            Some(Subscription { topic: Some(t), .. }) => {
                t.do_send(topic::Unsubscribe { key });
                true
            }
            Some(Subscription { queue, topic: None, .. }) => {
                queue.do_send(queue::RemoveConsumer { key });
                true
            }
            None => false,
        }
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        tracing::debug!(session = self.id, peer = %self.peer, user = ?self.user, "session started");
        // ACL changes apply to open sessions: re-check consumers at each change.
        let changes = futures_util::stream::unfold(self.security.clone(), |mut rx| async move {
            rx.changed().await.ok()?;
            Some((SecurityChanged, rx))
        });
        ctx.add_message_stream(changes);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        let ids: Vec<u32> = self.subs.keys().copied().collect();
        for id in ids {
            self.drop_subscription(id);
        }
        tracing::debug!(session = self.id, peer = %self.peer, "session ended");
    }
}

/// Frames read from the client in one go (what its socket held), in its
/// order; a publish's permit is held until it is confirmed. The answer comes
/// once every frame is handled: the connection reads on only then.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Incoming {
    pub frames: Vec<(ClientFrame, Option<OwnedSemaphorePermit>)>,
}

impl Handler<Incoming> for Session {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, msg: Incoming, ctx: &mut Context<Self>) -> Self::Result {
        self.handle_frames(msg.frames.into_iter(), ctx)
    }
}

impl Session {
    /// Handle `frames` in order: publishes to known destinations, settles
    /// and pings at once; a frame that must wait (a name to resolve, a
    /// subscription to attach) holds back those after it.
    fn handle_frames(
        &mut self,
        mut frames: std::vec::IntoIter<(ClientFrame, Option<OwnedSemaphorePermit>)>,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, ()> {
        while let Some((frame, permit)) = frames.next() {
            if ctx.state() != ActorState::Running {
                // Stopped by an earlier frame (a second Hello, Bye).
                break;
            }
            if let Some(wait) = self.handle_frame(frame, permit, ctx) {
                // (What was read before the wait goes now: its confirms may
                // be what frees the permits the client waits for.)
                self.send_batched();
                if frames.len() == 0 {
                    return wait;
                }
                return Box::pin(wait.then(move |(), act, ctx| act.handle_frames(frames, ctx)));
            }
        }
        self.send_batched();
        Box::pin(fut::ready(()))
    }

    fn settle(&mut self, sub_id: u32, id: MessageId, how: queue::SettleHow, receipt: Option<u64>) {
        let receipt = receipt.map(|req| queue::Receipt { req, reply: self.out.clone() });
        match self.subs.get(&sub_id) {
            Some(s) => {
                let settle = queue::Settle { key: self.key(sub_id), id, how, receipt };
                add_to(&mut self.settles, s.queue.clone(), settle);
            }
            None => {
                tracing::debug!(session = self.id, sub_id, "settle for an unknown subscription ignored");
                if let Some(r) = receipt {
                    r.refuse("no such subscription on this connection");
                }
            }
        }
    }

    /// Handle one frame: `None` when done, else what to wait for.
    fn handle_frame(
        &mut self,
        frame: ClientFrame,
        permit: Option<OwnedSemaphorePermit>,
        ctx: &mut Context<Self>,
    ) -> Option<ResponseActFuture<Self, ()>> {
        if !matches!(
            frame,
            ClientFrame::Publish { .. }
                | ClientFrame::Ack { .. }
                | ClientFrame::Nack { .. }
                | ClientFrame::Terminate { .. }
                | ClientFrame::Ping { .. }
        ) {
            // Anything else may act on what the gathered frames act on (an
            // unsubscribe takes its consumer's deliveries back): they go first.
            self.send_batched();
        }
        match frame {
            ClientFrame::Publish { producer_id, seq, destination, message } => {
                self.handle_publish(producer_id, seq, destination, message, permit)
            }
            ClientFrame::Ack { sub_id, id, receipt, through } => {
                let how = if through { queue::SettleHow::AckThrough } else { queue::SettleHow::Ack };
                self.settle(sub_id, id, how, receipt);
                None
            }
            ClientFrame::Nack { sub_id, id, delay_ms } => {
                let delay = delay_ms.map(|ms| Duration::from_millis(ms).min(queue::MAX_NACK_DELAY));
                self.settle(sub_id, id, queue::SettleHow::Nack { delay }, None);
                None
            }
            ClientFrame::Terminate { sub_id, id } => {
                self.settle(sub_id, id, queue::SettleHow::Terminate, None);
                None
            }
            ClientFrame::Ping { nonce } => {
                self.send(ServerFrame::Pong { nonce });
                None
            }
            ClientFrame::Subscribe { sub_id, destination, durable, prefetch } => {
                Some(self.handle_subscribe(sub_id, destination, durable, prefetch))
            }
            ClientFrame::Unsubscribe { sub_id } => {
                if !self.drop_subscription(sub_id) {
                    self.error(ErrorCode::InvalidRequest, ErrorContext::Subscribe { sub_id }, "no such subscription");
                }
                None
            }
            ClientFrame::DeleteDurable { req, topic, name } => {
                if let Err(why) =
                    crate::config::validate_name(&topic).and_then(|()| crate::config::validate_name(&name))
                {
                    self.error(ErrorCode::InvalidRequest, ErrorContext::Request { req }, why);
                    return None;
                }
                let dest = Destination::topic(topic.clone());
                if !self.permitted(Permission::Consume, &dest) {
                    let why = self.not_authorized(Permission::Consume, &dest);
                    self.error(ErrorCode::NotAuthorized, ErrorContext::Request { req }, why);
                    return None;
                }
                let del = self.router.send(router::DeleteDurable {
                    topic,
                    name,
                    force: false,
                    by_client: Some(self.user.clone()),
                });
                Some(Box::pin(del.into_actor(self).map(move |res, act, _| match res {
                    Ok(Ok(())) => act.send(ServerFrame::Done { req }),
                    Ok(Err(mut e)) => {
                        e.context = ErrorContext::Request { req };
                        act.send(ServerFrame::Error(e));
                    }
                    Err(_) => act.error(ErrorCode::ShuttingDown, ErrorContext::Request { req }, "shutting down"),
                })))
            }
            ClientFrame::Status { req } => {
                // The status names every destination, user count and peer: operators only.
                if !self.security.borrow().is_some_admin(self.user.as_deref()) {
                    tracing::warn!(session = self.id, user = ?self.user, "refused: status needs an admin grant");
                    let who = self.user.as_deref().unwrap_or("anonymous");
                    let why = format!("user `{who}` may not read the node status (it needs an admin grant)");
                    self.error(ErrorCode::NotAuthorized, ErrorContext::Request { req }, why);
                    return None;
                }
                let st = self.node.send(crate::node::GetNodeStatus);
                Some(Box::pin(st.into_actor(self).map(move |res, act, _| match res {
                    Ok(status) => act.send(ServerFrame::StatusReply { req, json: crate::status::status_json(&status) }),
                    Err(_) => act.error(ErrorCode::ShuttingDown, ErrorContext::Request { req }, "shutting down"),
                })))
            }
            ClientFrame::Hello { .. } => {
                tracing::warn!(session = self.id, peer = %self.peer, "second Hello on a connection");
                self.error(ErrorCode::ProtocolViolation, ErrorContext::Connection, "Hello was already received");
                ctx.stop();
                None
            }
            ClientFrame::Admin { req, .. } => {
                self.error(
                    ErrorCode::InvalidRequest,
                    ErrorContext::Request { req },
                    "admin commands need an admin connection",
                );
                None
            }
            ClientFrame::Bye => {
                ctx.stop();
                None
            }
        }
    }
}

impl Session {
    /// Close the consumer `sub_id` if its user may no longer consume from it
    /// (after an ACL change, or a change that raced its subscribe).
    fn recheck_consumer(&mut self, sub_id: u32) {
        let Some(dest) = self.subs.get(&sub_id).map(|s| s.destination.clone()) else { return };
        if !self.permitted(Permission::Consume, &dest) {
            let reason = self.not_authorized(Permission::Consume, &dest);
            tracing::warn!(session = self.id, user = ?self.user, %dest, "consume right revoked; closing the consumer");
            self.drop_subscription(sub_id);
            self.send(ServerFrame::ConsumerClosed { sub_id, reason });
        }
    }
}

impl Handler<SecurityChanged> for Session {
    type Result = ();
    fn handle(&mut self, _: SecurityChanged, _: &mut Context<Self>) {
        let subs: Vec<u32> = self.subs.keys().copied().collect();
        for sub_id in subs {
            self.recheck_consumer(sub_id);
        }
    }
}

impl Handler<Closed> for Session {
    type Result = ();
    fn handle(&mut self, _: Closed, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
