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
