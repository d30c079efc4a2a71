//! `authenticate`: makes the connection's session act as a VM. An already
//! authenticated session switches to the new VM.
//!
//! ```text
//! -> {"command": "authenticate", "data": {"vm_id": "stalin", "password": "securePass123"}}
//! <- {"status":"success","message":"authenticated as stalin","data":{"vm":{...}}}
//! ```
//!
//! An unknown VM and a wrong password give the same `invalid_credentials`
//! reply, and take the same time: an unknown VM is checked against a dummy
//! hash.

use serde::Deserialize;

use crate::context::Context;
use crate::error::Error;
use crate::params;
use crate::password::Verified;
use crate::protocol::Data;
use crate::registry::{Command, HandlerFuture, Success};
use crate::session::Session;

inventory::submit! {
    Command { name: "authenticate", summary: "authenticate this connection as a VM with its password", handler }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    vm_id: String,
    password: String,
}

fn handler<'a>(ctx: &'a Context, session: &'a mut Session, data: Data) -> HandlerFuture<'a> {
    Box::pin(async move {
        let p: Params = params::parse(data)?;
        params::vm_id(&p.vm_id)?;
        params::password(&p.password)?;

        let hash = ctx.store.password_hash(&p.vm_id).await?;
        match ctx.passwords.verify(p.password, hash).await? {
            Verified::No => {
                tracing::info!(vm_id = %p.vm_id, "authentication failed");
                return Err(Error::invalid_credentials());
            }
            Verified::Yes => {}
            Verified::YesRehashed(hash) => {
                ctx.store.set_password_hash(&p.vm_id, &hash).await?;
                tracing::info!(vm_id = %p.vm_id, "password re-hashed with the current argon2 parameters");
            }
        }
        // The VM this connection leaves (if it switches) was last seen now.
        let mut seen = vec![p.vm_id.as_str()];
        seen.extend(session.vm_id().filter(|previous| *previous != p.vm_id));
        ctx.store.touch(&seen).await?;
        let Some(vm) = ctx.store.vm(&p.vm_id).await? else {
            return Err(Error::invalid_credentials());
        };
        session.authenticate(&vm.vm_id).await?;
        tracing::info!(vm_id = %vm.vm_id, "authenticated");
        Success::new(format!("authenticated as {}", vm.vm_id)).with("vm", vm)
    })
}
