//! `PeerMonitor`: every connection to the peer, heartbeats, liveness, and
//! the replication stream's transport.
//!
//! Each node dials every configured path to the peer's HA port and also
//! accepts the peer's connections; every authenticated connection carries
//! heartbeats both ways. The peer is up while any connection delivered a
//! heartbeat within `peer_timeout`; a connection silent that long is closed.
//! "Dead" (the fast path) means every connection is gone and every path's
//! last dial was refused: the host answers, the process is not there.
//!
//! Replication data does not pass through this actor: connection tasks hand
//! records straight to the store writer (passive) and acks straight back
//! (active); this actor only chooses the connection and attaches it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use twinmq_store::{ReplFrame, Writer};

use crate::config::HaConfig;
use crate::link::{self, Link, LinkAuth, LinkError};
use crate::wire::{HaFrame, Heartbeat};

type ConnId = u64;

struct Conn {
    tx: mpsc::UnboundedSender<HaFrame>,
    /// Outbound path index, `None` for a connection the peer dialed.
    path: Option<usize>,
    last_heard: Instant,
    task: actix_rt::task::JoinHandle<()>,
}

#[derive(Default)]
struct PathState {
    connected: bool,
    /// The last dial attempt was refused (nothing listens on the peer's port).
    refused: bool,
}

/// What the monitor tells the arbiter, on every change and heartbeat.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct PeerReport {
    pub last_heard: Option<Instant>,
    pub heartbeat: Option<Heartbeat>,
    pub peer_id: Option<String>,
    pub peer_priority: Option<u32>,
    /// Every path refuses and no connection is up.
    pub dead: bool,
    pub connections: usize,
}

/// Messages the peer stored during a split that this (active) node lacks;
/// the broker stores them (at-least-once: a resent hand-over may duplicate).
/// The answer is `true` once every message is stored (or knowingly dropped:
/// its subscription was deleted); then the peer is told to forget them.
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct DivergentMessages {
    pub messages: Vec<(String, twinmq_store::StoredMessage)>,
}

/// The peer asks this node to take the role (switchover).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct TakeOverRequest {
    pub epoch: u64,
    pub last_seq: u64,
}

pub struct PeerMonitor {
    cfg: Arc<HaConfig>,
    auth: LinkAuth,
    writer: Writer,
    /// This node's heartbeat content, published by the arbiter.
    me: watch::Receiver<Heartbeat>,
    report_to: Recipient<PeerReport>,
    takeover_to: Recipient<TakeOverRequest>,
    divergent_to: Recipient<DivergentMessages>,
    conns: HashMap<ConnId, Conn>,
    next_id: ConnId,
    paths: Vec<PathState>,
    last_heard: Option<Instant>,
    heartbeat: Option<Heartbeat>,
    peer_id: Option<String>,
    peer_priority: Option<u32>,
    /// The connection the replication stream runs on, and its forwarder.
    replicating: Option<(ConnId, actix_rt::task::JoinHandle<()>)>,
    /// The peer refused the stream: the next attach sends a snapshot.
    snapshot_needed: bool,
    listener: Option<std::net::TcpListener>,
    /// When each kind of refusal (per direction and address) was last logged
    /// at warn: a misconfigured peer retries every heartbeat, the log says so
    /// once per [`REFUSAL_LOG_EVERY`].
    refusals_logged: HashMap<String, Instant>,
}

/// How often a repeated refusal of the same peer is logged at warn.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

impl PeerMonitor {
    pub fn new(
        cfg: Arc<HaConfig>,
        writer: Writer,
        me: watch::Receiver<Heartbeat>,
        report_to: Recipient<PeerReport>,
        takeover_to: Recipient<TakeOverRequest>,
        divergent_to: Recipient<DivergentMessages>,
        listener: std::net::TcpListener,
    ) -> PeerMonitor {
        let auth = LinkAuth {
            node_id: cfg.node_id.clone(),
            priority: cfg.priority,
            secret: cfg.cluster_secret.clone(),
            tls: cfg.tls.clone(),
        };
        let paths = cfg.peer_ha.iter().map(|_| PathState::default()).collect();
        PeerMonitor {
            cfg,
            auth,
            writer,
            me,
            report_to,
            takeover_to,
            divergent_to,
            conns: HashMap::new(),
            next_id: 1,
            paths,
            last_heard: None,
            heartbeat: None,
            peer_id: None,
            peer_priority: None,
            replicating: None,
            listener: Some(listener),
            refusals_logged: HashMap::new(),
            snapshot_needed: false,
        }
    }

