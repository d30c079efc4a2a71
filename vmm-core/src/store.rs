//! The one place that talks to PostgreSQL.
//!
//! Every method costs a constant number of statements, whatever the number of
//! VMs, disks or sessions involved: lists fetch all they need with `ANY($1)`
//! and aggregates, updates apply many disks at once with `unnest`. Statements
//! are prepared once per pooled connection (`prepare_cached`), and anything
//! that writes more than one row runs in one transaction.

use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::types::{Json, ToSql};
use tokio_postgres::{NoTls, Row};

use crate::error::{Error, Result};
use crate::protocol::{DiskView, ErrorCode, InstanceStats, StatsSnapshot, Timestamp, VmView};

mod lists;

pub use lists::{DiskPage, DiskRows, Page, SessionPage, SessionRows, VmEntry, VmPage, VmRows};

mod embedded {
    refinery::embed_migrations!("../migrations");
}

/// An arbitrary key for `pg_advisory_lock`, so that instances starting at the
/// same time apply migrations one after another.
const MIGRATION_LOCK: i64 = 0x0076_6d6d_5f6d_6967;

/// Columns of a [`VmView`] plus `last_seen_at`, disks aggregated per VM.
macro_rules! vm_select {
    ($($tail:literal)*) => {
        concat!(
            "SELECT v.vm_id, v.ram, v.cpu, v.created_at, v.updated_at, v.last_seen_at, \
               COALESCE(array_agg(d.id ORDER BY d.id) FILTER (WHERE d.id IS NOT NULL), '{}') AS disk_ids, \
               COALESCE(array_agg(d.disk_size ORDER BY d.id) FILTER (WHERE d.id IS NOT NULL), '{}') AS disk_sizes \
             FROM vms v LEFT JOIN disks d ON d.vm_id = v.vm_id ",
            $($tail),*
        )
    };
}

const VMS_BY_ID: &str = vm_select!("WHERE v.vm_id = ANY($1) GROUP BY v.vm_id ORDER BY v.vm_id");
const VM_FOR_LOGIN: &str = concat!(
    "WITH seen AS ( \
         UPDATE vms SET last_seen_at = now() WHERE vm_id = $1 AND ($2::bigint IS NULL OR EXISTS ( \
             SELECT 1 FROM tokens t WHERE t.family = $2 AND t.vm_id = $1 AND t.expires_at > now())) \
         RETURNING vm_id \
     ) ",
    vm_select!("WHERE v.vm_id IN (SELECT vm_id FROM seen) GROUP BY v.vm_id")
);

/// A VM as stored, with what only `all_vms` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    pub view: VmView,
    pub last_seen_at: Option<Timestamp>,
}

/// A snapshot of one session, as the lists show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Unique across instances: the instance id in the high 32 bits.
    pub id: u64,
    pub instance_id: i64,
    pub peer: String,
    pub connected_at: Timestamp,
    /// The VM this connection registered or last authenticated as.
    pub vm_id: Option<String>,
    /// When the session authenticated, while it is authenticated (as `vm_id`).
    pub authenticated_at: Option<Timestamp>,
    /// Bumped by every change, so that a late write never undoes a newer one.
    pub version: i64,
}

impl SessionInfo {
    pub fn is_authenticated(&self) -> bool {
        self.authenticated_at.is_some()
    }

    pub(crate) fn db_id(&self) -> i64 {
        i64::try_from(self.id).unwrap_or(i64::MAX)
    }
}

/// One entry of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditEvent {
    pub id: i64,
    pub at: Timestamp,
    pub instance_id: Option<i64>,
    pub peer: Option<String>,
    pub vm_id: Option<String>,
    pub action: String,
    pub outcome: String,
    pub detail: String,
    /// How many times this happened: repeats of one outcome from one
    /// address within a minute share a row.
    #[serde(default = "one")]
    pub count: i64,
    /// When the last repeat happened (`null` when there was none).
    #[serde(default)]
    pub last_at: Option<Timestamp>,
}

fn one() -> i64 {
    1
}

/// See [`Store::reserve_login`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The VM's password hash, when a VM was named and exists.
    pub password_hash: Option<String>,
    /// `Some` when the attempt may not run. Nothing was reserved then.
    pub refused: Option<Refused>,
}

/// Why a throttling key refused an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub key: String,
    pub retry_after_ms: i64,
    /// Blocked after failures; otherwise only full of attempts that are
    /// still running (try again in a moment).
    pub blocked: bool,
}

/// A live session token, as a login by token finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenGrant {
    /// The session family the token names.
    pub family: i64,
    pub expires_at: SystemTime,
}

/// What a VM session's authority is checked against: its token family and,
/// when the request carries a `token`, that token's digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authority<'a> {
    pub family: i64,
    pub token: Option<&'a [u8; 32]>,
}

/// How a check of a session's token came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenCheck {
    Valid,
    /// The family is live but the `token` given is not its token.
    WrongToken,
    /// The family's token is revoked or expired: the session is over.
    Revoked,
}

