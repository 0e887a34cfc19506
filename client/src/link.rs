//! One TCP (or TLS) connection to one broker node: the handshake and the framing.
//!
//! The read half is a `FramedRead` with the shared [`FrameCodec`]; the write
//! half is written from a plain byte buffer owned by whoever drives the link
//! (the connection task's outbox, or the admin client). Keeping the two apart
//! means that writing never stops reading: a broker that stops reading until
//! its outbound queue to us drains cannot deadlock with a client that stops
//! reading until its publishes are written.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;
use tracing::debug;
use twinmq_protocol::{encode_frame_as, ClientFrame, FrameCodec, ServerFrame, SUPPORTED_VERSIONS};

use crate::tls::is_tls_failure;
use crate::{ClientConfig, ClientError, ErrorCode};

/// The read half: plain TCP or TLS. One virtual call per read syscall.
pub(crate) type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The write half: plain TCP or TLS.
pub(crate) type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// What the node we are connected to said about itself in its `Welcome`.
///
/// ```no_run
/// # fn demo(client: &twinmq_client::Client) {
/// let server = client.server();
/// println!("{} at {} runs {}, protocol {}", server.node_id, server.addr, server.server_version, server.protocol_version);
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// The address we connected to (as configured, or the hint that led here).
    pub addr: String,
    /// The node's id (its `node_id` setting).
    pub node_id: String,
    /// The broker's release.
    pub server_version: String,
    /// Largest frame the broker accepts.
    pub max_frame_bytes: u32,
    /// The protocol version this connection speaks: the highest that this
    /// library and the node both speak, chosen by the node in the handshake
    /// (1 with a node older than version negotiation).
    pub protocol_version: u8,
}

/// How the frames we send are made on one connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Framing {
    /// Limit for frames we send: ours and the broker's, whichever is smaller.
    pub(crate) max_out: usize,
    /// The negotiated protocol version.
    pub(crate) version: u8,
}

impl Framing {
    /// Encode `frame` at the end of `buf`; on error (too large) nothing is added.
    pub(crate) fn encode(&self, frame: &ClientFrame, buf: &mut BytesMut) -> Result<(), ClientError> {
        Ok(encode_frame_as(frame, self.version, self.max_out, buf)?)
    }
}

/// An open, authenticated connection.
/// The session-resumption ticket of the last `Welcome`, shown in the next
/// `Hello` of the same client (a reconnect after a failover): the broker
/// checks it with an HMAC instead of argon2, so that a thousand clients
/// coming back at once are not queued behind password checks.
pub(crate) type TicketSlot = Arc<Mutex<Option<Vec<u8>>>>;

pub(crate) struct Link {
    pub(crate) reader: FramedRead<ReadHalf, FrameCodec<ServerFrame, ClientFrame>>,
    pub(crate) writer: WriteHalf,
    pub(crate) framing: Framing,
}

