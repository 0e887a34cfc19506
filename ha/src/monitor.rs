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
//! Replication data does not pass through this actor: each connection's
//! task hands the frames it reads straight to the store writer (which owns
//! the protocol, see `twinmq_store::repl`) and writes what the writer queues
//! for it. A frame read waits for room (a bounded number of bytes in flight
//! to the writer) before the next one is read: a slow store slows the
//! socket, and TCP slows the active. This actor only decides on which
//! connection the active attaches its passive peer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch, Semaphore};
use twinmq_store::{PeerRx, PeerTx, ToPeer, Writer};

use crate::arbiter::{FromPeer, HaStatus, PeerEvents, PeerHeartbeat, PeerLinks, RoleArbiter};
use crate::config::HaConfig;
use crate::events::PairEvent;
use crate::link::{self, Link, LinkAuth, LinkError};
use crate::wire::{HaFrame, Heartbeat};

type ConnId = u64;

/// Bytes of replication frames read from one connection that may wait for
/// the store writer; past it the connection is not read (back-pressure).
const APPLY_WINDOW_KB: u32 = 32 * 1024;

/// How often a hand-over the active has not acknowledged is sent again.
const HANDOVER_RESEND: Duration = Duration::from_secs(5);

struct Conn {
    /// Heartbeats, role messages and acknowledgements of hand-overs.
    tx: mpsc::UnboundedSender<HaFrame>,
    /// Outbound path index, `None` for a connection the peer dialed.
    path: Option<usize>,
    last_heard: Instant,
    task: actix_rt::task::JoinHandle<()>,
    /// The HA protocol version negotiated on it: frames of a later version
    /// are never sent on it (its peer could not decode them).
    version: u8,
    /// What the peer advertised on it (`HaFrame::NodeInfo`, HA 6), once it did.
    info: Option<PeerInfo>,
}

/// What the peer advertised on one connection, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PeerInfo {
    stomp: Option<String>,
}

#[derive(Default)]
struct PathState {
    connected: bool,
    /// The last dial attempt was refused (nothing listens on the peer's port).
    refused: bool,
}

/// Messages the peer holds that this (active) node's history lacks; the
/// broker stores those it does not have yet (at-least-once).
/// The answer is `true` once every message is stored (or knowingly dropped:
/// its subscription was deleted); then the peer is told to forget them.
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct DivergentMessages {
    pub messages: Vec<(String, twinmq_store::StoredMessage)>,
    /// Users and queues to create where this node lacks them (users first).
    pub admin: twinmq_store::HandoverAdmin,
}

