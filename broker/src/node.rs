//! `Node`: what this broker process is doing right now, and the switch
//! between serving and standing by.
//!
//! Owns the current `Router` (present only while active), the role that
//! connections see, and the admin commands. A single node activates at
//! start. In a pair, the `RoleArbiter` (twinmq-ha) sends `RoleCommand`s:
//! `Activate` promotes the store to a new epoch, recovers the live state
//! from it and starts the destinations; `Deactivate` closes every client
//! connection at once and demotes the store; `Drain` (switchover) does the
//! same after every committed op is confirmed.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::{oneshot, watch};
use twinmq_ha::{ForcePromote, HaStatus, Role, RoleCommand, Switchover};
use twinmq_protocol::{AclGrant, AdminCommand, Destination, ErrorCode, ErrorFrame, Permission};
use twinmq_store::{Op, Recovered, UserRecord, Writer};

use crate::config::Config;
use crate::router::{self, Router};
use crate::security::{self, SecurityDb, StaticUser};
use crate::status::{GatewayStatus, NodeStatus, PairStatus, PeerStatus, StorePosition, StoreStatus};
use crate::Shared;

/// How long a switchover waits for the peer to acknowledge what was committed.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct Node {
    config: Arc<Config>,
    shared: Shared,
    writer: Writer,
    role_tx: watch::Sender<Role>,
    router_tx: watch::Sender<Option<Addr<Router>>>,
    router: Option<Addr<Router>>,
    /// The pair's arbiter and status, when this node is one of a pair.
    pair: Option<(Addr<twinmq_ha::RoleArbiter>, watch::Receiver<HaStatus>)>,
    /// Users from the configuration file (fixed for the process's life).
    statics: Arc<Vec<StaticUser>>,
    /// Stored users as this node knows them: what it committed (active) or
    /// last read from its replicated store (passive). The one owner of user
    /// changes, so concurrent commands cannot lose each other's updates.
    users: BTreeMap<String, UserRecord>,
    /// Every session and connection checks against the latest snapshot.
    security_tx: watch::Sender<Arc<SecurityDb>>,
}

/// What an admin command answers: done, or a listing.
#[derive(Debug)]
pub enum AdminReply {
    Done,
    Json(serde_json::Value),
}

/// An admin command's outcome; errors carry the code the client acts on.
pub type AdminResult = Result<AdminReply, (ErrorCode, String)>;

fn frame_err(e: ErrorFrame) -> (ErrorCode, String) {
    (e.code, e.message)
}

fn user_name_ok(name: &str) -> Result<(), (ErrorCode, String)> {
    if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control() || c.is_whitespace() || c == '/') {
        return Err((
            ErrorCode::InvalidRequest,
            format!("user name `{name}` must be 1-64 bytes without spaces, control characters or `/`"),
        ));
    }
    Ok(())
}

