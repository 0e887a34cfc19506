//! The `twinmq` command-line tool against the client crate's fake broker
//! (client/tests/common): its output contract (`confirmed N`, `received K`,
//! exit codes), admin commands over admin connections, and riding through a
//! failover. The real broker runs the CLI in broker/tests and the cable lab.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

#[path = "../../client/tests/common/mod.rs"]
mod common;

use common::*;
use twinmq_protocol::{AdminCommand, ClientFrame, ServerFrame};

/// Run the `twinmq` binary; (exit code, stdout, stderr).
pub async fn twinmq(args: &[&str]) -> (i32, String, String) {
    let output = tokio::time::timeout(
        3 * PATIENCE,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_twinmq")).args(args).env_remove("TWINMQ_SERVERS").output(),
    )
    .await
    .expect("twinmq took too long")
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
    let broker = FakeBroker::start(Mode::Active { auto_confirm: true, reject_seq: Some(4), cut_at_seq: None }).await;
    let (code, stdout, stderr) = twinmq(&["--servers", &broker.addr, "pub", "q", "--count", "20"]).await;
    assert_eq!((code, stdout.as_str()), (1, "confirmed 3\n"));
    assert!(stderr.contains("NotAuthorized"), "{stderr}");
}

/// A refused publish ends `twinmq bench` with the error (it used to wait
/// forever: the sender blocked on the channel its collector had left, seen
/// with a queue filled to `max_queue_bytes`).
#[tokio::test]
async fn cli_bench_fails_at_a_refused_publish_instead_of_hanging() {
    let broker = FakeBroker::start(Mode::Active { auto_confirm: true, reject_seq: Some(4), cut_at_seq: None }).await;
    let (code, stdout, stderr) =
        twinmq(&["--servers", &broker.addr, "bench", "--count", "2000", "--window", "8", "--no-consumer"]).await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stderr.contains("producer error") && stderr.contains("NotAuthorized"), "{stderr}");
}

#[tokio::test]
async fn cli_without_servers_is_a_usage_error() {
    let (code, _, stderr) = twinmq(&["status"]).await;
    assert_eq!(code, 2, "{stderr}");
}

#[tokio::test]
async fn cli_status_answers_from_a_passive_node_over_an_admin_connection() {
    let mut passive = FakeBroker::start(Mode::Passive { hint: None }).await;
    let dead = dead_addr().await;
    let (code, stdout, stderr) = twinmq(&["--servers", &format!("{dead},{}", passive.addr), "status"]).await;
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["role"], "passive");
    let admin = passive.next(|f| if let ClientFrame::Hello { admin, .. } = f { Some(admin) } else { None }).await;
    assert!(admin, "status uses an admin connection");
}

