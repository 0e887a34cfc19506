//! The connection task: the one owner of the socket and of all per-connection state.
//!
//! Handles ([`crate::Client`], [`crate::Producer`], [`crate::Consumer`],
//! [`crate::Delivery`]) send it [`Command`]s over one bounded channel; it
//! encodes frames, matches the broker's answers to the waiting callers and
//! routes deliveries to consumers. Because it is the only owner, sequence
//! numbers are assigned here, in the order frames go on the wire, which is the
//! order the broker's idempotence check expects.
//!
//! Everything needed to carry on over another connection is kept here:
//! every unconfirmed publish (its frame, with the caller's oneshot and window
//! permit) per producer, the spec of every subscription and every unanswered
//! request. When the connection is lost (end of stream, reset, write error,
//! an error frame for the whole connection, or [`ClientConfig::heartbeat_timeout`]
//! without a single frame) the task goes [`Phase::Offline`]: it keeps taking
//! commands, which only add to that state, and dials the pair again
//! ([`crate::dial`]). On a new connection it is [`Phase::Restoring`]: every
//! subscription is sent again under its id, and once the broker has answered
//! all of them, every unconfirmed publish goes out again in its original
//! order (same producer id and sequence: the broker stores a resend once),
//! then the pending requests, and the task is [`Phase::Online`]. Only when
//! no node accepts us within [`ClientConfig::failover_timeout`] (or refuses
//! our credentials) does the task fail everything, as described in the
//! crate docs.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};
use twinmq_protocol::{
    ClientFrame, Delivered, Destination, ErrorContext, ErrorFrame, MessageId, OutMessage, ServerFrame,
};

use crate::consumer::{Delivery, Inbound};
use crate::dial::{Backoff, Dialer};
use crate::events::{ClientEvent, Events};
use crate::link::{frame_name, is_final, Framing, Link, ServerInfo, TicketSlot};
use crate::{ClientConfig, ClientError, Confirmed, ErrorCode};

/// The first protocol version with `Nack { delay_ms }` and `Terminate`.
const SETTLE_V2: u8 = 2;

/// What a consumer does with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SettleHow {
    Ack,
    /// An ack the broker answers once it is stored.
    AckStored,
    /// This delivery and every earlier one the consumer holds.
    AckThrough,
    Nack {
        delay: Option<Duration>,
    },
    Terminate,
}

/// Where the answer to a command goes.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, ClientError>>;

/// What a consumer receives: deliveries, then possibly one error that ends it.
pub(crate) type DeliverySender = mpsc::UnboundedSender<Inbound>;

/// Room in the command channel. Producers are bounded by their window and
/// acks by the prefetch, so this only smooths bursts.
const COMMAND_QUEUE: usize = 1024;

/// Commands processed per wake-up before looking at the socket again, so that
/// a burst of publishes becomes one write without starving reads.
const COMMAND_BATCH: usize = 64;

/// Above this many encoded bytes not yet written the task stops taking new
/// commands, which is what pushes back on producers when the socket is
/// slower than they are.
const HIGH_WATER: usize = 256 * 1024;

/// How long an orderly close waits for the broker to end the connection after our Bye.
const BYE_GRACE: Duration = Duration::from_secs(1);

/// A connection that ends sooner than this after it was made counts as
/// flapping: the next reconnect waits a growing pause first (see `run`).
const FLAP_WINDOW: Duration = Duration::from_secs(1);

/// Requests from the handles to the connection task.
pub(crate) enum Command {
    Publish {
        producer_id: u64,
        destination: Destination,
        message: OutMessage,
        /// The producer's window slot; released when the confirm or error arrives.
        permit: OwnedSemaphorePermit,
        done: Reply<Confirmed>,
    },
    /// The last handle of this producer is gone: forget it once it is settled.
    ProducerDropped {
        producer_id: u64,
    },
    Subscribe {
        spec: SubscriptionSpec,
        deliveries: DeliverySender,
        done: Reply<u32>,
    },
    Unsubscribe {
        sub_id: u32,
    },
    /// Ack, nack or terminate a delivery; answered `Ok` once the frame is
    /// queued on the connection that carries the consumer.
    Settle {
        sub_id: u32,
        id: MessageId,
        how: SettleHow,
        done: Reply<()>,
    },
    DeleteDurable {
        topic: String,
        name: String,
        done: Reply<()>,
    },
    Status {
        done: Reply<String>,
    },
    Close {
        done: Reply<()>,
    },
}

/// What a subscription is, enough to re-create it on another connection.
#[derive(Debug, Clone)]
pub(crate) struct SubscriptionSpec {
    pub(crate) destination: Destination,
    pub(crate) durable: Option<String>,
    pub(crate) prefetch: u32,
}

/// Why the connection task ended, once it has.
#[derive(Debug, Clone)]
enum Ended {
    /// [`crate::Client::close`], or every handle dropped.
    Closed,
    /// No active node within `failover_timeout`, or our credentials refused (`Some`).
    GaveUp(Option<(ErrorCode, String)>),
}

/// Why the connection task ended, once it has; holds no channel open.
#[derive(Debug, Clone)]
pub(crate) struct EndReason(Arc<OnceLock<Ended>>);

