//! `audit`: the audit trail, newest first, for operator sessions only.
//!
//! ```text
//! -> {"command": "audit", "data": {"vm_id": "stalin", "limit": 20}}
//! <- {"status":"success","message":"2 events","data":{"events":[{"id":9,"at":"...",
//!     "instance_id":1,"peer":"10.0.0.7:50112","vm_id":"stalin","action":"update",
//!     "outcome":"success","detail":"ram 512→1024 MiB"}, ...]}}
//! ```
//!
//! Recorded: register, authenticate (success, failure, throttled), update
//! (what changed, old and new values), logout, `forbidden` refusals, and
//! connections refused for too many connections. Never a password or a
//! token. `vm_id` filters; `limit` is 1 to 1000 (default 100).

use serde::Deserialize;

use crate::context::Context;
use crate::error::Error;
use crate::params;
use crate::protocol::Data;
use crate::registry::{Command, HandlerFuture, Success};
use crate::session::Session;

inventory::submit! {
    Command {
        name: "audit",
        summary: "read the audit trail, newest first (operator sessions only)",
        handler,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    vm_id: Option<String>,
    limit: Option<i64>,
}

fn handler<'a>(ctx: &'a Context, session: &'a mut Session, data: Data) -> HandlerFuture<'a> {
    Box::pin(async move {
        if !session.is_operator() {
            if session.authenticated_vm().is_none() {
                return Err(Error::not_authenticated());
            }
            let vm = session.authenticated_vm().map(str::to_owned);
            ctx.audit(
                session,
                vm.as_deref(),
                "audit",
                "forbidden",
                "not an operator",
            )
            .await;
            return Err(Error::forbidden(
                "the audit trail is for operator sessions only",
            ));
        }
        let p: Params = params::parse(data)?;
        if let Some(vm_id) = &p.vm_id {
            params::vm_id(vm_id)?;
        }
        let limit = params::ranged("limit", p.limit.unwrap_or(100), 1..=1000, "")?;
        let events = ctx
            .store
            .audit_trail(p.vm_id.as_deref(), i64::from(limit))
            .await?;
        Success::new(format!("{} events", events.len())).with("events", events)
    })
}
