//! `RoleArbiter`: the node's role and epoch, the actor around [`RoleCore`].
//!
//! It feeds the pure core what the `PeerMonitor`, the `WitnessProber` and
//! the store report, ticks it on the HA arbiter thread (so a busy broker
//! cannot delay it) with the lease clock (`CLOCK_BOOTTIME`), and carries
//! out what it returns: role transitions through the broker (which owns
//! serving), one at a time; store requests through the writer; messages to
//! the peer through the monitor. Every role change is one INFO line with its
//! reason and what was seen of peer and gateway.
//!
//! It also keeps the pair's recent events (`events.rs`): role changes and
//! promotions as the core reports them, switchovers as they are asked for
//! and end, and what successive statuses show (the peer up or down, the
//! gateway found or lost, a failed disk); its own go to the peer as they
//! are recorded, the peer's are merged in.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::watch;
use twinmq_store::clock::lease_now_ms;
use twinmq_store::repl::Promotion;
use twinmq_store::Writer;

use crate::config::{Failback, HaConfig};
use crate::decide::PeerView;
use crate::events::{EventKind, EventRing, PairEvent, EVENT_RING};
use crate::monitor::{PeerMonitor, RoleChanged, SendToPeer, ShareEvents};
use crate::role::{Out, RoleConfig, RoleCore, StoreView};
use crate::wire::{HaFrame, Heartbeat, RoleMsg};
use crate::witness::GatewayReport;
use crate::Role;

/// What the broker must do for a role change; answered when done.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Result<(), String>")]
pub enum RoleCommand {
    /// Promote the store (to an epoch of at least `at_least`; with
    /// `in_sync_gen`, only if still in sync under it) and start serving.
    Activate { at_least: u64, in_sync_gen: Option<u64>, how: Promotion },
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
    /// The highest epoch this node has heard of.
    pub floor: u64,
    pub last_seq: u64,
    pub in_sync: bool,
    pub peer_id: Option<String>,
    /// up | silent | dead
    pub peer_state: &'static str,
    pub peer_role: Option<Role>,
    pub peer_epoch: Option<u64>,
    pub peer_last_seq: Option<u64>,
    /// The epoch of the peer's last op (with `peer_last_seq`, its store's rank).
    pub peer_last_op_epoch: Option<u64>,
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
    /// Why the disk counts as failed, if it does.
    pub disk_failure: Option<String>,
    /// The STOMP address the peer advertises (`HaConfig::advertise_stomp`
    /// on the peer, sent over HA 6): `None` while the peer is not up, when
    /// it advertises nothing, or when it speaks HA 4 or 5.
    pub peer_stomp: Option<String>,
    /// The pair's recent events, this node's and its peer's, oldest first
    /// (`events.rs`).
    #[serde(serialize_with = "events_as_list")]
    pub events: Arc<Vec<PairEvent>>,
}

fn events_as_list<S: serde::Serializer>(events: &Arc<Vec<PairEvent>>, s: S) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(events.as_slice(), s)
}

/// Now, in ms since the Unix epoch (0 on a clock set before it): event
/// times, which operators compare with their own clocks and logs.
fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub struct RoleArbiter {
    cfg: Arc<HaConfig>,
    core: RoleCore,
    writer: Writer,
    broker: Recipient<RoleCommand>,
    monitor: Option<Addr<PeerMonitor>>,
    status_tx: watch::Sender<HaStatus>,
    heartbeat_tx: watch::Sender<Heartbeat>,
    switchover: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    peer_connections: usize,
    /// The peer's store as last told to the writer (kept for operators).
    peer_noted: Option<(u64, u64)>,
    /// What the monitor last reported the peer advertises.
    peer_stomp: Option<String>,
    /// The pair's recent events; `events_shared` is their latest copy, as
    /// the status carries it.
    events: EventRing,
    events_shared: Arc<Vec<PairEvent>>,
    /// How the promotion under way was asked for (a forced one is told apart).
    promoting: Option<Promotion>,
}

