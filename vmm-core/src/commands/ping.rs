//! `ping`: checks that the server answers. Never touches the database.
//!
//! ```text
//! -> {"command": "ping", "data": {}}
//! <- {"status":"success","message":"PONG","data":{}}
//! -> {"command":"ping","id":7}
//! <- {"status":"success","message":"PONG","data":{},"id":7}
//! ```
//!
//! Pings are most of what a fleet sends, so the connection answers the
//! common ones without decoding them ([`quick`]): a line that is a ping
//! with nothing the reply depends on but an `id` that would be written back
//! byte for byte. Any other ping (escapes, an unusual `id`, extra keys)
//! goes through the registry like every other command, and gets the same
//! reply.

use crate::context::Context;
use crate::params;
use crate::protocol::Data;
use crate::registry::{Command, HandlerFuture, Success};
use crate::session::Session;

inventory::submit! {
    Command { name: "ping", summary: "check that the server answers", handler }
}

fn handler<'a>(_: &'a Context, _: &'a mut Session, data: Data) -> HandlerFuture<'a> {
    Box::pin(async move {
        params::none(data)?;
        Ok(Success::new("PONG"))
    })
}

/// Whether `command` is this module's `ping`: only then may the
/// connection answer pings itself. A different function at the same
/// address is one the compiler merged with this one, which answers the
/// same.
pub(crate) fn is_builtin(command: &Command) -> bool {
    std::ptr::fn_addr_eq(command.handler, handler as crate::registry::Handler)
}

/// The reply to a ping without an `id`, whole.
pub const PONG: &[u8] = b"{\"status\":\"success\",\"message\":\"PONG\",\"data\":{}}\n";

/// The reply to a ping with an `id`, up to the id.
pub const PONG_WITH_ID: &[u8] = b"{\"status\":\"success\",\"message\":\"PONG\",\"data\":{},\"id\":";

/// A line recognised as a ping by [`quick`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping<'a> {
    /// The request's `id`, as the bytes the reply writes back.
    pub id: Option<&'a [u8]>,
}

impl Ping<'_> {
    /// Appends the reply, newline included.
    pub fn reply_into(&self, out: &mut Vec<u8>) {
        match self.id {
            None => out.extend_from_slice(PONG),
            Some(id) => {
                out.extend_from_slice(PONG_WITH_ID);
                out.extend_from_slice(id);
                out.extend_from_slice(b"}\n");
            }
        }
    }
}

/// [`quick`], for [`Connection::answer_line`](crate::connection::Connection::answer_line):
/// queues the reply to `line` when it is a ping it recognises.
pub fn answer(line: &[u8], out: &mut Vec<u8>) -> bool {
    quick(line).map(|ping| ping.reply_into(out)).is_some()
}

/// Recognises one line (without its newline) that is exactly a JSON object
/// with `"command": "ping"`, and at most once each `"data": {}` or
/// `"data": null`, and an `id` that is `null`, an integer that
/// `serde_json` writes back as it came, or a string of printable ASCII
/// without escapes, in any order, with JSON whitespace between tokens.
///
/// `None` is not a refusal: the line then goes through the full decoder,
/// which answers whatever it is. So this may only say `Some` for lines
/// whose full answer is [`Ping::reply_into`]'s, never the other way round
/// (the tests compare the two).
pub fn quick(line: &[u8]) -> Option<Ping<'_>> {
    // What the seed's clients and `vmm-client` send, checked first.
    if line == br#"{"command":"ping"}"# || line == br#"{"command": "ping"}"# {
        return Some(Ping { id: None });
    }
    let mut scan = Scan { line, at: 0 };
    let (mut command, mut data, mut id) = (false, false, None);
    scan.expect(b'{')?;
    loop {
        scan.skip_whitespace();
        let key = scan.plain_string()?;
        scan.skip_whitespace();
        scan.expect(b':')?;
        scan.skip_whitespace();
        match key {
            b"command" if !command => {
                command = true;
                if scan.plain_string()? != b"ping" {
                    return None;
                }
            }
            b"data" if !data => {
                data = true;
                if !scan.literal(b"null") {
                    scan.expect(b'{')?;
                    scan.skip_whitespace();
                    scan.expect(b'}')?;
                }
            }
            b"id" if id.is_none() => id = Some(scan.id()?),
            _ => return None,
        }
        scan.skip_whitespace();
        match scan.next()? {
            b',' => {}
            b'}' => break,
            _ => return None,
        }
    }
    scan.skip_whitespace();
    (command && scan.at == line.len()).then_some(Ping { id })
}

