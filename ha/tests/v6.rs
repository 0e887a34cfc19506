//! HA protocol 6 on a real node (`Pair`: arbiter, monitor, witness and a
//! store writer on a temp directory) whose peer is this test, speaking the
//! link by hand at the version it chooses. At 6 the node says what it
//! advertises (`NodeInfo`) and shows what its peer advertises
//! (`HaStatus::peer_stomp`), sends its events as the link comes up and each
//! new one after, and merges the peer's (bounded); at 4 and 5 nothing of 6
//! goes out, and the link works as before (heartbeats both ways, the peer
//! counts as up).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use twinmq_ha::events::{EventKind, PairEvent, EVENT_RING, MAX_REASON_BYTES};
use twinmq_ha::monitor::DivergentMessages;
use twinmq_ha::secret::ClusterSecret;
use twinmq_ha::wire::{self, HaCodec, HaFrame, Heartbeat};
use twinmq_ha::{Failback, Gateway, HaConfig, HaStatus, Pair, Role, RoleCommand};
use twinmq_protocol::VersionRange;
use twinmq_store::{Store, StoreConfig, Writer, WriterConfig};

const NODE: &str = "node-a";
const PEER: &str = "node-b";
const WAIT: Duration = Duration::from_secs(10);

/// Answers the arbiter as a broker would, serving nothing: this node never
/// becomes active here (its peer says it is).
struct Broker;

impl Actor for Broker {
    type Context = Context<Self>;
}

impl Handler<RoleCommand> for Broker {
    type Result = Result<(), String>;
    fn handle(&mut self, cmd: RoleCommand, _: &mut Context<Self>) -> Self::Result {
        match cmd {
            RoleCommand::Activate { .. } => Err("this test's broker does not serve".into()),
            _ => Ok(()),
        }
    }
}

impl Handler<DivergentMessages> for Broker {
    type Result = bool;
    fn handle(&mut self, _: DivergentMessages, _: &mut Context<Self>) -> bool {
        true
    }
}

/// One node of a pair, its HA port, and what keeps it running.
struct Node {
    pair: Pair,
    ha: SocketAddr,
    secret: String,
    _gateway: std::net::TcpListener,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.pair.stop();
    }
}

fn start_node(advertise_stomp: Option<&str>) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut recovered) = Store::open(&StoreConfig::new(dir.path())).unwrap();
    let (writer, _thread): (Writer, _) =
        Writer::start(store, &mut recovered, WriterConfig { active: false, ..WriterConfig::default() }).unwrap();
    let gateway = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let ha = listener.local_addr().unwrap();
    let secret = twinmq_ha::secret::generate();
    let cfg = HaConfig {
        node_id: NODE.into(),
        priority: 100,
        ha_listen: ha,
        // The peer dials; this node has no path of its own to it.
        peer_ha: Vec::new(),
        peer_client: None,
        gateway: Gateway::Tcp(gateway.local_addr().unwrap()),
        cluster_secret: ClusterSecret::inline(&secret).unwrap(),
        heartbeat: Duration::from_millis(50),
        peer_timeout: Duration::from_millis(600),
        isolation_timeout: Duration::from_millis(600),
        takeover_delay: Duration::from_millis(1000),
        probe_interval: Duration::from_millis(100),
        probe_failures: 2,
        failback: Failback::Manual,
        disk_stall: Duration::from_secs(5),
        tls: None,
        advertise_stomp: advertise_stomp.map(str::to_string),
    };
    let broker = Broker.start();
    let pair = Pair::start(Arc::new(cfg), writer, broker.clone().recipient(), broker.recipient(), listener);
    Node { pair, ha, secret, _gateway: gateway, _dir: dir }
}

