//! What people see: a message line for simple successes, aligned tables for
//! VMs and lists.

use comfy_table::{CellAlignment, LineStyle, Table, TableStyle, presets};
use serde::de::DeserializeOwned;
use serde_json::Value;
use vmm_core::Reply;
use vmm_core::protocol::{
    ActiveSession, AuthenticatedSession, CommandHelp, DiskEntry, DiskView, ListType, Timestamp,
    VmStatus, VmView,
};

use crate::op::Op;
use crate::text::disks_joined;

/// The text to print for a successful `reply` to `op`; `Err` names what in
/// the reply did not have the expected shape.
pub fn reply(op: &Op, reply: &Reply) -> Result<String, String> {
    match op {
        Op::Ping | Op::Logout | Op::Watch { .. } | Op::Unwatch => Ok(reply.message.clone()),
        Op::Register(_) | Op::Authenticate { .. } | Op::Update(_) => {
            let vm: VmView = field(reply, "vm")?;
            Ok(format!("{}\n{}", reply.message, vm_table(&vm)))
        }
        Op::Help => Ok(help_table(&field::<Vec<CommandHelp>>(reply, "commands")?)),
        // `top` draws `stats` itself, from the reply's data.
        Op::Operator { .. } | Op::Revoke { .. } | Op::Stats => Ok(reply.message.clone()),
        Op::Audit { .. } => Ok(audit_table(field(reply, "events")?)),
        Op::List { kind, .. } => {
            let entries = reply.data.get(kind.as_str()).cloned();
            Ok(with_count(&list_table(
                *kind,
                entries.unwrap_or(Value::Null),
            )?))
        }
    }
}

/// The table of `entries`, a page (or the whole) of a list of `kind`,
/// without a row count: a list printed a page at a time counts its rows
/// once, at the end.
pub fn list_table(kind: ListType, entries: Value) -> Result<Table, String> {
    let columns = list_columns(kind);
    let mut table = table(columns.headers, columns.right);
    for row in list_rows(kind, entries, ", ")? {
        table.add_row(row);
    }
    Ok(table)
}

/// A list's columns: their headers, the names of their fields in one-line
/// forms (`list --watch`), and which ones are right-aligned. One place for
/// all three, so that a table and a line about the same entry name the same
/// columns in the same order.
#[derive(Debug, Clone, Copy)]
pub struct Columns {
    pub headers: &'static [&'static str],
    pub fields: &'static [&'static str],
    right: &'static [usize],
}

pub fn list_columns(kind: ListType) -> Columns {
    match kind {
        ListType::ActiveVms => Columns {
            headers: &["session", "peer", "vm_id", "authenticated", "connected_at"],
            fields: &["session", "peer", "vm_id", "authenticated", "connected_at"],
            right: &[0],
        },
        ListType::AuthenticatedVms => Columns {
            headers: &[
                "session",
                "vm_id",
                "peer",
                "ram (MiB)",
                "cpu",
                "disks",
                "authenticated_at",
            ],
            fields: &[
                "session",
                "vm_id",
                "peer",
                "ram",
                "cpu",
                "disks",
                "authenticated_at",
            ],
            right: &[0, 3, 4],
        },
        ListType::AllVms => Columns {
            headers: &[
                "vm_id",
                "ram (MiB)",
                "cpu",
                "disks",
                "connected",
                "authenticated",
                "last_seen_at",
            ],
            fields: &[
                "vm_id",
                "ram",
                "cpu",
                "disks",
                "connected",
                "authenticated",
                "last_seen_at",
            ],
            right: &[1, 2],
        },
        ListType::AllDisks => Columns {
            headers: &["id", "size (GiB)", "vm_id"],
            fields: &["id", "size", "vm_id"],
            right: &[0, 1],
        },
    }
}

