//! The client against a tiny fake broker on loopback that speaks the protocol:
//! finding the active node, confirms and their order, the window, deliveries
//! and acks, a lost connection and an orderly close. The real broker's
//! integration tests live with the broker.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, Encoder, Framed};
use twinmq_client::{Client, ClientConfig, ClientError, Message, SubscribeOptions};
use twinmq_protocol::{
    ClientFrame, Delivered, Destination, ErrorCode, ErrorContext, ErrorFrame, FrameCodec, MessageId, ProtocolError,
    ServerFrame, DEFAULT_MAX_FRAME_BYTES,
};

/// Bound on every wait, so that a bug fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
enum Mode {
    Active { auto_confirm: bool, reject_seq: Option<u64> },
    Passive { hint: Option<String> },
    RefuseAuth,
}

fn active() -> Mode {
    Mode::Active { auto_confirm: true, reject_seq: None }
}

struct FakeBroker {
    addr: String,
    /// Every frame received, across connections, in order.
    received: mpsc::UnboundedReceiver<ClientFrame>,
    /// Frames to send on the current connection; `None` drops it.
    inject: mpsc::UnboundedSender<Option<ServerFrame>>,
    connections: Arc<AtomicUsize>,
}

impl FakeBroker {
    async fn start(mode: Mode) -> FakeBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (received_tx, received) = mpsc::unbounded_channel();
        let (inject, inject_rx) = mpsc::unbounded_channel();
        let connections = Arc::new(AtomicUsize::new(0));
        tokio::spawn(serve(listener, mode, received_tx, inject_rx, connections.clone()));
        FakeBroker { addr, received, inject, connections }
    }

    fn send(&self, frame: ServerFrame) {
        self.inject.send(Some(frame)).unwrap();
    }

    fn drop_connection(&self) {
        self.inject.send(None).unwrap();
    }

    /// The next received frame that `pick` accepts (others are skipped).
    async fn next<T>(&mut self, mut pick: impl FnMut(ClientFrame) -> Option<T>) -> T {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let frame = self.received.recv().await.expect("fake broker stopped");
                if let Some(found) = pick(frame) {
                    return found;
                }
            }
        })
        .await
        .expect("expected frame never came")
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve(
    listener: TcpListener,
    mode: Mode,
    received: mpsc::UnboundedSender<ClientFrame>,
    mut inject: mpsc::UnboundedReceiver<Option<ServerFrame>>,
    connections: Arc<AtomicUsize>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        connections.fetch_add(1, Ordering::SeqCst);
        let mut framed = Framed::new(stream, BrokerCodec(FrameCodec::new(DEFAULT_MAX_FRAME_BYTES)));
        let Some(Ok(hello)) = framed.next().await else { continue };
        assert!(matches!(hello, ClientFrame::Hello { .. }), "first frame must be Hello");
        let _ = received.send(hello);
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
            Mode::Active { auto_confirm, reject_seq } => (*auto_confirm, *reject_seq),
        };
        let welcome =
            ServerFrame::Welcome { node_id: "fake".into(), server_version: "0".into(), max_frame_bytes: 1 << 20 };
        framed.send(welcome).await.unwrap();
        loop {
            tokio::select! {
                biased;
                injected = inject.recv() => match injected {
                    Some(Some(frame)) => framed.send(frame).await.unwrap(),
                    _ => break,
                },
                frame = framed.next() => {
                    let Some(Ok(frame)) = frame else { break };
                    let _ = received.send(frame.clone());
                    let answer = match frame {
                        ClientFrame::Publish { producer_id, seq, .. } if Some(seq) == reject_seq => {
                            let context = ErrorContext::Publish { producer_id, seq };
                            Some(ServerFrame::Error(ErrorFrame::new(ErrorCode::NotAuthorized, context, "no")))
                        }
                        ClientFrame::Publish { producer_id, seq, .. } if auto_confirm => {
                            Some(ServerFrame::Confirm { producer_id, seq })
                        }
                        ClientFrame::Subscribe { sub_id, .. } => Some(ServerFrame::Subscribed { sub_id }),
                        ClientFrame::Status { req } => Some(ServerFrame::StatusReply { req, json: r#"{"role":"active"}"#.into() }),
                        ClientFrame::DeleteDurable { req, .. } => Some(ServerFrame::Done { req }),
                        ClientFrame::Bye => break,
                        _ => None,
                    };
                    if let Some(answer) = answer {
                        framed.send(answer).await.unwrap();
                    }
                }
            }
        }
    }
}

