//! Wire protocol v1: every type that crosses the socket, in one place.
//!
//! A request is a JSON object `{"command": "...", "data": {...}, "id": ...}`; a
//! reply is one compact JSON object per line whose keys come in the order
//! `status`, `message`, `data`, `code`, `id`. The struct field order below *is*
//! that key order, so do not reorder fields.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The `data` object of a request or reply.
pub type Data = Map<String, Value>;

/// A decoded request. Unknown top-level fields are ignored on purpose: the old
/// clients send extras and we promised to keep them working.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub command: String,
    pub data: Data,
    /// Echoed verbatim in the reply; `Some(Value::Null)` for `"id": null`.
    pub id: Option<Value>,
}

/// Why bytes that form one JSON value are not a request.
#[derive(Debug, Clone, PartialEq)]
pub enum BadRequest {
    /// Not JSON at all (or not UTF-8): the rest of its line is skipped.
    NotJson,
    /// Valid JSON of the wrong shape, with the request's `id` when it could
    /// be read, so that a pipelining client can match the error to its request.
    Refused(ErrorCode, &'static str, Option<Value>),
}

/// A request's top-level fields, each decoded as any JSON value so that its
/// type is checked below with a message that names it. Other fields are
/// skipped without being built.
#[derive(Deserialize)]
struct Fields {
    #[serde(default, deserialize_with = "present")]
    command: Option<Value>,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    id: Option<Value>,
}

/// A request's top-level fields as slices of its text: found by one scan,
/// with nothing built, so that only what is used is decoded, once.
#[derive(Deserialize)]
struct RawFields<'a> {
    #[serde(borrow, default, deserialize_with = "present_command")]
    command: Option<CommandField<'a>>,
    #[serde(borrow, default, deserialize_with = "present_raw")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present_raw")]
    id: Option<&'a RawValue>,
}

/// A request's `command`, read in the same pass as the rest: the name as a
/// slice of the request when it has no escapes, or whether it was not a
/// string at all (so that the reply can say so).
enum CommandField<'a> {
    Borrowed(&'a str),
    Unescaped(String),
    NotAString,
}

impl<'de> Deserialize<'de> for CommandField<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = CommandField<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, name: &'de str) -> Result<Self::Value, E> {
                Ok(CommandField::Borrowed(name))
            }
            fn visit_str<E>(self, name: &str) -> Result<Self::Value, E> {
                Ok(CommandField::Unescaped(name.to_owned()))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(CommandField::NotAString)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(CommandField::NotAString)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(CommandField::NotAString)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(CommandField::NotAString)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(CommandField::NotAString)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(CommandField::NotAString)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(CommandField::NotAString)
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

/// Keeps a `null` command distinct from a missing one.
fn present_command<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<CommandField<'de>>, D::Error> {
    CommandField::deserialize(deserializer).map(Some)
}

/// Keeps a `null` field distinct from a missing one.
fn present_raw<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

impl RawFields<'_> {
    fn request(self) -> Result<Request, BadRequest> {
        let refused =
            |message, id| Err(BadRequest::Refused(ErrorCode::InvalidRequest, message, id));
        // Each is valid JSON already; only its type can be wrong.
        let decode = |raw: &RawValue| serde_json::from_str::<Value>(raw.get()).ok();
        let id = match self.id.map(decode) {
            None => None,
            Some(Some(id @ (Value::String(_) | Value::Number(_) | Value::Null))) => Some(id),
            Some(_) => return refused("`id` must be a string, a number or null", None),
        };
        let command = match self.command {
            Some(CommandField::Borrowed(name)) => name.to_owned(),
            Some(CommandField::Unescaped(name)) => name,
            Some(CommandField::NotAString) => return refused("`command` must be a string", id),
            None => return refused("`command` is required", id),
        };
        let data = match self.data.map(RawValue::get) {
            None | Some("null") => Data::new(),
            Some(text) if text.starts_with('{') => match serde_json::from_str::<Data>(text) {
                Ok(data) => data,
                Err(_) => return refused("`data` must be an object", id),
            },
            Some(_) => return refused("`data` must be an object", id),
        };
        Ok(Request { command, data, id })
    }
}

impl Request {
    /// Decodes a request straight from its bytes, with no intermediate
    /// `Value` of the whole request: the server's hot path.
    pub fn from_slice(bytes: &[u8]) -> Result<Request, BadRequest> {
        // serde_json skips unknown fields' strings without checking that
        // they are UTF-8, and a request that is not UTF-8 is not JSON.
        let text = std::str::from_utf8(bytes).map_err(|_| BadRequest::NotJson)?;
        match serde_json::from_str::<RawFields>(text) {
            Ok(fields) => fields.request(),
            Err(err) if err.is_data() && err.to_string().starts_with("duplicate field") => {
                Err(BadRequest::Refused(
                    ErrorCode::InvalidRequest,
                    "`command`, `data` and `id` may each appear only once",
                    None,
                ))
            }
            Err(err) if err.is_data() => Err(BadRequest::Refused(
                ErrorCode::InvalidRequest,
                "a request must be a JSON object",
                None,
            )),
            Err(_) => Err(BadRequest::NotJson),
        }
    }

