//! The network side of one client connection: handshake, reader, writer.
//!
//! With TLS on (`tls_cert`/`tls_key`), the TLS handshake comes first, on the
//! socket the listener already configured, bounded by the Hello timeout; a
//! failed handshake (a plaintext client, a client certificate the
//! `tls_client_ca` did not sign, or none) is logged at warn with the peer
//! address and closes the connection before any frame is read. The rest is
//! generic over the stream halves, so plain TCP pays nothing for it.
//!
//! The handshake: the client's `Hello` states the protocol versions it
//! speaks (none: version 1, a client older than negotiation); the broker
//! picks the highest one it speaks too (`twinmq_protocol::negotiate`), says
//! so in `Welcome`, and frames everything after `Welcome` at it. No common
//! version: an `UnsupportedVersion` error frame naming both ranges, then
//! close, before credentials are looked at.
//!
//! The reader decodes frames (the codec checks the length prefix against
//! `max_frame_bytes` before allocating) and hands each to the `Session`,
//! waiting until it is handled. A malformed, oversized or future-version
//! frame gets one error frame and closes this connection only; nothing it
//! carried reaches the store. The writer drains the outbound channel,
//! flushing once per burst.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_util::codec::{FramedRead, FramedWrite};
use twinmq_protocol::{ClientFrame, ErrorCode, ErrorContext, ErrorFrame, FrameCodec, ServerFrame, SUPPORTED_VERSIONS};

use tracing::Instrument;

use crate::auth::{AuthOutcome, GateRefusal};
use crate::config::Config;
use crate::listener::PendingSlot;
use crate::metrics::Metrics;
use crate::node::{self, Node};
use crate::outbound::{Closed, Outbound};
use crate::router::Router;
use crate::security::SecurityDb;
use crate::session::{Incoming, Session};
use crate::Shared;

type Codec = FrameCodec<ClientFrame, ServerFrame>;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// How long a new connection has to finish TLS and send its Hello: short,
/// since it holds a pending place until then (`listener.rs`).
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection waits for its in-flight publishes to be confirmed.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames waiting for a slow reader before the broker stops reading its requests.
pub(crate) const MAX_QUEUED_FRAMES: usize = 16 * 1024;
/// At most this many frames read ahead go to the session in one message.
const MAX_BATCH_FRAMES: usize = 256;

/// What every connection needs from the broker.
#[derive(Clone)]
pub struct ConnectionContext {
    pub config: Arc<Config>,
    /// The destinations, while this node is active.
    pub router: watch::Receiver<Option<Addr<Router>>>,
    pub node: Addr<Node>,
    /// Users and ACLs of the moment (published by the `Node`).
    pub security: watch::Receiver<Arc<SecurityDb>>,
    pub shared: Shared,
    /// Flips to true when the broker shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// The pair as this node sees it (None for a single node): redirect hints.
    pub ha_status: Option<watch::Receiver<twinmq_ha::HaStatus>>,
    /// Event counters for `/metrics`.
    pub metrics: Metrics,
    /// Where passwords are checked, and failing logins paused.
    pub logins: Arc<crate::auth::LoginGate>,
    /// Session-resumption tickets (keyed from the cluster secret in a pair).
    pub tickets: Arc<crate::ticket::Tickets>,
}

fn connection_error(code: ErrorCode, message: impl Into<String>) -> ServerFrame {
    ServerFrame::Error(ErrorFrame::new(code, ErrorContext::Connection, message))
}

/// Serve one accepted connection to its end. Runs on an I/O arbiter.
pub async fn serve(stream: std::net::TcpStream, peer: SocketAddr, cx: ConnectionContext, pending: PendingSlot) {
    let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("conn", id, %peer);
    serve_in_span(stream, peer, cx, id, pending).instrument(span).await
}

/// A logged-in connection's place under `max_connections`, given back when dropped.
pub(crate) struct SessionSlot(Arc<AtomicUsize>);