impl EndReason {
    pub(crate) fn error(&self) -> ClientError {
        match self.0.get() {
            Some(Ended::Closed) => ClientError::Closed,
            Some(Ended::GaveUp(Some((code, message)))) => ClientError::Broker { code: *code, message: message.clone() },
            Some(Ended::GaveUp(None)) | None => ClientError::Disconnected,
        }
    }
}

/// The handles' way to the connection task: its command channel, and why
/// the task ended once it has, so that a call made after the end (a send
/// after the user was removed, say) returns that reason rather than a bare
/// [`ClientError::Disconnected`].
#[derive(Debug, Clone)]
pub(crate) struct Commands {
    tx: mpsc::Sender<Command>,
    ended: Arc<OnceLock<Ended>>,
}

impl Commands {
    /// A new channel: the handles' end and the task's.
    pub(crate) fn channel() -> (Commands, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        (Commands { tx, ended: Arc::default() }, rx)
    }

    /// Queue `command` for the task; the task's end reason if it is gone.
    pub(crate) async fn send(&self, command: Command) -> Result<(), ClientError> {
        self.tx.send(command).await.map_err(|_| self.ended())
    }

    /// Queue `command` if there is room; for best-effort notices from `Drop`.
    pub(crate) fn try_send(&self, command: Command) {
        let _ = self.tx.try_send(command);
    }

    /// What a call gets once the task has ended (or dropped its answer).
    pub(crate) fn ended(&self) -> ClientError {
        self.end_reason().error()
    }

    /// Why the task ended, without keeping the channel open (for a `Confirm`).
    pub(crate) fn end_reason(&self) -> EndReason {
        EndReason(self.ended.clone())
    }

    /// Wait for the answer to a command already sent.
    pub(crate) async fn answer<T>(&self, answer: oneshot::Receiver<Result<T, ClientError>>) -> Result<T, ClientError> {
        answer.await.unwrap_or_else(|_| Err(self.ended()))
    }
}

/// Send `command` built around a fresh reply channel and wait for the answer.
pub(crate) async fn request<T>(
    commands: &Commands,
    command: impl FnOnce(Reply<T>) -> Command,
) -> Result<T, ClientError> {
    let (done, answer) = oneshot::channel();
    commands.send(command(done)).await?;
    commands.answer(answer).await
}

struct ProducerState {
    next_seq: u64,
    /// Sent (or waiting to be sent) and not yet settled, in sequence order:
    /// what a reconnect sends again.
    unconfirmed: VecDeque<Unconfirmed>,
    /// The handles are gone; remove the state once `unconfirmed` is empty.
    dropped: bool,
}

struct Unconfirmed {
    seq: u64,
    /// Place in the client-wide send order, so that a resend replays the
    /// publishes of all producers interleaved as they were first sent.
    order: u64,
    /// The `Publish` frame, kept for resending on another connection.
    frame: ClientFrame,
    done: Reply<Confirmed>,
    _permit: OwnedSemaphorePermit,
}

enum SubState {
    /// `subscribe` is waiting for the broker's first `Subscribed`.
    Subscribing(Reply<u32>),
    /// Re-created on a new connection; `Subscribed` not received yet.
    Resubscribing,
    /// Registered on the current connection.
    Live,
}

struct Subscription {
    spec: SubscriptionSpec,
    deliveries: DeliverySender,
    state: SubState,
    /// Deliveries of the current connection that wait in the consumer's
    /// channel. Replaced by a fresh counter on every connection: deliveries
    /// of an earlier one still waiting there count against nothing.
    waiting: Arc<AtomicUsize>,
}

enum Answer {
    Done(Reply<()>),
    Status(Reply<String>),
    /// An ack with a receipt: the broker's refusal means "not settled".
    Settled(Reply<()>),
}

impl Answer {
    fn fail(self, error: ClientError) {
        match self {
            Answer::Done(done) => {
                let _ = done.send(Err(error));
            }
            Answer::Settled(done) => {
                let error = match error {
                    ClientError::Broker { code: ErrorCode::InvalidRequest, message } => {
                        ClientError::NotSettled { reason: message }
                    }
                    other => other,
                };
                let _ = done.send(Err(error));
            }
            Answer::Status(done) => {
                let _ = done.send(Err(error));
            }
        }
    }
}

struct PendingRequest {
    /// The request frame, kept for sending again on another connection.
    frame: ClientFrame,
    answer: Answer,
}

struct Closing {
    waiters: Vec<Reply<()>>,
    deadline: Instant,
}

/// Where the task stands with its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No connection: nothing is written, commands only add to the state
    /// that the next connection replays.
    Offline,
    /// A new connection, re-creating the subscriptions: publishes and
    /// requests wait until the broker answered every one, so that nothing
    /// is routed before the subscriptions exist. Counts those registered.
    Restoring { resubscribed: usize },
    /// Frames go out as they come.
    Online,
}

/// Why [`Connection::serve`] returned.
enum End {
    /// The connection is gone, for this reason.
    Lost(String),
    /// A close was asked for and everything is settled, or its deadline passed.
    Close,
}

