//! Framing: turning a byte stream into JSON values and replies into lines.
//!
//! The old server treated one `read(4096)` as one request, so two requests in
//! one segment, a request split across segments, or a request over 4 KiB broke
//! the connection. Here [`FrameDecoder`] finds value boundaries itself: it
//! looks at each byte once and hands a complete value to `serde_json`. Values
//! may be pretty-printed over several lines, separated by whitespace, or
//! follow each other with no separator.
//!
//! An object or array goes through a JSON syntax checker (`syntax.rs`) as it
//! arrives, so a broken one is answered at once instead of swallowing the
//! requests after it while it waits for a closing bracket that never comes:
//!
//! - A byte that cannot continue the value makes it invalid. If that byte is
//!   the first one on a line (after whitespace) of a value that began on an
//!   earlier line, it starts the next value (`{"command":"ping"`, newline,
//!   `  {"command":"ping"}`: `invalid_json`, then the second ping); otherwise
//!   the rest of its line is skipped.
//! - A raw newline inside a string is such a byte: the value is invalid and
//!   decoding goes on after that newline.
//! - A `{` in the first column of a line while a value is open starts a new
//!   request; the open value is invalid. Pretty-printers indent nested
//!   values, so this only cuts off a value that was never finished (`[` or
//!   `{"data":` followed by a newline), where `{` would otherwise be taken as
//!   part of it. A hand-written value with a nested object in the first
//!   column is therefore not accepted.
//!
//! A top-level string ends at its closing quote (or, invalid, at a newline);
//! a top-level number or literal at the first whitespace or punctuation.
//! Other errors (bytes that are not UTF-8, nesting deeper than serde_json
//! allows) are found by serde_json once the value is complete; the rest of
//! its line is then skipped. A value that is still incomplete when the
//! request timeout fires is answered by the server (see `server::run`).

mod syntax;

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

use crate::listing::{Batch, Fill, Listing};
use crate::protocol::{BadRequest, ErrorCode, Reply, Request};
use crate::registry::Success;
use syntax::{Step, Syntax};

/// What the decoder found next in the input.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A complete, syntactically valid JSON value.
    Value(Value),
    /// A syntax error or bytes that are not UTF-8. The decoder has dropped
    /// the value and goes on at the next line, or at the byte that starts
    /// the next value (see the module doc).
    Invalid,
    /// A value longer than the limit. The stream cannot be resynchronised
    /// safely, so the connection must be closed.
    TooLarge,
}

/// A [`Frame`] whose value was decoded by the caller's own function.
#[derive(Debug, Clone, PartialEq)]
pub enum RawFrame<T> {
    /// What the caller's function made of the bytes of one value whose
    /// brackets, strings and separators are well formed. They may still not
    /// be JSON (a bad literal or number, bytes that are not UTF-8): the
    /// caller then calls [`FrameDecoder::skip_line`], as `decode` does.
    Value(T),
    /// See [`Frame::Invalid`].
    Invalid,
    /// See [`Frame::TooLarge`].
    TooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An object or array, checked by [`Syntax`].
    Nested,
    /// A top-level string: ends at its closing quote.
    Str,
    /// A number, literal or garbage: ends at whitespace or punctuation.
    Scalar,
}

/// How scanning the current value ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// More input is needed.
    Partial,
    /// The value is the first this many bytes.
    Complete(usize),
    /// The value is invalid; it ends before byte `at`.
    Broken {
        at: usize,
        resume: Resume,
    },
    TooLarge,
}

