//! Which sockets `twinmqd` serves on: the ones passed by socket activation
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`) where there are some, the configured
//! addresses otherwise; and the harness's promise that a killed broker's
//! port refuses connections (it keeps no copy of the socket).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{loopback_listener, spawn_activated, wait_ready, Broker, TWINMQD};
use twinmq_client::{Destination, Message};

#[tokio::test]
async fn a_killed_brokers_port_refuses_until_it_is_started_again_on_it() {
    let mut broker = Broker::start(&["--durability", "local"]);
    let addr = broker.addr;
    let q = Destination::queue("q");
    let client = broker.client().await;
    client.producer(q.clone()).send(Message::persistent("before")).await.unwrap();
    client.close().await.unwrap();

    broker.kill9();
    let err = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).expect_err("nobody listens on a dead port");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    broker.restart();
    assert_eq!(broker.addr, addr, "the same port again");
    let client = broker.client().await;
    client.producer(q).send(Message::persistent("after")).await.unwrap();
    client.close().await.unwrap();
}

#[test]
fn a_passed_socket_is_served_instead_of_the_configured_address() {
    let dir = tempfile::tempdir().unwrap();
    // The configured address is taken: binding it would fail.
    let taken = loopback_listener();
    let passed = loopback_listener();
    let addr = passed.local_addr().unwrap();
    let mut cmd = Command::new(TWINMQD);
    cmd.args(["--durability", "none", "--data-dir", &dir.path().join("d").display().to_string()])
        .args(["--listen", &taken.local_addr().unwrap().to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap());
    let (mut child, ready) = spawn_activated(cmd, vec![("client", passed)], &dir.path().join("notify"));
    let log = || std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    wait_ready(&mut child, &ready, "twinmqd", log);
    let mut s = TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut s, &common::hello()).unwrap();
    let frames = common::read_frames(&mut s, Duration::from_millis(500));
    assert!(matches!(frames.first(), Some(twinmq_protocol::ServerFrame::Welcome { .. })), "{frames:?}\n{}", log());
    assert!(log().contains("passed by socket activation"), "{}", log());
    let _ = child.kill();
    let _ = child.wait();
}

/// The port in the daemon's `listening` log line (colours stripped).
fn logged_port(log: &str) -> Option<u16> {
    let plain: String = log.split('\x1b').map(|part| part.split_once('m').map_or(part, |(_, rest)| rest)).collect();
    let line = plain.lines().find(|l| l.contains(" listening "))?;
    let addr = line.split_whitespace().find_map(|w| w.strip_prefix("listen="))?;
    addr.parse::<std::net::SocketAddr>().ok().map(|a| a.port())
}

#[test]
fn without_passed_sockets_the_daemon_binds_the_configured_address() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("log");
    // No sockets passed: `spawn_activated` with none sets LISTEN_FDS=0.
    let mut cmd = Command::new(TWINMQD);
    cmd.args(["--durability", "none", "--data-dir", &dir.path().join("d").display().to_string()])
        .args(["--listen", "127.0.0.1:0"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    let (mut child, ready) = spawn_activated(cmd, Vec::new(), &dir.path().join("notify"));
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_ready(&mut child, &ready, "twinmqd", log);
    let port = logged_port(&log()).unwrap_or_else(|| panic!("no listening line:\n{}", log()));
    assert_ne!(port, 0);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut s, &common::hello()).unwrap();
    let frames = common::read_frames(&mut s, Duration::from_millis(500));
    assert!(matches!(frames.first(), Some(twinmq_protocol::ServerFrame::Welcome { .. })), "{frames:?}\n{}", log());
    assert!(!log().contains("passed by socket activation"), "{}", log());
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_port_the_daemon_cannot_bind_is_a_runtime_failure() {
    let dir = tempfile::tempdir().unwrap();
    let taken = loopback_listener();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(TWINMQD)
        .args(["--durability", "none", "--data-dir", &dir.path().join("d").display().to_string()])
        .args(["--listen", &addr])
        .env_remove("LISTEN_FDS")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a port that cannot be bound is a runtime failure: {stderr}");
    assert!(stderr.contains(&format!("cannot listen on {addr}")), "{stderr}");
}

#[test]
fn a_passed_socket_the_configuration_does_not_use_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(TWINMQD);
    cmd.args(["--durability", "none", "--data-dir", &dir.path().join("d").display().to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap());
    let sockets = vec![("client", loopback_listener()), ("ha", loopback_listener())];
    let (mut child, _ready) = spawn_activated(cmd, sockets, &dir.path().join("notify"));
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("a socket named `ha` was passed") && log.contains("peer_ha"), "{log}");
}
