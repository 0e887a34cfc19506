//! Opening an HA connection: TCP with our socket options, then TLS when
//! configured (`tls.rs`), then the mutual challenge/response on the cluster
//! secret (see `wire.rs`), which TLS never replaces:
//!
//! ```text
//! dialer                                   acceptor
//!   Hello { id, priority, nonce_d, versions } ->
//!                <- Challenge { id, priority, nonce_a, version }   (no proof)
//!   Proof { HMAC(k, "dialer", nonce_d, nonce_a, dialer, acceptor) } ->
//!                <- Accepted { HMAC(k, "acceptor", ...) }  or Refused
//! ```
//!
//! `k` is the handshake key HKDF derives from the cluster secret
//! (`secret.rs`); the acceptor tries each of its secrets (rotation) and
//! answers with the one that matched.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use crate::tls::{is_tls_failure, HaTls, MaybeTls};
use crate::wire::{self, HaCodec, HaFrame};

/// An authenticated HA connection.
pub struct Link {
    pub framed: Framed<MaybeTls, HaCodec>,
    pub peer_id: String,
    pub peer_priority: u32,
    pub remote: SocketAddr,
    /// The HA protocol version both sides speak on it.
    pub version: u8,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("peer_id", &self.peer_id).field("remote", &self.remote).finish()
    }
}

/// Who this node is on the link.
#[derive(Debug, Clone)]
pub struct LinkAuth {
    pub node_id: String,
    pub priority: u32,
    /// The first key is proved, every one is accepted (rotation).
    pub secret: crate::secret::ClusterSecret,
    /// TLS on the HA port, if configured.
    pub tls: Option<HaTls>,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The peer's host answered with a refusal: nothing listens there.
    #[error("connection refused")]
    Refused,
    #[error("timed out")]
    Timeout,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer failed authentication: {0}")]
    Auth(String),
    #[error("protocol: {0}")]
    Protocol(String),
    /// The TLS handshake failed: a certificate not signed by the CA, no
    /// client certificate where one is required, or a peer not speaking TLS.
    #[error("TLS: {0}")]
    Tls(String),
    /// A certificate, key or CA file that cannot be used.
    #[error("{path}: {message}")]
    TlsFile { path: std::path::PathBuf, message: String },
    /// Certificate and key that do not go together, or an unusable CA.
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
    /// The peer speaks no HA protocol version this node does (a node of
    /// another release): never linked, whatever it says.
    #[error("{0}")]
    Version(String),
}

impl LinkError {
    /// A refusal an operator must hear about (not just a peer that is away).
    pub fn is_refusal(&self) -> bool {
        matches!(self, LinkError::Auth(_) | LinkError::Tls(_) | LinkError::Version(_))
    }
}

/// Socket options for HA connections, in one place.
pub fn configure(stream: &TcpStream) -> std::io::Result<()> {
    let s = socket2::SockRef::from(stream);
    // Heartbeats and acks are tiny and latency-bound.
    s.set_nodelay(true)?;
    // Dead-peer detection is ours (heartbeats); keepalive only reaps leftovers.
    s.set_keepalive(true)?;
    Ok(())
}

async fn next(framed: &mut Framed<MaybeTls, HaCodec>, timeout: Duration) -> Result<HaFrame, LinkError> {
    match tokio::time::timeout(timeout, framed.next()).await {
        Err(_) => Err(LinkError::Timeout),
        Ok(None) => Err(LinkError::Protocol("closed during the handshake".into())),
        // With TLS 1.3 the dialer learns that its client certificate was
        // refused only here, from the acceptor's alert.
        Ok(Some(Err(twinmq_protocol::ProtocolError::Io(e)))) if is_tls_failure(&e) => {
            Err(LinkError::Tls(e.to_string()))
        }
        Ok(Some(Err(e))) => Err(LinkError::Protocol(e.to_string())),
        Ok(Some(Ok(f))) => Ok(f),
    }
}

