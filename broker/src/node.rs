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

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::{oneshot, watch};
use twinmq_ha::{ForcePromote, HaStatus, Role, RoleCommand, Switchover};
use twinmq_protocol::AdminCommand;
use twinmq_store::{Recovered, Writer};

use crate::config::Config;
use crate::router::{self, Router};
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
}

impl Node {
    pub fn new(
        config: Arc<Config>,
        shared: Shared,
        writer: Writer,
        role_tx: watch::Sender<Role>,
        router_tx: watch::Sender<Option<Addr<Router>>>,
    ) -> Node {
        Node { config, shared, writer, role_tx, router_tx, router: None, pair: None }
    }

    /// Start serving from recovered state.
    pub fn serve(&mut self, recovered: Recovered) {
        self.shared.epoch.store(recovered.epoch, Ordering::Relaxed);
        let router = Router::start(
            self.config.clone(),
            self.shared.clone(),
            self.writer.clone(),
            recovered.queues,
            recovered.messages,
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
            RoleCommand::Activate { epoch } => {
                let w = self.writer.clone();
                let promote = writer_call(move |done| w.promote(epoch, done));
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

/// The node's status as JSON (answered by active and passive nodes alike).
#[derive(Message)]
#[rtype(result = "serde_json::Value")]
pub struct GetNodeStatus;

impl Handler<GetNodeStatus> for Node {
    type Result = ResponseFuture<serde_json::Value>;
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
        Box::pin(async move {
            let mut status = match router {
                Some(r) => r.send(router::GetStatus).await.unwrap_or_else(|_| serde_json::json!({})),
                None => serde_json::json!({"queues": [], "topics": []}),
            };
            status["node_id"] = node_id.into();
            status["epoch"] = epoch.into();
            status["last_op"] = last_op.into();
            status["durability"] = durability.into();
            status["connections"] = connections.into();
            match ha {
                Some(h) => {
                    status["role"] = h.role.to_string().into();
                    status["in_sync"] = h.in_sync.into();
                    status["sync_lag"] = serde_json::to_value(h.sync_lag).unwrap_or_default();
                    status["peer"] = serde_json::json!({
                        "node_id": h.peer_id,
                        "state": h.peer_state,
                        "role": h.peer_role.map(|r| r.to_string()),
                        "epoch": h.peer_epoch,
                        "last_op": h.peer_last_seq,
                        "in_sync": h.peer_in_sync,
                        "sees_gateway": h.peer_sees_gateway,
                        "last_heard_ms_ago": h.peer_last_heard_ms_ago,
                        "connections": h.peer_connections,
                    });
                    status["gateway"] = serde_json::json!({"target": h.gateway, "reachable": h.gateway_reachable});
                    status["last_role_reason"] = h.last_reason.into();
                    status["failovers"] = h.failovers.into();
                }
                None => {
                    status["role"] = serving.to_string().into();
                    status["peer"] = serde_json::Value::Null;
                    status["gateway"] = serde_json::Value::Null;
                }
            }
            status
        })
    }
}

/// An operator command from an admin connection.
#[derive(Message)]
#[rtype(result = "Result<(), (twinmq_protocol::ErrorCode, String)>")]
pub struct Admin(pub AdminCommand);

impl Handler<Admin> for Node {
    type Result = ResponseFuture<Result<(), (twinmq_protocol::ErrorCode, String)>>;
    fn handle(&mut self, m: Admin, _: &mut Context<Self>) -> Self::Result {
        use twinmq_protocol::ErrorCode;
        let Some((arbiter, _)) = self.pair.clone() else {
            return Box::pin(async { Err((ErrorCode::InvalidRequest, "this node is not one of a pair".to_string())) });
        };
        let serving = self.shared.role().serves_clients();
        match m.0 {
            AdminCommand::Switchover => Box::pin(async move {
                if !serving {
                    return Err((
                        ErrorCode::NotActive,
                        "this node is not active; send switchover to the active node".into(),
                    ));
                }
                match arbiter.send(Switchover).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err((ErrorCode::InvalidRequest, e)),
                    Err(e) => Err((ErrorCode::ShuttingDown, e.to_string())),
                }
            }),
            AdminCommand::Promote { force } => Box::pin(async move {
                if !force {
                    return Err((
                        ErrorCode::InvalidRequest,
                        "promote needs force: the operator asserts the peer is dead".into(),
                    ));
                }
                match arbiter.send(ForcePromote).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err((ErrorCode::InvalidRequest, e)),
                    Err(e) => Err((ErrorCode::ShuttingDown, e.to_string())),
                }
            }),
        }
    }
}

impl Handler<twinmq_ha::monitor::DivergentMessages> for Node {
    type Result = ();
    fn handle(&mut self, m: twinmq_ha::monitor::DivergentMessages, _: &mut Context<Self>) {
        match &self.router {
            Some(r) => r.do_send(router::RestoreDivergent(m.messages)),
            None => tracing::error!(
                messages = m.messages.len(),
                "messages handed over after a split arrived while this node is not active; they stay with the peer"
            ),
        }
    }
}