impl SessionSlot {
    /// A place under `max_connections`, or `None` (logged) when all are taken.
    pub(crate) fn take(cx: &ConnectionContext) -> Option<SessionSlot> {
        let sessions = cx.shared.sessions.clone();
        if sessions.fetch_add(1, Ordering::SeqCst) >= cx.config.max_connections {
            sessions.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(limit = cx.config.max_connections, "connection limit reached; refusing");
            return None;
        }
        Some(SessionSlot(sessions))
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve_in_span(
    stream: std::net::TcpStream,
    peer: SocketAddr,
    cx: ConnectionContext,
    id: u64,
    pending: PendingSlot,
) {
    let stream = match TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot register connection");
            return;
        }
    };
    match cx.config.tls.clone() {
        // Plain TCP keeps tokio's lock-free owned halves.
        None => {
            let (rd, wr) = stream.into_split();
            serve_io(rd, wr, peer, cx, id, pending).await
        }
        Some(tls) => {
            let Some(stream) = tls_accept(stream, &tls).await else { return };
            let (rd, wr) = tokio::io::split(stream);
            serve_io(rd, wr, peer, cx, id, pending).await
        }
    }
}

/// The TLS handshake of an accepted connection (the client port's or the
/// STOMP port's), bounded like Hello: a client that never finishes it must
/// not hold a slot. `None` (logged): closed.
pub(crate) async fn tls_accept(
    stream: TcpStream,
    tls: &crate::config::ClientPortTls,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(HELLO_TIMEOUT, tls.acceptor().accept(stream)).await {
        Err(_) => {
            tracing::info!("no TLS handshake within {HELLO_TIMEOUT:?}; closing");
            None
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            // A port probe, or a client that gave up: nothing to warn about.
            tracing::info!("closed before the TLS handshake");
            None
        }
        Ok(Err(e)) => {
            // A plaintext client, an untrusted or missing client certificate.
            tracing::warn!(error = %e, "TLS handshake failed; closing");
            None
        }
        Ok(Ok(s)) => {
            if tls.mutual {
                tracing::debug!("client certificate verified");
            }
            Some(s)
        }
    }
}

