//! Change events, the lines the server sends after `watch`: printed one line
//! each, verbatim with `--json`, else as people read them:
//!
//! ```text
//! 18:40:00.123 vm_updated stalin ram=1024 cpu=4 disks=1:150G,2:250G
//! 18:40:01.002 session_authenticated stalin session=4294967298 peer=127.0.0.1:50000
//! 18:40:02.310 session_closed - session=4294967299 peer=127.0.0.1:50002
//! 18:40:09.000 instance_lost instance=3 name=host:8888
//! ```
//!
//! The time is the event's `at` (UTC), to the millisecond; `-` stands for a
//! connection not authenticated as any VM. An event this client does not
//! know (or one whose data has another shape) shows its name and its `data`
//! as compact JSON.

use std::fmt;

use serde::Deserialize;
use serde_json::Value;
use vmm_core::protocol::DiskView;

use crate::out::{self, Printer};
use crate::text::disks_joined;

/// Where event lines go, and in which format.
pub struct EventPrinter {
    json: bool,
    /// In the interactive shell on a terminal: prints above the line being
    /// edited and redraws the prompt, instead of writing into it.
    terminal: Option<Printer>,
    /// The `seq` of the last event printed that had one: where a watch
    /// resumes without losing or repeating what was shown.
    last_seq: Option<i64>,
}

impl fmt::Debug for EventPrinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventPrinter")
            .field("json", &self.json)
            .field("terminal", &self.terminal.is_some())
            .field("last_seq", &self.last_seq)
            .finish()
    }
}

impl EventPrinter {
    pub fn new(json: bool) -> EventPrinter {
        EventPrinter {
            json,
            terminal: None,
            last_seq: None,
        }
    }

    /// The `seq` of the last event printed (and flushed) that had one.
    pub fn last_seq(&self) -> Option<i64> {
        self.last_seq
    }

    /// Prints through the line editor's printer from now on.
    pub fn use_terminal(&mut self, printer: Printer) {
        self.terminal = Some(printer);
    }

    /// Prints one event line (and flushes stdout).
    pub fn print(&mut self, line: &str) {
        let text = if self.json {
            line.to_owned()
        } else {
            human(line)
        };
        let printed = match &mut self.terminal {
            Some(terminal) => terminal.print(format!("{text}\n")).is_ok(),
            None => false,
        };
        if !printed {
            // The terminal is gone or was never usable: print plainly.
            self.terminal = None;
            out::line(text);
        }
        // Only now: a resume file written from it must never name an event
        // that was not shown yet.
        if let Some(seq) = seq_of(line) {
            self.last_seq = Some(seq);
        }
    }
}

/// The `seq` an event line carries, if any.
pub fn seq_of(line: &str) -> Option<i64> {
    #[derive(Deserialize)]
    struct Numbered {
        seq: Option<i64>,
    }
    serde_json::from_str::<Numbered>(line).ok()?.seq
}

#[derive(Deserialize)]
struct EventLine {
    event: String,
    #[serde(default)]
    data: Value,
    at: Option<String>,
}

#[derive(Deserialize)]
struct VmData {
    vm: Vm,
}

#[derive(Deserialize)]
struct Vm {
    vm_id: String,
    ram: u64,
    cpu: u64,
    disks: Vec<DiskView>,
}

#[derive(Deserialize)]
struct SessionData {
    session_id: i64,
    peer: String,
    vm_id: Option<String>,
}

#[derive(Deserialize)]
struct InstanceData {
    instance_id: i64,
    name: String,
}

/// The human form of an event line. A line that is not an event at all is
/// shown as it is (with control characters escaped).
pub fn human(line: &str) -> String {
    let Ok(event) = serde_json::from_str::<EventLine>(line) else {
        return clean(line);
    };
    let at = event.at.as_deref().map_or_else(|| "-".to_owned(), clock);
    let name = clean(&event.event);
    match describe(&event.event, &event.data) {
        Some(what) => format!("{at} {name} {what}"),
        None if event.data.is_null() => format!("{at} {name}"),
        None => format!("{at} {name} {}", event.data),
    }
}

/// What a known event says, or `None` for an unknown event or one whose
/// data has another shape.
fn describe(event: &str, data: &Value) -> Option<String> {
    match event {
        "vm_registered" | "vm_updated" => {
            let VmData { vm } = VmData::deserialize(data).ok()?;
            Some(format!(
                "{} ram={} cpu={} disks={}",
                clean(&vm.vm_id),
                vm.ram,
                vm.cpu,
                disks_joined(&vm.disks, ",")
            ))
        }
        "instance_lost" => {
            let lost = InstanceData::deserialize(data).ok()?;
            Some(format!(
                "instance={} name={}",
                lost.instance_id,
                clean(&lost.name)
            ))
        }
        name if name.starts_with("session_") => {
            let session = SessionData::deserialize(data).ok()?;
            Some(format!(
                "{} session={} peer={}",
                session
                    .vm_id
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), clean),
                session.session_id,
                clean(&session.peer)
            ))
        }
        _ => None,
    }
}

