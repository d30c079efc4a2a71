//! `logout`: ends the session's authentication and revokes its token. The connection stays open and
//! stays bound to its VM in `active_vms`.
//!
//! ```text
//! -> {"command": "logout", "data": {}}
//! <- {"status":"success","message":"logged out of stalin","data":{}}
//! ```

use crate::context::Context;
use crate::error::Error;
use serde::Deserialize;

use crate::params;
use crate::protocol::Data;
use crate::registry::{Command, HandlerFuture, Success};
use crate::session::Session;

inventory::submit! {
    Command { name: "logout", summary: "end this connection's authentication", handler }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// When given, it must be this session's token.
    token: Option<String>,
}

fn handler<'a>(ctx: &'a Context, session: &'a mut Session, data: Data) -> HandlerFuture<'a> {
    Box::pin(async move {
        if session.is_operator() {
            params::parse::<Params>(data)?;
            session.logout().await?;
            ctx.audit(session, None, "logout", "success", "operator")
                .await;
            return Ok(Success::new("logged out of the operator session"));
        }
        if session.authenticated_vm().is_none() {
            return Err(Error::not_authenticated());
        }
        let p: Params = params::parse(data)?;
        let vm_id = session.authorized_vm(p.token.as_deref())?.to_owned();
        session.logout().await?;
        if let Some(token) = session.take_token() {
            ctx.store.revoke_token(&token).await?;
        }
        tracing::info!(vm_id = %vm_id, "logged out");
        ctx.audit(session, Some(&vm_id), "logout", "success", "")
            .await;
        Ok(Success::new(format!("logged out of {vm_id}")))
    })
}