/// How an outage ended.
enum Reconnect {
    Connected(Link, ServerInfo),
    /// A close was asked for during the outage and is due.
    Close,
    /// No active node in time, or our credentials were refused (`refusal`).
    GaveUp {
        reason: String,
        refusal: Option<(ErrorCode, String)>,
    },
}

pub(crate) struct Connection {
    commands: mpsc::Receiver<Command>,
    /// Lets deliveries carry a command sender for their ack without the task
    /// itself keeping the channel open: when every handle is gone, `recv`
    /// returns `None` and the task closes the connection.
    command_sender: mpsc::WeakSender<Command>,
    /// Set once, when the task ends: what the handles' calls return afterwards.
    ended: Arc<OnceLock<Ended>>,
    /// False once every handle is gone.
    handles_alive: bool,
    producers: HashMap<u64, ProducerState>,
    /// Ordered by id, so that a reconnect re-creates them in creation order.
    subscriptions: BTreeMap<u32, Subscription>,
    /// Ordered by id, so that a reconnect sends them again in order.
    requests: BTreeMap<u64, PendingRequest>,
    next_sub_id: u32,
    next_req: u64,
    next_order: u64,
    next_nonce: u64,
    config: Arc<ClientConfig>,
    closing: Option<Closing>,
    events: Events,
    /// The node we are (or were last) connected to, for [`crate::Client::server`].
    server: watch::Sender<ServerInfo>,
    phase: Phase,
    /// The current connection did work (a confirm, a delivery, an answer):
    /// losing it is a failover, not a node that welcomes and then refuses.
    did_work: bool,
    /// Frames encoded for the current connection and not written yet; the
    /// task stops taking commands above [`HIGH_WATER`]. Emptied when the
    /// connection is lost: its content is replayed from the state instead.
    wbuf: BytesMut,
    /// How frames are made for the current connection: its frame limit and protocol version.
    framing: Framing,
    /// The session ticket for the next reconnect.
    ticket: TicketSlot,
}

impl Connection {
    pub(crate) fn new(
        commands: mpsc::Receiver<Command>,
        handles: &Commands,
        ticket: TicketSlot,
        config: Arc<ClientConfig>,
        events: Events,
        server: watch::Sender<ServerInfo>,
    ) -> Self {
        let framing = Framing { max_out: config.max_frame_bytes, version: twinmq_protocol::HANDSHAKE_VERSION };
        Connection {
            commands,
            command_sender: handles.tx.downgrade(),
            ended: handles.ended.clone(),
            handles_alive: true,
            producers: HashMap::new(),
            subscriptions: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_sub_id: 1,
            next_req: 1,
            next_order: 0,
            next_nonce: 0,
            config,
            closing: None,
            events,
            server,
            phase: Phase::Offline,
            did_work: false,
            wbuf: BytesMut::with_capacity(64 * 1024),
            framing,
            ticket,
        }
    }

    /// Serve `link`, then every connection after it, until closed or given up.
    pub(crate) async fn run(mut self, mut link: Link, server: ServerInfo) {
        self.connected(&link, server, false);
        // A connection lost soon after it was made without doing any work (a
        // node that welcomed us and then refused as not active, say) is
        // retried with a growing pause, not at once: a client must not spin
        // against such a node. One that carried confirms or deliveries was a
        // real connection: its loss is a failover, retried at once however
        // soon it came (a pair killed twice in a second).
        let mut flapping = Backoff::new(self.config.reconnect_backoff);
        let mut since = Instant::now();
        loop {
            let reason = match self.serve(&mut link).await {
                End::Close => return self.goodbye(Some(link)).await,
                End::Lost(reason) => reason,
            };
            drop(link);
            self.phase = Phase::Offline;
            self.wbuf.clear();
            let addr = self.server.borrow().addr.clone();
            self.events.emit(ClientEvent::Disconnected { addr, reason });
            let pause = if since.elapsed() < FLAP_WINDOW && !std::mem::take(&mut self.did_work) {
                flapping.next_pause()
            } else {
                flapping = Backoff::new(self.config.reconnect_backoff);
                self.did_work = false;
                Duration::ZERO
            };
            match self.reconnect(pause).await {
                Reconnect::Connected(new_link, server) => {
                    link = new_link;
                    since = Instant::now();
                    self.connected(&link, server, true);
                }
                Reconnect::Close => return self.goodbye(None).await,
                Reconnect::GaveUp { reason, refusal } => {
                    let _ = self.ended.set(Ended::GaveUp(refusal.clone()));
                    self.events.emit(ClientEvent::GaveUp { reason });
                    match refusal {
                        Some((code, message)) => {
                            self.fail_all(|| ClientError::Broker { code, message: message.clone() })
                        }
                        None => self.fail_all(|| ClientError::Disconnected),
                    }
                    return;
                }
            }
        }
    }

    /// A node welcomed us: replay the state if this is a reconnect (the
    /// first connection was announced by [`crate::Client::connect`]).
    fn connected(&mut self, link: &Link, server: ServerInfo, restore: bool) {
        self.framing = link.framing;
        if restore {
            self.events.emit(ClientEvent::Connected { addr: server.addr.clone(), node_id: server.node_id.clone() });
            self.server.send_replace(server);
            self.begin_restore();
        } else {
            self.phase = Phase::Online;
        }
    }

