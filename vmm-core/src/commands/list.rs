//! `list`: what the server knows, for an authenticated session (a VM's or an
//! operator's; a `token` in `data`, when a VM session gives one, must be its
//! live token). Each list is a
//! constant number of queries whatever the number of VMs, disks or sessions.
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

use std::collections::{BTreeSet, HashMap};

use serde::Deserialize;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::params;
use crate::protocol::{
    ActiveSession, AuthenticatedSession, Data, ListType, Timestamp, VmStatus, VmView,
};
use crate::registry::{Command, HandlerFuture, Success};
use crate::session::{Session, SessionInfo};

inventory::submit! {
    Command {
        name: "list",
        summary: "list active_vms, authenticated_vms, all_vms or all_disks (needs authentication)",
        handler,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    list_type: String,
    /// When given, it must be this session's token.
    token: Option<String>,
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

/// The VMs the given sessions are bound to, fetched in one query.
async fn views_of(ctx: &Context, sessions: &[SessionInfo]) -> Result<HashMap<String, VmView>> {
    let ids: BTreeSet<&str> = sessions.iter().filter_map(|s| s.vm_id.as_deref()).collect();
    let ids: Vec<&str> = ids.into_iter().collect();
    let records = ctx.store.vms(&ids).await?;
    Ok(records
        .into_iter()
        .map(|record| (record.view.vm_id.clone(), record.view))
        .collect())
}

fn handler<'a>(ctx: &'a Context, session: &'a mut Session, data: Data) -> HandlerFuture<'a> {
    Box::pin(async move {
        if !session.may_read() {
            return Err(Error::not_authenticated());
        }
        let p: Params = params::parse(data)?;
        super::check_token(ctx, session, p.token.as_deref()).await?;
        let kind = list_type(&p.list_type)?;
        let reply = |count: usize| Success::new(format!("{count} {}", kind.as_str()));
        match kind {
            ListType::ActiveVms => {
                let sessions = ctx.sessions.everywhere().await?;
                let vms = views_of(ctx, &sessions).await?;
                let entries: Vec<ActiveSession> = sessions
                    .into_iter()
                    .map(|s| ActiveSession {
                        session_id: s.id,
                        authenticated: s.is_authenticated(),
                        peer: s.peer,
                        connected_at: s.connected_at,
                        vm: s.vm_id.as_deref().and_then(|id| vms.get(id).cloned()),
                        vm_id: s.vm_id,
                    })
                    .collect();
                reply(entries.len()).with(kind.as_str(), entries)
            }
            ListType::AuthenticatedVms => {
                let sessions: Vec<SessionInfo> = ctx
                    .sessions
                    .everywhere()
                    .await?
                    .into_iter()
                    .filter(SessionInfo::is_authenticated)
                    .collect();
                let vms = views_of(ctx, &sessions).await?;
                let entries: Vec<AuthenticatedSession> = sessions
                    .into_iter()
                    .filter_map(|s| {
                        let vm = vms.get(s.vm_id.as_deref()?)?.clone();
                        Some(AuthenticatedSession {
                            vm,
                            session_id: s.id,
                            peer: s.peer,
                            authenticated_at: s.authenticated_at?,
                        })
                    })
                    .collect();
                reply(entries.len()).with(kind.as_str(), entries)
            }
            ListType::AllVms => {
                let records = ctx.store.all_vms().await?;
                let sessions = ctx.sessions.everywhere().await?;
                let now = Timestamp::now();
                let entries: Vec<VmStatus> = records
                    .into_iter()
                    .map(|record| {
                        let mine =
                            |s: &&SessionInfo| s.vm_id.as_deref() == Some(&record.view.vm_id);
                        let connected = sessions.iter().any(|s| mine(&s));
                        let authenticated = sessions
                            .iter()
                            .filter(mine)
                            .any(SessionInfo::is_authenticated);
                        VmStatus {
                            connected,
                            authenticated,
                            last_seen_at: if connected {
                                Some(now)
                            } else {
                                record.last_seen_at
                            },
                            vm: record.view,
                        }
                    })
                    .collect();
                reply(entries.len()).with(kind.as_str(), entries)
            }
            ListType::AllDisks => {
                let disks = ctx.store.all_disks().await?;
                reply(disks.len()).with(kind.as_str(), disks)
            }
        }
    })
}