pub struct PeerMonitor {
    cfg: Arc<HaConfig>,
    auth: LinkAuth,
    writer: Writer,
    /// This node's heartbeat content, published by the arbiter.
    me: watch::Receiver<Heartbeat>,
    /// The arbiter's status: its events go to a peer whose link comes up.
    status: watch::Receiver<HaStatus>,
    arbiter: Addr<RoleArbiter>,
    divergent_to: Recipient<DivergentMessages>,
    conns: HashMap<ConnId, Conn>,
    next_id: ConnId,
    paths: Vec<PathState>,
    peer: Option<Heartbeat>,
    identity: Option<(String, u32)>,
    /// The connection the follower was last attached on, and when.
    attached: Option<(ConnId, Instant)>,
    handover_sent: Instant,
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
        status: watch::Receiver<HaStatus>,
        arbiter: Addr<RoleArbiter>,
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
            status,
            arbiter,
            divergent_to,
            conns: HashMap::new(),
            next_id: 1,
            paths,
            peer: None,
            identity: None,
            attached: None,
            handover_sent: Instant::now(),
            listener: Some(listener),
            refusals_logged: HashMap::new(),
        }
    }

    fn report(&self) {
        let dead = self.conns.is_empty() && !self.paths.is_empty() && self.paths.iter().all(|p| p.refused);
        // What the peer said last: on the newest connection that said anything.
        let stomp = self
            .conns
            .iter()
            .filter_map(|(id, c)| c.info.as_ref().map(|i| (*id, i)))
            .max_by_key(|(id, _)| *id)
            .and_then(|(_, i)| i.stomp.clone());
        self.arbiter.do_send(PeerLinks { dead, connections: self.conns.len(), identity: self.identity.clone(), stomp });
    }

    fn register(&mut self, link: Link, path: Option<usize>, ctx: &mut Context<Self>) -> ConnId {
        let id = self.next_id;
        self.next_id += 1;
        let link_version = link.version;
        let (tx, rx) = mpsc::unbounded_channel();
        self.identity = Some((link.peer_id.clone(), link.peer_priority));
        tracing::info!(conn = id, peer = %link.peer_id, remote = %link.remote, path = ?path, "HA connection up");
        // The writer may send on it before the first frame is read from it.
        let (mut peer_tx, peer_rx) = PeerTx::new();
        if link.version < crate::wire::LOG_CATCHUP_VERSION {
            peer_tx = peer_tx.without_log_catchup();
        }
        self.writer.connected(id, peer_tx);
        let task =
            actix_rt::spawn(run_conn(link, id, ctx.address(), self.arbiter.clone(), self.writer.clone(), rx, peer_rx));
        // Say who we are at once, so the peer need not wait a heartbeat interval.
        let _ = tx.send(HaFrame::Heartbeat(*self.me.borrow()));
        let events = self.status.borrow().events.to_vec();
        for frame in link_up_frames(link_version, &self.cfg, events) {
            let _ = tx.send(frame);
        }
        let conn = Conn { tx, path, last_heard: Instant::now(), task, version: link_version, info: None };
        self.conns.insert(id, conn);
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
            self.writer.connection_lost(id);
            tracing::info!(conn = id, path = ?c.path, why, "HA connection down");
        }
        if self.attached.is_some_and(|(c, _)| c == id) {
            // The stream moves to another connection at once (it resumes).
            self.attached = None;
            self.maybe_attach();
        }
    }

    /// The active attaches its passive peer as follower, on the best live
    /// connection (outbound path order), when none is attached.
    fn maybe_attach(&mut self) {
        let me = *self.me.borrow();
        if !me.role.serves_clients() {
            self.attached = None;
            return;
        }
        let peer_ok = self.peer.is_some_and(|h| !h.role.serves_clients() && h.serviceable);
        if !peer_ok {
            return;
        }
        let stats = self.writer.stats();
        let stuck = stats.follower_handshaking.load(Ordering::Relaxed)
            && self.attached.is_some_and(|(_, at)| at.elapsed() >= 2 * self.cfg.peer_timeout);
        let linked = stats.follower_linked.load(Ordering::Relaxed) && !stuck;
        let recent =
            self.attached.is_some_and(|(c, at)| self.conns.contains_key(&c) && at.elapsed() < 2 * self.cfg.heartbeat);
        if linked || recent {
            return;
        }
        let best = self
            .conns
            .iter()
            .filter(|(_, c)| c.last_heard.elapsed() < self.cfg.peer_timeout)
            .min_by_key(|(id, c)| (c.path.unwrap_or(usize::MAX), **id))
            .map(|(id, _)| *id);
        let Some(id) = best else { return };
        tracing::info!(conn = id, "replicating to the peer");
        self.writer.attach(id);
        self.attached = Some((id, Instant::now()));
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
        self.maybe_attach();
        if self.writer.stats().handover_pending.load(Ordering::Relaxed) > 0
            && self.handover_sent.elapsed() >= HANDOVER_RESEND
        {
            self.handover_sent = Instant::now();
            self.writer.resend_handover();
        }
        self.report();
    }
}

/// What goes out on a new connection after the first heartbeat: at HA 6
/// and later, what this node advertises and its events (oldest first);
/// before it, nothing (a peer at 4 or 5 could not decode either and would
/// drop the link).
fn link_up_frames(version: u8, cfg: &HaConfig, events: Vec<PairEvent>) -> Vec<HaFrame> {
    let mut out = Vec::new();
    if version >= crate::wire::NODE_INFO_VERSION {
        out.push(HaFrame::NodeInfo { stomp: cfg.advertise_stomp.clone() });
    }
    if version >= crate::wire::EVENTS_VERSION && !events.is_empty() {
        out.push(HaFrame::Events { events });
    }
    out
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
        tokio::time::sleep(cfg.heartbeat).await;
    }
}

