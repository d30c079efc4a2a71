//! One connection to the server: opening it (over TLS when asked), running
//! operations ([`Op`]) over it and printing what comes back.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use tokio::time::Instant;
use vmm_core::client::ClientError;
use vmm_core::connection::FrameDecoder;
use vmm_core::{Client, Reply};

use crate::events::EventPrinter;
use crate::failure::{Failure, describe};
use crate::op::Op;
use crate::out::{self, Printer};
use crate::render;

/// How long connecting may take before it counts as "cannot connect".
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS settings from the global flags; `None` (never set): plaintext.
static TLS: OnceLock<Tls> = OnceLock::new();

/// How every connection of this run speaks TLS.
#[derive(Debug, Clone)]
pub struct Tls {
    config: Arc<vmm_core::tls::ClientConfig>,
    server_name: String,
}

/// What the TLS flags asked for.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    pub tls: bool,
    pub ca_cert: Option<PathBuf>,
    pub server_name: Option<String>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl TlsOptions {
    /// Turns TLS on for every later connection when any TLS flag was given:
    /// a CA file or a client certificate implies `--tls`. A file that cannot
    /// be used is a usage error.
    pub fn apply(self, addr: &str) -> Result<(), Failure> {
        let identity = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => {
                return Err(Failure::Usage(
                    "--client-cert and --client-key go together".into(),
                ));
            }
        };
        if !self.tls && self.ca_cert.is_none() && identity.is_none() {
            return Ok(());
        }
        let config = vmm_core::tls::client_config(self.ca_cert.as_deref(), identity)
            .map_err(|err| Failure::Usage(err.to_string()))?;
        let server_name = self.server_name.unwrap_or_else(|| host_of(addr).to_owned());
        vmm_core::tls::server_name(&server_name)
            .map_err(|err| Failure::Usage(format!("{err} (set one with --tls-server-name)")))?;
        let _ = TLS.set(Tls {
            config,
            server_name,
        });
        Ok(())
    }
}

/// The host part of `host:port`, `[v6]:port` or a bare host.
fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(host, _)| host);
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => addr,
    }
}

/// Opens a connection to `addr`: the one place every mode (one-shot, shell,
/// watch, agent) connects, over TLS once [`TlsOptions::apply`] turned it on.
pub async fn open(addr: &str) -> io::Result<Client> {
    match TLS.get() {
        Some(tls) => Client::connect_tls(addr, Arc::clone(&tls.config), &tls.server_name).await,
        None => Client::connect(addr).await,
    }
}

/// How long a keepalive ping may wait for its reply before the connection
/// counts as lost.
const KEEPALIVE_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Sleeps until `at`; forever for `None` (for a keepalive that is off).
pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How many replies the server will send for `text`, found with the server's
/// own framing: one per JSON value, one per invalid value (the rest of its
/// line is skipped). `Err` when the text ends inside a value, which the
/// server would wait for the rest of.
pub fn replies_expected(text: &str) -> Result<usize, Failure> {
    let mut decoder = FrameDecoder::new(usize::MAX);
    let mut buf = BytesMut::from(text.as_bytes());
    buf.extend_from_slice(b"\n");
    let mut count = 0;
    while decoder.decode(&mut buf).is_some() {
        count += 1;
    }
    if !buf.is_empty() {
        return Err(Failure::Usage(
            "the text ends inside a JSON value; the server would wait for the rest".into(),
        ));
    }
    if count == 0 {
        return Err(Failure::Usage("nothing to send".into()));
    }
    Ok(count)
}

/// A connection, with the address it was opened to and how to print replies
/// and events.
///
/// Once the connection watches, event lines may come before any reply. Every
/// reply is read with [`Client::read_reply`], which keeps those for later, and
/// they are printed before what the reply prints, in the order they came.
#[derive(Debug)]
pub struct Conn {
    client: Client,
    addr: String,
    json: bool,
    events: EventPrinter,
    /// When a request was last sent: the start of the current idle time.
    last_sent: Instant,
    /// Events that come while replies are awaited are kept for
    /// [`Conn::take_events`] instead of being printed (`list --watch`,
    /// which reads them rather than shows them).
    holding: bool,
}

