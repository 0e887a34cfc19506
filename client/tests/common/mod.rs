//! A tiny fake broker on loopback that speaks the protocol, for the client's
//! tests: one connection at a time, a behaviour that the test can change
//! while it runs (active, passive with a hint, refusing credentials), a log
//! of every frame received tagged with its connection, a store that counts
//! each `(producer_id, seq)` once (and confirms a resend normally, as the
//! real broker does), and controls to inject frames, drop the connection,
//! freeze it (socket open, nobody home) or kill the whole node.

#![allow(clippy::unwrap_used, dead_code)] // test helpers: a failed unwrap is a failed test

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;
use twinmq_client::ClientConfig;
use twinmq_protocol::{
    negotiate, AdminCommand, ClientFrame, Delivered, Destination, ErrorCode, ErrorContext, ErrorFrame, FrameCodec,
    MessageId, ServerFrame, VersionRange, DEFAULT_MAX_FRAME_BYTES,
};

/// Bound on every wait, so that a bug fails the test instead of hanging it.
pub const PATIENCE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub enum Mode {
    Active {
        auto_confirm: bool,
        /// Publishes with this seq are refused with `NotAuthorized`.
        reject_seq: Option<u64>,
        /// The first publish with this seq is stored but not confirmed: the
        /// connection is dropped (`Cut::Connection`) or the node dies
        /// (`Cut::Node`) right after it.
        cut_at_seq: Option<(u64, Cut)>,
    },
    Passive {
        hint: Option<String>,
    },
    RefuseAuth,
    /// An active node that speaks these protocol versions: it negotiates as
    /// the broker does, refusing a client with none in common.
    Speaks(VersionRange),
    /// A faulty node that welcomes with this version, whatever was offered.
    Chooses(u8),
    /// A node that welcomes, then at once refuses as not active (as a node
    /// that has just stopped serving, or not quite started, may).
    Flapping,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    Connection,
    Node,
}

pub fn active() -> Mode {
    Mode::Active { auto_confirm: true, reject_seq: None, cut_at_seq: None }
}

pub fn manual() -> Mode {
    Mode::Active { auto_confirm: false, reject_seq: None, cut_at_seq: None }
}

enum Inject {
    Frame(ServerFrame),
    Drop,
    /// Acknowledged once the connection is frozen.
    Freeze(oneshot::Sender<()>),
}

pub struct FakeBroker {
    pub addr: String,
    /// Every frame received, across connections, with its connection number (from 1).
    received: mpsc::UnboundedReceiver<(usize, ClientFrame)>,
    /// Frames to send on the current (or next) messaging connection.
    inject: mpsc::UnboundedSender<Inject>,
    state: Arc<Shared>,
    task: JoinHandle<()>,
}

struct Shared {
    mode: Mutex<Mode>,
    connections: AtomicUsize,
    /// Every `(producer_id, seq)` stored, and how many publishes came for each.
    stored: Mutex<HashMap<(u64, u64), usize>>,
    /// Subscriptions to these destination names are refused with `UnknownDestination`.
    refused: Mutex<HashSet<String>>,
    /// Frozen connections: open sockets nobody reads or writes.
    frozen: Mutex<Vec<Framed<TcpStream, FrameCodec<ClientFrame, ServerFrame>>>>,
}

impl FakeBroker {
    pub async fn start(mode: Mode) -> FakeBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (received_tx, received) = mpsc::unbounded_channel();
        let (inject, inject_rx) = mpsc::unbounded_channel();
        let state = Arc::new(Shared {
            mode: Mutex::new(mode),
            connections: AtomicUsize::new(0),
            stored: Mutex::default(),
            refused: Mutex::default(),
            frozen: Mutex::default(),
        });
        let task = tokio::spawn(serve(listener, addr.clone(), state.clone(), received_tx, inject_rx));
        FakeBroker { addr, received, inject, state, task }
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// From now on, refuse subscriptions to `name`.
    pub fn refuse_subscriptions_to(&self, name: &str) {
        self.state.refused.lock().unwrap().insert(name.to_owned());
    }

    pub fn send(&self, frame: ServerFrame) {
        self.inject.send(Inject::Frame(frame)).unwrap();
    }

    /// Close the current connection; the node keeps accepting.
    pub fn drop_connection(&self) {
        self.inject.send(Inject::Drop).unwrap();
    }

    /// Stop reading and answering on the current connection, keeping its
    /// socket open (a frozen process, a pulled cable); accept the next one.
    /// Returns once the connection is frozen.
    pub async fn freeze_connection(&self) {
        let (frozen, done) = oneshot::channel();
        self.inject.send(Inject::Freeze(frozen)).unwrap();
        within(done).await.unwrap();
    }

    /// The node dies: its connections are reset and nothing accepts any more.
    pub fn kill(&self) {
        self.task.abort();
        self.state.frozen.lock().unwrap().clear();
    }