    fn report(&self) {
        let dead = self.conns.is_empty() && !self.paths.is_empty() && self.paths.iter().all(|p| p.refused);
        self.report_to.do_send(PeerReport {
            last_heard: self.last_heard,
            heartbeat: self.heartbeat,
            peer_id: self.peer_id.clone(),
            peer_priority: self.peer_priority,
            dead,
            connections: self.conns.len(),
        });
    }

    fn register(&mut self, link: Link, path: Option<usize>, ctx: &mut Context<Self>) -> ConnId {
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = mpsc::unbounded_channel();
        self.peer_id = Some(link.peer_id.clone());
        self.peer_priority = Some(link.peer_priority);
        tracing::info!(conn = id, peer = %link.peer_id, remote = %link.remote, path = ?path, "HA connection up");
        let task = actix_rt::spawn(run_conn(link, id, ctx.address(), self.writer.clone(), rx, tx.clone()));
        // Say who we are at once, so the peer need not wait a heartbeat interval.
        let _ = tx.send(HaFrame::Heartbeat(*self.me.borrow()));
        self.conns.insert(id, Conn { tx, path, last_heard: Instant::now(), task });
        if let Some(p) = path {
            self.paths[p].connected = true;
            self.paths[p].refused = false;
        }
        id
    }

    fn drop_conn(&mut self, id: ConnId, why: &str) {
        if let Some(c) = self.conns.remove(&id) {
            c.task.abort();
            if let Some(p) = c.path {
                self.paths[p].connected = false;
            }
            tracing::info!(conn = id, path = ?c.path, why, "HA connection down");
        }
        if self.replicating.as_ref().is_some_and(|(r, _)| *r == id) {
            self.stop_replicating("its connection closed");
        }
    }

    fn stop_replicating(&mut self, why: &str) {
        if let Some((_, fwd)) = self.replicating.take() {
            fwd.abort();
            self.writer.detach_follower();
            tracing::info!(why, "replication to the peer stopped");
        }
    }

    /// Attach the peer as the writer's follower when this node is active and
    /// the peer is a live passive; on the best connection (outbound path order).
    fn maybe_replicate(&mut self) {
        let me = *self.me.borrow();
        if !me.role.serves_clients() {
            if self.replicating.is_some() {
                self.stop_replicating("this node is not active");
            }
            return;
        }
        if self.replicating.is_some() {
            return;
        }
        let peer_passive = self.heartbeat.is_some_and(|h| !h.role.serves_clients());
        if !peer_passive {
            return;
        }
        let best = self
            .conns
            .iter()
            .filter(|(_, c)| c.last_heard.elapsed() < self.cfg.peer_timeout)
            .min_by_key(|(id, c)| (c.path.unwrap_or(usize::MAX), **id))
            .map(|(id, c)| (*id, c.tx.clone()));
        let Some((id, conn_tx)) = best else { return };
        let (tx, mut rx) = mpsc::unbounded_channel::<ReplFrame>();
        // A new connection resumes the stream, unless the peer refused it.
        self.writer.attach_follower(tx, !std::mem::take(&mut self.snapshot_needed));
        let fwd = actix_rt::spawn(async move {
            while let Some(f) = rx.recv().await {
                if conn_tx.send(HaFrame::Repl(f)).is_err() {
                    break;
                }
            }
        });
        tracing::info!(conn = id, "replicating to the peer");
        self.replicating = Some((id, fwd));
    }

    fn tick(&mut self, _ctx: &mut Context<Self>) {
        let hb = HaFrame::Heartbeat(*self.me.borrow());
        let stale: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.last_heard.elapsed() >= self.cfg.peer_timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.drop_conn(id, "silent for peer_timeout");
        }
        for c in self.conns.values() {
            let _ = c.tx.send(hb.clone());
        }
        self.maybe_replicate();
        self.report();
    }
}