    /// [`Request::from_slice`] for one line that should hold exactly one JSON
    /// object: `None` when it does not (it is not JSON, or there is more
    /// after the object), so that the caller frames it the slow way.
    pub fn from_line(line: &[u8]) -> Option<Result<Request, BadRequest>> {
        let text = std::str::from_utf8(line).ok()?;
        let fields = serde_json::from_str::<RawFields>(text).ok()?;
        Some(fields.request())
    }

    /// Validates the shape of a decoded JSON value. On failure the error still
    /// carries the request's `id` when one could be read, so that a pipelining
    /// client can match the error to its request.
    pub fn from_value(value: Value) -> Result<Request, (ErrorCode, &'static str, Option<Value>)> {
        let Value::Object(mut object) = value else {
            return Err((
                ErrorCode::InvalidRequest,
                "a request must be a JSON object",
                None,
            ));
        };
        let fields = Fields {
            command: object.remove("command"),
            data: object.remove("data"),
            id: object.remove("id"),
        };
        Request::from_fields(fields).map_err(|bad| match bad {
            BadRequest::Refused(code, message, id) => (code, message, id),
            BadRequest::NotJson => (ErrorCode::InvalidJson, "not JSON", None),
        })
    }

    fn from_fields(fields: Fields) -> Result<Request, BadRequest> {
        let refused =
            |message, id| Err(BadRequest::Refused(ErrorCode::InvalidRequest, message, id));
        let id = match fields.id {
            None => None,
            Some(id @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(id),
            Some(_) => return refused("`id` must be a string, a number or null", None),
        };
        let command = match fields.command {
            Some(Value::String(command)) => command,
            Some(_) => return refused("`command` must be a string", id),
            None => return refused("`command` is required", id),
        };
        let data = match fields.data {
            None | Some(Value::Null) => Data::new(),
            Some(Value::Object(data)) => data,
            Some(_) => return refused("`data` must be an object", id),
        };
        Ok(Request { command, data, id })
    }

    /// The request as it goes on the wire (used by the client).
    pub fn to_value(&self) -> Value {
        let mut object = Map::new();
        object.insert("command".into(), Value::String(self.command.clone()));
        object.insert("data".into(), Value::Object(self.data.clone()));
        if let Some(id) = &self.id {
            object.insert("id".into(), id.clone());
        }
        Value::Object(object)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Success,
    Error,
}

/// Stable error codes. Clients branch on these, so a code is never renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidJson,
    InvalidRequest,
    RequestTooLarge,
    UnknownCommand,
    InvalidParams,
    AlreadyExists,
    InvalidCredentials,
    NotAuthenticated,
    NotFound,
    ServerBusy,
    Unavailable,
    Internal,
    Forbidden,
    TooManyAttempts,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::InvalidJson,
        ErrorCode::InvalidRequest,
        ErrorCode::RequestTooLarge,
        ErrorCode::UnknownCommand,
        ErrorCode::InvalidParams,
        ErrorCode::AlreadyExists,
        ErrorCode::InvalidCredentials,
        ErrorCode::NotAuthenticated,
        ErrorCode::NotFound,
        ErrorCode::ServerBusy,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::Forbidden,
        ErrorCode::TooManyAttempts,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::RequestTooLarge => "request_too_large",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::InvalidParams => "invalid_params",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::InvalidCredentials => "invalid_credentials",
            ErrorCode::NotAuthenticated => "not_authenticated",
            ErrorCode::NotFound => "not_found",
            ErrorCode::ServerBusy => "server_busy",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooManyAttempts => "too_many_attempts",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reply line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub status: Status,
    pub message: String,
    #[serde(default)]
    pub data: Data,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub id: Option<Value>,
}

/// A reply borrowed from its parts, written straight into a connection's
/// buffer without building a [`Reply`]. Same keys, same order.
#[derive(Debug, Serialize)]
pub struct ReplyRef<'a> {
    pub status: Status,
    pub message: &'a str,
    pub data: &'a Data,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a Value>,
}

/// Keeps `"id": null` distinct from a missing `id`.
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

