//! `revoke`: ends every session of a VM, for operator sessions only.
//!
//! ```text
//! -> {"command": "revoke", "data": {"vm_id": "stalin"}}
//! <- {"status":"success","message":"revoked 2 tokens of stalin","data":{"vm_id":"stalin","tokens":2}}
//! ```
//!
//! Every session token of the VM is deleted, and with it every session that
//! authenticated with one of them ends, on every instance, within a second:
//! each gets `not_authenticated` on its next command and leaves
//! `authenticated_vms`. Connections stay open. The VM can authenticate again
//! with its password. An unknown VM is `not_found`; a VM session gets
//! `forbidden`.

use serde::Deserialize;

use crate::context::Context;
use crate::error::Error;
use crate::params;
use crate::protocol::{Data, ErrorCode};
use crate::registry::{Command, HandlerFuture, Success};
use crate::session::Session;

inventory::submit! {
    Command {
        name: "revoke",
        summary: "end every session of a VM by revoking its tokens (operator sessions only)",
        handler,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    vm_id: String,
}

fn handler<'a>(ctx: &'a Context, session: &'a mut Session, data: Data) -> HandlerFuture<'a> {
    Box::pin(async move {
        if !session.is_operator() {
            let Some(vm) = session.authenticated_vm().map(str::to_owned) else {
                return Err(Error::not_authenticated());
            };
            ctx.audit(session, Some(&vm), "revoke", "forbidden", "not an operator")
                .await;
            return Err(Error::forbidden("`revoke` is for operator sessions only"));
        }
        let p: Params = params::parse(data)?;
        params::vm_id(&p.vm_id)?;
        let Some(tokens) = ctx.store.revoke_vm(&p.vm_id).await? else {
            return Err(Error::new(
                ErrorCode::NotFound,
                format!("there is no VM named {}", p.vm_id),
            ));
        };
        tracing::info!(vm_id = %p.vm_id, tokens, "tokens revoked by an operator");
        let detail = format!("{tokens} tokens");
        ctx.audit(session, Some(&p.vm_id), "revoke", "success", &detail)
            .await;
        Success::new(format!("revoked {tokens} tokens of {}", p.vm_id))
            .with("vm_id", &p.vm_id)?
            .with("tokens", tokens)
    })
}