    /// The next received frame that `pick` accepts (others are skipped).
    pub async fn next<T>(&mut self, mut pick: impl FnMut(ClientFrame) -> Option<T>) -> T {
        self.next_on(|_, frame| pick(frame)).await
    }

    /// Like [`FakeBroker::next`], also given the frame's connection number.
    pub async fn next_on<T>(&mut self, mut pick: impl FnMut(usize, ClientFrame) -> Option<T>) -> T {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let (connection, frame) = self.received.recv().await.expect("fake broker stopped");
                if let Some(found) = pick(connection, frame) {
                    return found;
                }
            }
        })
        .await
        .expect("expected frame never came")
    }

    /// Every frame received so far (consumed from the log).
    pub fn drain(&mut self) -> Vec<(usize, ClientFrame)> {
        let mut frames = Vec::new();
        while let Ok(frame) = self.received.try_recv() {
            frames.push(frame);
        }
        frames
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// `(producer_id, seq)` stored, with how many publishes came for each.
    pub fn stored(&self) -> HashMap<(u64, u64), usize> {
        self.state.stored.lock().unwrap().clone()
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    listener: TcpListener,
    addr: String,
    state: Arc<Shared>,
    received: mpsc::UnboundedSender<(usize, ClientFrame)>,
    mut inject: mpsc::UnboundedReceiver<Inject>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        let connection = state.connections.fetch_add(1, Ordering::SeqCst) + 1;
        let mut framed = Framed::new(stream, FrameCodec::new(DEFAULT_MAX_FRAME_BYTES));
        let Some(Ok(hello)) = framed.next().await else { continue };
        let ClientFrame::Hello { admin, versions, .. } = hello else {
            panic!("first frame must be Hello, got {hello:?}")
        };
        let _ = received.send((connection, hello));
        let mode = state.mode.lock().unwrap().clone();
        let version = match &mode {
            Mode::Speaks(ours) => match negotiate(*ours, versions) {
                Ok(v) => v,
                Err(_) => {
                    let _ = framed.send(ServerFrame::Error(ErrorFrame::no_common_version(versions, *ours))).await;
                    continue;
                }
            },
            Mode::Chooses(v) => *v,
            _ => 1,
        };
        if admin && !matches!(mode, Mode::RefuseAuth) {
            serve_admin(framed, &addr, &mode, connection, &received).await;
            continue;
        }
        let (auto_confirm, reject_seq) = match &mode {
            Mode::Passive { hint } => {
                let _ = framed.send(ServerFrame::NotActive { active_hint: hint.clone() }).await;
                continue;
            }
            Mode::RefuseAuth => {
                let error = ErrorFrame::new(ErrorCode::NotAuthenticated, ErrorContext::Connection, "bad password");
                let _ = framed.send(ServerFrame::Error(error)).await;
                continue;
            }
            Mode::Active { auto_confirm, reject_seq, .. } => (*auto_confirm, *reject_seq),
            Mode::Speaks(_) | Mode::Chooses(_) | Mode::Flapping => (true, None),
        };
        let welcome = ServerFrame::Welcome {
            node_id: addr.clone(),
            server_version: "0".into(),
            max_frame_bytes: 1 << 20,
            protocol_version: version,
            ticket: None,
        };
        if framed.send(welcome).await.is_err() {
            continue;
        }
        framed.codec_mut().set_version(version);
        if matches!(mode, Mode::Flapping) {
            let error = ErrorFrame::new(ErrorCode::NotActive, ErrorContext::Connection, "this node is not active");
            let _ = framed.send(ServerFrame::Error(error)).await;
            continue;
        }
        loop {
            tokio::select! {
                biased;
                injected = inject.recv() => match injected {
                    Some(Inject::Frame(frame)) => {
                        if framed.send(frame).await.is_err() {
                            break;
                        }
                    }
                    Some(Inject::Freeze(frozen)) => {
                        state.frozen.lock().unwrap().push(framed);
                        let _ = frozen.send(());
                        break;
                    }
                    Some(Inject::Drop) | None => break,
                },
                frame = framed.next() => {
                    let Some(Ok(frame)) = frame else { break };
                    let _ = received.send((connection, frame.clone()));
                    let answer = match frame {
                        ClientFrame::Publish { producer_id, seq, .. } => {
                            if let Some(cut) = take_cut(&state, seq) {
                                // Stored, but the confirm is lost with the connection.
                                *state.stored.lock().unwrap().entry((producer_id, seq)).or_default() += 1;
                                if cut == Cut::Node {
                                    return; // drops the listener with the connection
                                }
                                break;
                            }
                            if Some(seq) == reject_seq {
                                let context = ErrorContext::Publish { producer_id, seq };
                                Some(ServerFrame::Error(ErrorFrame::new(ErrorCode::NotAuthorized, context, "no")))
                            } else {
                                *state.stored.lock().unwrap().entry((producer_id, seq)).or_default() += 1;
                                auto_confirm.then_some(ServerFrame::Confirm { producer_id, seq, duplicate: false, id: Some(MessageId { epoch: 1, seq }) })
                            }
                        }
                        ClientFrame::Subscribe { sub_id, destination, .. } => {
                            if state.refused.lock().unwrap().contains(&destination.name) {
                                let context = ErrorContext::Subscribe { sub_id };
                                Some(ServerFrame::Error(ErrorFrame::new(ErrorCode::UnknownDestination, context, "gone")))
                            } else {
                                Some(ServerFrame::Subscribed { sub_id })
                            }
                        }
                        ClientFrame::Status { req } => Some(ServerFrame::StatusReply { req, json: r#"{"role":"active"}"#.into() }),
                        ClientFrame::DeleteDurable { req, .. } => Some(ServerFrame::Done { req }),
                        ClientFrame::Ping { nonce } => Some(ServerFrame::Pong { nonce }),
                        ClientFrame::Bye => break,
                        _ => None,
                    };
                    if let Some(answer) = answer {
                        if framed.send(answer).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// The cut planned at `seq`, if any; it happens once.
fn take_cut(state: &Shared, seq: u64) -> Option<Cut> {
    let mut mode = state.mode.lock().unwrap();
    if let Mode::Active { cut_at_seq, .. } = &mut *mode {
        if cut_at_seq.is_some_and(|(at, _)| at == seq) {
            return cut_at_seq.take().map(|(_, cut)| cut);
        }
    }
    None
}

/// An admin connection: Status answers with the role, for any mode;
/// switchover is for the active node, promote for the passive one.
async fn serve_admin(
    mut framed: Framed<TcpStream, FrameCodec<ClientFrame, ServerFrame>>,
    addr: &str,
    mode: &Mode,
    connection: usize,
    received: &mpsc::UnboundedSender<(usize, ClientFrame)>,
) {
    let role = if matches!(mode, Mode::Active { .. }) { "active" } else { "passive" };
    let welcome = ServerFrame::Welcome {
        node_id: addr.into(),
        server_version: "0".into(),
        max_frame_bytes: 1 << 20,
        protocol_version: 1,
        ticket: None,
    };
    if framed.send(welcome).await.is_err() {
        return;
    }
    while let Some(Ok(frame)) = framed.next().await {
        let _ = received.send((connection, frame.clone()));
        let answer = match frame {
            ClientFrame::Status { req } => {
                ServerFrame::StatusReply { req, json: format!(r#"{{"role":"{role}","node":"{addr}"}}"#) }
            }
            ClientFrame::Admin { req, command, .. } => {
                let refusal = match (command, role) {
                    (AdminCommand::Switchover, "active") | (AdminCommand::Promote { force: true }, "passive") => None,
                    (AdminCommand::Switchover, _) => Some((ErrorCode::NotActive, "not the active node")),
                    (AdminCommand::Promote { force: false }, _) => Some((ErrorCode::InvalidRequest, "force required")),
                    (AdminCommand::Promote { .. }, _) => Some((ErrorCode::InvalidRequest, "already active")),
                    (_, "active") => None,
                    (_, _) => Some((ErrorCode::NotActive, "not the active node")),
                };
                match refusal {
                    None => ServerFrame::Done { req },
                    Some((code, message)) => {
                        ServerFrame::Error(ErrorFrame::new(code, ErrorContext::Request { req }, message))
                    }
                }
            }
            ClientFrame::Bye => break,
            _ => {
                let context = ErrorContext::Connection;
                ServerFrame::Error(ErrorFrame::new(ErrorCode::ProtocolViolation, context, "not on an admin connection"))
            }
        };
        if framed.send(answer).await.is_err() {
            break;
        }
    }
}

/// An address nothing listens on.
pub async fn dead_addr() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().to_string()
}

pub fn config(servers: &[&str]) -> ClientConfig {
    ClientConfig::new(servers.iter().copied()).connect_timeout(PATIENCE)
}

pub fn delivered(seq: u64, body: &str) -> Delivered {
    Delivered {
        id: MessageId { epoch: 1, seq },
        destination: Destination::queue("q"),
        headers: Default::default(),
        payload: body.as_bytes().to_vec(),
        timestamp_ms: 0,
        expires_at_ms: None,
        persistent: true,
        redelivered: false,
        delivery_count: 0,
    }
}

pub async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future).await.expect("took too long")
}

/// Distinct values, for asserting "no duplicates".
pub fn distinct<T: std::hash::Hash + Eq + Clone>(items: &[T]) -> HashSet<T> {
    items.iter().cloned().collect()
}
