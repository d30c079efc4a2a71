//! `vmm-client list KIND --watch`: the list, then kept current from the
//! server's change events until SIGINT or SIGTERM (exit 0), like
//! `kubectl get --watch`.
//!
//! The connection subscribes (`watch`) *before* it reads the list, so that
//! a change made between the two cannot be missed: it either is in the list
//! or comes as an event after it.
//!
//! Events say that something changed, but not always the whole row a list
//! shows: a session event changes `connected` of a VM in `all_vms`,
//! `last_seen_at` moves without any event, and an `authenticated_vms` row
//! carries the VM that `session_authenticated` does not. So rows are never
//! patched from events: an event that concerns the list has it read again
//! (a page of [`pages::DEFAULT_PAGE`] at a time), and the rows that
//! appeared, changed or went since the last reading are the changes. That
//! also de-duplicates: an event for a change the list already held (one made
//! between the subscription and the first reading, or another of a burst)
//! finds nothing different and shows nothing. The events that come while a
//! list is read, or within [`REFRESH_GAP`] of the last reading, are served
//! by one reading, so that a burst costs one list and a busy fleet at most
//! one list per [`REFRESH_GAP`].
//!
//! What is printed: on a terminal (stdout, without `--json`) the table,
//! redrawn in place after each change. Otherwise the table once, then a line
//! per change, flushed: `ADDED`, `MODIFIED` or `DELETED`, the row's key, and
//! its other columns as `name=value` (a `DELETED` row as it was last seen):
//!
//! ```text
//! ADDED vm-1 ram=512 cpu=2 disks=1:100G connected=no authenticated=no last_seen_at=-
//! ```
//!
//! With `--json`: the reply lines of the authentication and of `watch`, then
//! `{"type":"ADDED","object":{...}}` for each row of the first reading and a
//! line of that shape for each change, the object as the list holds it.

use std::collections::{HashMap, HashSet};
use std::io::{self, IsTerminal};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;
use vmm_core::client::{ClientError, Page};
use vmm_core::protocol::ListType;

use crate::conn::{Conn, sleep_until};
use crate::failure::Failure;
use crate::op::Op;
use crate::signals::Signals;
use crate::{out, pages, render};

/// The least time between two readings of the list.
const REFRESH_GAP: Duration = Duration::from_millis(500);

/// Runs over `conn` (authenticated, as a VM or the operator) until a signal
/// (`Ok`) or a failure. `keepalive`: ping after this long without sending
/// anything, so that the server does not close the idle connection.
pub async fn run(
    mut conn: Conn,
    json: bool,
    keepalive: Option<Duration>,
    kind: ListType,
) -> Result<(), Failure> {
    let mut signals = Signals::install()
        .map_err(|err| Failure::Usage(format!("cannot handle signals: {err}")))?;
    conn.hold_events();
    let terminal = !json && io::stdout().is_terminal();
    let mut view = View {
        kind,
        format: if json {
            Format::Json
        } else if terminal {
            Format::Terminal { drawn: 0 }
        } else {
            Format::Lines
        },
        rows: Vec::new(),
    };
    let start = async {
        conn.prepare(&Op::Watch {
            topics: topics(kind),
            since: None,
        })
        .await?;
        read(&mut conn, kind).await
    };
    let rows = tokio::select! {
        biased;
        _ = signals.recv() => return Ok(()),
        rows = start => rows?,
    };
    if terminal {
        eprintln!("watching {}; Ctrl-C to stop", kind.as_str());
    }
    view.first(rows).map_err(|what| conn.nonsense(what))?;

    let mut stale = false;
    let mut read_at = Instant::now();
    loop {
        stale |= conn.take_events().iter().any(|line| concerns(kind, line));
        let refresh_at = stale.then_some(read_at + REFRESH_GAP);
        let ping_at = keepalive.map(|idle| conn.idle_until(idle));
        tokio::select! {
            biased;
            _ = signals.recv() => return Ok(()),
            () = sleep_until(refresh_at) => {
                stale = false;
                read_at = Instant::now();
                let rows = tokio::select! {
                    biased;
                    _ = signals.recv() => return Ok(()),
                    rows = read(&mut conn, kind) => rows?,
                };
                view.update(rows).map_err(|what| conn.nonsense(what))?;
            }
            () = sleep_until(ping_at) => {
                tokio::select! {
                    biased;
                    _ = signals.recv() => return Ok(()),
                    pinged = conn.keepalive() => pinged?,
                }
            }
            line = conn.next_event() => stale |= concerns(kind, &line?),
        }
    }
}

/// The topics whose events can change a list of `kind` (none: all).
fn topics(kind: ListType) -> Vec<String> {
    let topics: &[&str] = match kind {
        ListType::AllDisks => &["disks"],
        ListType::ActiveVms => &["sessions"],
        ListType::AuthenticatedVms | ListType::AllVms => &[],
    };
    topics.iter().map(|topic| (*topic).to_owned()).collect()
}

