//! The STOMP 1.2 port with a real third-party client: stomp.py (PyPI),
//! driven through broker/tests/stomp/stomp_check.py, against real `twinmqd`
//! processes. `./test.sh` installs stomp.py into target/stomp-venv; without
//! it these tests say SKIPPED (and fail when TWINMQ_REQUIRE_STOMP=1, as
//! .ci/run sets it).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::pair::{Pair, PairOptions};
use common::tls::Ca;
use common::Broker;
use twinmq_client::{Client, Destination, Message, SubscribeOptions};

const WAIT: Duration = Duration::from_secs(20);

/// The venv's python with stomp.py, or None (and a loud SKIPPED) when absent.
fn python() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/stomp-venv/bin/python");
    let python = std::env::var_os("TWINMQ_STOMP_PYTHON").map(PathBuf::from).unwrap_or(venv);
    let ok = Command::new(&python)
        .args(["-c", "import stomp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(python);
    }
    if std::env::var("TWINMQ_REQUIRE_STOMP").as_deref() == Ok("1") {
        panic!("TWINMQ_REQUIRE_STOMP=1 and no stomp.py at {} (./test.sh installs it)", python.display());
    }
    eprintln!(
        "\n*** SKIPPED: STOMP tests need stomp.py ({} -c 'import stomp' failed; ./test.sh installs it)\n",
        python.display()
    );
    None
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/stomp/stomp_check.py")
}

/// Run one scenario to its end; its last stdout line, as JSON.
fn run(python: &PathBuf, args: &[&str]) -> serde_json::Value {
    let out = Command::new(python).arg(script()).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stomp_check.py {args:?} failed ({}):\n{stdout}\n{stderr}", out.status);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {last}\n{stderr}"))
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

