//! `RoleArbiter`: the node's role and epoch, decided by [`crate::decide`].
//!
//! Gathers what the `PeerMonitor` and `WitnessProber` report, ticks on the
//! HA arbiter thread (so a busy broker cannot delay it), calls the pure
//! decision, and carries out its action through the broker (which owns
//! serving) with one transition at a time. Every role change is one INFO
//! line with its reason and what was seen of peer and gateway.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::watch;
use twinmq_store::Writer;

use crate::config::{Failback, HaConfig};
use crate::decide::{decide, Action, Inputs, PeerStatus, PeerView};
use crate::monitor::{PeerMonitor, PeerReport, RoleChanged, SendToPeer, TakeOverRequest};
use crate::wire::{HaFrame, Heartbeat};
use crate::witness::GatewayReport;
use crate::Role;

/// How long a peer's switchover request stays valid.
const TAKEOVER_VALIDITY: Duration = Duration::from_secs(5);

/// What the broker must do for a role change; answered when done.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Result<(), String>")]
pub enum RoleCommand {
    /// Promote the store to `epoch` and start serving.
    Activate { epoch: u64 },
    /// Stop serving at once (close client connections) and demote the store.
    /// `still_last_active`: stepped down for lack of a majority, with nobody
    /// known to have taken over: the cold-start rule may bring it back.
    Deactivate { still_last_active: bool },
    /// Stop serving, wait until every committed op is confirmed (with
    /// `replicated`: acknowledged by the peer), then demote the store.
    Drain,
}

/// The pair as this node sees it, for status and heartbeats.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HaStatus {
    pub role: Role,
    pub epoch: u64,
    pub last_seq: u64,
    pub in_sync: bool,
    pub peer_id: Option<String>,
    /// up | silent | dead
    pub peer_state: &'static str,
    pub peer_role: Option<Role>,
    pub peer_epoch: Option<u64>,
    pub peer_last_seq: Option<u64>,
    /// From the peer's last heartbeat: its store is in sync.
    pub peer_in_sync: Option<bool>,
    /// From the peer's last heartbeat: it sees the gateway.
    pub peer_sees_gateway: Option<bool>,
    pub peer_last_heard_ms_ago: Option<u64>,
    pub peer_connections: usize,
    pub gateway: String,
    pub gateway_reachable: bool,
    /// Active: records the peer has not acknowledged yet.
    pub sync_lag: Option<u64>,
    pub last_reason: &'static str,
    pub failovers: u64,
}

pub struct RoleArbiter {
    cfg: Arc<HaConfig>,
    writer: Writer,
    broker: Recipient<RoleCommand>,
    monitor: Option<Addr<PeerMonitor>>,
    role: Role,
    status_tx: watch::Sender<HaStatus>,
    heartbeat_tx: watch::Sender<Heartbeat>,
    started: Instant,
    peer: Option<PeerReport>,
    gateway: bool,
    last_gateway_ok: Option<Instant>,
    was_last_active: bool,
    holdoff_until: Option<Instant>,
    force_promote: bool,
    switchover: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    takeover: Option<(TakeOverRequest, Instant)>,
    /// A transition is running; decide nothing until it ends.
    busy: bool,
    last_reason: &'static str,
    failovers: u64,
    /// A promotion starts a fresh lease (an operator's forced promotion may
    /// come with neither peer nor gateway heard recently).
    lease_granted_at: Instant,
    last_tick: Instant,
    /// Peer silence is never counted from before this (a stall of this process).
    silence_floor: Instant,
}

impl RoleArbiter {
    pub fn new(
        cfg: Arc<HaConfig>,
        writer: Writer,
        broker: Recipient<RoleCommand>,
        was_last_active: bool,
        status_tx: watch::Sender<HaStatus>,
        heartbeat_tx: watch::Sender<Heartbeat>,
    ) -> RoleArbiter {
        RoleArbiter {
            cfg,
            writer,
            broker,
            monitor: None,
            role: Role::PassiveSyncing,
            status_tx,
            heartbeat_tx,
            started: Instant::now(),
            peer: None,
            gateway: false,
            last_gateway_ok: None,
            was_last_active,
            holdoff_until: None,
            force_promote: false,
            switchover: None,
            takeover: None,
            busy: false,
            last_reason: "starting: a node starts passive",
            failovers: 0,
            lease_granted_at: Instant::now(),
            last_tick: Instant::now(),
            silence_floor: Instant::now(),
        }
    }

