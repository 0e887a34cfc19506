//! The HA handshake on real sockets: version negotiation and the secret.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_util::codec::Framed;
use twinmq_ha::link::{self, LinkAuth, LinkError};
use twinmq_ha::secret::ClusterSecret;
use twinmq_ha::wire::{self, HaFrame};
use twinmq_protocol::VersionRange;

/// One generated secret for the whole test binary.
fn secret() -> &'static str {
    static S: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    S.get_or_init(twinmq_ha::secret::generate)
}

fn auth(id: &str) -> LinkAuth {
    auth_with(id, secret())
}

fn auth_with(id: &str, secret: &str) -> LinkAuth {
    LinkAuth { node_id: id.into(), priority: 100, secret: ClusterSecret::inline(secret).unwrap(), tls: None }
}

/// A node whose secret file holds `secrets` (the first is its own).
fn auth_file(id: &str, dir: &std::path::Path, secrets: &[&str]) -> LinkAuth {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("{id}.secret"));
    std::fs::write(&path, secrets.join("\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    LinkAuth { node_id: id.into(), priority: 100, secret: ClusterSecret::from_file(&path).unwrap(), tls: None }
}

/// Dial `b` as `a`; what each side made of it.
async fn handshake(a: LinkAuth, b: LinkAuth) -> (Result<link::Link, LinkError>, Result<link::Link, LinkError>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        link::accept(stream, &b, T).await
    });
    let dialed = link::dial(addr, &a, T).await;
    (dialed, acceptor.await.unwrap())
}

const T: Duration = Duration::from_secs(5);

/// An acceptor `b` on a fresh port, and a raw connection to it that speaks
/// the handshake by hand (an old node, a stranger).
async fn raw_to_acceptor(
) -> (Framed<tokio::net::TcpStream, wire::HaCodec>, tokio::task::JoinHandle<Result<link::Link, LinkError>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        link::accept(stream, &auth("b"), T).await
    });
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    (Framed::new(stream, wire::handshake_codec()), acceptor)
}

#[tokio::test]
async fn two_nodes_of_this_release_agree_on_the_ha_protocol() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        link::accept(stream, &auth("b"), T).await
    });
    let dialed = link::dial(addr, &auth("a"), T).await.unwrap();
    let accepted = acceptor.await.unwrap().unwrap();
    assert_eq!((dialed.version, accepted.version), (wire::HA_VERSIONS.max, wire::HA_VERSIONS.max));
    assert_eq!((dialed.peer_id.as_str(), accepted.peer_id.as_str()), ("b", "a"));
}