/// The connection after TCP (and TLS): the same for both.
async fn serve_io<R, W>(rd: R, wr: W, peer: SocketAddr, cx: ConnectionContext, id: u64, pending: PendingSlot)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let max = cx.config.max_frame_bytes;
    let mut reader = FramedRead::new(rd, Codec::new(max));
    let mut writer = FramedWrite::new(wr, Codec::new(max));

    let admitted = handshake(&mut reader, peer, &cx).await;
    drop(pending);
    // Logged in: now it takes a place under max_connections.
    let admitted = match admitted {
        Ok(admitted) => match SessionSlot::take(&cx) {
            Some(slot) => Ok((admitted, slot)),
            None => Err(Some(connection_error(ErrorCode::LimitReached, "too many connections (max_connections)"))),
        },
        Err(reply) => Err(reply),
    };
    let (Admitted { user, admin, version, ticket }, _session_slot) = match admitted {
        Ok(admitted) => admitted,
        Err(reply) => {
            if let Some(reply) = reply {
                let _ = writer.send(reply).await;
            }
            let _ = writer.get_mut().shutdown().await;
            linger(reader.into_inner()).await;
            return;
        }
    };
    let welcome = ServerFrame::Welcome {
        node_id: cx.config.node_id.clone(),
        server_version: env!("CARGO_PKG_VERSION").to_string(),
        max_frame_bytes: u32::try_from(max).unwrap_or(u32::MAX),
        protocol_version: version,
        ticket,
    };
    // Welcome goes out at the handshake version; everything after it at the chosen one.
    if writer.send(welcome).await.is_err() {
        return;
    }
    writer.encoder_mut().set_version(version);
    reader.decoder_mut().set_version(version);
    if admin {
        tracing::info!(user = ?user, protocol_version = version, "admin connection");
        serve_admin(reader, writer, &cx, user, peer).await;
        return;
    }
    // The router of the moment; the connection ends when this node stops serving.
    let Some(router) = cx.router.borrow().clone() else {
        let _ = writer.send(ServerFrame::NotActive { active_hint: peer_hint(&cx) }).await;
        return;
    };
    tracing::info!(user = ?user, protocol_version = version, "client connected");

    let (raw_tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    let tx = Outbound::new(raw_tx, queued.clone(), queued_bytes.clone(), cx.metrics.clone());
    let (close_tx, close_rx) = oneshot::channel();
    let write_task = actix_rt::spawn(write_loop(writer, rx, close_rx, queued.clone(), queued_bytes));
    // Not marked seen: the first turn of the loop below checks the user
    // against the current rules, so a removal since the password check counts.
    let mut security = cx.security.clone();
    let session = Session::new(
        id,
        peer,
        user.clone(),
        tx.clone(),
        router,
        cx.node.clone(),
        cx.config.clone(),
        cx.security.clone(),
    )
    .start();
    let permits = Arc::new(Semaphore::new(cx.config.max_inflight_per_connection));
    let mut shutdown = cx.shutdown.clone();
    let mut role = cx.shared.role_watch();
    let idle_timeout = cx.config.idle_timeout_ms.map(Duration::from_millis);
    let mut last_heard = tokio::time::Instant::now();
    // One timer for the connection's life, pushed back only when it fires
    // early: re-arming a timer for every frame would cost the hot path.
    let idle = tokio::time::sleep(idle_timeout.unwrap_or(Duration::from_secs(86_400)));
    tokio::pin!(idle);

    // What a batch's read-ahead found after its frames (an error, the
    // end): handled as the next turn's read.
    let mut carried = None;
    loop {
        // Back-pressure on a client that does not read what we send it.
        if queued.load(Ordering::Relaxed) > MAX_QUEUED_FRAMES {
            while queued.load(Ordering::Relaxed) > MAX_QUEUED_FRAMES && !write_task.is_finished() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // We were not reading: the client's silence meanwhile is ours, not its.
            last_heard = tokio::time::Instant::now();
        }
        let next = if let Some(next) = carried.take() {
            next
        } else {
            tokio::select! {
            f = reader.next() => f,
            _ = &mut idle, if idle_timeout.is_some() => {
                let deadline = last_heard + idle_timeout.unwrap_or_default();
                if tokio::time::Instant::now() < deadline {
                    idle.as_mut().reset(deadline);
                    continue;
                }
                let ms = idle_timeout.map_or(0, |t| t.as_millis());
                tracing::info!(idle_ms = %ms, "idle connection; closing");
                let _ = tx.send(connection_error(
                    ErrorCode::LimitReached,
                    format!("nothing received for {ms} ms (idle_timeout_ms); closing the connection"),
                ));
                break;
            }
            _ = shutdown.wait_for(|s| *s) => {
                let _ = tx.send(connection_error(ErrorCode::ShuttingDown, "broker is shutting down"));
                break;
            }
            _ = role.wait_for(|r| !r.serves_clients()) => {
                tracing::info!("this node stopped serving; closing the client connection");
                let _ = tx.send(connection_error(ErrorCode::NotActive, "this node stopped serving; reconnect to the active node"));
                break;
            }
            changed = security.changed() => {
                if changed.is_err() {
                    // The node (which owns the rules) is gone: the broker is stopping.
                    break;
                }
                if !security.borrow_and_update().still_valid(user.as_deref()) {
                    tracing::warn!(user = ?user, "user removed; closing the connection");
                    let _ = tx.send(connection_error(ErrorCode::NotAuthenticated, "this user was removed"));
                    break;
                }
                continue;
            }
            }
        };
        match next {
            None => {
                tracing::info!("client disconnected");
                break;
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "bad frame; closing connection");
                let _ = tx.send(connection_error(e.code(), e.to_string()));
                break;
            }
            Some(Ok(frame)) => {
                last_heard = tokio::time::Instant::now();
                // The session gets every frame the socket already holds in
                // one message (one hand-off, one answer), not one each; at
                // most MAX_BATCH_FRAMES a turn, and a turn ends after a wait
                // for a permit, so the checks above (back-pressure, idle,
                // shutdown, role, users) still run often.
                let mut frames = Vec::new();
                let mut next = Some(frame);
                let mut end = false;
                let mut taken = 0;
                while let Some(frame) = next.take() {
                    taken += 1;
                    let mut waited = false;
                    let permit = match frame {
                        ClientFrame::Publish { .. } => {
                            cx.metrics.message_in();
                            match permits.clone().try_acquire_owned() {
                                Ok(p) => Some(p),
                                Err(_) => {
                                    // Out of permits: what is batched goes first (its
                                    // confirms free them), then wait for one.
                                    if !frames.is_empty()
                                        && session.send(Incoming { frames: std::mem::take(&mut frames) }).await.is_err()
                                    {
                                        end = true;
                                        break;
                                    }
                                    waited = true;
                                    match permits.clone().acquire_owned().await {
                                        Ok(p) => Some(p),
                                        Err(_) => {
                                            end = true;
                                            break;
                                        }
                                    }
                                }
                            }
                        }
                        _ => None,
                    };
                    end = matches!(frame, ClientFrame::Bye);
                    frames.push((frame, permit));
                    if end || waited || taken >= MAX_BATCH_FRAMES {
                        break;
                    }
                    match reader.next().now_or_never() {
                        Some(Some(Ok(frame))) => {
                            last_heard = tokio::time::Instant::now();
                            next = Some(frame);
                        }
                        Some(other) => carried = Some(other),
                        None => {}
                    }
                }
                if !frames.is_empty() && session.send(Incoming { frames }).await.is_err() || end || !session.connected()
                {
                    break;
                }
            }
        }
    }
    // Finish in-flight confirms before closing (bounded: a dead store must not hang us),
    // unless this node stopped serving: then the client must move on at once.
    if cx.shared.role().serves_clients() {
        let all = u32::try_from(cx.config.max_inflight_per_connection).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, permits.acquire_many(all)).await;
    }
    session.do_send(Closed);
    drop(tx);
    let _ = close_tx.send(());
    let _ = write_task.await;
    linger(reader.into_inner()).await;
}

