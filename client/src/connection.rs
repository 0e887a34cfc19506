//! The connection task: the one owner of the socket and of all per-connection state.
//!
//! Handles ([`crate::Client`], [`crate::Producer`], [`crate::Consumer`],
//! [`crate::Delivery`]) send it [`Command`]s over one bounded channel; it
//! encodes frames, matches the broker's answers to the waiting callers and
//! routes deliveries to consumers. Because it is the only owner, sequence
//! numbers are assigned here, in the order frames go on the wire, which is the
//! order the broker's idempotence check expects.
//!
//! The state is kept so that a later version can reconnect and resend: every
//! unconfirmed publish (its whole frame, in order, with the caller's
//! oneshot) per producer, and the spec of every subscription. This version
//! does not reconnect: a lost connection fails every pending operation and
//! ends every consumer with [`ClientError::Disconnected`].

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use twinmq_protocol::{
    ClientFrame, Delivered, Destination, ErrorContext, ErrorFrame, MessageId, OutMessage, ServerFrame,
};

use crate::consumer::Delivery;
use crate::link::{frame_name, Link};
use crate::ClientError;

/// Where the answer to a command goes.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, ClientError>>;

/// What a consumer receives: deliveries, then possibly one error that ends it.
pub(crate) type DeliverySender = mpsc::Sender<Result<Delivery, ClientError>>;

/// Room in the command channel. Producers are bounded by their window and
/// acks by the prefetch, so this only smooths bursts.
pub(crate) const COMMAND_QUEUE: usize = 1024;

/// Commands processed per wake-up before looking at the socket again, so that
/// a burst of publishes becomes one write without starving reads.
const COMMAND_BATCH: usize = 64;

/// How long an orderly close waits for the broker to end the connection after our Bye.
const BYE_GRACE: Duration = Duration::from_secs(1);