#[tokio::test]
async fn a_node_of_an_older_release_is_refused_with_the_reason() {
    // An old node's Hello states no versions: it speaks 1 only.
    let (mut old, acceptor) = raw_to_acceptor().await;
    let hello = HaFrame::Hello { node_id: "a".into(), priority: 100, nonce: wire::nonce(), versions: VersionRange::V1 };
    old.send(hello).await.unwrap();
    match old.next().await {
        Some(Ok(HaFrame::Refused { reason })) => {
            assert!(reason.contains("no common HA protocol version"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(matches!(acceptor.await.unwrap(), Err(LinkError::Version(_))));
}

#[tokio::test]
async fn a_node_of_the_previous_release_links_at_its_version() {
    // HA 4 has no catch-up from the log: a link at 4 gets snapshots instead
    // (twinmq-store's replication tests), so the two roll one at a time.
    let (mut old, _acceptor) = raw_to_acceptor().await;
    let versions = VersionRange::new(4, 4);
    old.send(HaFrame::Hello { node_id: "a".into(), priority: 100, nonce: wire::nonce(), versions }).await.unwrap();
    match old.next().await {
        Some(Ok(HaFrame::Challenge { version, .. })) => assert_eq!(version, Some(4)),
        other => panic!("expected a challenge at 4, got {other:?}"),
    }
    assert!(wire::LOG_CATCHUP_VERSION > 4 && wire::HA_VERSIONS.contains(4));
}

/// Finding 3 of issue 10: the acceptor used to prove first, so anyone who
/// could connect got an HMAC of the secret over a nonce of their choice and
/// could test guesses offline. Now a stranger gets a nonce and nothing else.
#[tokio::test]
async fn a_stranger_that_dials_gets_nothing_computed_from_the_secret() {
    let (mut stranger, acceptor) = raw_to_acceptor().await;
    let hello = HaFrame::Hello { node_id: "x".into(), priority: 1, nonce: vec![0; 32], versions: wire::HA_VERSIONS };
    stranger.send(hello).await.unwrap();
    let nonce = match stranger.next().await {
        Some(Ok(HaFrame::Challenge { nonce, .. })) => nonce,
        other => panic!("expected a bare challenge, got {other:?}"),
    };
    // Everything the stranger saw: could any of it be an HMAC under the
    // secret? Only the nonce came back, and it is not one.
    let key = ClusterSecret::inline(secret()).unwrap().keys()[0].handshake;
    for tag in ["acceptor", "dialer"] {
        let p = wire::proof(&key, tag, &[0; 32], &nonce, "x", "b");
        assert_ne!(p, nonce);
    }
    // A guessed proof is refused, with no proof in return.
    stranger.send(HaFrame::Proof { proof: vec![0; 32] }).await.unwrap();
    match stranger.next().await {
        Some(Ok(HaFrame::Refused { reason })) => assert_eq!(reason, "wrong cluster secret"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(matches!(acceptor.await.unwrap(), Err(LinkError::Auth(_))));
}

#[tokio::test]
async fn a_peer_with_another_secret_is_refused_both_ways() {
    let other = twinmq_ha::secret::generate();
    let (dialed, accepted) = handshake(auth_with("a", &other), auth("b")).await;
    assert!(matches!(dialed, Err(LinkError::Auth(_))), "{dialed:?}");
    assert!(matches!(accepted, Err(LinkError::Auth(_))), "{accepted:?}");
}

/// Rotation: add the new secret as accepted on both nodes, make it the
/// proved one on both, remove the old one; the link opens, either way, at
/// every step, and once the old one is gone it no longer opens with it.
#[tokio::test]
async fn a_secret_rotates_with_an_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (twinmq_ha::secret::generate(), twinmq_ha::secret::generate());
    let steps: [(&[&str], &[&str]); 5] = [
        (&[&old], &[&old]),
        (&[&old, &new], &[&old]),
        (&[&old, &new], &[&old, &new]),
        (&[&new, &old], &[&old, &new]),
        (&[&new], &[&new, &old]),
    ];
    for (i, (sa, sb)) in steps.iter().enumerate() {
        let da = dir.path().join(format!("{i}"));
        std::fs::create_dir(&da).unwrap();
        for (x, y, sx, sy) in [("a", "b", sa, sb), ("b", "a", sb, sa)] {
            let (dialed, accepted) = handshake(auth_file(x, &da, sx), auth_file(y, &da, sy)).await;
            assert!(dialed.is_ok() && accepted.is_ok(), "step {i}, {x} dials {y}: {dialed:?} / {accepted:?}");
        }
    }
    let d = dir.path().join("after");
    std::fs::create_dir(&d).unwrap();
    let (dialed, _) = handshake(auth_file("a", &d, &[&old]), auth_file("b", &d, &[&new])).await;
    assert!(matches!(dialed, Err(LinkError::Auth(_))), "the removed secret opens nothing: {dialed:?}");
}

/// Issue 10, finding 13: a node id comes from a stranger before the secret
/// is proved; one that is not a configurable id (a newline, an escape
/// sequence) is refused before it reaches a log line.
#[tokio::test]
async fn a_hello_with_an_invalid_node_id_is_refused_before_it_is_logged() {
    let (mut stranger, acceptor) = raw_to_acceptor().await;
    let id = "a\n2026-12-03 INFO forged\u{1b}[2J";
    let hello = HaFrame::Hello { node_id: id.into(), priority: 1, nonce: vec![0; 32], versions: wire::HA_VERSIONS };
    stranger.send(hello).await.unwrap();
    match stranger.next().await {
        Some(Ok(HaFrame::Refused { reason })) => assert_eq!(reason, "invalid node id"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let err = acceptor.await.unwrap().unwrap_err().to_string();
    assert!(!err.contains('\n') && !err.contains('\u{1b}'), "escaped in the error: {err}");
}