/// The broker side of `FrameCodec`, decoding only whole frames (the
/// protocol's decoder misreads a frame that arrives in pieces; see the
/// client's `link` module).
struct BrokerCodec(FrameCodec<ClientFrame, ServerFrame>);

impl Decoder for BrokerCodec {
    type Item = ClientFrame;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ClientFrame>, ProtocolError> {
        let Some(prefix) = src.get(..4) else { return Ok(None) };
        let len = u32::from_be_bytes(prefix.try_into().unwrap()) as usize;
        if src.len() < 4 + len {
            return Ok(None);
        }
        self.0.decode(src)
    }
}

impl Encoder<ServerFrame> for BrokerCodec {
    type Error = ProtocolError;

    fn encode(&mut self, frame: ServerFrame, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        self.0.encode(frame, dst)
    }
}

/// An address nothing listens on.
async fn dead_addr() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().to_string()
}

fn config(servers: &[&str]) -> ClientConfig {
    ClientConfig::new(servers.iter().copied()).connect_timeout(PATIENCE)
}

fn delivered(seq: u64, body: &str) -> Delivered {
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

async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future).await.expect("took too long")
}

#[tokio::test]
async fn connect_follows_the_active_hint() {
    let active = FakeBroker::start(active()).await;
    let passive = FakeBroker::start(Mode::Passive { hint: Some(active.addr.clone()) }).await;
    let client = Client::connect(config(&[&passive.addr])).await.unwrap();
    assert_eq!(client.server().addr, active.addr);
    assert_eq!(client.server().node_id, "fake");
    assert_eq!((passive.connections(), active.connections()), (1, 1));
}

#[tokio::test]
async fn unreachable_and_passive_nodes_are_skipped() {
    let dead = dead_addr().await;
    let passive = FakeBroker::start(Mode::Passive { hint: None }).await;
    let active = FakeBroker::start(active()).await;
    let client = Client::connect(config(&[&dead, &passive.addr, &active.addr])).await.unwrap();
    assert_eq!(client.server().addr, active.addr);
}

#[tokio::test]
async fn not_authenticated_is_final() {
    let refusing = FakeBroker::start(Mode::RefuseAuth).await;
    let active = FakeBroker::start(active()).await;
    let err = Client::connect(config(&[&refusing.addr, &active.addr]).user("u").password("bad")).await.unwrap_err();
    assert!(matches!(err, ClientError::Broker { code: ErrorCode::NotAuthenticated, .. }), "{err:?}");
    assert_eq!(active.connections(), 0);
}

#[tokio::test]
async fn when_every_node_fails_the_last_error_is_returned() {
    let dead = dead_addr().await;
    let passive = FakeBroker::start(Mode::Passive { hint: None }).await;
    let err = Client::connect(config(&[&dead, &passive.addr])).await.unwrap_err();
    assert!(matches!(err, ClientError::NotActive { active_hint: None, .. }), "{err:?}");
    let err = Client::connect(config(&[&passive.addr, &dead])).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    let err = Client::connect(config(&[])).await.unwrap_err();
    assert!(matches!(err, ClientError::NoServers), "{err:?}");
}

