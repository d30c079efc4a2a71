//! A small async client: typed methods for every built-in command, plus
//! [`Client::call`] and [`Client::send_raw`] for anything else. Used by
//! `vmm-client` and by the tests.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::ClientConfig;

use crate::connection::{ReadHalf, WriteHalf};

use crate::protocol::{
    ActiveSession, AuthenticatedSession, CommandHelp, Data, DiskEntry, ErrorCode, ListType, Reply,
    Request, VmStatus, VmView,
};

#[derive(Debug)]
pub enum ClientError {
    Io(io::Error),
    /// The server closed the connection before replying.
    Closed,
    /// The server sent something that is not a reply of the expected shape.
    Protocol(String),
    /// The server answered with an error reply.
    Server {
        code: ErrorCode,
        message: String,
    },
}

impl ClientError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(err) => write!(f, "connection error: {err}"),
            ClientError::Closed => f.write_str("the server closed the connection"),
            ClientError::Protocol(what) => write!(f, "unexpected reply: {what}"),
            ClientError::Server { code, message } => write!(f, "{message} ({code})"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(err: io::Error) -> ClientError {
        ClientError::Io(err)
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// What `register` needs.
#[derive(Clone, PartialEq, Eq)]
pub struct Registration {
    pub vm_id: String,
    pub ram: u32,
    pub cpu: u32,
    pub password: String,
    /// Sizes in GiB.
    pub disks: Vec<u32>,
    /// The server's enrollment secret, when it requires one.
    pub registration_secret: Option<String>,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("vm_id", &self.vm_id)
            .field("ram", &self.ram)
            .field("cpu", &self.cpu)
            .field("password", &"<hidden>")
            .field("disks", &self.disks)
            .field(
                "registration_secret",
                &self.registration_secret.as_ref().map(|_| "<hidden>"),
            )
            .finish()
    }
}

impl Registration {
    /// The `data` object of the request.
    pub fn to_data(&self) -> Value {
        let disks: Vec<Value> = self
            .disks
            .iter()
            .map(|size| json!({"disk_size": size}))
            .collect();
        let mut data = json!({
            "vm_id": self.vm_id,
            "ram": self.ram,
            "cpu": self.cpu,
            "password": self.password,
            "disks": disks,
        });
        if let (Some(secret), Value::Object(map)) = (&self.registration_secret, &mut data) {
            map.insert("registration_secret".into(), Value::String(secret.clone()));
        }
        data
    }
}

/// What `update` changes; `None` and empty lists leave things as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    pub ram: Option<u32>,
    pub cpu: Option<u32>,
    /// `(disk id, new size in GiB)`.
    pub resize: Vec<(i64, u32)>,
    /// Sizes in GiB of disks to attach.
    pub attach: Vec<u32>,
}

impl Update {
    /// The `data` object of the request.
    pub fn to_data(&self) -> Value {
        let mut data = Data::new();
        if let Some(ram) = self.ram {
            data.insert("ram".into(), json!(ram));
        }
        if let Some(cpu) = self.cpu {
            data.insert("cpu".into(), json!(cpu));
        }
        if !self.resize.is_empty() || !self.attach.is_empty() {
            let disks: Vec<Value> = self
                .resize
                .iter()
                .map(|(id, size)| json!({"id": id, "disk_size": size}))
                .chain(self.attach.iter().map(|size| json!({"disk_size": size})))
                .collect();
            data.insert("disks".into(), Value::Array(disks));
        }
        Value::Object(data)
    }
}

/// One page of a list (see [`Client::list_page`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// At most the `limit` asked for, in key order.
    pub entries: Vec<T>,
    /// The cursor to pass as `after` for the following page; `None` on the
    /// last page.
    pub next: Option<String>,
}

impl<T: DeserializeOwned> Page<T> {
    /// The page a successful `list` reply of `kind` holds. Public so that
    /// a caller that reads reply lines itself (to print them verbatim, say)
    /// decodes them the same way.
    pub fn from_reply(kind: ListType, reply: &mut Reply) -> Result<Page<T>> {
        let key = kind.as_str();
        let entries = reply.data.remove(key).unwrap_or(Value::Null);
        let entries = serde_json::from_value(entries)
            .map_err(|err| ClientError::Protocol(format!("`{key}`: {err}")))?;
        let next = match reply.data.remove("next") {
            None | Some(Value::Null) => None,
            Some(Value::String(next)) => Some(next),
            Some(other) => {
                return Err(ClientError::Protocol(format!(
                    "`next` is not a string: {other}"
                )));
            }
        };
        Ok(Page { entries, next })
    }
}

