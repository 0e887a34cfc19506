//! The HA pair on loopback with two real `twinmqd` processes: failover,
//! rejoin and failback, gateway loss, authentication of the peer, snapshot
//! catch-up, switchover and a cut HA cable. Invariants checked in each:
//! every confirmed message is consumed at least once; never two actives.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::pair::{Pair, PairOptions};
use twinmq_client::{AdminClient, Client, Destination, Message, SubscribeOptions};

const WAIT: Duration = Duration::from_secs(15);

/// A producer sending uniquely numbered messages until stopped; records what was confirmed.
struct Load {
    confirmed: Arc<Mutex<HashSet<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(client: Client, queue: &str, tag: &str) -> Load {
        let confirmed: Arc<Mutex<HashSet<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let producer = client.producer(Destination::queue(queue));
        let (record, stopping, tag) = (confirmed.clone(), stop.clone(), tag.to_string());
        let task = tokio::spawn(async move {
            let mut pending = std::collections::VecDeque::new();
            let mut i = 0u64;
            while !stopping.load(Ordering::Relaxed) {
                let body = format!("{tag}-{i}");
                i += 1;
                let c = producer.send_nowait(Message::persistent(body.clone())).await.expect("send is queued");
                pending.push_back((body, c));
                while pending.len() > 32 {
                    let (body, c) = pending.pop_front().unwrap();
                    c.await.expect("no error reaches the application during a failover");
                    record.lock().unwrap().insert(body);
                }
                if i.is_multiple_of(64) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            for (body, c) in pending {
                c.await.expect("confirmed after the failover");
                record.lock().unwrap().insert(body);
            }
            drop(client);
        });
        Load { confirmed, stop, task }
    }

    async fn finish(self) -> HashSet<String> {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(60), self.task).await.expect("load finishes").unwrap();
        self.confirmed.lock().unwrap().clone()
    }
}

/// Consume everything from `queue` through the pair; returns distinct bodies.
async fn consume_all(pair: &Pair, queue: &str) -> HashSet<String> {
    let client = Client::connect(pair.client_config()).await.unwrap();
    let mut c = client.subscribe(Destination::queue(queue), SubscribeOptions::default().prefetch(512)).await.unwrap();
    let mut got = HashSet::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(1500), c.recv()).await {
        got.insert(String::from_utf8_lossy(d.payload()).into_owned());
        d.ack().await.unwrap();
    }
    got
}