impl TokenCheck {
    fn of(live: bool, matches: bool) -> TokenCheck {
        match (live, matches) {
            (false, _) => TokenCheck::Revoked,
            (true, false) => TokenCheck::WrongToken,
            (true, true) => TokenCheck::Valid,
        }
    }
}

/// The outcome of [`Store::update`] that is not an error of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Updated {
    Done(VmView),
    Refused(TokenCheck),
}

/// Login throttling: a key may have `limit` attempts running or failed with
/// no quiet `window` between them; once `limit` have failed it is blocked
/// for `base`, and after each further failure (one attempt at a time is let
/// through once a block has passed) for twice as long as the last, at most
/// `cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    pub limit: u32,
    pub window: Duration,
    pub base: Duration,
    pub cap: Duration,
}

impl Throttle {
    fn limit_sql(&self) -> i32 {
        i32::try_from(self.limit).unwrap_or(i32::MAX)
    }
}

impl Default for Throttle {
    fn default() -> Throttle {
        Throttle {
            limit: 5,
            window: Duration::from_secs(5 * 60),
            base: Duration::from_secs(30),
            cap: Duration::from_secs(15 * 60),
        }
    }
}

/// A change to one VM, already validated against the protocol's limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmUpdate {
    pub ram: Option<u32>,
    pub cpu: Option<u32>,
    /// `(disk id, new size)`: resized in place.
    pub resize: Vec<(i64, u32)>,
    /// Sizes of disks to attach.
    pub attach: Vec<u32>,
}

/// Why the store could not be set up.
#[derive(Debug)]
pub struct SetupError(pub String);

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SetupError {}

/// See [`Store::pool_status`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStatus {
    pub size: usize,
    pub available: usize,
    pub waiting: usize,
}

#[derive(Clone, Debug)]
pub struct Store {
    pub(crate) pool: Pool,
}

fn int(value: u32) -> i32 {
    // Every value is validated against limits far below i32::MAX.
    i32::try_from(value).unwrap_or(i32::MAX)
}

fn uint(value: i32) -> u32 {
    // The CHECK constraints keep every stored value positive.
    u32::try_from(value).unwrap_or_default()
}

fn record(row: &Row) -> VmRecord {
    let ids: Vec<i64> = row.get("disk_ids");
    let sizes: Vec<i32> = row.get("disk_sizes");
    let disks = ids
        .into_iter()
        .zip(sizes)
        .map(|(id, size)| DiskView {
            id,
            disk_size: uint(size),
        })
        .collect();
    VmRecord {
        view: VmView {
            vm_id: row.get("vm_id"),
            ram: uint(row.get("ram")),
            cpu: uint(row.get("cpu")),
            disks,
            created_at: Timestamp(row.get("created_at")),
            updated_at: Timestamp(row.get("updated_at")),
        },
        last_seen_at: row
            .get::<_, Option<SystemTime>>("last_seen_at")
            .map(Timestamp),
    }
}

/// An error with its chain of causes ("error connecting to server: Connection
/// refused"), which is what an operator needs to fix it.
fn causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Why the database could not be used at start-up.
#[derive(Debug)]
struct Unready {
    /// Without the pool's boilerplate ("Error occurred while creating a new
    /// object"): the cause an operator can act on.
    reason: String,
    /// Whether waiting can fix it.
    transient: bool,
}

impl Unready {
    fn of_pool(err: &deadpool_postgres::PoolError) -> Unready {
        use deadpool_postgres::PoolError;
        match err {
            PoolError::Backend(err) => Unready::of_postgres(err),
            PoolError::Timeout(_) => Unready {
                reason: "connecting timed out".into(),
                transient: true,
            },
            other => Unready {
                reason: causes(other),
                transient: false,
            },
        }
    }

    fn of_postgres(err: &tokio_postgres::Error) -> Unready {
        use std::io::ErrorKind;
        use tokio_postgres::error::SqlState;
        if let Some(db) = err.as_db_error() {
            return Unready {
                reason: db.message().to_owned(),
                transient: *db.code() == SqlState::CANNOT_CONNECT_NOW,
            };
        }
        let io = std::iter::successors(std::error::Error::source(err), |cause| cause.source())
            .find_map(|cause| cause.downcast_ref::<std::io::Error>());
        let transient = io.is_some_and(|io| {
            matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::TimedOut
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
            )
        }) || err.to_string().contains("timeout");
        Unready {
            reason: causes(err),
            transient,
        }
    }
}

