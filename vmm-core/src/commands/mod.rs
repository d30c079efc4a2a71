//! The built-in commands, one module each. Every module submits its own
//! [`Command`](crate::registry::Command) to the registry; nothing here lists
//! them, and dispatch finds them by name.

mod audit;
mod authenticate;
mod help;
mod list;
mod logout;
mod ping;
mod register;
mod update;
mod watch;