/// `18:40:00.123` from `2026-11-28T18:40:00.123456Z`; anything else as it is.
fn clock(at: &str) -> String {
    let Some((_, time)) = at.split_once('T') else {
        return clean(at);
    };
    let time = time.strip_suffix('Z').unwrap_or(time);
    let time = match time.split_once('.') {
        Some((whole, fraction)) => {
            let millis: String = fraction.chars().take(3).collect();
            format!("{whole}.{millis:0<3}")
        }
        None => format!("{time}.000"),
    };
    clean(&time)
}

/// `text` with control characters escaped, so that what other clients put in
/// an event cannot move the cursor or break the line.
pub fn clean(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_events_show_the_vm() {
        let line = r#"{"event":"vm_updated","data":{"vm":{"vm_id":"stalin","ram":1024,"cpu":4,"disks":[{"id":1,"disk_size":150},{"id":2,"disk_size":250}],"created_at":"2026-11-28T18:00:00.000000Z","updated_at":"2026-11-28T18:40:00.123456Z"}},"at":"2026-11-28T18:40:00.123456Z"}"#;
        assert_eq!(
            human(line),
            "18:40:00.123 vm_updated stalin ram=1024 cpu=4 disks=1:150G,2:250G"
        );
        let line = r#"{"event":"vm_registered","data":{"vm":{"vm_id":"v","ram":1,"cpu":1,"disks":[]}},"at":"2026-11-28T18:40:00Z"}"#;
        assert_eq!(
            human(line),
            "18:40:00.000 vm_registered v ram=1 cpu=1 disks=-"
        );
    }

    #[test]
    fn session_events_show_the_session() {
        let line = r#"{"event":"session_authenticated","data":{"session_id":4294967298,"peer":"127.0.0.1:50000","connected_at":"2026-11-28T18:39:59.000000Z","vm_id":"stalin","authenticated":true},"at":"2026-11-28T18:40:01.002000Z"}"#;
        assert_eq!(
            human(line),
            "18:40:01.002 session_authenticated stalin session=4294967298 peer=127.0.0.1:50000"
        );
        let line = r#"{"event":"session_closed","data":{"session_id":7,"peer":"10.0.0.1:1","vm_id":null,"authenticated":false},"at":"2026-11-28T18:40:01.5Z"}"#;
        assert_eq!(
            human(line),
            "18:40:01.500 session_closed - session=7 peer=10.0.0.1:1"
        );
    }

    #[test]
    fn instance_lost_names_the_instance() {
        let line = r#"{"event":"instance_lost","data":{"instance_id":3,"name":"host:8888","last_renewed_at":"2026-11-28T18:39:00.000000Z"},"at":"2026-11-28T18:40:09.000000Z"}"#;
        assert_eq!(
            human(line),
            "18:40:09.000 instance_lost instance=3 name=host:8888"
        );
    }

    #[test]
    fn unknown_or_odd_events_show_their_data() {
        let line =
            r#"{"event":"disk_exploded","data":{"id":1},"at":"2026-11-28T18:40:00.000000Z"}"#;
        assert_eq!(human(line), r#"18:40:00.000 disk_exploded {"id":1}"#);
        // A known name whose data has another shape is not an error.
        let line = r#"{"event":"vm_updated","data":{"vm":"?"}}"#;
        assert_eq!(human(line), r#"- vm_updated {"vm":"?"}"#);
        assert_eq!(human(r#"{"event":"x"}"#), "- x");
        assert_eq!(human("not json\u{1b}[2J"), "not json\\u{1b}[2J");
    }

    #[test]
    fn the_seq_is_read_from_any_event_line() {
        assert_eq!(
            seq_of(r#"{"event":"x","data":{"seq":1},"seq":42}"#),
            Some(42)
        );
        assert_eq!(seq_of(r#"{"event":"x"}"#), None);
        assert_eq!(seq_of(r#"{"event":"x","seq":"7"}"#), None);
        assert_eq!(seq_of("not json"), None);
    }

    #[test]
    fn control_characters_are_escaped() {
        let line = r#"{"event":"session_opened","data":{"session_id":1,"peer":"a\nb\u001b[31m","vm_id":null},"at":"odd"}"#;
        assert_eq!(
            human(line),
            "odd session_opened - session=1 peer=a\\nb\\u{1b}[31m"
        );
    }
}