/// Dial `node` as its peer, speaking only `version`, and authenticate.
async fn dial_as_peer(node: &Node, version: u8) -> Framed<TcpStream, HaCodec> {
    let stream = TcpStream::connect(node.ha).await.unwrap();
    let mut framed = Framed::new(stream, wire::handshake_codec());
    let mine = wire::nonce();
    let versions = VersionRange::new(version, version);
    framed.send(HaFrame::Hello { node_id: PEER.into(), priority: 50, nonce: mine.clone(), versions }).await.unwrap();
    let theirs = match framed.next().await {
        Some(Ok(HaFrame::Challenge { nonce, version: chosen, .. })) => {
            assert_eq!(chosen, Some(version), "the node links at the peer's version");
            nonce
        }
        other => panic!("expected a challenge, got {other:?}"),
    };
    let key = ClusterSecret::inline(&node.secret).unwrap().keys()[0].handshake;
    let proof = wire::proof(&key, "dialer", &mine, &theirs, PEER, NODE);
    framed.send(HaFrame::Proof { proof }).await.unwrap();
    match framed.next().await {
        Some(Ok(HaFrame::Accepted { .. })) => {}
        other => panic!("expected Accepted, got {other:?}"),
    }
    framed.map_codec(|_| wire::codec())
}

/// What an active peer in epoch 1 says.
fn active_heartbeat() -> Heartbeat {
    Heartbeat {
        role: Role::Active,
        epoch: 1,
        floor: 1,
        last_seq: 0,
        last_op_epoch: 1,
        sees_gateway: true,
        in_sync: false,
        holding: false,
        holding_gen: 0,
        serviceable: true,
        disk_failed: false,
        confirmed_alone: false,
        disk_full: false,
    }
}

/// For `dur`: send a heartbeat every 50 ms (the peer stays up) and collect
/// every frame the node sends. A frame that does not decode fails the test.
async fn converse(link: &mut Framed<TcpStream, HaCodec>, dur: Duration) -> Vec<HaFrame> {
    let mut got = Vec::new();
    let end = Instant::now() + dur;
    while Instant::now() < end {
        link.send(HaFrame::Heartbeat(active_heartbeat())).await.unwrap();
        let until = tokio::time::Instant::now() + Duration::from_millis(50);
        while let Ok(Some(frame)) = tokio::time::timeout_at(until, link.next()).await {
            got.push(frame.unwrap());
        }
    }
    got
}

/// Poll the node's status until `pred` holds (with heartbeats going out meanwhile).
async fn wait_status(
    node: &Node,
    link: &mut Framed<TcpStream, HaCodec>,
    what: &str,
    pred: impl Fn(&HaStatus) -> bool,
) -> Vec<HaFrame> {
    let deadline = Instant::now() + WAIT;
    let mut frames = Vec::new();
    loop {
        frames.extend(converse(link, Duration::from_millis(100)).await);
        if pred(&node.pair.status.borrow()) {
            return frames;
        }
        assert!(Instant::now() < deadline, "not {what} within {WAIT:?}: {:?}", *node.pair.status.borrow());
    }
}

/// Every event the node sent, frame by frame.
fn events_sent(frames: &[HaFrame]) -> Vec<Vec<PairEvent>> {
    frames
        .iter()
        .filter_map(|f| match f {
            HaFrame::Events { events } => Some(events.clone()),
            _ => None,
        })
        .collect()
}

