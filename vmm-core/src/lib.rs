//! vmm-core: the vmm server as a library.
//!
//! Virtual machines connect over TCP and speak a JSON command protocol: they
//! register with their RAM, CPUs and disks, authenticate with a password,
//! update their resources and log out; operators list who is connected,
//! authenticated or ever registered, and every disk. State lives in
//! PostgreSQL.
//!
//! A map of the crate:
//!
//! - [`protocol`]: every type on the wire (requests, replies, error codes,
//!   the views that lists return) and the protocol's limits.
//! - [`connection`]: framing. Splits the byte stream into JSON values and
//!   writes reply lines.
//! - [`registry`]: the command registry. Commands are submitted with
//!   `inventory::submit!` (re-exported as [`inventory`]) and found by name.
//! - `commands`: the built-in commands, one module each, registering
//!   themselves. Their doc comments show their wire format.
//! - [`params`]: strict decoding and validation of a command's `data`.
//! - [`session`]: the live sessions of every instance, and the calling
//!   connection's own: who it is (nobody, a VM by its token family, or an
//!   operator), and the revocations that end it.
//! - [`events`]: change events from every instance, for `watch`: events,
//!   topics, and the fan-out to this instance's watchers.
//! - [`listener`]: the connection that LISTENs for every instance's NOTIFY:
//!   change events, and token revocations that end sessions here; after a
//!   reconnection it catches up from the event log.
//! - `retention`: the event log's upkeep, deleting events older than
//!   `--event-retention`.
//! - [`listing`]: list replies streamed from PostgreSQL in bounded memory,
//!   and the bound on lists running at once.
//! - [`presence`]: this instance's lease in the shared database, which is
//!   how instances see each other's sessions and notice each other's death.
//! - [`store`]: the only module that talks to PostgreSQL, and the migrations.
//! - [`password`]: argon2id hashing off the async threads, bounded.
//! - [`audit`]: the audit trail, with repeated failures and refusals
//!   coalesced so that its growth follows distinct events, not requests.
//! - [`secrets`]: constant-time comparison and digests of secrets.
//! - [`context`]: what handlers share: [`Config`], store, sessions, hasher.
//! - [`server`]: [`serve`], the accept loop with its connection limit and
//!   graceful shutdown.
//! - [`shutdown`]: the stop signal every connection waits on, without a
//!   lock shared by all of them.
//! - [`descriptors`]: the open-file limit: raising it, fitting the
//!   connection limit under it, and refusing clients when it is reached.
//! - [`metrics`]: this instance's Prometheus metrics, in a registry of its
//!   own.
//! - [`stats`]: this instance's figures for the `stats` command (rates and
//!   latencies over the last 10 s and minute), written with each lease
//!   renewal so that one query answers for the fleet.
//! - [`health`]: the HTTP listener for `/metrics`, `/healthz` and
//!   `/readyz` (`--metrics-listen`).
//! - [`client`]: a small async [`Client`] with a typed method per command.
//! - [`tls`]: rustls server and client configurations from PEM files.
//! - [`proxy_protocol`]: the PROXY protocol header a balancer sends with
//!   the client's address, and which balancers are trusted to send it.
//!
//! Running a server inside your own program:
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = vmm_core::Config {
//!     database_url: "postgres://vmm:vmm@127.0.0.1:5432/vmm".into(),
//!     ..Default::default()
//! };
//! let context = vmm_core::Context::connect(config).await?; // waits for the database, migrates
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8888").await?;
//! vmm_core::serve(listener, context, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! Adding a command from your own crate (see `examples/host.rs`):
//!
//! ```
//! use vmm_core::{Command, Context, Data, HandlerFuture, Session, Success};
//!
//! fn whoami<'a>(_: &'a Context, session: &'a mut Session, _: Data) -> HandlerFuture<'a> {
//!     Box::pin(async move { Success::new("you").with("session_id", session.id()) })
//! }
//!
//! vmm_core::inventory::submit! {
//!     Command { name: "whoami", summary: "show this connection's session", handler: whoami }
//! }
//! ```

pub mod audit;
pub mod client;
mod commands;
pub mod connection;
pub mod context;
pub mod descriptors;
pub mod error;
pub mod events;
pub mod health;
pub mod listener;
pub mod listing;
pub mod metrics;
pub mod params;
pub mod password;
pub mod presence;
pub mod protocol;
pub mod proxy_protocol;
pub mod registry;
mod retention;
pub mod secrets;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod stats;
pub mod store;
mod task;
pub mod tls;

pub use client::Client;
pub use context::{Config, Context};
pub use error::Error;
pub use inventory;
pub use protocol::{Data, ErrorCode, Reply, Request};
pub use registry::{Command, HandlerFuture, Registry, Success};
pub use server::serve;
pub use session::Session;
pub use store::SetupError;