impl Store {
    /// One statement on a pooled connection, prepared once per connection.
    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.execute(&statement, params).await?)
    }

    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.query(&statement, params).await?)
    }

    async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.query_one(&statement, params).await?)
    }

    async fn query_opt(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.query_opt(&statement, params).await?)
    }

    /// The pool's figures for the metrics: connections open, of which
    /// idle, and requests waiting for one.
    pub fn pool_status(&self) -> PoolStatus {
        let status = self.pool.status();
        PoolStatus {
            size: status.size,
            available: status.available,
            waiting: status.waiting,
        }
    }

    /// Builds the pool. No connection is made until one is needed.
    pub fn new(database_url: &str, pool_size: usize) -> Result<Store, SetupError> {
        let mut config = tokio_postgres::Config::from_str(database_url)
            .map_err(|err| SetupError(format!("invalid database URL: {err}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(2));
        }
        // A database that vanishes from the network without closing the
        // connection (a partition, a dead host) must not make a query hang:
        // unacknowledged data fails the connection after this long, so the
        // command answers `unavailable` instead.
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(Duration::from_millis(1500));
        }
        if config.get_application_name().is_none() {
            config.application_name("vmm");
        }
        // Every query here is short and planned once per connection; JIT
        // compiling one costs more than it saves (a third of a second on a
        // list of 100,000 VMs).
        if config.get_options().is_none() {
            config.options("-c jit=off");
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(2)))
            .recycle_timeout(Some(Duration::from_secs(2)))
            .build()
            .map_err(|err| SetupError(format!("cannot build the database pool: {err}")))?;
        Ok(Store { pool })
    }

    /// Whether the database answers a trivial query, for the readiness
    /// check; PostgreSQL's or the pool's words when it does not.
    pub async fn ping(&self) -> Result<(), String> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|err| Unready::of_pool(&err).reason)?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|err| Unready::of_postgres(&err).reason)?;
        Ok(())
    }

    /// Waits until the database answers, logging each failed attempt. Only
    /// what waiting can fix is retried: PostgreSQL not listening yet, not
    /// answering in time, or still starting up. Anything else (no such
    /// database or user, a wrong password) fails at once, with
    /// PostgreSQL's own words, which name the database or the user.
    pub async fn wait_until_ready(&self, timeout: Duration) -> Result<(), SetupError> {
        let deadline = Instant::now() + timeout;
        let mut attempt = 1u32;
        loop {
            let failure = match self.pool.get().await {
                Ok(client) => match client.simple_query("SELECT 1").await {
                    Ok(_) => return Ok(()),
                    Err(err) => Unready::of_postgres(&err),
                },
                Err(err) => Unready::of_pool(&err),
            };
            if !failure.transient {
                return Err(SetupError(format!(
                    "cannot use the database: {}; check --database-url / DATABASE_URL",
                    failure.reason
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SetupError(format!(
                    "the database did not answer within {}s ({}); \
                     check that PostgreSQL is running and that --database-url / DATABASE_URL \
                     points at it",
                    timeout.as_secs(),
                    failure.reason
                )));
            }
            tracing::warn!(attempt, error = %failure.reason, "database not ready, retrying");
            tokio::time::sleep(Duration::from_secs(1).min(left)).await;
            attempt += 1;
        }
    }

    /// Applies the embedded migrations that the database lacks.
    pub async fn migrate(&self) -> Result<(), SetupError> {
        let failed =
            |err: &dyn std::error::Error| SetupError(format!("migration failed: {}", causes(err)));
        let mut client = self.pool.get().await.map_err(|e| failed(&e))?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(|e| failed(&e))?;
        let report = embedded::migrations::runner()
            .run_async(&mut **client)
            .await
            .map_err(|e| failed(&e));
        let unlocked = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await;
        let report = report?;
        unlocked.map_err(|e| failed(&e))?;
        for migration in report.applied_migrations() {
            tracing::info!(migration = %migration, "applied migration");
        }
        Ok(())
    }

    /// Creates a VM and its disks. `Ok(None)` when the id is taken, which also
    /// holds when another registration of the same id commits first.
    pub async fn register(
        &self,
        vm_id: &str,
        ram: u32,
        cpu: u32,
        password_hash: &str,
        disks: &[u32],
    ) -> Result<Option<VmView>> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO vms (vm_id, ram, cpu, password_hash, last_seen_at) \
                 VALUES ($1, $2, $3, $4, now()) ON CONFLICT (vm_id) DO NOTHING",
            )
            .await?;
        let inserted = tx
            .execute(&insert, &[&vm_id, &int(ram), &int(cpu), &password_hash])
            .await?;
        if inserted == 0 {
            return Ok(None);
        }
        if !disks.is_empty() {
            let attach = tx
                .prepare_cached("INSERT INTO disks (vm_id, disk_size) SELECT $1, unnest($2::int[])")
                .await?;
            let sizes: Vec<i32> = disks.iter().copied().map(int).collect();
            tx.execute(&attach, &[&vm_id, &sizes]).await?;
        }
        let view = Self::fetch_one(&tx, vm_id).await?;
        tx.commit().await?;
        Ok(Some(view))
    }

    pub async fn exists(&self, vm_id: &str) -> Result<bool> {
        Ok(self
            .query_opt("SELECT 1 FROM vms WHERE vm_id = $1", &[&vm_id])
            .await?
            .is_some())
    }

    pub async fn password_hash(&self, vm_id: &str) -> Result<Option<String>> {
        let row = self
            .query_opt("SELECT password_hash FROM vms WHERE vm_id = $1", &[&vm_id])
            .await?;
        Ok(row.map(|row| row.get(0)))
    }

    /// Reserves a login attempt under every key at once, in one statement,
    /// before any password is checked, and fetches `vm_id`'s password hash
    /// with it. See `vmm_login_reserve` (migration V7): an attempt counts as
    /// soon as it starts, so attempts racing on many connections and
    /// instances cannot outnumber the limit.
    pub async fn reserve_login(
        &self,
        vm_id: Option<&str>,
        keys: &[String],
        throttle: &Throttle,
    ) -> Result<Reservation> {
        let row = self
            .query_one(
                "SELECT r.retry_after_ms, r.refused_key, r.blocked, \
                        (SELECT password_hash FROM vms WHERE vm_id = $1) \
                 FROM vmm_login_reserve($2, $3, $4) AS r",
                &[
                    &vm_id,
                    &keys,
                    &throttle.limit_sql(),
                    &throttle.window.as_secs_f64(),
                ],
            )
            .await?;
        let refused = match (
            row.get::<_, Option<i64>>(0),
            row.get::<_, Option<String>>(1),
            row.get::<_, Option<bool>>(2),
        ) {
            (Some(retry_after_ms), Some(key), blocked) => Some(Refused {
                key,
                retry_after_ms,
                blocked: blocked.unwrap_or(false),
            }),
            _ => None,
        };
        Ok(Reservation {
            password_hash: row.get(3),
            refused,
        })
    }

    /// A reserved attempt failed: it stays counted, and blocks its keys once
    /// they have failed the limit's number of times.
    pub async fn login_failed(&self, keys: &[String], throttle: &Throttle) -> Result<()> {
        self.execute(
            "SELECT vmm_login_failed($1, $2, $3, $4)",
            &[
                &keys,
                &throttle.limit_sql(),
                &throttle.base.as_secs_f64(),
                &throttle.cap.as_secs_f64(),
            ],
        )
        .await?;
        Ok(())
    }

    /// Gives back the reservation of an attempt that succeeded (or never
    /// got to check anything), in one statement; `forget` (the VM's key
    /// after a successful login) is cleared altogether.
    pub async fn release_login(&self, keys: &[String], forget: Option<&str>) -> Result<()> {
        self.execute("SELECT vmm_login_release($1, $2)", &[&keys, &forget])
            .await?;
        Ok(())
    }

    /// Stores a new session token's digest under its family; returns when
    /// it expires. Expired tokens go at the same time.
    pub async fn issue_token(
        &self,
        vm_id: &str,
        digest: &[u8; 32],
        family: i64,
        ttl: Duration,
    ) -> Result<SystemTime> {
        let row = self
            .query_one(
                "WITH expired AS (DELETE FROM tokens WHERE expires_at < now())                  INSERT INTO tokens (token_hash, vm_id, family, expires_at)                  VALUES ($1, $2, $3, now() + $4::float8 * interval '1 second') RETURNING expires_at",
                &[&digest.as_slice(), &vm_id, &family, &ttl.as_secs_f64()],
            )
            .await?;
        Ok(row.get(0))
    }

    /// The live token of `vm_id` with this digest, if there is one.
    pub async fn find_token(&self, vm_id: &str, digest: &[u8; 32]) -> Result<Option<TokenGrant>> {
        let row = self
            .query_opt(
                "SELECT family, expires_at FROM tokens                  WHERE token_hash = $1 AND vm_id = $2 AND expires_at > now()",
                &[&digest.as_slice(), &vm_id],
            )
            .await?;
        Ok(row.map(|row| TokenGrant {
            family: row.get(0),
            expires_at: row.get(1),
        }))
    }

    /// Checks a session's token family, and the token the request carries,
    /// against the live token store.
    pub async fn check_token(&self, authority: Authority<'_>) -> Result<TokenCheck> {
        let row = self
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM tokens WHERE family = $1 AND expires_at > now()),                         EXISTS (SELECT 1 FROM tokens WHERE family = $1 AND expires_at > now()                                 AND ($2::bytea IS NULL OR token_hash = $2))",
                &[&authority.family, &authority.token.map(<[u8; 32]>::as_slice)],
            )
            .await?;
        Ok(TokenCheck::of(row.get(0), row.get(1)))
    }

    /// Revokes a session family's token (a logout), telling every instance.
    /// With a `token`, only if it is the family's: `Revoked` when the family
    /// was already gone.
    pub async fn revoke_family(&self, authority: Authority<'_>) -> Result<TokenCheck> {
        let row = self
            .query_one(
                "WITH gone AS (                      DELETE FROM tokens WHERE family = $1                      AND ($2::bytea IS NULL OR token_hash = $2) RETURNING 1                  )                  SELECT EXISTS (SELECT 1 FROM gone)                         OR EXISTS (SELECT 1 FROM tokens WHERE family = $1 AND expires_at > now()),                         EXISTS (SELECT 1 FROM gone)",
                &[&authority.family, &authority.token.map(<[u8; 32]>::as_slice)],
            )
            .await?;
        Ok(TokenCheck::of(row.get(0), row.get(1)))
    }

    /// Revokes every token of a VM, telling every instance: each of its
    /// sessions ends. `None` when there is no such VM.
    pub async fn revoke_vm(&self, vm_id: &str) -> Result<Option<u64>> {
        let row = self
            .query_one(
                "WITH gone AS (DELETE FROM tokens WHERE vm_id = $1 RETURNING 1)                  SELECT EXISTS (SELECT 1 FROM vms WHERE vm_id = $1), (SELECT count(*) FROM gone)",
                &[&vm_id],
            )
            .await?;
        let exists: bool = row.get(0);
        let revoked: i64 = row.get(1);
        Ok(exists.then(|| u64::try_from(revoked).unwrap_or_default()))
    }

    /// Which of these session families still have a live token.
    pub async fn live_families(&self, families: &[i64]) -> Result<Vec<i64>> {
        if families.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .query(
                "SELECT family FROM tokens WHERE family = ANY($1) AND expires_at > now()",
                &[&families],
            )
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Appends to the audit trail.
    pub async fn audit(
        &self,
        instance_id: i64,
        peer: &str,
        vm_id: Option<&str>,
        action: &str,
        outcome: &str,
        detail: &str,
    ) -> Result<i64> {
        let row = self
            .query_one(
                "INSERT INTO audit (instance_id, peer, vm_id, action, outcome, detail) \
                 VALUES (NULLIF($1::bigint, 0), $2, $3, $4, $5, $6) RETURNING id",
                &[&instance_id, &peer, &vm_id, &action, &outcome, &detail],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Adds repeats to audit rows, in one statement: `(id, repeats, last
    /// repeat, whether the repeats named other VMs than the row)`.
    pub async fn add_repeats(&self, repeats: &[(i64, i64, SystemTime, bool)]) -> Result<()> {
        if repeats.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = repeats.iter().map(|r| r.0).collect();
        let counts: Vec<i64> = repeats.iter().map(|r| r.1).collect();
        let lasts: Vec<SystemTime> = repeats.iter().map(|r| r.2).collect();
        let mixed: Vec<bool> = repeats.iter().map(|r| r.3).collect();
        self.execute(
            "UPDATE audit a SET count = a.count + r.n, \
                 last_at = GREATEST(a.last_at, r.last), \
                 vm_id = CASE WHEN r.mixed THEN NULL ELSE a.vm_id END \
             FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::bool[]) \
                 AS r(id, n, last, mixed) \
             WHERE a.id = r.id",
            &[&ids, &counts, &lasts, &mixed],
        )
        .await?;
        Ok(())
    }

    /// The newest audit events, optionally of one VM.
    pub async fn audit_trail(&self, vm_id: Option<&str>, limit: i64) -> Result<Vec<AuditEvent>> {
        let rows = self
            .query(
                "SELECT id, at, instance_id, peer, vm_id, action, outcome, detail, count, last_at \
                 FROM audit \
                 WHERE $1::text IS NULL OR vm_id = $1 ORDER BY id DESC LIMIT $2",
                &[&vm_id, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| AuditEvent {
                id: row.get(0),
                at: Timestamp(row.get(1)),
                instance_id: row.get(2),
                peer: row.get(3),
                vm_id: row.get(4),
                action: row.get(5),
                outcome: row.get(6),
                detail: row.get(7),
                count: row.get(8),
                last_at: row.get::<_, Option<SystemTime>>(9).map(Timestamp),
            })
            .collect())
    }

    pub async fn set_password_hash(&self, vm_id: &str, hash: &str) -> Result<()> {
        self.execute(
            "UPDATE vms SET password_hash = $2 WHERE vm_id = $1",
            &[&vm_id, &hash],
        )
        .await?;
        Ok(())
    }

    /// Records that a connection of this VM is or was open just now. One
    /// row per statement: a statement that updates several rows locks them
    /// in the order its scan meets them, which can deadlock with another.
    pub async fn touch(&self, vm_id: &str) -> Result<()> {
        self.execute(
            "UPDATE vms SET last_seen_at = now() WHERE vm_id = $1",
            &[&vm_id],
        )
        .await?;
        Ok(())
    }

    /// The VMs with these ids that exist, ordered by id.
    pub async fn vms(&self, vm_ids: &[&str]) -> Result<Vec<VmRecord>> {
        if vm_ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self.query(VMS_BY_ID, &[&vm_ids]).await?;
        Ok(rows.iter().map(record).collect())
    }

    pub async fn vm(&self, vm_id: &str) -> Result<Option<VmView>> {
        Ok(self.vms(&[vm_id]).await?.pop().map(|record| record.view))
    }

    /// The VM a session is entering, if it exists and, when the session
    /// comes with a token family, that family's token is still live; it is
    /// recorded as seen now.
    pub async fn vm_for_login(&self, vm_id: &str, family: Option<i64>) -> Result<Option<VmView>> {
        let row = self.query_opt(VM_FOR_LOGIN, &[&vm_id, &family]).await?;
        Ok(row.map(|row| record(&row).view))
    }

    /// Applies an update to one VM, all or nothing, if the session's token
    /// is still live (checked in the same statement that locks the VM, so
    /// a revoked session cannot write after its revocation committed).
    /// Named disks must belong to the VM and may only grow.
    ///
    /// The VM row is locked first, and its disks counted after the lock, so
    /// that concurrent updates of one VM cannot together exceed the disk
    /// limit; the `disks_per_vm` trigger (migration V7) holds the limit for
    /// every other writer too.
    ///
    /// The change, with old and new values, goes to the audit trail in the
    /// same transaction, as `(instance_id, peer)`.
    pub async fn update(
        &self,
        vm_id: &str,
        authority: Authority<'_>,
        update: &VmUpdate,
        by: (i64, &str),
    ) -> Result<Updated> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;

        let lock = tx
            .prepare_cached(
                "SELECT ram, cpu, \
                   EXISTS (SELECT 1 FROM tokens WHERE family = $2 AND vm_id = $1 \
                           AND expires_at > now()), \
                   EXISTS (SELECT 1 FROM tokens WHERE family = $2 AND vm_id = $1 \
                           AND expires_at > now() AND ($3::bytea IS NULL OR token_hash = $3)) \
                 FROM vms WHERE vm_id = $1 FOR NO KEY UPDATE",
            )
            .await?;
        let token = authority.token.map(<[u8; 32]>::as_slice);
        let Some(row) = tx
            .query_opt(&lock, &[&vm_id, &authority.family, &token])
            .await?
        else {
            return Err(Error::new(ErrorCode::NotFound, "this VM no longer exists"));
        };
        let check = TokenCheck::of(row.get(2), row.get(3));
        if check != TokenCheck::Valid {
            return Ok(Updated::Refused(check));
        }
        let mut changes = Vec::new();
        if let Some(ram) = update.ram {
            changes.push(format!("ram {}→{ram} MiB", uint(row.get(0))));
        }
        if let Some(cpu) = update.cpu {
            changes.push(format!("cpu {}→{cpu}", uint(row.get(1))));
        }

        if !update.resize.is_empty() {
            let ids: Vec<i64> = update.resize.iter().map(|(id, _)| *id).collect();
            let current = tx
                .prepare_cached(
                    "SELECT id, disk_size FROM disks WHERE id = ANY($1) AND vm_id = $2 FOR UPDATE",
                )
                .await?;
            let rows = tx.query(&current, &[&ids, &vm_id]).await?;
            for (id, size) in &update.resize {
                let Some(row) = rows.iter().find(|row| row.get::<_, i64>(0) == *id) else {
                    return Err(Error::new(
                        ErrorCode::NotFound,
                        format!("disk {id} is not attached to this VM"),
                    ));
                };
                let old = uint(row.get(1));
                if *size < old {
                    return Err(Error::invalid_params(format!(
                        "disks: disk {id} cannot shrink from {old} to {size} GiB"
                    )));
                }
                changes.push(format!("disk {id} {old}→{size} GiB"));
            }
            let resize = tx
                .prepare_cached(
                    "UPDATE disks d SET disk_size = u.size \
                     FROM unnest($1::bigint[], $2::int[]) AS u(id, size) \
                     WHERE d.id = u.id AND d.vm_id = $3",
                )
                .await?;
            let sizes: Vec<i32> = update.resize.iter().map(|(_, size)| int(*size)).collect();
            tx.execute(&resize, &[&ids, &sizes, &vm_id]).await?;
        }

        if !update.attach.is_empty() {
            // Counted after the lock, in a statement of its own: its snapshot
            // sees the disks of every update of this VM that committed before.
            let count = tx
                .prepare_cached("SELECT count(*) FROM disks WHERE vm_id = $1")
                .await?;
            let disk_count: i64 = tx.query_one(&count, &[&vm_id]).await?.get(0);
            let total = usize::try_from(disk_count).unwrap_or(usize::MAX) + update.attach.len();
            if total > crate::protocol::limits::MAX_DISKS {
                return Err(Error::invalid_params(format!(
                    "`disks`: a VM has at most {} disks, this would make {total}",
                    crate::protocol::limits::MAX_DISKS
                )));
            }
            let attach = tx
                .prepare_cached("INSERT INTO disks (vm_id, disk_size) SELECT $1, unnest($2::int[])")
                .await?;
            let sizes: Vec<i32> = update.attach.iter().copied().map(int).collect();
            tx.execute(&attach, &[&vm_id, &sizes]).await?;
            for size in &update.attach {
                changes.push(format!("new disk {size} GiB"));
            }
        }

        let audit = tx
            .prepare_cached(
                "INSERT INTO audit (instance_id, peer, vm_id, action, outcome, detail) \
                 VALUES (NULLIF($1::bigint, 0), $2, $3, 'update', 'success', $4)",
            )
            .await?;
        tx.execute(&audit, &[&by.0, &by.1, &vm_id, &changes.join("; ")])
            .await?;

        let set = tx
            .prepare_cached(
                "UPDATE vms SET ram = COALESCE($2, ram), cpu = COALESCE($3, cpu), \
                 updated_at = clock_timestamp() WHERE vm_id = $1",
            )
            .await?;
        tx.execute(&set, &[&vm_id, &update.ram.map(int), &update.cpu.map(int)])
            .await?;

        let view = Self::fetch_one(&tx, vm_id).await?;
        tx.commit().await?;
        Ok(Updated::Done(view))
    }

    async fn fetch_one(tx: &deadpool_postgres::Transaction<'_>, vm_id: &str) -> Result<VmView> {
        let statement = tx.prepare_cached(VMS_BY_ID).await?;
        let row = tx.query_one(&statement, &[&[vm_id].as_slice()]).await?;
        Ok(record(&row).view)
    }

    // ---- presence: instances and their sessions ----

    /// Registers a new instance and returns its id. Rows that an earlier life
    /// of the same `name` left behind are removed first (their VMs' last
    /// sighting becomes that life's last renewal), so a restarted instance
    /// shows no ghosts.
    pub async fn join_instance(&self, name: &str, lease: Duration) -> Result<i64> {
        let row = self
            .query_one(
                "WITH old AS ( \
                     DELETE FROM instances WHERE name = $1 AND $1 <> '' RETURNING id, renewed_at \
                 ), seen AS ( \
                     UPDATE vms v SET last_seen_at = GREATEST(v.last_seen_at, o.renewed_at) \
                     FROM sessions s JOIN old o ON o.id = s.instance_id WHERE v.vm_id = s.vm_id \
                 ) \
                 INSERT INTO instances (name, expires_at) \
                 VALUES ($1, now() + $2::float8 * interval '1 second') RETURNING id",
                &[&name, &lease.as_secs_f64()],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Renews this instance's lease and removes instances whose lease ran out
    /// (their VMs' last sighting becomes their last renewal), in one
    /// statement whatever the number of sessions. Returns true when this
    /// instance's own row had to be re-created (it had been reaped while this
    /// instance could not reach the database): its sessions must then be
    /// written again.
    pub async fn renew_instance(
        &self,
        id: i64,
        name: &str,
        lease: Duration,
        stats: &StatsSnapshot,
    ) -> Result<bool> {
        let row = self
            .query_one(
                "WITH dead AS ( \
                     DELETE FROM instances WHERE expires_at < now() AND id <> $1 \
                     RETURNING id, renewed_at \
                 ), seen AS ( \
                     UPDATE vms v SET last_seen_at = GREATEST(v.last_seen_at, d.renewed_at) \
                     FROM sessions s JOIN dead d ON d.id = s.instance_id WHERE v.vm_id = s.vm_id \
                 ) \
                 INSERT INTO instances (id, name, expires_at, stats) OVERRIDING SYSTEM VALUE \
                 VALUES ($1, $2, now() + $3::float8 * interval '1 second', $4) \
                 ON CONFLICT (id) DO UPDATE \
                 SET renewed_at = now(), expires_at = EXCLUDED.expires_at, stats = EXCLUDED.stats \
                 RETURNING (xmax = 0) AS recreated",
                &[&id, &name, &lease.as_secs_f64(), &Json(stats)],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Every live instance with the figures it wrote at its last renewal
    /// (see [`crate::stats`]), by name. A snapshot that does not read (one
    /// from another version of vmm) shows as zeros rather than failing the
    /// reply.
    pub async fn instance_stats(&self) -> Result<Vec<InstanceStats>> {
        let rows = self
            .query(
                "SELECT id, name, started_at, \
                        (extract(epoch FROM now() - renewed_at) * 1000)::float8, stats \
                 FROM instances WHERE expires_at >= now() ORDER BY name, id",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| InstanceStats {
                id: row.get(0),
                name: row.get(1),
                started_at: Timestamp(row.get(2)),
                lease_age_ms: row.get::<_, f64>(3).max(0.0).round() as u64,
                snapshot: row
                    .get::<_, Option<Json<serde_json::Value>>>(4)
                    .and_then(|Json(value)| serde_json::from_value(value).ok())
                    .unwrap_or_default(),
            })
            .collect())
    }

    /// Removes this instance and its sessions (a graceful shutdown).
    pub async fn leave_instance(&self, id: i64) -> Result<()> {
        self.execute(
            "WITH seen AS ( \
                     UPDATE vms v SET last_seen_at = now() FROM sessions s \
                     WHERE s.instance_id = $1 AND v.vm_id = s.vm_id \
                 ) \
                 DELETE FROM instances WHERE id = $1",
            &[&id],
        )
        .await?;
        Ok(())
    }

    /// Writes one session's state, unless a newer state is already stored.
    pub async fn put_session(&self, session: &SessionInfo) -> Result<()> {
        self.execute(
            "INSERT INTO sessions \
                   (instance_id, session_id, peer, connected_at, vm_id, authenticated_at, version) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (instance_id, session_id) DO UPDATE \
                 SET vm_id = EXCLUDED.vm_id, authenticated_at = EXCLUDED.authenticated_at, \
                     version = EXCLUDED.version \
                 WHERE sessions.version < EXCLUDED.version",
            &[
                &session.instance_id,
                &session.db_id(),
                &session.peer,
                &session.connected_at.0,
                &session.vm_id,
                &session.authenticated_at.map(|t| t.0),
                &session.version,
            ],
        )
        .await?;
        Ok(())
    }

    /// Writes connections opened and closed since the last batch: one
    /// transaction of at most three statements, however many there are.
    pub async fn write_sessions(
        &self,
        instance_id: i64,
        opened: &[SessionInfo],
        closed: &[SessionInfo],
    ) -> Result<()> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        if !opened.is_empty() {
            Self::upsert_sessions(&tx, instance_id, opened).await?;
        }
        if !closed.is_empty() {
            // The VMs' rows are locked in key order first: another instance's
            // batch may close sessions of the same VMs.
            let lock = tx
                .prepare_cached(
                    "SELECT 1 FROM vms WHERE vm_id = ANY($1) ORDER BY vm_id FOR NO KEY UPDATE",
                )
                .await?;
            let vms: Vec<&str> = closed.iter().filter_map(|s| s.vm_id.as_deref()).collect();
            tx.execute(&lock, &[&vms]).await?;
            let close = tx
                .prepare_cached(
                    "WITH gone AS ( \
                         DELETE FROM sessions WHERE instance_id = $1 AND session_id = ANY($2) \
                     ) \
                     UPDATE vms SET last_seen_at = now() WHERE vm_id = ANY($3)",
                )
                .await?;
            let ids: Vec<i64> = closed.iter().map(SessionInfo::db_id).collect();
            tx.execute(&close, &[&instance_id, &ids, &vms]).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Makes the stored sessions of one instance exactly `live`, after writes
    /// were lost (the database was unreachable, or the instance was reaped).
    /// Sessions opened after `live` was taken (higher ids) are left alone.
    pub async fn reassert_sessions(&self, instance_id: i64, live: &[SessionInfo]) -> Result<()> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        Self::upsert_sessions(&tx, instance_id, live).await?;
        let prune = tx
            .prepare_cached(
                "DELETE FROM sessions WHERE instance_id = $1 \
                 AND session_id <= $3 AND NOT (session_id = ANY($2))",
            )
            .await?;
        let ids: Vec<i64> = live.iter().map(SessionInfo::db_id).collect();
        let newest = ids.iter().copied().max().unwrap_or(i64::MAX);
        tx.execute(&prune, &[&instance_id, &ids, &newest]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Writes many sessions' states, each unless a newer one is stored.
    async fn upsert_sessions(
        tx: &deadpool_postgres::Transaction<'_>,
        instance_id: i64,
        sessions: &[SessionInfo],
    ) -> Result<()> {
        let upsert = tx
            .prepare_cached(
                "INSERT INTO sessions \
                   (instance_id, session_id, peer, connected_at, vm_id, authenticated_at, version) \
                 SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::timestamptz[], \
                                          $5::text[], $6::timestamptz[], $7::bigint[]) \
                 ON CONFLICT (instance_id, session_id) DO UPDATE \
                 SET vm_id = EXCLUDED.vm_id, authenticated_at = EXCLUDED.authenticated_at, \
                     version = EXCLUDED.version \
                 WHERE sessions.version < EXCLUDED.version",
            )
            .await?;
        let ids: Vec<i64> = sessions.iter().map(SessionInfo::db_id).collect();
        let peers: Vec<&str> = sessions.iter().map(|s| s.peer.as_str()).collect();
        let connected: Vec<SystemTime> = sessions.iter().map(|s| s.connected_at.0).collect();
        let vms: Vec<Option<&str>> = sessions.iter().map(|s| s.vm_id.as_deref()).collect();
        let authenticated: Vec<Option<SystemTime>> = sessions
            .iter()
            .map(|s| s.authenticated_at.map(|t| t.0))
            .collect();
        let versions: Vec<i64> = sessions.iter().map(|s| s.version).collect();
        tx.execute(
            &upsert,
            &[
                &instance_id,
                &ids,
                &peers,
                &connected,
                &vms,
                &authenticated,
                &versions,
            ],
        )
        .await?;
        Ok(())
    }
}
