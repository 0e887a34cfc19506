//! STOMP 1.2 frames and their codec, for the broker's STOMP listener.
//!
//! A frame on the wire is `COMMAND EOL`, header lines `name:value EOL`, a
//! blank line, the body, and a NUL; EOL is `\n` or `\r\n`. Between frames any
//! number of EOLs may come: those are heart-beats, and the decoder yields a
//! [`StompItem::Heartbeat`] for each so that the listener can note that the
//! peer is alive. [`StompCodec`] decodes and encodes these for tokio-util's
//! `FramedRead`/`FramedWrite`; like [`crate::codec`] it is pure (bytes in,
//! items out) and the listener owns the socket.
//!
//! What the decoder follows from the specification
//! (<https://stomp.github.io/stomp-specification-1.2.html>):
//! - Commands are the fifteen of [`Command`], upper case, matched exactly.
//! - Header names and values are escaped (`\r`, `\n`, `\c` for `:`, `\\`) in
//!   every frame but CONNECT and CONNECTED, which carry them raw so that 1.0
//!   peers can read them; any other escape is an error.
//! - A header line is split at its first `:`. A raw `:` in a value is
//!   accepted (1.2 wants it escaped, and some clients do not), nothing is
//!   trimmed, and repeated headers are all kept in order: the first one is
//!   the one that counts ([`StompFrame::get`]), content-length included.
//! - With `content-length` the body is exactly that many bytes and must be
//!   followed by a NUL, so it may hold NULs itself; without it the body runs
//!   to the first NUL.
//!
//! Where it is lenient: an empty header name is kept; a lone CR inside a line
//! is data, not an EOL.
//!
//! # Limits, and why they are checked as bytes arrive
//!
//! A peer that never sends the EOL, blank line or NUL that ends what it
//! started would otherwise make the read buffer grow without bound. So
//! [`StompLimits`] are enforced on the bytes seen so far, not on a finished
//! frame: a frame's bytes are refused as soon as they pass
//! `max_frame_bytes` (when the terminator is not among the first
//! `max_frame_bytes` bytes), a header line as soon as it passes
//! `max_header_bytes`, a command line past the longest command at once, the
//! headers as they are counted, and a `content-length` larger than the frame
//! limit when its header line arrives, before any of the body is buffered.
//! The buffer a decoder waits on therefore never holds more than
//! `max_frame_bytes` of the frame, plus whatever one read brought after it.
//! The decoder also keeps its place between calls (the line or body it is in
//! and how far it has looked), so a large body arriving in small reads is
//! scanned once, not once per read.
//!
//! # What it leaves to the listener
//!
//! Version negotiation and which escaping a 1.1 peer understands (1.1 has no
//! `\r`), heart-beat timing, which commands a client may send and which
//! headers each needs, that only SEND, MESSAGE and ERROR carry a body,
//! receipts, and turning a [`StompError`] into an ERROR frame: every
//! refusal's `Display` is one short line fit for its `message` header, after
//! which the connection is to be closed (the decoder's place in the stream
//! is lost). The encoder refuses nothing: the broker builds the frames it
//! sends; what it does to keep a frame well formed whatever it holds is
//! described at [`StompCodec`]'s `Encoder` impl.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// The longest command line (without its EOL) that is looked at before the
/// line is refused as an unknown command: longer than any command
/// (UNSUBSCRIBE, 11 bytes), and short enough to quote in the refusal.
const MAX_COMMAND_LINE: usize = 32;

/// How many bytes of a refused line, command or value a [`StompError`] quotes.
const QUOTE_BYTES: usize = 32;

/// A STOMP command: the first line of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Command {
    Connect,
    Stomp,
    Connected,
    Send,
    Subscribe,
    Unsubscribe,
    Ack,
    Nack,
    Begin,
    Commit,
    Abort,
    Disconnect,
    Message,
    Receipt,
    Error,
}

impl Command {
    /// The command as it is written on the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            Command::Connect => "CONNECT",
            Command::Stomp => "STOMP",
            Command::Connected => "CONNECTED",
            Command::Send => "SEND",
            Command::Subscribe => "SUBSCRIBE",
            Command::Unsubscribe => "UNSUBSCRIBE",
            Command::Ack => "ACK",
            Command::Nack => "NACK",
            Command::Begin => "BEGIN",
            Command::Commit => "COMMIT",
            Command::Abort => "ABORT",
            Command::Disconnect => "DISCONNECT",
            Command::Message => "MESSAGE",
            Command::Receipt => "RECEIPT",
            Command::Error => "ERROR",
        }
    }

    fn parse(line: &[u8]) -> Option<Command> {
        Some(match line {
            b"CONNECT" => Command::Connect,
            b"STOMP" => Command::Stomp,
            b"CONNECTED" => Command::Connected,
            b"SEND" => Command::Send,
            b"SUBSCRIBE" => Command::Subscribe,
            b"UNSUBSCRIBE" => Command::Unsubscribe,
            b"ACK" => Command::Ack,
            b"NACK" => Command::Nack,
            b"BEGIN" => Command::Begin,
            b"COMMIT" => Command::Commit,
            b"ABORT" => Command::Abort,
            b"DISCONNECT" => Command::Disconnect,
            b"MESSAGE" => Command::Message,
            b"RECEIPT" => Command::Receipt,
            b"ERROR" => Command::Error,
            _ => return None,
        })
    }

    /// CONNECT and CONNECTED carry their headers unescaped, so that a STOMP
    /// 1.0 peer (which knows no escapes) can read them; every other frame
    /// escapes.
    fn escapes_headers(self) -> bool {
        !matches!(self, Command::Connect | Command::Connected)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One STOMP frame, headers unescaped and in wire order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StompFrame {
    pub command: Command,
    /// Every header line in the order it came, repeats included: STOMP 1.2
    /// says only the first of a name is used, which [`StompFrame::get`] does.
    pub headers: Vec<(String, String)>,
    /// On a decoded frame, a slice of the read buffer (no copy).
    pub body: Bytes,
}

impl StompFrame {
    /// A frame with no headers and an empty body.
    pub fn new(command: Command) -> Self {
        StompFrame { command, headers: Vec::new(), body: Bytes::new() }
    }

    /// Append a header (after any of the same name, which would win).
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    /// The value of the first header called `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Set the body. The encoder writes the matching `content-length`.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }
}

/// What the decoder yields, and the encoder takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StompItem {
    Frame(StompFrame),
    /// An EOL between frames: the peer is alive. Encoded as `\n`.
    Heartbeat,
}

