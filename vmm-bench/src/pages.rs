//! The `pages` workload: reads lists page by page, as a fleet manager with
//! `limit` and `after` does, and checks what paging promises: every entry
//! comes exactly once, and the pages hold as many entries as one full list.
//! A key seen twice, a page that makes no progress or a count that differs
//! fails the step. The fleet must not change meanwhile: an entry added or
//! removed during the walk would be counted as missing or extra.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};

use crate::Bench;
use crate::args::ListKind;
use crate::conn::{Conn, leading_count};
use crate::error::{BenchError, Result};
use crate::load::{Setup, Tally, line, open_all};
use crate::net::PER_ADDRESS;
use crate::report::Row;
use crate::rss::{self, RssWatch};

/// What identifies an entry of each list: the key its pages are ordered by.
fn key(kind: ListKind, entry: &Value) -> Option<String> {
    let key = match kind {
        ListKind::AllVms => &entry["vm_id"],
        ListKind::AllDisks => &entry["id"],
        ListKind::ActiveVms | ListKind::AuthenticatedVms => &entry["session_id"],
    };
    match key {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// Where one walk over a list's pages stands.
#[derive(Debug, Default)]
pub struct Walk {
    seen: HashSet<String>,
    pub pages: u64,
}

impl Walk {
    /// Takes one page's reply; returns the cursor of the next page, or
    /// `None` after the last.
    pub fn take(&mut self, kind: ListKind, reply: &Value) -> Result<Option<String>> {
        let page = self.pages + 1;
        if reply["status"] != "success" {
            return Err(BenchError::new(format!(
                "page {page} of {}: {}: {}",
                kind.as_str(),
                reply["code"].as_str().unwrap_or("error"),
                reply["message"].as_str().unwrap_or_default()
            )));
        }
        let Some(entries) = reply["data"][kind.as_str()].as_array() else {
            return Err(BenchError::new(format!(
                "page {page} of {} has no {} array",
                kind.as_str(),
                kind.as_str()
            )));
        };
        for entry in entries {
            let Some(key) = key(kind, entry) else {
                return Err(BenchError::new(format!(
                    "page {page} of {}: an entry without its key: {entry}",
                    kind.as_str()
                )));
            };
            if !self.seen.insert(key.clone()) {
                return Err(BenchError::new(format!(
                    "page {page} of {}: {key} came a second time",
                    kind.as_str()
                )));
            }
        }
        self.pages = page;
        match &reply["data"]["next"] {
            Value::Null => Ok(None),
            Value::String(next) if !entries.is_empty() => Ok(Some(next.clone())),
            Value::String(_) => Err(BenchError::new(format!(
                "page {page} of {} is empty but says that more follow",
                kind.as_str()
            ))),
            other => Err(BenchError::new(format!(
                "page {page} of {}: next is {other}, not a cursor",
                kind.as_str()
            ))),
        }
    }

    /// Entries seen, each once.
    pub fn entries(&self) -> u64 {
        self.seen.len() as u64
    }
}

fn page_request(kind: ListKind, limit: u32, after: Option<&str>) -> Value {
    let mut data = json!({"list_type": kind.as_str(), "limit": limit});
    if let Some(after) = after {
        data["after"] = Value::from(after);
    }
    json!({"command": "list", "data": data})
}

impl Bench {
    pub(crate) async fn pages(&mut self, kinds: &[ListKind], page_size: u32) -> Result<()> {
        let reader = self.reader_request().await?;
        let setup = Setup::Request(Arc::new(move |_| reader.clone()));
        let dialer = self.dialer(PER_ADDRESS);
        let (mut conns, _) = open_all(&dialer, 0, 1, 1, setup, self.timeout).await?;
        let Some(mut conn) = conns.pop() else {
            return Err(BenchError::new("no connection to page with"));
        };
        for &kind in kinds {
            self.walk(&mut conn, kind, page_size).await?;
        }
        Ok(())
    }

    async fn walk(&mut self, conn: &mut Conn, kind: ListKind, page_size: u32) -> Result<()> {
        let pid = self.server_pid;
        let before = pid.and_then(rss::rss_kib);
        let watch = RssWatch::start(pid);
        let started = Instant::now();
        let mut walk = Walk::default();
        let mut tally = Tally::default();
        let mut after = None;
        loop {
            let asked = Instant::now();
            let reply = conn
                .call(&page_request(kind, page_size, after.as_deref()))
                .await?;
            tally.latency.record(asked.elapsed());
            tally.requests += 1;
            // The reply line as it came, newline included.
            tally.bytes += conn.head().len() as u64;
            after = walk.take(kind, &reply)?;
            if after.is_none() {
                break;
            }
        }
        let elapsed = started.elapsed();
        let mut rss = watch.finish();
        rss.before_kib = before;
        // The whole list once, to count what the pages should have held.
        conn.send(&line(
            &json!({"command": "list", "data": {"list_type": kind.as_str()}}),
        ))
        .await?;
        conn.reply(256).await?;
        if !conn.succeeded() {
            return Err(BenchError::new(format!(
                "the full {} list failed: {}",
                kind.as_str(),
                conn.error_text()
            )));
        }
        let whole = leading_count(conn.head());
        tally.items = Some(walk.entries() / walk.pages.max(1));
        let mut row = Row::new(
            format!("{} pages", kind.as_str()),
            "server",
            1,
            1,
            &tally,
            elapsed,
        );
        row.rss = Some(rss);
        self.report.rows.push(row);
        if whole != Some(walk.entries()) {
            return Err(BenchError::new(format!(
                "{} in pages of {page_size}: {} entries in {} pages, but the full list has {}",
                kind.as_str(),
                walk.entries(),
                walk.pages,
                whole.map_or("no count".to_owned(), |n| n.to_string())
            )));
        }
        self.report.notes.push(format!(
            "{} in pages of {page_size}: {} entries in {} pages, each exactly once, as many as \
             the full list; {:.2} s in all; server RSS {} before, {} at the peak",
            kind.as_str(),
            walk.entries(),
            walk.pages,
            elapsed.as_secs_f64(),
            before.map_or("n/a".to_owned(), crate::report::mib),
            rss.peak_kib.map_or("n/a".to_owned(), crate::report::mib),
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(entries: Value, next: Option<&str>) -> Value {
        let mut data = json!({"all_vms": entries});
        if let Some(next) = next {
            data["next"] = Value::from(next);
        }
        json!({"status": "success", "message": "n all_vms", "data": data})
    }

    #[test]
    fn a_walk_counts_each_entry_once_and_follows_the_cursor() {
        let mut walk = Walk::default();
        let first = page(json!([{"vm_id": "a"}, {"vm_id": "b"}]), Some("c1"));
        assert_eq!(
            walk.take(ListKind::AllVms, &first).unwrap().as_deref(),
            Some("c1")
        );
        let last = page(json!([{"vm_id": "c"}]), None);
        assert_eq!(walk.take(ListKind::AllVms, &last).unwrap(), None);
        assert_eq!((walk.entries(), walk.pages), (3, 2));
    }

    #[test]
    fn a_repeated_entry_a_stuck_page_or_an_error_fails_the_walk() {
        let mut walk = Walk::default();
        walk.take(ListKind::AllVms, &page(json!([{"vm_id": "a"}]), Some("c1")))
            .unwrap();
        let again = walk
            .take(ListKind::AllVms, &page(json!([{"vm_id": "a"}]), None))
            .unwrap_err();
        assert!(again.0.contains("a came a second time"), "{}", again.0);

        let stuck = Walk::default()
            .take(ListKind::AllVms, &page(json!([]), Some("c1")))
            .unwrap_err();
        assert!(
            stuck.0.contains("empty but says that more follow"),
            "{}",
            stuck.0
        );

        let refused = json!({"status": "error", "code": "invalid_params", "message": "bad cursor"});
        let refused = Walk::default()
            .take(ListKind::AllVms, &refused)
            .unwrap_err();
        assert!(
            refused.0.contains("invalid_params: bad cursor"),
            "{}",
            refused.0
        );
    }

    #[test]
    fn disks_and_sessions_are_keyed_by_their_ids() {
        assert_eq!(
            key(ListKind::AllDisks, &json!({"id": 7, "vm_id": "a"})).as_deref(),
            Some("7")
        );
        assert_eq!(
            key(
                ListKind::ActiveVms,
                &json!({"session_id": 12, "vm_id": "a"})
            )
            .as_deref(),
            Some("12")
        );
        assert_eq!(key(ListKind::AllVms, &json!({"id": 7})), None);
    }
}