impl Node {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        shared: Shared,
        writer: Writer,
        role_tx: watch::Sender<Role>,
        router_tx: watch::Sender<Option<Addr<Router>>>,
        statics: Arc<Vec<StaticUser>>,
        users: BTreeMap<String, UserRecord>,
        security_tx: watch::Sender<Arc<SecurityDb>>,
    ) -> Node {
        let mut node =
            Node { config, shared, writer, role_tx, router_tx, router: None, pair: None, statics, users, security_tx };
        node.publish_security();
        node
    }

    /// Build the snapshot every connection checks against from `self.users`.
    fn publish_security(&mut self) {
        let db = SecurityDb::build(&self.statics, &self.users, self.users_unknown());
        self.security_tx.send_replace(Arc::new(db));
    }

    /// A pair member whose store never held a complete copy: it cannot know the users.
    fn users_unknown(&self) -> bool {
        self.config.pair.is_some() && !self.writer.stats().held_copy.load(Ordering::Relaxed)
    }

    /// The current rules. A node that does not serve learns user changes only
    /// through replication, so it reads them from its store first.
    fn current_security(&mut self) -> Arc<SecurityDb> {
        // Only from a complete copy: while a snapshot loads, the store holds
        // some or none of the users, and "none" would mean an open broker.
        let stats = self.writer.stats();
        let complete = stats.in_sync.load(Ordering::Relaxed)
            || stats.held_copy.load(Ordering::Relaxed) && !stats.loading.load(Ordering::Relaxed);
        // A copy completed (or this node began to serve) since the last look.
        if self.users_unknown() != self.security_tx.borrow().users_unknown() {
            self.publish_security();
        }
        if !self.shared.role().serves_clients() && complete {
            match self.writer.users() {
                Ok(users) if users != self.users => {
                    self.users = users;
                    self.publish_security();
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "cannot read users from the store; using the last known"),
            }
        }
        self.security_tx.borrow().clone()
    }

    /// Start serving from recovered state.
    pub fn serve(&mut self, recovered: Recovered) {
        self.shared.epoch.store(recovered.epoch, Ordering::Relaxed);
        self.users = recovered.users.clone();
        self.publish_security();
        let router = Router::start(
            self.config.clone(),
            self.shared.clone(),
            self.writer.clone(),
            recovered.queues,
            recovered.messages,
            recovered.deliveries,
            self.pair.as_ref().map(|(_, status)| status.clone()),
        );
        self.router = Some(router.clone());
        self.router_tx.send_replace(Some(router));
        self.role_tx.send_replace(Role::Active);
    }

    /// Stop serving: connections see the role change and close.
    fn stop_serving(&mut self, role: Role) {
        self.role_tx.send_replace(role);
        self.router_tx.send_replace(None);
        if let Some(r) = self.router.take() {
            r.do_send(router::StopAll);
        }
    }
}

impl Actor for Node {
    type Context = Context<Self>;
}

/// Run a writer call that completes through a callback, as a future.
fn writer_call<T: Send + 'static>(
    f: impl FnOnce(Box<dyn FnOnce(Result<T, twinmq_store::StoreError>) + Send>),
) -> impl std::future::Future<Output = Result<T, String>> {
    let (tx, rx) = oneshot::channel();
    f(Box::new(move |r| {
        let _ = tx.send(r);
    }));
    async move {
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("store writer stopped".to_string()),
        }
    }
}

impl Handler<RoleCommand> for Node {
    type Result = ResponseActFuture<Self, Result<(), String>>;

    fn handle(&mut self, cmd: RoleCommand, _: &mut Context<Self>) -> Self::Result {
        match cmd {
            RoleCommand::Activate { at_least, in_sync_gen, how } => {
                let w = self.writer.clone();
                let promote = writer_call(move |done| w.promote(at_least, in_sync_gen, how, done));
                Box::pin(promote.into_actor(self).map(|res, act, _| {
                    let recovered = res?;
                    act.serve(recovered);
                    Ok(())
                }))
            }
            RoleCommand::Deactivate { still_last_active } => {
                self.stop_serving(Role::Passive);
                let w = self.writer.clone();
                Box::pin(
                    writer_call(move |done| w.demote(still_last_active, done))
                        .into_actor(self)
                        .map(|res, _, _| res.map(|_| ())),
                )
            }
            RoleCommand::Drain => {
                self.stop_serving(Role::Passive);
                let w = self.writer.clone();
                let w2 = self.writer.clone();
                let fut = async move {
                    // Everything committed so far is confirmed (replicated: the peer has it).
                    let drained = tokio::time::timeout(DRAIN_LIMIT, writer_call(move |done| w.barrier(done))).await;
                    // Stop writing local ops either way: this node no longer serves.
                    writer_call(move |done| w2.demote(false, done)).await?;
                    match drained {
                        Ok(r) => r.map(|_| ()),
                        Err(_) => Err(format!("the peer did not acknowledge everything within {DRAIN_LIMIT:?}")),
                    }
                };
                Box::pin(fut.into_actor(self))
            }
        }
    }
}

/// Set the pair's handles after it started.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetPair(pub Addr<twinmq_ha::RoleArbiter>, pub watch::Receiver<HaStatus>);

impl Handler<SetPair> for Node {
    type Result = ();
    fn handle(&mut self, m: SetPair, _: &mut Context<Self>) {
        self.pair = Some((m.0, m.1));
    }
}

/// The node's status (answered by active and passive nodes alike).
#[derive(Message)]
#[rtype(result = "NodeStatus")]
pub struct GetNodeStatus;

