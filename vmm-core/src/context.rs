//! What every handler shares: configuration, the store, the live sessions and
//! the password hasher.

use std::sync::Arc;
use std::time::Duration;

use crate::password::Passwords;
use crate::session::Sessions;
use crate::store::{SetupError, Store};

/// Server settings. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub db_pool_size: usize,
    /// Open connections beyond this are answered `server_busy` and closed.
    pub max_connections: usize,
    /// A request longer than this is answered `request_too_large` and the
    /// connection is closed.
    pub max_request_bytes: usize,
    /// How long a shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
    /// When set, `register` must carry it as `registration_secret`.
    pub registration_secret: Option<String>,
    /// argon2id cost of new password hashes; a login with a hash of other
    /// costs re-hashes the password.
    pub hash_cost: crate::password::HashCost,
    /// The operator token: `authenticate {"admin_token"}` with it opens an
    /// operator session (lists, watch and audit; not a VM).
    pub admin_token: Option<String>,
    /// How long a session token from `authenticate` stays valid.
    pub token_ttl: Duration,
    /// Failed-login throttling, per VM and per client address.
    pub throttle: crate::store::Throttle,
    /// How many password hashes may run at once.
    pub hash_concurrency: usize,
    /// How long start-up waits for the database.
    pub database_wait: Duration,
    /// A request that has started arriving must be complete within this, or
    /// the connection is closed (`None`: no limit).
    pub request_timeout: Option<Duration>,
    /// How long a write to a client may stay blocked (it does not read its
    /// replies or events) before the client is disconnected.
    pub write_timeout: Duration,
    /// Open connections allowed from one client address; one more is
    /// answered `server_busy` and closed.
    pub max_connections_per_ip: usize,
    /// A connection that sends nothing for this long is closed (`None`, the
    /// default: never, as the original server did; a VM's agent may sit
    /// idle for hours, and TCP keepalive drops peers that vanished).
    pub idle_timeout: Option<Duration>,
    /// This instance's name in the shared `instances` table: unique per
    /// deployment slot and stable across restarts (vmm-server uses
    /// `hostname:port`), so that a restart removes its earlier life's rows.
    /// Empty: no such clean-up (the old rows expire with their lease).
    pub instance_name: String,
    /// How long this instance counts as alive after its last renewal.
    pub instance_lease: Duration,
    /// How often the lease is renewed.
    pub presence_interval: Duration,
    /// How long change events stay in the event log, for watchers that
    /// resume (`watch` with `since`) and instances that lost their
    /// listening connection.
    pub event_retention: Duration,
    /// TCP keepalive probes on accepted sockets start after this much silence,
    /// so that peers that vanished without a FIN are noticed (`None`: off).
    pub tcp_keepalive: Option<Duration>,
    /// When set, every connection must speak TLS with this configuration
    /// (see [`crate::tls::server_config`]); plaintext ones are closed.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// When set, every connection must start with a PROXY protocol header
    /// from a trusted balancer, and the client address in it is the
    /// connection's peer (see [`crate::proxy_protocol`]); anything else is
    /// closed without a reply. Read before TLS, within the request timeout
    /// (10 s without one).
    pub proxy_protocol: Option<crate::proxy_protocol::ProxyProtocol>,
}

pub const DEFAULT_DATABASE_URL: &str = "postgres://vmm:vmm@127.0.0.1:5432/vmm";

impl Default for Config {
    fn default() -> Config {
        Config {
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            db_pool_size: 16,
            max_connections: 10_000,
            max_request_bytes: 65_536,
            registration_secret: None,
            hash_cost: crate::password::HashCost::default(),
            throttle: crate::store::Throttle::default(),
            token_ttl: Duration::from_secs(24 * 60 * 60),
            admin_token: None,
            shutdown_grace: Duration::from_secs(5),
            hash_concurrency: std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1),
            database_wait: Duration::from_secs(30),
            idle_timeout: None,
            request_timeout: Some(Duration::from_secs(10)),
            max_connections_per_ip: 256,
            write_timeout: Duration::from_secs(10),
            instance_name: String::new(),
            instance_lease: Duration::from_secs(10),
            presence_interval: Duration::from_secs(2),
            event_retention: Duration::from_secs(24 * 60 * 60),
            tcp_keepalive: Some(Duration::from_secs(30)),
            tls: None,
            proxy_protocol: None,
        }
    }
}

