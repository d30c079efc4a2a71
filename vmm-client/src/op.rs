//! The requests this client sends: what each operation carries and its wire
//! text. A plain value with no I/O, at the bottom of the crate, so that the
//! connection (which sends it), the renderer (which draws its reply) and the
//! modules that build one can all use it without depending on each other.

use serde_json::{Value, json};
use vmm_core::client::{Registration, Update, list_data};
use vmm_core::protocol::ListType;
use vmm_core::{Data, Request};

/// One request the client knows how to build and show the answer of.
#[derive(Debug, Clone)]
pub enum Op {
    Ping,
    Register(Registration),
    Authenticate {
        vm_id: String,
        password: String,
    },
    /// `list`: the whole list, or with `limit` one page (after the cursor
    /// `after`, the `next` of the page before).
    List {
        kind: ListType,
        limit: Option<u32>,
        after: Option<String>,
    },
    Update(Update),
    Logout,
    /// `watch` with these topics (none: every topic), from the events
    /// after `since` (none: from now on).
    Watch {
        topics: Vec<String>,
        since: Option<i64>,
    },
    Unwatch,
    Help,
    /// Open an operator session with the admin token.
    Operator {
        admin_token: String,
    },
    /// Read the audit trail (operator sessions).
    Audit {
        vm_id: Option<String>,
        limit: Option<u32>,
    },
    /// End every session of a VM (operator sessions).
    Revoke {
        vm_id: String,
    },
    /// Every live instance's figures (operator sessions; `top`).
    Stats,
}

impl Op {
    pub fn command(&self) -> &'static str {
        match self {
            Op::Ping => "ping",
            Op::Register(_) => "register",
            Op::Authenticate { .. } => "authenticate",
            Op::List { .. } => "list",
            Op::Update(_) => "update",
            Op::Logout => "logout",
            Op::Watch { .. } => "watch",
            Op::Unwatch => "unwatch",
            Op::Help => "help",
            Op::Operator { .. } => "authenticate",
            Op::Audit { .. } => "audit",
            Op::Revoke { .. } => "revoke",
            Op::Stats => "stats",
        }
    }

    fn data(&self) -> Value {
        match self {
            Op::Ping | Op::Logout | Op::Unwatch | Op::Help | Op::Stats => json!({}),
            Op::Watch { topics, since } => {
                let mut data = serde_json::Map::new();
                if !topics.is_empty() {
                    data.insert("topics".into(), json!(topics));
                }
                if let Some(since) = since {
                    data.insert("since".into(), json!(since));
                }
                Value::Object(data)
            }
            Op::Register(registration) => registration.to_data(),
            Op::Authenticate { vm_id, password } => {
                json!({"vm_id": vm_id, "password": password})
            }
            Op::List { kind, limit, after } => list_data(*kind, *limit, after.as_deref()),
            Op::Update(update) => update.to_data(),
            Op::Operator { admin_token } => json!({"admin_token": admin_token}),
            Op::Revoke { vm_id } => json!({"vm_id": vm_id}),
            Op::Audit { vm_id, limit } => {
                let mut data = serde_json::Map::new();
                if let Some(vm_id) = vm_id {
                    data.insert("vm_id".into(), json!(vm_id));
                }
                if let Some(limit) = limit {
                    data.insert("limit".into(), json!(limit));
                }
                Value::Object(data)
            }
        }
    }

    /// The request as it goes on the wire.
    pub fn to_text(&self) -> String {
        let data = match self.data() {
            Value::Object(data) => data,
            _ => Data::new(),
        };
        Request {
            command: self.command().to_owned(),
            data,
            id: None,
        }
        .to_value()
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_no_id() {
        let text = Op::List {
            kind: ListType::AllDisks,
            limit: None,
            after: None,
        }
        .to_text();
        assert_eq!(
            text,
            r#"{"command":"list","data":{"list_type":"all_disks"}}"#
        );
        let page = Op::List {
            kind: ListType::AllVms,
            limit: Some(2),
            after: Some("YWxsX3Ztczpi".into()),
        };
        assert_eq!(
            page.to_text(),
            r#"{"command":"list","data":{"list_type":"all_vms","limit":2,"after":"YWxsX3Ztczpi"}}"#
        );
        assert_eq!(Op::Ping.to_text(), r#"{"command":"ping","data":{}}"#);
        let watch = |topics: &[&str], since| Op::Watch {
            topics: topics.iter().map(|topic| (*topic).to_owned()).collect(),
            since,
        };
        assert_eq!(
            watch(&[], None).to_text(),
            r#"{"command":"watch","data":{}}"#
        );
        assert_eq!(
            watch(&["vms"], Some(41)).to_text(),
            r#"{"command":"watch","data":{"topics":["vms"],"since":41}}"#
        );
    }
}