    async fn serve(&mut self, link: &mut Link) -> End {
        let interval = self.config.heartbeat_interval.max(Duration::from_millis(1));
        let mut heartbeat = tokio::time::interval_at(Instant::now() + interval, interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let (mut last_read, mut last_write) = (Instant::now(), Instant::now());
        loop {
            self.check_restored();
            if let Some(closing) = &self.closing {
                if self.is_settled() || Instant::now() >= closing.deadline {
                    return End::Close;
                }
            }
            let deadline = self.closing.as_ref().map(|c| c.deadline);
            let take_commands = self.handles_alive && self.wbuf.len() < HIGH_WATER;
            tokio::select! {
                biased;
                frame = link.reader.next() => match frame {
                    Some(Ok(frame)) => {
                        last_read = Instant::now();
                        if let Err(reason) = self.on_frame(frame) {
                            return End::Lost(reason);
                        }
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "unreadable frame from the broker; dropping the connection");
                        return End::Lost(format!("unreadable frame: {e}"));
                    }
                    None => return End::Lost("the broker closed the connection".into()),
                },
                _ = heartbeat.tick() => {
                    let silent = last_read.elapsed();
                    if silent >= self.config.heartbeat_timeout {
                        return End::Lost(format!("nothing received from the broker for {} ms", silent.as_millis()));
                    }
                    if silent >= interval || last_write.elapsed() >= interval {
                        self.next_nonce += 1;
                        self.write_or_log(&ClientFrame::Ping { nonce: self.next_nonce });
                    }
                }
                command = self.commands.recv(), if take_commands => {
                    self.on_command_or_end(command);
                    for _ in 1..COMMAND_BATCH {
                        if self.wbuf.len() >= HIGH_WATER {
                            break;
                        }
                        match self.commands.try_recv() {
                            Ok(command) => self.on_command(command),
                            Err(_) => break,
                        }
                    }
                }
                written = link.writer.write_buf(&mut self.wbuf), if !self.wbuf.is_empty() => match written {
                    Ok(0) => return End::Lost("the socket no longer accepts data".into()),
                    Ok(_) => last_write = Instant::now(),
                    Err(e) => return End::Lost(format!("could not write to the broker: {e}")),
                },
                () = wait_until(deadline) => {}
            }
        }
    }

    /// The outage loop: dial round after round (with backoff) while taking
    /// commands, until a node welcomes us, a close is due, or
    /// `failover_timeout` has passed since the loss.
    async fn reconnect(&mut self, first_pause: Duration) -> Reconnect {
        let give_up_at = Instant::now() + self.config.failover_timeout;
        let mut dialer = Dialer::new(self.config.clone(), false, self.ticket.clone());
        let mut backoff = Backoff::new(self.config.reconnect_backoff);
        let mut last_error: Option<ClientError> = None;
        let mut attempt = 0u32;
        if !first_pause.is_zero() {
            if let Some(end) = self.pause_taking_commands(Instant::now() + first_pause).await {
                return end;
            }
        }
        loop {
            attempt = attempt.saturating_add(1);
            self.events.emit(ClientEvent::Reconnecting { attempt });
            let outcome = {
                let round = dialer.round();
                tokio::pin!(round);
                loop {
                    if let Some(end) = self.close_due() {
                        return end;
                    }
                    let close_deadline = self.closing.as_ref().map(|c| c.deadline);
                    tokio::select! {
                        biased;
                        opened = &mut round => break opened,
                        command = self.commands.recv(), if self.handles_alive => self.on_command_or_end(command),
                        () = tokio::time::sleep_until(give_up_at) => return self.give_up(last_error),
                        () = wait_until(close_deadline) => {}
                    }
                }
            };
            match outcome {
                Ok((link, server)) => return Reconnect::Connected(link, server),
                Err(e) if is_final(&e) => {
                    let refusal = match &e {
                        ClientError::Broker { code, message } => Some((*code, message.clone())),
                        _ => None,
                    };
                    return Reconnect::GaveUp { reason: e.to_string(), refusal };
                }
                Err(e) => {
                    debug!(attempt, error = %e, "no active node in this round");
                    last_error = Some(e);
                }
            }
            let wake = (Instant::now() + backoff.next_pause()).min(give_up_at);
            if let Some(end) = self.pause_taking_commands(wake).await {
                return end;
            }
            if Instant::now() >= give_up_at {
                return self.give_up(last_error);
            }
        }
    }