impl Link {
    /// Connect to `addr`, say Hello (an admin one if `admin`) and wait for
    /// the answer, all within `config.connect_timeout`.
    pub(crate) async fn open(
        addr: &str,
        config: &ClientConfig,
        admin: bool,
        ticket: &TicketSlot,
    ) -> Result<(Link, ServerInfo), ClientError> {
        let after = config.connect_timeout;
        match tokio::time::timeout(after, Self::open_inner(addr, config, admin, ticket)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout { what: format!("connecting to {addr}"), after }),
        }
    }

    async fn open_inner(
        addr: &str,
        config: &ClientConfig,
        admin: bool,
        ticket: &TicketSlot,
    ) -> Result<(Link, ServerInfo), ClientError> {
        let connect_err = |source| ClientError::Connect { addr: addr.to_owned(), source };
        let stream = TcpStream::connect(addr).await.map_err(connect_err)?;
        // We batch writes ourselves; Nagle would only add latency to confirms and acks.
        stream.set_nodelay(true).map_err(connect_err)?;
        let tls_err = |e: std::io::Error| ClientError::Tls { addr: addr.to_owned(), message: e.to_string() };
        let (read, writer): (ReadHalf, WriteHalf) = match &config.tls {
            None => {
                let (read, write) = stream.into_split();
                (Box::new(read), Box::new(write))
            }
            Some(tls) => {
                let stream = tls.connector.connect(tls.name_for(addr)?, stream).await.map_err(|e| {
                    if is_tls_failure(&e) {
                        tls_err(e)
                    } else {
                        connect_err(e)
                    }
                })?;
                let (read, write) = tokio::io::split(stream);
                (Box::new(read), Box::new(write))
            }
        };
        // Hello and its answer at the handshake version (what `FrameCodec::new` frames at).
        let mut link = Link {
            reader: FramedRead::new(read, FrameCodec::new(config.max_frame_bytes)),
            writer,
            framing: Framing { max_out: config.max_frame_bytes, version: twinmq_protocol::HANDSHAKE_VERSION },
        };
        let hello = ClientFrame::Hello {
            client_name: config.client_name.clone(),
            user: config.user.clone(),
            password: config.password.clone(),
            admin,
            versions: SUPPORTED_VERSIONS,
            ticket: ticket.lock().ok().and_then(|t| t.clone()),
        };
        let mut buf = BytesMut::new();
        link.encode(&hello, &mut buf)?;
        link.writer.write_all_buf(&mut buf).await.map_err(connect_err)?;
        let answer = match link.reader.next().await {
            // With TLS 1.3 a refused client certificate shows only now, as the server's alert.
            Some(Err(twinmq_protocol::ProtocolError::Io(e))) if config.tls.is_some() && is_tls_failure(&e) => {
                return Err(tls_err(e))
            }
            // A TLS record header read as our length prefix: a TLS port and no TLS configured.
            Some(Err(twinmq_protocol::ProtocolError::TooLarge { len, .. }))
                if config.tls.is_none() && is_tls_record(len) =>
            {
                return Err(ClientError::Tls {
                    addr: addr.to_owned(),
                    message: "the server speaks TLS; configure its CA (ClientTls, twinmq --tls-ca)".into(),
                })
            }
            Some(frame) => frame?,
            None => return Err(ClientError::Disconnected),
        };
        match answer {
            ServerFrame::Welcome { node_id, server_version, max_frame_bytes, protocol_version, ticket: fresh } => {
                if !SUPPORTED_VERSIONS.contains(protocol_version) {
                    return Err(ClientError::UnexpectedFrame(format!(
                        "{addr} chose protocol version {protocol_version}, which this client (versions \
                         {SUPPORTED_VERSIONS}) did not offer"
                    )));
                }
                link.framing.max_out = link.framing.max_out.min(max_frame_bytes as usize);
                // Everything after Welcome, both ways, at the chosen version.
                link.framing.version = protocol_version;
                link.reader.decoder_mut().set_version(protocol_version);
                debug!(addr, node_id, server_version, protocol_version, admin, "welcomed");
                let server =
                    ServerInfo { addr: addr.to_owned(), node_id, server_version, max_frame_bytes, protocol_version };
                if let (Some(fresh), Ok(mut slot)) = (fresh, ticket.lock()) {
                    *slot = Some(fresh);
                }
                Ok((link, server))
            }
            ServerFrame::NotActive { active_hint } => {
                Err(ClientError::NotActive { addr: addr.to_owned(), active_hint })
            }
            ServerFrame::Error(twinmq_protocol::ErrorFrame { versions: Some(v), .. }) => {
                Err(ClientError::NoCommonVersion {
                    addr: addr.to_owned(),
                    client: v.client.min..=v.client.max,
                    broker: v.broker.min..=v.broker.max,
                })
            }
            ServerFrame::Error(e) => {
                Err(ClientError::Broker { code: ErrorCode::from_wire(e.code), message: e.message })
            }
            other => Err(ClientError::UnexpectedFrame(format!("expected Welcome, got {}", frame_name(&other)))),
        }
    }

    /// Encode `frame` at the end of `buf`, within this link's frame limit and
    /// at its protocol version. On error (too large) nothing is added.
    pub(crate) fn encode(&self, frame: &ClientFrame, buf: &mut BytesMut) -> Result<(), ClientError> {
        self.framing.encode(frame, buf)
    }

    /// Encode and write one frame, waiting until it is written; for
    /// request/response use (handshake, admin), not for the data path.
    pub(crate) async fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        let mut buf = BytesMut::new();
        self.encode(frame, &mut buf)?;
        self.writer.write_all_buf(&mut buf).await.map_err(|e| {
            debug!(error = %e, "write failed");
            ClientError::Disconnected
        })
    }

    /// Write out `pending`, then half-close: the broker reads everything
    /// before it sees the end, and we can still read what it sends.
    pub(crate) async fn finish(&mut self, pending: &mut BytesMut, grace: Duration) {
        let flush = async {
            self.writer.write_all_buf(pending).await?;
            self.writer.shutdown().await
        };
        match tokio::time::timeout(grace, flush).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "could not finish the connection cleanly"),
            Err(_) => debug!("timed out writing the last frames"),
        }
    }
}

/// Which error codes make trying another address pointless.
/// Whether a frame length prefix is really the start of a TLS record
/// (content type alert or handshake, protocol version 3.x).
fn is_tls_record(len: usize) -> bool {
    let bytes = (len as u32).to_be_bytes();
    matches!(bytes[0], 0x15 | 0x16) && bytes[1] == 0x03
}

/// A TLS failure is a configuration problem (see `tls.rs`), as final as wrong credentials.
pub(crate) fn is_final(err: &ClientError) -> bool {
    matches!(
        err,
        ClientError::Broker { code: ErrorCode::NotAuthenticated, .. }
            | ClientError::Tls { .. }
            | ClientError::TlsSetup { .. }
    )
}

/// A frame's variant name, for logs and errors: never its payload.
pub(crate) fn frame_name(frame: &ServerFrame) -> &'static str {
    match frame {
        ServerFrame::Welcome { .. } => "Welcome",
        ServerFrame::NotActive { .. } => "NotActive",
        ServerFrame::Confirm { .. } => "Confirm",
        ServerFrame::Subscribed { .. } => "Subscribed",
        ServerFrame::Deliver { .. } => "Deliver",
        ServerFrame::ConsumerClosed { .. } => "ConsumerClosed",
        ServerFrame::StatusReply { .. } => "StatusReply",
        ServerFrame::Done { .. } => "Done",
        ServerFrame::AdminReply { .. } => "AdminReply",
        ServerFrame::Pong { .. } => "Pong",
        ServerFrame::Error(_) => "Error",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn a_tls_alert_is_recognised_in_a_length_prefix() {
        assert!(is_tls_record(0x1503_0300), "alert, TLS 1.2 record version");
        assert!(is_tls_record(0x1603_0100), "handshake");
        assert!(!is_tls_record(4096));
        assert!(!is_tls_record(0x0503_0300));
    }

    #[test]
    fn only_refused_credentials_are_final() {
        let broker = |code| ClientError::Broker { code, message: String::new() };
        assert!(is_final(&broker(ErrorCode::NotAuthenticated)));
        assert!(!is_final(&broker(ErrorCode::NotActive)));
        assert!(!is_final(&ClientError::NotActive { addr: "a".into(), active_hint: None }));
        assert!(!is_final(&ClientError::Disconnected));
        assert!(is_final(&ClientError::Tls { addr: "a".into(), message: "unknown issuer".into() }));
    }
}
