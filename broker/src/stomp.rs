//! The STOMP 1.2 port (`stomp_listen`): STOMP frames in, the native
//! session out.
//!
//! A STOMP connection is a native connection with another grammar: after
//! CONNECT it gets a [`Session`] like any client, and every STOMP frame is
//! translated into the native frames that session handles (SEND into
//! `Publish`, SUBSCRIBE into `Subscribe`, ACK into `Ack` ...), so users,
//! ACLs, limits, TLS (the client port's `tls_*`) and durability are the
//! native port's, not a second implementation of them. The session's
//! answers (`Confirm`, `Deliver`, `Done`, errors) are translated back by the
//! writer task.
//!
//! - CONNECT/STOMP: `accept-version` must offer 1.2 or 1.1; `login` and
//!   `passcode` are checked as the native Hello's user and password. A node
//!   that does not serve answers with an ERROR naming the active node's STOMP
//!   address (the host of `peer_client`, the port the peer advertised over
//!   the HA link). Heart-beats as the spec says: we offer `5000,5000`.
//! - SEND: `/queue/NAME` or `/topic/NAME`; persistent unless
//!   `persistent:false`; `receipt` answered only once the message is
//!   confirmed as the durability mode says (fdatasync'd, on both nodes with
//!   `replicated`), as a native confirm. Other headers travel with the message.
//! - SUBSCRIBE: `ack: auto | client | client-individual`; durable topic
//!   subscriptions by `durable-subscription-name` (Artemis) or
//!   `activemq.subscriptionName` (ActiveMQ); at most `activemq.prefetchSize`
//!   (or `prefetch-count`) unacked deliveries, default 100.
//! - ACK/NACK by the MESSAGE's `ack` header, `SUB-N`: N numbers the
//!   subscription's deliveries in the order they were sent (`Sub`), so a
//!   `client`-mode ACK or NACK settles exactly those sent up to it and not
//!   settled yet, as native acks/nacks of each (ids cannot tell: a
//!   redelivery keeps its id and comes later); in `client-individual` mode
//!   the one it names. An ACK with `receipt` is answered once the acks are
//!   stored. A NACK redelivers at once. A 1.1 MESSAGE carries the ack id
//!   as its `message-id` (1.1 acks by it).
//! - BEGIN/COMMIT/ABORT: the SENDs and ACKs of a transaction are held here
//!   and handed over at COMMIT (whose receipt waits for its SENDs' confirms;
//!   its ACKs are stored as acks are); ABORT drops them. A SEND is checked
//!   when sent (size, ACL) and the bytes held are bounded. Not atomic across
//!   destinations: a failover or a full queue during a COMMIT may store
//!   some of its messages (a client resends on doubt).
//! - Every refusal is an ERROR frame with a `message` header, after which
//!   the connection closes (STOMP 1.2); a refusal of a frame with `receipt`
//!   names it in `receipt-id`. It goes out after the frames read before it
//!   were handled and their confirms are in (their receipts come first).
//! - Silence: twice the agreed heart-beat interval, or `idle_timeout_ms`
//!   without heart-beats, closes the connection; CONNECT must come within
//!   5 s of the connection (heart-beats do not stretch that).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::Instrument;
use twinmq_protocol::stomp::{Command, StompCodec, StompFrame, StompItem, StompLimits};
use twinmq_protocol::{
    ClientFrame, DestKind, Destination, ErrorContext, ErrorFrame, MessageId, OutMessage, ServerFrame,
    SUPPORTED_VERSIONS,
};

use crate::connection::{self, ConnectionContext, SessionSlot};
use crate::listener::PendingSlot;
use crate::outbound::{Closed, Outbound};
use crate::session::{Incoming, Session};

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1 << 40);

/// What we offer in CONNECTED's `heart-beat`: we can send every 5 s and
/// want to hear from the client every 5 s (when it offers to send at all).
const HEART_BEAT_MS: u64 = 5000;
/// Prefetch of a subscription that names none.
const DEFAULT_PREFETCH: u32 = 100;
/// Most SENDs and ACKs one transaction may hold before COMMIT.
const MAX_TRANSACTION_FRAMES: usize = 10_000;
/// Bytes the open transactions of one connection may hold at least (four
/// times `max_message_bytes` when that is more).
const MAX_HELD_BYTES: usize = 16 << 20;
/// Most open transactions per connection.
const MAX_TRANSACTIONS: usize = 64;
/// Headers a SEND uses itself; the rest travel with the message.
const SEND_HEADERS: [&str; 6] = ["destination", "content-length", "receipt", "transaction", "persistent", "expires"];
/// Headers MESSAGE sets itself: a message's own headers of these names are not repeated.
const MESSAGE_HEADERS: [&str; 9] = [
    "destination",
    "subscription",
    "message-id",
    "ack",
    "content-length",
    "redelivered",
    "timestamp",
    "expires",
    "persistent",
];

/// The bytes of an ERROR frame refusing a connection before it is served
/// (the listener's pending limit).
pub fn refusal(why: &str) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"ERROR\nmessage:");
    out.extend_from_slice(why.replace(['\n', '\r', ':'], " ").as_bytes());
    out.extend_from_slice(b"\n\n\0");
    out
}

/// Serve one accepted STOMP connection to its end. Runs on an I/O arbiter.
pub async fn serve(stream: std::net::TcpStream, peer: SocketAddr, cx: ConnectionContext, pending: PendingSlot) {
    let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("stomp", id, %peer);
    async move {
        let stream = match TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot register connection");
                return;
            }
        };
        match cx.config.tls.clone() {
            None => {
                let (rd, wr) = stream.into_split();
                serve_io(rd, wr, peer, cx, id, pending).await
            }
            Some(tls) => {
                let Some(stream) = connection::tls_accept(stream, &tls).await else { return };
                let (rd, wr) = tokio::io::split(stream);
                serve_io(rd, wr, peer, cx, id, pending).await
            }
        }
    }
    .instrument(span)
    .await
}

fn limits(cx: &ConnectionContext) -> StompLimits {
    StompLimits { max_frame_bytes: cx.config.max_frame_bytes, ..StompLimits::default() }
}

