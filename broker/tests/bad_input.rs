//! Bad input gets a clear error and loses nothing: malformed frames, wrong
//! passwords, bad configuration.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

mod common;

use common::{frame, hello};

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::Broker;
use twinmq_client::{Client, ClientError, Destination, ErrorCode, Message, SubscribeOptions};
use twinmq_protocol::{ClientFrame, ErrorContext, OutMessage, ServerFrame, PROTOCOL_VERSION};

fn publish(body: &str) -> ClientFrame {
    ClientFrame::Publish {
        producer_id: 1,
        seq: 1,
        destination: twinmq_protocol::Destination::queue("victim"),
        message: OutMessage { payload: body.as_bytes().to_vec(), persistent: true, ..Default::default() },
    }
}

/// Read every frame the broker sends until it closes the connection.
fn read_until_closed(s: &mut TcpStream) -> Vec<ServerFrame> {
    common::read_frames(s, Duration::from_secs(5))
}

fn connection_error(frames: &[ServerFrame]) -> twinmq_protocol::ErrorCode {
    match frames.last() {
        Some(ServerFrame::Error(e)) if e.context == ErrorContext::Connection => e.code,
        other => panic!("expected a connection error frame last, got {other:?}"),
    }
}

async fn assert_nothing_stored_and_still_serving(broker: &Broker) {
    let client = broker.client().await;
    client.producer(Destination::queue("healthy")).send(Message::persistent("ok")).await.expect("still serving");
    let mut c = client.subscribe(Destination::queue("victim"), SubscribeOptions::default()).await.unwrap();
    let got = tokio::time::timeout(Duration::from_millis(500), c.recv()).await;
    assert!(got.is_err(), "nothing from a bad connection was stored: {got:?}");
}

#[tokio::test]
async fn garbage_truncated_oversized_and_future_frames_close_only_their_connection() {
    let broker = Broker::start(&["--max-frame-bytes", "65536", "--max-message-bytes", "32768"]);

    // Garbage: an HTTP request. "GET " read as a length is far above the limit.
    let mut s = TcpStream::connect(broker.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(connection_error(&read_until_closed(&mut s)), twinmq_protocol::ErrorCode::TooLarge);

    // Garbage after a valid Hello: a frame whose body is not MessagePack.
    let mut s = TcpStream::connect(broker.addr).unwrap();
    s.write_all(&hello()).unwrap();
    s.write_all(&[0, 0, 0, 5, PROTOCOL_VERSION, 0xc1, 0xc1, 0xc1, 0xc1]).unwrap();
    let frames = read_until_closed(&mut s);
    assert!(matches!(frames.first(), Some(ServerFrame::Welcome { .. })));
    assert_eq!(connection_error(&frames), twinmq_protocol::ErrorCode::Malformed);

    // Truncated: a publish cut short, then the client hangs up.
    let mut s = TcpStream::connect(broker.addr).unwrap();
    s.write_all(&hello()).unwrap();
    let p = frame(&publish("truncated"));
    s.write_all(&p[..p.len() / 2]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let frames = read_until_closed(&mut s);
    assert!(!frames.iter().any(|f| matches!(f, ServerFrame::Confirm { .. })), "no confirm for a truncated frame");

    // Oversized: a length prefix above max_frame_bytes, body never sent.
    let mut s = TcpStream::connect(broker.addr).unwrap();
    s.write_all(&hello()).unwrap();
    s.write_all(&(1u32 << 20).to_be_bytes()).unwrap();
    assert_eq!(connection_error(&read_until_closed(&mut s)), twinmq_protocol::ErrorCode::TooLarge);

    // A frame of a future protocol version.
    let mut s = TcpStream::connect(broker.addr).unwrap();
    s.write_all(&hello()).unwrap();
    let mut p = frame(&publish("from the future"));
    p[4] = PROTOCOL_VERSION + 1;
    s.write_all(&p).unwrap();
    assert_eq!(connection_error(&read_until_closed(&mut s)), twinmq_protocol::ErrorCode::UnsupportedVersion);

    // Anything but Hello first (framed at the handshake's version, as a Hello would be).
    let mut s = TcpStream::connect(broker.addr).unwrap();
    let mut p = frame(&publish("no hello"));
    p[4] = twinmq_protocol::HANDSHAKE_VERSION;
    s.write_all(&p).unwrap();
    assert_eq!(connection_error(&read_until_closed(&mut s)), twinmq_protocol::ErrorCode::ProtocolViolation);

    // A message above max_message_bytes is refused for that publish only.
    let client = broker.client().await;
    let err =
        client.producer(Destination::queue("victim")).send(Message::persistent(vec![b'x'; 40_000])).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TooLarge), "{err}");

    assert_nothing_stored_and_still_serving(&broker).await;
}