#[tokio::test]
async fn pipelined_publishes_carry_consecutive_seqs_and_confirm_in_order() {
    let mut broker = FakeBroker::start(active()).await;
    let client = Client::connect(config(&[&broker.addr]).window(16)).await.unwrap();
    let producer = client.producer(Destination::queue("q"));
    let mut confirms = Vec::new();
    for i in 0..500 {
        confirms.push(producer.send_nowait(Message::persistent(format!("m{i}"))).await.unwrap());
    }
    for confirm in confirms {
        within(confirm).await.unwrap();
    }
    assert_eq!(producer.in_flight(), 0);
    for expected in 1..=500u64 {
        let (producer_id, seq, payload) = broker
            .next(|f| match f {
                ClientFrame::Publish { producer_id, seq, message, .. } => Some((producer_id, seq, message.payload)),
                _ => None,
            })
            .await;
        assert_eq!((producer_id, seq), (producer.id(), expected));
        assert_eq!(payload, format!("m{}", expected - 1).into_bytes());
    }
    // Another producer has its own id and sequence.
    let other = client.producer(Destination::queue("q"));
    other.send(Message::persistent("x")).await.unwrap();
    let (id, seq) = broker
        .next(|f| match f {
            ClientFrame::Publish { producer_id, seq, .. } => Some((producer_id, seq)),
            _ => None,
        })
        .await;
    assert_ne!(id, producer.id());
    assert_eq!(seq, 1);
    client.close().await.unwrap();
}

#[tokio::test]
async fn the_window_bounds_unconfirmed_publishes() {
    let mut broker = FakeBroker::start(Mode::Active { auto_confirm: false, reject_seq: None }).await;
    let client = Client::connect(config(&[&broker.addr]).window(4)).await.unwrap();
    let producer = client.producer(Destination::queue("q"));
    let mut confirms = Vec::new();
    for _ in 0..4 {
        confirms.push(producer.send_nowait(Message::persistent("m")).await.unwrap());
    }
    assert_eq!(producer.in_flight(), 4);
    let blocked = tokio::time::timeout(Duration::from_millis(100), producer.send_nowait(Message::persistent("m")));
    assert!(blocked.await.is_err(), "a fifth publish must wait for a window slot");
    broker.next(|f| matches!(f, ClientFrame::Publish { seq: 4, .. }).then_some(())).await;

    broker.send(ServerFrame::Confirm { producer_id: producer.id(), seq: 1 });
    within(confirms.remove(0)).await.unwrap();
    let fifth = within(producer.send_nowait(Message::persistent("m"))).await.unwrap();
    assert_eq!(producer.in_flight(), 4);
    for seq in 2..=5 {
        broker.send(ServerFrame::Confirm { producer_id: producer.id(), seq });
    }
    for confirm in confirms {
        within(confirm).await.unwrap();
    }
    within(fifth).await.unwrap();
    assert_eq!(producer.in_flight(), 0);
}

#[tokio::test]
async fn a_refused_publish_fails_alone() {
    let broker = FakeBroker::start(Mode::Active { auto_confirm: true, reject_seq: Some(2) }).await;
    let client = Client::connect(config(&[&broker.addr])).await.unwrap();
    let producer = client.producer(Destination::queue("q"));
    let mut confirms = Vec::new();
    for _ in 0..3 {
        confirms.push(producer.send_nowait(Message::persistent("m")).await.unwrap());
    }
    let results: Vec<_> = futures_util::future::join_all(confirms).await;
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(matches!(results[1], Err(ClientError::Broker { code: ErrorCode::NotAuthorized, .. })), "{results:?}");
    assert_eq!(producer.in_flight(), 0);
}