impl Conn {
    pub async fn connect(addr: &str, json: bool) -> Result<Conn, Failure> {
        let cannot = |why: String| Failure::Connection(format!("cannot connect to {addr}: {why}"));
        let client = match tokio::time::timeout(CONNECT_TIMEOUT, open(addr)).await {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => return Err(cannot(describe(&err))),
            Err(_) => return Err(cannot("timed out".into())),
        };
        Ok(Conn {
            client,
            addr: addr.to_owned(),
            json,
            events: EventPrinter::new(json),
            last_sent: Instant::now(),
            holding: false,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Prints events through the shell's line editor from now on.
    pub fn use_terminal(&mut self, printer: Printer) {
        self.events.use_terminal(printer);
    }

    /// From now on, keeps the events that come while replies are awaited
    /// for [`Conn::take_events`] rather than printing them.
    pub fn hold_events(&mut self) {
        self.holding = true;
    }

    /// The events kept since the last call (see [`Conn::hold_events`]).
    pub fn take_events(&mut self) -> Vec<String> {
        self.client.take_events()
    }

    /// Waits for the next event line (after `watch`) and returns it. Only
    /// for when no request is pending; cancel safe.
    pub async fn next_event(&mut self) -> Result<String, Failure> {
        self.client.next_event().await.map_err(|err| self.lost(err))
    }

    /// Prints the events that came while replies were awaited (unless they
    /// are held).
    pub fn show_events(&mut self) {
        if self.holding {
            return;
        }
        for line in self.client.take_events() {
            self.events.print(&line);
        }
    }

    /// Waits for the next event (after `watch`) and prints it. Only for when
    /// no request is pending; a lost connection is a failure. Dropping it
    /// while it waits may lose a line that had half arrived (see
    /// [`Client::next_event`]).
    pub async fn show_next_event(&mut self) -> Result<(), Failure> {
        self.show_events();
        match self.client.next_event().await {
            Ok(line) => {
                self.events.print(&line);
                Ok(())
            }
            Err(err) => Err(self.lost(err)),
        }
    }

    /// The `seq` of the last event printed that had one.
    pub fn last_seq(&self) -> Option<i64> {
        self.events.last_seq()
    }

    /// When the connection will have been idle (sent nothing) for `idle`.
    pub fn idle_until(&self, idle: Duration) -> Instant {
        self.last_sent + idle
    }

    /// Sends a `ping` to keep an idle connection open and reads its reply,
    /// printing nothing but the events that came meanwhile. Only a lost
    /// connection (or a reply that is not a reply, or none within
    /// [`KEEPALIVE_REPLY_TIMEOUT`]) is a failure; a ping cannot meaningfully
    /// fail otherwise.
    pub async fn keepalive(&mut self) -> Result<(), Failure> {
        self.last_sent = Instant::now();
        let request = Op::Ping.to_text();
        let ping = self.client.send_raw(&request);
        let read = tokio::time::timeout(KEEPALIVE_REPLY_TIMEOUT, ping).await;
        self.show_events();
        let line = match read {
            Ok(Ok(line)) => line,
            Ok(Err(err)) => return Err(self.lost(err)),
            Err(_) => {
                return Err(Failure::Connection(format!(
                    "connection to {} lost: no reply to a keepalive ping within {}s",
                    self.addr,
                    KEEPALIVE_REPLY_TIMEOUT.as_secs()
                )));
            }
        };
        self.parse(&line).map(drop)
    }

    fn lost(&self, err: ClientError) -> Failure {
        let addr = &self.addr;
        Failure::Connection(match err {
            ClientError::Io(err) => format!("connection to {addr} lost: {}", describe(&err)),
            ClientError::Closed => format!("the server at {addr} closed the connection"),
            ClientError::Protocol(what) => format!("unexpected reply from {addr}: {what}"),
            ClientError::Server { code, message } => format!("{message} ({code})"),
        })
    }

    fn parse(&self, line: &str) -> Result<Reply, Failure> {
        serde_json::from_str(line).map_err(|err| {
            Failure::Connection(format!(
                "unexpected reply from {}: {err}: {line}",
                self.addr
            ))
        })
    }

    /// Runs `op` and prints its outcome on success: the reply line with
    /// `--json` (without a session token, see [`without_token`]), else a
    /// table or message. An error reply is returned as [`Failure::Server`]
    /// and printed by the caller (the raw line, with `--json`, is printed
    /// here).
    pub async fn run(&mut self, op: &Op) -> Result<Reply, Failure> {
        self.exchange(op, Step::Command).await
    }

    /// Authenticates before another command: see [`Conn::authenticate`].
    pub async fn login(&mut self, vm_id: &str, password: String) -> Result<Reply, Failure> {
        let op = Op::Authenticate {
            vm_id: vm_id.to_owned(),
            password,
        };
        self.authenticate(&op).await
    }

    /// Authenticates (as a VM or the operator) before another command, and
    /// prints nothing when that succeeds, not even with `--json`: a run
    /// prints one JSON document, the reply of the command asked for, and an
    /// authenticate reply carries a session token. A refusal ends the run,
    /// so with `--json` its error reply is that document.
    pub async fn authenticate(&mut self, op: &Op) -> Result<Reply, Failure> {
        self.exchange(op, Step::Before).await
    }

    /// Runs a request that prepares for the command proper (`watch` before
    /// `list --watch`), printing like [`Conn::authenticate`]: nothing when
    /// it succeeds.
    pub async fn prepare(&mut self, op: &Op) -> Result<Reply, Failure> {
        self.exchange(op, Step::Before).await
    }

    /// Opens an operator session (what `--admin` does before the command),
    /// printing like [`Conn::authenticate`].
    pub async fn operator(&mut self, admin_token: String) -> Result<Reply, Failure> {
        self.authenticate(&Op::Operator { admin_token }).await
    }

    /// Sends `op` and returns its reply line and the reply, success or
    /// error, printing nothing but the events that came meanwhile: for a
    /// caller that prints the reply its own way (a list a page at a time).
    pub async fn fetch(&mut self, op: &Op) -> Result<(String, Reply), Failure> {
        self.last_sent = Instant::now();
        let sent = self.client.send_raw(&op.to_text()).await;
        self.show_events();
        let line = match sent {
            Ok(line) => line,
            Err(err) => return Err(self.lost(err)),
        };
        let reply = self.parse(&line)?;
        Ok((line, reply))
    }

    /// The failure a reply that made no sense stands for.
    pub fn nonsense(&self, what: impl std::fmt::Display) -> Failure {
        Failure::Connection(format!("unexpected reply from {}: {what}", self.addr))
    }

    /// Like [`Conn::run`], but an error reply is handed back as `Err`
    /// (after its raw line was printed, with `--json`) for the caller to
    /// explain with what its `data` holds.
    pub async fn try_run(&mut self, op: &Op) -> Result<Result<Reply, Reply>, Failure> {
        self.try_exchange(op, Step::Command).await
    }

    async fn exchange(&mut self, op: &Op, step: Step) -> Result<Reply, Failure> {
        self.try_exchange(op, step)
            .await?
            .map_err(|refusal| Failure::from_reply(&refusal))
    }

    async fn try_exchange(&mut self, op: &Op, step: Step) -> Result<Result<Reply, Reply>, Failure> {
        let (line, reply) = self.fetch(op).await?;
        let success = reply.is_success();
        if self.json && (step == Step::Command || !success) {
            let line = without_token(line, &reply).map_err(|what| self.nonsense(what))?;
            out::line(&line);
        }
        if !success {
            return Ok(Err(reply));
        }
        if step == Step::Command && !self.json {
            let text = render::reply(op, &reply).map_err(|what| self.nonsense(what))?;
            out::line(&text);
        }
        Ok(Ok(reply))
    }

    /// Sends `text` exactly as given and prints every reply line verbatim
    /// (and the events that come between them). Returns the decoded replies,
    /// in order.
    pub async fn raw(&mut self, text: &str) -> Result<Vec<Reply>, Failure> {
        let expected = replies_expected(text)?;
        self.last_sent = Instant::now();
        let mut replies = Vec::with_capacity(expected);
        for i in 0..expected {
            let line = if i == 0 {
                self.client.send_raw(text).await
            } else {
                self.client.read_reply().await
            };
            self.show_events();
            let line = line.map_err(|err| self.lost(err))?;
            out::line(&line);
            replies.push(self.parse(&line)?);
        }
        Ok(replies)
    }
}

/// What a request is to the run: the command asked for, whose reply is
/// shown, or a step before it (authenticating), whose reply is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Command,
    Before,
}

/// `line`, or when its `data` holds a session `token`, the same reply
/// without it: `--json` output ends up in logs and CI transcripts, and a
/// token lets whoever reads it act as the VM until it expires, long after
/// this run. `token_expires_at` stays.
fn without_token(line: String, reply: &Reply) -> Result<String, String> {
    if !reply.data.contains_key("token") {
        return Ok(line);
    }
    let mut reply = reply.clone();
    reply.data.shift_remove("token");
    serde_json::to_string(&reply).map_err(|err| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_counted_like_the_server_frames_them() {
        let count = |text: &str| replies_expected(text).ok();
        assert_eq!(count(r#"{"command":"ping"}"#), Some(1));
        assert_eq!(count(r#"{"command":"ping"} {"command":"help"}"#), Some(2));
        assert_eq!(count("{\n  \"command\": \"ping\"\n}"), Some(1));
        assert_eq!(count("not json"), Some(1));
        assert_eq!(count("[1] 2 \"x\""), Some(3));
        assert_eq!(count(r#"{"command":"#), None);
        assert_eq!(count("   "), None);
        assert_eq!(count(""), None);
    }

    #[test]
    fn the_server_name_defaults_to_the_host_of_the_address() {
        assert_eq!(host_of("vmm.example.com:8888"), "vmm.example.com");
        assert_eq!(host_of("127.0.0.1:8888"), "127.0.0.1");
        assert_eq!(host_of("[::1]:8888"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
        assert_eq!(host_of("::1"), "::1");
    }

    #[test]
    fn a_printed_reply_carries_no_token() {
        let line = r#"{"status":"success","message":"authenticated as a","data":{"vm":{"vm_id":"a"},"token":"s3cret-token","token_expires_at":"2030-01-01T00:00:00Z"}}"#;
        let reply: Reply = serde_json::from_str(line).unwrap();
        let printed = without_token(line.to_owned(), &reply).unwrap();
        assert_eq!(
            printed,
            r#"{"status":"success","message":"authenticated as a","data":{"vm":{"vm_id":"a"},"token_expires_at":"2030-01-01T00:00:00Z"}}"#
        );
        let pong = r#"{"status":"success","message":"PONG","data":{}}"#;
        let reply: Reply = serde_json::from_str(pong).unwrap();
        assert_eq!(without_token(pong.to_owned(), &reply).unwrap(), pong);
    }
}
