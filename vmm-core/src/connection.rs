//! Framing: turning a byte stream into JSON values and replies into lines.
//!
//! The old server treated one `read(4096)` as one request, so two requests in
//! one segment, a request split across segments, or a request over 4 KiB broke
//! the connection. Here [`FrameDecoder`] finds value boundaries itself: it
//! scans each byte once, tracking nesting and string state, and hands a
//! complete value to `serde_json`. Values may be pretty-printed over several
//! lines, separated by whitespace, or follow each other with no separator.

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;

use crate::protocol::Reply;

/// What the decoder found next in the input.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A complete, syntactically valid JSON value.
    Value(Value),
    /// A syntax error or bytes that are not UTF-8. The decoder has skipped the
    /// value and will skip the rest of its line, so the stream resynchronises
    /// at the next newline.
    Invalid,
    /// A value longer than the limit. The stream cannot be resynchronised
    /// safely, so the connection must be closed.
    TooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An object or array: ends when nesting returns to zero.
    Nested,
    /// A top-level string: ends at its closing quote.
    Str,
    /// A number, literal or garbage: ends at whitespace or punctuation.
    Scalar,
}

/// Incremental JSON value splitter. Pure (no I/O), so it can be fuzzed and
/// tested with arbitrary splits of the input.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_len: usize,
    /// Set once a value was too large: the stream cannot be resynchronised,
    /// so nothing more is decoded.
    overflowed: bool,
    /// Set while discarding the rest of a line after an invalid value.
    skipping_line: bool,
    /// The value being scanned, if its first byte has been seen.
    kind: Option<Kind>,
    /// How many bytes of the current value have been scanned.
    scanned: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

fn is_json_whitespace(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r')
}

/// A byte that ends a scalar (and is not part of it).
fn ends_scalar(byte: u8) -> bool {
    is_json_whitespace(byte) || matches!(byte, b'{' | b'}' | b'[' | b']' | b'"' | b',' | b':')
}

impl FrameDecoder {
    pub fn new(max_len: usize) -> FrameDecoder {
        FrameDecoder {
            max_len,
            overflowed: false,
            skipping_line: false,
            kind: None,
            scanned: 0,
            depth: 0,
            in_string: false,
            escaped: false,
        }
    }

    /// Takes the next frame off the front of `buf`, or returns `None` when more
    /// input is needed. Bytes that are consumed are removed from `buf`; a
    /// partial value stays in it.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Option<Frame> {
        if self.overflowed {
            buf.clear();
            return None;
        }
        if self.skipping_line {
            match buf.iter().position(|&b| b == b'\n') {
                Some(newline) => {
                    buf.advance(newline + 1);
                    self.skipping_line = false;
                }
                None => {
                    buf.clear();
                    return None;
                }
            }
        }
        if self.kind.is_none() {
            let start = buf.iter().position(|&b| !is_json_whitespace(b));
            let Some(start) = start else {
                buf.clear();
                return None;
            };
            buf.advance(start);
            self.kind = Some(match buf[0] {
                b'{' | b'[' => Kind::Nested,
                b'"' => Kind::Str,
                _ => Kind::Scalar,
            });
            self.scanned = 0;
            self.depth = 0;
            self.in_string = false;
            self.escaped = false;
        }
        let end = self.scan(buf)?;
        if end > self.max_len {
            return Some(self.too_large());
        }
        let value = buf.split_to(end);
        self.kind = None;
        match serde_json::from_slice::<Value>(&value) {
            Ok(value) => Some(Frame::Value(value)),
            Err(_) => {
                self.skipping_line = true;
                Some(Frame::Invalid)
            }
        }
    }

    /// Whether part of a value has arrived but not all of it.
    pub fn in_value(&self) -> bool {
        self.kind.is_some()
    }

    fn too_large(&mut self) -> Frame {
        self.overflowed = true;
        Frame::TooLarge
    }

    /// Scans new bytes of the current value; returns its length once complete.
    /// When the value outgrows the limit the caller sees `TooLarge` through
    /// `end > max_len` (complete) or through this returning the overflow
    /// sentinel (incomplete).
    fn scan(&mut self, buf: &BytesMut) -> Option<usize> {
        let kind = self.kind?;
        while self.scanned < buf.len() {
            let byte = buf[self.scanned];
            let position = self.scanned;
            self.scanned += 1;
            // The byte that ends a scalar is not part of it, so a scalar of
            // exactly `max_len` bytes is not too large.
            let ended = kind == Kind::Scalar && position > 0 && ends_scalar(byte);
            if self.scanned > self.max_len && !ended {
                // Report the overflow as a complete-but-too-long value so the
                // caller answers `request_too_large` without buffering more.
                return Some(self.scanned);
            }
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if byte == b'\\' {
                    self.escaped = true;
                } else if byte == b'"' {
                    self.in_string = false;
                    if kind == Kind::Str {
                        return Some(self.scanned);
                    }
                }
                continue;
            }
            match kind {
                Kind::Str => self.in_string = true, // the opening quote
                Kind::Nested => match byte {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth = self.depth.saturating_sub(1);
                        if self.depth == 0 {
                            return Some(self.scanned);
                        }
                    }
                    _ => {}
                },
                Kind::Scalar => {
                    if ended {
                        self.scanned = position;
                        return Some(position);
                    }
                }
            }
        }
        None
    }
}