impl Handler<GetNodeStatus> for Node {
    type Result = ResponseFuture<NodeStatus>;
    fn handle(&mut self, _: GetNodeStatus, _: &mut Context<Self>) -> Self::Result {
        let router = self.router.clone();
        let ha = self.pair.as_ref().map(|(_, s)| s.borrow().clone());
        let stats = self.writer.stats();
        let node_id = self.config.node_id.clone();
        let durability = self.config.durability.to_string();
        let last_op = stats.last_seq.load(Ordering::Relaxed);
        let epoch = stats.epoch.load(Ordering::Relaxed);
        let serving = self.shared.role();
        let connections = self.shared.connections.load(Ordering::Relaxed);
        let store = store_status(stats, &self.shared.disk, self.writer.read_cache());
        let history: Vec<(u64, u64, bool)> = stats.history().iter().map(|e| (e.epoch, e.start, e.forced)).collect();
        Box::pin(async move {
            let destinations = match router {
                Some(r) => r.send(router::GetStatus).await.unwrap_or_default(),
                None => router::Destinations::default(),
            };
            let (role, peer, gateway, pair) = match ha {
                Some(h) => (
                    h.role.to_string(),
                    Some(PeerStatus {
                        node_id: h.peer_id,
                        state: h.peer_state.to_owned(),
                        role: h.peer_role.map(|r| r.to_string()),
                        epoch: h.peer_epoch,
                        last_op: h.peer_last_seq,
                        last_op_epoch: h.peer_last_op_epoch,
                        in_sync: h.peer_in_sync,
                        sees_gateway: h.peer_sees_gateway,
                        last_heard_ms_ago: h.peer_last_heard_ms_ago,
                        connections: h.peer_connections,
                        stomp: h.peer_stomp,
                    }),
                    Some(GatewayStatus { target: h.gateway, reachable: h.gateway_reachable }),
                    Some(PairStatus {
                        in_sync: h.in_sync,
                        sync_lag: h.sync_lag,
                        last_role_reason: h.last_reason.to_owned(),
                        failovers: h.failovers,
                        floor: h.floor,
                        events: h.events.to_vec(),
                    }),
                ),
                None => (serving.to_string(), None, None, None),
            };
            NodeStatus {
                node_id,
                role,
                epoch,
                last_op,
                history,
                durability,
                connections,
                uptime_s: destinations.uptime_s,
                store,
                peer,
                gateway,
                pair,
                queues: destinations.queues,
                topics: destinations.topics,
                queues_total: destinations.queues_total,
                topics_total: destinations.topics_total,
            }
        })
    }
}

/// The store writer's counters and the disk's, for status.
fn store_status(
    s: &twinmq_store::WriterStats,
    disk: &crate::disk::DiskUse,
    cache: &twinmq_store::bodies::BodyCache,
) -> StoreStatus {
    StoreStatus {
        live_batches: s.live_batches.load(Ordering::Relaxed),
        live_bytes: s.live_bytes.load(Ordering::Relaxed),
        live_message_bytes: s.live_weight.load(Ordering::Relaxed),
        compacted_records: s.compacted_records.load(Ordering::Relaxed),
        compacted_bytes: s.compacted_bytes.load(Ordering::Relaxed),
        batches_written: s.batches.load(Ordering::Relaxed),
        ops_written: s.ops.load(Ordering::Relaxed),
        flushes: s.flushes.load(Ordering::Relaxed),
        fsyncs: s.fsyncs.load(Ordering::Relaxed),
        last_flush_us: s.last_flush_us.load(Ordering::Relaxed),
        disk_failure: s.failure(),
        handover_pending: s.handover_pending.load(Ordering::Relaxed),
        loading_snapshot: s.loading.load(Ordering::Relaxed),
        serve_alone: s.serve_alone.load(Ordering::Relaxed),
        peer_last_known: match (s.peer_seen_epoch.load(Ordering::Relaxed), s.peer_seen_last.load(Ordering::Relaxed)) {
            (0, 0) => None,
            (epoch, last_op) => Some(StorePosition { epoch, last_op }),
        },
        last_op_epoch: s.last_op_epoch.load(Ordering::Relaxed),
        disk_bytes: disk.used(),
        disk_free_bytes: disk.free(),
        disk_headroom_bytes: disk.headroom(),
        disk_full: disk.over_limit(),
        refusing_new_messages: disk.full().is_some(),
        read_cache_bytes: cache.bytes() as u64,
        read_cache_hits: cache.hits.load(Ordering::Relaxed),
        read_cache_misses: cache.misses.load(Ordering::Relaxed),
    }
}