/// The `data` of a `list` request: the whole list without `limit`, else
/// one page, after the `after` cursor when given.
pub fn list_data(kind: ListType, limit: Option<u32>, after: Option<&str>) -> Value {
    let mut data = Data::new();
    data.insert("list_type".into(), json!(kind));
    if let Some(limit) = limit {
        data.insert("limit".into(), json!(limit));
    }
    if let Some(after) = after {
        data.insert("after".into(), json!(after));
    }
    Value::Object(data)
}

pub struct Client {
    reader: BufReader<ReadHalf>,
    writer: WriteHalf,
    /// Event lines (after `watch`) that arrived while a reply was awaited.
    events: VecDeque<String>,
    /// The part of a line read so far: kept here, not in a local, so that a
    /// read cancelled in a `select!` loses nothing.
    partial: Vec<u8>,
}

/// Event lines have no `status` key; replies always do.
pub fn is_event(line: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        status: Option<serde::de::IgnoredAny>,
        event: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_str::<Probe>(line).is_ok_and(|p| p.status.is_none() && p.event.is_some())
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("events", &self.events.len())
            .field("partial", &self.partial.len())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects over plain TCP.
    pub async fn connect(addr: impl ToSocketAddrs) -> io::Result<Client> {
        Client::from_stream(TcpStream::connect(addr).await?)
    }

    /// A client over a TCP connection made by the caller (from a chosen
    /// local address, through a proxy, ...).
    pub fn from_stream(stream: TcpStream) -> io::Result<Client> {
        stream.set_nodelay(true)?;
        let (reader, writer) = stream.into_split();
        Ok(Client::from_halves(Box::new(reader), Box::new(writer)))
    }

    /// Connects over TLS and completes the handshake, checking the server's
    /// certificate against `server_name` (a DNS name or an IP address).
    ///
    /// With TLS 1.3 a server that refuses this client's certificate (or its
    /// lack of one) says so only after the handshake: the first request then
    /// fails.
    pub async fn connect_tls(
        addr: impl ToSocketAddrs,
        config: Arc<ClientConfig>,
        server_name: &str,
    ) -> io::Result<Client> {
        let name = crate::tls::server_name(server_name)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        let stream = TcpStream::connect(addr).await?;
        Client::tls_handshake(stream, config, name).await
    }

    /// [`Client::connect_tls`] over a TCP connection made by the caller (a
    /// balancer's, which has sent its PROXY header first, for instance).
    pub async fn tls_from_stream(
        stream: TcpStream,
        config: Arc<ClientConfig>,
        server_name: &str,
    ) -> io::Result<Client> {
        let name = crate::tls::server_name(server_name)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        Client::tls_handshake(stream, config, name).await
    }

    async fn tls_handshake(
        stream: TcpStream,
        config: Arc<ClientConfig>,
        name: crate::tls::ServerName<'static>,
    ) -> io::Result<Client> {
        stream.set_nodelay(true)?;
        let stream = TlsConnector::from(config).connect(name, stream).await?;
        let (reader, writer) = tokio::io::split(stream);
        Ok(Client::from_halves(Box::new(reader), Box::new(writer)))
    }

    fn from_halves(reader: ReadHalf, writer: WriteHalf) -> Client {
        Client {
            reader: BufReader::new(reader),
            writer,
            events: VecDeque::new(),
            partial: Vec::new(),
        }
    }

    /// Sends `text` as it is (plus a newline) and returns the next reply line,
    /// without its newline. Event lines that come first are kept for
    /// [`Client::next_event`].
    pub async fn send_raw(&mut self, text: &str) -> Result<String> {
        let mut line = Vec::with_capacity(text.len() + 1);
        line.extend_from_slice(text.as_bytes());
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        // A no-op on TCP; TLS may hold the last record until flushed.
        self.writer.flush().await?;
        self.read_reply().await
    }

    /// Reads the next reply line, keeping the event lines before it.
    pub async fn read_reply(&mut self) -> Result<String> {
        loop {
            let line = self.read_line().await?;
            if !is_event(&line) {
                return Ok(line);
            }
            self.events.push_back(line);
        }
    }

    /// The next event line (after `watch`), waiting for it if none is kept.
    /// Cancel safe; use it when no request is pending.
    pub async fn next_event(&mut self) -> Result<String> {
        if let Some(event) = self.events.pop_front() {
            return Ok(event);
        }
        let line = self.read_line().await?;
        if is_event(&line) {
            Ok(line)
        } else {
            Err(ClientError::Protocol(format!(
                "a reply with no request: {line}"
            )))
        }
    }

    /// Event lines that arrived while replies were awaited.
    pub fn take_events(&mut self) -> Vec<String> {
        self.events.drain(..).collect()
    }

    /// Reads the next line the server sends, reply or event, without its
    /// newline. Cancel safe.
    pub async fn read_line(&mut self) -> Result<String> {
        if self.reader.read_until(b'\n', &mut self.partial).await? == 0
            || self.partial.last() != Some(&b'\n')
        {
            return Err(ClientError::Closed);
        }
        let mut line = std::mem::take(&mut self.partial);
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        String::from_utf8(line)
            .map_err(|_| ClientError::Protocol("a line that is not UTF-8".into()))
    }

    /// Sends a request and returns the reply, success or error.
    pub async fn call(&mut self, command: &str, data: Value) -> Result<Reply> {
        let data = match data {
            Value::Object(data) => data,
            Value::Null => Data::new(),
            other => {
                return Err(ClientError::Protocol(format!(
                    "`data` must be an object, not {other}"
                )));
            }
        };
        let request = Request {
            command: command.to_owned(),
            data,
            id: None,
        };
        let line = self.send_raw(&request.to_value().to_string()).await?;
        serde_json::from_str(&line).map_err(|err| ClientError::Protocol(err.to_string()))
    }

    /// Like [`Client::call`], but an error reply becomes `Err`, and the value
    /// under `key` in `data` is decoded (`key` empty: nothing is decoded).
    pub async fn request<T: DeserializeOwned>(
        &mut self,
        command: &str,
        data: Value,
        key: &str,
    ) -> Result<T> {
        let reply = self.call(command, data).await?;
        if !reply.is_success() {
            return Err(ClientError::Server {
                code: reply.code.unwrap_or(ErrorCode::Internal),
                message: reply.message,
            });
        }
        let value = if key.is_empty() {
            Value::Null
        } else {
            reply.data.get(key).cloned().unwrap_or(Value::Null)
        };
        serde_json::from_value(value)
            .map_err(|err| ClientError::Protocol(format!("`{key}`: {err}")))
    }

    pub async fn ping(&mut self) -> Result<()> {
        self.request("ping", json!({}), "").await
    }

    pub async fn register(&mut self, registration: &Registration) -> Result<VmView> {
        self.request("register", registration.to_data(), "vm").await
    }

    pub async fn authenticate(&mut self, vm_id: &str, password: &str) -> Result<VmView> {
        let data = json!({"vm_id": vm_id, "password": password});
        self.request("authenticate", data, "vm").await
    }

    /// Authenticates with the password and returns the session token too,
    /// for [`Client::resume`] after a reconnect.
    pub async fn login(&mut self, vm_id: &str, password: &str) -> Result<(VmView, String)> {
        let data = json!({"vm_id": vm_id, "password": password});
        let reply = self.call("authenticate", data).await?;
        if !reply.is_success() {
            return Err(ClientError::Server {
                code: reply.code.unwrap_or(ErrorCode::Internal),
                message: reply.message,
            });
        }
        let field = |key: &str| reply.data.get(key).cloned().unwrap_or(Value::Null);
        let vm = serde_json::from_value(field("vm"))
            .map_err(|err| ClientError::Protocol(format!("`vm`: {err}")))?;
        let token = serde_json::from_value(field("token"))
            .map_err(|err| ClientError::Protocol(format!("`token`: {err}")))?;
        Ok((vm, token))
    }

    /// Authenticates with a token from an earlier [`Client::login`]: no
    /// password is sent and the server computes no hash.
    pub async fn resume(&mut self, vm_id: &str, token: &str) -> Result<VmView> {
        let data = json!({"vm_id": vm_id, "token": token});
        self.request("authenticate", data, "vm").await
    }

    pub async fn update(&mut self, update: &Update) -> Result<VmView> {
        self.request("update", update.to_data(), "vm").await
    }

    pub async fn logout(&mut self) -> Result<()> {
        self.request("logout", json!({}), "").await
    }

    /// Subscribes to change events; `topics` empty means all of them. Read
    /// them with [`Client::next_event`].
    pub async fn watch(&mut self, topics: &[&str]) -> Result<Vec<String>> {
        let data = if topics.is_empty() {
            json!({})
        } else {
            json!({"topics": topics})
        };
        self.request("watch", data, "topics").await
    }

    pub async fn unwatch(&mut self) -> Result<()> {
        self.request("unwatch", json!({}), "").await
    }

    pub async fn help(&mut self) -> Result<Vec<CommandHelp>> {
        self.request("help", json!({}), "commands").await
    }

    async fn list<T: DeserializeOwned>(&mut self, kind: ListType) -> Result<Vec<T>> {
        let data = json!({"list_type": kind});
        self.request("list", data, kind.as_str()).await
    }

    /// One page of `kind`: at most `limit` entries (1 to 10,000; `None`:
    /// all of them) after the cursor `after` (`None`: from the start).
    /// `T` is the list's entry type ([`ActiveSession`], [`VmStatus`], ...),
    /// or [`Value`] to keep the entries as they came.
    pub async fn list_page<T: DeserializeOwned>(
        &mut self,
        kind: ListType,
        limit: Option<u32>,
        after: Option<&str>,
    ) -> Result<Page<T>> {
        let mut reply = self.call("list", list_data(kind, limit, after)).await?;
        if !reply.is_success() {
            return Err(ClientError::Server {
                code: reply.code.unwrap_or(ErrorCode::Internal),
                message: reply.message,
            });
        }
        Page::from_reply(kind, &mut reply)
    }

    pub async fn list_active(&mut self) -> Result<Vec<ActiveSession>> {
        self.list(ListType::ActiveVms).await
    }

    pub async fn list_authenticated(&mut self) -> Result<Vec<AuthenticatedSession>> {
        self.list(ListType::AuthenticatedVms).await
    }

    pub async fn list_all(&mut self) -> Result<Vec<VmStatus>> {
        self.list(ListType::AllVms).await
    }

    pub async fn list_disks(&mut self) -> Result<Vec<DiskEntry>> {
        self.list(ListType::AllDisks).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(data: Value) -> Reply {
        let Value::Object(data) = data else {
            panic!("data must be an object");
        };
        Reply::success("ok", data)
    }

    #[test]
    fn a_page_holds_its_entries_and_the_next_cursor() {
        let mut r = reply(json!({"all_disks": [{"id": 1}, {"id": 2}], "next": "abc"}));
        let page: Page<Value> = Page::from_reply(ListType::AllDisks, &mut r).unwrap();
        assert_eq!(page.entries.len(), 2);
        assert_eq!(page.next.as_deref(), Some("abc"));

        let mut last = reply(json!({"all_disks": []}));
        let page: Page<Value> = Page::from_reply(ListType::AllDisks, &mut last).unwrap();
        assert_eq!((page.entries.len(), page.next), (0, None));

        for bad in [
            json!({"all_vms": []}),
            json!({"all_disks": [], "next": 5}),
            json!({"all_disks": {}}),
        ] {
            let mut r = reply(bad);
            assert!(Page::<Value>::from_reply(ListType::AllDisks, &mut r).is_err());
        }
    }

    #[test]
    fn list_data_carries_only_what_is_given() {
        assert_eq!(
            list_data(ListType::AllVms, None, None),
            json!({"list_type": "all_vms"})
        );
        assert_eq!(
            list_data(ListType::ActiveVms, Some(2), Some("c")),
            json!({"list_type": "active_vms", "limit": 2, "after": "c"})
        );
    }
}
