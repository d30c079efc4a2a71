//! One client connection with the least work per reply: requests are
//! written as pre-serialised bytes, and a reply is only scanned for its
//! newline, keeping its first bytes to tell success from error. A list
//! reply of many megabytes is never stored or parsed.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::error::{BenchError, Result};
use crate::net::describe;

/// Every success reply starts with this (the server writes `status` first).
pub const SUCCESS: &[u8] = br#"{"status":"success""#;

/// How much of a reply is kept on the hot path: enough for the status,
/// the message (error text, list counts) and the error code.
pub const HEAD: usize = 256;

const READ_BUFFER: usize = 64 * 1024;

/// Largest reply kept whole by [`Conn::call`] (set-up replies are small).
const WHOLE: usize = 16 * 1024 * 1024;

pub struct Conn {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    head: Vec<u8>,
    /// Bounds every single read and write: nothing waits forever.
    timeout: Duration,
}

impl Conn {
    pub fn new(stream: TcpStream, timeout: Duration) -> Conn {
        let (reader, writer) = stream.into_split();
        Conn {
            reader,
            writer,
            buf: vec![0; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            head: Vec::with_capacity(HEAD),
            timeout,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        match tokio::time::timeout(self.timeout, self.writer.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(BenchError::new(format!("write failed: {}", describe(&err)))),
            Err(_) => Err(BenchError::new(format!(
                "the server read nothing for {:?}",
                self.timeout
            ))),
        }
    }

    /// Reads one reply line and returns its length in bytes, newline
    /// included; its first `keep` bytes stay in [`Conn::head`].
    pub async fn reply(&mut self, keep: usize) -> Result<u64> {
        self.head.clear();
        let mut bytes = 0u64;
        loop {
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
                let read = tokio::time::timeout(self.timeout, self.reader.read(&mut self.buf));
                self.end = match read.await {
                    Ok(Ok(0)) => {
                        return Err(BenchError::new("the server closed the connection"));
                    }
                    Ok(Ok(n)) => n,
                    Ok(Err(err)) => {
                        return Err(BenchError::new(format!("read failed: {}", describe(&err))));
                    }
                    Err(_) => {
                        return Err(BenchError::new(format!(
                            "no reply within {:?}",
                            self.timeout
                        )));
                    }
                };
            }
            let chunk = &self.buf[self.start..self.end];
            let (part, done) = match memchr::memchr(b'\n', chunk) {
                Some(i) => (&chunk[..=i], true),
                None => (chunk, false),
            };
            let room = keep.saturating_sub(self.head.len()).min(part.len());
            self.head.extend_from_slice(&part[..room]);
            bytes += part.len() as u64;
            self.start += part.len();
            if done {
                return Ok(bytes);
            }
        }
    }

    /// The first bytes of the last reply.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    pub fn succeeded(&self) -> bool {
        self.head.starts_with(SUCCESS)
    }

    /// The last reply as an error to show: its code and message when they
    /// can be read, else its first bytes.
    pub fn error_text(&self) -> String {
        error_text(&self.head)
    }

    /// Sends `request` as one line and returns the whole reply, parsed
    /// (for set-up, not for measured paths).
    pub async fn call(&mut self, request: &Value) -> Result<Value> {
        let mut line = request.to_string().into_bytes();
        line.push(b'\n');
        self.send(&line).await?;
        self.reply(WHOLE).await?;
        serde_json::from_slice(self.head.trim_ascii_end()).map_err(|err| {
            BenchError::new(format!(
                "a reply that is not JSON ({err}): {}",
                String::from_utf8_lossy(&self.head[..self.head.len().min(200)])
            ))
        })
    }
}

/// `code: message` of an error reply, from as much of it as was kept.
pub fn error_text(head: &[u8]) -> String {
    if let Ok(reply) = serde_json::from_slice::<Value>(head.trim_ascii_end()) {
        let code = reply["code"].as_str().unwrap_or("error");
        let message = reply["message"].as_str().unwrap_or_default();
        return format!("{code}: {message}");
    }
    let text = String::from_utf8_lossy(&head[..head.len().min(160)]);
    format!("unexpected reply: {}", text.trim_end())
}

/// The count at the start of a reply's message (lists say "100000
/// all_vms"), when the kept head shows one.
pub fn leading_count(head: &[u8]) -> Option<u64> {
    const KEY: &[u8] = br#""message":""#;
    let at = memchr::memmem::find(head, KEY)? + KEY.len();
    let digits: &[u8] = &head[at..];
    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    if len == 0 || digits.get(len) != Some(&b' ') {
        return None;
    }
    std::str::from_utf8(&digits[..len]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_and_counts_come_from_the_head() {
        let error =
            br#"{"status":"error","message":"not yet","data":{},"code":"not_authenticated"}"#;
        assert_eq!(error_text(error), "not_authenticated: not yet");
        assert!(error_text(b"{\"status\":\"err").starts_with("unexpected reply"));
        let list = br#"{"status":"success","message":"12345 all_vms","data":{"all_vms":[{"#;
        assert_eq!(leading_count(list), Some(12345));
        assert_eq!(
            leading_count(br#"{"status":"success","message":"PONG"}"#),
            None
        );
    }
}