/// The rules of the moment (a passive node refreshes them from its store).
#[derive(Message)]
#[rtype(result = "Arc<SecurityDb>")]
pub struct CurrentSecurity;

impl Handler<CurrentSecurity> for Node {
    type Result = MessageResult<CurrentSecurity>;
    fn handle(&mut self, _: CurrentSecurity, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.current_security())
    }
}

/// Who sends an admin command.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A client on an admin connection, authenticated as this user (`None`:
    /// anonymous, only on an open broker); checked against the ACLs.
    User(Option<String>),
    /// The admin HTTP endpoint, which checked its own credential (`http_token`).
    HttpToken,
}

/// An operator command from an admin connection or the HTTP endpoint.
#[derive(Message)]
#[rtype(result = "AdminResult")]
pub struct Admin {
    pub command: AdminCommand,
    pub caller: Caller,
    /// Let a change of destinations, users or ACLs through while the pair is split.
    pub force: bool,
}

impl Node {
    fn router_or_not_active(&self) -> Result<Addr<Router>, (ErrorCode, String)> {
        self.router.clone().ok_or_else(|| {
            (ErrorCode::NotActive, "this node is not active; send this command to the active node".to_string())
        })
    }

    /// Users (static and stored) with their grants.
    fn user_listing(&self, only: Option<&str>) -> serde_json::Value {
        let mut out = Vec::new();
        for s in self.statics.iter() {
            let grants: Vec<String> = s.grants.iter().map(ToString::to_string).collect();
            out.push(serde_json::json!({"name": s.name, "source": "config", "grants": grants}));
        }
        for (name, u) in &self.users {
            if self.statics.iter().any(|s| &s.name == name) {
                continue;
            }
            let grants: Vec<String> = u.grants.iter().map(|g| security::from_store_grant(g).to_string()).collect();
            out.push(serde_json::json!({"name": name, "source": "store", "grants": grants}));
        }
        out.retain(|u| only.is_none_or(|o| u["name"] == o));
        serde_json::json!({ "users": out })
    }