/// Requests from the handles to the connection task.
pub(crate) enum Command {
    Publish {
        producer_id: u64,
        destination: Destination,
        message: OutMessage,
        /// The producer's window slot; released when the confirm or error arrives.
        permit: OwnedSemaphorePermit,
        done: Reply<()>,
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
    Ack {
        sub_id: u32,
        id: MessageId,
    },
    Nack {
        sub_id: u32,
        id: MessageId,
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

/// Send `command` built around a fresh reply channel and wait for the answer.
pub(crate) async fn request<T>(
    commands: &mpsc::Sender<Command>,
    command: impl FnOnce(Reply<T>) -> Command,
) -> Result<T, ClientError> {
    let (done, answer) = oneshot::channel();
    commands.send(command(done)).await.map_err(|_| ClientError::Disconnected)?;
    answer.await.unwrap_or(Err(ClientError::Disconnected))
}

struct ProducerState {
    next_seq: u64,
    /// Sent and not yet settled, in send order: what a reconnect resends.
    unconfirmed: VecDeque<Unconfirmed>,
    /// The handles are gone; remove the state once `unconfirmed` is empty.
    dropped: bool,
}

struct Unconfirmed {
    seq: u64,
    /// The `Publish` frame as sent, kept for the resend after a reconnect
    /// (not implemented yet, hence unread).
    #[allow(dead_code)]
    frame: ClientFrame,
    done: Reply<()>,
    _permit: OwnedSemaphorePermit,
}

struct Subscription {
    spec: SubscriptionSpec,
    /// Sized `prefetch + 1`: the broker never has more than `prefetch`
    /// deliveries unacked, so the last slot is always free for the error
    /// that ends the stream, and `try_send` never fails for lack of room.
    deliveries: DeliverySender,
    /// The caller of `subscribe`, until `Subscribed` (or an error) arrives.
    pending: Option<Reply<u32>>,
}

enum PendingRequest {
    Done(Reply<()>),
    Status(Reply<String>),
}

struct Closing {
    waiters: Vec<Reply<()>>,
    deadline: Instant,
}

/// Why [`Connection::serve`] returned.
enum End {
    /// The connection is gone (already logged).
    Lost,
    /// A close was asked for and everything is settled, or its deadline passed.
    Close,
}

pub(crate) struct Connection {
    commands: mpsc::Receiver<Command>,
    /// Lets deliveries carry a command sender for their ack without the task
    /// itself keeping the channel open: when every handle is gone, `recv`
    /// returns `None` and the task closes the connection.
    command_sender: mpsc::WeakSender<Command>,
    /// False once every handle is gone.
    handles_alive: bool,
    producers: HashMap<u64, ProducerState>,
    subscriptions: HashMap<u32, Subscription>,
    requests: HashMap<u64, PendingRequest>,
    next_sub_id: u32,
    next_req: u64,
    close_timeout: Duration,
    closing: Option<Closing>,
}

impl Connection {
    pub(crate) fn new(
        commands: mpsc::Receiver<Command>,
        command_sender: mpsc::WeakSender<Command>,
        close_timeout: Duration,
    ) -> Self {
        Connection {
            commands,
            command_sender,
            handles_alive: true,
            producers: HashMap::new(),
            subscriptions: HashMap::new(),
            requests: HashMap::new(),
            next_sub_id: 1,
            next_req: 1,
            close_timeout,
            closing: None,
        }
    }

    pub(crate) async fn run(mut self, mut link: Link) {
        match self.serve(&mut link).await {
            End::Lost => self.fail_all(|| ClientError::Disconnected),
            End::Close => self.goodbye(link).await,
        }
    }

    async fn serve(&mut self, link: &mut Link) -> End {
        loop {
            if let Some(closing) = &self.closing {
                if self.is_settled() || Instant::now() >= closing.deadline {
                    return End::Close;
                }
            }
            let deadline = self.closing.as_ref().map(|c| c.deadline);
            let take_commands = self.handles_alive && link.wbuf.len() < Link::HIGH_WATER;
            tokio::select! {
                biased;
                frame = link.reader.next() => match frame {
                    Some(Ok(frame)) => {
                        if let Err(reason) = self.on_frame(frame, link) {
                            warn!(%reason, "the broker ended the connection");
                            return End::Lost;
                        }
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "unreadable frame from the broker; dropping the connection");
                        return End::Lost;
                    }
                    None => {
                        info!("the broker closed the connection");
                        return End::Lost;
                    }
                },
                command = self.commands.recv(), if take_commands => match command {
                    Some(command) => {
                        self.on_command(command, link);
                        for _ in 1..COMMAND_BATCH {
                            if link.wbuf.len() >= Link::HIGH_WATER {
                                break;
                            }
                            match self.commands.try_recv() {
                                Ok(command) => self.on_command(command, link),
                                Err(_) => break,
                            }
                        }
                    }
                    None => {
                        debug!("every handle is gone; closing");
                        self.handles_alive = false;
                        self.begin_close(None);
                    }
                },
                written = link.writer.write_buf(&mut link.wbuf), if !link.wbuf.is_empty() => match written {
                    Ok(0) => {
                        info!("the socket no longer accepts data");
                        return End::Lost;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        info!(error = %e, "could not write to the broker");
                        return End::Lost;
                    }
                },
                () = wait_until(deadline) => {}
            }
        }
    }

    fn on_command(&mut self, command: Command, link: &mut Link) {
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
                if let Err(e) = link.queue(&frame) {
                    let _ = done.send(Err(e));
                    return;
                }
                state.next_seq += 1;
                state.unconfirmed.push_back(Unconfirmed { seq, frame, done, _permit: permit });
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
                let frame = ClientFrame::Subscribe {
                    sub_id,
                    destination: spec.destination.clone(),
                    durable: spec.durable.clone(),
                    prefetch: spec.prefetch,
                };
                if let Err(e) = link.queue(&frame) {
                    let _ = done.send(Err(e));
                    return;
                }
                self.next_sub_id = self.next_sub_id.wrapping_add(1).max(1);
                self.subscriptions.insert(sub_id, Subscription { spec, deliveries, pending: Some(done) });
            }
            Command::Unsubscribe { sub_id } => {
                if self.subscriptions.remove(&sub_id).is_some() {
                    queue_or_log(link, &ClientFrame::Unsubscribe { sub_id });
                }
            }
            Command::Ack { sub_id, id } => self.settle_delivery(link, ClientFrame::Ack { sub_id, id }, sub_id),
            Command::Nack { sub_id, id } => self.settle_delivery(link, ClientFrame::Nack { sub_id, id }, sub_id),
            Command::DeleteDurable { topic, name, done } => {
                if let Some((req, done)) =
                    self.start_request(link, done, |req| ClientFrame::DeleteDurable { req, topic, name })
                {
                    self.requests.insert(req, PendingRequest::Done(done));
                }
            }
            Command::Status { done } => {
                if let Some((req, done)) = self.start_request(link, done, |req| ClientFrame::Status { req }) {
                    self.requests.insert(req, PendingRequest::Status(done));
                }
            }
            Command::Close { done } => self.begin_close(Some(done)),
        }
    }

    /// Queue the frame of a new request; `None` if it was answered at once
    /// (closing, or the frame could not be encoded).
    fn start_request<T>(
        &mut self,
        link: &mut Link,
        done: Reply<T>,
        frame: impl FnOnce(u64) -> ClientFrame,
    ) -> Option<(u64, Reply<T>)> {
        if self.closing.is_some() {
            let _ = done.send(Err(ClientError::Closed));
            return None;
        }
        let req = self.next_req;
        if let Err(e) = link.queue(&frame(req)) {
            let _ = done.send(Err(e));
            return None;
        }
        self.next_req += 1;
        Some((req, done))
    }

