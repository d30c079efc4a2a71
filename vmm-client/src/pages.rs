//! Lists a page at a time: `list --limit N` prints one page and names the
//! cursor of the next on stderr; `--all-pages` follows the cursors to the
//! end and prints each page as it arrives, so that listing a fleet of any
//! size holds one page in memory, not the fleet. The shell pages with
//! [`show`].
//!
//! `--all-pages` prints a table per page, then one row count for the whole
//! list: the tables size their columns to what they hold, so one table for
//! every page would mean holding every page until the last one came. With
//! `--json` it prints one line of the shape an unpaged `list` reply has, so
//! that scripts see no difference:
//! `{"status":"success","data":{"<list_type>":[...]},"message":"N <list_type>"}`.
//! The message, which counts the entries, comes after the data, because the
//! count is known only once the last page has been written.

use serde::de::IgnoredAny;
use serde_json::Value;
use vmm_core::client::{ClientError, Page};
use vmm_core::protocol::ListType;

use crate::conn::Conn;
use crate::failure::Failure;
use crate::op::Op;
use crate::{out, render};

/// The page size of `--all-pages` without `--limit`: large enough that a
/// fleet of 10,000 VMs is ten requests, small enough to hold comfortably.
pub const DEFAULT_PAGE: u32 = 1_000;

/// Runs one page of `kind` like any command (printed as a table, or with
/// `--json` as the reply line) and returns the cursor of the next page;
/// `None` on the last one.
pub async fn show(
    conn: &mut Conn,
    kind: ListType,
    limit: Option<u32>,
    after: Option<String>,
) -> Result<Option<String>, Failure> {
    let mut reply = conn.run(&Op::List { kind, limit, after }).await?;
    // The entries were printed already; only `next` is wanted here.
    let page =
        Page::<IgnoredAny>::from_reply(kind, &mut reply).map_err(|err| nonsense(conn, err))?;
    Ok(page.next)
}

/// `list [--limit N] [--after CURSOR]`: one page (or the whole list), and
/// on stderr how to ask for the next page when there is one.
pub async fn one(
    conn: &mut Conn,
    kind: ListType,
    limit: Option<u32>,
    after: Option<String>,
) -> Result<(), Failure> {
    if let Some(next) = show(conn, kind, limit, after).await? {
        eprintln!("more: --after {next}");
    }
    Ok(())
}

/// `list --all-pages`: every page of `size` entries, from the start or
/// after `after`, printed as they arrive (see the module's doc).
pub async fn all(
    conn: &mut Conn,
    json: bool,
    kind: ListType,
    size: u32,
    mut after: Option<String>,
) -> Result<(), Failure> {
    let mut sink = Sink {
        kind,
        json,
        rows: 0,
        open: false,
    };
    loop {
        let op = Op::List {
            kind,
            limit: Some(size),
            after: after.take(),
        };
        let fetched = conn.fetch(&op).await;
        let (line, mut reply) = match fetched {
            Ok(fetched) => fetched,
            Err(failure) => {
                sink.abandon();
                return Err(failure);
            }
        };
        if !reply.is_success() {
            sink.abandon();
            if json {
                out::line(&line);
            }
            return Err(Failure::from_reply(&reply));
        }
        let page = Page::<Value>::from_reply(kind, &mut reply).map_err(|err| {
            sink.abandon();
            nonsense(conn, err)
        })?;
        sink.page(page.entries).map_err(|what| {
            sink.abandon();
            conn.nonsense(what)
        })?;
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    sink.finish().map_err(|what| conn.nonsense(what))
}

fn nonsense(conn: &Conn, err: ClientError) -> Failure {
    match err {
        ClientError::Protocol(what) => conn.nonsense(what),
        other => conn.nonsense(other),
    }
}

/// Where the pages of `--all-pages` go.
struct Sink {
    kind: ListType,
    json: bool,
    /// Entries printed so far.
    rows: usize,
    /// With `--json`: the line of the document has been started and not
    /// yet ended.
    open: bool,
}

impl Sink {
    /// The start of the `--json` document, up to its list's `[`.
    fn opening(&self) -> String {
        let key = Value::String(self.kind.as_str().to_owned());
        format!(r#"{{"status":"success","data":{{{key}:["#)
    }

    fn page(&mut self, entries: Vec<Value>) -> Result<(), String> {
        if self.json {
            let mut text = if self.open {
                String::new()
            } else {
                self.opening()
            };
            for entry in &entries {
                if self.rows > 0 {
                    text.push(',');
                }
                text.push_str(&entry.to_string());
                self.rows += 1;
            }
            self.open = true;
            out::part(&text);
        } else if !entries.is_empty() {
            self.rows += entries.len();
            out::line(render::list_table(self.kind, Value::Array(entries))?);
        }
        Ok(())
    }

    /// After the last page: the end of the document, or the row count.
    fn finish(self) -> Result<(), String> {
        if self.json {
            let mut text = if self.open {
                String::new()
            } else {
                self.opening()
            };
            let message = Value::String(format!("{} {}", self.rows, self.kind.as_str()));
            text.push_str(&format!(r#"]}},"message":{message}}}"#));
            out::line(text);
        } else {
            if self.rows == 0 {
                // An empty list still shows its columns, as unpaged.
                out::line(render::list_table(self.kind, Value::Array(Vec::new()))?);
            }
            out::line(render::row_count(self.rows));
        }
        Ok(())
    }

    /// A page failed: ends the document's unfinished line, so that what
    /// follows on stdout (an error reply's line) starts on a line of its own.
    fn abandon(&mut self) {
        if self.open {
            out::line("");
            self.open = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_document_opens_like_an_unpaged_reply() {
        let sink = Sink {
            kind: ListType::AllDisks,
            json: true,
            rows: 0,
            open: false,
        };
        let whole = format!(
            r#"{}{{"id":1}},{{"id":2}}]}},"message":"2 all_disks"}}"#,
            sink.opening()
        );
        let value: Value = serde_json::from_str(&whole).unwrap();
        assert_eq!(value["status"], "success");
        assert_eq!(value["data"]["all_disks"].as_array().map(Vec::len), Some(2));
    }
}