/// How much one frame may make the decoder hold (see the module doc for
/// when each is checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StompLimits {
    /// Largest frame, from the first byte of its command to its NUL.
    pub max_frame_bytes: usize,
    /// Most header lines in one frame, repeats included.
    pub max_headers: usize,
    /// Longest header line, without its EOL, as it is on the wire (escaped).
    pub max_header_bytes: usize,
}

impl Default for StompLimits {
    /// Room for a 1 MiB body with 64 KiB of command and headers; as many
    /// headers as a native message may carry ([`crate::MAX_HEADERS`]), since
    /// a SEND's headers become the message's; 8 KiB per header line.
    fn default() -> Self {
        StompLimits {
            max_frame_bytes: 1024 * 1024 + 64 * 1024,
            max_headers: crate::MAX_HEADERS,
            max_header_bytes: 8 * 1024,
        }
    }
}

/// Why bytes could not become a STOMP frame. Each `Display` is one short
/// line a client can be sent as an ERROR frame's `message` header; what came
/// from the peer is quoted escaped and cut to a few bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StompError {
    /// The first line of a frame is none of the STOMP commands.
    #[error("unknown command {name:?}")]
    UnknownCommand { name: String },
    #[error("header line without ':': {line:?}")]
    MissingColon { line: String },
    #[error("more than {limit} headers")]
    TooManyHeaders { limit: usize },
    #[error("header line longer than {limit} bytes")]
    HeaderTooLong { limit: usize },
    /// The frame, or the body its `content-length` announces, passes the limit.
    #[error("frame larger than {limit} bytes")]
    FrameTooLarge { limit: usize },
    /// The first `content-length` is not a decimal byte count.
    #[error("bad content-length {value:?}")]
    BadContentLength { value: String },
    #[error("body of content-length {content_length} not followed by NUL")]
    MissingNul { content_length: usize },
    #[error("header line is not valid UTF-8")]
    InvalidUtf8,
    /// A NUL in a header line: every client takes a NUL as the end of a
    /// frame, so one passed on in a MESSAGE would let its sender forge frames.
    #[error("NUL in a header line")]
    NulInHeader,
    /// A `\` in an escaped header not followed by `r`, `n`, `c` or `\`.
    #[error("bad escape sequence {sequence} in a header (only \\r \\n \\c \\\\ are defined)")]
    BadEscape { sequence: String },
    /// From the transport, or the stream ended inside a frame.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Decodes [`StompItem`]s from a byte stream and encodes them onto one.
#[derive(Debug)]
pub struct StompCodec {
    limits: StompLimits,
    /// How far the decoder got into the frame at the front of the buffer,
    /// so that a call looks only at bytes the previous ones had not seen.
    partial: Partial,
}

/// Decoder progress through the frame that starts at the buffer's front.
/// Offsets are from that front.
#[derive(Debug, Default)]
struct Partial {
    stage: Stage,
    /// Where the line being read starts (command and header stages).
    line_start: usize,
    /// The bytes before this hold no terminator the current stage looks for.
    scan: usize,
    headers: Vec<(String, String)>,
    /// From the first `content-length` header, once parsed.
    content_length: Option<usize>,
}

#[derive(Debug, Default)]
enum Stage {
    /// Reading the command line; an empty one is a heart-beat.
    #[default]
    Command,
    Headers {
        command: Command,
    },
    /// The body starts at `start`; `len` is the content-length, if one came.
    Body {
        command: Command,
        start: usize,
        len: Option<usize>,
    },
}

impl StompCodec {
    pub fn new(limits: StompLimits) -> Self {
        StompCodec { limits, partial: Partial::default() }
    }