    fn settle_delivery(&mut self, link: &mut Link, frame: ClientFrame, sub_id: u32) {
        // After an unsubscribe the broker has taken the delivery back already.
        if self.subscriptions.contains_key(&sub_id) {
            queue_or_log(link, &frame);
        } else {
            debug!(sub_id, "ack/nack for a closed consumer dropped");
        }
    }

    fn begin_close(&mut self, waiter: Option<Reply<()>>) {
        let close_timeout = self.close_timeout;
        let closing = self
            .closing
            .get_or_insert_with(|| Closing { waiters: Vec::new(), deadline: Instant::now() + close_timeout });
        closing.waiters.extend(waiter);
    }

    /// Nothing is waiting for an answer from the broker.
    fn is_settled(&self) -> bool {
        self.producers.values().all(|p| p.unconfirmed.is_empty())
            && self.requests.is_empty()
            && self.subscriptions.values().all(|s| s.pending.is_none())
    }

    /// Handle one frame from the broker; `Err(reason)` when the broker ends the connection.
    fn on_frame(&mut self, frame: ServerFrame, link: &mut Link) -> Result<(), String> {
        match frame {
            ServerFrame::Confirm { producer_id, seq } => self.settle_publish(producer_id, seq, Ok(())),
            ServerFrame::Deliver { sub_id, message } => self.on_deliver(link, sub_id, message),
            ServerFrame::Subscribed { sub_id } => {
                let Some(sub) = self.subscriptions.get_mut(&sub_id) else {
                    debug!(sub_id, "Subscribed for a consumer that is gone");
                    return Ok(());
                };
                if let Some(done) = sub.pending.take() {
                    if done.send(Ok(sub_id)).is_err() {
                        // The caller stopped waiting: nobody will consume.
                        self.subscriptions.remove(&sub_id);
                        queue_or_log(link, &ClientFrame::Unsubscribe { sub_id });
                    }
                }
            }
            ServerFrame::ConsumerClosed { sub_id, reason } => {
                info!(sub_id, %reason, "the broker closed a consumer");
                self.end_subscription(sub_id, ClientError::ConsumerClosed { reason });
            }
            ServerFrame::StatusReply { req, json } => match self.requests.remove(&req) {
                Some(PendingRequest::Status(done)) => {
                    let _ = done.send(Ok(json));
                }
                other => self.unexpected_answer(req, other, "StatusReply"),
            },
            ServerFrame::Done { req } => match self.requests.remove(&req) {
                Some(PendingRequest::Done(done)) => {
                    let _ = done.send(Ok(()));
                }
                other => self.unexpected_answer(req, other, "Done"),
            },
            ServerFrame::Pong { .. } => {}
            ServerFrame::Error(ErrorFrame { code, message, context }) => {
                let error = ClientError::Broker { code, message };
                match context {
                    ErrorContext::Connection => return Err(error.to_string()),
                    ErrorContext::Publish { producer_id, seq } => self.settle_publish(producer_id, seq, Err(error)),
                    ErrorContext::Subscribe { sub_id } => self.end_subscription(sub_id, error),
                    ErrorContext::Request { req } => match self.requests.remove(&req) {
                        Some(PendingRequest::Done(done)) => {
                            let _ = done.send(Err(error));
                        }
                        Some(PendingRequest::Status(done)) => {
                            let _ = done.send(Err(error));
                        }
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

    fn unexpected_answer(&mut self, req: u64, pending: Option<PendingRequest>, got: &'static str) {
        warn!(req, got, "answer does not match the request");
        let error = || ClientError::UnexpectedFrame(format!("{got} for request {req}"));
        match pending {
            Some(PendingRequest::Done(done)) => {
                let _ = done.send(Err(error()));
            }
            Some(PendingRequest::Status(done)) => {
                let _ = done.send(Err(error()));
            }
            None => {}
        }
    }

    fn settle_publish(&mut self, producer_id: u64, seq: u64, result: Result<(), ClientError>) {
        let Some(state) = self.producers.get_mut(&producer_id) else {
            warn!(producer_id, seq, "confirm for an unknown producer");
            return;
        };
        let settled = if state.unconfirmed.front().is_some_and(|u| u.seq == seq) {
            state.unconfirmed.pop_front()
        } else if let Some(i) = state.unconfirmed.iter().position(|u| u.seq == seq) {
            warn!(producer_id, seq, "confirm out of send order");
            state.unconfirmed.remove(i)
        } else {
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

    fn on_deliver(&mut self, link: &mut Link, sub_id: u32, message: Delivered) {
        let Some(sub) = self.subscriptions.get(&sub_id) else {
            // Sent before the broker saw our Unsubscribe; it takes it back.
            debug!(sub_id, "delivery for a closed consumer dropped");
            return;
        };
        let commands = self.command_sender.upgrade();
        if sub.deliveries.is_closed() || commands.is_none() {
            debug!(sub_id, "consumer dropped; unsubscribing");
            self.subscriptions.remove(&sub_id);
            queue_or_log(link, &ClientFrame::Unsubscribe { sub_id });
            return;
        }
        if sub.deliveries.capacity() <= 1 {
            let prefetch = sub.spec.prefetch;
            warn!(sub_id, prefetch, "the broker exceeded the prefetch; closing the consumer");
            self.end_subscription(sub_id, ClientError::PrefetchExceeded { prefetch });
            queue_or_log(link, &ClientFrame::Unsubscribe { sub_id });
            return;
        }
        if let Some(commands) = commands {
            // Room was checked above, and only this task sends.
            let _ = sub.deliveries.try_send(Ok(Delivery::new(sub_id, message, commands)));
        }
    }

    /// Remove a subscription, telling its consumer (or its pending `subscribe`) why.
    fn end_subscription(&mut self, sub_id: u32, error: ClientError) {
        let Some(sub) = self.subscriptions.remove(&sub_id) else {
            debug!(sub_id, error = %error, "error for an unknown consumer");
            return;
        };
        match sub.pending {
            Some(done) => {
                let _ = done.send(Err(error));
            }
            None => {
                let _ = sub.deliveries.try_send(Err(error));
            }
        }
    }

    /// The connection is gone: answer everyone with `error()`.
    fn fail_all(&mut self, error: impl Fn() -> ClientError) {
        for (_, producer) in self.producers.drain() {
            for unconfirmed in producer.unconfirmed {
                let _ = unconfirmed.done.send(Err(error()));
            }
        }
        for (_, sub) in self.subscriptions.drain() {
            match sub.pending {
                Some(done) => {
                    let _ = done.send(Err(error()));
                }
                None => {
                    let _ = sub.deliveries.try_send(Err(error()));
                }
            }
        }
        for (_, request) in self.requests.drain() {
            match request {
                PendingRequest::Done(done) => {
                    let _ = done.send(Err(error()));
                }
                PendingRequest::Status(done) => {
                    let _ = done.send(Err(error()));
                }
            }
        }
        if let Some(closing) = self.closing.take() {
            for waiter in closing.waiters {
                let _ = waiter.send(Err(error()));
            }
        }
    }

    /// Orderly close: give up on what is still unconfirmed, say Bye, let the
    /// broker read everything (acks included) and close its side, then answer
    /// the callers of `close`.
    async fn goodbye(mut self, mut link: Link) {
        let closing = self.closing.take();
        let abandoned: usize = self.producers.values().map(|p| p.unconfirmed.len()).sum();
        let after = self.close_timeout;
        let timeout = || ClientError::Timeout { what: "waiting for confirms before closing".into(), after };
        for (_, producer) in self.producers.drain() {
            for unconfirmed in producer.unconfirmed {
                let _ = unconfirmed.done.send(Err(timeout()));
            }
        }
        // Consumers end with `None`; pending requests and subscribes get `Closed`.
        for (_, sub) in self.subscriptions.drain() {
            if let Some(done) = sub.pending {
                let _ = done.send(Err(ClientError::Closed));
            }
        }
        self.fail_all(|| ClientError::Closed);

        if let Err(e) = link.queue(&ClientFrame::Bye) {
            debug!(error = %e, "could not encode Bye");
        }
        link.finish(BYE_GRACE).await;
        // Wait for the broker to close its side, so that nothing we sent is
        // discarded by a reset while it still reads.
        let drain = async { while let Some(Ok(_)) = link.reader.next().await {} };
        if tokio::time::timeout(BYE_GRACE, drain).await.is_err() {
            debug!("the broker did not close the connection after Bye");
        }
        info!(abandoned, "connection closed");
        for waiter in closing.map(|c| c.waiters).unwrap_or_default() {
            let _ = waiter.send(if abandoned == 0 { Ok(()) } else { Err(timeout()) });
        }
    }
}

fn queue_or_log(link: &mut Link, frame: &ClientFrame) {
    if let Err(e) = link.queue(frame) {
        warn!(error = %e, "could not encode a frame");
    }
}

/// Resolves at `deadline`, or never without one.
async fn wait_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
