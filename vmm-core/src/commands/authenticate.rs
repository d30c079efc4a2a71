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
//!
//! Failed attempts are counted per `vm_id` and per client address, in the
//! database so that it holds across instances. After 5 failures with no
//! 5-minute pause, a key is blocked for 30 s, doubling with each further
//! failure up to 15 minutes; while either key is blocked the reply is
//! `too_many_attempts` with `data.retry_after_ms`, and no hash is spent. A
//! success clears the VM's count (not the address's).

use serde::Deserialize;

use crate::context::Context;
use crate::error::Error;
use crate::params;
use crate::password::Verified;
use crate::protocol::{Data, ErrorCode};
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

        let vm_key = format!("vm:{}", p.vm_id);
        let keys = [vm_key.clone(), format!("ip:{}", session.peer_ip())];
        let state = ctx.store.login_state(&p.vm_id, &keys).await?;
        if let Some(retry_after_ms) = state.retry_after_ms {
            tracing::info!(vm_id = %p.vm_id, retry_after_ms, "authentication throttled");
            let mut err = Error::new(
                ErrorCode::TooManyAttempts,
                format!(
                    "too many failed attempts; try again in {} s",
                    (retry_after_ms + 999) / 1000
                ),
            );
            err.data
                .insert("retry_after_ms".into(), retry_after_ms.into());
            return Err(err);
        }
        match ctx
            .passwords
            .verify(p.password, state.password_hash)
            .await?
        {
            Verified::No => {
                tracing::info!(vm_id = %p.vm_id, "authentication failed");
                ctx.store
                    .record_failure(&keys, &ctx.config.throttle)
                    .await?;
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
        if state.has_failures {
            ctx.store.clear_failures(&vm_key).await?;
        }
        tracing::info!(vm_id = %vm.vm_id, "authenticated");
        Success::new(format!("authenticated as {}", vm.vm_id)).with("vm", vm)
    })
}