/// Where decoding goes on after a broken value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// After the next newline (at or after the byte that broke the value).
    NextLine,
    /// At the byte that broke the value: it starts the next one.
    Here,
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
    /// Since the last newline in the current value, only whitespace came.
    line_start: bool,
    /// `Kind::Str`: after a backslash.
    escaped: bool,
    syntax: Syntax,
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
            line_start: false,
            escaped: false,
            syntax: Syntax::default(),
        }
    }

    /// Takes the next frame off the front of `buf`, or returns `None` when more
    /// input is needed. Bytes that are consumed are removed from `buf`; a
    /// partial value stays in it.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Option<Frame> {
        Some(
            match self.decode_with(buf, |bytes| serde_json::from_slice::<Value>(bytes))? {
                RawFrame::Value(value) => match value {
                    Ok(value) => Frame::Value(value),
                    Err(_) => {
                        self.skip_line();
                        Frame::Invalid
                    }
                },
                RawFrame::Invalid => Frame::Invalid,
                RawFrame::TooLarge => Frame::TooLarge,
            },
        )
    }

    /// [`FrameDecoder::decode`], with the value's bytes decoded by `decode`
    /// into the caller's own type, straight from the buffer.
    pub fn decode_with<T>(
        &mut self,
        buf: &mut BytesMut,
        decode: impl FnOnce(&[u8]) -> T,
    ) -> Option<RawFrame<T>> {
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
            self.line_start = false;
            self.escaped = false;
            self.syntax.reset();
        }
        let end = match self.scan(buf) {
            Scan::Partial => return None,
            Scan::TooLarge => {
                self.overflowed = true;
                return Some(RawFrame::TooLarge);
            }
            Scan::Broken { at, resume } => {
                buf.advance(at);
                self.kind = None;
                self.skipping_line = resume == Resume::NextLine;
                return Some(RawFrame::Invalid);
            }
            Scan::Complete(end) => end,
        };
        self.kind = None;
        let value = decode(&buf[..end]);
        buf.advance(end);
        Some(RawFrame::Value(value))
    }

    /// The usual case, in one pass: when the next value starts a line that
    /// is whole in `buf`, `decode` is given that line (without its newline)
    /// and returns `Some` only if it is exactly one JSON object, whitespace
    /// aside. The line is then taken off `buf`. The syntax checker would have
    /// framed that line the same way, since a line of valid JSON holds none
    /// of the bytes its rules split on; any other line (several values, a
    /// broken or partial one, not an object) gives `None`, leaves the
    /// decoder as it was, and goes through [`FrameDecoder::decode_with`].
    pub fn decode_line_with<T>(
        &mut self,
        buf: &mut BytesMut,
        decode: impl FnOnce(&[u8]) -> Option<T>,
    ) -> Option<T> {
        if self.overflowed || self.skipping_line || self.kind.is_some() {
            return None;
        }
        let start = buf.iter().position(|&b| !is_json_whitespace(b))?;
        if buf[start] != b'{' {
            return None;
        }
        let window = &buf[start..buf.len().min(start + self.max_len + 1)];
        let end = start + memchr::memchr(b'\n', window)?;
        let value = decode(&buf[start..end])?;
        buf.advance(end + 1);
        Some(value)
    }

    /// [`FrameDecoder::decode_line_with`] for a run of lines: `take` is given
    /// each whole line at the front of `input` in turn (trimmed of leading
    /// whitespace, without its newline) while it returns true. Returns how
    /// many lines it took, and how many bytes of `input` they were, for the
    /// caller to remove.
    fn take_lines_of(
        &mut self,
        input: &[u8],
        mut take: impl FnMut(&[u8]) -> bool,
    ) -> (usize, usize) {
        if self.overflowed || self.skipping_line || self.kind.is_some() {
            return (0, 0);
        }
        let (mut taken, mut at) = (0, 0);
        loop {
            let rest = &input[at..];
            let Some(start) = rest.iter().position(|&b| !is_json_whitespace(b)) else {
                break;
            };
            if rest[start] != b'{' {
                break;
            }
            let window = &rest[start..rest.len().min(start + self.max_len + 1)];
            let Some(end) = memchr::memchr(b'\n', window) else {
                break;
            };
            if !take(&window[..end]) {
                break;
            }
            taken += 1;
            at += start + end + 1;
        }
        (taken, at)
    }

    /// Skips the rest of the current line: what follows a value that turned
    /// out not to be JSON after all (see [`RawFrame::Value`]).
    pub fn skip_line(&mut self) {
        self.skipping_line = true;
    }

    /// Whether part of a value has arrived but not all of it.
    pub fn in_value(&self) -> bool {
        self.kind.is_some()
    }

    /// Scans the bytes of the current value that are new since the last call.
    fn scan(&mut self, buf: &BytesMut) -> Scan {
        let Some(kind) = self.kind else {
            return Scan::Partial;
        };
        while self.scanned < buf.len() {
            let position = self.scanned;
            let byte = buf[position];
            self.scanned += 1;
            let outcome = match kind {
                Kind::Nested => self.nested(buf, position, byte),
                Kind::Str => self.string(position, byte),
                // The byte that ends a scalar is not part of it, so a scalar
                // of exactly `max_len` bytes is not too large.
                Kind::Scalar if position > 0 && ends_scalar(byte) => Scan::Complete(position),
                Kind::Scalar => Scan::Partial,
            };
            match outcome {
                Scan::Complete(end) if end > self.max_len => return Scan::TooLarge,
                // Report the overflow as soon as it happens, so the caller
                // answers `request_too_large` without buffering more.
                Scan::Partial if self.scanned > self.max_len => return Scan::TooLarge,
                Scan::Partial => {}
                done => return done,
            }
        }
        Scan::Partial
    }

    /// One byte of an object or array.
    fn nested(&mut self, buf: &BytesMut, position: usize, byte: u8) -> Scan {
        // A newline inside a string breaks the value before this, so here
        // the previous byte is a newline between tokens.
        if byte == b'{' && position > 0 && buf[position - 1] == b'\n' {
            return Scan::Broken {
                at: position,
                resume: Resume::Here,
            };
        }
        let was_line_start = self.line_start;
        if byte == b'\n' {
            self.line_start = true;
        } else if !is_json_whitespace(byte) {
            self.line_start = false;
        }
        match self.syntax.step(byte) {
            Step::More => Scan::Partial,
            Step::Done => Scan::Complete(position + 1),
            // Whitespace never breaks a value between tokens, so a byte that
            // breaks one at a line start is the first of that line.
            Step::Error if was_line_start => Scan::Broken {
                at: position,
                resume: Resume::Here,
            },
            Step::Error => Scan::Broken {
                at: position,
                resume: Resume::NextLine,
            },
        }
    }

    /// One byte of a top-level string.
    fn string(&mut self, position: usize, byte: u8) -> Scan {
        if position == 0 {
            return Scan::Partial; // the opening quote
        }
        if byte == b'\n' {
            return Scan::Broken {
                at: position,
                resume: Resume::NextLine,
            };
        }
        if self.escaped {
            self.escaped = false;
        } else if byte == b'\\' {
            self.escaped = true;
        } else if byte == b'"' {
            return Scan::Complete(position + 1);
        }
        Scan::Partial
    }
}

