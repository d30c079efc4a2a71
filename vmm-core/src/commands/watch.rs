//! `watch` and `unwatch`: change events from every instance, live, and
//! resumable from the event log, for an authenticated session.
//!
//! ```text
//! -> {"command": "watch", "data": {"topics": ["vms", "sessions"]}}
//! <- {"status":"success","message":"watching vms, sessions","data":{"topics":["vms","sessions"],"seq":41}}
//! <- {"event":"session_authenticated","data":{"session_id":4294967298,...},"at":"2026-11-28T18:40:00.000000Z","seq":42}
//! <- {"event":"vm_updated","data":{"vm":{...}},"at":"...","seq":43}
//! -> {"command": "watch", "data": {"since": 43}}
//! <- {"status":"success","message":"watching vms, sessions, disks","data":{"topics":[...],"seq":43}}
//! <- the events after 43 that are in the log, in order, then live ones
//! -> {"command": "watch", "data": {"since": 7}}
//! <- {"status":"error","message":"the events after 7 are no longer kept ...","data":{"oldest":120,"latest":4711},"code":"gone"}
//! -> {"command": "unwatch", "data": {}}
//! <- {"status":"success","message":"stopped watching","data":{}}
//! ```
//!
//! Topics: `vms` (`vm_registered`, `vm_updated`), `disks` (the same events,
//! which carry the VM's disks), `sessions` (`session_opened`,
//! `session_authenticated`, `session_logged_out`, `session_closed`,
//! `instance_lost`); all of them when `topics` is left out. Event lines have
//! no `status` key, which is how a client tells them from replies. The
//! connection keeps serving requests meanwhile.
//!
//! Every event has a `seq`, shared by every instance and increasing in
//! commit order (migration V9). The reply's `data.seq` is where the watch
//! starts: the events after it follow, each once, in order. With `since`,
//! they start after that `seq`, from the log; a `since` older than the log
//! keeps (`--event-retention`), or one never issued, is `gone`, with the
//! oldest kept and the latest `seq` in `data`. A watcher that falls behind
//! the live events catches up from the log too; one that cannot (the log
//! was pruned past it, or the database does not answer) is disconnected.
//! Logging out stops watching.

use std::time::Duration;

use serde::Deserialize;

use crate::context::Context;
use crate::error::Error;
use crate::events::Topic;
use crate::params;
use crate::protocol::Data;
use crate::protocol::ErrorCode;
use crate::registry::{Command, HandlerFuture, Success};
use crate::session::Session;
use crate::store::EventLog;

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
    since: Option<i64>,
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
        if p.since.is_some_and(|since| since < 0) {
            return Err(Error::invalid_params(
                "`since` is a `seq` from an event line or a `watch` reply: 0 or more",
            ));
        }
        // Subscribed before the log is read, so that what is published
        // meanwhile is in one or the other (see `Session::watch`).
        let Some(events) = ctx.events.subscribe(Duration::from_secs(2)).await else {
            return Err(Error::unavailable());
        };
        let log = ctx.store.event_log().await?;
        let (last, behind) = match p.since {
            None => (log.latest, false),
            Some(since) if (log.pruned_upto..=log.latest).contains(&since) => (since, true),
            Some(since) => return Err(gone(since, &log)),
        };
        session.watch(topics, events, last, behind);
        Success::new(message)
            .with("topics", names)?
            .with("seq", last)
    })
}

/// The reply to a `since` the log cannot serve.
fn gone(since: i64, log: &EventLog) -> Error {
    let message = if since > log.latest {
        format!(
            "`since` {since} was never issued: the latest event is {}",
            log.latest
        )
    } else {
        format!(
            "the events after {since} are no longer kept (see data.oldest): list again, \
             then watch from data.latest"
        )
    };
    let mut err = Error::new(ErrorCode::Gone, message);
    err.data.insert("oldest".into(), log.oldest.into());
    err.data.insert("latest".into(), log.latest.into());
    err
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