fn assert_no_loss(confirmed: &HashSet<String>, received: &HashSet<String>, what: &str) {
    let lost: Vec<&String> = confirmed.difference(received).collect();
    assert!(lost.is_empty(), "{what}: {} confirmed messages lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);
    assert!(!confirmed.is_empty(), "{what}: the load confirmed something");
}

async fn never_both_active(pair: &Pair) {
    let (a, b) = (pair.a.role().await, pair.b.role().await);
    let active = |r: &Option<String>| r.as_deref().is_some_and(|r| r.starts_with("active"));
    assert!(!(active(&a) && active(&b)), "two actives: a={a:?} b={b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_of_active_then_rejoin_and_auto_failback_lose_no_confirmed_message() {
    let mut pair = Pair::start(PairOptions { failback_auto: true, ..Default::default() }).await;
    pair.wait_a_active_b_in_sync().await;

    // (1) kill -9 the active during a stream of confirmed sends.
    let load = Load::start(Client::connect(pair.client_config()).await.unwrap(), "orders", "k");
    tokio::time::sleep(Duration::from_millis(700)).await;
    pair.a.kill9();
    let b = pair.b.wait_for("active", WAIT, |s| s["role"].as_str().is_some_and(|r| r.starts_with("active"))).await;
    assert_eq!(b["epoch"].as_u64(), Some(2), "promotion bumps the epoch: {b}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let confirmed_1 = load.finish().await;

    // (2) restart the old active: it rejoins passive, catches up, and takes the role back.
    let load = Load::start(Client::connect(pair.client_config()).await.unwrap(), "orders", "r");
    pair.a.start();
    pair.a.wait_role("active", WAIT).await;
    pair.b.wait_role("passive", WAIT).await;
    never_both_active(&pair).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let confirmed_2 = load.finish().await;
    assert!(pair.b.log().contains("failback"), "b handed the role back for failback:\n{}", pair.b.log());

    let received = consume_all(&pair, "orders").await;
    assert_no_loss(&confirmed_1, &received, "kill -9 of the active");
    assert_no_loss(&confirmed_2, &received, "rejoin and failback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_gateway_while_both_nodes_are_up_changes_nothing() {
    let pair = Pair::start(PairOptions::default()).await;
    pair.wait_a_active_b_in_sync().await;
    pair.gateway.pull();
    pair.a.wait_for("seeing the gateway gone", WAIT, |s| s["gateway"]["reachable"] == false).await;
    pair.b.wait_for("seeing the gateway gone", WAIT, |s| s["gateway"]["reachable"] == false).await;
    // Longer than takeover_delay (1.5 s) and isolation_timeout (1 s).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(pair.a.role().await.as_deref(), Some("active"));
    assert_eq!(pair.b.role().await.as_deref(), Some("passive"));
    let client = match Client::connect(pair.client_config()).await {
        Ok(c) => c,
        Err(e) => panic!("{e}\nA:\n{}\nB:\n{}", pair.a.log(), pair.b.log()),
    };
    client.producer(Destination::queue("q")).send(Message::persistent("still served")).await.unwrap();
    pair.gateway.replug();
    pair.a.wait_for("seeing the gateway again", WAIT, |s| s["gateway"]["reachable"] == true).await;
    assert_eq!(pair.a.role().await.as_deref(), Some("active"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_wrong_cluster_secret_never_joins() {
    // Neither node can pair; a has no store to be sure of, so the operator
    // promotes it. A node that never held a copy knows only the users of its
    // configuration: anonymous may not force it (issue 10).
    let opts = PairOptions { b_secret: Some(common::pair::OTHER_SECRET.into()), ..Default::default() };
    let mut pair = Pair::start(opts.with_root()).await;
    let anonymous = pair.client_config().failover_timeout(Duration::from_secs(1));
    let err = AdminClient::connect_to(&pair.a.client.to_string(), &anonymous).await.unwrap_err();
    assert!(err.to_string().contains("never held a complete copy"), "{err}");
    let cfg = pair.as_root();
    let mut admin = AdminClient::connect_to(&pair.a.client.to_string(), &cfg).await.unwrap();
    admin.promote(true).await.unwrap();
    pair.a.wait_for("active", WAIT, |s| s["role"].as_str().is_some_and(|r| r.starts_with("active"))).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let a = pair.a.status().await.unwrap();
    assert_ne!(a["peer"]["state"], "up", "a must not accept b: {a}");
    assert!(pair.a.log().contains("does not know the cluster secret"), "refusal logged:\n{}", pair.a.log());
    let b = pair.b.status().await.unwrap();
    assert_eq!(b["in_sync"], false, "b received nothing: {b}");
    assert_ne!(b["role"], "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_an_empty_data_dir_catches_up_from_a_snapshot_and_can_take_over() {
    let mut pair = Pair::start(PairOptions::default()).await;
    pair.wait_a_active_b_in_sync().await;
    let client = Client::connect(pair.client_config()).await.unwrap();
    let producer = client.producer(Destination::queue("snap"));
    let mut confirmed = HashSet::new();
    for i in 0..2000 {
        let body = format!("s-{i}");
        producer.send(Message::persistent(body.clone())).await.unwrap();
        confirmed.insert(body);
    }
    pair.b.kill9();
    std::fs::remove_dir_all(&pair.b.data_dir).unwrap();
    pair.b.start();
    let b = pair.b.wait_for("in sync", WAIT, |s| s["role"] == "passive" && s["in_sync"] == true).await;
    assert!(b["last_op"].as_u64().unwrap() >= 2000, "b caught up: {b}");
    // From a snapshot, or from the records the active still holds in memory.
    assert!(
        pair.b.log().contains("snapshot from the peer loaded")
            || pair.a.log().contains("peer resumes the replication stream"),
        "{}",
        pair.b.log()
    );
    pair.a.kill9();
    pair.b.wait_for("active", WAIT, |s| s["role"].as_str().is_some_and(|r| r.starts_with("active"))).await;
    let received = consume_all(&pair, "snap").await;
    assert_no_loss(&confirmed, &received, "snapshot catch-up then takeover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_load_loses_nothing() {
    let pair = Pair::start(PairOptions::default()).await;
    pair.wait_a_active_b_in_sync().await;
    let load = Load::start(Client::connect(pair.client_config()).await.unwrap(), "sw", "w");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let served_by = AdminClient::switchover_any(&pair.client_config()).await.expect("switchover");
    assert_eq!(served_by.addr, pair.a.client.to_string(), "the active node took the command");
    pair.b.wait_role("active", WAIT).await;
    pair.a.wait_role("passive", WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    never_both_active(&pair).await;
    let confirmed = load.finish().await;
    let received = consume_all(&pair, "sw").await;
    assert_no_loss(&confirmed, &received, "switchover under load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_ha_cable_with_the_client_network_up_causes_no_takeover() {
    let pair = Pair::start(PairOptions { ha_cable_proxy: true, ..Default::default() }).await;
    pair.wait_a_active_b_in_sync().await;
    let load = Load::start(Client::connect(pair.client_config()).await.unwrap(), "cable", "c");
    for p in &pair.cable {
        p.cut();
    }
    // Longer than peer_timeout + takeover_delay.
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        never_both_active(&pair).await;
    }
    assert_eq!(pair.a.role().await.as_deref(), Some("active"));
    assert_eq!(pair.b.role().await.as_deref(), Some("passive"));
    let b = pair.b.status().await.unwrap();
    assert_eq!(b["peer"]["state"], "up", "the second path carries the heartbeats: {b}");
    let confirmed = load.finish().await;
    let received = consume_all(&pair, "cable").await;
    assert_no_loss(&confirmed, &received, "cut HA cable");
    assert!(!pair.a.log().contains("role change from=active"), "a never stepped down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replication_stream_moves_between_paths_without_a_new_snapshot() {
    // Every HA connection runs through one of four proxies; dropping each in
    // turn drops the one carrying the stream at some point. It must go on on
    // another connection from where it was (DESIGN.md section 5, catch-up): a
    // new snapshot would leave b out of sync, unable to take over, meanwhile.
    let pair = Pair::start(PairOptions { all_paths_proxied: true, ..Default::default() }).await;
    pair.wait_a_active_b_in_sync().await;
    let load = Load::start(Client::connect(pair.client_config()).await.unwrap(), "moves", "m");
    for round in 0..2 {
        for p in &pair.cable {
            p.cut();
            tokio::time::sleep(Duration::from_millis(150)).await;
            p.restore();
            tokio::time::sleep(Duration::from_millis(150)).await;
            let b = pair.b.status().await.unwrap();
            assert_eq!(b["in_sync"], true, "round {round}: b fell out of sync: {b}\n{}", pair.b.log());
        }
    }
    assert!(pair.a.log().contains("peer resumes the replication stream"), "{}", pair.a.log());
    assert!(pair.b.log().matches("snapshot from the peer loaded").count() <= 1, "{}", pair.b.log());
    assert!(!pair.b.log().contains("to=passive-syncing"), "b fell out of sync:\n{}", pair.b.log());
    assert_eq!(pair.a.role().await.as_deref(), Some("active"));
    let confirmed = load.finish().await;
    assert!(confirmed.len() > 50, "the load ran: {} confirmed", confirmed.len());
    let received = consume_all(&pair, "moves").await;
    assert_no_loss(&confirmed, &received, "stream moved between paths");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_active_is_replaced_and_never_serves_as_a_second_active_when_it_wakes() {
    let pair = Pair::start(PairOptions::default()).await;
    pair.wait_a_active_b_in_sync().await;
    let load = Load::start(Client::connect(pair.client_config()).await.unwrap(), "frozen", "f");
    tokio::time::sleep(Duration::from_millis(500)).await;
    pair.a.freeze();
    // Longer than takeover_delay: b takes over while a is frozen.
    pair.b.wait_for("active", WAIT, |s| s["role"].as_str().is_some_and(|r| r.starts_with("active"))).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    pair.a.thaw();
    // From the moment a answers again, it must never say it is active.
    for _ in 0..40 {
        if let Some(role) = pair.a.role().await {
            assert!(!role.starts_with("active"), "a serves as a second active after waking: {role}\n{}", pair.a.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pair.a.wait_role("passive", WAIT).await;
    let confirmed = load.finish().await;
    let received = consume_all(&pair, "frozen").await;
    assert_no_loss(&confirmed, &received, "SIGSTOP of the active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_healed_split_the_losing_side_hands_over_what_it_confirmed() {
    // Both paths between the nodes cut, both still see the gateway: the
    // design accepts two actives here (the gateway cannot vote); on healing,
    // the higher epoch stays and the other hands over its divergent messages.
    let pair = Pair::start(PairOptions { all_paths_proxied: true, ..Default::default() }).await;
    pair.wait_a_active_b_in_sync().await;
    // The queue exists before the split: creating one during it is refused.
    let mut confirmed = HashSet::new();
    let setup = Client::connect(pair.client_config()).await.unwrap();
    setup.producer(Destination::queue("split")).send(Message::persistent("split-before")).await.unwrap();
    confirmed.insert("split-before".to_string());
    drop(setup);
    common::pair::Proxy::cut_all(&pair.cable);
    pair.b
        .wait_for("active after the split", WAIT, |s| s["role"].as_str().is_some_and(|r| r.starts_with("active")))
        .await;
    let only = |addr: std::net::SocketAddr| {
        twinmq_client::ClientConfig::new([addr.to_string()]).failover_timeout(Duration::from_secs(20))
    };
    let (ca, cb) =
        (Client::connect(only(pair.a.client)).await.unwrap(), Client::connect(only(pair.b.client)).await.unwrap());
    let mut confirmed = HashSet::new();
    for i in 0..200 {
        for (c, side) in [(&ca, "a"), (&cb, "b")] {
            let body = format!("split-{side}-{i}");
            c.producer(Destination::queue("split")).send(Message::persistent(body.clone())).await.unwrap();
            confirmed.insert(body);
        }
    }
    drop((ca, cb));
    for p in &pair.cable {
        p.restore();
    }
    pair.a.wait_role("passive", WAIT).await;
    pair.b.wait_for("active", WAIT, |s| s["role"].as_str().is_some_and(|r| r.starts_with("active"))).await;
    // a hands over once b's attach tells it where the histories part (a
    // moment after it stepped down).
    for _ in 0..100 {
        if pair.a.log().contains("handing them to the new active") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pair.a.log().contains("handing them to the new active"), "a handed over:\n{}", pair.a.log());
    // b says when it has stored them; only then does a forget them.
    for _ in 0..100 {
        if pair.a.log().contains("the new active stored the messages handed over") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        pair.a.log().contains("the new active stored the messages handed over"),
        "b confirmed the hand-over:\n{}",
        pair.a.log()
    );
    let received = consume_all(&pair, "split").await;
    assert_no_loss(&confirmed, &received, "healed split");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_are_refused_while_the_pair_is_split() {
    let mut pair = Pair::start(PairOptions::default()).await;
    pair.wait_a_active_b_in_sync().await;
    let client = Client::connect(pair.client_config()).await.unwrap();
    client.producer(Destination::queue("existing")).send(Message::persistent("before")).await.unwrap();
    pair.b.kill9();
    pair.a.wait_role("active-alone", WAIT).await;
    // Serving goes on for what exists...
    client.producer(Destination::queue("existing")).send(Message::persistent("during")).await.unwrap();
    // ...but creating a destination would make the two stores disagree.
    let err = client.producer(Destination::queue("brand-new")).send(Message::persistent("x")).await.unwrap_err();
    assert_eq!(err.code(), Some(twinmq_client::ErrorCode::InvalidRequest), "{err}");
    assert!(err.to_string().contains("split"), "the error says why: {err}");
    let err =
        client.subscribe(Destination::topic("t"), SubscribeOptions::default().durable("new-sub")).await.unwrap_err();
    assert!(err.to_string().contains("split"), "{err}");
    // Users and ACLs too, unless the operator forces it.
    let add = twinmq_client::admin::AdminCommand::UserAdd {
        name: "late".into(),
        password_hash: twinmq_broker::auth::hash_password("pw").unwrap(),
        grants: vec!["admin:#".parse().unwrap()],
    };
    let err = AdminClient::command_on_active(&pair.client_config(), add.clone(), false).await.unwrap_err();
    assert!(err.to_string().contains("split"), "{err}");
    let (server, _) = AdminClient::command_on_active(&pair.client_config(), add, true).await.unwrap();
    assert_eq!(server.node_id, "node-a", "forced on the active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_nodes_stopped_together_shut_down_cleanly_and_keep_every_confirmed_message() {
    let mut pair = Pair::start(PairOptions::default()).await;
    pair.wait_a_active_b_in_sync().await;
    let client = Client::connect(pair.client_config()).await.unwrap();
    let producer = client.producer(Destination::queue("stop"));
    let mut confirmed = HashSet::new();
    for i in 0..300 {
        let body = format!("t-{i}");
        producer.send(Message::persistent(body.clone())).await.unwrap();
        confirmed.insert(body);
    }
    drop(client);
    // SIGTERM to both at once: the active loses its follower while draining.
    let (sa, sb) = (pair.a.terminate(), pair.b.terminate());
    assert!(sa.success() && sb.success(), "clean exits: a {sa}, b {sb}\na:\n{}", pair.a.log());
    pair.a.start();
    pair.b.start();
    // Whichever stopped second may have taken over for a moment (a newer
    // epoch): the pair elects the newest store, so either may come back active.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (ra, rb) = (pair.a.role().await.unwrap_or_default(), pair.b.role().await.unwrap_or_default());
        if ra.starts_with("active") != rb.starts_with("active") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no single active after restart: a={ra} b={rb}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let received = consume_all(&pair, "stop").await;
    assert_no_loss(&confirmed, &received, "both stopped with SIGTERM");
}

/// Send `n` persistent messages `<tag>-<i>` to `queue` through `node` alone.
async fn send_to(node: &common::pair::Node, queue: &str, tag: &str, n: usize) -> HashSet<String> {
    let cfg = twinmq_client::ClientConfig::new([node.client.to_string()]).failover_timeout(Duration::from_secs(10));
    let client = Client::connect(cfg).await.unwrap();
    let producer = client.producer(Destination::queue(queue));
    let mut sent = HashSet::new();
    for i in 0..n {
        let body = format!("{tag}-{i}");
        producer.send(Message::persistent(body.clone())).await.unwrap();
        sent.insert(body);
    }
    sent
}

fn is_active(s: &serde_json::Value) -> bool {
    s["role"].as_str().is_some_and(|r| r.starts_with("active"))
}

/// `node` serves nothing for `how_long` and reports `waiting`.
async fn stays_waiting(node: &common::pair::Node, how_long: Duration) -> serde_json::Value {
    let s = node.wait_for("waiting", WAIT, |s| s["role"] == "waiting").await;
    let until = std::time::Instant::now() + how_long;
    while std::time::Instant::now() < until {
        if let Some(s) = node.status().await {
            assert!(!is_active(&s), "{} serves though its peer may hold what it lacks: {s}\n{}", node.name, node.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_9_schedule_1_a_node_restarted_alone_after_its_peer_took_over_waits() {
    // m0 on a; kill a: b takes over, m1; kill b, restart b alone: b was active
    // alone, so it serves (epoch 3), m2; kill b, restart a alone: a was active
    // with an in-sync peer, which may have taken over: a waits and says why;
    // b returns: nothing confirmed is missing.
    let mut pair = Pair::start(PairOptions::default()).await;
    pair.wait_a_active_b_in_sync().await;
    let mut confirmed = send_to(&pair.a, "sched1", "m0", 100).await;
    pair.a.kill9();
    pair.b.wait_for("active", WAIT, is_active).await;
    confirmed.extend(send_to(&pair.b, "sched1", "m1", 100).await);
    pair.b.kill9();
    pair.b.start();
    let b = pair.b.wait_for("active alone", WAIT, is_active).await;
    assert_eq!(b["epoch"].as_u64(), Some(3), "{b}");
    confirmed.extend(send_to(&pair.b, "sched1", "m2", 100).await);
    pair.b.kill9();
    pair.a.start();
    let a = stays_waiting(&pair.a, Duration::from_secs(3)).await;
    let reason = a["last_role_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("waiting for the peer") && reason.contains("promote --force"), "{a}");
    // What forcing it would risk, as `twinmq promote --force` says before
    // --yes: b's store as a last heard of it (before a was killed), and that
    // whatever b confirmed after that would be missing.
    let risks = AdminClient::promote_risks(&pair.client_config()).await;
    let risk = risks.iter().find(|r| r.node_id == "node-a").expect("a would be promoted");
    assert!(risk.peer.is_some_and(|(epoch, last)| epoch == 1 && last > 0), "{risk:?}");
    assert!(risk.describe().contains("whatever it confirmed after that"), "{}", risk.describe());
    pair.b.start();
    pair.b.wait_for("active", WAIT, is_active).await;
    pair.a.wait_for("passive and in sync", WAIT, |s| s["role"] == "passive" && s["in_sync"] == true).await;
    let received = consume_all(&pair, "sched1").await;
    assert_no_loss(&confirmed, &received, "schedule 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_9_schedule_2_a_stale_passive_never_promotes() {
    // b frozen 3 s: a declares it down and confirms s1 alone; kill a, thaw b:
    // b must not serve (its in-sync expired while it stood still); a returns:
    // s0 and s1 are both delivered.
    let mut pair = Pair::start(PairOptions::default()).await;
    pair.wait_a_active_b_in_sync().await;
    let mut confirmed = send_to(&pair.a, "sched2", "s0", 100).await;
    pair.b.freeze();
    pair.a.wait_for("active alone", WAIT, |s| s["role"] == "active-alone").await;
    confirmed.extend(send_to(&pair.a, "sched2", "s1", 100).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pair.a.kill9();
    pair.b.thaw();
    stays_waiting(&pair.b, Duration::from_secs(3)).await;
    pair.a.start();
    pair.a.wait_for("active", WAIT, is_active).await;
    pair.b.wait_for("passive and in sync", WAIT, |s| s["role"] == "passive" && s["in_sync"] == true).await;
    let received = consume_all(&pair, "sched2").await;
    assert_no_loss(&confirmed, &received, "schedule 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_new_active_serves_at_once_and_clients_do_not_spin() {
    // Issue 9: right after the promotion the new active refused publishes
    // for ~5 ms ("this node is not active") and the client reconnected ten
    // times in that window, without backoff.
    let mut pair = Pair::start(PairOptions::default()).await;
    pair.wait_a_active_b_in_sync().await;
    let client = Client::connect(pair.client_config()).await.unwrap();
    let mut events = client.events();
    let load = Load::start(client, "spin", "s");
    tokio::time::sleep(Duration::from_millis(500)).await;
    pair.a.kill9();
    pair.b.wait_for("active", WAIT, is_active).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let confirmed = load.finish().await;
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e.to_string());
    }
    let connected = seen.iter().filter(|e| e.starts_with("connected")).count();
    let disconnected: Vec<&String> = seen.iter().filter(|e| e.starts_with("disconnected")).collect();
    assert_eq!(connected, 1, "one failover, one new connection: {seen:#?}");
    assert_eq!(disconnected.len(), 1, "{seen:#?}");
    assert!(!pair.b.log().contains("this node is not active"), "{}", pair.b.log());
    let received = consume_all(&pair, "spin").await;
    assert_no_loss(&confirmed, &received, "failover without spinning");
}

/// Flip a byte of one of our records in a stopped node's store, through sled
/// (sled's own log stays valid: only the record's checksum can tell).
fn corrupt_a_record(data_dir: &std::path::Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let db = loop {
        match sled::Config::new().path(data_dir).segment_size(twinmq_store::store::SEGMENT_BYTES).open() {
            Ok(db) => break db,
            Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("cannot open {}: {e}", data_dir.display()),
        }
    };
    let log = db.open_tree("log").unwrap();
    let (key, value) = log.iter().last().expect("a record").unwrap();
    let mut raw = value.to_vec();
    let n = raw.len() - 1;
    raw[n] ^= 0x5a;
    log.insert(key, raw).unwrap();
    db.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passive_whose_store_fails_its_checks_sets_it_aside_and_resyncs() {
    let mut pair = Pair::start(PairOptions::default()).await;
    pair.wait_a_active_b_in_sync().await;
    let mut confirmed = send_to(&pair.a, "corrupt", "c", 200).await;
    pair.b.kill9();
    corrupt_a_record(&pair.b.data_dir);
    pair.b.start();
    pair.b.wait_for("passive and in sync", WAIT, |s| s["role"] == "passive" && s["in_sync"] == true).await;
    assert!(pair.b.log().contains("keeping it aside and resyncing from the peer"), "{}", pair.b.log());
    let aside = std::fs::read_dir(pair.b.data_dir.parent().unwrap())
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("b.corrupt-"));
    assert!(aside, "the bad copy is kept for inspection");
    confirmed.extend(send_to(&pair.a, "corrupt", "d", 50).await);
    pair.a.kill9();
    pair.b.wait_for("active", WAIT, is_active).await;
    let received = consume_all(&pair, "corrupt").await;
    assert_no_loss(&confirmed, &received, "a corrupt passive resynced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_require_replica_a_publish_refused_after_it_was_written_is_still_delivered() {
    // require_replica: b is frozen, a holds the publishes it wrote for b's
    // ack; b is declared down and a refuses them. They are in a's store all
    // the same (the refusal says "written here, never confirmed"), so a's
    // queue has them too: a consumer gets them, and nothing is in the store
    // that the queue does not show.
    let opts = PairOptions { extra: vec!["--require-replica".into(), "true".into()], ..Default::default() };
    let pair = Pair::start(opts).await;
    pair.wait_a_active_b_in_sync().await;
    let client = Client::connect(pair.client_config()).await.unwrap();
    let producer = client.producer(Destination::queue("held"));
    producer.send(Message::persistent("before")).await.unwrap();
    pair.b.freeze();
    let mut refused = Vec::new();
    let mut pending = Vec::new();
    for i in 0..5 {
        let body = format!("held-{i}");
        pending.push((body.clone(), producer.send_nowait(Message::persistent(body)).await.unwrap()));
    }
    for (body, confirm) in pending {
        match tokio::time::timeout(WAIT, confirm).await.expect("answered once b is declared down") {
            Ok(_) => panic!("{body} was confirmed without the replica require_replica asks for"),
            Err(e) => refused.push((body, e.to_string())),
        }
    }
    assert!(refused.iter().all(|(_, e)| e.contains("written here, never confirmed")), "{refused:?}");
    pair.b.thaw();
    let got = consume_all(&pair, "held").await;
    for (body, _) in &refused {
        assert!(got.contains(body), "{body}: written on a, refused, and not in a's queue: {got:?}");
    }
}