/// After our last frame and FIN: read and discard what the client still
/// sends, briefly and boundedly, before the socket closes. Closing with
/// unread input makes the kernel send a reset, which can destroy the error
/// frame we just sent before the client reads it.
pub(crate) async fn linger<R: AsyncRead + Unpin>(mut rd: R) {
    const LINGER: Duration = Duration::from_millis(200);
    const MAX_DISCARD: usize = 256 * 1024;
    let discard = async {
        let mut buf = [0u8; 8192];
        let mut total = 0;
        while total < MAX_DISCARD {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, discard).await;
}

/// Point clients at the peer only when it is up and active: a hint to a
/// frozen or dead node would cost them a connect timeout.
pub(crate) fn peer_hint(cx: &ConnectionContext) -> Option<String> {
    let status = cx.ha_status.as_ref()?.borrow().clone();
    let peer_active = status.peer_state == "up" && status.peer_role.is_some_and(|r| r.serves_clients());
    if peer_active {
        cx.config.pair.as_ref().and_then(|p| p.peer_client.clone())
    } else {
        None
    }
}

/// An admin connection: status and operator commands, on any node.
async fn serve_admin<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut reader: FramedRead<R, Codec>,
    mut writer: FramedWrite<W, Codec>,
    cx: &ConnectionContext,
    user: Option<String>,
    peer: SocketAddr,
) {
    // Held to the same idle limit as a messaging connection (one timer per
    // frame: admin traffic is light).
    let idle = cx.config.idle_timeout_ms.map(Duration::from_millis);
    // Like a messaging connection, it closes once its user is removed.
    let mut security = cx.security.clone();
    security.borrow_and_update();
    loop {
        let read = async {
            match idle {
                Some(limit) => tokio::time::timeout(limit, reader.next()).await.map_err(|_| limit),
                None => Ok(reader.next().await),
            }
        };
        let next = tokio::select! {
            next = read => match next {
                Ok(next) => next,
                Err(limit) => {
                    let ms = limit.as_millis();
                    tracing::info!(idle_ms = %ms, user = ?user, "idle admin connection; closing");
                    let message = format!("nothing received for {ms} ms (idle_timeout_ms); closing the connection");
                    let _ = writer.send(connection_error(ErrorCode::LimitReached, message)).await;
                    return;
                }
            },
            changed = security.changed() => {
                if changed.is_err() {
                    return;
                }
                if !security.borrow_and_update().still_valid(user.as_deref()) {
                    tracing::warn!(user = ?user, "user removed; closing the admin connection");
                    let _ = writer.send(connection_error(ErrorCode::NotAuthenticated, "this user was removed")).await;
                    return;
                }
                continue;
            }
        };
        let Some(frame) = next else { return };
        let reply = match frame {
            Err(e) => {
                tracing::warn!(error = %e, "bad frame on an admin connection");
                let _ = writer.send(connection_error(e.code(), e.to_string())).await;
                return;
            }
            Ok(ClientFrame::Status { req }) => {
                // The user may have been removed or lost every admin grant since login.
                let allowed = match cx.node.send(node::CurrentSecurity).await {
                    Ok(db) => db.still_valid(user.as_deref()) && db.is_some_admin(user.as_deref()),
                    Err(_) => return,
                };
                if !allowed {
                    tracing::warn!(user = ?user, "status refused: the user lost its admin rights; closing");
                    let refusal =
                        connection_error(ErrorCode::NotAuthorized, "this user no longer holds an admin grant");
                    let _ = writer.send(refusal).await;
                    return;
                }
                match cx.node.send(node::GetNodeStatus).await {
                    Ok(status) => ServerFrame::StatusReply { req, json: crate::status::status_json(&status) },
                    Err(_) => return,
                }
            }
            Ok(ClientFrame::Admin { req, command, force }) => {
                tracing::debug!(user = ?user, command = command.name(), force, "operator command");
                let what = command.clone();
                let who = user.as_deref().unwrap_or("anonymous");
                match cx.node.send(node::Admin { command, caller: node::Caller::User(user.clone()), force }).await {
                    Ok(Ok(reply)) => {
                        crate::audit::command(who, peer, &what, force, Ok(()));
                        match reply {
                            node::AdminReply::Done => ServerFrame::Done { req },
                            node::AdminReply::Json(json) => ServerFrame::AdminReply { req, json: json.to_string() },
                        }
                    }
                    Ok(Err((code, message))) => {
                        crate::audit::command(who, peer, &what, force, Err(&message));
                        ServerFrame::Error(ErrorFrame::new(code, ErrorContext::Request { req }, message))
                    }
                    Err(_) => return,
                }
            }
            Ok(ClientFrame::Ping { nonce }) => ServerFrame::Pong { nonce },
            Ok(ClientFrame::Bye) => return,
            Ok(other) => {
                tracing::warn!(frame = ?other, "messaging frame on an admin connection");
                let _ = writer
                    .send(connection_error(
                        ErrorCode::ProtocolViolation,
                        "an admin connection carries status and admin frames only",
                    ))
                    .await;
                return;
            }
        };
        if writer.send(reply).await.is_err() {
            return;
        }
    }
}