    /// One step of decoding; `decode` forgets the progress on an error.
    fn decode_item(&mut self, src: &mut BytesMut) -> Result<Option<StompItem>, StompError> {
        let max = self.limits.max_frame_bytes;
        let p = &mut self.partial;
        loop {
            match p.stage {
                Stage::Command => {
                    // The LF may sit after the longest line looked at and its CR.
                    let end = MAX_COMMAND_LINE + 2;
                    let Some(lf) = find(src, p.scan, end, b'\n') else {
                        if src.len() >= end {
                            return Err(unknown_command(src));
                        }
                        p.scan = src.len();
                        return Ok(None);
                    };
                    let line = strip_cr(src.get(..lf).unwrap_or_default());
                    if line.is_empty() {
                        src.advance(lf + 1);
                        *p = Partial::default();
                        return Ok(Some(StompItem::Heartbeat));
                    }
                    let command = Command::parse(line).ok_or_else(|| unknown_command(line))?;
                    p.stage = Stage::Headers { command };
                    p.line_start = lf + 1;
                    p.scan = lf + 1;
                }
                Stage::Headers { command } => {
                    let start = p.line_start;
                    // The LF may come after max_header_bytes and a CR, and
                    // must come before the frame limit (the NUL follows it).
                    let natural = start.saturating_add(self.limits.max_header_bytes).saturating_add(2);
                    let end = natural.min(max);
                    let Some(lf) = find(src, p.scan, end, b'\n') else {
                        if src.len() >= end {
                            return Err(if end == natural {
                                StompError::HeaderTooLong { limit: self.limits.max_header_bytes }
                            } else {
                                StompError::FrameTooLarge { limit: max }
                            });
                        }
                        p.scan = src.len();
                        return Ok(None);
                    };
                    let line = strip_cr(src.get(start..lf).unwrap_or_default());
                    if line.len() > self.limits.max_header_bytes {
                        return Err(StompError::HeaderTooLong { limit: self.limits.max_header_bytes });
                    }
                    p.line_start = lf + 1;
                    p.scan = lf + 1;
                    if line.is_empty() {
                        let start = lf + 1;
                        if let Some(len) = p.content_length {
                            // The body and its NUL must fit: refused before any of it is read.
                            let end = start.saturating_add(len).saturating_add(1);
                            if end > max {
                                return Err(StompError::FrameTooLarge { limit: max });
                            }
                            src.reserve(end.saturating_sub(src.len()));
                        }
                        p.stage = Stage::Body { command, start, len: p.content_length };
                        continue;
                    }
                    if p.headers.len() >= self.limits.max_headers {
                        return Err(StompError::TooManyHeaders { limit: self.limits.max_headers });
                    }
                    let (name, value) = parse_header(line, command.escapes_headers())?;
                    if p.content_length.is_none() && name == "content-length" {
                        let len = byte_count(&value).ok_or_else(|| StompError::BadContentLength {
                            value: value.chars().take(QUOTE_BYTES).collect(),
                        })?;
                        if len >= max {
                            return Err(StompError::FrameTooLarge { limit: max });
                        }
                        p.content_length = Some(len);
                    }
                    p.headers.push((name, value));
                }
                Stage::Body { command, start, len } => {
                    let nul = match len {
                        // start + len < max: checked when the blank line came.
                        Some(len) => match src.get(start + len) {
                            None => return Ok(None),
                            Some(0) => start + len,
                            Some(_) => return Err(StompError::MissingNul { content_length: len }),
                        },
                        None => match find(src, p.scan.max(start), max, 0) {
                            Some(nul) => nul,
                            None if src.len() >= max => return Err(StompError::FrameTooLarge { limit: max }),
                            None => {
                                p.scan = src.len();
                                return Ok(None);
                            }
                        },
                    };
                    // start <= nul < src.len(): the NUL is at or after the body's start.
                    let mut frame = src.split_to(nul + 1);
                    frame.truncate(nul);
                    let body = frame.split_off(start).freeze();
                    let headers = std::mem::take(&mut p.headers);
                    *p = Partial::default();
                    return Ok(Some(StompItem::Frame(StompFrame { command, headers, body })));
                }
            }
        }
    }
}

impl Default for StompCodec {
    fn default() -> Self {
        StompCodec::new(StompLimits::default())
    }
}

impl Decoder for StompCodec {
    type Item = StompItem;
    type Error = StompError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<StompItem>, StompError> {
        let item = self.decode_item(src);
        if item.is_err() {
            // The stream cannot be resynchronised; a reused codec starts afresh.
            self.partial = Partial::default();
        }
        item
    }
}

/// Encoding refuses nothing and never produces a malformed frame:
/// - Headers are escaped, except in CONNECT and CONNECTED. There they are
///   written raw, but an LF (which would end the line and let a value forge
///   headers) is written `\n`, a `:` in a name `\c`, and a value ending in
///   CR gets a CRLF so that its CR is not taken for part of the EOL.
/// - `content-length` is written for a non-empty body unless the frame has
///   one; a first `content-length` that does not give the body's length is
///   written with the length instead (the body is what is sent).
impl Encoder<StompItem> for StompCodec {
    type Error = StompError;

    fn encode(&mut self, item: StompItem, dst: &mut BytesMut) -> Result<(), StompError> {
        match item {
            StompItem::Heartbeat => dst.put_u8(b'\n'),
            StompItem::Frame(frame) => encode_frame(&frame, dst),
        }
        Ok(())
    }
}

fn encode_frame(frame: &StompFrame, dst: &mut BytesMut) {
    let escape = frame.command.escapes_headers();
    let body_len = frame.body.len();
    let headers: usize = frame.headers.iter().map(|(n, v)| n.len() + v.len() + 2).sum();
    // Escapes may add a little; this is the usual size (and 40 for content-length).
    dst.reserve(frame.command.as_str().len() + headers + body_len + 40);
    dst.put_slice(frame.command.as_str().as_bytes());
    dst.put_u8(b'\n');
    let mut has_length = false;
    for (name, value) in &frame.headers {
        if !has_length && name == "content-length" {
            has_length = true;
            if byte_count(value) != Some(body_len) {
                put_header(dst, name, &body_len.to_string(), escape);
                continue;
            }
        }
        put_header(dst, name, value, escape);
    }
    if !has_length && body_len > 0 {
        put_header(dst, "content-length", &body_len.to_string(), escape);
    }
    dst.put_u8(b'\n');
    dst.put_slice(&frame.body);
    dst.put_u8(0);
}

fn put_header(dst: &mut BytesMut, name: &str, value: &str, escape: bool) {
    if escape {
        put_escaped(dst, name);
        dst.put_u8(b':');
        put_escaped(dst, value);
    } else {
        put_raw(dst, name, true);
        dst.put_u8(b':');
        put_raw(dst, value, false);
        if value.ends_with('\r') {
            dst.put_u8(b'\r');
        }
    }
    dst.put_u8(b'\n');
}

/// What a NUL in a header becomes on the wire (STOMP has no escape for it,
/// and a NUL would end the frame): U+FFFD, the replacement character.
const NUL_REPLACEMENT: &[u8] = "\u{fffd}".as_bytes();