/// The cells of `entries` (a list of `kind`, as the reply holds it), one
/// row each, in the order of [`list_columns`]; a VM's disks joined by
/// `disk_separator`.
pub fn list_rows(
    kind: ListType,
    entries: Value,
    disk_separator: &str,
) -> Result<Vec<Vec<String>>, String> {
    fn decode<T: DeserializeOwned>(kind: ListType, entries: Value) -> Result<Vec<T>, String> {
        serde_json::from_value(entries).map_err(|err| format!("`data.{}`: {err}", kind.as_str()))
    }
    let disks = |disks: &[DiskView]| disks_joined(disks, disk_separator);
    Ok(match kind {
        ListType::ActiveVms => decode::<ActiveSession>(kind, entries)?
            .into_iter()
            .map(|session| {
                vec![
                    session.session_id.to_string(),
                    session.peer,
                    session.vm_id.unwrap_or_else(|| "-".to_owned()),
                    yes_no(session.authenticated).to_owned(),
                    time(&session.connected_at),
                ]
            })
            .collect(),
        ListType::AuthenticatedVms => decode::<AuthenticatedSession>(kind, entries)?
            .into_iter()
            .map(|session| {
                vec![
                    session.session_id.to_string(),
                    session.vm.vm_id,
                    session.peer,
                    session.vm.ram.to_string(),
                    session.vm.cpu.to_string(),
                    disks(&session.vm.disks),
                    time(&session.authenticated_at),
                ]
            })
            .collect(),
        ListType::AllVms => decode::<VmStatus>(kind, entries)?
            .into_iter()
            .map(|vm| {
                vec![
                    vm.vm.vm_id,
                    vm.vm.ram.to_string(),
                    vm.vm.cpu.to_string(),
                    disks(&vm.vm.disks),
                    yes_no(vm.connected).to_owned(),
                    yes_no(vm.authenticated).to_owned(),
                    maybe_time(vm.last_seen_at.as_ref()),
                ]
            })
            .collect(),
        ListType::AllDisks => decode::<DiskEntry>(kind, entries)?
            .into_iter()
            .map(|disk| vec![disk.id.to_string(), disk.disk_size.to_string(), disk.vm_id])
            .collect(),
    })
}

fn audit_table(events: Vec<vmm_core::store::AuditEvent>) -> String {
    let mut table = table(
        &[
            "id", "at", "peer", "vm_id", "action", "outcome", "detail", "count", "last_at",
        ],
        &[0, 7],
    );
    for event in &events {
        table.add_row(vec![
            event.id.to_string(),
            event.at.to_string(),
            event.peer.clone().unwrap_or_else(|| "-".into()),
            event.vm_id.clone().unwrap_or_else(|| "-".into()),
            event.action.clone(),
            event.outcome.clone(),
            event.detail.clone(),
            event.count.to_string(),
            event
                .last_at
                .map_or_else(|| "-".into(), |at| at.to_string()),
        ]);
    }
    with_count(&table)
}

/// The value under `key` in the reply's `data`, decoded.
fn field<T: DeserializeOwned>(reply: &Reply, key: &str) -> Result<T, String> {
    let value = reply.data.get(key).cloned().unwrap_or(Value::Null);
    serde_json::from_value(value).map_err(|err| format!("`data.{key}`: {err}"))
}

/// Every table's look: ASCII borders, and a rule under the header that
/// shows where the columns meet (`+------+-----+`), like the borders,
/// rather than one unbroken line across them.
const STYLE: TableStyle =
    presets::ASCII_FULL_CONDENSED.header_separator(LineStyle::new('+', '-', '+', '+'));

