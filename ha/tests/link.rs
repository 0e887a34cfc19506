//! The HA handshake on real sockets: version negotiation and the secret.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_util::codec::Framed;
use twinmq_ha::link::{self, LinkAuth, LinkError};
use twinmq_ha::wire::{self, HaFrame};
use twinmq_protocol::VersionRange;

fn auth(id: &str) -> LinkAuth {
    LinkAuth { node_id: id.into(), priority: 100, secret: "the-cluster-secret".into(), tls: None }
}

const T: Duration = Duration::from_secs(5);

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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        link::accept(stream, &auth("b"), T).await
    });
    // An old node's Hello states no versions: it speaks 1 only.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut old = Framed::new(stream, wire::handshake_codec());
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
