//! `register`: creates a VM and its disks. Binds the connection to the VM (it
//! shows in `active_vms`) but does not authenticate it.
//!
//! ```text
//! -> {"command": "register", "data": {"vm_id": "stalin", "ram": 512, "cpu": 4,
//!     "password": "securePass123", "disks": [{"disk_size": 100}, {"disk_size": 200}]}}
//! <- {"status":"success","message":"VM stalin registered","data":{"vm":{"vm_id":"stalin",
//!     "ram":512,"cpu":4,"disks":[{"id":1,"disk_size":100},{"id":2,"disk_size":200}],
//!     "created_at":"...","updated_at":"..."}}}
//! ```
//!
//! A taken `vm_id` is `already_exists`, also when two registrations race.
//! When the server has an enrollment secret (`--registration-secret`),
//! `data.registration_secret` must equal it, else `forbidden`. Guesses are
//! throttled per client address like passwords: each reserves its place
//! before the secret is compared, a right secret gives it back, and after 5
//! wrong ones the address gets `too_many_attempts` (with `retry_after_ms`).

use serde::Deserialize;

use crate::context::Context;
use crate::error::Error;
use crate::protocol::{Data, ErrorCode, limits};
use crate::registry::{Command, HandlerFuture, Success};
use crate::session::Session;
use crate::{params, secrets};

inventory::submit! {
    Command { name: "register", summary: "register a new VM with its RAM, CPUs, password and disks", handler }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    vm_id: String,
    ram: i64,
    cpu: i64,
    password: String,
    #[serde(default)]
    disks: Vec<NewDisk>,
    /// The enrollment secret, when the server requires one.
    registration_secret: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDisk {
    disk_size: i64,
}

fn taken(vm_id: &str) -> Error {
    Error::new(
        ErrorCode::AlreadyExists,
        format!("a VM named {vm_id} already exists"),
    )
}

fn handler<'a>(ctx: &'a Context, session: &'a mut Session, data: Data) -> HandlerFuture<'a> {
    Box::pin(async move {
        let p: Params = params::parse(data)?;
        params::vm_id(&p.vm_id)?;
        if let Some(expected) = &ctx.config.registration_secret {
            let keys = [format!("enroll:{}", session.peer_ip())];
            let throttle = &ctx.config.throttle;
            let reservation = ctx.store.reserve_login(None, &keys, throttle).await?;
            if let Some(refused) = reservation.refused {
                return Err(super::authenticate::throttled(ctx, session, None, &refused).await);
            }
            let given = p.registration_secret.as_deref().unwrap_or_default();
            if secrets::same(given, expected) {
                ctx.store.release_login(&keys, None).await?;
            } else {
                ctx.store.login_failed(&keys, throttle).await?;
                tracing::warn!("registration refused: wrong or missing enrollment secret");
                let detail = if p.registration_secret.is_some() {
                    "wrong enrollment secret"
                } else {
                    "no enrollment secret"
                };
                ctx.audit(session, Some(&p.vm_id), "register", "forbidden", detail)
                    .await;
                return Err(Error::forbidden(
                    "this server requires its enrollment secret (`registration_secret`) to register",
                ));
            }
        }
        let ram = params::ram(p.ram)?;
        let cpu = params::cpu(p.cpu)?;
        params::password(&p.password)?;
        if p.disks.len() > limits::MAX_DISKS {
            return Err(Error::invalid_params(format!(
                "`disks`: a VM has at most {} disks",
                limits::MAX_DISKS
            )));
        }
        let disks = p
            .disks
            .iter()
            .enumerate()
            .map(|(i, disk)| params::disk_size(&format!("disks[{i}].disk_size"), disk.disk_size))
            .collect::<Result<Vec<_>, _>>()?;

        // Hashing is the expensive part: skip it for an id that is plainly taken.
        if ctx.store.exists(&p.vm_id).await? {
            ctx.audit(session, Some(&p.vm_id), "register", "already_exists", "")
                .await;
            return Err(taken(&p.vm_id));
        }
        let hash = ctx.passwords.hash(p.password).await?;
        let Some(vm) = ctx
            .store
            .register(&p.vm_id, ram, cpu, &hash, &disks)
            .await?
        else {
            ctx.audit(session, Some(&p.vm_id), "register", "already_exists", "")
                .await;
            return Err(taken(&p.vm_id));
        };
        session.bind(&vm.vm_id).await;
        tracing::info!(vm_id = %vm.vm_id, disks = vm.disks.len(), "VM registered");
        let detail = format!("ram {} MiB, cpu {}, disks {:?} GiB", vm.ram, vm.cpu, disks);
        ctx.audit(session, Some(&vm.vm_id), "register", "success", &detail)
            .await;
        Success::new(format!("VM {} registered", vm.vm_id)).with("vm", vm)
    })
}