struct Scan<'a> {
    line: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn next(&mut self) -> Option<u8> {
        let byte = *self.line.get(self.at)?;
        self.at += 1;
        Some(byte)
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.next()? == byte).then_some(())
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.line.get(self.at), Some(b' ' | b'\t' | b'\r')) {
            self.at += 1;
        }
    }

    fn literal(&mut self, literal: &[u8]) -> bool {
        let found = self.line[self.at..].starts_with(literal);
        if found {
            self.at += literal.len();
        }
        found
    }

    /// A string of printable ASCII with no escapes, without its quotes:
    /// what `serde_json` would write back exactly as it is.
    fn plain_string(&mut self) -> Option<&'a [u8]> {
        self.expect(b'"')?;
        let start = self.at;
        loop {
            match self.next()? {
                b'"' => return Some(&self.line[start..self.at - 1]),
                b'\\' => return None,
                0x20..=0x7e => {}
                _ => return None,
            }
        }
    }

    /// An `id` that the full decoder would write back byte for byte:
    /// `null`, a plain string, or an integer of at most 18 digits without a
    /// leading zero (nor `-0`, which it reads as a float).
    fn id(&mut self) -> Option<&'a [u8]> {
        let start = self.at;
        match *self.line.get(self.at)? {
            b'"' => {
                self.plain_string()?;
            }
            b'n' if self.literal(b"null") => {}
            _ => {
                self.literal(b"-");
                let digits = self.at;
                while self.line.get(self.at).is_some_and(u8::is_ascii_digit) {
                    self.at += 1;
                }
                let digits = &self.line[digits..self.at];
                let negative = digits.len() < self.at - start;
                match digits {
                    [] => return None,
                    [b'0'] if !negative => {}
                    [b'0', ..] => return None,
                    _ if digits.len() > 18 => return None,
                    _ => {}
                }
                // A fraction or an exponent makes it a float.
                if matches!(self.line.get(self.at), Some(b'.' | b'e' | b'E')) {
                    return None;
                }
            }
        }
        Some(&self.line[start..self.at])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Reply, Request};

    /// What the full path answers to `line`, when it is a ping that
    /// succeeds: the reply `quick` must match.
    fn full_reply(line: &[u8]) -> Option<String> {
        let request = Request::from_slice(line).ok()?;
        if request.command != "ping" || !request.data.is_empty() {
            return None;
        }
        let reply = Reply::success("PONG", Data::new()).with_id(request.id);
        String::from_utf8(reply.to_line()).ok()
    }

    fn quick_reply(line: &[u8]) -> Option<String> {
        let mut out = Vec::new();
        quick(line)?.reply_into(&mut out);
        String::from_utf8(out).ok()
    }

    #[test]
    fn the_usual_pings_are_recognised() {
        for line in [
            &b"{\"command\":\"ping\"}"[..],
            b"{\"command\": \"ping\"}",
            b"{\"command\": \"ping\", \"data\": {}}",
            b" {\t\"data\" : null , \"command\" :\"ping\" }\r",
            b"{\"id\":7,\"command\":\"ping\"}",
            b"{\"command\":\"ping\",\"id\":\"a-b c\",\"data\":{ }}",
            b"{\"command\":\"ping\",\"id\":-123456789012345678}",
            b"{\"command\":\"ping\",\"id\":0}",
            b"{\"command\":\"ping\",\"id\":null}",
        ] {
            let line = line.trim_ascii_start();
            let show = String::from_utf8_lossy(line);
            assert!(quick(line).is_some(), "{show}");
            assert_eq!(quick_reply(line), full_reply(line), "{show}");
        }
    }

    #[test]
    fn anything_else_is_left_to_the_full_decoder() {
        for line in [
            &b"{\"command\":\"pong\"}"[..],
            b"{\"command\":\"ping\"",
            b"{\"command\":\"ping\"} {}",
            b"{\"command\":\"ping\",}",
            b"{\"command\":\"ping\",\"command\":\"ping\"}",
            b"{\"command\":\"ping\",\"data\":{},\"data\":{}}",
            b"{\"command\":\"ping\",\"data\":{\"a\":1}}",
            b"{\"command\":\"ping\",\"data\":[]}",
            b"{\"command\":\"p\\u0069ng\"}",
            b"{\"comm\\u0061nd\":\"ping\"}",
            b"{\"command\":\"ping\",\"extra\":1}",
            b"{\"command\":\"ping\",\"id\":01}",
            b"{\"command\":\"ping\",\"id\":-0}",
            b"{\"command\":\"ping\",\"id\":1.0}",
            b"{\"command\":\"ping\",\"id\":1e3}",
            b"{\"command\":\"ping\",\"id\":1234567890123456789}",
            b"{\"command\":\"ping\",\"id\":\"caf\xc3\xa9\"}",
            b"{\"command\":\"ping\",\"id\":\"a\\\"b\"}",
            b"{\"command\":\"ping\",\"id\":[1]}",
            b"{\"command\":\"ping\",\"id\":true}",
            b"{\"command\":\"ping\",\"id\":nul}",
            b"{\"command\":\"ping\",\"id\":-}",
            b"{\"command\":\"ping\"}\x0b",
            b"{\"data\":{}}",
            b"{}",
        ] {
            assert_eq!(quick(line), None, "{}", String::from_utf8_lossy(line));
        }
    }

    /// Every line made of the pieces a ping is made of, cut short at every
    /// byte and with every byte changed to one that matters: whenever
    /// `quick` recognises one, the full decoder answers it the same way.
    #[test]
    fn quick_never_answers_what_the_full_path_answers_otherwise() {
        let pieces: &[&[u8]] = &[
            b"{\"command\": \"ping\", \"data\": {}, \"id\": 42}",
            b"{\"id\":\"x\",\"command\":\"ping\",\"data\":null}",
            b"{ \"data\" : { } , \"command\" : \"ping\" , \"id\" : -9 }",
        ];
        let swaps: &[u8] = b" \t\r{}[]\",:0123456789-+.eEnulpingcomadt\\\x00\x7f\xff";
        let mut recognised = 0;
        for piece in pieces {
            for cut in 0..=piece.len() {
                let line = &piece[..cut];
                if quick(line).is_some() {
                    recognised += 1;
                    assert_eq!(quick_reply(line), full_reply(line));
                }
            }
            for at in 0..piece.len() {
                for &swap in swaps {
                    let mut line = piece.to_vec();
                    line[at] = swap;
                    if quick(&line).is_some() {
                        recognised += 1;
                        assert_eq!(
                            quick_reply(&line),
                            full_reply(&line),
                            "{}",
                            String::from_utf8_lossy(&line)
                        );
                    }
                }
            }
        }
        assert!(recognised > 100, "only {recognised} variants were pings");
    }
}
