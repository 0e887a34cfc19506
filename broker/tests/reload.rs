//! What an operator's tools do to a running `twinmqd` (the systemd unit's
//! ExecStartPre and ExecReload): `--check-config FILE` exits 0 or 2 naming
//! the key; SIGHUP applies the configuration's users and the client port's
//! certificate while running and names every other changed key as needing
//! a restart.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::tls::Ca;
use common::{signal, Broker, TWINMQD};
use twinmq_client::{Client, ClientError, ClientTls, Destination, Message};

fn check(path: &Path) -> (i32, String) {
    let out = Command::new(TWINMQD).arg("--check-config").arg(path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn check_config_passes_a_valid_file_and_names_the_key_of_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("debian/twinmq.toml");
    let (code, text) = check(&shipped);
    assert_eq!(code, 0, "the packaged example config fails: {text}");
    assert!(text.contains("configuration OK"), "{text}");
    for (body, key) in [
        ("durability = \"sometimes\"\n", "durability"),
        ("max_connections = 0\n", "max_connections"),
        ("no_such_key = 1\n", "no_such_key"),
        ("stomp_listen = \"nowhere\"\n", "stomp_listen"),
        ("listen = \"127.0.0.1:5570\"\nstomp_listen = \"127.0.0.1:5570\"\n", "stomp_listen"),
        ("tls_cert = \"/nonexistent.pem\"\ntls_key = \"/nonexistent.key\"\n", "tls_cert"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, body).unwrap();
        let (code, text) = check(&path);
        assert_eq!(code, 2, "{body}: {text}");
        assert!(text.contains(key), "{body}: the error does not name `{key}`: {text}");
    }
    let (code, text) = check(&dir.path().join("missing.toml"));
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("missing.toml"), "{text}");
}

async fn wait_log(broker: &Broker, pattern: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = broker.log();
        if log.contains(pattern) || std::time::Instant::now() > deadline {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn write_users(path: &Path, users: &[(&str, &str)], extra: &str) {
    let mut text = String::from(extra);
    for (name, password) in users {
        text.push_str(&format!("\n[[users]]\nname = \"{name}\"\npassword = \"{password}\"\n"));
    }
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_users_and_names_keys_that_need_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("twinmq.toml");
    write_users(&config, &[("app", "one"), ("ops", "ops")], "max_connections = 100\n");
    let broker = Broker::start(&["--config", config.to_str().unwrap()]);
    let as_user = |u: &str, p: &str| broker.config().user(u).password(p);
    let ops = Client::connect(as_user("ops", "ops")).await.unwrap();
    ops.producer(Destination::queue("r")).send(Message::persistent("before")).await.unwrap();

    // app's password changes, ops goes away, and a key that cannot change while running.
    write_users(&config, &[("app", "two")], "max_connections = 200\n");
    signal(broker.pid(), "HUP");
    let log = wait_log(&broker, "users of the configuration reloaded").await;
    assert!(log.contains("users of the configuration reloaded"), "{log}");
    assert!(log.contains("need a restart") && log.contains("max_connections"), "{log}");

    let old = Client::connect(as_user("app", "one").connect_timeout(Duration::from_secs(3))).await;
    assert!(old.is_err(), "the old password still works after the reload");
    let new = Client::connect(as_user("app", "two")).await.unwrap();
    new.producer(Destination::queue("r")).send(Message::persistent("after")).await.unwrap();
    // The removed user's open connection is closed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut closed = false;
    while std::time::Instant::now() < deadline {
        match ops.producer(Destination::queue("r")).send(Message::persistent("x")).await {
            Err(ClientError::Broker { .. } | ClientError::Closed | ClientError::Disconnected) => {
                closed = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(closed, "a user removed by the reload kept publishing");

    // An invalid file changes nothing and says why.
    std::fs::write(&config, "durability = \"sometimes\"\n").unwrap();
    signal(broker.pid(), "HUP");
    let log = wait_log(&broker, "nothing reloaded").await;
    assert!(log.contains("nothing reloaded") && log.contains("durability"), "{log}");
    Client::connect(as_user("app", "two")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_serves_a_renewed_certificate_to_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = Ca::new(dir.path(), "old");
    let new_ca = Ca::new(dir.path(), "new");
    let old = old_ca.issue(dir.path(), "old-server", &["127.0.0.1"]);
    let renewed = new_ca.issue(dir.path(), "new-server", &["127.0.0.1"]);
    // The configured paths stay; the files behind them are renewed.
    let (cert, key) = (dir.path().join("node.crt"), dir.path().join("node.key"));
    std::fs::copy(&old.cert, &cert).unwrap();
    std::fs::copy(&old.key, &key).unwrap();
    let broker = Broker::start(&["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    let trusting = |ca: &Path| broker.config().tls(ClientTls::new(ca).unwrap()).connect_timeout(Duration::from_secs(3));
    let before = Client::connect(trusting(&old_ca.pem)).await.unwrap();

    std::fs::copy(&renewed.cert, &cert).unwrap();
    std::fs::copy(&renewed.key, &key).unwrap();
    signal(broker.pid(), "HUP");
    // Unchanged keys (the paths are the same): a reload still re-reads the files.
    let log = wait_log(&broker, "client TLS certificate reloaded").await;
    assert!(log.contains("client TLS certificate reloaded"), "{log}");
    Client::connect(trusting(&new_ca.pem)).await.unwrap();
    assert!(Client::connect(trusting(&old_ca.pem)).await.is_err(), "the old certificate is still served");
    // An open connection keeps its session.
    before.producer(Destination::queue("tls")).send(Message::persistent("still here")).await.unwrap();
}
