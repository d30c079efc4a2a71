//! `help`: every command this server knows, read from the registry, so that a
//! host's own commands show up too.
//!
//! ```text
//! -> {"command": "help", "data": {}}
//! <- {"status":"success","message":"7 commands","data":{"commands":[{"name":"authenticate","summary":"..."}, ...]}}
//! ```

use crate::context::Context;
use crate::error::Error;
use crate::params;
use crate::protocol::{CommandHelp, Data};
use crate::registry::{Command, HandlerFuture, Registry, Success};
use crate::session::Session;

inventory::submit! {
    Command { name: "help", summary: "list the commands this server understands", handler }
}

fn handler<'a>(_: &'a Context, _: &'a mut Session, data: Data) -> HandlerFuture<'a> {
    Box::pin(async move {
        params::none(data)?;
        let registry = Registry::global().map_err(|_| Error::internal())?;
        let commands: Vec<CommandHelp> = registry
            .commands()
            .map(|command| CommandHelp {
                name: command.name.to_owned(),
                summary: command.summary.to_owned(),
            })
            .collect();
        Success::new(format!("{} commands", commands.len())).with("commands", commands)
    })
}