    fn ms_since_start(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.started).as_millis() as u64
    }

    fn epoch(&self) -> u64 {
        self.writer.stats().epoch.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn last_seq(&self) -> u64 {
        self.writer.stats().last_seq.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn in_sync(&self) -> bool {
        self.writer.stats().in_sync.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn peer_view(&self, now: Instant) -> PeerView {
        let Some(p) = &self.peer else { return PeerView::Silent { since_ms: self.ms_since_start(self.silence_floor) } };
        if p.dead {
            return PeerView::Dead;
        }
        match (p.last_heard, p.heartbeat) {
            (Some(t), Some(hb)) if now.duration_since(t) < self.cfg.peer_timeout => PeerView::Up(PeerStatus {
                role: hb.role,
                epoch: hb.epoch,
                last_seq: hb.last_seq,
                sees_gateway: hb.sees_gateway,
                in_sync: hb.in_sync,
            }),
            (Some(t), _) => PeerView::Silent { since_ms: self.ms_since_start(t.max(self.silence_floor)) },
            (None, _) => PeerView::Silent { since_ms: self.ms_since_start(self.silence_floor) },
        }
    }

    fn preferred(&self) -> bool {
        match &self.peer {
            Some(PeerReport { peer_priority: Some(pp), peer_id: Some(pid), .. }) => {
                (self.cfg.priority, std::cmp::Reverse(self.cfg.node_id.as_str()))
                    > (*pp, std::cmp::Reverse(pid.as_str()))
            }
            // Without knowing the peer, this node counts as preferred only by its own say.
            _ => true,
        }
    }

    fn publish(&self, now: Instant) {
        let view = self.peer_view(now);
        let stats = self.writer.stats();
        let peer_acked = stats.peer_acked.load(std::sync::atomic::Ordering::Relaxed);
        let hb = Heartbeat {
            role: self.role,
            epoch: self.epoch(),
            last_seq: self.last_seq(),
            sees_gateway: self.gateway,
            in_sync: self.in_sync(),
        };
        self.heartbeat_tx.send_replace(hb);
        let p = self.peer.as_ref();
        let status = HaStatus {
            role: self.role,
            epoch: hb.epoch,
            last_seq: hb.last_seq,
            in_sync: hb.in_sync,
            peer_id: p.and_then(|p| p.peer_id.clone()),
            peer_state: match view {
                PeerView::Up(_) => "up",
                PeerView::Silent { .. } => "silent",
                PeerView::Dead => "dead",
            },
            peer_role: p.and_then(|p| p.heartbeat.map(|h| h.role)),
            peer_epoch: p.and_then(|p| p.heartbeat.map(|h| h.epoch)),
            peer_last_seq: p.and_then(|p| p.heartbeat.map(|h| h.last_seq)),
            peer_in_sync: p.and_then(|p| p.heartbeat.map(|h| h.in_sync)),
            peer_sees_gateway: p.and_then(|p| p.heartbeat.map(|h| h.sees_gateway)),
            peer_last_heard_ms_ago: p.and_then(|p| p.last_heard.map(|t| now.duration_since(t).as_millis() as u64)),
            peer_connections: p.map_or(0, |p| p.connections),
            gateway: self.cfg.gateway.to_string(),
            gateway_reachable: self.gateway,
            sync_lag: self.role.serves_clients().then(|| hb.last_seq.saturating_sub(peer_acked)),
            last_reason: self.last_reason,
            failovers: self.failovers,
        };
        self.status_tx.send_replace(status);
    }

    fn set_role(&mut self, role: Role, reason: &'static str) {
        if role != self.role {
            let peer = match self.peer_view(Instant::now()) {
                PeerView::Up(p) => format!("up ({}, epoch {})", p.role, p.epoch),
                PeerView::Silent { .. } => "silent".to_string(),
                PeerView::Dead => "dead (process gone)".to_string(),
            };
            tracing::info!(
                from = %self.role,
                to = %role,
                epoch = self.epoch(),
                peer = %peer,
                gateway = self.gateway,
                reason,
                "role change"
            );
            if role.serves_clients() && !self.role.serves_clients() {
                self.failovers += 1;
            }
            self.role = role;
            self.last_reason = reason;
            self.publish(Instant::now());
            if let Some(m) = &self.monitor {
                m.do_send(RoleChanged);
            }
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let gap = now.duration_since(self.last_tick);
        self.last_tick = now;
        self.publish(now);
        if self.busy {
            return;
        }
        if gap >= self.cfg.isolation_timeout && !self.role.serves_clients() {
            // A passive that stood still judges nothing on what it saw before:
            // peer silence counts from now and the gateway must answer again.
            tracing::warn!(
                stalled_ms = gap.as_millis() as u64,
                "this process stood still; discarding stale observations"
            );
            self.silence_floor = now;
            self.gateway = false;
            self.takeover = None;
            return;
        }
        if gap >= self.cfg.isolation_timeout && self.role.serves_clients() {
            // This process (or its HA thread) stood still longer than the lease:
            // the peer may have taken over meanwhile. Step down before anything
            // else, without renewing the lease (the writer already refuses).
            tracing::warn!(stalled_ms = gap.as_millis() as u64, "this process was frozen past its lease");
            self.transition(
                RoleCommand::Deactivate { still_last_active: false },
                Role::Passive,
                "frozen past the lease: stepping down",
                ctx,
            );
            return;
        }
        let peer = self.peer_view(now);
        if matches!(peer, PeerView::Up(p) if p.role.serves_clients()) && !self.role.serves_clients() {
            // Someone else serves: this node is not the last active one any more.
            self.was_last_active = false;
        }
        if self.role.serves_clients() && !matches!(peer, PeerView::Up(_)) {
            // The peer is down (not a lost connection): release or fail what waits for it.
            self.writer.peer_down();
        }
        // A switchover from the peer: promote once we hold everything it had.
        if let Some((req, deadline)) = self.takeover {
            if now > deadline {
                tracing::warn!("the peer's switchover request expired before this node caught up");
                self.takeover = None;
            } else if !matches!(peer, PeerView::Up(p) if !p.role.serves_clients() && p.epoch == req.epoch) {
                // Only a handover from a peer that is passive now, in the epoch it handed over.
                tracing::warn!("ignoring a switchover request: the peer is not the passive that sent it");
                self.takeover = None;
            } else if self.last_seq() >= req.last_seq && !self.role.serves_clients() {
                self.takeover = None;
                let epoch = req.epoch.max(self.epoch()) + 1;
                self.transition(
                    RoleCommand::Activate { epoch },
                    Role::Active,
                    "switchover: the peer handed over the role",
                    ctx,
                );
                return;
            }
        }
        let last_heard_peer = self.peer.as_ref().and_then(|p| p.last_heard);
        let last_heard_any = [last_heard_peer, self.last_gateway_ok].into_iter().flatten().max();
        // The lease the writer enforces on its own: valid until isolation_timeout
        // after the last time anyone (peer or gateway) was heard.
        let lease_from = last_heard_any.unwrap_or(self.started).max(self.lease_granted_at);
        self.writer.renew_lease(lease_from + self.cfg.isolation_timeout);
        let inputs = Inputs {
            now_ms: self.ms_since_start(now),
            role: self.role,
            epoch: self.epoch(),
            last_seq: self.last_seq(),
            in_sync: self.in_sync(),
            was_last_active: self.was_last_active,
            preferred: self.preferred(),
            peer,
            gateway: self.gateway,
            gateway_down_ms: if self.gateway {
                0
            } else {
                now.duration_since(self.last_gateway_ok.unwrap_or(self.started)).as_millis() as u64
            },
            last_heard_any_ms: last_heard_any.map_or(0, |t| self.ms_since_start(t)),
            isolation_timeout_ms: self.cfg.isolation_timeout.as_millis() as u64,
            takeover_delay_ms: self.cfg.takeover_delay.as_millis() as u64,
            failback_auto: self.cfg.failback == Failback::Auto,
            holdoff_until_ms: self.holdoff_until.map_or(0, |t| self.ms_since_start(t)),
            force_promote: self.force_promote,
            switchover_requested: self.switchover.is_some(),
        };
        let d = decide(&inputs);
        match d.action {
            Action::Stay => {
                if self.switchover.is_some() && !matches!(peer, PeerView::Up(p) if p.in_sync) {
                    if let Some(tx) = self.switchover.take() {
                        let _ = tx.send(Err("the peer is not up and in sync; no switchover".into()));
                    }
                }
                self.set_role(d.role, d.reason);
            }
            Action::Promote => {
                self.force_promote = false;
                let peer_epoch = match peer {
                    PeerView::Up(p) => p.epoch,
                    _ => 0,
                };
                let epoch = self.epoch().max(peer_epoch) + 1;
                self.transition(RoleCommand::Activate { epoch }, Role::Active, d.reason, ctx);
            }
            Action::StepDown => {
                let still_last_active = d.role == Role::Isolated;
                self.transition(RoleCommand::Deactivate { still_last_active }, d.role, d.reason, ctx)
            }
            Action::HandOver => self.hand_over(d.reason, ctx),
        }
    }

    fn transition(&mut self, cmd: RoleCommand, to: Role, reason: &'static str, ctx: &mut Context<Self>) {
        self.busy = true;
        if matches!(cmd, RoleCommand::Activate { .. }) {
            self.lease_granted_at = Instant::now();
            self.writer.renew_lease(self.lease_granted_at + self.cfg.isolation_timeout);
        } else {
            // The broker stops serving as the command arrives: say so at once.
            self.set_role(to, reason);
        }
        tracing::info!(command = ?cmd, reason, "role transition starting");
        let fut = self.broker.send(cmd);
        ctx.spawn(fut.into_actor(self).map(move |res, act, _| {
            act.busy = false;
            match res {
                Ok(Ok(())) => {
                    // A node that stepped down is no longer the last active one,
                    // unless it only lost its majority (isolated).
                    act.was_last_active =
                        to.serves_clients() || matches!(cmd, RoleCommand::Deactivate { still_last_active: true });
                    act.takeover = None;
                    act.set_role(to, reason);
                }
                Ok(Err(e)) => tracing::error!(command = ?cmd, error = %e, "role transition failed"),
                Err(e) => tracing::error!(command = ?cmd, error = %e, "role transition failed: broker gone"),
            }
        }));
    }

    fn hand_over(&mut self, reason: &'static str, ctx: &mut Context<Self>) {
        self.busy = true;
        tracing::info!(reason, "handing the role over: draining");
        let fut = self.broker.send(RoleCommand::Drain);
        ctx.spawn(fut.into_actor(self).map(move |res, act, _| {
            act.busy = false;
            let result = match res {
                Ok(Ok(())) => {
                    let (epoch, last_seq) = (act.epoch(), act.last_seq());
                    if let Some(m) = &act.monitor {
                        m.do_send(SendToPeer(HaFrame::TakeOver { epoch, last_seq }));
                    }
                    // Leave the peer time to take the role before the both-passive rule
                    // applies; at least as long as the peer keeps the request valid.
                    act.holdoff_until = Some(Instant::now() + (act.cfg.takeover_delay * 2).max(TAKEOVER_VALIDITY));
                    act.was_last_active = false;
                    act.set_role(Role::Passive, reason);
                    Ok(())
                }
                Ok(Err(e)) => Err(e),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = &result {
                // The broker stopped serving before the drain failed: report it.
                tracing::error!(error = %e, "handover failed; this node is passive, the pair will elect");
                act.set_role(Role::Passive, "handover failed");
            }
            if let Some(tx) = act.switchover.take() {
                let _ = tx.send(result);
            }
        }));
    }
}

impl Actor for RoleArbiter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.publish(Instant::now());
        ctx.run_interval(Duration::from_millis(20), |a, ctx| a.tick(ctx));
    }
}

/// The arbiter learns its monitor after both exist.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetMonitor(pub Addr<PeerMonitor>);

impl Handler<SetMonitor> for RoleArbiter {
    type Result = ();
    fn handle(&mut self, m: SetMonitor, _: &mut Context<Self>) {
        self.monitor = Some(m.0);
    }
}

impl Handler<PeerReport> for RoleArbiter {
    type Result = ();
    fn handle(&mut self, r: PeerReport, _: &mut Context<Self>) {
        self.peer = Some(r);
    }
}

impl Handler<GatewayReport> for RoleArbiter {
    type Result = ();
    fn handle(&mut self, r: GatewayReport, _: &mut Context<Self>) {
        self.gateway = r.reachable;
        self.last_gateway_ok = r.last_ok;
    }
}

impl Handler<TakeOverRequest> for RoleArbiter {
    type Result = ();
    fn handle(&mut self, r: TakeOverRequest, _: &mut Context<Self>) {
        tracing::info!(epoch = r.epoch, last_seq = r.last_seq, "the peer asks this node to take over");
        self.takeover = Some((r, Instant::now() + TAKEOVER_VALIDITY));
    }
}

/// Operator: hand the role to the peer (answered when done or refused).
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct Switchover;

impl Handler<Switchover> for RoleArbiter {
    type Result = ResponseFuture<Result<(), String>>;
    fn handle(&mut self, _: Switchover, _: &mut Context<Self>) -> Self::Result {
        if !self.role.serves_clients() {
            return Box::pin(async { Err("this node is not active".to_string()) });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.switchover = Some(tx);
        Box::pin(async move { rx.await.unwrap_or_else(|_| Err("switchover abandoned".into())) })
    }
}

/// Operator: promote this passive node now (`--force`).
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct ForcePromote;

impl Handler<ForcePromote> for RoleArbiter {
    type Result = Result<(), String>;
    fn handle(&mut self, _: ForcePromote, _: &mut Context<Self>) -> Self::Result {
        if self.role.serves_clients() {
            return Err("this node is already active".into());
        }
        tracing::warn!("operator forces promotion");
        self.force_promote = true;
        Ok(())
    }
}