/// Dial `addr` and authenticate both ways.
pub async fn dial(addr: SocketAddr, auth: &LinkAuth, timeout: Duration) -> Result<Link, LinkError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => return Err(LinkError::Timeout),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Err(LinkError::Refused),
        Ok(Err(e)) => return Err(LinkError::Io(e)),
        Ok(Ok(s)) => s,
    };
    configure(&stream)?;
    let stream = match &auth.tls {
        None => MaybeTls::Plain(stream),
        Some(tls) => {
            let name = tls.server_name.clone().unwrap_or_else(|| addr.ip().into());
            match tokio::time::timeout(timeout, tls.connector.connect(name, stream)).await {
                Err(_) => return Err(LinkError::Timeout),
                Ok(Err(e)) if is_tls_failure(&e) => return Err(LinkError::Tls(format!("{addr}: {e}"))),
                Ok(Err(e)) => return Err(LinkError::Io(e)),
                Ok(Ok(s)) => MaybeTls::Tls(Box::new(s.into())),
            }
        }
    };
    let mut framed = Framed::new(stream, wire::handshake_codec());
    let my_nonce = wire::nonce();
    framed
        .send(HaFrame::Hello {
            node_id: auth.node_id.clone(),
            priority: auth.priority,
            nonce: my_nonce.clone(),
            versions: wire::HA_VERSIONS,
        })
        .await
        .map_err(|e| LinkError::Protocol(e.to_string()))?;
    let (peer_id, peer_priority, their_nonce, version) = match next(&mut framed, timeout).await? {
        HaFrame::Challenge { node_id, priority, nonce, version } => {
            if !valid_node_id(&node_id) {
                return Err(LinkError::Protocol(format!("{addr} sent an invalid node id {:?}", short(&node_id))));
            }
            let version = version.unwrap_or(1);
            if !wire::HA_VERSIONS.contains(version) {
                return Err(LinkError::Version(format!(
                    "`{node_id}` at {addr} speaks HA protocol {version}, this node {}: run the same release on both nodes",
                    wire::HA_VERSIONS
                )));
            }
            (node_id, priority, nonce, version)
        }
        HaFrame::Refused { reason } if reason.contains("HA protocol") => {
            return Err(LinkError::Version(format!("{addr} refused: {}", reason.escape_debug())))
        }
        HaFrame::Refused { reason } => {
            return Err(LinkError::Auth(format!("{addr} refused: {}", reason.escape_debug())))
        }
        other => return Err(LinkError::Protocol(format!("expected Challenge, got {}", frame_name(&other)))),
    };
    if peer_id == auth.node_id {
        return Err(LinkError::Auth(format!("{addr} is this node itself (`{peer_id}`)")));
    }
    // The dialer proves first, with its own (first) secret.
    let keys = auth.secret.keys();
    let key = &keys[0].handshake;
    let proof = wire::proof(key, "dialer", &my_nonce, &their_nonce, &auth.node_id, &peer_id);
    framed.send(HaFrame::Proof { proof }).await.map_err(|e| LinkError::Protocol(e.to_string()))?;
    match next(&mut framed, timeout).await? {
        HaFrame::Accepted { proof } => {
            if !wire::verify(key, "acceptor", &my_nonce, &their_nonce, &auth.node_id, &peer_id, &proof) {
                return Err(LinkError::Auth(format!("`{peer_id}` at {addr} does not know the cluster secret")));
            }
            Ok(Link { framed: framed.map_codec(|_| wire::codec()), peer_id, peer_priority, remote: addr, version })
        }
        HaFrame::Refused { reason } if reason == "wrong cluster secret" => Err(LinkError::Auth(format!(
            "`{peer_id}` at {addr} refused this node's proof: the two nodes do not share the cluster secret"
        ))),
        HaFrame::Refused { reason } => {
            Err(LinkError::Auth(format!("`{peer_id}` at {addr} refused: {}", reason.escape_debug())))
        }
        other => Err(LinkError::Protocol(format!("expected Accepted, got {}", frame_name(&other)))),
    }
}