/// A configuration file with a user of every right and one that may only
/// produce and consume `stomp.#`.
fn users_config(dir: &std::path::Path, extra: &str) -> PathBuf {
    let path = dir.join("users.toml");
    let text = format!(
        r#"
{extra}
[[users]]
name = "root"
password = "rootpw"

[[users]]
name = "app"
password = "apppw"
grants = ["produce:stomp.#", "consume:stomp.#"]
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stomp_py_sends_with_receipts_acks_individually_and_a_nack_comes_back() {
    let Some(py) = python() else { return };
    let broker = Broker::start_with_stomp(&[]);
    let hosts = broker.stomp.unwrap().to_string();
    let r = run(&py, &["basic", "--hosts", &hosts, "--count", "50"]);
    assert_eq!(r["distinct"], 50, "{r}");
    assert_eq!(r["nacked_deliveries"], 2, "the NACKed message came back once: {r}");
    assert_eq!(r["deliveries"], 51, "{r}");
    assert_eq!(r["headers_ok"], true, "every MESSAGE carries its SEND's x-order header: {r}");
    assert_eq!(r["errors"], serde_json::json!([]));
    // Every message was acked: nothing is left, on STOMP or native.
    let left = run(&py, &["after", "--hosts", &hosts, "--destination", "/queue/stomp.basic"]);
    assert_eq!(left["left"], serde_json::json!([]), "{left}");
    let status = broker.client().await.status().await.unwrap();
    let depth = status.queues.iter().find(|q| q.name == "queue:stomp.basic").map(|q| q.depth);
    assert_eq!(depth, Some(0), "{}", status.json());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_topic_subscription_keeps_messages_by_either_header() {
    let Some(py) = python() else { return };
    let broker = Broker::start_with_stomp(&[]);
    let hosts = broker.stomp.unwrap().to_string();
    for header in ["durable-subscription-name", "activemq.subscriptionName"] {
        let r = run(&py, &["durable", "--hosts", &hosts, "--count", "10", "--durable-header", header]);
        let kept = strings(&r["kept"]);
        assert_eq!(kept, (0..10).map(|i| format!("p-{i}")).collect::<Vec<_>>(), "{header}: {r}");
        assert_eq!(r["after_cumulative_ack"], serde_json::json!([]), "{header}: one client-mode ACK settled all: {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_error_frames_acl_password_and_destination() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = users_config(dir.path(), "");
    let broker = Broker::start_with_stomp(&["--config", config.to_str().unwrap()]);
    let hosts = broker.stomp.unwrap().to_string();
    let r = run(&py, &["refusals", "--hosts", &hosts, "--user", "app", "--password", "apppw"]);
    let denied = &r["denied"];
    assert_eq!(denied["receipt-id"], "r-denied", "the refusal names the SEND's receipt: {r}");
    assert!(denied["message"].as_str().unwrap().contains("secret.q"), "{r}");
    assert_eq!(denied["code"], "NotAuthorized", "{r}");
    assert_eq!(r["denied_got_receipt"], false, "a refused SEND gets no RECEIPT: {r}");
    assert!(r["wrong_password"]["message"].as_str().is_some(), "a wrong password is an ERROR: {r}");
    assert!(r["bad_destination"]["message"].as_str().unwrap().contains("/queue/NAME"), "{r}");
    // Nothing of the refused SEND was stored.
    let root = broker.config().user("root").password("rootpw");
    let status = Client::connect(root).await.unwrap().status().await.unwrap();
    assert!(status.queues.iter().all(|q| q.name != "queue:secret.q" || q.depth == 0), "{}", status.json());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stomp_over_tls_with_the_client_ports_certificate() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server = ca.issue(dir.path(), "server", &["127.0.0.1"]);
    let flags = server.flags("");
    let broker = Broker::start_with_stomp(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    let hosts = broker.stomp.unwrap().to_string();
    let ca_path = ca.pem.to_str().unwrap();
    let r = run(&py, &["basic", "--hosts", &hosts, "--count", "20", "--ca", ca_path]);
    assert_eq!(r["distinct"], 20, "{r}");
    // Plaintext STOMP to the TLS port gets nowhere.
    let plain = Command::new(&py).arg(script()).args(["send", "--hosts", &hosts, "--count", "1"]).output().unwrap();
    assert!(!plain.status.success(), "a plaintext STOMP client was served on a TLS port");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stomp_and_native_clients_exchange_messages_with_headers_and_bodies_intact() {
    let Some(py) = python() else { return };
    let broker = Broker::start_with_stomp(&[]);
    let hosts = broker.stomp.unwrap().to_string();
    let client = broker.client().await;

    // STOMP -> native: a binary body of every byte value, headers as sent.
    let headers = r#"{"x-trace": "a:b\\c", "content-type": "application/octet-stream"}"#;
    run(
        &py,
        &[
            "send",
            "--hosts",
            &hosts,
            "--destination",
            "/queue/stomp.in",
            "--binary",
            "--count",
            "1",
            "--headers",
            headers,
        ],
    );
    let mut consumer = client.subscribe(Destination::queue("stomp.in"), SubscribeOptions::default()).await.unwrap();
    let got = tokio::time::timeout(WAIT, consumer.recv()).await.unwrap().unwrap().unwrap();
    let body: Vec<u8> = (0..=255u8).cycle().take(1024).collect();
    assert_eq!(got.payload(), &body[..], "the body arrived byte for byte");
    assert_eq!(got.message().headers.get("x-trace").map(String::as_str), Some("a:b\\c"), "{:?}", got.message().headers);
    assert_eq!(got.message().headers.get("content-type").map(String::as_str), Some("application/octet-stream"));
    assert!(!got.message().headers.contains_key("receipt"), "the SEND's own headers are not the message's");
    got.ack_stored().await.unwrap();

    // Native -> STOMP.
    let producer = client.producer(Destination::queue("stomp.out"));
    let message =
        Message::persistent(b"native \x00 body".to_vec()).header("x-order", "7").header("x-colon", "k:v\nline");
    producer.send(message).await.unwrap();
    let r = run(&py, &["receive", "--hosts", &hosts, "--destination", "/queue/stomp.out", "--count", "1"]);
    let m = &r["messages"][0];
    assert_eq!(m["headers"]["x-order"], "7", "{r}");
    assert_eq!(m["headers"]["x-colon"], "k:v\nline", "escaped on the wire, intact at the client: {r}");
    assert_eq!(m["headers"]["destination"], "/queue/stomp.out");
    let body = m["body"].as_str().unwrap();
    assert_eq!(body, "bmF0aXZlIAAgYm9keQ==", "base64 of `native \\0 body`: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_refuses_stomp_on_the_passive_and_loses_no_receipted_message_across_a_kill() {
    let Some(py) = python() else { return };
    let mut pair = Pair::start(PairOptions { stomp: true, ..Default::default() }).await;
    pair.wait_a_active_b_in_sync().await;
    let (a, b) = (pair.a.stomp.unwrap(), pair.b.stomp.unwrap());
    // The passive's ERROR names the active's STOMP address (learned over the HA link).
    let hosts_b_first = format!("{b},{a}");
    let out_dir = tempfile::tempdir().unwrap();
    let receipted = out_dir.path().join("receipted");
    let producer = Command::new(&py)
        .arg(script())
        .args(["failover-produce", "--hosts", &hosts_b_first, "--count", "600", "--out"])
        .arg(&receipted)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the active once a third is receipted.
    let lines = |p: &PathBuf| std::fs::read_to_string(p).unwrap_or_default().lines().count();
    let deadline = std::time::Instant::now() + WAIT;
    while lines(&receipted) < 200 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(lines(&receipted) >= 200, "the producer got {} receipts in {WAIT:?}", lines(&receipted));
    pair.a.kill9();
    pair.b.wait_role("active-alone", WAIT).await;
    let out = tokio::task::spawn_blocking(move || producer.wait_with_output()).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "producer failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(r["receipted"], 600, "{r}");
    assert!(r["reconnects"].as_u64().unwrap() >= 1, "it rode a failover: {r}");
    let passive = strings(&r["passive_errors"]);
    assert!(
        passive.iter().any(|m| m.contains("passive") && m.contains(&a.port().to_string())),
        "the passive's ERROR named the active's STOMP port {a}: {passive:?}"
    );
    // Every receipted message is on the new active (duplicates allowed).
    let r = run(&py, &["failover-consume", "--hosts", &format!("{a},{b}"), "--expect", receipted.to_str().unwrap()]);
    assert_eq!(r["missing"], serde_json::json!([]), "receipted and lost: {r}");
    assert_eq!(r["expected"], 600, "{r}");
    let distinct: HashSet<String> = std::fs::read_to_string(&receipted).unwrap().lines().map(str::to_string).collect();
    assert_eq!(distinct.len(), 600);
}

/// STOMP spoken by hand (the protocol crate's codec), for what a client
/// library would not send or would hide: findings of the review of the
/// listener, each a test written before its fix.
mod raw {
    use std::net::SocketAddr;
    use std::time::Duration;

    use futures_util::{SinkExt, StreamExt};
    use tokio::net::TcpStream;
    use tokio_util::codec::Framed;
    use twinmq_protocol::stomp::{Command, StompCodec, StompFrame, StompItem, StompLimits};

    pub struct Raw(pub Framed<TcpStream, StompCodec>);

    impl Raw {
        pub async fn tcp(addr: SocketAddr) -> Raw {
            Raw(Framed::new(TcpStream::connect(addr).await.unwrap(), StompCodec::new(StompLimits::default())))
        }

        /// CONNECT at `version` with `headers` on top; panics unless CONNECTED.
        pub async fn connect(addr: SocketAddr, version: &str, headers: &[(&str, &str)]) -> Raw {
            let mut raw = Raw::tcp(addr).await;
            let mut f = StompFrame::new(Command::Connect).header("accept-version", version).header("host", "t");
            for (k, v) in headers {
                f = f.header(k, *v);
            }
            raw.send(f).await;
            let got = raw.next(Duration::from_secs(10)).await.expect("an answer to CONNECT");
            assert_eq!(got.command, Command::Connected, "{got:?}");
            raw
        }

        pub async fn send(&mut self, f: StompFrame) {
            self.0.send(StompItem::Frame(f)).await.unwrap();
        }

        /// The next frame (heart-beats skipped); None on timeout or close.
        pub async fn next(&mut self, timeout: Duration) -> Option<StompFrame> {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match tokio::time::timeout_at(deadline, self.0.next()).await {
                    Ok(Some(Ok(StompItem::Frame(f)))) => return Some(f),
                    Ok(Some(Ok(StompItem::Heartbeat))) => continue,
                    _ => return None,
                }
            }
        }

        /// Frames until one of `command` arrives (returned with those before it).
        pub async fn until(&mut self, command: Command) -> (Vec<StompFrame>, StompFrame) {
            let mut before = Vec::new();
            loop {
                let f =
                    self.next(Duration::from_secs(10)).await.unwrap_or_else(|| panic!("no {command:?}: {before:?}"));
                if f.command == command {
                    return (before, f);
                }
                before.push(f);
            }
        }

        pub async fn send_with_receipt(&mut self, destination: &str, body: &str, receipt: &str) {
            let f = StompFrame::new(Command::Send)
                .header("destination", destination)
                .header("receipt", receipt)
                .body(body.as_bytes().to_vec());
            self.send(f).await;
            let (_, r) = self.until(Command::Receipt).await;
            assert_eq!(r.get("receipt-id"), Some(receipt));
        }
    }

    pub fn subscribe(id: &str, destination: &str, ack: &str) -> StompFrame {
        StompFrame::new(Command::Subscribe).header("id", id).header("destination", destination).header("ack", ack)
    }
}

use futures_util::SinkExt;
use raw::{subscribe, Raw};
use twinmq_protocol::stomp::{Command as Stomp, StompFrame, StompItem};

async fn depth(broker: &Broker, queue: &str) -> Option<u64> {
    let status = broker.client().await.status().await.unwrap();
    status.queues.iter().find(|q| q.name == format!("queue:{queue}")).map(|q| q.depth)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_mode_ack_settles_what_was_sent_before_it_not_a_later_redelivery() {
    let broker = Broker::start_with_stomp(&[]);
    let addr = broker.stomp.unwrap();
    let mut c = Raw::connect(addr, "1.2", &[]).await;
    for (i, m) in ["m1", "m2", "m3"].iter().enumerate() {
        c.send_with_receipt("/queue/stomp.cum", m, &format!("s{i}")).await;
    }
    c.send(subscribe("s", "/queue/stomp.cum", "client")).await;
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(c.until(Stomp::Message).await.1);
    }
    // m1 back: redelivered after m3.
    c.send(StompFrame::new(Stomp::Nack).header("id", got[0].get("ack").unwrap())).await;
    let (_, again) = c.until(Stomp::Message).await;
    assert_eq!(&again.body[..], b"m1");
    // ACK of m3 covers m2 and m3, sent before it, not m1's redelivery, sent after.
    c.send(StompFrame::new(Stomp::Ack).header("id", got[2].get("ack").unwrap()).header("receipt", "a3")).await;
    c.until(Stomp::Receipt).await;
    drop(c);
    let deadline = std::time::Instant::now() + WAIT;
    while depth(&broker, "stomp.cum").await != Some(1) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(depth(&broker, "stomp.cum").await, Some(1), "m1's redelivery was acked by an ACK of m3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_mode_nack_gives_back_everything_sent_up_to_it() {
    // STOMP 1.2: a NACK "applies ... to all messages sent before and not yet
    // ACK'ed or NACK'ed (if the subscription's ack mode is client)".
    let broker = Broker::start_with_stomp(&[]);
    let addr = broker.stomp.unwrap();
    let mut c = Raw::connect(addr, "1.2", &[]).await;
    for (i, m) in ["m1", "m2", "m3", "m4"].iter().enumerate() {
        c.send_with_receipt("/queue/stomp.cumnack", m, &format!("s{i}")).await;
    }
    c.send(subscribe("s", "/queue/stomp.cumnack", "client").header("activemq.prefetchSize", "4")).await;
    let mut got = Vec::new();
    while got.len() < 4 {
        got.push(c.until(Stomp::Message).await.1);
    }
    // m1 acked on its own first: the NACK of m3 gives back m2 and m3, not m1 nor m4.
    c.send(StompFrame::new(Stomp::Ack).header("id", got[0].get("ack").unwrap())).await;
    c.send(StompFrame::new(Stomp::Nack).header("id", got[2].get("ack").unwrap())).await;
    let mut again = Vec::new();
    let mut last = None;
    while again.len() < 2 {
        let m = c.until(Stomp::Message).await.1;
        assert_eq!(m.get("redelivered"), Some("true"), "{m:?}");
        again.push(String::from_utf8(m.body.to_vec()).unwrap());
        last = Some(m);
    }
    again.sort();
    assert_eq!(again, ["m2", "m3"], "a client-mode NACK of m3 gives back m2 and m3");
    // The ACK of the last redelivery covers everything sent before it (m4 too).
    let ack = last.unwrap().get("ack").unwrap().to_string();
    c.send(StompFrame::new(Stomp::Ack).header("id", ack).header("receipt", "a")).await;
    let (before, _) = c.until(Stomp::Receipt).await;
    assert!(before.iter().all(|f| f.command != Stomp::Message), "m1 or m4 came back: {before:?}");
    drop(c);
    let deadline = std::time::Instant::now() + WAIT;
    while depth(&broker, "stomp.cumnack").await != Some(0) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(depth(&broker, "stomp.cumnack").await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stomp_1_1_acks_by_message_id_and_subscription_and_gets_no_cr_escape() {
    let broker = Broker::start_with_stomp(&[]);
    let client = broker.client().await;
    let m = Message::persistent("eleven").header("note", "a\rb");
    client.producer(Destination::queue("stomp.v11")).send(m).await.unwrap();
    let mut c = Raw::connect(broker.stomp.unwrap(), "1.1", &[]).await;
    c.send(subscribe("s11", "/queue/stomp.v11", "client-individual")).await;
    let (_, m) = c.until(Stomp::Message).await;
    // 1.1 defines no \r escape: a CR cannot travel in a 1.1 header.
    assert_eq!(m.get("note"), Some("a b"), "{m:?}");
    let ack = StompFrame::new(Stomp::Ack)
        .header("message-id", m.get("message-id").unwrap())
        .header("subscription", "s11")
        .header("receipt", "r11");
    c.send(ack).await;
    let got = c.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!((got.command, got.get("receipt-id")), (Stomp::Receipt, Some("r11")), "{got:?}");
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(depth(&broker, "stomp.v11").await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heart_beats_before_connect_do_not_hold_a_pending_slot() {
    let broker = Broker::start_with_stomp(&[]);
    let mut c = Raw::tcp(broker.stomp.unwrap()).await;
    // Heart-beats every second for seven: past the 5 s a client has to CONNECT.
    for _ in 0..7 {
        if c.0.send(StompItem::Heartbeat).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = c.0.send(StompItem::Frame(StompFrame::new(Stomp::Connect).header("accept-version", "1.2"))).await;
    let got = c.next(Duration::from_secs(3)).await;
    assert!(got.as_ref().is_none_or(|f| f.command == Stomp::Error), "served after 7 s without CONNECT: {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stomp_connection_without_heart_beats_meets_idle_timeout() {
    let broker = Broker::start_with_stomp(&["--idle-timeout-ms", "1000"]);
    let mut c = Raw::connect(broker.stomp.unwrap(), "1.2", &[]).await;
    let got = c.next(Duration::from_secs(5)).await;
    let got = got.expect("an ERROR after idle_timeout_ms of silence");
    assert_eq!(got.command, Stomp::Error, "{got:?}");
    assert!(got.get("message").unwrap().contains("idle_timeout_ms"), "{got:?}");
    assert!(c.next(Duration::from_secs(2)).await.is_none(), "closed after the ERROR");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactions_sends_are_checked_when_sent_and_its_bytes_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let config = users_config(dir.path(), "max_message_bytes = 65536");
    let broker = Broker::start_with_stomp(&["--config", config.to_str().unwrap()]);
    let login = [("login", "app"), ("passcode", "apppw")];
    let addr = broker.stomp.unwrap();

    // A SEND the ACL refuses is refused when sent (with its receipt), not at COMMIT.
    let mut c = Raw::connect(addr, "1.2", &login).await;
    c.send(StompFrame::new(Stomp::Begin).header("transaction", "t1")).await;
    let ok = StompFrame::new(Stomp::Send).header("destination", "/queue/stomp.tx").header("transaction", "t1");
    c.send(ok.clone().header("receipt", "ok").body(&b"fine"[..])).await;
    let secret = StompFrame::new(Stomp::Send).header("destination", "/queue/secret.tx").header("transaction", "t1");
    c.send(secret.header("receipt", "denied").body(&b"no"[..])).await;
    let (_, err) = c.until(Stomp::Error).await;
    assert_eq!(err.get("receipt-id"), Some("denied"), "{err:?}");
    c.send(StompFrame::new(Stomp::Commit).header("transaction", "t1")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let root = broker.config().user("root").password("rootpw");
    let status = Client::connect(root).await.unwrap().status().await.unwrap();
    let held = status.queues.iter().find(|q| q.name == "queue:stomp.tx").map_or(0, |q| q.depth);
    assert_eq!(held, 0, "a transaction with a refused SEND stored some of it");

    // A SEND over max_message_bytes is refused when sent.
    let mut c = Raw::connect(addr, "1.2", &login).await;
    c.send(StompFrame::new(Stomp::Begin).header("transaction", "t2")).await;
    c.send(ok.clone().header("transaction", "t2").header("receipt", "big").body(vec![b'x'; 70_000])).await;
    let (_, err) = c.until(Stomp::Error).await;
    assert_eq!(err.get("receipt-id"), Some("big"), "{err:?}");

    // What a connection's transactions hold is bounded in bytes.
    let mut c = Raw::connect(addr, "1.2", &login).await;
    c.send(StompFrame::new(Stomp::Begin).header("transaction", "t3")).await;
    let mut refused = None;
    for i in 0..400 {
        let f = ok.clone().header("transaction", "t3").header("receipt", format!("h{i}")).body(vec![b'x'; 60_000]);
        c.send(f).await;
        let got = c.next(Duration::from_secs(10)).await.expect("an answer");
        if got.command == Stomp::Error {
            refused = Some(i);
            break;
        }
    }
    let refused = refused.expect("400 x 60 KB held in one transaction (24 MB)");
    assert!(refused * 60_000 <= 17 << 20, "refused only after {refused} SENDs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_does_not_overtake_the_receipts_of_frames_before_it() {
    let broker = Broker::start_with_stomp(&[]);
    let mut c = Raw::connect(broker.stomp.unwrap(), "1.2", &[]).await;
    // One write: a SEND with a receipt, then a NACK without its id.
    let send = StompFrame::new(Stomp::Send).header("destination", "/queue/stomp.order").header("receipt", "r1");
    c.0.feed(StompItem::Frame(send.body(&b"m1"[..]))).await.unwrap();
    c.0.feed(StompItem::Frame(StompFrame::new(Stomp::Nack).header("receipt", "bad"))).await.unwrap();
    futures_util::SinkExt::<twinmq_protocol::stomp::StompItem>::flush(&mut c.0).await.unwrap();
    let (before, err) = c.until(Stomp::Error).await;
    assert_eq!(err.get("receipt-id"), Some("bad"));
    assert!(
        before.iter().any(|f| f.command == Stomp::Receipt && f.get("receipt-id") == Some("r1")),
        "the stored SEND's RECEIPT never came: {before:?}"
    );
}
