//! `stats`: every live instance's figures, for operator sessions only.
//!
//! ```text
//! -> {"command": "stats"}
//! <- {"status":"success","message":"2 instances","data":{"instances":[
//!     {"id":1,"name":"server","started_at":"2026-11-29T15:00:00.123456Z","lease_age_ms":412,
//!      "connections":3,"sessions":{"connected":1,"authenticated":1,"operator":1},
//!      "password_queue":0,"db_pool":{"size":4,"idle":3,"in_use":1,"waiting":0},"watchers":0,
//!      "commands":[{"command":"ping","rate_10s":1.2,"rate_1m":0.5,"p50_ms":0.1,"p99_ms":0.4}]},
//!     ...]}}
//! ```
//!
//! Instances are those whose lease is current, by name. Each one's figures
//! are those it wrote with its last lease renewal, `lease_age_ms` ago (see
//! `vmm_core::stats`), so one query answers for the fleet. `commands` holds
//! the commands answered in the last minute, busiest first: requests per
//! second over 10 s and 1 min (every outcome), and p50 and p99 over 1 min
//! in milliseconds, interpolated within the latency buckets of
//! `vmm_command_duration_seconds`.

use crate::context::Context;
use crate::error::Error;
use crate::params;
use crate::protocol::Data;
use crate::registry::{Command, HandlerFuture, Success};
use crate::session::Session;

inventory::submit! {
    Command {
        name: "stats",
        summary: "every live instance's connections, sessions, command rates and latencies (operator sessions only)",
        handler,
    }
}

fn handler<'a>(ctx: &'a Context, session: &'a mut Session, data: Data) -> HandlerFuture<'a> {
    Box::pin(async move {
        if !session.is_operator() {
            let Some(vm) = session.authenticated_vm().map(str::to_owned) else {
                return Err(Error::not_authenticated());
            };
            ctx.audit(session, Some(&vm), "stats", "forbidden", "not an operator")
                .await;
            return Err(Error::forbidden("stats are for operator sessions only"));
        }
        params::none(data)?;
        let instances = ctx.store.instance_stats().await?;
        let message = match instances.len() {
            1 => "1 instance".to_owned(),
            n => format!("{n} instances"),
        };
        Success::new(message).with("instances", instances)
    })
}