#[tokio::test]
async fn wrong_password_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("twinmq.toml");
    std::fs::write(&cfg, "[[users]]\nname = \"app\"\npassword = \"right horse\"\n").unwrap();
    let broker = Broker::start(&["--config", cfg.to_str().unwrap()]);
    let base = broker.config();

    let err = Client::connect(base.clone().user("app").password("wrong")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotAuthenticated), "{err}");
    assert!(err.to_string().contains("wrong password"), "message says why: {err}");
    let err = Client::connect(base.clone()).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotAuthenticated), "no credentials: {err}");
    assert!(matches!(err, ClientError::Broker { .. }));

    let ok = Client::connect(base.user("app").password("right horse")).await.expect("right password");
    ok.producer(Destination::queue("q")).send(Message::persistent("in")).await.unwrap();
}

fn run_twinmqd(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(common::TWINMQD).args(args).output().expect("run twinmqd");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_config_names_the_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("max_connections = 0\n", "max_connections"),
        ("durability = \"sometimes\"\n", "durability"),
        ("listen = \"not an address\"\n", "listen"),
        ("colour = \"blue\"\n", "colour"),
        ("max_redeliveries = \"five\"\n", "max_redeliveries"),
        ("queue_full = \"drop\"\n", "queue_full"),
        ("idle_timeout_ms = 50\n", "idle_timeout_ms"),
        ("max_consumers_per_destination = 0\n", "max_consumers_per_destination"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let (code, stderr) =
            run_twinmqd(&["--config", path.to_str().unwrap(), "--data-dir", dir.path().to_str().unwrap()]);
        assert_eq!(code, 2, "{text}: exit code; stderr: {stderr}");
        assert!(stderr.contains(key), "{text}: stderr names `{key}`: {stderr}");
    }
    let (code, stderr) = run_twinmqd(&["--listen", "nowhere"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("listen"), "{stderr}");
    let (code, stderr) = run_twinmqd(&["--config", "/nonexistent/twinmq.toml"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/twinmq.toml"), "{stderr}");
}

#[test]
fn the_environment_layer_is_checked_like_the_file() {
    let run = |vars: &[(&str, &str)], args: &[&str]| {
        let out = std::process::Command::new(common::TWINMQD).envs(vars.iter().copied()).args(args).output().unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, stderr) = run(&[("TWINMQ_MAX_QUEUE_DEPTH", "0")], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("invalid value for `max_queue_depth`"), "{stderr}");
    let (code, stderr) = run(&[("TWINMQ_MAX_QUEUE_DEPTH", "many")], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("TWINMQ_MAX_QUEUE_DEPTH"), "{stderr}");
    // A flag wins over the environment: the bad value is never looked at.
    let (code, stderr) = run(&[("TWINMQ_LISTEN", "nowhere")], &["--listen", "127.0.0.1:1", "--max-connections", "0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("`max_connections`") && !stderr.contains("`listen`"), "{stderr}");
    // The `twinmq` tool's variables share the prefix: ignored, not refused.
    let (code, stderr) =
        run(&[("TWINMQ_SERVERS", "127.0.0.1:1"), ("TWINMQ_PASSWORD", "x")], &["--max-connections", "0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("`max_connections`") && !stderr.contains("servers"), "{stderr}");
}