fn put_escaped(dst: &mut BytesMut, text: &str) {
    for &b in text.as_bytes() {
        match b {
            0 => dst.put_slice(NUL_REPLACEMENT),
            b'\\' => dst.put_slice(b"\\\\"),
            b'\r' => dst.put_slice(b"\\r"),
            b'\n' => dst.put_slice(b"\\n"),
            b':' => dst.put_slice(b"\\c"),
            _ => dst.put_u8(b),
        }
    }
}

/// CONNECT/CONNECTED: as is, but for what would break the line.
fn put_raw(dst: &mut BytesMut, text: &str, is_name: bool) {
    for &b in text.as_bytes() {
        match b {
            0 => dst.put_slice(NUL_REPLACEMENT),
            b'\n' => dst.put_slice(b"\\n"),
            b':' if is_name => dst.put_slice(b"\\c"),
            _ => dst.put_u8(b),
        }
    }
}

/// The index of the first `byte` in `src[from..to]` (clipped to `src`).
fn find(src: &[u8], from: usize, to: usize, byte: u8) -> Option<usize> {
    let window = src.get(from..to.min(src.len()))?;
    window.iter().position(|&b| b == byte).map(|i| from + i)
}

/// A line without the CR of a CRLF.
fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn quote(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes.get(..QUOTE_BYTES).unwrap_or(bytes)).into_owned()
}

fn unknown_command(line: &[u8]) -> StompError {
    StompError::UnknownCommand { name: quote(line) }
}

/// A decimal byte count; a count too large for `usize` is `usize::MAX`
/// (larger than any limit, so refused as such).
fn byte_count(value: &str) -> Option<usize> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Only digits: parsing fails only on overflow.
    Some(value.parse().unwrap_or(usize::MAX))
}

/// A header line (no EOL) as name and value, split at the first raw `:`.
fn parse_header(line: &[u8], escaped: bool) -> Result<(String, String), StompError> {
    if line.contains(&0) {
        return Err(StompError::NulInHeader);
    }
    let text = std::str::from_utf8(line).map_err(|_| StompError::InvalidUtf8)?;
    let Some((name, value)) = text.split_once(':') else {
        return Err(StompError::MissingColon { line: quote(line) });
    };
    if escaped {
        Ok((unescape(name)?, unescape(value)?))
    } else {
        Ok((name.to_owned(), value.to_owned()))
    }
}