impl RoleArbiter {
    pub fn new(
        cfg: Arc<HaConfig>,
        writer: Writer,
        broker: Recipient<RoleCommand>,
        status_tx: watch::Sender<HaStatus>,
        heartbeat_tx: watch::Sender<Heartbeat>,
    ) -> RoleArbiter {
        let ms = |d: Duration| d.as_millis() as u64;
        let core = RoleCore::new(
            RoleConfig {
                node_id: cfg.node_id.clone(),
                priority: cfg.priority,
                heartbeat_ms: ms(cfg.heartbeat),
                peer_timeout_ms: ms(cfg.peer_timeout),
                isolation_timeout_ms: ms(cfg.isolation_timeout),
                takeover_delay_ms: ms(cfg.takeover_delay),
                failback_auto: cfg.failback == Failback::Auto,
                disk_stall_ms: ms(cfg.disk_stall),
            },
            lease_now_ms(),
        );
        RoleArbiter {
            cfg,
            core,
            writer,
            broker,
            monitor: None,
            status_tx,
            heartbeat_tx,
            switchover: None,
            peer_connections: 0,
            peer_noted: None,
            peer_stomp: None,
            events: EventRing::new(EVENT_RING),
            events_shared: Default::default(),
            promoting: None,
        }
    }

    /// Record an event of this node, show it and tell the peer.
    fn record(&mut self, kind: EventKind, reason: &str) {
        let event = PairEvent::new(unix_ms(), &self.cfg.node_id, kind, reason);
        tracing::debug!(?kind, reason = %event.reason, "pair event");
        if let Some(event) = self.events.record(event) {
            self.events_changed();
            if let Some(m) = &self.monitor {
                m.do_send(ShareEvents(vec![event]));
            }
        }
    }

    /// The ring changed: the status shows it at once.
    fn events_changed(&mut self) {
        self.events_shared = Arc::new(self.events.to_vec());
        let events = self.events_shared.clone();
        self.status_tx.send_modify(|s| s.events = events);
    }

    /// What the store says now.
    fn view(&self) -> StoreView {
        view_of(&self.writer)
    }

    fn publish(&mut self, now: u64) {
        let store = self.view();
        let hb = self.core.heartbeat(&store);
        self.heartbeat_tx.send_replace(hb);
        let peer = self.core.peer_heartbeat();
        let peer_view = self.core.peer_view(now);
        let status = HaStatus {
            role: self.core.role(),
            epoch: store.epoch,
            floor: hb.floor,
            last_seq: store.last_seq,
            in_sync: hb.in_sync,
            peer_id: self.core.peer_id().map(str::to_string),
            peer_state: match peer_view {
                PeerView::Up(_) => "up",
                PeerView::Silent { .. } => "silent",
                PeerView::Dead => "dead",
            },
            peer_role: peer.map(|h| h.role),
            peer_epoch: peer.map(|h| h.epoch),
            peer_last_seq: peer.map(|h| h.last_seq),
            peer_last_op_epoch: peer.map(|h| h.last_op_epoch),
            peer_in_sync: peer.map(|h| h.in_sync),
            peer_sees_gateway: peer.map(|h| h.sees_gateway),
            peer_last_heard_ms_ago: self.core.peer_last_heard().map(|t| now.saturating_sub(t)),
            peer_connections: self.peer_connections,
            gateway: self.cfg.gateway.to_string(),
            gateway_reachable: self.core.gateway_reachable(),
            sync_lag: self.core.role().serves_clients().then(|| store.last_seq.saturating_sub(store.follower_acked)),
            last_reason: self.core.last_reason(),
            failovers: self.core.failovers(),
            disk_failure: self.writer.stats().failure(),
            peer_stomp: if matches!(peer_view, PeerView::Up(_)) { self.peer_stomp.clone() } else { None },
            events: self.events_shared.clone(),
        };
        let changes = crate::events::changes(&self.status_tx.borrow(), &status);
        self.status_tx.send_replace(status);
        for (kind, reason) in changes {
            self.record(kind, &reason);
        }
    }