#[derive(Debug)]
pub struct Context {
    pub config: Config,
    pub store: Store,
    pub sessions: Arc<Sessions>,
    pub passwords: Passwords,
    /// Change events from every instance, for this instance's watchers.
    pub events: crate::events::Events,
    /// The audit trail, repeats coalesced.
    pub audit_log: crate::audit::AuditLog,
    /// Lists running at once, bounded.
    pub lists: crate::listing::Lists,
    /// This instance's metrics, served by [`crate::health::serve`].
    pub metrics: crate::metrics::Metrics,
}

impl Context {
    /// Builds a context without touching the database.
    pub fn new(config: Config) -> Result<Arc<Context>, SetupError> {
        let store = Store::new(&config.database_url, config.db_pool_size)?;
        let commands =
            crate::registry::Registry::global().map_err(|err| SetupError(err.to_string()))?;
        Ok(Arc::new(Context {
            metrics: crate::metrics::Metrics::new(commands),
            passwords: Passwords::new(config.hash_concurrency, config.hash_cost)
                .map_err(SetupError)?,
            events: crate::events::Events::default(),
            sessions: Arc::new(Sessions::new(store.clone())),
            audit_log: crate::audit::AuditLog::new(store.clone()),
            lists: crate::listing::Lists::for_pool(config.db_pool_size),
            store,
            config,
        }))
    }

    /// The figures that are read from the parts that keep them (sessions,
    /// hasher, pool) rather than counted: for `/metrics` and `stats`.
    pub fn figures(&self) -> crate::metrics::Scrape {
        let sessions = self.sessions.counts();
        let pool = self.store.pool_status();
        crate::metrics::Scrape {
            hashes_run: self.passwords.hashes_run(),
            sessions: sessions.sessions,
            vm_sessions: sessions.vms,
            operator_sessions: sessions.operators,
            watchers: sessions.watchers,
            password_queue: self.passwords.queued(),
            pool_size: pool.size,
            pool_available: pool.available,
            pool_waiting: pool.waiting,
        }
    }

    /// Appends to the audit trail, as done by `session`'s client. Best
    /// effort; repeated failures and refusals coalesce (see [`crate::audit`]).
    pub async fn audit(
        &self,
        session: &crate::session::Session,
        vm_id: Option<&str>,
        action: &str,
        outcome: &str,
        detail: &str,
    ) {
        self.audit_peer(session.peer(), vm_id, action, outcome, detail)
            .await;
    }

    /// Appends to the audit trail for a client that has no session (yet).
    pub async fn audit_peer(
        &self,
        peer: &str,
        vm_id: Option<&str>,
        action: &str,
        outcome: &str,
        detail: &str,
    ) {
        let entry = crate::audit::Entry {
            peer,
            vm_id,
            action,
            outcome,
            detail,
        };
        self.audit_log
            .record(self.sessions.instance_id(), entry)
            .await;
    }

    /// Builds a context, waits for the database (up to `config.database_wait`),
    /// applies the migrations and joins the instances sharing the database:
    /// what a server does before it listens.
    pub async fn connect(config: Config) -> Result<Arc<Context>, SetupError> {
        let context = Context::new(config)?;
        context
            .store
            .wait_until_ready(context.config.database_wait)
            .await?;
        context.store.migrate().await?;
        context
            .sessions
            .join(&context.config.instance_name, context.config.instance_lease)
            .await
            .map_err(|err| SetupError(format!("cannot register this instance: {err}")))?;
        context.metrics.lease_renewed(true);
        Ok(context)
    }
}