/// The read half of a connection, plain TCP or TLS.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a connection, plain TCP or TLS.
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 4096;

/// A write buffer larger than this after a flush is given back: a big reply
/// (a list) must not leave its connection holding its memory.
const KEEP_OUT: usize = 1024;

/// A plain TCP read half is kept as such so that reading can wait for
/// readiness before it allocates: an idle connection then holds no read
/// buffer at all. TLS streams buffer internally anyway.
enum Reader {
    Tcp(OwnedReadHalf),
    Other(ReadHalf),
}

/// A success reply's `message` and `data`, borrowed from a [`Success`]
/// whose list is taken (and so can be held while the list is written).
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    pub message: &'a str,
    pub data: &'a crate::protocol::Data,
    pub written: &'a [(String, Box<serde_json::value::RawValue>)],
}

impl<'a> Head<'a> {
    pub fn of(success: &'a Success) -> Head<'a> {
        Head {
            message: &success.message,
            data: &success.data,
            written: &success.written,
        }
    }
}

/// What arrived from the client.
#[derive(Debug)]
pub enum Incoming {
    Request(Request),
    /// Not a request: answer this, and go on with the next one.
    Bad(Reply),
    /// A request longer than the limit. The stream cannot be resynchronised
    /// safely, so the connection must be closed.
    TooLarge,
}

/// Why a reply could not be sent whole. Either way the connection must close.
#[derive(Debug)]
pub enum SendError {
    /// The socket failed, or the client stopped reading for the write timeout.
    Io(io::Error),
    /// A list failed after its reply had started, so the line cannot be
    /// finished or turned into an error reply.
    ListFailed(crate::Error),
}

impl From<io::Error> for SendError {
    fn from(err: io::Error) -> SendError {
        SendError::Io(err)
    }
}

/// One client connection: a decoder over the read half, and a write buffer
/// that replies are serialised straight into. Replies are flushed only when
/// no further complete request is already buffered, so a pipelining client
/// gets its replies in few segments.
pub struct Connection {
    reader: Reader,
    writer: WriteHalf,
    /// Replies not sent yet.
    out: Vec<u8>,
    /// Input not decoded yet; empty, without capacity, while idle.
    buffer: BytesMut,
    decoder: FrameDecoder,
    /// How long a request may take to arrive once it has started.
    request_timeout: Option<Duration>,
    /// When the request now arriving started.
    partial_since: Option<Instant>,
    /// How long a write may stay blocked on a client that does not read.
    write_timeout: Option<Duration>,
    /// Answers the requests it recognises without their being decoded (see
    /// [`Connection::answer_quickly`]).
    quick: Option<Quick>,
    /// Requests `quick` answered that [`Connection::answer_quick`] has not
    /// counted yet.
    answered: usize,
}

/// Recognises a request line (without its newline) and queues its reply, or
/// says it did not: see [`Connection::answer_quickly`].
pub type Quick = fn(&[u8], &mut Vec<u8>) -> bool;

/// Answers the whole lines at the front of `input` that `quick` recognises,
/// while fewer than a batch of replies are queued in `out`: how many, and
/// how many bytes of `input` they were.
fn answer_with(
    quick: Quick,
    decoder: &mut FrameDecoder,
    input: &[u8],
    out: &mut Vec<u8>,
) -> (usize, usize) {
    decoder.take_lines_of(input, |line| {
        out.len() < crate::listing::BATCH_BYTES && quick(line, out)
    })
}

thread_local! {
    /// What a plain TCP connection with nothing buffered reads into: requests
    /// that [`Quick`] answers are answered from here, so a connection that
    /// only sends those never allocates a read buffer of its own.
    static SCRATCH: std::cell::RefCell<[u8; READ_CHUNK]> =
        const { std::cell::RefCell::new([0; READ_CHUNK]) };
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("buffered", &self.buffer.len())
            .field("unsent", &self.out.len())
            .field("decoder", &self.decoder)
            .field("request_timeout", &self.request_timeout)
            .field("write_timeout", &self.write_timeout)
            .finish_non_exhaustive()
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

/// Polls once: `Pending` leaves the task's waker registered, so a caller
/// that then waits for the same thing misses nothing.
async fn poll_once<T>(mut poll: impl FnMut(&mut Context<'_>) -> Poll<T>) -> Poll<T> {
    std::future::poll_fn(|cx| Poll::Ready(poll(cx))).await
}

/// `work`, failing with `TimedOut` after `limit` (never when `None`).
async fn within<T>(
    limit: Option<Duration>,
    what: &str,
    work: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, work)
            .await
            .map_err(|_| timed_out(what))?,
        None => work.await,
    }
}

impl Connection {
    /// A plain TCP connection.
    pub fn new(stream: TcpStream, max_request_bytes: usize) -> Connection {
        let (reader, writer) = stream.into_split();
        Connection::from_parts(Reader::Tcp(reader), Box::new(writer), max_request_bytes)
    }

    /// A connection over a TLS stream whose handshake is done (or over any
    /// other byte stream).
    pub fn tls<S>(stream: S, max_request_bytes: usize) -> Connection
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(stream);
        Connection::from_parts(
            Reader::Other(Box::new(reader)),
            Box::new(writer),
            max_request_bytes,
        )
    }