    /// Validate a user or ACL change against the current users; returns the op to store.
    fn user_change(&self, command: &AdminCommand) -> Result<(Op, BTreeMap<String, UserRecord>), (ErrorCode, String)> {
        let invalid = |m: String| (ErrorCode::InvalidRequest, m);
        let mut users = self.users.clone();
        let not_static = |name: &str| {
            if self.statics.iter().any(|s| s.name == name) {
                Err(invalid(format!("user `{name}` is defined in the configuration file; change it there")))
            } else {
                Ok(())
            }
        };
        let existing = |users: &BTreeMap<String, UserRecord>, name: &str| {
            users.get(name).cloned().ok_or_else(|| invalid(format!("no user `{name}`")))
        };
        let check_grant = |g: &AclGrant| security::Pattern::parse(&g.pattern).map(|_| ()).map_err(invalid);
        let op = match command {
            AdminCommand::UserAdd { name, password_hash, grants } => {
                user_name_ok(name)?;
                not_static(name)?;
                if users.contains_key(name) {
                    return Err(invalid(format!("user `{name}` already exists (use `twinmq user passwd`)")));
                }
                crate::auth::valid_hash(password_hash).map_err(invalid)?;
                grants.iter().try_for_each(check_grant)?;
                let mut gs: Vec<_> = grants.iter().map(security::to_store_grant).collect();
                gs.sort();
                gs.dedup();
                let user = UserRecord { password_hash: password_hash.clone(), grants: gs };
                users.insert(name.clone(), user.clone());
                Op::PutUser { name: name.clone(), user }
            }
            AdminCommand::UserPasswd { name, password_hash } => {
                not_static(name)?;
                let mut user = existing(&users, name)?;
                crate::auth::valid_hash(password_hash).map_err(invalid)?;
                user.password_hash = password_hash.clone();
                users.insert(name.clone(), user.clone());
                Op::PutUser { name: name.clone(), user }
            }
            AdminCommand::UserRm { name } => {
                not_static(name)?;
                existing(&users, name)?;
                users.remove(name);
                Op::DeleteUser { name: name.clone() }
            }
            AdminCommand::AclGrant { user: name, grant } => {
                not_static(name)?;
                check_grant(grant)?;
                let mut user = existing(&users, name)?;
                let g = security::to_store_grant(grant);
                if !user.grants.contains(&g) {
                    user.grants.push(g);
                    user.grants.sort();
                }
                users.insert(name.clone(), user.clone());
                Op::PutUser { name: name.clone(), user }
            }
            AdminCommand::AclRevoke { user: name, grant } => {
                not_static(name)?;
                let mut user = existing(&users, name)?;
                let g = security::to_store_grant(grant);
                let before = user.grants.len();
                user.grants.retain(|x| x != &g);
                if user.grants.len() == before {
                    return Err(invalid(format!("user `{name}` has no grant {grant}")));
                }
                users.insert(name.clone(), user.clone());
                Op::PutUser { name: name.clone(), user }
            }
            other => return Err(invalid(format!("{other:?} is not a user change"))),
        };
        // Never leave a broker that has users but nobody who may manage them,
        // nor open a closed broker to anyone by removing its last user.
        let after = SecurityDb::build(&self.statics, &users, false);
        let before = SecurityDb::build(&self.statics, &self.users, false);
        if after.is_open() && !before.is_open() {
            return Err(invalid(
                "refused: removing the last user would open the broker to anyone without credentials".to_string(),
            ));
        }
        if !after.is_open() && !after.has_global_admin() {
            return Err(invalid(
                "refused: afterwards no user would hold admin:# and nobody could manage the broker \
                 (the first user needs --grant admin:#)"
                    .to_string(),
            ));
        }
        Ok((op, users))
    }
}