/// A table with `header`; columns whose index is in `right` are right-aligned.
/// Public for `top`'s plain tables, so that they look like every other.
pub fn table(header: &[&str], right: &[usize]) -> Table {
    let mut table = Table::new();
    table.load_style(STYLE);
    table.set_header(header.to_vec());
    for &index in right {
        if let Some(column) = table.column_mut(index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

/// A list table followed by its row count, psql style.
fn with_count(table: &Table) -> String {
    format!("{table}\n{}", row_count(table.row_count()))
}

/// `(1 row)`, `(2 rows)`: what ends a list.
pub fn row_count(rows: usize) -> String {
    let noun = if rows == 1 { "row" } else { "rows" };
    format!("({rows} {noun})")
}

/// Seconds are enough on screen; `--json` keeps the microseconds.
pub fn time(timestamp: &Timestamp) -> String {
    let text = timestamp.to_string();
    match (text.find('.'), text.ends_with('Z')) {
        (Some(dot), true) => format!("{}Z", &text[..dot]),
        _ => text,
    }
}

fn maybe_time(timestamp: Option<&Timestamp>) -> String {
    timestamp.map_or_else(|| "-".to_owned(), time)
}

/// `1:150G, 2:250G`, or `-` for none.
fn disks(disks: &[DiskView]) -> String {
    disks_joined(disks, ", ")
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

pub fn vm_table(vm: &VmView) -> Table {
    let mut table = table(
        &[
            "vm_id",
            "ram (MiB)",
            "cpu",
            "disks",
            "created_at",
            "updated_at",
        ],
        &[1, 2],
    );
    table.add_row(vec![
        vm.vm_id.clone(),
        vm.ram.to_string(),
        vm.cpu.to_string(),
        disks(&vm.disks),
        time(&vm.created_at),
        time(&vm.updated_at),
    ]);
    table
}

pub fn help_table(commands: &[CommandHelp]) -> String {
    let mut table = table(&["command", "summary"], &[]);
    for command in commands {
        table.add_row(vec![command.name.clone(), command.summary.clone()]);
    }
    table.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reply(data: Value) -> Reply {
        let Value::Object(data) = data else {
            panic!("data must be an object");
        };
        Reply::success("ok", data)
    }

    fn list(kind: ListType) -> Op {
        Op::List {
            kind,
            limit: None,
            after: None,
        }
    }

    #[test]
    fn a_vm_shows_its_disks_compactly() {
        let r = reply(json!({"vm": {
            "vm_id": "stalin", "ram": 512, "cpu": 4,
            "disks": [{"id": 1, "disk_size": 150}, {"id": 2, "disk_size": 250}],
            "created_at": "2024-05-01T12:00:00.123456Z",
            "updated_at": "2024-05-01T12:30:00.000001Z"
        }}));
        let text = super::reply(&Op::Logout, &r).unwrap();
        assert_eq!(text, "ok");
        let text = super::reply(&Op::Update(Default::default()), &r).unwrap();
        assert!(text.starts_with("ok\n"), "{text}");
        assert!(text.contains("1:150G, 2:250G"), "{text}");
        assert!(text.contains("2024-05-01T12:00:00Z"), "{text}");
        assert!(text.contains("| stalin |"), "{text}");
    }

    #[test]
    fn lists_end_with_a_row_count() {
        let r = reply(json!({"all_disks": [
            {"id": 1, "disk_size": 100, "vm_id": "a"},
            {"id": 2, "disk_size": 200, "vm_id": "b"}
        ]}));
        let text = super::reply(&list(ListType::AllDisks), &r).unwrap();
        assert!(text.ends_with("\n(2 rows)"), "{text}");
        let empty = reply(json!({"active_vms": []}));
        let text = super::reply(&list(ListType::ActiveVms), &empty).unwrap();
        assert!(text.ends_with("\n(0 rows)"), "{text}");
    }

    #[test]
    fn the_header_rule_shows_where_the_columns_meet() {
        let entries = json!([
            {"id": 1, "disk_size": 100, "vm_id": "a"},
            {"id": 12, "disk_size": 2000, "vm_id": "bb"}
        ]);
        let text = list_table(ListType::AllDisks, entries).unwrap().to_string();
        assert_eq!(
            text,
            "\
+----+------------+-------+
| id | size (GiB) | vm_id |
+----+------------+-------+
|  1 |        100 | a     |
| 12 |       2000 | bb    |
+----+------------+-------+"
        );
    }

    #[test]
    fn a_list_entry_has_a_cell_per_column() {
        let entries = json!([{
            "vm_id": "stalin", "ram": 512, "cpu": 4,
            "disks": [{"id": 1, "disk_size": 150}, {"id": 2, "disk_size": 250}],
            "created_at": "2024-05-01T12:00:00.123456Z",
            "updated_at": "2024-05-01T12:30:00.000001Z",
            "connected": true, "authenticated": false, "last_seen_at": null
        }]);
        let rows = list_rows(ListType::AllVms, entries, ",").unwrap();
        assert_eq!(
            rows,
            [["stalin", "512", "4", "1:150G,2:250G", "yes", "no", "-"]]
        );
        for kind in [
            ListType::ActiveVms,
            ListType::AuthenticatedVms,
            ListType::AllVms,
            ListType::AllDisks,
        ] {
            let columns = list_columns(kind);
            assert_eq!(columns.headers.len(), columns.fields.len(), "{kind:?}");
        }
    }

    #[test]
    fn a_malformed_reply_is_an_error_not_a_panic() {
        let r = reply(json!({"all_vms": [{"vm_id": 5}]}));
        assert!(super::reply(&list(ListType::AllVms), &r).is_err());
        assert!(super::reply(&Op::Help, &reply(json!({}))).is_err());
    }
}
