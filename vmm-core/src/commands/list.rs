//! `list`: what the server knows, for an authenticated session (a VM's or an
//! operator's; a `token` in `data`, when a VM session gives one, must be its
//! live token).
//!
//! ```text
//! -> {"command": "list", "data": {"list_type": "active_vms"}}
//! <- {"status":"success","message":"1 active_vms","data":{"active_vms":[{"session_id":1,
//!     "peer":"127.0.0.1:50000","connected_at":"...","vm_id":"stalin","authenticated":true,"vm":{...}}]}}
//! ```
//!
//! `list_type` is one of:
//! - `active_vms`: every open connection, with the VM it is bound to (if any);
//! - `authenticated_vms`: every authenticated connection, as its VM plus
//!   `session_id`, `peer` and `authenticated_at`;
//! - `all_vms`: every VM ever registered, plus `connected`, `authenticated`
//!   and `last_seen_at`;
//! - `all_disks`: every disk with the VM it is attached to.
//!
//! Entries come in key order: `vm_id` for VMs, `id` for disks, `session_id`
//! for sessions. Paging is optional: `limit` (1 to 10,000) caps the entries
//! of a reply, and a reply cut short carries `data.next`, a cursor to pass as
//! `after` for the following page (keyset paging: a page never repeats or
//! skips an entry that existed before the first one was asked for).
//!
//! ```text
//! -> {"command": "list", "data": {"list_type": "all_vms", "limit": 2}}
//! <- {"status":"success","message":"2 all_vms","data":{"all_vms":[{...},{...}],"next":"YWxsX3Ztczpi"}}
//! -> {"command": "list", "data": {"list_type": "all_vms", "limit": 2, "after": "YWxsX3Ztczpi"}}
//! <- {"status":"success","message":"1 all_vms","data":{"all_vms":[{...}]}}
//! ```
//!
//! A list is streamed as PostgreSQL returns it (see [`crate::listing`]):
//! each costs a count and one query in one snapshot, whatever the size of
//! the fleet, and a constant amount of memory.

use std::collections::HashMap;
use std::fmt::Display;
use std::str::FromStr;

use base64ct::{Base64UrlUnpadded, Encoding};
use serde::{Deserialize, Serialize};

use crate::context::Context;
use crate::error::{Error, Result};
use crate::listing::{Batch, Entries, Fill, FillFuture, Listing};
use crate::params;
use crate::protocol::{
    ActiveSession, AuthenticatedSession, Data, DiskView, ListType, Timestamp, VmView,
};
use crate::registry::{Command, HandlerFuture, Success};
use crate::session::{Session, SessionInfo};
use crate::store::{DiskRows, Page, SessionRows, VmRows};

inventory::submit! {
    Command {
        name: "list",
        summary: "list active_vms, authenticated_vms, all_vms or all_disks, optionally a page at a time (needs authentication)",
        handler,
    }
}

/// The most entries one page may ask for.
pub const MAX_LIMIT: i64 = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    list_type: String,
    /// When given, it must be this session's token.
    token: Option<String>,
    limit: Option<i64>,
    after: Option<String>,
}

fn list_type(name: &str) -> Result<ListType> {
    Ok(match name {
        "active_vms" => ListType::ActiveVms,
        "authenticated_vms" => ListType::AuthenticatedVms,
        "all_vms" => ListType::AllVms,
        "all_disks" => ListType::AllDisks,
        _ => {
            return Err(Error::invalid_params(
                "`list_type` must be one of active_vms, authenticated_vms, all_vms, all_disks",
            ));
        }
    })
}

/// The cursor after the entry with this key. Opaque to clients; it names
/// its list so that a cursor of one list is refused by another.
fn cursor(kind: ListType, key: impl Display) -> String {
    Base64UrlUnpadded::encode_string(format!("{}:{key}", kind.as_str()).as_bytes())
}