impl Actor for PeerMonitor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.cfg.heartbeat, |m, ctx| m.tick(ctx));
        // Accept the peer's connections.
        if let Some(std_listener) = self.listener.take() {
            let me = ctx.address();
            let auth = self.auth.clone();
            let timeout = self.cfg.peer_timeout.max(Duration::from_secs(1));
            ctx.spawn(
                async move {
                    let listener = match tokio::net::TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot use the HA listener");
                            return;
                        }
                    };
                    loop {
                        let Ok((stream, remote)) = listener.accept().await else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        };
                        let (me, auth) = (me.clone(), auth.clone());
                        actix_rt::spawn(async move {
                            match link::accept(stream, &auth, timeout).await {
                                Ok(link) => me.do_send(LinkUp { link, path: None }),
                                Err(e) if e.is_refusal() => me.do_send(Refusal {
                                    key: format!("accept {}", remote.ip()),
                                    what: "HA connection refused",
                                    remote,
                                    error: e.to_string(),
                                }),
                                Err(e) => tracing::debug!(%remote, error = %e, "HA handshake failed"),
                            }
                        });
                    }
                }
                .into_actor(self),
            );
        }
        // Dial every path, forever.
        for (i, addr) in self.cfg.peer_ha.iter().enumerate() {
            let (me, auth, addr) = (ctx.address(), self.auth.clone(), *addr);
            let cfg = self.cfg.clone();
            ctx.spawn(dial_loop(i, addr, auth, cfg, me).into_actor(self));
        }
    }
}

async fn dial_loop(path: usize, addr: SocketAddr, auth: LinkAuth, cfg: Arc<HaConfig>, me: Addr<PeerMonitor>) {
    let timeout = cfg.peer_timeout;
    // While connected, look often, so that a reset connection is redialled at
    // once: the refusal that follows is the dead-process fast path.
    let watch = cfg.heartbeat.min(Duration::from_millis(10));
    loop {
        let connected = me.send(IsConnected(path)).await.unwrap_or(true);
        if connected {
            tokio::time::sleep(watch).await;
            continue;
        }
        {
            match link::dial(addr, &auth, timeout).await {
                Ok(link) => me.do_send(LinkUp { link, path: Some(path) }),
                Err(LinkError::Refused) => me.do_send(DialFailed { path, refused: true }),
                Err(e) if e.is_refusal() => {
                    me.do_send(Refusal {
                        key: format!("dial {addr}"),
                        what: "HA peer refused or failed authentication",
                        remote: addr,
                        error: e.to_string(),
                    });
                    me.do_send(DialFailed { path, refused: false });
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "HA dial failed");
                    me.do_send(DialFailed { path, refused: false });
                }
            }
        }
        tokio::time::sleep(cfg.heartbeat).await;
    }
}

/// Read frames until the connection ends; write what the monitor queues.
async fn run_conn(
    link: Link,
    id: ConnId,
    monitor: Addr<PeerMonitor>,
    writer: Writer,
    mut rx: mpsc::UnboundedReceiver<HaFrame>,
    tx: mpsc::UnboundedSender<HaFrame>,
) {
    let (mut sink, mut stream) = link.framed.split();
    let writing = actix_rt::spawn(async move {
        while let Some(f) = rx.recv().await {
            if sink.feed(f).await.is_err() {
                return;
            }
            while let Ok(f) = rx.try_recv() {
                if sink.feed(f).await.is_err() {
                    return;
                }
            }
            if SinkExt::<HaFrame>::flush(&mut sink).await.is_err() {
                return;
            }
        }
    });
    let why = loop {
        match stream.next().await {
            None => break "closed by the peer".to_string(),
            Some(Err(e)) => break format!("bad frame: {e}"),
            Some(Ok(frame)) => match frame {
                HaFrame::Heartbeat(hb) => monitor.do_send(HeardHeartbeat { conn: id, heartbeat: hb }),
                HaFrame::Repl(f) => {
                    let tx = tx.clone();
                    writer.apply(
                        f,
                        id,
                        Box::new(move |r| match r {
                            Ok(applied) => {
                                if !applied.divergent.is_empty() {
                                    let _ = tx.send(HaFrame::Divergent { messages: applied.divergent });
                                }
                                if let Some(seq) = applied.ack {
                                    let _ = tx.send(HaFrame::ReplAck { seq });
                                }
                            }
                            Err(e) => {
                                let _ = tx.send(HaFrame::ReplRefused { reason: e.to_string() });
                            }
                        }),
                    );
                }
                HaFrame::ReplAck { seq } => writer.peer_ack(seq),
                HaFrame::ReplRefused { reason } => monitor.do_send(ReplicationRefused { conn: id, reason }),
                HaFrame::TakeOver { epoch, last_seq } => monitor.do_send(TakeOverRequest { epoch, last_seq }),
                HaFrame::Divergent { messages } => monitor.do_send(HandedOver { conn: id, messages, attempt: 0 }),
                HaFrame::DivergentStored { ids } => writer.handover_stored(ids),
                other => break format!("unexpected frame {other:?}"),
            },
        }
    };
    writing.abort();
    monitor.do_send(LinkDown { conn: id, why });
}