/// The read half of a connection, plain TCP or TLS.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a connection, plain TCP or TLS.
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// One client connection: a decoder over the read half and a buffered write
/// half. Replies are flushed only when no further complete request is already
/// buffered, so a pipelining client gets its replies in few segments.
pub struct Connection {
    reader: ReadHalf,
    writer: BufWriter<WriteHalf>,
    buffer: BytesMut,
    decoder: FrameDecoder,
    /// How long a request may take to arrive once it has started.
    request_timeout: Option<Duration>,
    /// When the request now arriving started.
    partial_since: Option<Instant>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("buffered", &self.buffer.len())
            .field("decoder", &self.decoder)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A plain TCP connection.
    pub fn new(stream: TcpStream, max_request_bytes: usize) -> Connection {
        let (reader, writer) = stream.into_split();
        Connection::from_halves(Box::new(reader), Box::new(writer), max_request_bytes)
    }

    /// A connection over a TLS stream whose handshake is done (or over any
    /// other byte stream).
    pub fn tls<S>(stream: S, max_request_bytes: usize) -> Connection
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(stream);
        Connection::from_halves(Box::new(reader), Box::new(writer), max_request_bytes)
    }

    fn from_halves(reader: ReadHalf, writer: WriteHalf, max_request_bytes: usize) -> Connection {
        Connection {
            reader,
            writer: BufWriter::new(writer),
            buffer: BytesMut::with_capacity(4096),
            decoder: FrameDecoder::new(max_request_bytes),
            request_timeout: None,
            partial_since: None,
        }
    }

    /// Makes [`Connection::read_frame`] fail with `TimedOut` when a request
    /// that has started arriving is not complete within `limit`: a client
    /// that trickles bytes (or stops halfway) cannot hold a connection.
    pub fn with_request_timeout(mut self, limit: Option<Duration>) -> Connection {
        self.request_timeout = limit;
        self
    }

    /// Returns a frame that is already buffered, without reading.
    pub fn buffered_frame(&mut self) -> Option<Frame> {
        self.decoder.decode(&mut self.buffer)
    }

    /// Reads until a frame is complete. `Ok(None)` is a clean end of stream.
    /// Cancel safe: bytes read before a cancellation stay in the buffer.
    pub async fn read_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buffer) {
                self.partial_since = None;
                return Ok(Some(frame));
            }
            if self.decoder.in_value() {
                self.partial_since.get_or_insert_with(Instant::now);
            }
            self.buffer.reserve(4096);
            let read = self.reader.read_buf(&mut self.buffer);
            let read = match (self.partial_since, self.request_timeout) {
                (Some(started), Some(limit)) => {
                    tokio::time::timeout_at((started + limit).into(), read)
                        .await
                        .map_err(|_| {
                            io::Error::new(
                                io::ErrorKind::TimedOut,
                                "the request did not arrive in time",
                            )
                        })??
                }
                _ => read.await?,
            };
            if read == 0 {
                return Ok(None);
            }
        }
    }

    /// Queues a reply; it is sent by [`Connection::flush`].
    pub async fn write_reply(&mut self, reply: &Reply) -> io::Result<()> {
        self.writer.write_all(&reply.to_line()).await
    }

    /// Queues bytes that are already a complete line (an event).
    pub async fn write_raw(&mut self, line: &[u8]) -> io::Result<()> {
        self.writer.write_all(line).await
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        self.writer.flush().await
    }

    /// Sends a last reply and closes in a way that lets it reach the client:
    /// flush, shut down the write side (FIN), then read and discard whatever
    /// the client still sends for a moment. Closing with unread input would
    /// make the kernel send RST, which can destroy the reply in flight.
    pub async fn close_with(mut self, reply: &Reply) {
        let sent = async {
            self.writer.write_all(&reply.to_line()).await?;
            self.writer.flush().await?;
            self.writer.shutdown().await
        };
        if tokio::time::timeout(Duration::from_secs(1), sent)
            .await
            .is_err()
        {
            return;
        }
        let mut sink = [0u8; 4096];
        let drain = async {
            while let Ok(n) = self.reader.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode_all(decoder: &mut FrameDecoder, buf: &mut BytesMut) -> Vec<Frame> {
        std::iter::from_fn(|| decoder.decode(buf)).collect()
    }

    fn frames(input: &[u8], max: usize) -> Vec<Frame> {
        let mut decoder = FrameDecoder::new(max);
        let mut buf = BytesMut::from(input);
        decode_all(&mut decoder, &mut buf)
    }

    #[test]
    fn back_to_back_pretty_and_delimited() {
        let input =
            b"{\"a\":1}{\"b\":[1,{\"c\":\"}\"}]}\n\n  {\n  \"d\": \"x\\\"y\"\n}\r\n[1]\"s\" 12 ";
        assert_eq!(
            frames(input, 1000),
            vec![
                Frame::Value(json!({"a": 1})),
                Frame::Value(json!({"b": [1, {"c": "}"}]})),
                Frame::Value(json!({"d": "x\"y"})),
                Frame::Value(json!([1])),
                Frame::Value(json!("s")),
                Frame::Value(json!(12)),
            ]
        );
    }

    #[test]
    fn any_split_gives_the_same_frames() {
        let input: &[u8] = b"{\"command\":\"ping\"}\n{\n \"command\": \"x\",\n \"data\": {\"k\": \"\\\\\"}\n}{\"z\":1} nope\n{\"w\":2}";
        let whole = frames(input, 1000);
        for split in 0..input.len() {
            let mut decoder = FrameDecoder::new(1000);
            let mut buf = BytesMut::from(&input[..split]);
            let mut got = decode_all(&mut decoder, &mut buf);
            buf.extend_from_slice(&input[split..]);
            got.extend(decode_all(&mut decoder, &mut buf));
            assert_eq!(got, whole, "split at {split}");
        }
        let mut decoder = FrameDecoder::new(1000);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in input {
            buf.extend_from_slice(&[*byte]);
            got.extend(decode_all(&mut decoder, &mut buf));
        }
        assert_eq!(got, whole, "one byte at a time");
    }

    #[test]
    fn invalid_input_skips_to_the_next_line() {
        let input = b"{\"a\": nope}{\"skipped\":1}\n{\"b\":2}\n\xff\xfe garbage\n{\"c\":\"\xc3\x28\"}\n{\"d\":4}\n}\n{\"e\":5}";
        assert_eq!(
            frames(input, 1000),
            vec![
                Frame::Invalid,
                Frame::Value(json!({"b": 2})),
                Frame::Invalid,
                Frame::Invalid,
                Frame::Value(json!({"d": 4})),
                Frame::Invalid,
                Frame::Value(json!({"e": 5})),
            ]
        );
    }

    #[test]
    fn oversized_values_are_reported_without_buffering_them() {
        let mut decoder = FrameDecoder::new(16);
        let mut buf = BytesMut::from(&b"{\"k\":\"0123456789"[..]);
        assert_eq!(decoder.decode(&mut buf), None);
        buf.extend_from_slice(b"0123456789");
        assert_eq!(decoder.decode(&mut buf), Some(Frame::TooLarge));

        assert_eq!(
            frames(b"{\"k\":\"0123456789012345\"}", 16),
            vec![Frame::TooLarge]
        );
        // Exactly at the limit is fine, and leading whitespace does not count.
        assert_eq!(
            frames(b"\n\n  {\"k\":\"01234567\"}", 16),
            vec![Frame::Value(json!({"k": "01234567"}))]
        );
    }
}