fn unescape(text: &str) -> Result<String, StompError> {
    if !text.contains('\\') {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next() {
            Some('r') => '\r',
            Some('n') => '\n',
            Some('c') => ':',
            Some('\\') => '\\',
            Some(other) if other.is_ascii_graphic() => {
                return Err(StompError::BadEscape { sequence: format!("\\{other}") })
            }
            Some(other) => return Err(StompError::BadEscape { sequence: format!("\\ followed by {other:?}") }),
            None => return Err(StompError::BadEscape { sequence: "\\ at the end".to_owned() }),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: [Command; 15] = [
        Command::Connect,
        Command::Stomp,
        Command::Connected,
        Command::Send,
        Command::Subscribe,
        Command::Unsubscribe,
        Command::Ack,
        Command::Nack,
        Command::Begin,
        Command::Commit,
        Command::Abort,
        Command::Disconnect,
        Command::Message,
        Command::Receipt,
        Command::Error,
    ];

    fn small() -> StompLimits {
        StompLimits { max_frame_bytes: 256, max_headers: 4, max_header_bytes: 32 }
    }

    fn encode(item: StompItem) -> BytesMut {
        let mut wire = BytesMut::new();
        StompCodec::default().encode(item, &mut wire).unwrap();
        wire
    }

    fn frame(item: Option<StompItem>) -> StompFrame {
        match item {
            Some(StompItem::Frame(f)) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Everything `wire` decodes to, fed `piece` bytes at a time, and the
    /// error that ended it if one did.
    fn decode_all(limits: StompLimits, wire: &[u8], piece: usize) -> (Vec<StompItem>, Option<String>) {
        let mut codec = StompCodec::new(limits);
        let mut src = BytesMut::new();
        let mut items = Vec::new();
        for chunk in wire.chunks(piece.max(1)) {
            src.extend_from_slice(chunk);
            loop {
                match codec.decode(&mut src) {
                    Ok(Some(item)) => items.push(item),
                    Ok(None) => break,
                    Err(e) => return (items, Some(e.to_string())),
                }
            }
        }
        (items, None)
    }

    fn decode_one(wire: &[u8]) -> Result<Option<StompItem>, StompError> {
        StompCodec::default().decode(&mut BytesMut::from(wire))
    }

    fn decode_err(limits: StompLimits, wire: &[u8]) -> StompError {
        let mut codec = StompCodec::new(limits);
        let mut src = BytesMut::from(wire);
        loop {
            match codec.decode(&mut src) {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("no error for {wire:?}"),
                Err(e) => {
                    let message = e.to_string();
                    assert!(!message.contains(['\n', '\r']) && message.len() <= 120, "unfit message: {message}");
                    return e;
                }
            }
        }
    }

    #[test]
    fn every_command_round_trips() {
        for command in ALL {
            assert_eq!(Command::parse(command.as_str().as_bytes()), Some(command));
            let sent = StompFrame::new(command).header("receipt", "r-1").header("x", "y").body(&b"body"[..]);
            let wire = encode(StompItem::Frame(sent.clone()));
            let mut src = wire.clone();
            let got = frame(StompCodec::default().decode(&mut src).unwrap());
            assert!(src.is_empty());
            assert_eq!(got, sent.clone().header("content-length", "4"), "{command}");
            // Re-encoding the decoded frame gives the same bytes: content-length is not added twice.
            assert_eq!(encode(StompItem::Frame(got)), wire);
        }
    }

    #[test]
    fn heartbeat_encodes_as_a_newline() {
        assert_eq!(&encode(StompItem::Heartbeat)[..], b"\n");
    }

    #[test]
    fn escaped_headers_decode() {
        let got = frame(decode_one(b"SEND\na\\cb:1\\n2\\r3\\\\4\\c5\n\n\0").unwrap());
        assert_eq!(got.headers, vec![("a:b".to_string(), "1\n2\r3\\4:5".to_string())]);
    }

    #[test]
    fn headers_are_escaped_on_encode() {
        let wire = encode(StompItem::Frame(StompFrame::new(Command::Message).header("a:b", "1\n2\r3\\4:5")));
        assert_eq!(&wire[..], b"MESSAGE\na\\cb:1\\n2\\r3\\\\4\\c5\n\n\0");
        assert_eq!(frame(decode_one(&wire).unwrap()).get("a:b"), Some("1\n2\r3\\4:5"));
    }

    #[test]
    fn connect_and_connected_headers_are_not_escaped() {
        let got = frame(decode_one(b"CONNECT\nlogin:a\\nb\\t\npasscode:x:y\n\n\0").unwrap());
        assert_eq!(got.get("login"), Some("a\\nb\\t"));
        assert_eq!(got.get("passcode"), Some("x:y"));
        let sent = StompFrame::new(Command::Connected).header("server", "twinmq\\1:2");
        let wire = encode(StompItem::Frame(sent.clone()));
        assert_eq!(&wire[..], b"CONNECTED\nserver:twinmq\\1:2\n\n\0");
        assert_eq!(frame(decode_one(&wire).unwrap()), sent);
    }

    #[test]
    fn connected_values_cannot_forge_headers() {
        let sent = StompFrame::new(Command::Connected).header("server", "x\nsession:forged").header("v", "cr\r");
        let wire = encode(StompItem::Frame(sent));
        assert_eq!(&wire[..], b"CONNECTED\nserver:x\\nsession:forged\nv:cr\r\r\n\n\0");
        let got = frame(decode_one(&wire).unwrap());
        assert_eq!(got.get("session"), None);
        assert_eq!(got.get("v"), Some("cr\r"));
    }

    #[test]
    fn raw_colon_in_a_value_is_accepted_and_escaped_on_the_way_out() {
        let got = frame(decode_one(b"SEND\ndestination:/queue/a:b\n\n\0").unwrap());
        assert_eq!(got.get("destination"), Some("/queue/a:b"));
        assert_eq!(&encode(StompItem::Frame(got))[..], b"SEND\ndestination:/queue/a\\cb\n\n\0");
    }

    #[test]
    fn whitespace_and_empty_values_are_kept() {
        let got = frame(decode_one(b"SEND\n key : value \nempty:\n\n\0").unwrap());
        assert_eq!(got.headers, vec![(" key ".into(), " value ".into()), ("empty".into(), String::new())]);
    }

    #[test]
    fn repeated_headers_are_kept_and_the_first_wins() {
        let got = frame(decode_one(b"MESSAGE\nfoo:1\nfoo:2\ncontent-length:2\ncontent-length:9\n\nab\0").unwrap());
        assert_eq!(got.get("foo"), Some("1"));
        assert_eq!(got.headers.len(), 4);
        assert_eq!(&got.body[..], b"ab");
    }

    #[test]
    fn content_length_body_may_hold_nuls() {
        let mut src = BytesMut::from(&b"SEND\ncontent-length:5\n\na\0b\0c\0SEND\n\n\0"[..]);
        let mut codec = StompCodec::default();
        assert_eq!(&frame(codec.decode(&mut src).unwrap()).body[..], b"a\0b\0c");
        assert_eq!(frame(codec.decode(&mut src).unwrap()), StompFrame::new(Command::Send));
        assert!(src.is_empty());
    }

    #[test]
    fn body_without_content_length_runs_to_the_first_nul() {
        let mut src = BytesMut::from(&b"SEND\ndestination:/queue/q\n\nhello\0world\0"[..]);
        let mut codec = StompCodec::default();
        let got = frame(codec.decode(&mut src).unwrap());
        assert_eq!(&got.body[..], b"hello");
        assert_eq!(got.headers.len(), 1);
        // What follows is taken for the start of the next frame (its command line has not ended).
        assert!(codec.decode(&mut src).unwrap().is_none());
        assert_eq!(&src[..], b"world\0");
    }

    #[test]
    fn encoder_writes_one_correct_content_length() {
        let with_body = |f: StompFrame| encode(StompItem::Frame(f.body(&b"abc"[..])));
        assert_eq!(&with_body(StompFrame::new(Command::Send))[..], b"SEND\ncontent-length:3\n\nabc\0");
        let given = StompFrame::new(Command::Send).header("content-length", "3");
        assert_eq!(&with_body(given)[..], b"SEND\ncontent-length:3\n\nabc\0");
        let wrong = StompFrame::new(Command::Send).header("content-length", "7").header("content-length", "x");
        assert_eq!(&with_body(wrong)[..], b"SEND\ncontent-length:3\ncontent-length:x\n\nabc\0");
        assert_eq!(&encode(StompItem::Frame(StompFrame::new(Command::Receipt)))[..], b"RECEIPT\n\n\0");
    }

    #[test]
    fn crlf_line_endings() {
        let (items, err) = decode_all(
            StompLimits::default(),
            b"SEND\r\ndestination:/queue/q\r\ncontent-length:2\r\n\r\nhi\0\r\nACK\r\nid:1\r\n\r\n\0",
            usize::MAX,
        );
        assert_eq!(err, None);
        let send = StompFrame::new(Command::Send).header("destination", "/queue/q").header("content-length", "2");
        let ack = StompFrame::new(Command::Ack).header("id", "1");
        assert_eq!(items, vec![StompItem::Frame(send.body("hi")), StompItem::Heartbeat, StompItem::Frame(ack)]);
    }

    #[test]
    fn heartbeats_between_frames() {
        let (items, err) = decode_all(StompLimits::default(), b"\n\r\n\nDISCONNECT\n\n\0\n\n", usize::MAX);
        assert_eq!(err, None);
        let hb = StompItem::Heartbeat;
        let disconnect = StompItem::Frame(StompFrame::new(Command::Disconnect));
        assert_eq!(items, vec![hb.clone(), hb.clone(), hb.clone(), disconnect, hb.clone(), hb]);
    }

    #[test]
    fn crlf_heartbeat_split_across_reads() {
        let mut codec = StompCodec::default();
        let mut src = BytesMut::from(&b"\r"[..]);
        assert!(codec.decode(&mut src).unwrap().is_none());
        src.extend_from_slice(b"\n");
        assert_eq!(codec.decode(&mut src).unwrap(), Some(StompItem::Heartbeat));
        assert!(src.is_empty());
    }

    #[test]
    fn a_stream_fed_one_byte_at_a_time_decodes_identically() {
        let mut wire = BytesMut::new();
        let mut codec = StompCodec::default();
        let frames = [
            StompFrame::new(Command::Connect).header("accept-version", "1.2").header("host", "a:b"),
            StompFrame::new(Command::Send)
                .header("destination", "/queue/q")
                .header("k", "\r\n:\\")
                .body(&b"\0\n\0"[..]),
            StompFrame::new(Command::Subscribe).header("id", "0").header("destination", "/topic/t"),
        ];
        for f in &frames {
            codec.encode(StompItem::Heartbeat, &mut wire).unwrap();
            codec.encode(StompItem::Frame(f.clone()), &mut wire).unwrap();
        }
        wire.extend_from_slice(b"\r\nMESSAGE\r\nsubscription:0\r\n\r\nno length\0\r\n");
        let whole = decode_all(StompLimits::default(), &wire, usize::MAX);
        assert_eq!(whole.1, None);
        assert_eq!(whole.0.len(), 9);
        assert_eq!(decode_all(StompLimits::default(), &wire, 1), whole);
    }

    #[test]
    fn a_large_body_in_small_reads_is_scanned_once() {
        // Without a kept scan offset this is 64 Ki scans of up to 1 MiB: minutes, not milliseconds.
        let mut wire = b"SEND\n\n".to_vec();
        wire.resize(1024 * 1024, b'x');
        wire.push(0);
        let (items, err) = decode_all(StompLimits::default(), &wire, 16);
        assert_eq!(err, None);
        assert_eq!(frame(items.into_iter().next()).body.len(), 1024 * 1024 - 6);
    }

    #[test]
    fn unknown_command_is_refused_and_named() {
        let e = decode_err(small(), b"send\n\n\0");
        assert!(matches!(&e, StompError::UnknownCommand { name } if name == "send"), "{e}");
        assert_eq!(e.to_string(), "unknown command \"send\"");
        // A line longer than any command is refused before its end arrives, quoted in part.
        let e = decode_err(small(), &[b'A'; 100]);
        assert!(matches!(&e, StompError::UnknownCommand { name } if name.len() == QUOTE_BYTES), "{e}");
        let e = decode_err(small(), b"\x01\xff\r\r\n");
        assert_eq!(e.to_string(), "unknown command \"\\u{1}\u{fffd}\\r\"");
    }

    #[test]
    fn header_line_without_colon_is_refused() {
        let e = decode_err(small(), b"SEND\ndestination /queue/q\n\n\0");
        assert!(matches!(&e, StompError::MissingColon { line } if line == "destination /queue/q"), "{e}");
    }

    #[test]
    fn too_many_headers_are_refused_as_they_are_counted() {
        // The fifth header line is refused at once: the frame's end has not come.
        let e = decode_err(small(), b"SEND\na:1\nb:2\nc:3\nd:4\ne:5\n");
        assert!(matches!(e, StompError::TooManyHeaders { limit: 4 }), "{e}");
        let four =
            frame(StompCodec::new(small()).decode(&mut BytesMut::from(&b"SEND\na:\nb:\nc:\nd:\n\n\0"[..])).unwrap());
        assert_eq!(four.headers.len(), 4);
    }

    #[test]
    fn header_line_too_long_is_refused() {
        let mut wire = b"SEND\nk:".to_vec();
        wire.extend_from_slice(&[b'v'; 31]);
        wire.extend_from_slice(b"\n\n\0");
        assert!(matches!(decode_err(small(), &wire), StompError::HeaderTooLong { limit: 32 }));
        // 32 bytes and a CRLF fit.
        let fits = b"SEND\nk:123456789012345678901234567890\r\n\r\n\0";
        assert!(StompCodec::new(small()).decode(&mut BytesMut::from(&fits[..])).unwrap().is_some());
        // Without its EOL: refused once 34 bytes of the line are in.
        let mut codec = StompCodec::new(small());
        let mut src = BytesMut::from(&b"SEND\n"[..]);
        src.extend_from_slice(&[b'k'; 33]);
        assert!(codec.decode(&mut src).unwrap().is_none());
        src.extend_from_slice(b"k");
        assert!(matches!(codec.decode(&mut src), Err(StompError::HeaderTooLong { limit: 32 })));
    }

    #[test]
    fn frame_over_the_limit_is_refused() {
        let mut wire = b"SEND\n\n".to_vec();
        wire.extend_from_slice(&[b'x'; 250]);
        assert!(matches!(decode_err(small(), &wire), StompError::FrameTooLarge { limit: 256 }));
        // Exactly at the limit: accepted.
        let mut wire = b"SEND\n\n".to_vec();
        wire.extend_from_slice(&[b'x'; 249]);
        wire.push(0);
        assert_eq!(wire.len(), 256);
        assert!(StompCodec::new(small()).decode(&mut BytesMut::from(&wire[..])).unwrap().is_some());
    }

    #[test]
    fn bad_content_length_is_refused() {
        for value in ["", "abc", "-1", "+5", " 5", "5 ", "0x10", "1e3"] {
            let wire = format!("SEND\ncontent-length:{value}\n\n\0");
            let e = decode_err(small(), wire.as_bytes());
            assert!(matches!(&e, StompError::BadContentLength { value: v } if v == value), "{value:?}: {e}");
        }
    }

    #[test]
    fn content_length_over_the_limit_is_refused_before_the_body() {
        // The header line alone: refused before the blank line, let alone the body.
        let e = decode_err(small(), b"SEND\ncontent-length:1000\n");
        assert!(matches!(e, StompError::FrameTooLarge { limit: 256 }), "{e}");
        let long_lines = StompLimits { max_header_bytes: 100, ..small() };
        let e = decode_err(long_lines, b"SEND\ncontent-length:99999999999999999999999999\n");
        assert!(matches!(e, StompError::FrameTooLarge { limit: 256 }), "{e}");
        // Below the limit alone, over it with the headers: refused at the blank line.
        let e = decode_err(small(), b"SEND\ncontent-length:240\nfiller:0123456789\n\n");
        assert!(matches!(e, StompError::FrameTooLarge { limit: 256 }), "{e}");
    }

    #[test]
    fn content_length_reserves_the_body_once() {
        let mut codec = StompCodec::default();
        let mut src = BytesMut::from(&b"SEND\ncontent-length:100000\n\n"[..]);
        assert!(codec.decode(&mut src).unwrap().is_none());
        assert!(src.capacity() >= 100_000 + 29 && src.capacity() <= StompLimits::default().max_frame_bytes);
    }

    #[test]
    fn body_not_followed_by_nul_is_refused() {
        let e = decode_err(small(), b"SEND\ncontent-length:2\n\nabc\0");
        assert!(matches!(e, StompError::MissingNul { content_length: 2 }), "{e}");
    }

    #[test]
    fn invalid_utf8_in_a_header_is_refused() {
        assert!(matches!(decode_err(small(), b"SEND\nk:\xff\xfe\n\n\0"), StompError::InvalidUtf8));
        // In CONNECT too, though its headers are not unescaped.
        assert!(matches!(decode_err(small(), b"CONNECT\n\xc3:v\n\n\0"), StompError::InvalidUtf8));
    }

    #[test]
    fn a_nul_in_a_header_is_refused() {
        // A NUL ends a frame for every client: one in a header a producer sent
        // would end the MESSAGE a consumer gets there, and what follows would
        // read as a frame of the producer's making (a forged RECEIPT).
        let e = decode_err(small(), b"SEND\na:x\0RECEIPT\nreceipt-id:42\n\n\0");
        assert!(matches!(e, StompError::NulInHeader), "{e}");
        let e = decode_err(small(), b"CONNECT\nlo\0gin:a\n\n\0");
        assert!(matches!(e, StompError::NulInHeader), "in CONNECT too: {e}");
    }

    #[test]
    fn a_nul_never_leaves_the_encoder_in_a_header() {
        for command in [Command::Message, Command::Connected] {
            let sent = StompFrame::new(command).header("a\0b", "x\0RECEIPT").body(&b"body"[..]);
            let wire = encode(StompItem::Frame(sent));
            assert_eq!(wire.iter().filter(|&&b| b == 0).count(), 1, "only the frame's end: {wire:?}");
            let got = frame(decode_one(&wire).unwrap());
            assert_eq!(got.get("a\u{fffd}b"), Some("x\u{fffd}RECEIPT"));
        }
    }

    #[test]
    fn bad_escape_is_refused() {
        let e = decode_err(small(), b"SEND\nk:a\\tb\n\n\0");
        assert!(matches!(&e, StompError::BadEscape { sequence } if sequence == "\\t"), "{e}");
        assert_eq!(e.to_string(), "bad escape sequence \\t in a header (only \\r \\n \\c \\\\ are defined)");
        let e = decode_err(small(), b"SEND\nk\\:v\n\n\0");
        assert!(matches!(e, StompError::BadEscape { .. }), "a lone \\ ending the name: {e}");
        let e = decode_err(small(), b"SEND\nk:v\\\n\n\0");
        assert!(matches!(e, StompError::BadEscape { .. }), "a lone \\ ending the value: {e}");
        let e = decode_err(small(), b"SEND\nk:\\\x01\n\n\0");
        assert!(matches!(e, StompError::BadEscape { .. }), "{e}");
    }

    #[test]
    fn stream_ending_inside_a_frame_is_an_io_error() {
        let mut codec = StompCodec::default();
        let mut src = BytesMut::from(&b"SEND\ndestination:/queue/q\n\nhalf a bo"[..]);
        let e = codec.decode_eof(&mut src).unwrap_err();
        assert!(matches!(e, StompError::Io(_)), "{e}");
        assert!(!e.to_string().contains('\n'));
        // Heart-beats and whole frames before the end are fine.
        let mut src = BytesMut::from(&b"\nDISCONNECT\n\n\0\r\n"[..]);
        let mut codec = StompCodec::default();
        while let Some(_item) = codec.decode_eof(&mut src).unwrap() {}
        assert!(src.is_empty());
    }

    /// Feeds `total` bytes of `fill` after `start` in `chunk`-byte reads, as
    /// `FramedRead` would, and returns the error and how many bytes had been
    /// accepted (the most the buffer ever held) when it came.
    fn flood(limits: StompLimits, start: &[u8], fill: u8, total: usize, chunk: usize) -> (StompError, usize) {
        let mut codec = StompCodec::new(limits);
        let mut src = BytesMut::from(start);
        let mut fed = start.len();
        let block = vec![fill; chunk];
        while fed < total {
            match codec.decode(&mut src) {
                Ok(None) => {}
                Ok(Some(item)) => panic!("decoded {item:?} from a flood"),
                Err(e) => return (e, src.len()),
            }
            src.extend_from_slice(&block);
            fed += chunk;
        }
        panic!("10 MiB accepted without an error");
    }

    #[test]
    fn endless_header_line_is_refused_within_the_frame_limit() {
        let limits = StompLimits { max_frame_bytes: 64 * 1024, max_headers: 64, max_header_bytes: 1024 * 1024 };
        let (e, held) = flood(limits, b"SEND\nkey:", b'v', 10 * 1024 * 1024, 4096);
        assert!(matches!(e, StompError::FrameTooLarge { limit: 65536 }), "{e}");
        assert!(held <= 64 * 1024 + 4096, "held {held} bytes");
        // With the default per-line limit, the line's own limit comes first.
        let (e, held) = flood(StompLimits::default(), b"SEND\nkey:", b'v', 10 * 1024 * 1024, 4096);
        assert!(matches!(e, StompError::HeaderTooLong { limit: 8192 }), "{e}");
        assert!(held <= 8 * 1024 + 4096 + 10, "held {held} bytes");
    }

    #[test]
    fn endless_body_without_nul_is_refused_within_the_frame_limit() {
        let limits = StompLimits { max_frame_bytes: 64 * 1024, ..StompLimits::default() };
        let (e, held) = flood(limits, b"SEND\ndestination:/queue/q\n\n", b'x', 10 * 1024 * 1024, 4096);
        assert!(matches!(e, StompError::FrameTooLarge { limit: 65536 }), "{e}");
        assert!(held <= 64 * 1024 + 4096, "held {held} bytes");
    }

    #[test]
    fn endless_headers_are_refused_by_count() {
        // Short header lines, each well within every byte limit: the count stops them.
        let mut codec = StompCodec::default();
        let mut src = BytesMut::from(&b"SEND\n"[..]);
        let mut fed = 0;
        let err = loop {
            src.extend_from_slice(b"h:v\n");
            fed += 1;
            match codec.decode(&mut src) {
                Ok(None) => assert!(fed <= 10_000),
                Ok(Some(item)) => panic!("{item:?}"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, StompError::TooManyHeaders { limit: 64 }), "{err}");
        assert_eq!(fed, 65);
    }

    #[test]
    fn committed_fuzz_seeds_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/stomp_frame");
        let mut seeds = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let wire = std::fs::read(&path).unwrap();
            let (items, err) = decode_all(StompLimits::default(), &wire, usize::MAX);
            assert_eq!(err, None, "{}", path.display());
            assert!(!items.is_empty(), "{}", path.display());
            seeds += 1;
        }
        assert!(seeds >= 5);
    }

    fn text() -> impl Strategy<Value = String> {
        // The bytes escaping is about, some non-ASCII, and plain text (no
        // NUL: the encoder replaces it, see a_nul_never_leaves_the_encoder_in_a_header).
        "[a-z0-9:\\\\\r\n é€-]{0,12}"
    }

    fn any_frame() -> impl Strategy<Value = StompFrame> {
        (0..ALL.len(), prop::collection::vec((text(), text()), 0..6), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(i, headers, body)| {
                let command = ALL.get(i).copied().unwrap_or(Command::Send);
                let mut frame = StompFrame::new(command).body(body);
                for (name, value) in headers {
                    if command.escapes_headers() {
                        frame = frame.header(&name, value);
                    } else {
                        // Raw headers cannot hold an LF, nor a name a ':'.
                        frame = frame.header(&name.replace([':', '\n'], "_"), value.replace('\n', "_"));
                    }
                }
                frame
            })
            .prop_filter("content-length is the encoder's", |f| f.get("content-length").is_none())
    }

    fn fragment() -> impl Strategy<Value = &'static [u8]> {
        prop::sample::select(vec![
            &b"SEND\n"[..],
            b"CONNECT\n",
            b"MESSAGE\r\n",
            b"content-length:3\n",
            b"content-length:x\n",
            b"k:v\n",
            b"k:a\\cb\\nc\\q\n",
            b"key",
            b"\\",
            b":",
            b"\n",
            b"\r\n",
            b"\r",
            b"\0",
            b"abc",
            b"\xff",
            b"0123456789abcdef",
        ])
    }

    proptest! {
        #[test]
        fn any_frame_round_trips_in_any_pieces(sent in any_frame(), piece in 1usize..40) {
            let wire = encode(StompItem::Frame(sent.clone()));
            let mut expected = sent.clone();
            if !sent.body.is_empty() {
                expected = expected.header("content-length", sent.body.len().to_string());
            }
            let (items, err) = decode_all(StompLimits::default(), &wire, piece);
            prop_assert_eq!(err, None);
            prop_assert_eq!(items, vec![StompItem::Frame(expected)]);
        }

        #[test]
        fn decoding_does_not_depend_on_how_the_bytes_arrive(
            parts in prop::collection::vec(fragment(), 0..40),
            piece in 1usize..20,
        ) {
            let wire = parts.concat();
            let limits = StompLimits { max_frame_bytes: 64, max_headers: 3, max_header_bytes: 16 };
            prop_assert_eq!(decode_all(limits, &wire, piece), decode_all(limits, &wire, usize::MAX));
        }
    }
}