#[derive(Message)]
#[rtype(result = "bool")]
struct IsConnected(usize);

impl Handler<IsConnected> for PeerMonitor {
    type Result = bool;
    fn handle(&mut self, m: IsConnected, _: &mut Context<Self>) -> bool {
        self.paths.get(m.0).is_some_and(|p| p.connected)
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct LinkUp {
    link: Link,
    path: Option<usize>,
}

impl Handler<LinkUp> for PeerMonitor {
    type Result = ();
    fn handle(&mut self, m: LinkUp, ctx: &mut Context<Self>) {
        if let Some(p) = m.path {
            if self.paths[p].connected {
                return; // a late duplicate dial
            }
        }
        self.register(m.link, m.path, ctx);
        self.report();
    }
}

/// A peer failed the TLS handshake or the cluster-secret challenge.
#[derive(Message)]
#[rtype(result = "()")]
struct Refusal {
    key: String,
    what: &'static str,
    remote: SocketAddr,
    error: String,
}

impl Handler<Refusal> for PeerMonitor {
    type Result = ();
    fn handle(&mut self, m: Refusal, _: &mut Context<Self>) {
        let now = Instant::now();
        let due = match self.refusals_logged.get(&m.key) {
            Some(at) => now.duration_since(*at) >= REFUSAL_LOG_EVERY,
            None => true,
        };
        if due {
            self.refusals_logged.insert(m.key, now);
            tracing::warn!(remote = %m.remote, error = %m.error, "{} (repeats are logged at debug for {REFUSAL_LOG_EVERY:?})", m.what);
        } else {
            tracing::debug!(remote = %m.remote, error = %m.error, "{}", m.what);
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct DialFailed {
    path: usize,
    refused: bool,
}

impl Handler<DialFailed> for PeerMonitor {
    type Result = ();
    fn handle(&mut self, m: DialFailed, _: &mut Context<Self>) {
        let was = self.paths[m.path].refused;
        self.paths[m.path].refused = m.refused;
        if was != m.refused {
            self.report();
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct LinkDown {
    conn: ConnId,
    why: String,
}

impl Handler<LinkDown> for PeerMonitor {
    type Result = ();
    fn handle(&mut self, m: LinkDown, _: &mut Context<Self>) {
        self.drop_conn(m.conn, &m.why);
        self.report();
        self.maybe_replicate();
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct HeardHeartbeat {
    conn: ConnId,
    heartbeat: Heartbeat,
}

impl Handler<HeardHeartbeat> for PeerMonitor {
    type Result = ();
    fn handle(&mut self, m: HeardHeartbeat, _: &mut Context<Self>) {
        let now = Instant::now();
        if let Some(c) = self.conns.get_mut(&m.conn) {
            c.last_heard = now;
        }
        self.last_heard = Some(now);
        let changed = self.heartbeat.map(|h| (h.role, h.epoch)) != Some((m.heartbeat.role, m.heartbeat.epoch));
        self.heartbeat = Some(m.heartbeat);
        if changed {
            // The peer changed role: a replication stream to it may need to start or stop.
            if m.heartbeat.role.serves_clients() && self.replicating.is_some() {
                self.stop_replicating("the peer is active");
            }
            self.maybe_replicate();
        }
        self.report();
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct ReplicationRefused {
    conn: ConnId,
    reason: String,
}

impl Handler<ReplicationRefused> for PeerMonitor {
    type Result = ();
    fn handle(&mut self, m: ReplicationRefused, _: &mut Context<Self>) {
        if self.replicating.as_ref().is_some_and(|(r, _)| *r == m.conn) {
            if m.reason.contains("cannot resume") {
                // A restarted or resynced peer: routine.
                tracing::info!(reason = %m.reason, "the peer cannot resume the stream; sending a snapshot");
            } else {
                tracing::warn!(reason = %m.reason, "the peer refused a replicated record; sending a new snapshot");
            }
            self.stop_replicating("refused by the peer");
            self.snapshot_needed = true;
            self.maybe_replicate();
        }
    }
}

/// The peer handed over messages on connection `conn` (`attempt`: how many
/// times storing them failed so far).
#[derive(Message)]
#[rtype(result = "()")]
struct HandedOver {
    conn: ConnId,
    messages: Vec<(String, twinmq_store::StoredMessage)>,
    attempt: u32,
}

impl Handler<HandedOver> for PeerMonitor {
    type Result = ();
    fn handle(&mut self, m: HandedOver, ctx: &mut Context<Self>) {
        if m.attempt == 0 {
            tracing::warn!(messages = m.messages.len(), "the peer hands over messages it stored during a split");
        }
        let ids: Vec<(u64, u64)> = m.messages.iter().map(|(_, msg)| (msg.epoch, msg.seq)).collect();
        let stored = self.divergent_to.send(DivergentMessages { messages: m.messages.clone() });
        ctx.spawn(stored.into_actor(self).map(move |res, act, ctx| {
            if !matches!(res, Ok(true)) {
                // Try again here (the peer keeps them meanwhile, and sends them
                // again on its next attach), backing off up to 30 s, for ~1.5 min.
                if m.attempt >= 8 {
                    tracing::warn!(messages = ids.len(), "gave up storing handed-over messages; the peer keeps them and sends them again when it next attaches");
                    return;
                }
                let delay = Duration::from_millis(500u64 << m.attempt.min(6)).min(Duration::from_secs(30));
                if m.attempt == 0 {
                    tracing::warn!(messages = ids.len(), ?delay, "messages handed over were not all stored; retrying");
                }
                let again = HandedOver { conn: m.conn, messages: m.messages, attempt: m.attempt + 1 };
                ctx.notify_later(again, delay);
                return;
            }
            // On the connection they came on, or any other if it is gone.
            let frame = HaFrame::DivergentStored { ids };
            let sent = act.conns.get(&m.conn).is_some_and(|c| c.tx.send(frame.clone()).is_ok())
                || act.conns.values().any(|c| c.tx.send(frame.clone()).is_ok());
            if !sent {
                tracing::warn!("no connection to tell the peer its hand-over is stored; it will send it again");
            }
        }));
    }
}

impl Handler<TakeOverRequest> for PeerMonitor {
    type Result = ();
    fn handle(&mut self, m: TakeOverRequest, _: &mut Context<Self>) {
        self.takeover_to.do_send(m);
    }
}

/// Send a frame to the peer on every connection (switchover's TakeOver).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct SendToPeer(pub HaFrame);

impl Handler<SendToPeer> for PeerMonitor {
    type Result = usize;
    fn handle(&mut self, m: SendToPeer, _: &mut Context<Self>) -> usize {
        self.conns.values().filter(|c| c.tx.send(m.0.clone()).is_ok()).count()
    }
}

/// This node's role changed: start or stop replicating, tell the peer at once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RoleChanged;

impl Handler<RoleChanged> for PeerMonitor {
    type Result = ();
    fn handle(&mut self, _: RoleChanged, _: &mut Context<Self>) {
        let hb = HaFrame::Heartbeat(*self.me.borrow());
        for c in self.conns.values() {
            let _ = c.tx.send(hb.clone());
        }
        self.maybe_replicate();
    }
}