#[tokio::test]
async fn cli_promote_requires_force() {
    let (code, _, stderr) = twinmq(&["--servers", "127.0.0.1:1", "promote"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
}

#[tokio::test]
async fn cli_switchover_finds_the_active_node() {
    let passive = FakeBroker::start(Mode::Passive { hint: None }).await;
    let active = FakeBroker::start(active()).await;
    let (code, stdout, stderr) =
        twinmq(&["--servers", &format!("{},{}", passive.addr, active.addr), "switchover"]).await;
    assert_eq!((code, stdout.as_str()), (0, "switchover done\n"), "{stderr}");
    // Only a passive node: its refusal is the answer.
    let (code, stdout, stderr) = twinmq(&["--servers", &passive.addr, "switchover"]).await;
    assert_eq!((code, stdout.as_str()), (1, ""));
    assert!(stderr.contains("NotActive"), "{stderr}");
}

#[tokio::test]
async fn cli_promote_finds_the_passive_node() {
    let active = FakeBroker::start(active()).await;
    let passive = FakeBroker::start(Mode::Passive { hint: None }).await;
    let servers = format!("{},{}", active.addr, passive.addr);
    // Without --yes: what may be lost, and nothing changed.
    let (code, stdout, stderr) = twinmq(&["--servers", &servers, "promote", "--force"]).await;
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stdout.contains(&format!("node  at {} is passive", passive.addr)), "{stdout}");
    assert!(stdout.contains("nothing was changed") && stdout.contains("promote --force --yes"), "{stdout}");
    let (code, stdout, stderr) = twinmq(&["--servers", &servers, "promote", "--force", "--yes"]).await;
    assert_eq!((code, stdout), (0, format!("promoted {}\n", passive.addr)), "{stderr}");
}

#[tokio::test]
async fn cli_user_add_sends_an_argon2_hash_and_the_grants_never_the_password() {
    let mut active = FakeBroker::start(active()).await;
    let args = ["--servers", &active.addr, "user", "add", "app", "--new-password", "s3cret"];
    let (code, stdout, stderr) =
        twinmq(&[&args[..], &["--grant", "produce:orders.*", "--grant", "consume:topic:prices.#"]].concat()).await;
    assert_eq!((code, stdout.as_str()), (0, "user added app\n"), "{stderr}");
    let (command, force) = active
        .next(|f| match f {
            ClientFrame::Admin { command, force, .. } => Some((command, force)),
            _ => None,
        })
        .await;
    let AdminCommand::UserAdd { name, password_hash, grants } = command else { panic!("not UserAdd: {command:?}") };
    assert_eq!(name, "app");
    assert!(!force);
    assert!(!password_hash.contains("s3cret"));
    use argon2::PasswordVerifier;
    let parsed = argon2::PasswordHash::new(&password_hash).unwrap();
    assert!(argon2::Argon2::default().verify_password(b"s3cret", &parsed).is_ok(), "the hash is of the password");
    let grants: Vec<String> = grants.iter().map(ToString::to_string).collect();
    assert_eq!(grants, vec!["produce:orders.*", "consume:topic:prices.#"]);

    let (code, stdout, stderr) =
        twinmq(&["--servers", &active.addr, "acl", "revoke", "app", "admin:#", "--force"]).await;
    assert_eq!((code, stdout.as_str()), (0, "revoked app admin:#\n"), "{stderr}");
    let (command, force) = active
        .next(|f| match f {
            ClientFrame::Admin { command: c @ AdminCommand::AclRevoke { .. }, force, .. } => Some((c, force)),
            _ => None,
        })
        .await;
    assert!(force, "--force travels with the command");
    assert!(matches!(command, AdminCommand::AclRevoke { ref user, .. } if user == "app"));

    let (code, _, stderr) = twinmq(&["--servers", &active.addr, "acl", "grant", "app", "fly:#"]).await;
    assert_eq!(code, 2, "a bad grant is a usage error: {stderr}");
    assert!(stderr.contains("unknown permission"), "{stderr}");
}
/// `twinmq` with owned arguments, so that it can run in a task.
fn spawn_twinmq(args: Vec<String>) -> tokio::task::JoinHandle<(i32, String, String)> {
    tokio::spawn(async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        twinmq(&args).await
    })
}

#[tokio::test]
async fn cli_pub_rides_through_the_death_of_the_active_node() {
    let mode = Mode::Active { auto_confirm: true, reject_seq: None, cut_at_seq: Some((100, Cut::Node)) };
    let first = FakeBroker::start(mode).await;
    let second = FakeBroker::start(active()).await;
    let servers = format!("{},{}", first.addr, second.addr);
    let (code, stdout, stderr) = twinmq(&["--servers", &servers, "pub", "q", "--count", "300", "--window", "16"]).await;
    assert_eq!((code, stdout.as_str()), (0, "confirmed 300\n"), "{stderr}");
    let on_second: Vec<u64> = second.stored().keys().map(|(_, seq)| *seq).collect();
    assert!(on_second.contains(&100) && on_second.contains(&300), "resent and continued on the second node");
}

#[tokio::test]
async fn cli_sub_rides_through_a_failover_counting_distinct_bodies() {
    let mut first = FakeBroker::start(active()).await;
    let mut second = FakeBroker::start(active()).await;
    let servers = format!("{},{}", first.addr, second.addr);
    let sub = spawn_twinmq(["--servers", &servers, "sub", "q", "--count", "10"].map(String::from).to_vec());

    let sub_id = first.next(|f| if let ClientFrame::Subscribe { sub_id, .. } = f { Some(sub_id) } else { None }).await;
    for i in 0..5 {
        first.send(ServerFrame::Deliver { sub_id, message: delivered(i + 1, &format!("b{i}")) });
    }
    first.next(|f| matches!(f, ClientFrame::Ack { id, .. } if id.seq == 3).then_some(())).await;
    first.kill();
    // The new active node redelivers what it may not have seen acked, then the rest.
    let sub_id = second.next(|f| if let ClientFrame::Subscribe { sub_id, .. } = f { Some(sub_id) } else { None }).await;
    for i in 3..10 {
        second.send(ServerFrame::Deliver { sub_id, message: delivered(i + 1, &format!("b{i}")) });
    }
    let (code, stdout, stderr) = within(sub).await.unwrap();
    assert_eq!((code, stdout.as_str()), (0, "received 10\n"), "{stderr}");
}