/// What the handshake let in.
pub(crate) struct Admitted {
    /// The authenticated user (`None`: an open broker, no credentials).
    pub(crate) user: Option<String>,
    /// An admin connection (accepted by a passive node too).
    admin: bool,
    /// The protocol version negotiated for the rest of the connection.
    version: u8,
    /// A fresh session ticket for the client's next Hello.
    ticket: Option<Vec<u8>>,
}

/// Read Hello, agree on a protocol version, check role and credentials.
/// `Err(Some(frame))`: send it and close.
async fn handshake<R: AsyncRead + Unpin>(
    reader: &mut FramedRead<R, Codec>,
    peer: SocketAddr,
    cx: &ConnectionContext,
) -> Result<Admitted, Option<ServerFrame>> {
    let first = match tokio::time::timeout(HELLO_TIMEOUT, reader.next()).await {
        Err(_) => {
            tracing::info!("no Hello within {HELLO_TIMEOUT:?}; closing");
            return Err(Some(connection_error(ErrorCode::ProtocolViolation, "expected Hello")));
        }
        Ok(None) => return Err(None),
        Ok(Some(Err(e))) => {
            tracing::warn!(error = %e, "bad first frame");
            return Err(Some(connection_error(e.code(), e.to_string())));
        }
        Ok(Some(Ok(f))) => f,
    };
    if !matches!(first, ClientFrame::Hello { .. }) {
        tracing::warn!("first frame is not Hello");
        return Err(Some(connection_error(ErrorCode::ProtocolViolation, "the first frame must be Hello")));
    }
    admit(first, peer, cx).await
}

