//! `logout`: ends the session's authentication. The connection stays open and
//! stays bound to its VM in `active_vms`.
//!
//! ```text
//! -> {"command": "logout", "data": {}}
//! <- {"status":"success","message":"logged out of stalin","data":{}}
//! ```

use crate::context::Context;
use crate::error::Error;
use crate::params::{self, Empty};
use crate::protocol::Data;
use crate::registry::{Command, HandlerFuture, Success};
use crate::session::Session;

inventory::submit! {
    Command { name: "logout", summary: "end this connection's authentication", handler }
}

fn handler<'a>(_: &'a Context, session: &'a mut Session, data: Data) -> HandlerFuture<'a> {
    Box::pin(async move {
        let vm_id = session
            .authenticated_vm()
            .ok_or_else(Error::not_authenticated)?
            .to_owned();
        params::parse::<Empty>(data)?;
        session.logout().await?;
        tracing::info!(vm_id = %vm_id, "logged out");
        Ok(Success::new(format!("logged out of {vm_id}")))
    })
}
