//! `logout`: ends the session's authentication. For a VM it revokes the
//! session's token, which ends every session of its family (every
//! connection that authenticated with that token), on every instance. The
//! connection stays open and stays bound to its VM in `active_vms`.
//!
//! ```text
//! -> {"command": "logout", "data": {}}
//! <- {"status":"success","message":"logged out of stalin","data":{}}
//! ```
//!
//! A `token` in `data`, when given, must be the session's live token (else
//! `not_authenticated`).

use serde::Deserialize;

use crate::context::Context;
use crate::params;
use crate::protocol::Data;
use crate::registry::{Command, HandlerFuture, Success};
use crate::secrets;
use crate::session::{Ended, Session};
use crate::store::{Authority, TokenCheck};

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
        let (Some(vm_id), Some(login)) = (session.authenticated_vm(), session.vm_login()) else {
            return Err(super::unauthenticated(session, &data));
        };
        let vm_id = vm_id.to_owned();
        let p: Params = params::parse(data)?;
        let digest = p.token.as_deref().map(secrets::digest);
        let authority = Authority {
            family: login.family(),
            token: digest.as_ref(),
        };
        match ctx.store.revoke_family(authority).await? {
            TokenCheck::Valid => {}
            TokenCheck::Revoked => {
                session.end(Ended::Revoked).await;
                return Err(super::token_refused(TokenCheck::Revoked));
            }
            wrong => return Err(super::token_refused(wrong)),
        }
        // Ended here at once; the revocation reaches the family's other
        // sessions through every instance's event listener.
        session.logout().await?;
        tracing::info!(vm_id = %vm_id, "logged out");
        ctx.audit(session, Some(&vm_id), "logout", "success", "")
            .await;
        Ok(Success::new(format!("logged out of {vm_id}")))
    })
}
