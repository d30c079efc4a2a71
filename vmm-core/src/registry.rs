//! The command registry. Each command is a `const` [`Command`] submitted with
//! `inventory::submit!` from its own module, or from a crate that links
//! vmm-core, which is how a host adds commands without touching this crate.
//! The map is built once, on first use; a name submitted twice is an error
//! that stops the server from starting, never "last one wins".

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::context::Context;
use crate::error::Result;
use crate::listing::Listing;
use crate::protocol::Data;
use crate::session::Session;

/// What a successful command returns: the reply's `message` and `data`,
/// and for a list, its entries to stream after `data`'s other keys.
#[derive(Debug)]
pub struct Success {
    pub message: Cow<'static, str>,
    /// Keys of `data` given as values.
    pub data: Data,
    /// Keys of `data` added with [`Success::with`], serialised once, as
    /// text: they are written into the reply as they are, and no `Value`
    /// tree is built of what the server produced itself. After `data`'s.
    pub written: Vec<(String, Box<RawValue>)>,
    pub listing: Option<Listing>,
}

impl Success {
    pub fn new(message: impl Into<Cow<'static, str>>) -> Success {
        Success {
            message: message.into(),
            data: Data::new(),
            written: Vec::new(),
            listing: None,
        }
    }

    /// A list reply whose entries are streamed (see [`crate::listing`]).
    pub fn listing(message: impl Into<Cow<'static, str>>, listing: Listing) -> Success {
        Success {
            listing: Some(listing),
            ..Success::new(message)
        }
    }

    /// Adds one key to `data`.
    pub fn with(mut self, key: &str, value: impl Serialize) -> Result<Success> {
        let value = serde_json::value::to_raw_value(&value).map_err(|err| {
            tracing::error!(error = %err, "cannot serialise a reply");
            crate::Error::internal()
        })?;
        self.written.push((key.to_owned(), value));
        Ok(self)
    }
}

/// Handlers return boxed futures because a registry of async functions needs
/// one concrete type, and async trait methods cannot be called through `dyn`.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<Success>> + Send + 'a>>;

/// A command handler: the shared context, the calling connection's session,
/// and the request's `data`.
pub type Handler = for<'a> fn(&'a Context, &'a mut Session, Data) -> HandlerFuture<'a>;

/// One registry entry.
pub struct Command {
    /// The `command` value that selects this handler.
    pub name: &'static str,
    /// One line for `help`.
    pub summary: &'static str,
    pub handler: Handler,
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Command")
            .field("name", &self.name)
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

inventory::collect!(Command);

/// Two commands were submitted under one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateCommand(pub &'static str);

impl fmt::Display for DuplicateCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "command `{}` is registered more than once; every command name must be unique",
            self.0
        )
    }
}

impl std::error::Error for DuplicateCommand {}

#[derive(Debug)]
pub struct Registry {
    /// Each command with its position in name order, which
    /// [`crate::metrics`] uses to find the command's counters without
    /// hashing its name again.
    commands: BTreeMap<&'static str, (usize, &'static Command)>,
    /// The position of `ping` when it is the built-in one, which the
    /// connection may answer without dispatching (see
    /// [`Registry::quick_ping`]).
    quick_ping: Option<usize>,
}

impl Registry {
    /// The registry of every command linked into this program.
    pub fn global() -> Result<&'static Registry, DuplicateCommand> {
        static REGISTRY: OnceLock<Result<Registry, DuplicateCommand>> = OnceLock::new();
        REGISTRY
            .get_or_init(|| Registry::from_commands(inventory::iter::<Command>))
            .as_ref()
            .map_err(Clone::clone)
    }

    pub fn from_commands(
        commands: impl IntoIterator<Item = &'static Command>,
    ) -> Result<Registry, DuplicateCommand> {
        let mut map = BTreeMap::new();
        for command in commands {
            if map.insert(command.name, (0, command)).is_some() {
                return Err(DuplicateCommand(command.name));
            }
        }
        for (index, entry) in map.values_mut().enumerate() {
            entry.0 = index;
        }
        let quick_ping = map
            .get("ping")
            .filter(|(_, command)| crate::commands::ping::is_builtin(command))
            .map(|&(index, _)| index);
        Ok(Registry {
            commands: map,
            quick_ping,
        })
    }

    pub fn get(&self, name: &str) -> Option<&'static Command> {
        self.commands.get(name).map(|&(_, command)| command)
    }

    /// The position of `ping` in [`Registry::commands`] when the registered
    /// `ping` is the built-in one, whose usual requests the connection then
    /// answers itself, without decoding them; `None` when a program
    /// registered a `ping` of its own (or none).
    pub fn quick_ping(&self) -> Option<usize> {
        self.quick_ping
    }

    /// The command and its position in [`Registry::commands`].
    pub fn find(&self, name: &str) -> Option<(usize, &'static Command)> {
        self.commands.get(name).copied()
    }

    /// Every command, by name.
    pub fn commands(&self) -> impl Iterator<Item = &'static Command> + '_ {
        self.commands.values().map(|&(_, command)| command)
    }

    pub fn len(&self) -> usize {
        self.commands.len()
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nothing<'a>(_: &'a Context, _: &'a mut Session, _: Data) -> HandlerFuture<'a> {
        Box::pin(async { Ok(Success::new("")) })
    }

    static A: Command = Command {
        name: "a",
        summary: "",
        handler: nothing,
    };
    static B: Command = Command {
        name: "b",
        summary: "",
        handler: nothing,
    };
    static A_AGAIN: Command = Command {
        name: "a",
        summary: "",
        handler: nothing,
    };

    static OTHER_PING: Command = Command {
        name: "ping",
        summary: "",
        handler: nothing,
    };

    /// The connection answers pings itself only for the built-in `ping`.
    #[test]
    fn only_the_built_in_ping_is_answered_without_dispatch() {
        let global = Registry::global().unwrap();
        assert_eq!(
            global.quick_ping(),
            global.find("ping").map(|(index, _)| index)
        );
        assert!(global.quick_ping().is_some());
        let own = Registry::from_commands([&A, &OTHER_PING]).unwrap();
        assert_eq!(own.quick_ping(), None);
        assert_eq!(Registry::from_commands([&A]).unwrap().quick_ping(), None);
    }

    #[test]
    fn duplicate_names_are_an_error() {
        let registry = Registry::from_commands([&A, &B]).unwrap();
        assert_eq!(registry.get("b").unwrap().name, "b");
        assert!(registry.get("c").is_none());
        assert_eq!(registry.find("b").map(|(index, _)| index), Some(1));
        let err = Registry::from_commands([&A, &B, &A_AGAIN]).unwrap_err();
        assert_eq!(err, DuplicateCommand("a"));
        assert!(err.to_string().contains("`a`"));
    }

    #[test]
    fn the_built_in_commands_are_registered() {
        let registry = Registry::global().unwrap();
        let names: Vec<_> = registry.commands().map(|c| c.name).collect();
        for name in [
            "authenticate",
            "help",
            "list",
            "logout",
            "ping",
            "register",
            "update",
        ] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
    }
}
