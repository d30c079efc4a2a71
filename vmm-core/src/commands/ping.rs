//! `ping`: checks that the server answers. Never touches the database.
//!
//! ```text
//! -> {"command": "ping", "data": {}}
//! <- {"status":"success","message":"PONG","data":{}}
//! ```

use crate::context::Context;
use crate::params;
use crate::protocol::Data;
use crate::registry::{Command, HandlerFuture, Success};
use crate::session::Session;

inventory::submit! {
    Command { name: "ping", summary: "check that the server answers", handler }
}

fn handler<'a>(_: &'a Context, _: &'a mut Session, data: Data) -> HandlerFuture<'a> {
    Box::pin(async move {
        params::none(data)?;
        Ok(Success::new("PONG"))
    })
}