impl Reply {
    pub fn success(message: impl Into<String>, data: Data) -> Reply {
        Reply {
            status: Status::Success,
            message: message.into(),
            data,
            code: None,
            id: None,
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply {
            status: Status::Error,
            message: message.into(),
            data: Data::new(),
            code: Some(code),
            id: None,
        }
    }

    pub fn with_id(mut self, id: Option<Value>) -> Reply {
        self.id = id;
        self
    }

    pub fn is_success(&self) -> bool {
        self.status == Status::Success
    }

    pub fn as_ref(&self) -> ReplyRef<'_> {
        ReplyRef {
            status: self.status,
            message: &self.message,
            data: &self.data,
            code: self.code,
            id: self.id.as_ref(),
        }
    }

    /// The reply as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        // Serialising plain maps and strings cannot fail.
        let mut line = serde_json::to_vec(&self.as_ref()).unwrap_or_else(|_| {
            br#"{"status":"error","message":"internal error","data":{},"code":"internal"}"#.to_vec()
        });
        line.push(b'\n');
        line
    }
}

/// A point in time, on the wire as RFC 3339 UTC with microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub SystemTime);

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp(SystemTime::now())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_micros(self.0))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_rfc3339_weak(&text)
            .map(Timestamp)
            .map_err(serde::de::Error::custom)
    }
}

/// A disk as it appears inside a [`VmView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskView {
    pub id: i64,
    /// GiB.
    pub disk_size: u32,
}

/// A VM and its disks, as every command that returns a VM shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmView {
    pub vm_id: String,
    /// MiB.
    pub ram: u32,
    pub cpu: u32,
    pub disks: Vec<DiskView>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// The `list_type` values of the `list` command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListType {
    ActiveVms,
    AuthenticatedVms,
    AllVms,
    AllDisks,
}

impl ListType {
    pub fn as_str(self) -> &'static str {
        match self {
            ListType::ActiveVms => "active_vms",
            ListType::AuthenticatedVms => "authenticated_vms",
            ListType::AllVms => "all_vms",
            ListType::AllDisks => "all_disks",
        }
    }
}

/// An entry of `active_vms`: one per open connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveSession {
    pub session_id: u64,
    pub peer: String,
    pub connected_at: Timestamp,
    pub vm_id: Option<String>,
    pub authenticated: bool,
    pub vm: Option<VmView>,
}

/// An entry of `authenticated_vms`: one per authenticated connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthenticatedSession {
    #[serde(flatten)]
    pub vm: VmView,
    pub session_id: u64,
    pub peer: String,
    pub authenticated_at: Timestamp,
}

/// An entry of `all_vms`: every VM ever registered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    #[serde(flatten)]
    pub vm: VmView,
    pub connected: bool,
    pub authenticated: bool,
    pub last_seen_at: Option<Timestamp>,
}

/// An entry of `all_disks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEntry {
    pub id: i64,
    pub disk_size: u32,
    pub vm_id: String,
}

/// An entry of the `help` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandHelp {
    pub name: String,
    pub summary: String,
}

/// An entry of the `stats` reply: one live instance, its figures as of its
/// last lease renewal (`lease_age_ms` ago).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStats {
    pub id: i64,
    pub name: String,
    pub started_at: Timestamp,
    pub lease_age_ms: u64,
    #[serde(flatten)]
    pub snapshot: StatsSnapshot,
}

/// What an instance writes with each renewal of its lease. Every field
/// defaults, so that a snapshot written by another version of vmm still
/// reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatsSnapshot {
    /// Open connections.
    pub connections: u64,
    pub sessions: SessionCounts,
    /// Password hashes waiting for a hashing slot.
    pub password_queue: u64,
    pub db_pool: PoolCounts,
    /// Sessions watching change events.
    pub watchers: u64,
    /// The commands answered in the last minute, busiest first.
    pub commands: Vec<CommandStats>,
}

/// Live sessions by state, as `vmm_sessions` counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionCounts {
    /// Not authenticated.
    pub connected: u64,
    /// Authenticated as a VM.
    pub authenticated: u64,
    pub operator: u64,
}

/// The database pool: connections open, idle and in use, and requests
/// waiting for one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PoolCounts {
    pub size: u64,
    pub idle: u64,
    pub in_use: u64,
    pub waiting: u64,
}

/// One command's requests (every outcome) per second over the last 10 s and
/// the last minute, and its latency quantiles over the last minute.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CommandStats {
    pub command: String,
    pub rate_10s: f64,
    pub rate_1m: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Limits of protocol v1, shared by validation and the database's CHECKs.