    /// Carry out what the core asked for.
    fn perform(&mut self, outs: Vec<Out>, ctx: &mut Context<Self>) {
        for o in outs {
            match o {
                Out::Activate { at_least, in_sync_gen, how } => {
                    self.promoting = Some(how);
                    self.command(RoleCommand::Activate { at_least, in_sync_gen, how }, ctx)
                }
                Out::Deactivate { still_last_active } => {
                    self.command(RoleCommand::Deactivate { still_last_active }, ctx)
                }
                Out::Drain => self.command(RoleCommand::Drain, ctx),
                Out::Send(m) => self.to_peer(m),
                Out::RaiseFloor(e) => self.writer.raise_floor(e, None),
                Out::GrantVote(epoch) => {
                    tracing::info!(epoch, "vote granted: this node promotes at or below that epoch no more");
                    // The grant goes out only once this node's promise is durable.
                    let monitor = self.monitor.clone();
                    self.writer.raise_floor(
                        epoch,
                        Some(Box::new(move |r| {
                            let granted = r.is_ok();
                            if let Some(m) = monitor {
                                m.do_send(SendToPeer(HaFrame::Role(RoleMsg::VoteReply { epoch, granted })));
                            }
                        })),
                    );
                }
                Out::PeerDown { alone } => self.writer.peer_down(alone),
                Out::ExpireInSync => self.writer.expire_in_sync(),
                Out::PrimaryHolds { gen, holds } => self.writer.primary_holds(gen, holds),
                Out::PeerPosition { epoch, serving } => self.writer.peer_position(epoch, serving),
                Out::ReaffirmInSync => self.writer.reaffirm_in_sync(),
                Out::PeerFailed => self.writer.peer_failed(),
                Out::Lease { until } => self.writer.set_lease(until),
                Out::DiskFailed(reason) => {
                    tracing::error!(reason = %reason, "the disk counts as failed: this node confirms nothing more");
                    self.writer.disk_failed(&reason);
                }
                Out::RoleChanged { from, to, reason } => {
                    let peer = match self.core.peer_view(lease_now_ms()) {
                        PeerView::Up(p) => format!("up ({}, epoch {})", p.role, p.epoch),
                        PeerView::Silent { .. } => "silent".to_string(),
                        PeerView::Dead => "dead (process gone)".to_string(),
                    };
                    let store = self.view();
                    tracing::info!(
                        %from,
                        %to,
                        epoch = store.epoch,
                        last_seq = store.last_seq,
                        peer = %peer,
                        gateway = self.core.gateway_reachable(),
                        reason,
                        "role change"
                    );
                    if to == Role::Waiting {
                        tracing::warn!(
                            reason,
                            "this node will not serve until its peer returns or an operator forces it"
                        );
                    }
                    let kind = match (from.serves_clients(), to.serves_clients(), self.promoting.take()) {
                        (false, true, Some(Promotion::Forced)) => EventKind::ForcedPromotion,
                        (false, true, _) => EventKind::Promotion,
                        _ => EventKind::RoleChange,
                    };
                    self.record(kind, &format!("{from} -> {to} (epoch {}): {reason}", store.epoch));
                    self.publish(lease_now_ms());
                    if let Some(m) = &self.monitor {
                        m.do_send(RoleChanged);
                    }
                }
                Out::SwitchoverDone(result) => {
                    let what = match &result {
                        Ok(()) => "done: this node drained and handed the active role to the peer".to_string(),
                        Err(e) => format!("failed: {e}"),
                    };
                    self.record(EventKind::Switchover, &what);
                    if let Some(tx) = self.switchover.take() {
                        let _ = tx.send(result);
                    }
                }
            }
        }
    }

    fn to_peer(&self, m: RoleMsg) {
        if let Some(monitor) = &self.monitor {
            monitor.do_send(SendToPeer(HaFrame::Role(m)));
        }
    }

    fn command(&mut self, cmd: RoleCommand, ctx: &mut Context<Self>) {
        tracing::info!(command = ?cmd, "role transition starting");
        let fut = self.broker.send(cmd);
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            let result = match res {
                Ok(r) => r,
                Err(e) => Err(format!("broker gone: {e}")),
            };
            if let Err(e) = &result {
                tracing::error!(command = ?cmd, error = %e, "role transition failed");
            }
            let (now, store) = (lease_now_ms(), act.view());
            let mut out = Vec::new();
            act.core.transition_done(now, result, &store, &mut out);
            act.perform(out, ctx);
            act.publish(now);
        }));
    }

    /// What the peer's store holds goes to the store (unflushed: it is
    /// written with the next sync), so that a node restarted alone can still
    /// say what forcing it may lose.
    fn note_peer(&mut self) {
        if let Some(hb) = self.core.peer_heartbeat() {
            let seen = (hb.last_op_epoch, hb.last_seq);
            if self.peer_noted != Some(seen) {
                self.peer_noted = Some(seen);
                self.writer.note_peer(seen.0, seen.1);
            }
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let now = lease_now_ms();
        let store = self.view();
        let mut out = Vec::new();
        self.core.tick(now, &store, &mut out);
        self.writer.stats().refuse_full.store(self.core.refuses_for_full_disk(&store), Ordering::Relaxed);
        self.perform(out, ctx);
        self.publish(now);
    }
}