    fn from_parts(reader: Reader, writer: WriteHalf, max_request_bytes: usize) -> Connection {
        Connection {
            reader,
            writer,
            out: Vec::new(),
            buffer: BytesMut::new(),
            decoder: FrameDecoder::new(max_request_bytes),
            request_timeout: None,
            partial_since: None,
            write_timeout: None,
            quick: None,
            answered: 0,
        }
    }

    /// Lets `quick` answer the requests it recognises without their being
    /// decoded: lines at the front of the input, including as they are read
    /// (see [`Connection::answer_quick`]). Their replies are queued in order
    /// with every other.
    pub fn answer_quickly(&mut self, quick: Quick) {
        self.quick = Some(quick);
    }

    /// Sets [`Connection::request_deadline`]: a request that has started
    /// arriving must be complete within `limit`, so that a client that
    /// trickles bytes (or stops halfway) cannot hold a connection.
    pub fn with_request_timeout(mut self, limit: Option<Duration>) -> Connection {
        self.request_timeout = limit;
        self
    }

    /// Input that arrived before the connection was made (read with a PROXY
    /// header): the client's first request, or its start, answered before
    /// anything more is read.
    pub fn with_input(mut self, input: BytesMut) -> Connection {
        self.buffer = input;
        self
    }

    /// Makes writing fail with `TimedOut` when the client has not read its
    /// replies for `limit`.
    pub fn with_write_timeout(mut self, limit: Option<Duration>) -> Connection {
        self.write_timeout = limit;
        self
    }

    /// Returns a request that is already buffered, without reading.
    pub fn buffered_request(&mut self) -> Option<Incoming> {
        if let Some(request) = self
            .decoder
            .decode_line_with(&mut self.buffer, Request::from_line)
        {
            self.partial_since = None;
            return Some(self.incoming(RawFrame::Value(request)));
        }
        match self
            .decoder
            .decode_with(&mut self.buffer, Request::from_slice)
        {
            Some(frame) => {
                self.partial_since = None;
                Some(self.incoming(frame))
            }
            None => {
                if self.decoder.in_value() {
                    self.partial_since.get_or_insert_with(Instant::now);
                } else {
                    self.partial_since = None;
                }
                None
            }
        }
    }

    /// Answers the buffered requests at the front of the input that the
    /// [`Quick`] recognises, until one it does not (which stays buffered
    /// for [`Connection::buffered_request`]) or until the replies queued are
    /// [`Connection::backlogged`]. Returns how many requests it answered
    /// since the last call, those it answered as they were read included.
    pub fn answer_quick(&mut self) -> usize {
        if let Some(quick) = self.quick {
            let (answered, used) =
                answer_with(quick, &mut self.decoder, &self.buffer, &mut self.out);
            self.buffer.advance(used);
            if answered > 0 {
                self.partial_since = None;
            }
            self.answered += answered;
        }
        std::mem::take(&mut self.answered)
    }