/// Whether the event `line` may change a list of `kind`. A line that cannot
/// be read is taken to concern it: reading the list once more is harmless.
fn concerns(kind: ListType, line: &str) -> bool {
    #[derive(Deserialize)]
    struct Event {
        event: String,
        #[serde(default)]
        data: Value,
    }
    let Ok(Event { event, data }) = serde_json::from_str::<Event>(line) else {
        return true;
    };
    let vm_event = matches!(event.as_str(), "vm_registered" | "vm_updated");
    let session_event = event.starts_with("session_");
    let lost = event == "instance_lost";
    match kind {
        ListType::AllDisks => vm_event,
        ListType::ActiveVms => session_event || lost,
        ListType::AuthenticatedVms => {
            event == "vm_updated" || lost || (session_event && event != "session_opened")
        }
        ListType::AllVms => vm_event || lost || (session_event && !data["vm_id"].is_null()),
    }
}

/// The field that tells the rows of a list of `kind` apart.
fn key_field(kind: ListType) -> &'static str {
    match kind {
        ListType::AllVms => "vm_id",
        ListType::AllDisks => "id",
        ListType::ActiveVms | ListType::AuthenticatedVms => "session_id",
    }
}

fn key(kind: ListType, row: &Value) -> Result<String, String> {
    let field = key_field(kind);
    match row.get(field) {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(value @ Value::Number(_)) => Ok(value.to_string()),
        _ => Err(format!("an entry of `{}` without `{field}`", kind.as_str())),
    }
}

/// The whole list, a page at a time, printing nothing (events that come
/// meanwhile are held).
async fn read(conn: &mut Conn, kind: ListType) -> Result<Vec<Value>, Failure> {
    let mut rows = Vec::new();
    let mut after = None;
    loop {
        let op = Op::List {
            kind,
            limit: Some(pages::DEFAULT_PAGE),
            after,
        };
        let (_, mut reply) = conn.fetch(&op).await?;
        if !reply.is_success() {
            return Err(Failure::from_reply(&reply));
        }
        let page = Page::<Value>::from_reply(kind, &mut reply).map_err(|err| match err {
            ClientError::Protocol(what) => conn.nonsense(what),
            other => conn.nonsense(other),
        })?;
        rows.extend(page.entries);
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(rows),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Added,
    Modified,
    Deleted,
}

impl Change {
    fn name(self) -> &'static str {
        match self {
            Change::Added => "ADDED",
            Change::Modified => "MODIFIED",
            Change::Deleted => "DELETED",
        }
    }
}

/// What changed from `old` to `new` (rows of a list of `kind`): rows added
/// or modified in `new`'s order, then the deleted ones in `old`'s. Rows
/// that are `same` are no change.
fn diff(
    kind: ListType,
    old: &[Value],
    new: &[Value],
    same: impl Fn(&Value, &Value) -> bool,
) -> Result<Vec<(Change, Value)>, String> {
    let mut before = HashMap::with_capacity(old.len());
    for row in old {
        before.insert(key(kind, row)?, row);
    }
    let mut changes = Vec::new();
    let mut now = HashSet::with_capacity(new.len());
    for row in new {
        let key = key(kind, row)?;
        match before.get(&key) {
            None => changes.push((Change::Added, row.clone())),
            Some(was) if !same(was, row) => changes.push((Change::Modified, row.clone())),
            Some(_) => {}
        }
        now.insert(key);
    }
    for row in old {
        if !now.contains(&key(kind, row)?) {
            changes.push((Change::Deleted, row.clone()));
        }
    }
    Ok(changes)
}

/// `ADDED vm-1 ram=512 cpu=2 ...`: a change on one line, its row's cells
/// named after the list's columns.
fn change_line(kind: ListType, change: Change, row: &Value) -> Result<String, String> {
    let cells = render::list_rows(kind, Value::Array(vec![row.clone()]), ",")?
        .pop()
        .unwrap_or_default();
    let fields = render::list_columns(kind).fields;
    let mut line = change.name().to_owned();
    for (i, (field, cell)) in fields.iter().zip(&cells).enumerate() {
        line.push(' ');
        if i > 0 {
            line.push_str(field);
            line.push('=');
        }
        line.push_str(cell);
    }
    Ok(line)
}

enum Format {
    /// Redrawn in place; `drawn`: how many lines the last drawing took.
    Terminal { drawn: usize },
    /// The table once, then a line per change.
    Lines,
    /// A JSON line per row, then per change.
    Json,
}

/// The list as last shown, and how it is shown.
struct View {
    kind: ListType,
    format: Format,
    rows: Vec<Value>,
}

impl View {
    fn first(&mut self, rows: Vec<Value>) -> Result<(), String> {
        match self.format {
            Format::Terminal { .. } => self.draw(&rows)?,
            Format::Lines => out::line(self.table(&rows)?),
            Format::Json => {
                for row in &rows {
                    out::line(json!({"type": Change::Added.name(), "object": row}));
                }
            }
        }
        self.rows = rows;
        Ok(())
    }