/// The key a cursor points after.
fn after<K: FromStr>(kind: ListType, cursor: &str) -> Result<K> {
    let bad = || {
        Error::invalid_params(format!(
            "`after` is not a cursor of {}: pass the `next` of the previous page",
            kind.as_str()
        ))
    };
    let bytes = Base64UrlUnpadded::decode_vec(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (list, key) = text.split_once(':').ok_or_else(bad)?;
    if list != kind.as_str() {
        return Err(bad());
    }
    key.parse().map_err(|_| bad())
}

fn handler<'a>(ctx: &'a Context, session: &'a mut Session, data: Data) -> HandlerFuture<'a> {
    Box::pin(async move {
        if !session.may_read() {
            return Err(super::unauthenticated(session, &data));
        }
        let p: Params = params::parse(data)?;
        super::check_token(ctx, session, p.token.as_deref()).await?;
        let kind = list_type(&p.list_type)?;
        let limit = p
            .limit
            .map(|limit| params::ranged("limit", limit, 1..=MAX_LIMIT, ""))
            .transpose()?;
        let after_cursor = p.after.as_deref();
        // Queued here, before any database work, while too many run.
        let permit = ctx.lists.permit().await?;
        let me = ctx.sessions.instance_id();
        let (count, entries): (u64, Box<dyn Entries>) = match kind {
            ListType::AllVms => {
                let after = after_cursor.map(|c| after::<String>(kind, c)).transpose()?;
                let page = Page {
                    after: after.as_deref().unwrap_or(""),
                    limit,
                };
                let vms = ctx.store.vm_page(page, me).await?;
                let entries = VmEntries {
                    rows: vms.rows,
                    presence: Presence::of(&ctx.sessions.local()),
                    more: vms.more,
                    last: None,
                    now: Timestamp::now(),
                };
                (vms.count, Box::new(entries))
            }
            ListType::AllDisks => {
                let after = after_cursor.map(|c| after::<i64>(kind, c)).transpose()?;
                let page = Page {
                    after: after.unwrap_or(0),
                    limit,
                };
                let disks = ctx.store.disk_page(page).await?;
                let entries = DiskEntries {
                    rows: disks.rows,
                    more: disks.more,
                    last: None,
                };
                (disks.count, Box::new(entries))
            }
            ListType::ActiveVms | ListType::AuthenticatedVms => {
                let after = after_cursor.map(|c| after::<u64>(kind, c)).transpose()?;
                let page = Page {
                    after: after.unwrap_or(0),
                    limit,
                };
                let entries = SessionEntries::start(ctx, kind, page).await?;
                (entries.left, Box::new(entries))
            }
        };
        let message = format!("{count} {}", kind.as_str());
        Ok(Success::listing(
            message,
            Listing::new(kind.as_str(), count, entries, permit),
        ))
    })
}

/// Which VMs this instance's sessions are bound to, and whether one of
/// each VM's sessions is authenticated: built once per list, in time linear
/// in the sessions, so that the status of every VM is a lookup.
#[derive(Debug, Default)]
pub(crate) struct Presence(HashMap<String, bool>);

impl Presence {
    pub(crate) fn of(sessions: &[SessionInfo]) -> Presence {
        let mut bound = HashMap::with_capacity(sessions.len());
        for session in sessions {
            if let Some(vm_id) = &session.vm_id {
                let authenticated = bound.entry(vm_id.clone()).or_insert(false);
                *authenticated |= session.is_authenticated();
            }
        }
        Presence(bound)
    }

    /// `None` when no session is bound to the VM, else whether one of them
    /// is authenticated.
    pub(crate) fn get(&self, vm_id: &str) -> Option<bool> {
        self.0.get(vm_id).copied()
    }
}

/// An entry of `all_vms` as written, borrowed: the fields of
/// [`crate::protocol::VmStatus`], in its order, without building one.
#[derive(Serialize)]
struct VmStatusRef<'a> {
    vm_id: &'a str,
    ram: u32,
    cpu: u32,
    disks: &'a [DiskView],
    created_at: Timestamp,
    updated_at: Timestamp,
    connected: bool,
    authenticated: bool,
    last_seen_at: Option<Timestamp>,
}

struct VmEntries {
    rows: VmRows,
    presence: Presence,
    more: bool,
    last: Option<String>,
    now: Timestamp,
}

impl Entries for VmEntries {
    fn fill<'a>(&'a mut self, out: &'a mut Batch) -> FillFuture<'a> {
        Box::pin(async move {
            while !out.is_full() {
                // A long list must not hold its worker thread: small
                // requests on other connections go between its entries.
                tokio::task::consume_budget().await;
                let Some(entry) = self.rows.next().await? else {
                    let next = self.last.take().filter(|_| self.more);
                    return Ok(Fill::Done {
                        next: next.map(|vm_id| cursor(ListType::AllVms, vm_id)),
                    });
                };
                let vm = entry.record.view;
                let local = self.presence.get(&vm.vm_id);
                let connected = local.is_some() || entry.remote_authenticated.is_some();
                let authenticated =
                    local.unwrap_or(false) || entry.remote_authenticated.unwrap_or(false);
                out.entry(&VmStatusRef {
                    vm_id: &vm.vm_id,
                    ram: vm.ram,
                    cpu: vm.cpu,
                    disks: &vm.disks,
                    created_at: vm.created_at,
                    updated_at: vm.updated_at,
                    connected,
                    authenticated,
                    last_seen_at: if connected {
                        Some(self.now)
                    } else {
                        entry.record.last_seen_at
                    },
                })?;
                self.last = Some(vm.vm_id);
            }
            Ok(Fill::More)
        })
    }
}