impl Handler<Admin> for Node {
    type Result = ResponseActFuture<Self, AdminResult>;
    fn handle(&mut self, m: Admin, _: &mut Context<Self>) -> Self::Result {
        let done = |r: AdminResult| -> ResponseActFuture<Self, AdminResult> { Box::pin(fut::ready(r)) };
        let sec = self.current_security();
        let (user, token) = match &m.caller {
            Caller::User(user) => (user.as_deref(), false),
            Caller::HttpToken => (None, true),
        };
        if !token && !sec.still_valid(user) {
            return done(Err((ErrorCode::NotAuthenticated, "this user no longer exists".into())));
        }
        let who = if token { "http-token" } else { user.unwrap_or("anonymous") }.to_string();
        let refuse = |what: String| -> ResponseActFuture<Self, AdminResult> {
            tracing::warn!(user = %who, what, "admin command refused: not authorized");
            Box::pin(fut::ready(Err((ErrorCode::NotAuthorized, format!("user `{who}` may not {what}")))))
        };
        // The HTTP credential stands for admin:# (it only offers switchover).
        let global = token || sec.is_global_admin(user);
        let on = |d: &Destination| token || sec.allows(user, Permission::Admin, d);
        let force = m.force;
        match m.command {
            AdminCommand::Switchover | AdminCommand::Promote { .. } if !global => {
                refuse("change roles (needs admin:#)".into())
            }
            AdminCommand::Switchover | AdminCommand::Promote { .. } => {
                let Some((arbiter, _)) = self.pair.clone() else {
                    return done(Err((ErrorCode::InvalidRequest, "this node is not one of a pair".to_string())));
                };
                let serving = self.shared.role().serves_clients();
                let command = m.command;
                Box::pin(
                    async move {
                        match command {
                            AdminCommand::Switchover if !serving => Err((
                                ErrorCode::NotActive,
                                "this node is not active; send switchover to the active node".into(),
                            )),
                            AdminCommand::Switchover => match arbiter.send(Switchover).await {
                                Ok(Ok(())) => Ok(AdminReply::Done),
                                Ok(Err(e)) => Err((ErrorCode::InvalidRequest, e)),
                                Err(e) => Err((ErrorCode::ShuttingDown, e.to_string())),
                            },
                            AdminCommand::Promote { force: false } => Err((
                                ErrorCode::InvalidRequest,
                                "promote needs force: the operator asserts the peer is dead".into(),
                            )),
                            _ => match arbiter.send(ForcePromote).await {
                                Ok(Ok(())) => Ok(AdminReply::Done),
                                Ok(Err(e)) => Err((ErrorCode::InvalidRequest, e)),
                                Err(e) => Err((ErrorCode::ShuttingDown, e.to_string())),
                            },
                        }
                    }
                    .into_actor(self),
                )
            }
            AdminCommand::UserList | AdminCommand::AclList { .. } if !global => {
                refuse("list users (needs admin:#)".into())
            }
            AdminCommand::UserList => done(Ok(AdminReply::Json(self.user_listing(None)))),
            AdminCommand::AclList { user: only } => done(Ok(AdminReply::Json(self.user_listing(only.as_deref())))),
            cmd @ (AdminCommand::UserAdd { .. }
            | AdminCommand::UserPasswd { .. }
            | AdminCommand::UserRm { .. }
            | AdminCommand::AclGrant { .. }
            | AdminCommand::AclRevoke { .. }) => {
                if !global {
                    return refuse("manage users and ACLs (needs admin:#)".into());
                }
                if !self.shared.role().serves_clients() {
                    return done(Err((
                        ErrorCode::NotActive,
                        "this node is not active; send user and ACL changes to the active node".into(),
                    )));
                }
                let what = cmd.name().to_string();
                let ha = self.pair.as_ref().map(|(_, s)| s.clone());
                if let Err(e) = router::admin_change_allowed(ha.as_ref(), &self.config, &what, force) {
                    return done(Err(frame_err(e)));
                }
                let (op, users) = match self.user_change(&cmd) {
                    Ok(v) => v,
                    Err(e) => return done(Err(e)),
                };
                tracing::info!(user = %who, change = %what, "users and ACLs changed");
                self.users = users;
                let w = self.writer.clone();
                let commit = writer_call(move |done| w.submit(vec![op], done));
                Box::pin(commit.into_actor(self).map(|res, act, _| match res {
                    Ok(_) => {
                        act.publish_security();
                        Ok(AdminReply::Done)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "could not store a user change");
                        if let Ok(users) = act.writer.users() {
                            act.users = users;
                        }
                        act.publish_security();
                        Err((ErrorCode::StoreFailed, e))
                    }
                }))
            }
            AdminCommand::QueueCreate { name } | AdminCommand::QueueRm { name } | AdminCommand::QueuePurge { name }
                if !on(&Destination::queue(name.clone())) =>
            {
                refuse(format!("administer queue:{name}"))
            }
            AdminCommand::TopicRmDurable { topic, .. } if !on(&Destination::topic(topic.clone())) => {
                refuse(format!("administer topic:{topic}"))
            }
            AdminCommand::QueueList | AdminCommand::TopicList | AdminCommand::ListPage { .. }
                if !token && !sec.is_some_admin(user) =>
            {
                refuse("list destinations (needs an admin grant)".into())
            }
            command => {
                let router = match self.router_or_not_active() {
                    Ok(r) => r,
                    Err(e) => return done(Err(e)),
                };
                let gone = |e: MailboxError| (ErrorCode::ShuttingDown, e.to_string());
                let fut = async move {
                    match command {
                        AdminCommand::QueueCreate { name } => {
                            router.send(router::CreateQueue { name, force }).await.map_err(gone)?.map_err(frame_err)?;
                            Ok(AdminReply::Done)
                        }
                        AdminCommand::QueueRm { name } => {
                            router.send(router::DeleteQueue { name, force }).await.map_err(gone)?.map_err(frame_err)?;
                            Ok(AdminReply::Done)
                        }
                        AdminCommand::QueuePurge { name } => {
                            let n = router.send(router::PurgeQueue { name }).await.map_err(gone)?.map_err(frame_err)?;
                            Ok(AdminReply::Json(serde_json::json!({ "purged": n })))
                        }
                        AdminCommand::TopicRmDurable { topic, name } => {
                            router
                                .send(router::DeleteDurable { topic, name, force, by_client: None })
                                .await
                                .map_err(gone)?
                                .map_err(frame_err)?;
                            Ok(AdminReply::Done)
                        }
                        AdminCommand::QueueList => {
                            let first = router::ListDestinations { after: None, limit: router::LIST_PAGE };
                            let all = router.send(first).await.map_err(gone)?;
                            Ok(AdminReply::Json(serde_json::json!({ "queues": all["queues"] })))
                        }
                        AdminCommand::TopicList => {
                            let first = router::ListDestinations { after: None, limit: router::LIST_PAGE };
                            let all = router.send(first).await.map_err(gone)?;
                            Ok(AdminReply::Json(serde_json::json!({ "topics": all["topics"] })))
                        }
                        AdminCommand::ListPage { after, limit } => {
                            let page = router::ListDestinations { after, limit: limit as usize };
                            Ok(AdminReply::Json(router.send(page).await.map_err(gone)?))
                        }
                        other => Err((ErrorCode::InvalidRequest, format!("unexpected command {other:?}"))),
                    }
                };
                Box::pin(fut.into_actor(self))
            }
        }
    }
}

