//! `update`: changes the authenticated VM's RAM, CPUs and disks, all or
//! nothing.
//!
//! ```text
//! -> {"command": "update", "data": {"ram": 2048, "cpu": 8,
//!     "disks": [{"id": 1, "disk_size": 150}, {"disk_size": 50}]}}
//! <- {"status":"success","message":"VM stalin updated","data":{"vm":{...}}}
//! ```
//!
//! A disk with `id` is resized in place and keeps its id; it must be this
//! VM's (else `not_found`) and may not shrink. A disk entry may carry
//! `vm_id`, as `list all_disks` shows it, if that is this VM's. A disk without `id` is a new
//! disk. Disks not named are left alone (the old server deleted and
//! re-created them all, with new ids). A VM has at most 64 disks, however
//! many updates race on however many instances: the database enforces it
//! (`invalid_params`, and nothing of that update is written).
//!
//! The session's token must still be live when the update runs: this is
//! checked in the statement that locks the VM, so a revoked session cannot
//! write after its revocation committed (`not_authenticated`).

use std::collections::HashSet;

use serde::Deserialize;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::params;
use crate::protocol::{Data, limits};
use crate::registry::{Command, HandlerFuture, Success};
use crate::secrets;
use crate::session::{Ended, Session};
use crate::store::{Authority, TokenCheck, Updated, VmUpdate};

inventory::submit! {
    Command {
        name: "update",
        summary: "change this VM's ram, cpu and disks (needs authentication)",
        handler,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    ram: Option<i64>,
    cpu: Option<i64>,
    disks: Option<Vec<DiskChange>>,
    /// When given, it must be this session's token.
    token: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskChange {
    id: Option<i64>,
    disk_size: i64,
    /// Accepted so that a disk can be sent back as `list all_disks` shows
    /// it; it must name the session's own VM.
    vm_id: Option<String>,
}

fn validate(p: Params, vm_id: &str) -> Result<VmUpdate> {
    if p.ram.is_none() && p.cpu.is_none() && p.disks.is_none() {
        return Err(Error::invalid_params(
            "nothing to update: give at least one of `ram`, `cpu`, `disks`",
        ));
    }
    let mut update = VmUpdate {
        ram: p.ram.map(params::ram).transpose()?,
        cpu: p.cpu.map(params::cpu).transpose()?,
        ..VmUpdate::default()
    };
    let disks = p.disks.unwrap_or_default();
    if disks.len() > limits::MAX_DISKS {
        return Err(Error::invalid_params(format!(
            "`disks`: a VM has at most {} disks",
            limits::MAX_DISKS
        )));
    }
    let mut named = HashSet::new();
    for (i, disk) in disks.iter().enumerate() {
        if disk.vm_id.as_deref().is_some_and(|owner| owner != vm_id) {
            return Err(Error::invalid_params(format!(
                "`disks[{i}].vm_id`: a VM updates only its own disks ({vm_id})"
            )));
        }
        let size = params::disk_size(&format!("disks[{i}].disk_size"), disk.disk_size)?;
        match disk.id {
            Some(id) => {
                if !named.insert(id) {
                    return Err(Error::invalid_params(format!(
                        "`disks[{i}].id`: disk {id} is named twice"
                    )));
                }
                update.resize.push((id, size));
            }
            None => update.attach.push(size),
        }
    }
    Ok(update)
}

fn handler<'a>(ctx: &'a Context, session: &'a mut Session, data: Data) -> HandlerFuture<'a> {
    Box::pin(async move {
        if session.is_operator() {
            ctx.audit(session, None, "update", "forbidden", "operator session")
                .await;
            return Err(Error::forbidden(
                "an operator session is not a VM: authenticate as the VM to update it",
            ));
        }
        let (Some(vm_id), Some(login)) = (session.authenticated_vm(), session.vm_login()) else {
            return Err(super::unauthenticated(session, &data));
        };
        let (vm_id, family) = (vm_id.to_owned(), login.family());
        let p: Params = params::parse(data)?;
        let digest = p.token.as_deref().map(secrets::digest);
        let update = validate(p, &vm_id)?;
        let authority = Authority {
            family,
            token: digest.as_ref(),
        };
        let by = (ctx.sessions.instance_id(), session.peer());
        let vm = match ctx.store.update(&vm_id, authority, &update, by).await? {
            Updated::Done(vm) => vm,
            Updated::Refused(TokenCheck::Revoked) => {
                session.end(Ended::Revoked).await;
                return Err(super::token_refused(TokenCheck::Revoked));
            }
            Updated::Refused(check) => return Err(super::token_refused(check)),
        };
        tracing::info!(
            vm_id = %vm_id,
            ram = ?update.ram,
            cpu = ?update.cpu,
            resized = update.resize.len(),
            attached = update.attach.len(),
            "VM updated"
        );
        Success::new(format!("VM {vm_id} updated")).with("vm", vm)
    })
}