struct DiskEntries {
    rows: DiskRows,
    more: bool,
    last: Option<i64>,
}

impl Entries for DiskEntries {
    fn fill<'a>(&'a mut self, out: &'a mut Batch) -> FillFuture<'a> {
        Box::pin(async move {
            while !out.is_full() {
                tokio::task::consume_budget().await;
                let Some(disk) = self.rows.next().await? else {
                    let next = self.last.filter(|_| self.more);
                    return Ok(Fill::Done {
                        next: next.map(|id| cursor(ListType::AllDisks, id)),
                    });
                };
                out.entry(&disk)?;
                self.last = Some(disk.id);
            }
            Ok(Fill::More)
        })
    }
}

/// A session with the VM it is bound to, if that exists.
type Bound = (SessionInfo, Option<VmView>);

/// The sessions of a page: this instance's from memory, the others' from
/// the database, merged in `session_id` order.
struct SessionEntries {
    kind: ListType,
    local: std::iter::Peekable<std::vec::IntoIter<Bound>>,
    remote: SessionRows,
    /// The next remote session, read ahead to compare with the next local one.
    remote_next: Option<Bound>,
    remote_done: bool,
    /// Entries this page still holds.
    left: u64,
    more: bool,
    last: Option<u64>,
}

impl SessionEntries {
    async fn start(ctx: &Context, kind: ListType, page: Page<u64>) -> Result<SessionEntries> {
        let authenticated_only = kind == ListType::AuthenticatedVms;
        // One more than the page holds, to tell whether more follow.
        let cap = page.limit.map_or(usize::MAX, |limit| limit as usize + 1);
        let local: Vec<SessionInfo> = ctx
            .sessions
            .local()
            .into_iter()
            .filter(|s| s.id > page.after && (!authenticated_only || s.is_authenticated()))
            .take(cap)
            .collect();
        let ids: Vec<&str> = local.iter().filter_map(|s| s.vm_id.as_deref()).collect();
        let mut vms: HashMap<String, VmView> = ctx
            .store
            .vms(&ids)
            .await?
            .into_iter()
            .map(|record| (record.view.vm_id.clone(), record.view))
            .collect();
        let local: Vec<Bound> = local
            .into_iter()
            .filter_map(|session| {
                let vm = session.vm_id.as_deref().and_then(|id| vms.get(id).cloned());
                (!authenticated_only || vm.is_some()).then_some((session, vm))
            })
            .collect();
        vms.clear();
        let remote = ctx
            .store
            .remote_session_page(page, authenticated_only, ctx.sessions.instance_id())
            .await?;
        let available = u64::try_from(local.len()).unwrap_or(u64::MAX) + remote.available;
        let (left, more) = page.fit(available);
        Ok(SessionEntries {
            kind,
            local: local.into_iter().peekable(),
            remote: remote.rows,
            remote_next: None,
            remote_done: false,
            left,
            more,
            last: None,
        })
    }

    /// The next session of the merge.
    async fn next(&mut self) -> Result<Option<Bound>> {
        if self.remote_next.is_none() && !self.remote_done {
            self.remote_next = self.remote.next().await?;
            self.remote_done = self.remote_next.is_none();
        }
        let local_first = match (self.local.peek(), &self.remote_next) {
            (Some((local, _)), Some((remote, _))) => local.id < remote.id,
            (Some(_), None) => true,
            (None, _) => false,
        };
        Ok(if local_first {
            self.local.next()
        } else {
            self.remote_next.take()
        })
    }

    fn write(&self, out: &mut Batch, (session, vm): Bound) -> Result<()> {
        match self.kind {
            ListType::AuthenticatedVms => {
                let (Some(vm), Some(authenticated_at)) = (vm, session.authenticated_at) else {
                    // Both are filtered for above; counted, so written anyway.
                    return Err(Error::internal());
                };
                out.entry(&AuthenticatedSession {
                    vm,
                    session_id: session.id,
                    peer: session.peer,
                    authenticated_at,
                })
            }
            _ => out.entry(&ActiveSession {
                session_id: session.id,
                authenticated: session.is_authenticated(),
                peer: session.peer,
                connected_at: session.connected_at,
                vm,
                vm_id: session.vm_id,
            }),
        }
    }
}

