//! Change events for `watch`, shared by every instance on the database.
//!
//! Triggers (migration V3) publish each change with NOTIFY, in commit order,
//! whichever instance made it. Each instance keeps one dedicated connection
//! that LISTENs and fans the events out to its watchers over a bounded
//! broadcast channel: a watcher that falls behind by more than its capacity
//! is disconnected instead of buffering without bound. Events that happen
//! while the listening connection is down are lost; it reconnects with
//! backoff.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_postgres::{AsyncMessage, NoTls};

use crate::context::Context;
use crate::presence::AbortOnDrop;

/// The NOTIFY channel the triggers publish on.
pub const CHANNEL: &str = "vmm_events";

/// How many events a watcher may fall behind before it is disconnected.
pub const WATCHER_BACKLOG: usize = 1024;

/// What a watcher can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Vms,
    Sessions,
    Disks,
}

impl Topic {
    pub const ALL: [Topic; 3] = [Topic::Vms, Topic::Sessions, Topic::Disks];

    pub fn parse(name: &str) -> Option<Topic> {
        match name {
            "vms" => Some(Topic::Vms),
            "sessions" => Some(Topic::Sessions),
            "disks" => Some(Topic::Disks),
            _ => None,
        }
    }

    /// Whether an event of this name belongs to the topic. VM events carry
    /// the VM's disks, so they are the `disks` topic too.
    pub fn covers(self, event: &str) -> bool {
        match self {
            Topic::Vms | Topic::Disks => matches!(event, "vm_registered" | "vm_updated"),
            Topic::Sessions => event.starts_with("session_") || event == "instance_lost",
        }
    }
}

/// One event, as the line sent to watchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: Arc<str>,
    /// `{"event": ..., "data": {...}, "at": ...}` and a newline.
    pub line: Arc<str>,
}

impl Event {
    fn from_payload(payload: &str) -> Option<Event> {
        #[derive(Deserialize)]
        struct Head {
            event: String,
        }
        let head: Head = serde_json::from_str(payload).ok()?;
        Some(Event {
            name: head.event.into(),
            line: format!("{payload}\n").into(),
        })
    }
}

/// The fan-out of events to this instance's watchers.
#[derive(Debug)]
pub struct Events {
    sender: broadcast::Sender<Event>,
    /// True while the listening connection is up: only then does a new
    /// watcher get every event after its `watch` reply.
    listening: watch::Sender<bool>,
}

impl Default for Events {
    fn default() -> Events {
        Events {
            sender: broadcast::channel(WATCHER_BACKLOG).0,
            listening: watch::channel(false).0,
        }
    }
}

impl Events {
    /// A receiver of every event from now on, once the instance is listening
    /// (waiting up to `patience` for that).
    pub async fn subscribe(&self, patience: Duration) -> Option<broadcast::Receiver<Event>> {
        let mut listening = self.listening.subscribe();
        let ready = tokio::time::timeout(patience, listening.wait_for(|up| *up)).await;
        matches!(ready, Ok(Ok(_))).then(|| self.sender.subscribe())
    }
}

/// The event that tells every instance which token families were revoked
/// (migration V7); for the sessions, never for watchers.
const REVOKED: &str = "tokens_revoked";

/// Ends this instance's sessions of the revoked families.
fn revoke(context: &Context, event: &Event) {
    #[derive(Deserialize)]
    struct Revoked {
        data: Families,
    }
    #[derive(Deserialize)]
    struct Families {
        families: Vec<i64>,
    }
    let line = event.line.trim_end();
    match serde_json::from_str::<Revoked>(line) {
        Ok(revoked) => {
            let told = context.sessions.revoke(&revoked.data.families);
            if told > 0 {
                tracing::info!(sessions = told, "token revoked: ending its sessions");
            }
        }
        Err(_) => tracing::warn!("ignoring a malformed revocation"),
    }
}

/// Revocations committed while this instance was not listening reached no
/// one here: after (re)connecting, the families of its VM sessions are
/// checked against the token store, in one query, and the dead ones end.
async fn revoke_missed(context: &Context) {
    let families = context.sessions.live_families();
    if families.is_empty() {
        return;
    }
    match context.store.live_families(&families).await {
        Ok(live) => {
            let live: std::collections::HashSet<i64> = live.into_iter().collect();
            let dead: Vec<i64> = families.into_iter().filter(|f| !live.contains(f)).collect();
            let told = context.sessions.revoke(&dead);
            if told > 0 {
                tracing::info!(
                    sessions = told,
                    "tokens revoked while not listening: ending their sessions"
                );
            }
        }
        Err(err) => tracing::warn!(error = %err, "cannot check for missed revocations"),
    }
}

/// Listens for events until dropped, reconnecting when the connection fails.
pub(crate) fn listen(context: Arc<Context>) -> AbortOnDrop {
    AbortOnDrop::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let result = relay(&context).await;
            context.events.listening.send_replace(false);
            match result {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(err) => {
                    tracing::warn!(error = %err, "event listener disconnected; events are lost until it is back");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

/// One listening connection's life: LISTEN, then forward every notification.
async fn relay(context: &Context) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) =
        tokio_postgres::connect(&context.config.database_url, NoTls).await?;
    let (notes, mut received) = mpsc::channel(WATCHER_BACKLOG);
    // The connection must be polled for the LISTEN to complete and for
    // notifications to arrive: a task drives it and hands them over.
    let driver = AbortOnDrop::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(note))) => {
                    if notes.send(note).await.is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "event connection failed");
                    break;
                }
                None => break,
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    tracing::debug!("listening for events");
    let events = &context.events;
    events.listening.send_replace(true);
    revoke_missed(context).await;
    while let Some(note) = received.recv().await {
        match Event::from_payload(note.payload()) {
            Some(event) if &*event.name == REVOKED => revoke(context, &event),
            // No receiver is fine: nobody is watching.
            Some(event) => drop(events.sender.send(event)),
            None => tracing::warn!("ignoring a malformed event"),
        }
    }
    events.listening.send_replace(false);
    drop(driver);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_cover_their_events() {
        assert!(Topic::Vms.covers("vm_updated") && Topic::Disks.covers("vm_registered"));
        assert!(
            Topic::Sessions.covers("session_closed") && Topic::Sessions.covers("instance_lost")
        );
        assert!(!Topic::Sessions.covers("vm_updated") && !Topic::Vms.covers("session_opened"));
        let event = Event::from_payload(r#"{"event":"vm_updated","data":{},"at":"x"}"#).unwrap();
        assert_eq!(&*event.name, "vm_updated");
        assert!(event.line.ends_with("}\n"));
        assert!(Event::from_payload("nope").is_none());
    }
}