fn node_infos(frames: &[HaFrame]) -> Vec<Option<String>> {
    frames
        .iter()
        .filter_map(|f| match f {
            HaFrame::NodeInfo { stomp } => Some(stomp.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_peer_at_4_or_5_links_as_before_and_hears_nothing_of_6() {
    actix_rt::System::new().block_on(async {
        for version in [4, 5] {
            assert!(wire::HA_VERSIONS.contains(version) && version < wire::NODE_INFO_VERSION);
            let node = start_node(Some("10.0.0.1:61613"));
            // It has events to tell (the gateway found, at least) before the peer dials.
            let deadline = Instant::now() + WAIT;
            while node.pair.status.borrow().events.is_empty() {
                assert!(Instant::now() < deadline, "no event: {:?}", *node.pair.status.borrow());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut link = dial_as_peer(&node, version).await;
            let mut frames = wait_status(&node, &mut link, "seeing its peer up", |s| s.peer_state == "up").await;
            frames.extend(converse(&mut link, Duration::from_millis(500)).await);
            assert!(frames.iter().any(|f| matches!(f, HaFrame::Heartbeat(_))), "at {version}: {frames:?}");
            // Everything sent decoded above; a peer at `version` could decode
            // it too only if none of it is of 6.
            assert!(node_infos(&frames).is_empty(), "NodeInfo sent on a link at {version}: {frames:?}");
            assert!(events_sent(&frames).is_empty(), "Events sent on a link at {version}: {frames:?}");
            let kinds: Vec<EventKind> = node.pair.status.borrow().events.iter().map(|e| e.kind).collect();
            assert!(kinds.contains(&EventKind::PeerUp), "recorded all the same: {kinds:?}");
            let s = node.pair.status.borrow().clone();
            assert_eq!((s.peer_state, s.peer_id.as_deref(), s.peer_stomp), ("up", Some(PEER), None), "at {version}");
        }
    });
}

#[test]
fn at_6_each_node_tells_its_peer_what_it_advertises() {
    actix_rt::System::new().block_on(async {
        let node = start_node(Some("10.0.0.1:61613"));
        let mut link = dial_as_peer(&node, 6).await;
        let frames = wait_status(&node, &mut link, "seeing its peer up", |s| s.peer_state == "up").await;
        assert_eq!(node_infos(&frames), vec![Some("10.0.0.1:61613".to_string())], "once per link: {frames:?}");
        assert_eq!(node.pair.status.borrow().peer_stomp, None, "the peer has not said yet");

        // What the peer says is checked: an address with a newline or one
        // too long is dropped, a good one is shown.
        for bad in ["10.0.0.2:61613\nforged", &"x".repeat(wire::MAX_ADVERTISED_LEN + 1)] {
            link.send(HaFrame::NodeInfo { stomp: Some(bad.to_string()) }).await.unwrap();
            converse(&mut link, Duration::from_millis(300)).await;
            assert_eq!(node.pair.status.borrow().peer_stomp, None, "{bad:?} is not shown");
        }
        link.send(HaFrame::NodeInfo { stomp: Some("10.0.0.2:61613".into()) }).await.unwrap();
        wait_status(&node, &mut link, "showing the peer's STOMP address", |s| {
            s.peer_stomp.as_deref() == Some("10.0.0.2:61613")
        })
        .await;
        // It may stop advertising.
        link.send(HaFrame::NodeInfo { stomp: None }).await.unwrap();
        wait_status(&node, &mut link, "forgetting the peer's STOMP address", |s| s.peer_stomp.is_none()).await;
        link.send(HaFrame::NodeInfo { stomp: Some("10.0.0.2:61613".into()) }).await.unwrap();
        wait_status(&node, &mut link, "showing it again", |s| s.peer_stomp.is_some()).await;

        // A peer gone is a peer that advertises nothing: as soon as its last
        // connection is (before `peer_timeout` says it is down).
        drop(link);
        let deadline = Instant::now() + WAIT;
        while node.pair.status.borrow().peer_stomp.is_some() {
            assert!(Instant::now() < deadline, "still shown: {:?}", *node.pair.status.borrow());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

#[test]
fn at_6_events_go_both_ways_merged_and_bounded() {
    actix_rt::System::new().block_on(async {
        let node = start_node(None);
        let deadline = Instant::now() + WAIT;
        while !node.pair.status.borrow().events.iter().any(|e| e.kind == EventKind::GatewayFound) {
            assert!(Instant::now() < deadline, "no gateway-found: {:?}", *node.pair.status.borrow());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let before: Vec<PairEvent> = node.pair.status.borrow().events.to_vec();
        let mut link = dial_as_peer(&node, 6).await;
        let frames = wait_status(&node, &mut link, "seeing its peer up", |s| s.peer_state == "up").await;
        let mut sent = events_sent(&frames);
        assert!(!sent.is_empty(), "no Events frame: {frames:?}");
        // As the link came up: the whole ring, oldest first.
        let first = sent.remove(0);
        assert!(before.iter().all(|e| first.contains(e)), "the ring {before:?} in {first:?}");
        assert!(first.windows(2).all(|w| w[0].at_ms <= w[1].at_ms), "oldest first: {first:?}");
        assert!(first.iter().all(|e| e.node == NODE));
        // Then each new one as it is recorded: the peer seen up.
        let mut later: Vec<PairEvent> = sent.into_iter().flatten().collect();
        let deadline = Instant::now() + WAIT;
        while !later.iter().any(|e| e.kind == EventKind::PeerUp) {
            assert!(Instant::now() < deadline, "peer-up not sent: {later:?}");
            later.extend(events_sent(&converse(&mut link, Duration::from_millis(100)).await).into_iter().flatten());
        }
        let up = later.iter().find(|e| e.kind == EventKind::PeerUp).unwrap();
        assert!(up.reason.contains(PEER), "{up:?}");

        // The peer's story, with this node's own events from before a
        // restart in it: merged in time order; sent twice, kept once.
        let t0 = before.first().map_or(1_000, |e| e.at_ms) - 10_000;
        let story = vec![
            PairEvent::new(t0, NODE, EventKind::Switchover, "asked by an operator"),
            PairEvent::new(t0 + 5, PEER, EventKind::Promotion, "passive -> active (epoch 2): switchover"),
            PairEvent::new(t0 + 5, NODE, EventKind::RoleChange, "active -> passive (epoch 1): switchover"),
        ];
        for _ in 0..2 {
            link.send(HaFrame::Events { events: story.clone() }).await.unwrap();
        }
        let frames = wait_status(&node, &mut link, "merging the peer's events", |s| {
            s.events.iter().any(|e| e.kind == EventKind::Promotion && e.node == PEER)
        })
        .await;
        let events = node.pair.status.borrow().events.clone();
        let expected = [story[0].clone(), story[2].clone(), story[1].clone()];
        assert_eq!(events[..3], expected, "merged before this node's own, by time then node");
        assert!(events.windows(2).all(|w| w[0].at_ms <= w[1].at_ms), "{events:?}");
        assert_eq!(events.iter().filter(|e| e.kind == EventKind::Promotion).count(), 1, "no duplicate: {events:?}");
        // What was merged from the peer is not sent back to it.
        assert!(events_sent(&frames).iter().flatten().all(|e| e.at_ms > t0 + 5), "{frames:?}");

        // A flood: far more events than a ring, reasons far too long, ids
        // that are not node ids. The ring keeps its bound and the checks.
        let flood: Vec<PairEvent> = (0..5 * EVENT_RING as u64)
            .map(|i| PairEvent {
                at_ms: t0 + 100 + i,
                node: if i % 7 == 0 { format!("{PEER}\nforged") } else { PEER.to_string() },
                kind: EventKind::PeerDown,
                reason: "x\u{1b}".repeat(4 * MAX_REASON_BYTES),
            })
            .collect();
        link.send(HaFrame::Events { events: flood }).await.unwrap();
        wait_status(&node, &mut link, "merging the flood", |s| s.events.iter().any(|e| e.kind == EventKind::PeerDown))
            .await;
        let events = node.pair.status.borrow().events.clone();
        assert!(events.len() <= EVENT_RING, "{}", events.len());
        assert!(events.iter().all(|e| e.reason.len() <= MAX_REASON_BYTES && !e.reason.contains('\u{1b}')));
        assert!(events.iter().all(|e| e.node == NODE || e.node == PEER), "invalid ids dropped");
        assert!(events.iter().any(|e| e.node == NODE && e.kind == EventKind::PeerUp), "the newest of its own kept");
    });
}