impl Node {
    /// The peer's users and queues from before its history was replaced:
    /// create those this node lacks; where both have one, this node's stays
    /// (it is the history kept). `true` once stored.
    fn restore_divergent_admin(&mut self, admin: twinmq_store::HandoverAdmin) -> ResponseActFuture<Self, bool> {
        let Some(router) = self.router.clone() else {
            tracing::warn!("users and queues handed over while this node is not active; they stay with the peer");
            return Box::pin(fut::ready(false));
        };
        let mut users = Vec::new();
        for (name, user) in admin.users {
            if self.users.contains_key(&name) || self.statics.iter().any(|s| s.name == name) {
                continue;
            }
            tracing::warn!(user = %name, "re-creating a user the peer made and this node's history lacks");
            users.push((name, user));
        }
        let queues = router.send(router::RestoreQueues(admin.queues));
        let ops: Vec<Op> =
            users.iter().map(|(name, user)| Op::PutUser { name: name.clone(), user: user.clone() }).collect();
        let w = self.writer.clone();
        let commit = (!ops.is_empty()).then(|| writer_call(move |done| w.submit(ops, done)));
        let stored = async move {
            let users_ok = match commit {
                Some(commit) => commit.await.is_ok(),
                None => true,
            };
            users_ok && queues.await.unwrap_or(false)
        };
        // Known to the rules only once stored: a failed write is retried, not taken as done.
        Box::pin(stored.into_actor(self).map(move |ok, act, _| {
            if ok {
                act.users.extend(users);
                act.publish_security();
            }
            ok
        }))
    }
}

impl Handler<twinmq_ha::monitor::DivergentMessages> for Node {
    type Result = ResponseActFuture<Self, bool>;
    fn handle(&mut self, m: twinmq_ha::monitor::DivergentMessages, _: &mut Context<Self>) -> Self::Result {
        if !m.admin.is_empty() {
            return self.restore_divergent_admin(m.admin);
        }
        match &self.router {
            Some(r) => {
                let stored = r.send(router::RestoreDivergent(m.messages));
                Box::pin(async move { stored.await.unwrap_or(false) }.into_actor(self))
            }
            None => {
                tracing::warn!(
                    messages = m.messages.len(),
                    "messages handed over after a split arrived while this node is not active; they stay with the peer"
                );
                Box::pin(fut::ready(false))
            }
        }
    }
}

/// Replace the users of the configuration (a reload, `server::apply_reload`):
/// the rules are published again, which closes the connections of a user
/// no longer there and applies changed grants at once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReplaceStaticUsers(pub Arc<Vec<StaticUser>>);

impl Handler<ReplaceStaticUsers> for Node {
    type Result = ();
    fn handle(&mut self, ReplaceStaticUsers(statics): ReplaceStaticUsers, _: &mut Context<Self>) {
        self.statics = statics;
        self.publish_security();
    }
}