#[tokio::test]
async fn deliveries_reach_the_consumer_and_acks_reach_the_broker() {
    let mut broker = FakeBroker::start(active()).await;
    let client = Client::connect(config(&[&broker.addr])).await.unwrap();
    let mut consumer = client.subscribe(Destination::queue("q"), SubscribeOptions::default()).await.unwrap();
    let sub_id = broker.next(|f| if let ClientFrame::Subscribe { sub_id, .. } = f { Some(sub_id) } else { None }).await;
    for seq in 1..=3 {
        broker.send(ServerFrame::Deliver { sub_id, message: delivered(seq, &format!("body{seq}")) });
    }
    for seq in 1..=3 {
        let delivery = within(consumer.recv()).await.unwrap().unwrap();
        assert_eq!(delivery.payload(), format!("body{seq}").as_bytes());
        assert_eq!(delivery.message().id.seq, seq);
        if seq == 2 {
            delivery.nack().await.unwrap();
            broker.next(|f| matches!(f, ClientFrame::Nack { id: MessageId { seq: 2, .. }, .. }).then_some(())).await;
        } else {
            delivery.ack().await.unwrap();
            let acked = broker.next(|f| if let ClientFrame::Ack { id, .. } = f { Some(id.seq) } else { None }).await;
            assert_eq!(acked, seq);
        }
    }
    assert_eq!(within(client.status()).await.unwrap(), r#"{"role":"active"}"#);
    within(client.delete_durable("t", "d")).await.unwrap();
    consumer.unsubscribe().await.unwrap();
    broker.next(|f| matches!(f, ClientFrame::Unsubscribe { .. }).then_some(())).await;
}

#[tokio::test]
async fn a_lost_connection_fails_pending_sends_and_ends_consumers() {
    let broker = FakeBroker::start(Mode::Active { auto_confirm: false, reject_seq: None }).await;
    let client = Client::connect(config(&[&broker.addr])).await.unwrap();
    let mut consumer = client.subscribe(Destination::queue("q"), SubscribeOptions::default()).await.unwrap();
    let producer = client.producer(Destination::queue("q"));
    let first = producer.send_nowait(Message::persistent("a")).await.unwrap();
    let second = producer.send_nowait(Message::persistent("b")).await.unwrap();
    broker.drop_connection();
    assert!(matches!(within(first).await, Err(ClientError::Disconnected)));
    assert!(matches!(within(second).await, Err(ClientError::Disconnected)));
    assert!(matches!(within(consumer.recv()).await, Some(Err(ClientError::Disconnected))));
    assert!(within(consumer.recv()).await.is_none());
    assert!(matches!(producer.send(Message::persistent("c")).await, Err(ClientError::Disconnected)));
    assert!(matches!(client.status().await, Err(ClientError::Disconnected)));
}

#[tokio::test]
async fn close_waits_for_confirms_then_says_bye() {
    let mut broker = FakeBroker::start(Mode::Active { auto_confirm: false, reject_seq: None }).await;
    let client = Client::connect(config(&[&broker.addr])).await.unwrap();
    let mut consumer = client.subscribe(Destination::queue("q"), SubscribeOptions::default()).await.unwrap();
    let producer = client.producer(Destination::queue("q"));
    let confirm = producer.send_nowait(Message::persistent("a")).await.unwrap();
    let closing = tokio::spawn({
        let client = client.clone();
        async move { client.close().await }
    });
    broker.next(|f| matches!(f, ClientFrame::Publish { .. }).then_some(())).await;
    // Closing refuses new work while it waits.
    assert!(matches!(producer.send(Message::persistent("b")).await, Err(ClientError::Closed)));
    assert!(!closing.is_finished());
    broker.send(ServerFrame::Confirm { producer_id: producer.id(), seq: 1 });
    within(confirm).await.unwrap();
    within(closing).await.unwrap().unwrap();
    broker.next(|f| matches!(f, ClientFrame::Bye).then_some(())).await;
    assert!(within(consumer.recv()).await.is_none());
}

#[tokio::test]
async fn close_gives_up_on_confirms_after_its_timeout() {
    let broker = FakeBroker::start(Mode::Active { auto_confirm: false, reject_seq: None }).await;
    let config = config(&[&broker.addr]).close_timeout(Duration::from_millis(100));
    let client = Client::connect(config).await.unwrap();
    let producer = client.producer(Destination::queue("q"));
    let confirm = producer.send_nowait(Message::persistent("a")).await.unwrap();
    assert!(matches!(within(client.close()).await, Err(ClientError::Timeout { .. })));
    assert!(matches!(within(confirm).await, Err(ClientError::Timeout { .. })));
}

#[tokio::test]
async fn a_broker_exceeding_the_prefetch_ends_the_consumer() {
    let mut broker = FakeBroker::start(active()).await;
    let client = Client::connect(config(&[&broker.addr])).await.unwrap();
    let options = SubscribeOptions::default().prefetch(1);
    let mut consumer = client.subscribe(Destination::queue("q"), options).await.unwrap();
    let sub_id = broker.next(|f| if let ClientFrame::Subscribe { sub_id, .. } = f { Some(sub_id) } else { None }).await;
    broker.send(ServerFrame::Deliver { sub_id, message: delivered(1, "a") });
    broker.send(ServerFrame::Deliver { sub_id, message: delivered(2, "b") });
    // The status answer comes after both deliveries, so both were handled.
    within(client.status()).await.unwrap();
    assert!(within(consumer.recv()).await.unwrap().is_ok());
    assert!(matches!(within(consumer.recv()).await, Some(Err(ClientError::PrefetchExceeded { prefetch: 1 }))));
    assert!(within(consumer.recv()).await.is_none());
    broker.next(|f| matches!(f, ClientFrame::Unsubscribe { .. }).then_some(())).await;
}

#[tokio::test]
async fn dropping_a_consumer_unsubscribes() {
    let mut broker = FakeBroker::start(active()).await;
    let client = Client::connect(config(&[&broker.addr])).await.unwrap();
    let consumer = client.subscribe(Destination::queue("q"), SubscribeOptions::default()).await.unwrap();
    let sub_id = broker.next(|f| if let ClientFrame::Subscribe { sub_id, .. } = f { Some(sub_id) } else { None }).await;
    drop(consumer);
    let gone = broker.next(|f| if let ClientFrame::Unsubscribe { sub_id } = f { Some(sub_id) } else { None }).await;
    assert_eq!(gone, sub_id);
}

/// Run the `twinmq` binary; (exit code, stdout, stderr).
async fn twinmq(args: &[&str]) -> (i32, String, String) {
    let output = within(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_twinmq")).args(args).env_remove("TWINMQ_SERVERS").output(),
    )
    .await
    .unwrap();
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
    (output.status.code().unwrap_or(-1), text(output.stdout), text(output.stderr))
}

#[tokio::test]
async fn cli_pub_prints_the_confirmed_count() {
    let mut broker = FakeBroker::start(active()).await;
    let (code, stdout, stderr) =
        twinmq(&["--servers", &broker.addr, "pub", "orders", "--count", "50", "--size", "10", "--window", "8"]).await;
    assert_eq!((code, stdout.as_str()), (0, "confirmed 50\n"), "{stderr}");
    let (seq, payload) = broker
        .next(|f| match f {
            ClientFrame::Publish { seq: 3, message, .. } => Some((3, message.payload)),
            _ => None,
        })
        .await;
    assert_eq!((seq, payload), (3, b"msg-2 xxxx".to_vec()));
}

#[tokio::test]
async fn cli_pub_reports_the_confirmed_prefix_and_fails() {
    let broker = FakeBroker::start(Mode::Active { auto_confirm: true, reject_seq: Some(4) }).await;
    let (code, stdout, stderr) = twinmq(&["--servers", &broker.addr, "pub", "q", "--count", "20"]).await;
    assert_eq!((code, stdout.as_str()), (1, "confirmed 3\n"));
    assert!(stderr.contains("NotAuthorized"), "{stderr}");
}

#[tokio::test]
async fn cli_without_servers_is_a_usage_error() {
    let (code, _, stderr) = twinmq(&["status"]).await;
    assert_eq!(code, 2, "{stderr}");
}
