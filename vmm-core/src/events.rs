//! Change events for `watch`, shared by every instance on the database: what
//! an event and a topic are, and the fan-out to this instance's watchers.
//!
//! Triggers (migration V3) publish each change with NOTIFY, in commit order,
//! whichever instance made it; [`crate::listener`] receives them and sends
//! them here. The fan-out is a bounded broadcast channel: a watcher that
//! falls behind by more than its capacity is disconnected instead of
//! buffering without bound.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};

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
    /// `{"event": ..., "data": {...}, "at": ..., "seq": ...}` and a newline.
    pub line: Arc<str>,
    /// Its place in the event log (migration V9), shared by every instance
    /// and increasing in commit order; 0 for what is not logged (the
    /// revocations that only instances hear).
    pub seq: i64,
}

impl Event {
    /// PostgreSQL writes `json` with spaces around `:` and after `,`
    /// (`{"event" : "vm_updated", ...}`); the line is written compact, as
    /// replies are and as the README shows events, keeping the key order
    /// (serde_json's `preserve_order`). Once per event per instance, not per
    /// watcher.
    pub(crate) fn from_payload(payload: &str) -> Option<Event> {
        let value: serde_json::Value = serde_json::from_str(payload).ok()?;
        let name = value.get("event")?.as_str()?.into();
        let seq = value.get("seq").and_then(|seq| seq.as_i64()).unwrap_or(0);
        Some(Event {
            name,
            line: format!("{value}\n").into(),
            seq,
        })
    }
}

/// The fan-out of events to this instance's watchers.
#[derive(Debug)]
pub struct Events {
    pub(crate) sender: broadcast::Sender<Event>,
    /// True while the listening connection is up: only then does a new
    /// watcher get every event after its `watch` reply.
    pub(crate) listening: watch::Sender<bool>,
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
        assert!(Event::from_payload(r#"{"data":{}}"#).is_none());
    }

    #[test]
    fn event_lines_are_compact_in_their_key_order() {
        // As PostgreSQL's json_build_object writes it.
        let payload = r#"{"event" : "vm_updated", "data" : {"vm" : {"vm_id" : "a", "disks" : [{"id" : 1, "disk_size" : 2}]}}, "at" : "t"}"#;
        let event = Event::from_payload(payload).unwrap();
        assert_eq!(&*event.name, "vm_updated");
        assert_eq!(
            &*event.line,
            "{\"event\":\"vm_updated\",\"data\":{\"vm\":{\"vm_id\":\"a\",\"disks\":[{\"id\":1,\"disk_size\":2}]}},\"at\":\"t\"}\n"
        );
    }
}