impl Entries for SessionEntries {
    fn fill<'a>(&'a mut self, out: &'a mut Batch) -> FillFuture<'a> {
        Box::pin(async move {
            while !out.is_full() {
                tokio::task::consume_budget().await;
                let bound = if self.left > 0 {
                    self.next().await?
                } else {
                    None
                };
                let Some(bound) = bound else {
                    // The remote query is bounded by the page: reading the
                    // rest lets its connection go back to the pool.
                    self.remote.finish().await?;
                    let next = self.last.filter(|_| self.more);
                    return Ok(Fill::Done {
                        next: next.map(|id| cursor(self.kind, id)),
                    });
                };
                self.left -= 1;
                self.last = Some(bound.0.id);
                self.write(out, bound)?;
            }
            Ok(Fill::More)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn cursors_round_trip_and_name_their_list() {
        let c = cursor(ListType::AllVms, "vm-1");
        assert_eq!(after::<String>(ListType::AllVms, &c).unwrap(), "vm-1");
        assert!(after::<String>(ListType::AllDisks, &c).is_err());
        let c = cursor(ListType::AllDisks, 42);
        assert_eq!(after::<i64>(ListType::AllDisks, &c).unwrap(), 42);
        for bad in [
            "",
            "!!",
            "YWxsX2Rpc2tz",
            "eA",
            &cursor(ListType::AllDisks, "x"),
        ] {
            let err = after::<i64>(ListType::AllDisks, bad).unwrap_err();
            assert_eq!(err.code, crate::protocol::ErrorCode::InvalidParams, "{bad}");
        }
    }

    fn sessions(n: usize) -> Vec<SessionInfo> {
        (0..n)
            .map(|i| SessionInfo {
                id: i as u64,
                instance_id: 1,
                peer: "127.0.0.1:1".into(),
                connected_at: Timestamp::now(),
                vm_id: Some(format!("vm-{i}")),
                authenticated_at: (i % 2 == 0).then(Timestamp::now),
                version: 0,
            })
            .collect()
    }

    /// CPU time this thread has used: unlike the wall clock, it does not
    /// count the time other tests and processes take the core away.
    fn thread_cpu_time() -> Duration {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid timespec for the call to write.
        let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
        assert_eq!(status, 0, "clock_gettime");
        Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
    }

    /// The join of `all_vms`, ten times over: the presence map from the
    /// sessions, then one lookup per VM.
    fn join_time(n: usize) -> Duration {
        let sessions = sessions(n);
        let vm_ids: Vec<String> = (0..n).map(|i| format!("vm-{}", i * 2)).collect();
        let started = thread_cpu_time();
        for _ in 0..10 {
            let presence = Presence::of(&sessions);
            let found = vm_ids
                .iter()
                .filter(|id| presence.get(id).is_some())
                .count();
            assert_eq!(found, n.div_ceil(2));
        }
        thread_cpu_time().saturating_sub(started)
    }

    /// Doubling both the sessions and the VMs at most doubles the work
    /// (a scan of the sessions per VM would quadruple it). Generous against
    /// noise: linear is 2×, quadratic 4×; the bound is 3×. The work is
    /// timed in this thread's CPU time, both sizes in turns with the least
    /// of each kept, so that other tests running meanwhile do not count;
    /// and it is small enough for both sizes to stay in the CPU's caches,
    /// so that the larger one does not pay for memory the smaller fits in.
    #[test]
    fn the_all_vms_join_is_linear() {
        let n = 2_000;
        join_time(n); // warm up the allocator
        let (mut single, mut double) = (Duration::MAX, Duration::MAX);
        for _ in 0..9 {
            single = single.min(join_time(n));
            double = double.min(join_time(2 * n));
        }
        assert!(
            double < single * 3,
            "{n} sessions and VMs: {single:?}; twice as many: {double:?}"
        );
    }

    #[test]
    fn presence_says_whether_a_bound_session_is_authenticated() {
        let mut all = sessions(3);
        all[1].vm_id = Some("vm-0".into());
        all[2].authenticated_at = None;
        let presence = Presence::of(&all);
        assert_eq!(presence.get("vm-0"), Some(true));
        assert_eq!(presence.get("vm-2"), Some(false));
        assert_eq!(presence.get("vm-1"), None);
    }
}
