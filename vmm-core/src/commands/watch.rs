//! `watch` and `unwatch`: live change events from every instance, for an
//! authenticated session.
//!
//! ```text
//! -> {"command": "watch", "data": {"topics": ["vms", "sessions"]}}
//! <- {"status":"success","message":"watching vms, sessions","data":{"topics":["vms","sessions"]}}
//! <- {"event":"session_authenticated","data":{"session_id":4294967298,...},"at":"2026-11-28T18:40:00.000000Z"}
//! <- {"event":"vm_updated","data":{"vm":{...}},"at":"..."}
//! -> {"command": "unwatch", "data": {}}
//! <- {"status":"success","message":"stopped watching","data":{}}
//! ```
//!
//! Topics: `vms` (`vm_registered`, `vm_updated`), `disks` (the same events,
//! which carry the VM's disks), `sessions` (`session_opened`,
//! `session_authenticated`, `session_logged_out`, `session_closed`,
//! `instance_lost`); all of them when `topics` is left out. Event lines have
//! no `status` key, which is how a client tells them from replies. The
//! connection keeps serving requests meanwhile. A watcher that falls more
//! than a thousand events behind is disconnected; logging out stops watching.

use std::time::Duration;

use serde::Deserialize;

use crate::context::Context;
use crate::error::Error;
use crate::events::Topic;
use crate::params;
use crate::protocol::Data;
use crate::registry::{Command, HandlerFuture, Success};
use crate::session::Session;

inventory::submit! {
    Command {
        name: "watch",
        summary: "receive change events (topics vms, sessions, disks) as they happen (needs authentication)",
        handler: watch,
    }
}

inventory::submit! {
    Command { name: "unwatch", summary: "stop receiving change events", handler: unwatch }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    topics: Option<Vec<String>>,
}

fn topic_name(topic: Topic) -> &'static str {
    match topic {
        Topic::Vms => "vms",
        Topic::Sessions => "sessions",
        Topic::Disks => "disks",
    }
}

fn watch<'a>(ctx: &'a Context, session: &'a mut Session, data: Data) -> HandlerFuture<'a> {
    Box::pin(async move {
        if !session.may_read() {
            return Err(super::unauthenticated(session, &data));
        }
        let p: Params = params::parse(data)?;
        let mut topics = Vec::new();
        for name in p
            .topics
            .unwrap_or_else(|| Topic::ALL.map(|t| topic_name(t).to_owned()).to_vec())
        {
            let topic = Topic::parse(&name).ok_or_else(|| {
                Error::invalid_params("`topics` may hold only \"vms\", \"sessions\" and \"disks\"")
            })?;
            if !topics.contains(&topic) {
                topics.push(topic);
            }
        }
        if topics.is_empty() {
            return Err(Error::invalid_params(
                "`topics` is empty: leave it out to watch everything",
            ));
        }
        let names: Vec<&str> = topics.iter().copied().map(topic_name).collect();
        let message = format!("watching {}", names.join(", "));
        let Some(events) = ctx.events.subscribe(Duration::from_secs(2)).await else {
            return Err(Error::unavailable());
        };
        session.watch(topics, events);
        Success::new(message).with("topics", names)
    })
}

fn unwatch<'a>(_: &'a Context, session: &'a mut Session, data: Data) -> HandlerFuture<'a> {
    Box::pin(async move {
        params::none(data)?;
        Ok(Success::new(if session.unwatch() {
            "stopped watching"
        } else {
            "was not watching"
        }))
    })
}