/// The store as the role core sees it, from the writer's counters.
pub fn view_of(writer: &Writer) -> StoreView {
    let s = writer.stats();
    let started = s.flush_started_ms.load(Ordering::SeqCst);
    StoreView {
        epoch: s.epoch.load(Ordering::Relaxed),
        floor: s.floor.load(Ordering::Relaxed),
        last_seq: s.last_seq.load(Ordering::Relaxed),
        last_op_epoch: s.last_op_epoch.load(Ordering::Relaxed),
        in_sync: s.in_sync.load(Ordering::Relaxed).then(|| s.in_sync_gen.load(Ordering::Relaxed)),
        holding: (s.holding_gen.load(Ordering::Relaxed), s.holding.load(Ordering::Relaxed)),
        follower_acked: s.peer_acked.load(Ordering::Relaxed),
        serve_alone: s.serve_alone.load(Ordering::Relaxed),
        confirmed_alone: s.confirmed_alone.load(Ordering::Relaxed),
        outranked: s.outranked.load(Ordering::Relaxed),
        disk_failed: s.disk_failed.load(Ordering::SeqCst),
        disk_full: s.disk_full.load(Ordering::Relaxed),
        flush_running_ms: if started == 0 { 0 } else { lease_now_ms().saturating_sub(started) },
        loading: s.loading.load(Ordering::Relaxed),
    }
}

impl Actor for RoleArbiter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.publish(lease_now_ms());
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

/// A heartbeat from the peer (any path).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct PeerHeartbeat(pub Heartbeat);

impl Handler<PeerHeartbeat> for RoleArbiter {
    type Result = ();
    fn handle(&mut self, m: PeerHeartbeat, ctx: &mut Context<Self>) {
        let mut out = Vec::new();
        self.core.heard_peer(lease_now_ms(), m.0, &mut out);
        self.perform(out, ctx);
        self.note_peer();
    }
}

/// The monitor's view of the peer's links.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct PeerLinks {
    /// Every connection gone and every path refusing: the process is gone.
    pub dead: bool,
    pub connections: usize,
    /// Who the peer is (from the link's authentication), once known.
    pub identity: Option<(String, u32)>,
    /// The STOMP address the peer advertises on its newest connection that
    /// said (`HaFrame::NodeInfo`, checked); `None` if none did.
    pub stomp: Option<String>,
}

impl Handler<PeerLinks> for RoleArbiter {
    type Result = ();
    fn handle(&mut self, m: PeerLinks, _: &mut Context<Self>) {
        self.core.peer_links(m.dead);
        self.peer_connections = m.connections;
        self.peer_stomp = m.stomp;
        if let Some((id, priority)) = m.identity {
            self.core.peer_identity(id, priority);
        }
    }
}

/// Events the peer sent (checked: `events::from_peer`), to merge.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct PeerEvents(pub Vec<PairEvent>);

impl Handler<PeerEvents> for RoleArbiter {
    type Result = ();
    fn handle(&mut self, m: PeerEvents, _: &mut Context<Self>) {
        if self.events.merge(m.0) > 0 {
            self.events_changed();
        }
    }
}

/// A role message from the peer (votes, switchover).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct FromPeer(pub RoleMsg);

impl Handler<FromPeer> for RoleArbiter {
    type Result = ();
    fn handle(&mut self, m: FromPeer, ctx: &mut Context<Self>) {
        match m.0 {
            RoleMsg::TakeOver { epoch, last_seq } => {
                tracing::info!(epoch, last_seq, "the peer asks this node to take over");
                self.record(
                    EventKind::Switchover,
                    &format!("the peer hands the active role over (epoch {epoch}, through op {last_seq})"),
                );
            }
            RoleMsg::VoteRequest { epoch, rank } => tracing::info!(epoch, ?rank, "the peer asks for a vote"),
            RoleMsg::VoteReply { epoch, granted } => tracing::info!(epoch, granted, "the peer answered the vote"),
        }
        let (now, store) = (lease_now_ms(), self.view());
        let mut out = Vec::new();
        self.core.on_peer_msg(now, m.0, &store, &mut out);
        self.perform(out, ctx);
    }
}

impl Handler<GatewayReport> for RoleArbiter {
    type Result = ();
    fn handle(&mut self, r: GatewayReport, ctx: &mut Context<Self>) {
        if self.core.gateway(lease_now_ms(), r.reachable, r.answered) {
            self.tick(ctx);
        }
    }
}

/// Operator: hand the role to the peer (answered when done or refused).
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct Switchover;

impl Handler<Switchover> for RoleArbiter {
    type Result = ResponseFuture<Result<(), String>>;
    fn handle(&mut self, _: Switchover, _: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.core.switchover() {
            return Box::pin(async move { Err(e) });
        }
        self.record(EventKind::Switchover, "asked by an operator: hand the active role to the peer");
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
        let store = self.view();
        self.core.force_promote(&store)?;
        tracing::warn!(
            last_seq = store.last_seq,
            epoch = store.epoch,
            "operator forces promotion: whatever the peer confirmed beyond this store is not served until it returns"
        );
        Ok(())
    }
}