    /// Whether input is buffered: a request, or the start of one.
    pub fn has_input(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// When the request now arriving must be complete (see
    /// [`Connection::with_request_timeout`]); `None` when no request has
    /// started arriving, or there is no limit.
    pub fn request_deadline(&self) -> Option<Instant> {
        Some(self.partial_since? + self.request_timeout?)
    }

    fn incoming(&mut self, frame: RawFrame<Result<Request, BadRequest>>) -> Incoming {
        let not_json = || {
            Incoming::Bad(Reply::error(
                ErrorCode::InvalidJson,
                "the request is not valid JSON (or not UTF-8); skipped to the next line",
            ))
        };
        match frame {
            RawFrame::TooLarge => Incoming::TooLarge,
            RawFrame::Invalid => not_json(),
            RawFrame::Value(request) => match request {
                Ok(request) => Incoming::Request(request),
                Err(BadRequest::NotJson) => {
                    self.decoder.skip_line();
                    not_json()
                }
                Err(BadRequest::Refused(code, message, id)) => {
                    Incoming::Bad(Reply::error(code, message).with_id(id))
                }
            },
        }
    }

    /// One read from the socket; false at the end of the stream. Nothing is
    /// allocated until there is something to read, and a buffer left empty
    /// is given back first. Cancel safe. The caller takes what arrived with
    /// [`Connection::buffered_request`], and waits for the
    /// [`Connection::request_deadline`] beside this.
    pub async fn read_input(&mut self) -> io::Result<bool> {
        Ok(self.read_more().await? > 0)
    }

    async fn read_more(&mut self) -> io::Result<usize> {
        if self.buffer.is_empty() && self.buffer.capacity() > 0 {
            self.buffer = BytesMut::new();
        }
        match &mut self.reader {
            // `poll_read`, not `readable` + `try_read`: a read that does not
            // fill the buffer has drained the socket, and `poll_read` then
            // forgets the readiness, so the next wait goes straight to epoll
            // instead of making a `recv` that can only say "would block".
            // That is one system call in two for a client waiting on each
            // reply.
            Reader::Tcp(tcp) => {
                if let Some(quick) = self.quick
                    && self.buffer.is_empty()
                {
                    let (decoder, out, buffer) =
                        (&mut self.decoder, &mut self.out, &mut self.buffer);
                    let answered = &mut self.answered;
                    return std::future::poll_fn(|cx| {
                        // The scratch is borrowed within one poll only: what
                        // a poll reads, it answers or copies out before it
                        // returns.
                        SCRATCH.with_borrow_mut(|scratch| {
                            let mut read = tokio::io::ReadBuf::new(scratch);
                            std::task::ready!(Pin::new(&mut *tcp).poll_read(cx, &mut read))?;
                            let input = read.filled();
                            let (count, used) = answer_with(quick, decoder, input, out);
                            *answered += count;
                            buffer.extend_from_slice(&input[used..]);
                            Poll::Ready(Ok(input.len()))
                        })
                    })
                    .await;
                }
                self.buffer.reserve(READ_CHUNK);
                tcp.read_buf(&mut self.buffer).await
            }
            Reader::Other(reader) => {
                self.buffer.reserve(READ_CHUNK);
                reader.read_buf(&mut self.buffer).await
            }
        }
    }

    /// Queues a reply; it is sent by [`Connection::flush`].
    pub fn queue_reply(&mut self, reply: &Reply) -> io::Result<()> {
        self.put_line(&reply.as_ref())
    }

    /// Queues a command's success that has no list.
    pub fn queue_success(&mut self, success: &Success, id: Option<&Value>) -> io::Result<()> {
        self.put_success_head(Head::of(success))?;
        self.put_success_tail(None, id)
    }

    /// `{"status":"success","message":...,"data":{` and `data`'s keys, as
    /// [`ReplyRef`] would write them (the same key order), leaving the
    /// object open for more keys. Returns whether a key was written.
    fn put_success_head(&mut self, head: Head<'_>) -> io::Result<bool> {
        self.out
            .extend_from_slice(br#"{"status":"success","message":"#);
        self.put(head.message)?;
        self.out.extend_from_slice(br#","data":{"#);
        let mut first = true;
        for (key, value) in head.data {
            self.put_key(&mut first, key)?;
            self.put(value)?;
        }
        for (key, value) in head.written {
            self.put_key(&mut first, key)?;
            self.out.extend_from_slice(value.get().as_bytes());
        }
        Ok(!first)
    }

    fn put_key(&mut self, first: &mut bool, key: &str) -> io::Result<()> {
        if !std::mem::take(first) {
            self.out.push(b',');
        }
        self.put(key)?;
        self.out.push(b':');
        Ok(())
    }

    /// Closes `data` (after a last key, `next`, if given) and the reply.
    fn put_success_tail(
        &mut self,
        next: Option<(bool, &str)>,
        id: Option<&Value>,
    ) -> io::Result<()> {
        if let Some((after_key, next)) = next {
            if after_key {
                self.out.push(b',');
            }
            self.out.extend_from_slice(br#""next":"#);
            self.put(next)?;
        }
        self.out.push(b'}');
        if let Some(id) = id {
            self.out.extend_from_slice(br#","id":"#);
            self.put(id)?;
        }
        self.out.extend_from_slice(b"}\n");
        Ok(())
    }

    /// Whether enough is queued that it should be sent before more is
    /// queued: a pipelining client's replies must not pile up without bound.
    pub fn backlogged(&self) -> bool {
        self.out.len() >= crate::listing::BATCH_BYTES
    }

    /// Writes a list reply (`success` and its [`Listing`]): its head is
    /// queued, and its entries are sent in batches as they are produced, so
    /// that a list of any size takes a constant amount of memory. Returns
    /// the length of the reply's line, its newline included (for the
    /// metrics).
    pub async fn write_listing(
        &mut self,
        head: Head<'_>,
        mut listing: Listing,
        id: Option<&Value>,
    ) -> Result<u64, SendError> {
        // Replies queued before this one are not its bytes.
        let before = self.out.len();
        let mut written = 0;
        // The reply's head and `data`'s own keys, then the list's key and
        // its entries.
        if self.put_success_head(head)? {
            self.out.push(b',');
        }
        self.put(listing.key)?;
        self.out.extend_from_slice(b":[");
        let mut batch = Batch {
            buf: std::mem::take(&mut self.out),
            entries: 0,
        };
        let done = loop {
            match listing.entries.fill(&mut batch).await {
                Ok(Fill::More) if batch.is_full() => {
                    let sent = within(
                        self.write_timeout,
                        "the client does not read its replies",
                        self.writer.write_all(&batch.buf),
                    )
                    .await;
                    written += batch.buf.len();
                    batch.buf.clear();
                    if let Err(err) = sent {
                        self.out = batch.buf;
                        return Err(SendError::Io(err));
                    }
                }
                Ok(Fill::More) => {}
                Ok(Fill::Done { next }) => break Ok(next),
                Err(err) => break Err(err),
            }
        };
        self.out = batch.buf;
        let next = done.map_err(|err| {
            self.out.clear();
            SendError::ListFailed(err)
        })?;
        self.out.push(b']');
        self.put_success_tail(next.as_deref().map(|next| (true, next)), id)?;
        drop(listing);
        // The whole line, its newline included: what was sent, less what
        // was queued before it, plus what is queued now.
        let bytes = (written + self.out.len()).saturating_sub(before);
        self.send_if_big().await?;
        Ok(u64::try_from(bytes).unwrap_or(u64::MAX))
    }

    /// Queues bytes that are already a complete line (an event).
    pub async fn write_raw(&mut self, line: &[u8]) -> io::Result<()> {
        self.out.extend_from_slice(line);
        self.send_if_big().await
    }

    fn put(&mut self, value: &(impl Serialize + ?Sized)) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, value).map_err(io::Error::other)
    }

    fn put_line(&mut self, value: &impl Serialize) -> io::Result<()> {
        self.put(value)?;
        self.out.push(b'\n');
        Ok(())
    }

    async fn send_if_big(&mut self) -> io::Result<()> {
        if self.backlogged() {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends everything queued, within the write timeout. Most writes are
    /// taken by the socket at once, so they are tried first without a
    /// timer: the timer is made only when the client is slow to read.
    pub async fn flush(&mut self) -> io::Result<()> {
        let limit = self.write_timeout;
        let what = "the client does not read its replies";
        let mut sent = 0;
        while sent < self.out.len() {
            let (writer, rest) = (&mut self.writer, &self.out[sent..]);
            match poll_once(|cx| Pin::new(&mut *writer).poll_write(cx, rest)).await {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => sent += n,
                Poll::Ready(Err(err)) => return Err(err),
                Poll::Pending => {
                    within(limit, what, writer.write_all(rest)).await?;
                    sent = self.out.len();
                }
            }
        }
        self.out.clear();
        let writer = &mut self.writer;
        if poll_once(|cx| Pin::new(&mut *writer).poll_flush(cx))
            .await
            .is_pending()
        {
            within(limit, what, writer.flush()).await?;
        }
        if self.out.capacity() > KEEP_OUT {
            self.out = Vec::new();
        }
        Ok(())
    }

    /// Sends a last reply and closes in a way that lets it reach the client:
    /// flush, shut down the write side (FIN), then read and discard whatever
    /// the client still sends for a moment. Closing with unread input would
    /// make the kernel send RST, which can destroy the reply in flight.
    pub async fn close_with(&mut self, reply: &Reply) {
        let sent = async {
            self.put_line(&reply.as_ref())?;
            self.writer.write_all(&self.out).await?;
            self.writer.flush().await?;
            self.writer.shutdown().await
        };
        if tokio::time::timeout(Duration::from_secs(1), sent)
            .await
            .is_err()
        {
            return;
        }
        // On the heap: a buffer in this future would be part of every
        // connection's task.
        let mut sink = vec![0u8; 4096];
        let drain = async {
            loop {
                let read = match &mut self.reader {
                    Reader::Tcp(tcp) => tcp.read(&mut sink).await,
                    Reader::Other(reader) => reader.read(&mut sink).await,
                };
                if !matches!(read, Ok(n) if n > 0) {
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

    /// A success written straight into the buffer is, byte for byte, the
    /// line of the same reply built as a [`Reply`].
    #[tokio::test]
    async fn a_written_success_is_the_built_reply() {
        let (ours, mut theirs) = tokio::io::duplex(4096);
        let mut conn = Connection::tls(ours, 1024);
        let mut success = Success::new("done \"quoted\"")
            .with(
                "vm",
                json!({"vm_id": "a", "disks": [{"id": 1, "disk_size": 2}]}),
            )
            .unwrap()
            .with("token", "t")
            .unwrap();
        success.data.insert("first".into(), json!([1, null]));
        for id in [None, Some(json!(7)), Some(json!(null)), Some(json!("x"))] {
            conn.queue_success(&success, id.as_ref()).unwrap();
            let mut data = crate::protocol::Data::new();
            data.insert("first".into(), json!([1, null]));
            data.insert(
                "vm".into(),
                json!({"vm_id": "a", "disks": [{"id": 1, "disk_size": 2}]}),
            );
            data.insert("token".into(), json!("t"));
            let built = Reply::success("done \"quoted\"", data).with_id(id);
            conn.flush().await.unwrap();
            let mut line = vec![0u8; built.to_line().len()];
            tokio::io::AsyncReadExt::read_exact(&mut theirs, &mut line)
                .await
                .unwrap();
            assert_eq!(
                String::from_utf8(line).unwrap(),
                String::from_utf8(built.to_line()).unwrap()
            );
        }
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

    /// Frames of `input` fed in two parts split at every position and one
    /// byte at a time; all must equal the frames of the whole.
    fn frames_of_every_split(input: &[u8], max: usize) -> Vec<Frame> {
        let whole = frames(input, max);
        for split in 0..input.len() {
            let mut decoder = FrameDecoder::new(max);
            let mut buf = BytesMut::from(&input[..split]);
            let mut got = decode_all(&mut decoder, &mut buf);
            buf.extend_from_slice(&input[split..]);
            got.extend(decode_all(&mut decoder, &mut buf));
            assert_eq!(got, whole, "split at {split}");
        }
        let mut decoder = FrameDecoder::new(max);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in input {
            buf.extend_from_slice(&[*byte]);
            got.extend(decode_all(&mut decoder, &mut buf));
        }
        assert_eq!(got, whole, "one byte at a time");
        whole
    }

    #[test]
    fn any_split_gives_the_same_frames() {
        let input: &[u8] = b"{\"command\":\"ping\"}\n{\n \"command\": \"x\",\n \"data\": {\"k\": \"\\\\\"}\n}{\"z\":1} nope\n{\"w\":2}\n\
            {\"command\":\"ping\"\n{\"v\":3}[\n{\"u\":4}{\"data\":\n{\"t\":5}{\"s\":\"unterminated\n\"r\" \
            {\"q\":1\n  {\"p\":6}{\"o\": nope, {\"skipped\":1}\n[\n  {\"n\": 7},\n  {\"m\": [8]}\n]\n\"l\\\"\n{\"k\":9}";
        assert_eq!(
            frames_of_every_split(input, 1000),
            vec![
                Frame::Value(json!({"command": "ping"})),
                Frame::Value(json!({"command": "x", "data": {"k": "\\"}})),
                Frame::Value(json!({"z": 1})),
                Frame::Invalid, // nope
                Frame::Value(json!({"w": 2})),
                Frame::Invalid, // {"command":"ping"
                Frame::Value(json!({"v": 3})),
                Frame::Invalid, // [
                Frame::Value(json!({"u": 4})),
                Frame::Invalid, // {"data":
                Frame::Value(json!({"t": 5})),
                Frame::Invalid, // {"s":"unterminated
                Frame::Value(json!("r")),
                Frame::Invalid, // {"q":1
                Frame::Value(json!({"p": 6})),
                Frame::Invalid, // {"o": nope, ...
                Frame::Value(json!([{"n": 7}, {"m": [8]}])),
                Frame::Invalid, // "l\"
                Frame::Value(json!({"k": 9})),
            ]
        );
    }

    /// The requests in `input` as the connection decodes them: whole lines
    /// first when `by_line`, always the byte-at-a-time framing otherwise.
    fn requests(input: &[u8], split: usize, by_line: bool) -> Vec<String> {
        requests_taking(input, split, by_line, false)
    }

    /// [`requests`], and when `runs`, whole lines taken in runs by
    /// [`FrameDecoder::take_lines_of`] first, as the connection answers pings.
    fn requests_taking(input: &[u8], split: usize, by_line: bool, runs: bool) -> Vec<String> {
        let mut decoder = FrameDecoder::new(200);
        let mut buf = BytesMut::from(&input[..split]);
        let mut got = Vec::new();
        for more in [&input[split..], &[][..]] {
            loop {
                if runs {
                    let (taken, used) =
                        decoder.take_lines_of(&buf, |line| match Request::from_line(line) {
                            Some(request) => {
                                got.push(format!("{:?}", RawFrame::Value(request)));
                                true
                            }
                            None => false,
                        });
                    buf.advance(used);
                    if taken > 0 {
                        continue;
                    }
                }
                if by_line
                    && let Some(request) = decoder.decode_line_with(&mut buf, Request::from_line)
                {
                    got.push(format!("{:?}", RawFrame::Value(request)));
                    continue;
                }
                match decoder.decode_with(&mut buf, Request::from_slice) {
                    None => break,
                    Some(frame) => {
                        if let RawFrame::Value(Err(BadRequest::NotJson)) = frame {
                            decoder.skip_line();
                        }
                        got.push(format!("{frame:?}"));
                    }
                }
            }
            buf.extend_from_slice(more);
        }
        got
    }

    /// Taking whole lines in one pass frames every input exactly as the
    /// byte-at-a-time decoder does, wherever the input is split.
    #[test]
    fn whole_lines_are_framed_as_the_decoder_frames_them() {
        let input: &[u8] = b"{\"command\":\"ping\"}\n  {\"command\":\"ping\",\"id\":1}  \r\n\
            {\"command\":\"ping\"}{\"command\":\"help\"}\n{\"command\":\"ping\"} nope\n{\"command\":7}\n\
            {\"command\":\"ping\",\"command\":\"x\"}\n{\"command\":\"\xff\"}\n{\"command\":\"ping\"\n{\"id\":2}\n\
            {\"a\":\"tab\tin a string\"}\n[1]\n\"s\"\n{\"data\":\n{\"command\":\"list\",\"data\":{\"list_type\":\"all_vms\"}}\n\
            {\"too long\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}\n";
        let expected = requests(input, input.len(), false);
        assert_eq!(expected.len(), 17, "{expected:#?}");
        for split in 0..=input.len() {
            assert_eq!(requests(input, split, true), expected, "split at {split}");
            assert_eq!(
                requests_taking(input, split, true, true),
                expected,
                "runs, split at {split}"
            );
        }
    }

    #[test]
    fn an_unfinished_value_is_invalid_once_the_next_line_starts_a_request() {
        let ping2 = b"{\"command\":\"ping\",\"id\":2}\n";
        // Each unfinished value, and whether a value may come next (after
        // `[`, `:`, or `,` in an array), where an indented object nests.
        for (open, nests) in [
            (&b"{\"command\":\"ping\""[..], false),
            (b"{\"command\":\"ping\",", false),
            (b"{\"command\":\"ping\",\"data\":", true),
            (b"{\"command\":\"ping\",\"data\":{\"a\":[1,2", false),
            (b"{\"command\":\"ping\",\"data\":{\"a\":[1,2,", true),
            (b"{\"command\":\"ping\",\"data\":{\"a\":[1,2,{", false),
            (b"{\"command\":\"ping\",\"data\":{\"a\":1.5e", false),
            (b"{\"command\":\"ping\",\"data\":{\"a\":tr", false),
            (b"{\"command\":\"pi", false),
            (b"{\"command\":\"pi\\", false),
            (b"{\"command\":\"pi\\u00", false),
            (b"{\"comm", false),
            (b"{", false),
            (b"[", true),
            (b"[[{},", true),
            (b"\"unterminated", false),
            (b"\"unterminated\\", false),
        ] {
            for (newline, indent) in [("\n", ""), ("\r\n", ""), ("\n", "  "), ("\n", "\t")] {
                let mut input = open.to_vec();
                input.extend_from_slice(newline.as_bytes());
                input.extend_from_slice(indent.as_bytes());
                input.extend_from_slice(ping2);
                let got = frames(&input, 1000);
                let show = String::from_utf8_lossy(&input);
                // An indented object nests: the request waits for more (or
                // for the request timeout).
                let expected = if !indent.is_empty() && nests {
                    vec![]
                } else {
                    vec![
                        Frame::Invalid,
                        Frame::Value(json!({"command": "ping", "id": 2})),
                    ]
                };
                assert_eq!(got, expected, "{show:?}");
            }
        }
    }

    #[test]
    fn errors_mid_line_skip_the_line_and_at_a_line_start_begin_a_value() {
        assert_eq!(
            frames(b"{\"a\": nope} {\"b\":1}\n{\"c\":2}\n", 1000),
            vec![Frame::Invalid, Frame::Value(json!({"c": 2}))]
        );
        assert_eq!(
            frames(b"{\"a\":1\n  nope {\"b\":1}\n{\"c\":2}\n", 1000),
            vec![
                Frame::Invalid,
                Frame::Invalid,
                Frame::Value(json!({"c": 2}))
            ]
        );
        assert_eq!(
            frames(b"{\"a\":1\n  \"x\"  [2]\n", 1000),
            vec![
                Frame::Invalid,
                Frame::Value(json!("x")),
                Frame::Value(json!([2]))
            ]
        );
        // The line starts inside the value, not with it: an error on the
        // value's own first line skips the line.
        assert_eq!(
            frames(b"  {\"a\":1 \"x\" [2]\n[3]\n", 1000),
            vec![Frame::Invalid, Frame::Value(json!([3]))]
        );
        // A pretty-printed value broken mid-line: its later lines are read
        // as values of their own (here a string, then two invalid ones),
        // since where it would have ended cannot be known.
        assert_eq!(
            frames(
                b"{\n  \"command\": nope,\n  \"id\": 1\n}\n{\"c\":2}\n",
                1000
            ),
            vec![
                Frame::Invalid,
                Frame::Value(json!("id")),
                Frame::Invalid,
                Frame::Invalid,
                Frame::Value(json!({"c": 2}))
            ]
        );
        // A raw newline in a string breaks it at once: decoding goes on
        // after the newline, and the rest of the broken value's second line
        // is read as values of its own.
        assert_eq!(
            frames(b"{\"a\":\"x\ny\"}\n{\"b\":1}", 1000),
            vec![
                Frame::Invalid,
                Frame::Invalid,
                Frame::Value(json!({"b": 1}))
            ]
        );
    }

    #[test]
    fn multi_line_values_are_still_whole() {
        let request = json!({
            "command": "register",
            "data": {"vm_id": "a", "disks": [{"disk_size": 1}, {"disk_size": 2}], "empty": {}, "none": []},
            "id": [1, {"x": "{\n}"}]
        });
        let pretty = serde_json::to_vec_pretty(&request).unwrap_or_default();
        assert_eq!(
            frames_of_every_split(&pretty, 1000),
            vec![Frame::Value(request.clone())]
        );
        let by_hand = b"[\n  {\"a\": 1},\n  {\n    \"b\": [\n      {}\n    ]\n  }\n]\n{\"a\"\n:\n1\n,\"b\"\n:\n {\n}\n}\n{\r\n\"c\": 3\r\n}";
        assert_eq!(
            frames_of_every_split(by_hand, 1000),
            vec![
                Frame::Value(json!([{"a": 1}, {"b": [{}]}])),
                Frame::Value(json!({"a": 1, "b": {}})),
                Frame::Value(json!({"c": 3})),
            ]
        );
        // The price of the first-column rule: a nested object written there
        // is taken for a new request.
        assert_eq!(
            frames(b"[\n{\"a\":1}\n]\n", 1000),
            vec![
                Frame::Invalid,
                Frame::Value(json!({"a": 1})),
                Frame::Invalid
            ]
        );
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
        // An unfinished value is invalid, not too large, when the byte that
        // ends it comes right after the limit; whitespace inside it counts.
        assert_eq!(
            frames(b"{\"a\":[1\n{\"b\":1}", 8),
            vec![Frame::Invalid, Frame::Value(json!({"b": 1}))]
        );
        assert_eq!(frames(b"{\"a\":[1\n{\"b\":1}", 7), vec![Frame::TooLarge]);
        assert_eq!(
            frames(b"\"0123456\n\"x\"", 8),
            vec![Frame::Invalid, Frame::Value(json!("x"))]
        );
        // Nesting that never closes is bounded by the limit too.
        assert_eq!(frames(&[b'['; 100], 64), vec![Frame::TooLarge]);
    }
}