    /// Wait until `wake` while taking commands; `Some` if a close came due.
    async fn pause_taking_commands(&mut self, wake: Instant) -> Option<Reconnect> {
        loop {
            if let Some(end) = self.close_due() {
                return Some(end);
            }
            let close_deadline = self.closing.as_ref().map(|c| c.deadline);
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(wake) => return None,
                command = self.commands.recv(), if self.handles_alive => self.on_command_or_end(command),
                () = wait_until(close_deadline) => {}
            }
        }
    }

    fn give_up(&self, last_error: Option<ClientError>) -> Reconnect {
        let after = self.config.failover_timeout;
        let reason = match last_error {
            Some(e) => format!("no active node within {after:?}; last error: {e}"),
            None => format!("no active node within {after:?}"),
        };
        Reconnect::GaveUp { reason, refusal: None }
    }

    /// While offline: a close that can end now (nothing left to wait for, or its deadline passed).
    fn close_due(&self) -> Option<Reconnect> {
        let closing = self.closing.as_ref()?;
        (self.is_settled() || Instant::now() >= closing.deadline).then_some(Reconnect::Close)
    }

    /// Re-create every subscription on the new connection; the rest waits
    /// for their answers (see [`Connection::check_restored`]).
    fn begin_restore(&mut self) {
        self.phase = Phase::Restoring { resubscribed: 0 };
        let mut refused = Vec::new();
        for (&sub_id, sub) in &mut self.subscriptions {
            sub.waiting = Arc::new(AtomicUsize::new(0));
            if matches!(sub.state, SubState::Live) {
                sub.state = SubState::Resubscribing;
            }
            if let Err(e) = encode_into(&mut self.wbuf, self.framing, &subscribe_frame(sub_id, &sub.spec)) {
                refused.push((sub_id, e));
            }
        }
        for (sub_id, error) in refused {
            self.end_subscription(sub_id, error);
        }
        self.check_restored();
    }

    /// End the restore once no re-created subscription awaits its answer:
    /// send every unconfirmed publish again, in the original order, then the
    /// pending requests.
    fn check_restored(&mut self) {
        let Phase::Restoring { resubscribed } = self.phase else { return };
        if self.subscriptions.values().any(|s| matches!(s.state, SubState::Resubscribing)) {
            return;
        }
        self.phase = Phase::Online;
        self.events.emit(ClientEvent::Resubscribed { count: resubscribed });

        let mut order: Vec<(u64, u64, usize)> = Vec::new();
        for (&producer_id, producer) in &self.producers {
            order.extend(producer.unconfirmed.iter().enumerate().map(|(i, u)| (u.order, producer_id, i)));
        }
        order.sort_unstable();
        let mut refused = Vec::new();
        for &(_, producer_id, i) in &order {
            let unconfirmed = &self.producers[&producer_id].unconfirmed[i];
            if let Err(e) = encode_into(&mut self.wbuf, self.framing, &unconfirmed.frame) {
                refused.push((producer_id, unconfirmed.seq, e));
            }
        }
        let resent = order.len() - refused.len();
        for (producer_id, seq, error) in refused {
            self.settle_publish(producer_id, seq, Err(error));
        }
        self.events.emit(ClientEvent::Resent { count: resent });

        let mut refused = Vec::new();
        for (&req, request) in &self.requests {
            if let Err(e) = encode_into(&mut self.wbuf, self.framing, &request.frame) {
                refused.push((req, e));
            }
        }
        for (req, error) in refused {
            if let Some(request) = self.requests.remove(&req) {
                request.answer.fail(error);
            }
        }
    }

    fn on_command_or_end(&mut self, command: Option<Command>) {
        match command {
            Some(command) => self.on_command(command),
            None => {
                debug!("every handle is gone; closing");
                self.handles_alive = false;
                self.begin_close(None);
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Publish { producer_id, destination, message, permit, done } => {
                if self.closing.is_some() {
                    let _ = done.send(Err(ClientError::Closed));
                    return;
                }
                let state = self.producers.entry(producer_id).or_insert_with(|| ProducerState {
                    next_seq: 1,
                    unconfirmed: VecDeque::new(),
                    dropped: false,
                });
                let seq = state.next_seq;
                let frame = ClientFrame::Publish { producer_id, seq, destination, message };
                // Offline or restoring: it goes out after the resends.
                if self.phase == Phase::Online {
                    if let Err(e) = encode_into(&mut self.wbuf, self.framing, &frame) {
                        let _ = done.send(Err(e));
                        return;
                    }
                }
                state.next_seq += 1;
                let order = self.next_order;
                self.next_order += 1;
                state.unconfirmed.push_back(Unconfirmed { seq, order, frame, done, _permit: permit });
            }
            Command::ProducerDropped { producer_id } => {
                if let Some(state) = self.producers.get_mut(&producer_id) {
                    if state.unconfirmed.is_empty() {
                        self.producers.remove(&producer_id);
                    } else {
                        state.dropped = true;
                    }
                }
            }
            Command::Subscribe { spec, deliveries, done } => {
                if self.closing.is_some() {
                    let _ = done.send(Err(ClientError::Closed));
                    return;
                }
                let sub_id = self.next_sub_id;
                // Offline: sent with the others when the next connection is restored.
                if self.phase != Phase::Offline {
                    if let Err(e) = encode_into(&mut self.wbuf, self.framing, &subscribe_frame(sub_id, &spec)) {
                        let _ = done.send(Err(e));
                        return;
                    }
                }
                self.next_sub_id = self.next_sub_id.wrapping_add(1).max(1);
                let subscription = Subscription {
                    spec,
                    deliveries,
                    state: SubState::Subscribing(done),
                    waiting: Arc::new(AtomicUsize::new(0)),
                };
                self.subscriptions.insert(sub_id, subscription);
            }
            Command::Unsubscribe { sub_id } => {
                // Connected, every subscription was sent on this connection.
                if self.subscriptions.remove(&sub_id).is_some() && self.phase != Phase::Offline {
                    self.write_or_log(&ClientFrame::Unsubscribe { sub_id });
                }
            }
            Command::Settle { sub_id, id, how: SettleHow::AckStored, done } => {
                // Checked as any settle (live, online, version 2), then a request.
                match self.settle_check(SettleHow::AckStored, sub_id) {
                    Ok(()) => self.start_request(Answer::Settled(done), |req| ClientFrame::Ack {
                        sub_id,
                        id,
                        receipt: Some(req),
                        through: false,
                    }),
                    Err(e) => {
                        let _ = done.send(Err(e));
                    }
                }
            }
            Command::Settle { sub_id, id, how, done } => {
                let _ = done.send(self.settle_delivery(how, sub_id, id));
            }
            Command::DeleteDurable { topic, name, done } => {
                self.start_request(Answer::Done(done), |req| ClientFrame::DeleteDurable { req, topic, name });
            }
            Command::Status { done } => self.start_request(Answer::Status(done), |req| ClientFrame::Status { req }),
            Command::Close { done } => self.begin_close(Some(done)),
        }
    }

    /// Register a request and send it if online (otherwise it goes out once
    /// restored); answered at once if closing or if it cannot be encoded.
    fn start_request(&mut self, answer: Answer, frame: impl FnOnce(u64) -> ClientFrame) {
        if self.closing.is_some() {
            answer.fail(ClientError::Closed);
            return;
        }
        let req = self.next_req;
        let frame = frame(req);
        if self.phase == Phase::Online {
            if let Err(e) = encode_into(&mut self.wbuf, self.framing, &frame) {
                answer.fail(e);
                return;
            }
        }
        self.next_req += 1;
        self.requests.insert(req, PendingRequest { frame, answer });
    }

    /// Ack or nack a delivery. Not sent (`Err(NotSettled)`: the broker
    /// redelivers) when the consumer is gone, when offline, or while its
    /// subscription is not registered on this connection yet. An ack for a
    /// delivery made on an earlier connection goes out too: the broker
    /// settles the message if it holds it for this consumer, and ignores it
    /// otherwise.
    fn settle_delivery(&mut self, how: SettleHow, sub_id: u32, id: MessageId) -> Result<(), ClientError> {
        self.settle_check(how, sub_id)?;
        let frame = match how {
            SettleHow::Ack | SettleHow::AckStored => ClientFrame::Ack { sub_id, id, receipt: None, through: false },
            SettleHow::AckThrough => ClientFrame::Ack { sub_id, id, receipt: None, through: true },
            SettleHow::Nack { delay } => {
                let delay_ms = delay.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                ClientFrame::Nack { sub_id, id, delay_ms }
            }
            SettleHow::Terminate => ClientFrame::Terminate { sub_id, id },
        };
        encode_into(&mut self.wbuf, self.framing, &frame)
    }

    /// Whether a settle can go out now: `Err(NotSettled)` (the broker
    /// redelivers) when the consumer is gone, when offline, or while its
    /// subscription is not registered on this connection yet;
    /// `Err(Unsupported)` for what a node at protocol 1 would not honour
    /// (a delay, terminate, a receipt).
    fn settle_check(&self, how: SettleHow, sub_id: u32) -> Result<(), ClientError> {
        let live = self.subscriptions.get(&sub_id).is_some_and(|s| matches!(s.state, SubState::Live));
        if !live || self.phase == Phase::Offline {
            debug!(sub_id, "settle not sent: consumer closed or not registered on this connection");
            let reason = if self.phase == Phase::Offline {
                "the connection is being re-established"
            } else {
                "the consumer is closed or not yet registered again"
            };
            return Err(ClientError::NotSettled { reason: reason.to_owned() });
        }
        let what = match how {
            SettleHow::Ack | SettleHow::Nack { delay: None } => return Ok(()),
            SettleHow::AckStored => "an ack the broker answers",
            SettleHow::AckThrough => "a cumulative ack",
            SettleHow::Nack { delay: Some(_) } => "a nack with a delay",
            SettleHow::Terminate => "terminate",
        };
        if self.framing.version < SETTLE_V2 {
            return Err(ClientError::Unsupported { what, protocol_version: self.framing.version });
        }
        Ok(())
    }

    fn begin_close(&mut self, waiter: Option<Reply<()>>) {
        let close_timeout = self.config.close_timeout;
        let closing = self
            .closing
            .get_or_insert_with(|| Closing { waiters: Vec::new(), deadline: Instant::now() + close_timeout });
        closing.waiters.extend(waiter);
    }

    /// Nothing is waiting for an answer from the broker.
    fn is_settled(&self) -> bool {
        self.producers.values().all(|p| p.unconfirmed.is_empty())
            && self.requests.is_empty()
            && self.subscriptions.values().all(|s| !matches!(s.state, SubState::Subscribing(_)))
    }

    /// Handle one frame from the broker; `Err(reason)` when the connection
    /// must be given up (the broker ends it, or this node no longer serves).
    fn on_frame(&mut self, frame: ServerFrame) -> Result<(), String> {
        self.did_work |= matches!(
            frame,
            ServerFrame::Confirm { .. }
                | ServerFrame::Deliver { .. }
                | ServerFrame::Subscribed { .. }
                | ServerFrame::StatusReply { .. }
                | ServerFrame::Done { .. }
                | ServerFrame::AdminReply { .. }
        );
        match frame {
            ServerFrame::Confirm { producer_id, seq, duplicate, id } => {
                if duplicate {
                    // Stored before under this id and sequence: a resend after a
                    // failover. (Producer ids are random per producer, so it is
                    // not another message's.)
                    debug!(producer_id, seq, "confirm of a resend: stored once, before");
                }
                let confirmed = Confirmed::new(id.map(crate::MessageId::from_wire), duplicate);
                self.settle_publish(producer_id, seq, Ok(confirmed))
            }
            ServerFrame::Deliver { sub_id, message } => self.on_deliver(sub_id, message),
            ServerFrame::Subscribed { sub_id } => self.on_subscribed(sub_id),
            ServerFrame::ConsumerClosed { sub_id, reason } => {
                info!(sub_id, %reason, "the broker closed a consumer");
                self.end_subscription(sub_id, ClientError::ConsumerClosed { reason });
            }
            ServerFrame::StatusReply { req, json } => match self.requests.remove(&req) {
                Some(PendingRequest { answer: Answer::Status(done), .. }) => {
                    let _ = done.send(Ok(json));
                }
                other => unexpected_answer(req, other, "StatusReply"),
            },
            ServerFrame::Done { req } => match self.requests.remove(&req) {
                Some(PendingRequest { answer: Answer::Done(done) | Answer::Settled(done), .. }) => {
                    let _ = done.send(Ok(()));
                }
                other => unexpected_answer(req, other, "Done"),
            },
            ServerFrame::AdminReply { req, .. } => {
                let pending = self.requests.remove(&req);
                unexpected_answer(req, pending, "AdminReply")
            }
            ServerFrame::Pong { .. } => {}
            ServerFrame::Error(ErrorFrame { code, message, context, .. }) => {
                let code = ErrorCode::from_wire(code);
                // A node that stopped serving answers with these: nothing was
                // done, so the work is kept and goes to the next active node.
                if matches!(code, ErrorCode::NotActive | ErrorCode::ShuttingDown) {
                    return Err(format!("broker error {code}: {message}"));
                }
                let error = ClientError::Broker { code, message };
                match context {
                    ErrorContext::Connection => return Err(error.to_string()),
                    ErrorContext::Publish { producer_id, seq } => self.settle_publish(producer_id, seq, Err(error)),
                    ErrorContext::Subscribe { sub_id } => self.end_subscription(sub_id, error),
                    ErrorContext::Request { req } => match self.requests.remove(&req) {
                        Some(request) => request.answer.fail(error),
                        None => warn!(req, error = %error, "error for an unknown request"),
                    },
                }
            }
            other @ (ServerFrame::Welcome { .. } | ServerFrame::NotActive { .. }) => {
                warn!(frame = frame_name(&other), "unexpected frame after the handshake; ignored");
            }
        }
        Ok(())
    }

    fn on_subscribed(&mut self, sub_id: u32) {
        let Some(sub) = self.subscriptions.get_mut(&sub_id) else {
            debug!(sub_id, "Subscribed for a consumer that is gone");
            return;
        };
        match std::mem::replace(&mut sub.state, SubState::Live) {
            SubState::Subscribing(done) => {
                if done.send(Ok(sub_id)).is_err() {
                    // The caller stopped waiting: nobody will consume.
                    self.subscriptions.remove(&sub_id);
                    self.write_or_log(&ClientFrame::Unsubscribe { sub_id });
                }
            }
            SubState::Resubscribing => {
                if let Phase::Restoring { resubscribed } = &mut self.phase {
                    *resubscribed += 1;
                }
            }
            SubState::Live => debug!(sub_id, "Subscribed twice"),
        }
    }

    fn settle_publish(&mut self, producer_id: u64, seq: u64, result: Result<Confirmed, ClientError>) {
        let Some(state) = self.producers.get_mut(&producer_id) else {
            debug!(producer_id, seq, "confirm for an unknown producer");
            return;
        };
        let settled = if state.unconfirmed.front().is_some_and(|u| u.seq == seq) {
            state.unconfirmed.pop_front()
        } else if let Some(i) = state.unconfirmed.iter().position(|u| u.seq == seq) {
            warn!(producer_id, seq, "confirm out of send order");
            state.unconfirmed.remove(i)
        } else {
            // E.g. a second answer to a resend: the first one settled it.
            debug!(producer_id, seq, "confirm for a publish already settled");
            None
        };
        if let Some(unconfirmed) = settled {
            // The window permit is released when `unconfirmed` drops here.
            let _ = unconfirmed.done.send(result);
        }
        if state.dropped && state.unconfirmed.is_empty() {
            self.producers.remove(&producer_id);
        }
    }

    fn on_deliver(&mut self, sub_id: u32, message: Delivered) {
        let Some(sub) = self.subscriptions.get(&sub_id) else {
            // Sent before the broker saw our Unsubscribe; it takes it back.
            debug!(sub_id, "delivery for a closed consumer dropped");
            return;
        };
        let commands = self.command_sender.upgrade().map(|tx| Commands { tx, ended: self.ended.clone() });
        let Some(commands) = commands.filter(|_| !sub.deliveries.is_closed()) else {
            debug!(sub_id, "consumer dropped; unsubscribing");
            self.subscriptions.remove(&sub_id);
            self.write_or_log(&ClientFrame::Unsubscribe { sub_id });
            return;
        };
        let prefetch = sub.spec.prefetch;
        if sub.waiting.load(Ordering::Relaxed) >= usize::try_from(prefetch).unwrap_or(usize::MAX) {
            warn!(sub_id, prefetch, "the broker exceeded the prefetch; closing the consumer");
            self.end_subscription(sub_id, ClientError::PrefetchExceeded { prefetch });
            self.write_or_log(&ClientFrame::Unsubscribe { sub_id });
            return;
        }
        let _ = sub.deliveries.send(Inbound::delivery(Delivery::new(sub_id, message, commands), &sub.waiting));
    }

    /// Remove a subscription, telling its consumer (or its pending `subscribe`) why.
    fn end_subscription(&mut self, sub_id: u32, error: ClientError) {
        let Some(sub) = self.subscriptions.remove(&sub_id) else {
            debug!(sub_id, error = %error, "error for an unknown consumer");
            return;
        };
        match sub.state {
            SubState::Subscribing(done) => {
                let _ = done.send(Err(error));
            }
            SubState::Resubscribing | SubState::Live => {
                let _ = sub.deliveries.send(Inbound::end(error));
            }
        }
    }

    /// Encode `frame` for the current connection, logging what cannot be.
    fn write_or_log(&mut self, frame: &ClientFrame) {
        if let Err(e) = encode_into(&mut self.wbuf, self.framing, frame) {
            warn!(error = %e, "could not encode a frame");
        }
    }

    /// Answer everyone with `error()`.
    fn fail_all(&mut self, error: impl Fn() -> ClientError) {
        for (_, producer) in self.producers.drain() {
            for unconfirmed in producer.unconfirmed {
                let _ = unconfirmed.done.send(Err(error()));
            }
        }
        for (_, sub) in std::mem::take(&mut self.subscriptions) {
            match sub.state {
                SubState::Subscribing(done) => {
                    let _ = done.send(Err(error()));
                }
                SubState::Resubscribing | SubState::Live => {
                    let _ = sub.deliveries.send(Inbound::end(error()));
                }
            }
        }
        for (_, request) in std::mem::take(&mut self.requests) {
            request.answer.fail(error());
        }
        if let Some(closing) = self.closing.take() {
            for waiter in closing.waiters {
                let _ = waiter.send(Err(error()));
            }
        }
    }

    /// Orderly close: give up on what is still unconfirmed, say Bye (if
    /// connected), let the broker read everything (acks included) and close
    /// its side, then answer the callers of `close`.
    async fn goodbye(mut self, link: Option<Link>) {
        let _ = self.ended.set(Ended::Closed);
        let closing = self.closing.take();
        let abandoned: usize = self.producers.values().map(|p| p.unconfirmed.len()).sum();
        let after = self.config.close_timeout;
        let timeout = || ClientError::Timeout { what: "waiting for confirms before closing".into(), after };
        for (_, producer) in self.producers.drain() {
            for unconfirmed in producer.unconfirmed {
                let _ = unconfirmed.done.send(Err(timeout()));
            }
        }
        // Consumers end with `None`; pending requests and subscribes get `Closed`.
        for (_, sub) in std::mem::take(&mut self.subscriptions) {
            if let SubState::Subscribing(done) = sub.state {
                let _ = done.send(Err(ClientError::Closed));
            }
        }
        self.fail_all(|| ClientError::Closed);

        if let Some(mut link) = link {
            self.write_or_log(&ClientFrame::Bye);
            link.finish(&mut self.wbuf, BYE_GRACE).await;
            // Wait for the broker to close its side, so that nothing we sent is
            // discarded by a reset while it still reads.
            let drain = async { while let Some(Ok(_)) = link.reader.next().await {} };
            if tokio::time::timeout(BYE_GRACE, drain).await.is_err() {
                debug!("the broker did not close the connection after Bye");
            }
        }
        info!(abandoned, "connection closed");
        for waiter in closing.map(|c| c.waiters).unwrap_or_default() {
            let _ = waiter.send(if abandoned == 0 { Ok(()) } else { Err(timeout()) });
        }
    }
}

fn subscribe_frame(sub_id: u32, spec: &SubscriptionSpec) -> ClientFrame {
    ClientFrame::Subscribe {
        sub_id,
        destination: spec.destination.clone(),
        durable: spec.durable.clone(),
        prefetch: spec.prefetch,
    }
}

/// Encode `frame` at the end of `wbuf`; on error (too large) nothing is added.
fn encode_into(wbuf: &mut BytesMut, framing: Framing, frame: &ClientFrame) -> Result<(), ClientError> {
    framing.encode(frame, wbuf)
}

fn unexpected_answer(req: u64, pending: Option<PendingRequest>, got: &'static str) {
    warn!(req, got, "answer does not match the request");
    if let Some(request) = pending {
        request.answer.fail(ClientError::UnexpectedFrame(format!("{got} for request {req}")));
    }
}

/// Resolves at `deadline`, or never without one.
async fn wait_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