/// A node id as configuration allows it (1-64 of `A-Z a-z 0-9 - _ .`):
/// anything else from the wire is refused before it reaches a log line.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// At most 64 characters of `s`, for a debug-escaped error message.
fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A frame's name for an error message (never its content: a stranger's
/// bytes do not go into our logs).
fn frame_name(f: &HaFrame) -> &'static str {
    match f {
        HaFrame::Hello { .. } => "Hello",
        HaFrame::Challenge { .. } => "Challenge",
        HaFrame::Proof { .. } => "Proof",
        HaFrame::Accepted { .. } => "Accepted",
        HaFrame::Refused { .. } => "Refused",
        _ => "a frame of an open link",
    }
}

/// Authenticate an accepted connection.
pub async fn accept(stream: TcpStream, auth: &LinkAuth, timeout: Duration) -> Result<Link, LinkError> {
    configure(&stream)?;
    let remote = stream.peer_addr()?;
    let stream = match &auth.tls {
        None => MaybeTls::Plain(stream),
        Some(tls) => match tokio::time::timeout(timeout, tls.acceptor.accept(stream)).await {
            Err(_) => return Err(LinkError::Timeout),
            Ok(Err(e)) if is_tls_failure(&e) => return Err(LinkError::Tls(format!("{remote}: {e}"))),
            Ok(Err(e)) => return Err(LinkError::Io(e)),
            Ok(Ok(s)) => MaybeTls::Tls(Box::new(s.into())),
        },
    };
    let mut framed = Framed::new(stream, wire::handshake_codec());
    let (peer_id, peer_priority, their_nonce, versions) = match next(&mut framed, timeout).await? {
        HaFrame::Hello { node_id, priority, nonce, versions } => (node_id, priority, nonce, versions),
        other => return Err(LinkError::Protocol(format!("expected Hello, got {}", frame_name(&other)))),
    };
    // Before it goes into any message: a node id comes from a stranger here.
    if !valid_node_id(&peer_id) {
        let _ = framed.send(HaFrame::Refused { reason: "invalid node id".into() }).await;
        return Err(LinkError::Protocol(format!("{remote} sent an invalid node id {:?}", short(&peer_id))));
    }
    let version = match twinmq_protocol::negotiate(wire::HA_VERSIONS, versions) {
        Ok(v) => v,
        Err(e) => {
            let reason = format!("no common HA protocol version: {e}; run the same release on both nodes");
            let _ = framed.send(HaFrame::Refused { reason: reason.clone() }).await;
            return Err(LinkError::Version(format!("`{peer_id}` from {remote}: {reason}")));
        }
    };
    if peer_id == auth.node_id {
        let _ = framed.send(HaFrame::Refused { reason: "same node id as this node".into() }).await;
        return Err(LinkError::Auth(format!("{remote} claims this node's own id `{peer_id}`")));
    }
    let my_nonce = wire::nonce();
    framed
        .send(HaFrame::Challenge {
            node_id: auth.node_id.clone(),
            priority: auth.priority,
            nonce: my_nonce.clone(),
            version: Some(version),
        })
        .await
        .map_err(|e| LinkError::Protocol(e.to_string()))?;
    let got = match next(&mut framed, timeout).await? {
        HaFrame::Proof { proof } => proof,
        other => return Err(LinkError::Protocol(format!("expected Proof, got {}", frame_name(&other)))),
    };
    // Any of this node's secrets (one being rotated in or out); the answer
    // is proved with the one the dialer used.
    let keys = auth.secret.keys();
    let Some(key) = keys
        .iter()
        .map(|k| &k.handshake)
        .find(|k| wire::verify(k, "dialer", &their_nonce, &my_nonce, &peer_id, &auth.node_id, &got))
    else {
        let _ = framed.send(HaFrame::Refused { reason: "wrong cluster secret".into() }).await;
        return Err(LinkError::Auth(format!("`{peer_id}` from {remote} does not know the cluster secret")));
    };
    let proof = wire::proof(key, "acceptor", &their_nonce, &my_nonce, &peer_id, &auth.node_id);
    framed.send(HaFrame::Accepted { proof }).await.map_err(|e| LinkError::Protocol(e.to_string()))?;
    Ok(Link { framed: framed.map_codec(|_| wire::codec()), peer_id, peer_priority, remote, version })
}