    fn update(&mut self, rows: Vec<Value>) -> Result<(), String> {
        let kind = self.kind;
        let changes = match self.format {
            Format::Json => diff(kind, &self.rows, &rows, |was, is| was == is)?,
            // People see rows as cells: a change that shows in none (a
            // `last_seen_at` that moved within its second) is none to them.
            Format::Terminal { .. } | Format::Lines => diff(kind, &self.rows, &rows, |was, is| {
                let cells = |row: &Value| {
                    render::list_rows(kind, Value::Array(vec![row.clone()]), ",").ok()
                };
                cells(was) == cells(is)
            })?,
        };
        if changes.is_empty() {
            return Ok(());
        }
        match self.format {
            Format::Terminal { .. } => self.draw(&rows)?,
            Format::Lines => {
                for (change, row) in &changes {
                    out::line(change_line(self.kind, *change, row)?);
                }
            }
            Format::Json => {
                for (change, row) in &changes {
                    out::line(json!({"type": change.name(), "object": row}));
                }
            }
        }
        self.rows = rows;
        Ok(())
    }

    /// The table and its row count.
    fn table(&self, rows: &[Value]) -> Result<String, String> {
        let table = render::list_table(self.kind, Value::Array(rows.to_vec()))?;
        Ok(format!("{table}\n{}", render::row_count(rows.len())))
    }

    /// Draws the table over the one drawn last: the cursor goes back up to
    /// where that one started and everything below it is cleared.
    fn draw(&mut self, rows: &[Value]) -> Result<(), String> {
        let text = self.table(rows)?;
        if let Format::Terminal { drawn } = &mut self.format {
            if *drawn > 0 {
                out::part(&format!("\x1b[{drawn}A\x1b[J"));
            }
            *drawn = text.lines().count();
        }
        out::line(text);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(vm_id: &str, ram: u32, connected: bool) -> Value {
        json!({
            "vm_id": vm_id, "ram": ram, "cpu": 2,
            "disks": [{"id": 1, "disk_size": 100}],
            "created_at": "2026-01-01T00:00:00.000000Z",
            "updated_at": "2026-01-01T00:00:00.000000Z",
            "connected": connected, "authenticated": false, "last_seen_at": null
        })
    }

    #[test]
    fn changes_are_what_differs_between_two_readings() {
        let kind = ListType::AllVms;
        let old = [
            vm("a", 512, false),
            vm("b", 512, false),
            vm("c", 512, false),
        ];
        let new = [vm("a", 512, false), vm("b", 1024, true), vm("d", 64, false)];
        let changes: Vec<(Change, String)> = diff(kind, &old, &new, |a, b| a == b)
            .unwrap()
            .into_iter()
            .map(|(change, row)| (change, key(kind, &row).unwrap()))
            .collect();
        assert_eq!(
            changes,
            [
                (Change::Modified, "b".to_owned()),
                (Change::Added, "d".to_owned()),
                (Change::Deleted, "c".to_owned()),
            ]
        );
        // The same reading twice (an event for a change already shown): nothing.
        assert!(diff(kind, &new, &new, |a, b| a == b).unwrap().is_empty());
        assert!(diff(kind, &[json!({"ram": 1})], &[], |a, b| a == b).is_err());
        // What counts as the same is the caller's: here, the same RAM.
        let ram = |a: &Value, b: &Value| a["ram"] == b["ram"];
        let changes = diff(kind, &old, &new, ram).unwrap();
        assert_eq!(changes.len(), 3, "b's RAM changed");
        let unchanged = [vm("a", 512, true), vm("b", 512, true), vm("c", 512, true)];
        assert!(diff(kind, &old, &unchanged, ram).unwrap().is_empty());
    }

    #[test]
    fn a_change_is_one_line_of_named_columns() {
        let line = change_line(ListType::AllVms, Change::Added, &vm("vm-1", 512, false));
        assert_eq!(
            line.unwrap(),
            "ADDED vm-1 ram=512 cpu=2 disks=1:100G connected=no authenticated=no last_seen_at=-"
        );
        let disk = json!({"id": 7, "disk_size": 10, "vm_id": "vm-1"});
        let line = change_line(ListType::AllDisks, Change::Deleted, &disk);
        assert_eq!(line.unwrap(), "DELETED 7 size=10 vm_id=vm-1");
        assert_eq!(key(ListType::AllDisks, &disk).unwrap(), "7");
    }

    #[test]
    fn only_events_that_can_change_the_list_read_it_again() {
        let opened = r#"{"event":"session_opened","data":{"session_id":1,"peer":"p","vm_id":null,"authenticated":false}}"#;
        let bound = r#"{"event":"session_closed","data":{"session_id":1,"peer":"p","vm_id":"a","authenticated":false}}"#;
        let updated = r#"{"event":"vm_updated","data":{"vm":{}}}"#;
        assert!(concerns(ListType::ActiveVms, opened));
        assert!(!concerns(ListType::AllVms, opened));
        assert!(concerns(ListType::AllVms, bound));
        assert!(!concerns(ListType::AuthenticatedVms, opened));
        assert!(concerns(ListType::AuthenticatedVms, updated));
        assert!(concerns(ListType::AllDisks, updated));
        assert!(!concerns(ListType::AllDisks, bound));
        assert!(concerns(ListType::AllDisks, "not json"));
    }
}