/// An ERROR frame: `message` (one line) and, when the refused frame asked
/// for one, `receipt-id`.
fn error_frame(message: &str, receipt: Option<&str>) -> StompFrame {
    let mut f = StompFrame::new(Command::Error).header("message", message.replace(['\n', '\r'], " "));
    if let Some(r) = receipt {
        f = f.header("receipt-id", r);
    }
    f.header("content-type", "text/plain").body(message.to_string())
}

/// `/queue/NAME` or `/topic/NAME`.
fn destination(text: &str) -> Result<Destination, String> {
    if let Some(name) = text.strip_prefix("/queue/") {
        Ok(Destination::queue(name))
    } else if let Some(name) = text.strip_prefix("/topic/") {
        Ok(Destination::topic(name))
    } else {
        Err(format!("unknown destination `{}`: use /queue/NAME or /topic/NAME", crate::log_safe(text, 64)))
    }
}

fn destination_text(d: &Destination) -> String {
    match d.kind {
        DestKind::Queue => format!("/queue/{}", d.name),
        DestKind::Topic => format!("/topic/{}", d.name),
    }
}

/// The STOMP address of the active peer, for a passive node's ERROR: the
/// host clients already reach the peer by (`peer_client`) with the STOMP
/// port it advertised over the HA link; the advertised address as it is
/// when `peer_client` is unset.
fn stomp_hint(cx: &ConnectionContext) -> Option<String> {
    let status = cx.ha_status.as_ref()?.borrow().clone();
    let peer_active = status.peer_state == "up" && status.peer_role.is_some_and(|r| r.serves_clients());
    let advertised: SocketAddr = status.peer_stomp.as_deref()?.parse().ok().filter(|_| peer_active)?;
    let host = cx.config.pair.as_ref().and_then(|p| p.peer_client.as_deref()).and_then(|c| c.rsplit_once(':'));
    match host {
        Some((host, _)) => Some(format!("{host}:{}", advertised.port())),
        None if !advertised.ip().is_unspecified() => Some(advertised.to_string()),
        None => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckMode {
    Auto,
    Client,
    ClientIndividual,
}

struct Sub {
    /// The client's `id` of the subscription.
    name: String,
    ack: AckMode,
    /// Deliveries not acked or nacked yet (not kept for `auto`), by the
    /// number each got in the order it was sent (its `ack` header): a
    /// `client` ACK settles those sent up to it, which ids cannot tell (a
    /// redelivery keeps its id and is sent later).
    outstanding: std::collections::BTreeMap<u64, MessageId>,
    /// The number the next delivery gets.
    next: u64,
}

/// Most deliveries one subscription remembers as outstanding: far above a
/// prefetch (at most 65,536); past it the oldest (one the broker took back
/// after `ack_timeout_ms`, say) is forgotten.
const MAX_OUTSTANDING: usize = 131_072;

impl Sub {
    fn new(name: String, ack: AckMode) -> Sub {
        Sub { name, ack, outstanding: Default::default(), next: 1 }
    }

    /// Remember a delivery; its number.
    fn delivered(&mut self, id: MessageId) -> u64 {
        let n = self.next;
        self.next += 1;
        self.outstanding.insert(n, id);
        if self.outstanding.len() > MAX_OUTSTANDING {
            self.outstanding.pop_first();
        }
        n
    }

    /// What an ACK or a NACK of `n` settles: with `cumulative` every delivery
    /// sent up to `n` not settled yet, otherwise `n` alone.
    fn settle(&mut self, n: u64, cumulative: bool) -> Vec<MessageId> {
        if cumulative {
            let later = self.outstanding.split_off(&(n + 1));
            std::mem::replace(&mut self.outstanding, later).into_values().collect()
        } else {
            self.outstanding.remove(&n).into_iter().collect()
        }
    }
}

/// What the reader and the writer of one connection share: the mapping of
/// STOMP ids to native ones, and receipts waiting for their answers.
#[derive(Default)]
struct State {
    /// By native `sub_id`.
    subs: HashMap<u32, Sub>,
    /// Receipts of SUBSCRIBEs, answered at `Subscribed`.
    subscribe_receipts: HashMap<u32, String>,
    /// Receipts answered at `Done { req }` (ACK with receipt, and receipts
    /// due at once, queued behind what the session sent before them).
    request_receipts: HashMap<u64, Receipt>,
    /// SENDs handed to the session and not confirmed yet, by `seq`.
    unconfirmed: BTreeSet<u64>,
    /// The receipt of each SEND that asked for one, by `seq` (for an error).
    send_receipts: HashMap<u64, String>,
    /// Receipts due once every SEND up to a `seq` is confirmed, in order.
    after_sends: VecDeque<(u64, Receipt)>,
}

struct Receipt {
    id: Option<String>,
    /// DISCONNECT: close after it.
    close: bool,
}

impl State {
    /// Receipts whose SENDs are all confirmed now.
    fn due(&mut self) -> Vec<Receipt> {
        let first_open = self.unconfirmed.first().copied().unwrap_or(u64::MAX);
        let mut due = Vec::new();
        while self.after_sends.front().is_some_and(|(seq, _)| *seq < first_open) {
            if let Some((_, r)) = self.after_sends.pop_front() {
                due.push(r);
            }
        }
        due
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The result of the handshake: the negotiated version and the client's heart-beat.
struct Connected {
    user: Option<String>,
    version: &'static str,
    /// How often the client sends (0: never), from its `heart-beat`.
    client_sends_ms: u64,
    /// How often it wants to hear from us (0: never).
    client_wants_ms: u64,
}

fn heart_beat(f: &StompFrame) -> (u64, u64) {
    let Some((cx, cy)) = f.get("heart-beat").and_then(|h| h.split_once(',')) else { return (0, 0) };
    (cx.trim().parse().unwrap_or(0), cy.trim().parse().unwrap_or(0))
}

async fn handshake<R: AsyncRead + Unpin>(
    reader: &mut FramedRead<R, StompCodec>,
    peer: SocketAddr,
    cx: &ConnectionContext,
) -> Result<Connected, Option<StompFrame>> {
    // One deadline: heart-beats before CONNECT do not stretch it (a client
    // could otherwise hold a pending place for ever).
    let deadline = tokio::time::Instant::now() + connection::HELLO_TIMEOUT;
    let first = loop {
        match tokio::time::timeout_at(deadline, reader.next()).await {
            Err(_) => {
                tracing::info!("no CONNECT within {:?}; closing", connection::HELLO_TIMEOUT);
                return Err(Some(error_frame("expected CONNECT", None)));
            }
            Ok(None) => return Err(None),
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "bad first frame");
                return Err(Some(error_frame(&e.to_string(), None)));
            }
            Ok(Some(Ok(StompItem::Heartbeat))) => continue,
            Ok(Some(Ok(StompItem::Frame(f)))) => break f,
        }
    };
    if !matches!(first.command, Command::Connect | Command::Stomp) {
        return Err(Some(error_frame("the first frame must be CONNECT or STOMP", None)));
    }
    let offered = first.get("accept-version").unwrap_or("1.0");
    let version = if offered.split(',').any(|v| v.trim() == "1.2") {
        "1.2"
    } else if offered.split(',').any(|v| v.trim() == "1.1") {
        "1.1"
    } else {
        let mut f = error_frame(
            &format!(
                "no common STOMP version: the client offers {}, this broker speaks 1.1,1.2",
                crate::log_safe(offered, 32)
            ),
            None,
        );
        f = f.header("version", "1.1,1.2");
        return Err(Some(f));
    };
    let hello = ClientFrame::Hello {
        client_name: format!("stomp {}", crate::log_safe(first.get("host").unwrap_or(""), 32)),
        user: first.get("login").map(str::to_string),
        password: first.get("passcode").map(str::to_string),
        admin: false,
        versions: SUPPORTED_VERSIONS,
        ticket: None,
    };
    let (client_sends_ms, client_wants_ms) = heart_beat(&first);
    match connection::admit(hello, peer, cx).await {
        Ok(admitted) => Ok(Connected { user: admitted.user, version, client_sends_ms, client_wants_ms }),
        Err(None) => Err(None),
        Err(Some(ServerFrame::NotActive { .. })) => {
            let message = match stomp_hint(cx) {
                Some(active) => format!("this node is passive: the active node's STOMP address is {active}"),
                None => "this node is passive and knows no active node now: retry the other node".to_string(),
            };
            Err(Some(error_frame(&message, None)))
        }
        Err(Some(ServerFrame::Error(e))) => Err(Some(error_frame(&e.message, None))),
        Err(Some(_)) => Err(Some(error_frame("refused", None))),
    }
}

async fn serve_io<R, W>(rd: R, wr: W, peer: SocketAddr, cx: ConnectionContext, id: u64, pending: PendingSlot)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = FramedRead::new(rd, StompCodec::new(limits(&cx)));
    let mut writer = FramedWrite::new(wr, StompCodec::new(limits(&cx)));
    let connected = handshake(&mut reader, peer, &cx).await;
    drop(pending);
    let connected = match connected {
        Ok(c) => match SessionSlot::take(&cx) {
            Some(slot) => Ok((c, slot)),
            None => Err(Some(error_frame("too many connections (max_connections)", None))),
        },
        Err(e) => Err(e),
    };
    let (Connected { user, version, client_sends_ms, client_wants_ms }, _slot) = match connected {
        Ok(c) => c,
        Err(reply) => {
            if let Some(reply) = reply {
                tracing::info!(error = ?reply.get("message"), "STOMP connection refused");
                let _ = writer.send(StompItem::Frame(reply)).await;
            }
            let _ = writer.get_mut().shutdown().await;
            connection::linger(reader.into_inner()).await;
            return;
        }
    };
    let Some(router) = cx.router.borrow().clone() else {
        let _ = writer.send(StompItem::Frame(error_frame("this node stopped serving; reconnect", None))).await;
        return;
    };
    // We send every max(ours, what the client wants); we expect the client
    // every max(what it sends, ours) and close after twice that in silence.
    let send_every = (client_wants_ms > 0).then(|| Duration::from_millis(client_wants_ms.max(HEART_BEAT_MS)));
    let expect_every = (client_sends_ms > 0).then(|| Duration::from_millis(client_sends_ms.max(HEART_BEAT_MS)));
    let connected = StompFrame::new(Command::Connected)
        .header("version", version)
        .header("heart-beat", format!("{HEART_BEAT_MS},{HEART_BEAT_MS}"))
        .header("server", concat!("twinmq/", env!("CARGO_PKG_VERSION")))
        .header("session", id.to_string());
    if writer.send(StompItem::Frame(connected)).await.is_err() {
        return;
    }
    tracing::info!(user = ?user, version, "STOMP client connected");

    let (raw_tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    let tx = Outbound::new(raw_tx, queued.clone(), queued_bytes.clone(), cx.metrics.clone());
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
    let state = Arc::new(Mutex::new(State::default()));
    let (close_tx, close_rx) = oneshot::channel();
    // The writer tells the reader to stop (after an ERROR, or a DISCONNECT's receipt).
    let (ended_tx, mut ended_rx) = oneshot::channel::<()>();
    let out = Writer {
        writer,
        state: state.clone(),
        session: session.clone(),
        queued: queued.clone(),
        queued_bytes,
        send_every,
        ended: Some(ended_tx),
        version,
    };
    let write_task = actix_rt::spawn(out.run(rx, close_rx));

    let permits = Arc::new(Semaphore::new(cx.config.max_inflight_per_connection));
    let mut reader_state = Reader {
        state: state.clone(),
        tx: tx.clone(),
        next_sub: 1,
        subs_by_name: HashMap::new(),
        seq: 0,
        req: 0,
        transactions: HashMap::new(),
        held_bytes: 0,
        max_held_bytes: MAX_HELD_BYTES.max(4 * cx.config.max_message_bytes),
        max_message_bytes: cx.config.max_message_bytes,
        user: user.clone(),
        security: cx.security.clone(),
        version,
    };
    let mut shutdown = cx.shutdown.clone();
    let mut role = cx.shared.role_watch();
    let mut security = cx.security.clone();
    // Silence that closes the connection: twice the agreed heart-beat, or
    // without heart-beats `idle_timeout_ms`, as on the native port.
    let idle_timeout = cx.config.idle_timeout_ms.map(Duration::from_millis);
    let silence = expect_every.map(|d| d * 2).or(idle_timeout);
    let mut last_heard = tokio::time::Instant::now();
    // What a turn's read-ahead found after its frames (an error, the end).
    let mut carried = None;
    // A refusal: its ERROR goes out after the frames before it were handled
    // and their confirms are in (their receipts first).
    let mut failure: Option<(String, Option<String>)> = None;
    let idle = tokio::time::sleep(silence.unwrap_or(Duration::from_secs(86_400)));
    tokio::pin!(idle);
    loop {
        if queued.load(Ordering::Relaxed) > connection::MAX_QUEUED_FRAMES {
            while queued.load(Ordering::Relaxed) > connection::MAX_QUEUED_FRAMES && !write_task.is_finished() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            last_heard = tokio::time::Instant::now();
        }
        let item = if let Some(item) = carried.take() {
            item
        } else {
            tokio::select! {
            item = reader.next() => item,
            _ = &mut ended_rx => break,
            _ = &mut idle, if silence.is_some() => {
                let deadline = last_heard + silence.unwrap_or_default();
                if tokio::time::Instant::now() < deadline {
                    idle.as_mut().reset(deadline);
                    continue;
                }
                if expect_every.is_some() {
                    tracing::info!("no heart-beat from the STOMP client; closing");
                    reader_state.fail("no heart-beat received in twice the agreed interval; closing", None);
                } else {
                    let ms = idle_timeout.unwrap_or_default().as_millis();
                    tracing::info!(idle_ms = %ms, "idle STOMP connection; closing");
                    let message = format!("nothing received for {ms} ms (idle_timeout_ms); closing the connection");
                    reader_state.fail(&message, None);
                }
                break;
            }
            _ = shutdown.wait_for(|s| *s) => {
                reader_state.fail("broker is shutting down", None);
                break;
            }
            _ = role.wait_for(|r| !r.serves_clients()) => {
                tracing::info!("this node stopped serving; closing the STOMP connection");
                reader_state.fail("this node stopped serving; reconnect to the active node", None);
                break;
            }
            changed = security.changed() => {
                if changed.is_err() {
                    break;
                }
                if !security.borrow_and_update().still_valid(user.as_deref()) {
                    tracing::warn!(user = ?user, "user removed; closing the STOMP connection");
                    reader_state.fail("this user was removed", None);
                    break;
                }
                continue;
            }
            }
        };
        let frame = match item {
            None => {
                tracing::info!("STOMP client disconnected");
                break;
            }
            Some(Err(twinmq_protocol::stomp::StompError::Io(e))) => {
                tracing::info!(error = %e, "STOMP connection ended");
                break;
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "bad STOMP frame; closing connection");
                failure = Some((e.to_string(), None));
                break;
            }
            Some(Ok(StompItem::Heartbeat)) => {
                last_heard = tokio::time::Instant::now();
                continue;
            }
            Some(Ok(StompItem::Frame(f))) => f,
        };
        last_heard = tokio::time::Instant::now();
        // Frames already read go to the session together (one hand-off).
        let mut batch = Batch::default();
        let mut next = Some(frame);
        let mut end = false;
        let mut taken = 0;
        while let Some(frame) = next.take() {
            taken += 1;
            match reader_state.translate(frame, &mut batch) {
                Step::Go => {}
                Step::Disconnect => end = true,
                Step::Fail(message, receipt) => {
                    failure = Some((message, receipt));
                    end = true;
                }
            }
            // At most 256 frames a turn, whatever they are (BEGIN/ABORT add no native frame).
            if end || taken >= 256 {
                break;
            }
            match reader.next().now_or_never() {
                Some(Some(Ok(StompItem::Frame(f)))) => next = Some(f),
                Some(Some(Ok(StompItem::Heartbeat))) | None => {}
                // An error or the end: the next turn's read.
                Some(other) => {
                    carried = Some(other);
                    break;
                }
            }
        }
        if !batch.frames.is_empty() || !batch.after.is_empty() {
            let mut frames = Vec::with_capacity(batch.frames.len());
            let mut gone = false;
            for frame in batch.frames {
                let permit = if matches!(frame, ClientFrame::Publish { .. }) {
                    cx.metrics.message_in();
                    match permits.clone().try_acquire_owned() {
                        Ok(p) => Some(p),
                        Err(_) => {
                            // Out of permits: what is gathered goes first (its confirms free them).
                            if !frames.is_empty()
                                && session.send(Incoming { frames: std::mem::take(&mut frames) }).await.is_err()
                            {
                                gone = true;
                                break;
                            }
                            match permits.clone().acquire_owned().await {
                                Ok(p) => Some(p),
                                Err(_) => {
                                    gone = true;
                                    break;
                                }
                            }
                        }
                    }
                } else {
                    None
                };
                frames.push((frame, permit));
            }
            if gone || !frames.is_empty() && session.send(Incoming { frames }).await.is_err() {
                break;
            }
            // Receipts due once the session handled the batch: queued behind its answers.
            for receipt in batch.after {
                reader_state.receipt_after_session(receipt);
            }
        }
        if end || !session.connected() {
            break;
        }
    }
    let all = u32::try_from(cx.config.max_inflight_per_connection).unwrap_or(u32::MAX);
    if cx.shared.role().serves_clients() {
        if let Ok(Ok(drained)) = tokio::time::timeout(connection::DRAIN_TIMEOUT, permits.acquire_many(all)).await {
            // Confirms are queued before their permits come back: every
            // receipt due is ahead of the ERROR now.
            drop(drained);
        }
    }
    if let Some((message, receipt)) = failure {
        reader_state.fail(&message, receipt.as_deref());
    }
    session.do_send(Closed);
    drop(tx);
    drop(reader_state);
    let _ = close_tx.send(());
    let _ = write_task.await;
    connection::linger(reader.into_inner()).await;
}

/// What one transaction holds until COMMIT.
#[derive(Default)]
struct Held {
    frames: Vec<ClientFrame>,
    bytes: usize,
}

/// The native frames one turn hands to the session, and the receipts due
/// once it handled them.
#[derive(Default)]
struct Batch {
    frames: Vec<ClientFrame>,
    after: Vec<Receipt>,
}

enum Step {
    Go,
    /// DISCONNECT: stop reading (its receipt, if any, closes the writer).
    Disconnect,
    /// Refuse: an ERROR (with the frame's receipt, if any), then close.
    Fail(String, Option<String>),
}

/// The reader's side: STOMP frames into native ones.
struct Reader {
    state: Arc<Mutex<State>>,
    tx: Outbound,
    next_sub: u32,
    /// The client's subscription ids: native id and ack mode.
    subs_by_name: HashMap<String, (u32, AckMode)>,
    /// Sequence of this connection's SENDs (the native publish `seq`).
    seq: u64,
    /// Request ids of receipts answered through `Done`.
    req: u64,
    /// Open transactions: the frames held until COMMIT.
    transactions: HashMap<String, Held>,
    /// Bytes of the messages every open transaction holds, and its bound.
    held_bytes: usize,
    max_held_bytes: usize,
    /// `max_message_bytes`, and the rights a transaction's SEND is checked
    /// against when it is sent (a refusal at COMMIT would leave the rest
    /// stored: not atomic).
    max_message_bytes: usize,
    user: Option<String>,
    security: tokio::sync::watch::Receiver<Arc<crate::security::SecurityDb>>,
    version: &'static str,
}

impl Reader {
    /// An ERROR, queued behind what the session already sent, then close.
    fn fail(&mut self, message: &str, receipt: Option<&str>) {
        self.req += 1;
        // The receipt first: the writer looks it up when the ERROR arrives.
        lock(&self.state).request_receipts.insert(self.req, Receipt { id: receipt.map(str::to_string), close: true });
        let _ = self.tx.send(ServerFrame::Error(ErrorFrame::new(
            twinmq_protocol::ErrorCode::ProtocolViolation,
            ErrorContext::Request { req: self.req },
            message,
        )));
    }

    /// A receipt due now: through the session's channel, so that it follows
    /// every answer the session queued before it.
    fn receipt_after_session(&mut self, receipt: Receipt) {
        self.req += 1;
        lock(&self.state).request_receipts.insert(self.req, receipt);
        let _ = self.tx.send(ServerFrame::Done { req: self.req });
    }

    fn translate(&mut self, f: StompFrame, batch: &mut Batch) -> Step {
        let receipt = f.get("receipt").map(str::to_string);
        match self.translate_inner(f, batch, receipt.clone()) {
            Ok(step) => step,
            Err(message) => Step::Fail(message, receipt),
        }
    }

    fn translate_inner(&mut self, f: StompFrame, batch: &mut Batch, receipt: Option<String>) -> Result<Step, String> {
        let required = |name: &str| -> Result<String, String> {
            f.get(name).map(str::to_string).ok_or_else(|| format!("{} needs a `{name}` header", f.command.as_str()))
        };
        match f.command {
            Command::Send => {
                let destination = destination(&required("destination")?)?;
                let persistent = f.get("persistent") != Some("false");
                let ttl_ms = match f.get("expires") {
                    None | Some("0") => None,
                    Some(t) => {
                        let at: u64 = t.parse().map_err(|_| {
                            format!("`expires` must be milliseconds since the epoch, not `{}`", crate::log_safe(t, 32))
                        })?;
                        Some(at.saturating_sub(crate::now_ms()).max(1))
                    }
                };
                let mut headers = std::collections::BTreeMap::new();
                for (k, v) in &f.headers {
                    if !SEND_HEADERS.contains(&k.as_str()) {
                        // The first of repeated headers wins (STOMP 1.2).
                        headers.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                }
                let message = OutMessage { headers, payload: f.body.to_vec(), ttl_ms, persistent };
                let transaction = f.get("transaction").map(str::to_string);
                match transaction {
                    Some(t) => {
                        // Checked now, as the session would at COMMIT.
                        let size = message.size();
                        if size > self.max_message_bytes {
                            return Err(format!(
                                "message of {size} bytes exceeds max_message_bytes ({})",
                                self.max_message_bytes
                            ));
                        }
                        let allowed = self.security.borrow().allows(
                            self.user.as_deref(),
                            twinmq_protocol::Permission::Produce,
                            &destination,
                        );
                        if !allowed {
                            return Err(format!("not authorized to produce to {destination}"));
                        }
                        if self.held_bytes + size > self.max_held_bytes {
                            return Err(format!(
                                "the open transactions of this connection hold at most {} bytes",
                                self.max_held_bytes
                            ));
                        }
                        let held = self
                            .transactions
                            .get_mut(&t)
                            .ok_or_else(|| format!("unknown transaction `{}`", crate::log_safe(&t, 64)))?;
                        if held.frames.len() >= MAX_TRANSACTION_FRAMES {
                            return Err(format!("a transaction holds at most {MAX_TRANSACTION_FRAMES} frames"));
                        }
                        held.frames.push(ClientFrame::Publish { producer_id: 0, seq: 0, destination, message });
                        held.bytes += size;
                        self.held_bytes += size;
                        if let Some(r) = receipt {
                            batch.after.push(Receipt { id: Some(r), close: false });
                        }
                    }
                    None => {
                        let seq = self.publish(destination, message, batch);
                        if let Some(r) = receipt {
                            let mut st = lock(&self.state);
                            st.send_receipts.insert(seq, r.clone());
                            st.after_sends.push_back((seq, Receipt { id: Some(r), close: false }));
                        }
                    }
                }
                Ok(Step::Go)
            }
            Command::Subscribe => {
                let name = required("id")?;
                if self.subs_by_name.contains_key(&name) {
                    return Err(format!("subscription id `{}` is already in use", crate::log_safe(&name, 64)));
                }
                let destination = destination(&required("destination")?)?;
                let ack = match f.get("ack").unwrap_or("auto") {
                    "auto" => AckMode::Auto,
                    "client" => AckMode::Client,
                    "client-individual" => AckMode::ClientIndividual,
                    other => {
                        return Err(format!(
                            "ack `{}`: use auto, client or client-individual",
                            crate::log_safe(other, 32)
                        ))
                    }
                };
                let durable = f
                    .get("durable-subscription-name")
                    .or_else(|| f.get("activemq.subscriptionName"))
                    .map(str::to_string);
                if durable.is_some() && destination.kind != DestKind::Topic {
                    return Err("a durable subscription is for a /topic/ destination".to_string());
                }
                let prefetch = match f.get("activemq.prefetchSize").or_else(|| f.get("prefetch-count")) {
                    None => DEFAULT_PREFETCH,
                    Some(p) => p
                        .parse::<u32>()
                        .ok()
                        .filter(|p| (1..=65_536).contains(p))
                        .ok_or_else(|| format!("prefetch `{}` must be 1..=65536", crate::log_safe(p, 32)))?,
                };
                let sub_id = self.next_sub;
                self.next_sub = self.next_sub.wrapping_add(1).max(1);
                self.subs_by_name.insert(name.clone(), (sub_id, ack));
                {
                    let mut st = lock(&self.state);
                    st.subs.insert(sub_id, Sub::new(name, ack));
                    if let Some(r) = receipt {
                        st.subscribe_receipts.insert(sub_id, r);
                    }
                }
                batch.frames.push(ClientFrame::Subscribe { sub_id, destination, durable, prefetch });
                Ok(Step::Go)
            }
            Command::Unsubscribe => {
                let name = required("id")?;
                let (sub_id, _) = self
                    .subs_by_name
                    .remove(&name)
                    .ok_or_else(|| format!("no subscription with id `{}`", crate::log_safe(&name, 64)))?;
                batch.frames.push(ClientFrame::Unsubscribe { sub_id });
                // The writer drops deliveries of a subscription it no longer knows.
                batch.after.push(Receipt { id: receipt, close: false });
                lock(&self.state).subs.remove(&sub_id);
                Ok(Step::Go)
            }
            Command::Ack | Command::Nack => {
                // 1.2 names the delivery by `id` (the MESSAGE's `ack`); 1.1 by
                // `message-id`, which a 1.1 MESSAGE carries as the same value.
                let ack_id = match (self.version, f.get("id")) {
                    (_, Some(id)) => id.to_string(),
                    ("1.1", None) => required("message-id")?,
                    _ => required("id")?,
                };
                let (sub_id, n) = parse_ack_id(&ack_id)?;
                let nack = f.command == Command::Nack;
                let ids = {
                    let mut st = lock(&self.state);
                    let Some(sub) = st.subs.get_mut(&sub_id) else {
                        return Err(format!(
                            "{}: no open subscription for `{}`",
                            f.command.as_str(),
                            crate::log_safe(&ack_id, 64)
                        ));
                    };
                    if sub.ack == AckMode::Auto {
                        // Acked when sent: nothing more to do.
                        drop(st);
                        batch.after.push(Receipt { id: receipt, close: false });
                        return Ok(Step::Go);
                    }
                    // `client`: an ACK or a NACK covers every delivery sent up
                    // to it and not settled yet (STOMP 1.2); `client-individual`: the one.
                    sub.settle(n, sub.ack == AckMode::Client)
                };
                if ids.is_empty() {
                    return Err(format!(
                        "{}: `{}` is no delivery waiting for an ack",
                        f.command.as_str(),
                        crate::log_safe(&ack_id, 64)
                    ));
                }
                let mut frames: Vec<ClientFrame> = ids
                    .into_iter()
                    .map(|id| match nack {
                        true => ClientFrame::Nack { sub_id, id, delay_ms: None },
                        false => ClientFrame::Ack { sub_id, id, receipt: None, through: false },
                    })
                    .collect();
                if let Some(t) = f.get("transaction") {
                    let held = self
                        .transactions
                        .get_mut(t)
                        .ok_or_else(|| format!("unknown transaction `{}`", crate::log_safe(t, 64)))?;
                    if held.frames.len() + frames.len() > MAX_TRANSACTION_FRAMES {
                        return Err(format!("a transaction holds at most {MAX_TRANSACTION_FRAMES} frames"));
                    }
                    held.frames.extend(frames);
                    batch.after.push(Receipt { id: receipt, close: false });
                    return Ok(Step::Go);
                }
                match receipt {
                    // An ACK's receipt: once the acks are stored (native `Ack { receipt }` on
                    // the last; the queue stores a turn's acks in one submission).
                    Some(r) if !nack => {
                        self.req += 1;
                        lock(&self.state).request_receipts.insert(self.req, Receipt { id: Some(r), close: false });
                        if let Some(ClientFrame::Ack { receipt, .. }) = frames.last_mut() {
                            *receipt = Some(self.req);
                        }
                        batch.frames.extend(frames);
                    }
                    r => {
                        batch.frames.extend(frames);
                        batch.after.push(Receipt { id: r, close: false });
                    }
                }
                Ok(Step::Go)
            }
            Command::Begin => {
                let t = required("transaction")?;
                if self.transactions.contains_key(&t) {
                    return Err(format!("transaction `{}` is already open", crate::log_safe(&t, 64)));
                }
                if self.transactions.len() >= MAX_TRANSACTIONS {
                    return Err(format!("at most {MAX_TRANSACTIONS} open transactions per connection"));
                }
                self.transactions.insert(t, Held::default());
                batch.after.push(Receipt { id: receipt, close: false });
                Ok(Step::Go)
            }
            Command::Commit => {
                let t = required("transaction")?;
                let held = self
                    .transactions
                    .remove(&t)
                    .ok_or_else(|| format!("unknown transaction `{}`", crate::log_safe(&t, 64)))?;
                self.held_bytes -= held.bytes;
                let mut last = None;
                for frame in held.frames {
                    match frame {
                        ClientFrame::Publish { destination, message, .. } => {
                            let seq = self.publish(destination, message, batch);
                            if let Some(r) = &receipt {
                                // A refusal of one of them names the COMMIT.
                                lock(&self.state).send_receipts.insert(seq, r.clone());
                            }
                            last = Some(seq);
                        }
                        other => batch.frames.push(other),
                    }
                }
                let r = Receipt { id: receipt, close: false };
                match last {
                    // Answered once every SEND of the transaction is confirmed.
                    Some(seq) => lock(&self.state).after_sends.push_back((seq, r)),
                    None => batch.after.push(r),
                }
                Ok(Step::Go)
            }
            Command::Abort => {
                let t = required("transaction")?;
                let held = self
                    .transactions
                    .remove(&t)
                    .ok_or_else(|| format!("unknown transaction `{}`", crate::log_safe(&t, 64)))?;
                self.held_bytes -= held.bytes;
                batch.after.push(Receipt { id: receipt, close: false });
                Ok(Step::Go)
            }
            Command::Disconnect => {
                // Its receipt once every SEND so far is confirmed; then the writer closes.
                if receipt.is_some() {
                    let r = Receipt { id: receipt, close: true };
                    let mut st = lock(&self.state);
                    match st.unconfirmed.last().copied() {
                        Some(seq) => st.after_sends.push_back((seq, r)),
                        None => {
                            drop(st);
                            batch.after.push(r);
                        }
                    }
                }
                Ok(Step::Disconnect)
            }
            Command::Connect | Command::Stomp => Err("already connected".to_string()),
            other => Err(format!("a client does not send {}", other.as_str())),
        }
    }

    /// A SEND (now, or at its COMMIT) as a native publish: its `seq`.
    fn publish(&mut self, destination: Destination, message: OutMessage, batch: &mut Batch) -> u64 {
        self.seq += 1;
        lock(&self.state).unconfirmed.insert(self.seq);
        batch.frames.push(ClientFrame::Publish { producer_id: 0, seq: self.seq, destination, message });
        self.seq
    }
}

/// A MESSAGE's `ack` header: `SUB-N`, N counting the subscription's deliveries.
fn ack_id(sub_id: u32, n: u64) -> String {
    format!("{sub_id}-{n}")
}

fn parse_ack_id(text: &str) -> Result<(u32, u64), String> {
    let bad = || format!("`{}` is not an ack id of this connection", crate::log_safe(text, 64));
    let (sub, n) = text.split_once('-').ok_or_else(bad)?;
    Ok((sub.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?))
}

/// The writer's side: native answers into STOMP frames, and heart-beats.
struct Writer<W: AsyncWrite + Unpin> {
    writer: FramedWrite<W, StompCodec>,
    state: Arc<Mutex<State>>,
    session: Addr<Session>,
    queued: Arc<AtomicUsize>,
    queued_bytes: Arc<AtomicUsize>,
    send_every: Option<Duration>,
    ended: Option<oneshot::Sender<()>>,
    version: &'static str,
}

/// What one native frame becomes.
enum Out {
    Frames(Vec<StompFrame>),
    /// Write these, then close the connection.
    Last(Vec<StompFrame>),
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<ServerFrame>, mut close: oneshot::Receiver<()>) {
        let beat = self.send_every.unwrap_or(Duration::from_secs(86_400));
        let mut last_write = tokio::time::Instant::now();
        loop {
            let frame = tokio::select! {
                biased;
                f = rx.recv() => f,
                _ = &mut close => {
                    while let Ok(f) = rx.try_recv() {
                        if !self.feed(f).await {
                            break;
                        }
                    }
                    let _ = SinkExt::<StompItem>::flush(&mut self.writer).await;
                    break;
                }
                _ = tokio::time::sleep_until(last_write + beat), if self.send_every.is_some() => {
                    if self.writer.send(StompItem::Heartbeat).await.is_err() {
                        break;
                    }
                    last_write = tokio::time::Instant::now();
                    continue;
                }
            };
            let Some(frame) = frame else { break };
            let mut open = self.feed(frame).await;
            while open {
                let Ok(f) = rx.try_recv() else { break };
                open = self.feed(f).await;
            }
            if SinkExt::<StompItem>::flush(&mut self.writer).await.is_err() || !open {
                break;
            }
            last_write = tokio::time::Instant::now();
        }
        let _ = SinkExt::<StompItem>::flush(&mut self.writer).await;
        let _ = self.writer.get_mut().shutdown().await;
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(());
        }
    }

    /// Write what `frame` becomes; false once the connection is to close.
    async fn feed(&mut self, frame: ServerFrame) -> bool {
        self.queued.fetch_sub(1, Ordering::Relaxed);
        self.queued_bytes.fetch_sub(Outbound::cost(&frame), Ordering::Relaxed);
        let (frames, open) = match self.translate(frame) {
            Out::Frames(f) => (f, true),
            Out::Last(f) => (f, false),
        };
        for f in frames {
            if self.writer.feed(StompItem::Frame(f)).await.is_err() {
                return false;
            }
        }
        open
    }

    fn translate(&mut self, frame: ServerFrame) -> Out {
        let receipt = |id: String| StompFrame::new(Command::Receipt).header("receipt-id", id);
        match frame {
            ServerFrame::Deliver { sub_id, message } => {
                let v11 = self.version == "1.1";
                // 1.1 has no escape for a CR in a header: it becomes a space.
                let text = |t: String| if v11 && t.contains('\r') { t.replace('\r', " ") } else { t };
                let mut st = lock(&self.state);
                let Some(sub) = st.subs.get_mut(&sub_id) else {
                    // Unsubscribed meanwhile: the session puts it back.
                    return Out::Frames(Vec::new());
                };
                let auto = sub.ack == AckMode::Auto;
                let ack = (!auto).then(|| ack_id(sub_id, sub.delivered(message.id)));
                // 1.1 acks by `message-id` (and `subscription`): there it is the ack id.
                let message_id = match (&ack, v11) {
                    (Some(ack), true) => ack.clone(),
                    _ => format!("{}-{}", message.id.epoch, message.id.seq),
                };
                let mut f = StompFrame::new(Command::Message)
                    .header("subscription", text(sub.name.clone()))
                    .header("message-id", message_id)
                    .header("destination", text(destination_text(&message.destination)))
                    .header("timestamp", message.timestamp_ms.to_string())
                    .header("persistent", if message.persistent { "true" } else { "false" });
                drop(st);
                if let Some(ack) = ack {
                    f = f.header("ack", ack);
                }
                if message.redelivered {
                    f = f.header("redelivered", "true");
                }
                if let Some(at) = message.expires_at_ms {
                    f = f.header("expires", at.to_string());
                }
                for (k, v) in message.headers {
                    if !MESSAGE_HEADERS.contains(&k.as_str()) {
                        f = f.header(&text(k), text(v));
                    }
                }
                if auto {
                    // `auto`: acknowledged as it is sent.
                    let ack = ClientFrame::Ack { sub_id, id: message.id, receipt: None, through: false };
                    self.session.do_send(Incoming { frames: vec![(ack, None)] });
                }
                Out::Frames(vec![f.body(message.payload)])
            }
            ServerFrame::Confirm { seq, .. } => {
                let due = {
                    let mut st = lock(&self.state);
                    st.unconfirmed.remove(&seq);
                    st.send_receipts.remove(&seq);
                    st.due()
                };
                self.receipts(due)
            }
            ServerFrame::Subscribed { sub_id } => {
                let r = lock(&self.state).subscribe_receipts.remove(&sub_id);
                Out::Frames(r.map(receipt).into_iter().collect())
            }
            ServerFrame::Done { req } => {
                let r = lock(&self.state).request_receipts.remove(&req);
                self.receipts(r.into_iter().collect())
            }
            ServerFrame::ConsumerClosed { sub_id, reason } => {
                let name = lock(&self.state).subs.remove(&sub_id).map(|s| s.name).unwrap_or_default();
                Out::Last(vec![error_frame(&format!("subscription `{name}` was closed by the broker: {reason}"), None)])
            }
            ServerFrame::Error(e) => {
                let mut st = lock(&self.state);
                let (receipt, message) = match e.context {
                    ErrorContext::Publish { seq, .. } => (st.send_receipts.remove(&seq), e.message),
                    ErrorContext::Subscribe { sub_id } => {
                        let name = st.subs.remove(&sub_id).map(|s| s.name).unwrap_or_default();
                        (st.subscribe_receipts.remove(&sub_id), format!("subscription `{name}`: {}", e.message))
                    }
                    ErrorContext::Request { req } => (st.request_receipts.remove(&req).and_then(|r| r.id), e.message),
                    ErrorContext::Connection => (None, e.message),
                };
                let code = format!("{:?}", e.code);
                drop(st);
                tracing::info!(code, message = %message, "STOMP ERROR sent; closing");
                let mut f = error_frame(&message, receipt.as_deref());
                // Our own failures carry the code only when the session raised them.
                if !matches!(e.code, twinmq_protocol::ErrorCode::ProtocolViolation) {
                    f = f.header("code", code);
                }
                Out::Last(vec![f])
            }
            ServerFrame::NotActive { .. } => {
                Out::Last(vec![error_frame("this node stopped serving; reconnect to the active node", None)])
            }
            // Not asked for over STOMP.
            ServerFrame::Welcome { .. }
            | ServerFrame::StatusReply { .. }
            | ServerFrame::Pong { .. }
            | ServerFrame::AdminReply { .. } => Out::Frames(Vec::new()),
        }
    }

    fn receipts(&self, due: Vec<Receipt>) -> Out {
        let close = due.iter().any(|r| r.close);
        let frames = due
            .into_iter()
            .filter_map(|r| r.id)
            .map(|id| StompFrame::new(Command::Receipt).header("receipt-id", id))
            .collect();
        if close {
            Out::Last(frames)
        } else {
            Out::Frames(frames)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn ack_ids_round_trip_and_refuse_what_is_not_theirs() {
        assert_eq!(parse_ack_id(&ack_id(9, 77)).unwrap(), (9, 77));
        for bad in ["", "1", "1-", "x-1", "1-y", "-1", "1-2-3"] {
            assert!(parse_ack_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_cumulative_ack_settles_what_was_sent_up_to_it() {
        let mut sub = Sub::new("s".into(), AckMode::Client);
        let id = |seq| MessageId { epoch: 1, seq };
        let (n1, n2, n3) = (sub.delivered(id(5)), sub.delivered(id(6)), sub.delivered(id(7)));
        assert_eq!(sub.settle(n1, false), [id(5)], "a NACK of m1");
        let n4 = sub.delivered(id(5)); // m1 again, sent after m3
        assert_eq!(sub.settle(n3, true), [id(6), id(7)], "not m1's redelivery");
        assert!(sub.settle(n2, true).is_empty(), "settled already");
        assert_eq!(sub.settle(n4, true), [id(5)]);
    }

    #[test]
    fn destinations_are_queue_or_topic_paths() {
        assert_eq!(destination("/queue/a.b").unwrap(), Destination::queue("a.b"));
        assert_eq!(destination("/topic/t").unwrap(), Destination::topic("t"));
        assert!(destination("/exchange/x").unwrap_err().contains("/queue/NAME"));
        assert_eq!(destination_text(&Destination::topic("t")), "/topic/t");
    }

    #[test]
    fn receipts_wait_for_every_earlier_send() {
        let mut st = State::default();
        st.unconfirmed.extend([1, 2, 3]);
        st.after_sends.push_back((2, Receipt { id: Some("r2".into()), close: false }));
        st.after_sends.push_back((3, Receipt { id: Some("r3".into()), close: false }));
        st.unconfirmed.remove(&2);
        assert!(st.due().is_empty(), "1 is not confirmed yet");
        st.unconfirmed.remove(&1);
        let due: Vec<_> = st.due().into_iter().filter_map(|r| r.id).collect();
        assert_eq!(due, ["r2"]);
        st.unconfirmed.remove(&3);
        let due: Vec<_> = st.due().into_iter().filter_map(|r| r.id).collect();
        assert_eq!(due, ["r3"]);
    }

    #[test]
    fn a_refusal_is_one_error_frame() {
        let bytes = refusal("too many: now\nreally");
        assert_eq!(bytes, b"ERROR\nmessage:too many  now really\n\n\0");
    }
}
