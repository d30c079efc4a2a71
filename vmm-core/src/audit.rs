//! The audit trail, with its growth bounded by distinct events rather than
//! by requests.
//!
//! A success is written as it happens: each is a change worth its own row.
//! Any other outcome (a failure, a refusal, a throttled attempt) repeats
//! under attack as fast as a client can send, so repeats coalesce: the first
//! occurrence of an outcome from one address within [`WINDOW`] is written at
//! once and gets an id; later identical ones (same address, action, outcome
//! and detail) are only counted in memory, and a flusher adds them to that
//! row's `count` and `last_at` about once a second, in one statement for all
//! rows. A client hammering a refused command thus costs one row a minute
//! and a share of one UPDATE a second, whatever its rate, and the trail
//! still says "throttled ×4,312 between t1 and t2".
//!
//! Each instance coalesces what it sees itself: with several instances, an
//! event may have a row per instance per window.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::store::Store;

/// Repeats within this long of an event's first occurrence share its row.
pub const WINDOW: Duration = Duration::from_secs(60);

/// How often repeats counted in memory are written.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// The most outcomes coalescing at once; past it (tens of thousands of
/// addresses misbehaving within one window) events are written one by one
/// rather than held in memory.
const MAX_OPEN: usize = 16_384;

/// What repeats must share to coalesce.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    ip: String,
    action: String,
    outcome: String,
    detail: String,
}

/// A row that repeats are being added to.
#[derive(Debug)]
struct Open {
    /// `None` while its first occurrence is being written.
    id: Option<i64>,
    since: Instant,
    vm_id: Option<String>,
    /// Repeats not written yet.
    repeats: i64,
    last_at: SystemTime,
    /// Whether repeats named another VM than the row does: the row then
    /// stands for several VMs and names none.
    mixed: bool,
}

/// One audit event.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// The client's address (`ip:port`).
    pub peer: &'a str,
    pub vm_id: Option<&'a str>,
    pub action: &'a str,
    pub outcome: &'a str,
    pub detail: &'a str,
}

#[derive(Debug)]
pub struct AuditLog {
    store: Store,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    open: HashMap<Key, Open>,
    /// Rows whose window has passed with repeats still to write.
    closing: Vec<Open>,
}

fn ip_of(peer: &str) -> String {
    peer.parse::<SocketAddr>()
        .map(|addr| addr.ip().to_string())
        .unwrap_or_else(|_| peer.to_owned())
}

impl AuditLog {
    pub fn new(store: Store) -> AuditLog {
        AuditLog {
            store,
            state: Mutex::new(State::default()),
        }
    }

    /// Records an event. Best effort: a command that has already happened
    /// is not undone because its audit line could not be written; the
    /// failure is logged.
    pub async fn record(&self, instance_id: i64, entry: Entry<'_>) {
        if entry.outcome != "success" && self.repeat(&entry) {
            return;
        }
        let written = self
            .store
            .audit(
                instance_id,
                entry.peer,
                entry.vm_id,
                entry.action,
                entry.outcome,
                entry.detail,
            )
            .await;
        if entry.outcome != "success" {
            self.opened(&entry, written.as_ref().ok().copied());
        }
        if let Err(err) = written {
            tracing::warn!(error = %err, action = entry.action, outcome = entry.outcome,
                "could not write the audit trail");
        }
    }

    fn key(entry: &Entry<'_>) -> Key {
        Key {
            ip: ip_of(entry.peer),
            action: entry.action.to_owned(),
            outcome: entry.outcome.to_owned(),
            detail: entry.detail.to_owned(),
        }
    }

    /// Counts a refusal that has no time to wait for the database (the
    /// accept loop's, past its refusal slots) against an open row of its
    /// kind, if there is one; false when there is none (the refusal is then
    /// only in the log's counts).
    pub fn count_repeat(&self, entry: Entry<'_>) -> bool {
        let mut state = self.lock();
        match state.open.get_mut(&AuditLog::key(&entry)) {
            Some(row) if row.since.elapsed() < WINDOW => {
                row.repeats += 1;
                row.last_at = SystemTime::now();
                true
            }
            _ => false,
        }
    }

    /// Counts the event against an open row; false when it needs a row of
    /// its own (and is then expected to be written and [`Self::opened`]).
    fn repeat(&self, entry: &Entry<'_>) -> bool {
        let mut state = self.lock();
        let key = AuditLog::key(entry);
        let full = state.open.len() >= MAX_OPEN;
        match state.open.get_mut(&key) {
            Some(row) if row.since.elapsed() < WINDOW => {
                row.repeats += 1;
                row.last_at = SystemTime::now();
                if row.vm_id.as_deref() != entry.vm_id {
                    row.mixed = true;
                }
                return true;
            }
            Some(_) => {
                if let Some(old) = state.open.remove(&key)
                    && old.repeats > 0
                    && old.id.is_some()
                {
                    state.closing.push(old);
                }
            }
            None if full => return false,
            None => {}
        }
        // This event starts a row; repeats that arrive while it is being
        // written are counted against it already.
        state.open.insert(
            key,
            Open {
                id: None,
                since: Instant::now(),
                vm_id: entry.vm_id.map(str::to_owned),
                repeats: 0,
                last_at: SystemTime::now(),
                mixed: false,
            },
        );
        false
    }

    /// The row for `entry` was written (`Some(id)`) or could not be (its
    /// repeats so far are then lost with it).
    fn opened(&self, entry: &Entry<'_>, id: Option<i64>) {
        let mut state = self.lock();
        let key = AuditLog::key(entry);
        let Some(row) = state.open.get_mut(&key) else {
            return;
        };
        if row.id.is_some() {
            return;
        }
        match id {
            Some(id) => row.id = Some(id),
            None => {
                state.open.remove(&key);
            }
        }
    }

    /// Writes the repeats counted so far and forgets rows whose window has
    /// passed with nothing left to write.
    pub async fn flush(&self) {
        let (closing, pending) = {
            let mut state = self.lock();
            state
                .open
                .retain(|_, row| row.repeats > 0 || row.since.elapsed() < WINDOW);
            let closing = std::mem::take(&mut state.closing);
            let pending: Vec<(i64, i64, SystemTime, bool)> = state
                .open
                .values()
                .chain(&closing)
                .filter_map(|row| {
                    let id = row.id?;
                    (row.repeats > 0).then_some((id, row.repeats, row.last_at, row.mixed))
                })
                .collect();
            (closing, pending)
        };
        if pending.is_empty() {
            return;
        }
        match self.store.add_repeats(&pending).await {
            Ok(()) => {
                let written: HashMap<i64, i64> = pending.iter().map(|p| (p.0, p.1)).collect();
                let mut state = self.lock();
                for row in state.open.values_mut() {
                    if let Some(n) = row.id.and_then(|id| written.get(&id)) {
                        row.repeats -= n;
                    }
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not write repeated audit events; retrying");
                self.lock().closing.extend(closing);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl AuditLog {
    /// Writes coalesced repeats every second, for ever (the server runs it
    /// as a task of its own).
    pub async fn flush_every_second(&self) {
        let mut ticker = tokio::time::interval(FLUSH_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.flush().await;
        }
    }
}
