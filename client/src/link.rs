//! One TCP connection to one broker node: the handshake and the framing.
//!
//! The read half is a `FramedRead` with the shared [`FrameCodec`]; the write
//! side is a plain byte buffer that frames are encoded into and that the
//! connection task writes out whenever the socket takes bytes. Keeping the
//! two apart means that writing never stops reading: a broker that stops
//! reading until its outbound queue to us drains cannot deadlock with a
//! client that stops reading until its publishes are written.

use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, FramedRead};
use tracing::debug;
use twinmq_protocol::{encode_frame, ClientFrame, ErrorCode, FrameCodec, ProtocolError, ServerFrame};

use crate::{ClientConfig, ClientError};

/// What the node we are connected to said about itself in its `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// The address we connected to (as configured, or the hint that led here).
    pub addr: String,
    pub node_id: String,
    pub server_version: String,
    /// Largest frame the broker accepts.
    pub max_frame_bytes: u32,
}

/// An open, authenticated connection.
pub(crate) struct Link {
    pub(crate) reader: FramedRead<OwnedReadHalf, WholeFrames>,
    pub(crate) writer: OwnedWriteHalf,
    /// Encoded frames not written yet. The connection task stops taking new
    /// commands while this is above [`Link::HIGH_WATER`], which is what pushes
    /// back on producers when the socket is slower than they are.
    pub(crate) wbuf: BytesMut,
    /// Limit for frames we send: ours and the broker's, whichever is smaller.
    max_out: usize,
}

impl Link {
    pub(crate) const HIGH_WATER: usize = 256 * 1024;

    /// Connect to `addr`, say Hello and wait for the answer, all within
    /// `config.connect_timeout`.
    pub(crate) async fn open(addr: &str, config: &ClientConfig) -> Result<(Link, ServerInfo), ClientError> {
        let after = config.connect_timeout;
        match tokio::time::timeout(after, Self::open_inner(addr, config)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout { what: format!("connecting to {addr}"), after }),
        }
    }

    async fn open_inner(addr: &str, config: &ClientConfig) -> Result<(Link, ServerInfo), ClientError> {
        let connect_err = |source| ClientError::Connect { addr: addr.to_owned(), source };
        let stream = TcpStream::connect(addr).await.map_err(connect_err)?;
        // We batch writes ourselves; Nagle would only add latency to confirms and acks.
        stream.set_nodelay(true).map_err(connect_err)?;
        let (read, writer) = stream.into_split();
        let mut link = Link {
            reader: FramedRead::new(read, WholeFrames::new(config.max_frame_bytes)),
            writer,
            wbuf: BytesMut::with_capacity(64 * 1024),
            max_out: config.max_frame_bytes,
        };
        link.queue(&ClientFrame::Hello {
            client_name: config.client_name.clone(),
            user: config.user.clone(),
            password: config.password.clone(),
        })?;
        link.writer.write_all_buf(&mut link.wbuf).await.map_err(connect_err)?;
        let answer = match link.reader.next().await {
            Some(frame) => frame?,
            None => return Err(ClientError::Disconnected),
        };
        match answer {
            ServerFrame::Welcome { node_id, server_version, max_frame_bytes } => {
                link.max_out = link.max_out.min(max_frame_bytes as usize);
                debug!(addr, node_id, server_version, "welcomed");
                Ok((link, ServerInfo { addr: addr.to_owned(), node_id, server_version, max_frame_bytes }))
            }
            ServerFrame::NotActive { active_hint } => {
                Err(ClientError::NotActive { addr: addr.to_owned(), active_hint })
            }
            ServerFrame::Error(e) => Err(ClientError::Broker { code: e.code, message: e.message }),
            other => Err(ClientError::UnexpectedFrame(format!("expected Welcome, got {}", frame_name(&other)))),
        }
    }

    /// Encode `frame` at the end of the write buffer. On error (too large)
    /// nothing is added.
    pub(crate) fn queue(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        Ok(encode_frame(frame, self.max_out, &mut self.wbuf)?)
    }

    /// Write out what is buffered, then half-close: the broker reads everything
    /// before it sees the end, and we can still read what it sends.
    pub(crate) async fn finish(&mut self, grace: Duration) {
        let flush = async {
            self.writer.write_all_buf(&mut self.wbuf).await?;
            self.writer.shutdown().await
        };
        match tokio::time::timeout(grace, flush).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "could not finish the connection cleanly"),
            Err(_) => debug!("timed out writing the last frames"),
        }
    }
}

/// [`FrameCodec`]'s decoder, fed only complete frames.
///
/// `FrameCodec::decode` checks the length prefix at the start of the buffer
/// on every call, but once its inner `LengthDelimitedCodec` has consumed a
/// header it waits for the rest of the body with the body at the start of the
/// buffer, and the check then reads body bytes as a length ("frame too
/// large") whenever a frame arrives in pieces. Handing it only whole frames
/// keeps the inner codec at a header on every call, where the check is right.
pub(crate) struct WholeFrames {
    codec: FrameCodec<ServerFrame, ClientFrame>,
}

impl WholeFrames {
    fn new(max_frame_bytes: usize) -> Self {
        WholeFrames { codec: FrameCodec::new(max_frame_bytes) }
    }
}

impl Decoder for WholeFrames {
    type Item = ServerFrame;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ServerFrame>, ProtocolError> {
        let Some(prefix) = src.get(..4) else { return Ok(None) };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len <= self.codec.max_frame_bytes() && src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        // Complete, or too large: the codec decodes it or refuses it.
        self.codec.decode(src)
    }
}

/// Which error codes make trying another address pointless.
pub(crate) fn is_final(err: &ClientError) -> bool {
    matches!(err, ClientError::Broker { code: ErrorCode::NotAuthenticated, .. })
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
        ServerFrame::Pong { .. } => "Pong",
        ServerFrame::Error(_) => "Error",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use tokio_util::codec::Encoder;
    use twinmq_protocol::{Delivered, Destination, MessageId};

    fn deliver(payload: Vec<u8>) -> ServerFrame {
        let message = Delivered {
            id: MessageId { epoch: 1, seq: 9 },
            destination: Destination::queue("q"),
            headers: Default::default(),
            payload,
            timestamp_ms: 1,
            expires_at_ms: None,
            persistent: true,
            redelivered: false,
            delivery_count: 0,
        };
        ServerFrame::Deliver { sub_id: 1, message }
    }

    #[test]
    fn frames_arriving_in_pieces_decode() {
        let mut wire = BytesMut::new();
        let mut encoder = FrameCodec::<ClientFrame, ServerFrame>::new(1 << 20);
        encoder.encode(deliver(vec![7; 3000]), &mut wire).unwrap();
        encoder.encode(ServerFrame::Pong { nonce: 3 }, &mut wire).unwrap();
        let mut decoder = WholeFrames::new(1 << 20);
        let mut src = BytesMut::new();
        let mut got = Vec::new();
        for chunk in wire.chunks(7) {
            src.extend_from_slice(chunk);
            while let Some(frame) = decoder.decode(&mut src).unwrap() {
                got.push(frame);
            }
        }
        assert_eq!(got, vec![deliver(vec![7; 3000]), ServerFrame::Pong { nonce: 3 }]);
    }

    #[test]
    fn an_oversized_length_is_refused_before_the_body_arrives() {
        let mut decoder = WholeFrames::new(1024);
        let mut src = BytesMut::from(&2048u32.to_be_bytes()[..]);
        assert!(matches!(decoder.decode(&mut src), Err(ProtocolError::TooLarge { len: 2048, max: 1024 })));
    }
}