pub mod limits {
    pub const VM_ID_MAX_LEN: usize = 64;
    pub const RAM: std::ops::RangeInclusive<i64> = 1..=4_194_304;
    pub const CPU: std::ops::RangeInclusive<i64> = 1..=1024;
    pub const DISK_SIZE: std::ops::RangeInclusive<i64> = 1..=1_048_576;
    pub const MAX_DISKS: usize = 64;
    pub const PASSWORD_LEN: std::ops::RangeInclusive<usize> = 8..=128;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reply_keys_come_in_protocol_order() {
        let reply = Reply::error(ErrorCode::NotFound, "no such disk").with_id(Some(json!(7)));
        assert_eq!(
            String::from_utf8(reply.to_line()).unwrap(),
            "{\"status\":\"error\",\"message\":\"no such disk\",\"data\":{},\"code\":\"not_found\",\"id\":7}\n"
        );
        let ok = Reply::success("PONG", Data::new());
        assert_eq!(
            String::from_utf8(ok.to_line()).unwrap(),
            "{\"status\":\"success\",\"message\":\"PONG\",\"data\":{}}\n"
        );
    }

    #[test]
    fn null_id_is_echoed() {
        let request = Request::from_value(json!({"command": "ping", "id": null})).unwrap();
        assert_eq!(request.id, Some(Value::Null));
        let line = Reply::success("PONG", Data::new())
            .with_id(request.id)
            .to_line();
        let back: Reply = serde_json::from_slice(&line).unwrap();
        assert_eq!(back.id, Some(Value::Null));
    }

    #[test]
    fn request_shape_is_checked() {
        let bad = [
            json!([1, 2]),
            json!({"data": {}}),
            json!({"command": 5}),
            json!({"command": "ping", "data": [1]}),
            json!({"command": "ping", "id": {"a": 1}}),
        ];
        for value in bad {
            let (code, _, _) = Request::from_value(value).unwrap_err();
            assert_eq!(code, ErrorCode::InvalidRequest);
        }
        let (_, _, id) = Request::from_value(json!({"id": "x"})).unwrap_err();
        assert_eq!(id, Some(json!("x")));
    }

    /// The server's decoder (straight from bytes) and `from_value` agree on
    /// every shape of request, good and bad.
    #[test]
    fn requests_decode_the_same_from_bytes_and_from_values() {
        for text in [
            r#"{"command":"ping"}"#,
            r#"{ "command" : "ping" , "data" : { } , "id" : 1 }"#,
            r#"{"command":"list","data":{"list_type":"all_vms","limit":2},"id":"x","extra":[1,{"a":2}]}"#,
            r#"{"command":"ping","data":null,"id":null}"#,
            r#"{"command":"ping","id":-1.5e3}"#,
            r#"{"command":7}"#,
            r#"{"command":"p\u0069ng","id":"\u0041"}"#,
            r#"{"command":null}"#,
            r#"{"command":true,"id":3}"#,
            r#"{"command":[1,{"a":[2]}],"id":4}"#,
            r#"{"command":{"x":[1]},"data":{}}"#,
            r#"{"command":-1.5}"#,
            r#"{"command":"ping","data":[]}"#,
            r#"{"command":"ping","data":"x","id":9}"#,
            r#"{"command":"ping","id":{}}"#,
            r#"{"command":"ping","id":[1]}"#,
            r#"{"data":{}}"#,
            r#"{"id":"only"}"#,
            r#"{}"#,
        ] {
            let value: Value = serde_json::from_str(text).unwrap();
            let from_bytes = Request::from_slice(text.as_bytes()).map_err(|bad| match bad {
                BadRequest::Refused(code, message, id) => (code, message, id),
                BadRequest::NotJson => panic!("{text} is JSON"),
            });
            assert_eq!(from_bytes, Request::from_value(value), "{text}");
        }
        for text in ["[1]", "\"s\"", "12", "null"] {
            assert!(
                matches!(
                    Request::from_slice(text.as_bytes()),
                    Err(BadRequest::Refused(ErrorCode::InvalidRequest, _, None))
                ),
                "{text}"
            );
        }
        for text in [&b"nope"[..], b"{\"command\":\"\xff\"}", b"{\"a\":1"] {
            assert_eq!(Request::from_slice(text), Err(BadRequest::NotJson));
        }
    }

    #[test]
    fn error_codes_serialise_as_their_names() {
        for code in ErrorCode::ALL {
            assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
        }
    }

    #[test]
    fn timestamps_round_trip() {
        let now = Timestamp::now();
        let text = serde_json::to_string(&now).unwrap();
        assert!(text.ends_with("Z\""), "{text}");
        let back: Timestamp = serde_json::from_str(&text).unwrap();
        let delta = now.0.duration_since(back.0).unwrap_or_default();
        assert!(delta.as_micros() < 1);
    }
}
