//! Protocol version negotiation in the client handshake, against a real
//! broker: a client older than negotiation (its Hello has no version range)
//! still gets in, at version 1; a client sharing no version with the broker
//! gets one typed error naming both ranges, and the connection closes.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::Broker;
use serde::Serialize;
use twinmq_protocol::{ClientFrame, ErrorCode, ErrorContext, ServerFrame, VersionRange, SUPPORTED_VERSIONS};

/// `ClientFrame` as releases before negotiation declared it: same variant
/// names, so it encodes to exactly the bytes such a client sends.
#[derive(Serialize)]
enum OldClientFrame {
    Hello { client_name: String, user: Option<String>, password: Option<String>, admin: bool },
    Ping { nonce: u64 },
}

fn old_frame(f: &OldClientFrame) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    twinmq_protocol::encode_frame(f, twinmq_protocol::DEFAULT_MAX_FRAME_BYTES, &mut b).unwrap();
    b.to_vec()
}

/// Frames until `n` have arrived or the broker closes; and whether it closed.
fn read_some(s: &mut TcpStream, n: usize) -> (Vec<ServerFrame>, bool) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (mut buf, mut frames) = (Vec::new(), Vec::new());
    loop {
        while buf.len() >= 4 {
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if buf.len() < 4 + len {
                break;
            }
            frames.push(twinmq_protocol::decode_body(&buf[4..4 + len]).unwrap());
            buf.drain(..4 + len);
        }
        if frames.len() >= n {
            return (frames, false);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => return (frames, true),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) => panic!("no answer within 5 s: {e}; got {frames:?}"),
        }
    }
}

#[tokio::test]
async fn an_old_hello_without_a_version_range_gets_in_at_version_1() {
    let broker = Broker::start(&["--durability", "none"]);
    let mut s = TcpStream::connect(broker.addr).unwrap();
    let hello = OldClientFrame::Hello { client_name: "old".into(), user: None, password: None, admin: false };
    s.write_all(&old_frame(&hello)).unwrap();
    let (frames, _) = read_some(&mut s, 1);
    assert!(
        matches!(frames.first(), Some(ServerFrame::Welcome { protocol_version: 1, .. })),
        "{frames:?}\n{}",
        broker.log()
    );
    // And is served at it.
    s.write_all(&old_frame(&OldClientFrame::Ping { nonce: 7 })).unwrap();
    let (frames, closed) = read_some(&mut s, 1);
    assert_eq!(frames.first(), Some(&ServerFrame::Pong { nonce: 7 }), "closed: {closed}");

    // The client library says which version it got: the highest both speak.
    let client = broker.client().await;
    assert_eq!(client.server().protocol_version, SUPPORTED_VERSIONS.max);
    client.close().await.unwrap();
}

#[test]
fn a_client_sharing_no_version_gets_a_typed_error_naming_both_ranges_then_is_closed() {
    // Users configured: the version is checked before the (missing) credentials.
    let hash = twinmq_broker::auth::hash_password("right horse").unwrap();
    let broker = Broker::start(&["--durability", "none", "--user", &format!("app={hash}")]);
    let newer = VersionRange::new(SUPPORTED_VERSIONS.max + 1, SUPPORTED_VERSIONS.max + 2);
    let mut s = TcpStream::connect(broker.addr).unwrap();
    s.write_all(&common::hello_offering(newer)).unwrap();
    let (frames, closed) = read_some(&mut s, 2);
    assert!(closed, "the broker closes after the refusal: {frames:?}");
    let [ServerFrame::Error(e)] = &frames[..] else { panic!("one error frame, got {frames:?}") };
    assert_eq!((e.code, &e.context), (ErrorCode::UnsupportedVersion, &ErrorContext::Connection), "{e:?}");
    let versions = e.versions.expect("typed ranges");
    assert_eq!((versions.client, versions.broker), (newer, SUPPORTED_VERSIONS));
    assert!(e.message.contains(&newer.to_string()) && e.message.contains(&SUPPORTED_VERSIONS.to_string()), "{e:?}");
    assert!(broker.log().contains("no common protocol version"), "logged:\n{}", broker.log());

    // A range that includes ours gets in, at the highest common version.
    let mut s = TcpStream::connect(broker.addr).unwrap();
    let wider = VersionRange::new(SUPPORTED_VERSIONS.min, SUPPORTED_VERSIONS.max + 5);
    s.write_all(&common::frame(&ClientFrame::Hello {
        client_name: "wide".into(),
        user: Some("app".into()),
        password: Some("wrong".into()),
        admin: false,
        versions: wider,
        ticket: None,
    }))
    .unwrap();
    let (frames, _) = read_some(&mut s, 1);
    // Past the version check: now the credentials are what is refused.
    assert!(
        matches!(frames.first(), Some(ServerFrame::Error(e)) if e.code == ErrorCode::NotAuthenticated),
        "{frames:?}"
    );
}