/// Read frames until the connection ends; write what the monitor and the
/// store writer queue for it.
async fn run_conn(
    link: Link,
    id: ConnId,
    monitor: Addr<PeerMonitor>,
    arbiter: Addr<RoleArbiter>,
    writer: Writer,
    mut rx: mpsc::UnboundedReceiver<HaFrame>,
    mut peer_rx: PeerRx,
) {
    let version = link.version;
    let (mut sink, mut stream) = link.framed.split();
    let writing = actix_rt::spawn(async move {
        let wire = |o: ToPeer| match o {
            ToPeer::Repl(f) => Some(HaFrame::Repl(f)),
            ToPeer::Handover(messages) => Some(HaFrame::Divergent { messages }),
            // A peer at HA 2 would not understand it: kept until one at 3.
            ToPeer::HandoverAdmin(admin) => {
                (version >= crate::wire::DIVERGENT_ADMIN_VERSION).then_some(HaFrame::DivergentAdmin(admin))
            }
        };
        loop {
            let first = tokio::select! {
                f = rx.recv() => match f { Some(f) => f, None => return },
                o = peer_rx.recv() => match o {
                    Some(o) => match wire(o) { Some(f) => f, None => continue },
                    None => return,
                },
            };
            if sink.feed(first).await.is_err() {
                return;
            }
            // Everything else already waiting goes out with one flush.
            loop {
                let next = match rx.try_recv() {
                    Ok(f) => f,
                    Err(_) => match peer_rx.try_recv() {
                        Some(o) => match wire(o) {
                            Some(f) => f,
                            None => continue,
                        },
                        None => break,
                    },
                };
                if sink.feed(next).await.is_err() {
                    return;
                }
            }
            if SinkExt::<HaFrame>::flush(&mut sink).await.is_err() {
                return;
            }
        }
    });
    let window = Arc::new(Semaphore::new(APPLY_WINDOW_KB as usize));
    let why = loop {
        match stream.next().await {
            None => break "closed by the peer".to_string(),
            Some(Err(e)) => break format!("bad frame: {e}"),
            Some(Ok(frame)) => match frame {
                HaFrame::Heartbeat(hb) => monitor.do_send(HeardHeartbeat { conn: id, heartbeat: hb }),
                HaFrame::Repl(f) => {
                    let kb = ((f.weight() / 1024) as u32).clamp(1, APPLY_WINDOW_KB);
                    let Ok(permit) = window.clone().acquire_many_owned(kb).await else {
                        break "closed".to_string();
                    };
                    monitor.do_send(Heard(id));
                    writer.frame(id, f, Box::new(permit));
                }
                HaFrame::Role(m) => {
                    monitor.do_send(Heard(id));
                    arbiter.do_send(FromPeer(m));
                }
                HaFrame::Divergent { messages } => {
                    monitor.do_send(HandedOver { conn: id, messages, admin: Default::default(), attempt: 0 })
                }
                HaFrame::DivergentAdmin(admin) => {
                    monitor.do_send(HandedOver { conn: id, messages: Vec::new(), admin, attempt: 0 })
                }
                HaFrame::DivergentStored { ids } => writer.handover_stored(ids),
                HaFrame::DivergentAdminStored => writer.handover_admin_stored(),
                HaFrame::NodeInfo { stomp } => {
                    monitor.do_send(Heard(id));
                    let stomp = stomp.filter(|s| {
                        let ok = crate::wire::valid_advertised(s);
                        if !ok {
                            tracing::warn!(
                                conn = id,
                                len = s.len(),
                                "the peer advertised an invalid STOMP address; ignored"
                            );
                        }
                        ok
                    });
                    monitor.do_send(HeardInfo { conn: id, info: PeerInfo { stomp } });
                }
                HaFrame::Events { events } => {
                    monitor.do_send(Heard(id));
                    let events = crate::events::from_peer(events);
                    if !events.is_empty() {
                        arbiter.do_send(PeerEvents(events));
                    }
                }
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
        if let Some(c) = self.conns.get_mut(&m.conn) {
            c.last_heard = Instant::now();
        }
        let changed = self.peer.map(|h| (h.role, h.epoch)) != Some((m.heartbeat.role, m.heartbeat.epoch));
        self.peer = Some(m.heartbeat);
        self.arbiter.do_send(PeerHeartbeat(m.heartbeat));
        if changed {
            // The peer changed role: a follower may need attaching.
            self.maybe_attach();
        }
    }
}

/// The peer said what it advertises (checked), on connection `conn`.
#[derive(Message)]
#[rtype(result = "()")]
struct HeardInfo {
    conn: ConnId,
    info: PeerInfo,
}

impl Handler<HeardInfo> for PeerMonitor {
    type Result = ();
    fn handle(&mut self, m: HeardInfo, _: &mut Context<Self>) {
        if let Some(c) = self.conns.get_mut(&m.conn) {
            if c.info.as_ref() != Some(&m.info) {
                tracing::info!(conn = m.conn, stomp = ?m.info.stomp, "the peer advertises");
            }
            c.info = Some(m.info);
            self.report();
        }
    }
}

/// Anything read from a connection shows it is alive.
#[derive(Message)]
#[rtype(result = "()")]
struct Heard(ConnId);

impl Handler<Heard> for PeerMonitor {
    type Result = ();
    fn handle(&mut self, m: Heard, _: &mut Context<Self>) {
        if let Some(c) = self.conns.get_mut(&m.0) {
            c.last_heard = Instant::now();
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
    admin: twinmq_store::HandoverAdmin,
    attempt: u32,
}

impl Handler<HandedOver> for PeerMonitor {
    type Result = ();
    fn handle(&mut self, m: HandedOver, ctx: &mut Context<Self>) {
        if m.attempt == 0 {
            tracing::warn!(
                messages = m.messages.len(),
                users = m.admin.users.len(),
                queues = m.admin.queues.len(),
                "the peer hands over what this node's history may lack"
            );
        }
        let ids: Vec<(u64, u64)> = m.messages.iter().map(|(_, msg)| (msg.epoch, msg.seq)).collect();
        let stored = self.divergent_to.send(DivergentMessages { messages: m.messages.clone(), admin: m.admin.clone() });
        ctx.spawn(stored.into_actor(self).map(move |res, act, ctx| {
            if !matches!(res, Ok(true)) {
                // Try again here (the peer keeps them meanwhile, and sends them
                // again on its next attach), backing off up to 30 s, for ~1.5 min.
                if m.attempt >= 8 {
                    tracing::warn!(
                        messages = ids.len(),
                        "gave up storing handed-over messages; the peer keeps them and sends them again"
                    );
                    return;
                }
                let delay = Duration::from_millis(500u64 << m.attempt.min(6)).min(Duration::from_secs(30));
                if m.attempt == 0 {
                    tracing::warn!(messages = ids.len(), ?delay, "messages handed over were not all stored; retrying");
                }
                let again = HandedOver { conn: m.conn, messages: m.messages, admin: m.admin, attempt: m.attempt + 1 };
                ctx.notify_later(again, delay);
                return;
            }
            // On the connection they came on, or any other if it is gone.
            let frame =
                if m.admin.is_empty() { HaFrame::DivergentStored { ids } } else { HaFrame::DivergentAdminStored };
            let sent = act.conns.get(&m.conn).is_some_and(|c| c.tx.send(frame.clone()).is_ok())
                || act.conns.values().any(|c| c.tx.send(frame.clone()).is_ok());
            if !sent {
                tracing::warn!("no connection to tell the peer its hand-over is stored; it will send it again");
            }
        }));
    }
}

/// Send a frame to the peer on one connection, the one heard last (role
/// messages: sent once, so that a vote is not asked for, and answered,
/// several times over; a lost one is asked again).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct SendToPeer(pub HaFrame);

impl Handler<SendToPeer> for PeerMonitor {
    type Result = bool;
    fn handle(&mut self, m: SendToPeer, _: &mut Context<Self>) -> bool {
        let best = self.conns.values().max_by_key(|c| c.last_heard);
        best.is_some_and(|c| c.tx.send(m.0).is_ok())
    }
}

/// Events this node just recorded: to the peer, on every connection that
/// speaks HA 6 (a duplicate is merged away; a connection at 4 or 5 gets
/// nothing).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ShareEvents(pub Vec<PairEvent>);

impl Handler<ShareEvents> for PeerMonitor {
    type Result = ();
    fn handle(&mut self, m: ShareEvents, _: &mut Context<Self>) {
        for c in self.conns.values().filter(|c| c.version >= crate::wire::EVENTS_VERSION) {
            let _ = c.tx.send(HaFrame::Events { events: m.0.clone() });
        }
    }
}

/// This node's role changed: tell the peer at once, start or stop replicating.
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
        self.maybe_attach();
    }
}