/// Log in the client of a `Hello` (of this port, or one the STOMP port made
/// of a CONNECT): version, role, credentials or ticket, admin grant. The
/// error is the frame to answer with (`None`: close without one).
pub(crate) async fn admit(
    hello: ClientFrame,
    peer: SocketAddr,
    cx: &ConnectionContext,
) -> Result<Admitted, Option<ServerFrame>> {
    let ClientFrame::Hello { user, password, client_name, admin, versions, ticket } = hello else {
        return Err(Some(connection_error(ErrorCode::ProtocolViolation, "the first frame must be Hello")));
    };
    // Logged with every line about this login: never as sent (a newline or an
    // escape sequence in it forged log lines: issue 10, finding 13).
    let client_name = crate::log_safe(&client_name, 64);
    // First: without a common version nothing else we could say would be understood.
    let version = match twinmq_protocol::negotiate(SUPPORTED_VERSIONS, versions) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(client = %client_name, error = %e, "refused: no common protocol version");
            return Err(Some(ServerFrame::Error(ErrorFrame::no_common_version(versions, SUPPORTED_VERSIONS))));
        }
    };
    if !admin && !cx.shared.role().serves_clients() {
        return Err(Some(ServerFrame::NotActive { active_hint: peer_hint(cx) }));
    }
    // A passive node learns users by replication: the node reads them fresh.
    let security = match cx.node.send(node::CurrentSecurity).await {
        Ok(db) => db,
        Err(_) => cx.security.borrow().clone(),
    };
    let now = crate::now_ms();
    // A valid ticket of a user this node knows stands for the password: an
    // HMAC, not an argon2 check (a reconnect storm after a failover).
    let resumed = match (&ticket, &user) {
        (Some(t), Some(u)) if !security.is_open() && security.still_valid(Some(u)) => {
            cx.tickets.verify(t, u, &security, now)
        }
        _ => false,
    };
    let db = security.clone();
    let name = user.clone();
    let check = move || db.check_password(name.as_deref(), password.as_deref());
    let checked = if resumed {
        Ok(AuthOutcome::Accepted(user.clone()))
    } else if security.is_open() {
        // No users: nothing to check, nothing to queue behind the gate (the
        // soak's 1,000 idle connections at once timed out behind it).
        Ok(AuthOutcome::Accepted(user.clone()))
    } else {
        cx.logins.check(user.as_deref(), peer.ip(), check).await
    };
    let outcome = match checked {
        Ok(outcome) => outcome,
        Err(GateRefusal::Paused(pause)) => {
            tracing::warn!(client = %client_name, user = ?user, "login refused: too many failures from this address");
            let message = format!(
                "too many failed logins for this user from this address; retry in {} ms",
                pause.as_millis().max(1)
            );
            // Not NotAuthenticated, which a client takes as final: one whose
            // address an attacker shares keeps retrying (with its ticket, if
            // it has one, which is not paused).
            return Err(Some(connection_error(ErrorCode::LimitReached, message)));
        }
        Err(GateRefusal::Busy) => {
            tracing::warn!(client = %client_name, "login refused: too many password checks waiting");
            return Err(Some(connection_error(ErrorCode::LimitReached, "too many logins at once; retry shortly")));
        }
    };
    match outcome {
        AuthOutcome::Accepted(user) if admin && !security.is_some_admin(user.as_deref()) => {
            tracing::warn!(client = %client_name, user = ?user, "admin connection refused: no admin grant");
            Err(Some(connection_error(ErrorCode::NotAuthorized, "this user holds no admin grant")))
        }
        AuthOutcome::Accepted(user) => {
            tracing::debug!(client = %client_name, "authenticated");
            let ticket = user
                .as_deref()
                .and_then(|u| Some(cx.tickets.issue(u, security.password_hash(u)?, now)))
                .filter(|_| !security.is_open());
            Ok(Admitted { user, admin, version, ticket })
        }
        AuthOutcome::Refused(why) => {
            tracing::warn!(client = %client_name, "authentication refused: {why}");
            Err(Some(connection_error(ErrorCode::NotAuthenticated, why)))
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: FramedWrite<W, Codec>,
    mut rx: mpsc::UnboundedReceiver<ServerFrame>,
    mut close: oneshot::Receiver<()>,
    queued: Arc<AtomicUsize>,
    queued_bytes: Arc<AtomicUsize>,
) {
    let taken = |f| {
        queued.fetch_sub(1, Ordering::Relaxed);
        queued_bytes.fetch_sub(Outbound::cost(&f), Ordering::Relaxed);
        f
    };
    loop {
        let frame = tokio::select! {
            biased;
            f = rx.recv() => f,
            _ = &mut close => {
                // Send what is already queued (a final error frame, confirms), then close.
                while let Ok(f) = rx.try_recv() {
                    if writer.feed(taken(f)).await.is_err() {
                        break;
                    }
                }
                let _ = SinkExt::<ServerFrame>::flush(&mut writer).await;
                break;
            }
        };
        let Some(frame) = frame else { break };
        if let Err(e) = writer.feed(taken(frame)).await {
            tracing::debug!(error = %e, "write failed");
            break;
        }
        while let Ok(f) = rx.try_recv() {
            if writer.feed(taken(f)).await.is_err() {
                return;
            }
        }
        if SinkExt::<ServerFrame>::flush(&mut writer).await.is_err() {
            break;
        }
    }
    let _ = writer.get_mut().shutdown().await;
}

use tokio::io::{AsyncReadExt, AsyncWriteExt};
