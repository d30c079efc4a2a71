//! The lists, streamed: rows come from one read-only snapshot as the
//! caller asks for them, so that a list of the whole fleet never sits in
//! memory. Each list is a count (so that the reply can say how many entries
//! follow before it sends them) and one streamed query in the same snapshot,
//! paged by key: `vm_id` for VMs, `id` for disks, `session_id` for sessions.

use std::pin::Pin;
use std::time::SystemTime;

use deadpool_postgres::Object;
use futures_util::StreamExt;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, RowStream};

use super::{Store, VmRecord, uint};
use crate::error::Result;
use crate::protocol::{DiskEntry, DiskView, Timestamp, VmView};
use crate::store::SessionInfo;

/// Every row's columns of a VM, one row per disk (or one with NULL disk
/// columns for a VM without disks), in key order; [`VmRows`] groups them.
/// `$disks` joins each VM's disks as `d`. `remote_authenticated`: NULL when
/// no other instance has a session bound to the VM, else whether one of
/// them is authenticated.
macro_rules! vm_rows {
    ($disks:literal) => {
        concat!(
            "SELECT v.vm_id, v.ram, v.cpu, v.created_at, v.updated_at, v.last_seen_at, \
                    d.id AS disk_id, d.disk_size, r.authenticated AS remote_authenticated \
             FROM (SELECT * FROM vms WHERE vm_id > $1 ORDER BY vm_id LIMIT $2) v ",
            $disks,
            " LEFT JOIN (SELECT s.vm_id, bool_or(s.authenticated_at IS NOT NULL) AS authenticated \
                         FROM sessions s JOIN instances i ON i.id = s.instance_id \
                         WHERE i.expires_at > now() AND s.instance_id <> $3 \
                           AND s.vm_id IS NOT NULL \
                         GROUP BY s.vm_id) r ON r.vm_id = v.vm_id \
             ORDER BY v.vm_id, d.id"
        )
    };
}

/// The whole list (no `limit`): disks through a merge join on
/// `disks (vm_id, id)`, which is twice as fast for the whole fleet as
/// aggregating them into arrays per VM, and twice as fast as looking up
/// each VM's disks.
const VM_ALL: &str = vm_rows!("LEFT JOIN disks d ON d.vm_id = v.vm_id");

/// A page (at most 10,000 VMs): each VM's disks looked up in
/// `disks (vm_id, id)`. Given a join, the planner reads the whole disks
/// table for every page rather than make a thousand lookups (a seq scan and
/// a hash join: 30 ms a page of 1,000 at 100,000 VMs, against 3 ms here);
/// the lateral subquery, ordered, cannot be turned into that join.
const VM_PAGE: &str = vm_rows!(
    "LEFT JOIN LATERAL (SELECT id, disk_size FROM disks \
                        WHERE disks.vm_id = v.vm_id ORDER BY id) d ON true"
);
const VM_COUNT: &str =
    "SELECT count(*) FROM (SELECT 1 FROM vms WHERE vm_id > $1 ORDER BY vm_id LIMIT $2) p";

const DISK_PAGE: &str = "SELECT id, disk_size, vm_id FROM disks WHERE id > $1 ORDER BY id LIMIT $2";
const DISK_COUNT: &str =
    "SELECT count(*) FROM (SELECT 1 FROM disks WHERE id > $1 ORDER BY id LIMIT $2) p";

/// Sessions of the other live instances, with their VM (`vm_id` NULL when
/// the VM does not exist); `$3` keeps only authenticated ones.
const SESSION_PAGE: &str = "\
    SELECT s.instance_id, s.session_id, s.peer, s.connected_at, s.vm_id, s.authenticated_at, \
           s.version, v.vm_id AS vm, v.ram, v.cpu, v.created_at, v.updated_at, v.last_seen_at, \
           ARRAY(SELECT d.id FROM disks d WHERE d.vm_id = v.vm_id ORDER BY d.id) AS disk_ids, \
           ARRAY(SELECT d.disk_size FROM disks d WHERE d.vm_id = v.vm_id ORDER BY d.id) AS disk_sizes \
    FROM sessions s JOIN instances i ON i.id = s.instance_id \
    LEFT JOIN vms v ON v.vm_id = s.vm_id \
    WHERE i.expires_at > now() AND s.instance_id <> $4 AND s.session_id > $1 \
      AND (NOT $3 OR (s.authenticated_at IS NOT NULL AND v.vm_id IS NOT NULL)) \
    ORDER BY s.session_id LIMIT $2";
const SESSION_COUNT: &str = "\
    SELECT count(*) FROM (SELECT 1 FROM sessions s JOIN instances i ON i.id = s.instance_id \
        LEFT JOIN vms v ON v.vm_id = s.vm_id \
        WHERE i.expires_at > now() AND s.instance_id <> $4 AND s.session_id > $1 \
          AND (NOT $3 OR (s.authenticated_at IS NOT NULL AND v.vm_id IS NOT NULL)) \
        ORDER BY s.session_id LIMIT $2) p";

/// One page's bounds: entries after `after`, at most `limit` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page<K> {
    pub after: K,
    pub limit: Option<u32>,
}

impl<K> Page<K> {
    /// The row limit that tells whether a further page exists: one more
    /// than the page holds.
    fn probe(&self) -> i64 {
        self.limit.map_or(i64::MAX, |limit| i64::from(limit) + 1)
    }

    /// How many entries of `available` (counted up to [`Page::probe`]) this
    /// page holds, and whether more follow.
    pub fn fit(&self, available: u64) -> (u64, bool) {
        match self.limit {
            Some(limit) if available > u64::from(limit) => (u64::from(limit), true),
            _ => (available, false),
        }
    }
}

/// Rows of one query, streamed from a read-only snapshot on a connection of
/// its own. Finishing the stream commits and gives the connection back to
/// the pool; dropping it earlier (a client that went away, an error)
/// closes that connection instead, which ends the transaction and the query
/// in PostgreSQL, so that a half-read query never goes back to the pool.
pub struct Rows {
    /// `None` once the stream has ended and committed.
    client: Option<Object>,
    rows: Pin<Box<RowStream>>,
}

impl std::fmt::Debug for Rows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rows").finish_non_exhaustive()
    }
}

impl Rows {
    pub async fn next(&mut self) -> Result<Option<Row>> {
        if self.client.is_none() {
            return Ok(None);
        }
        match self.rows.next().await {
            Some(row) => Ok(Some(row?)),
            None => {
                if let Some(client) = &self.client {
                    client.batch_execute("COMMIT").await?;
                }
                // Committed: back to the pool when dropped.
                self.client = None;
                Ok(None)
            }
        }
    }

    /// Reads the rows nobody wants, so that the connection can go back to
    /// the pool; for queries whose rows are bounded by a page.
    pub async fn finish(&mut self) -> Result<()> {
        while self.next().await?.is_some() {}
        Ok(())
    }
}

impl Drop for Rows {
    fn drop(&mut self) {
        // Still in its transaction, maybe mid-query: not pooled.
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

/// A connection inside a read-only, repeatable-read transaction: a count
/// and the rows it counted see the same data.
struct Snapshot {
    client: Option<Object>,
}

impl Snapshot {
    async fn begin(store: &Store) -> Result<Snapshot> {
        let client = store.pool.get().await?;
        let snapshot = Snapshot {
            client: Some(client),
        };
        snapshot
            .client()?
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        Ok(snapshot)
    }

    fn client(&self) -> Result<&Object> {
        // Only `rows` takes the client, and it consumes the snapshot.
        self.client.as_ref().ok_or_else(crate::Error::internal)
    }

    async fn count(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let client = self.client()?;
        let statement = client.prepare_cached(sql).await?;
        let count: i64 = client.query_one(&statement, params).await?.get(0);
        Ok(u64::try_from(count).unwrap_or_default())
    }

    async fn rows(mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Rows> {
        let client = self.client()?;
        let statement = client.prepare_cached(sql).await?;
        let rows = client
            .query_raw(&statement, params.iter().map(|p| *p as &dyn ToSql))
            .await?;
        Ok(Rows {
            client: self.client.take(),
            rows: Box::pin(rows),
        })
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        // Dropped with its transaction open (a failed count): not pooled.
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

/// A page of VMs: how many, whether more follow, and the VMs.
#[derive(Debug)]
pub struct VmPage {
    pub count: u64,
    pub more: bool,
    pub rows: VmRows,
}

/// VMs grouped from [`VM_ALL`]'s or [`VM_PAGE`]'s rows, one disk per row.
#[derive(Debug)]
pub struct VmRows {
    rows: Rows,
    /// The first row of the next VM, read while finishing the previous one.
    pending: Option<Row>,
}

/// A VM of `all_vms`, with what other instances know of its sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEntry {
    pub record: VmRecord,
    /// `None`: no session of another instance is bound to the VM; else
    /// whether one of them is authenticated.
    pub remote_authenticated: Option<bool>,
}

fn vm_head(row: &Row) -> VmEntry {
    VmEntry {
        record: VmRecord {
            view: VmView {
                vm_id: row.get("vm_id"),
                ram: uint(row.get("ram")),
                cpu: uint(row.get("cpu")),
                disks: Vec::new(),
                created_at: Timestamp(row.get("created_at")),
                updated_at: Timestamp(row.get("updated_at")),
            },
            last_seen_at: row
                .get::<_, Option<SystemTime>>("last_seen_at")
                .map(Timestamp),
        },
        remote_authenticated: row.get("remote_authenticated"),
    }
}

fn disk_of(row: &Row) -> Option<DiskView> {
    let id: Option<i64> = row.get("disk_id");
    let size: Option<i32> = row.get("disk_size");
    Some(DiskView {
        id: id?,
        disk_size: uint(size?),
    })
}

impl VmRows {
    pub async fn next(&mut self) -> Result<Option<VmEntry>> {
        let first = match self.pending.take() {
            Some(row) => row,
            None => match self.rows.next().await? {
                Some(row) => row,
                None => return Ok(None),
            },
        };
        let mut entry = vm_head(&first);
        entry.record.view.disks.extend(disk_of(&first));
        while let Some(row) = self.rows.next().await? {
            if row.get::<_, &str>("vm_id") != entry.record.view.vm_id {
                self.pending = Some(row);
                break;
            }
            entry.record.view.disks.extend(disk_of(&row));
        }
        Ok(Some(entry))
    }
}

/// A page of disks.
#[derive(Debug)]
pub struct DiskPage {
    pub count: u64,
    pub more: bool,
    pub rows: DiskRows,
}

#[derive(Debug)]
pub struct DiskRows(Rows);

impl DiskRows {
    pub async fn next(&mut self) -> Result<Option<DiskEntry>> {
        Ok(self.0.next().await?.map(|row| DiskEntry {
            id: row.get(0),
            disk_size: uint(row.get(1)),
            vm_id: row.get(2),
        }))
    }
}

/// The other instances' sessions on a page, and how many there are.
#[derive(Debug)]
pub struct SessionPage {
    /// Counted up to one more than the page's limit.
    pub available: u64,
    pub rows: SessionRows,
}

#[derive(Debug)]
pub struct SessionRows(Rows);

impl SessionRows {
    /// See [`Rows::finish`].
    pub async fn finish(&mut self) -> Result<()> {
        self.0.finish().await
    }

    /// The next session, with its VM when it is bound to one that exists.
    pub async fn next(&mut self) -> Result<Option<(SessionInfo, Option<VmView>)>> {
        let Some(row) = self.0.next().await? else {
            return Ok(None);
        };
        let session = SessionInfo {
            instance_id: row.get("instance_id"),
            id: u64::try_from(row.get::<_, i64>("session_id")).unwrap_or_default(),
            peer: row.get("peer"),
            connected_at: Timestamp(row.get("connected_at")),
            vm_id: row.get("vm_id"),
            authenticated_at: row
                .get::<_, Option<SystemTime>>("authenticated_at")
                .map(Timestamp),
            version: row.get("version"),
        };
        let vm = row.get::<_, Option<String>>("vm").map(|vm_id| {
            let ids: Vec<i64> = row.get("disk_ids");
            let sizes: Vec<i32> = row.get("disk_sizes");
            VmView {
                vm_id,
                ram: uint(row.get("ram")),
                cpu: uint(row.get("cpu")),
                disks: ids
                    .into_iter()
                    .zip(sizes)
                    .map(|(id, size)| DiskView {
                        id,
                        disk_size: uint(size),
                    })
                    .collect(),
                created_at: Timestamp(row.get("created_at")),
                updated_at: Timestamp(row.get("updated_at")),
            }
        });
        Ok(Some((session, vm)))
    }
}

impl Store {
    /// A page of every VM ever registered, in `vm_id` order, each with
    /// whether other instances (not `my_instance_id`) have sessions of it.
    pub async fn vm_page(&self, page: Page<&str>, my_instance_id: i64) -> Result<VmPage> {
        let mut snapshot = Snapshot::begin(self).await?;
        let available = snapshot
            .count(VM_COUNT, &[&page.after, &page.probe()])
            .await?;
        let (count, more) = page.fit(available);
        let limit = i64::try_from(count).unwrap_or(i64::MAX);
        let sql = if page.limit.is_some() {
            VM_PAGE
        } else {
            VM_ALL
        };
        let rows = snapshot
            .rows(sql, &[&page.after, &limit, &my_instance_id])
            .await?;
        Ok(VmPage {
            count,
            more,
            rows: VmRows {
                rows,
                pending: None,
            },
        })
    }

    /// A page of every disk, in `id` order.
    pub async fn disk_page(&self, page: Page<i64>) -> Result<DiskPage> {
        let mut snapshot = Snapshot::begin(self).await?;
        let available = snapshot
            .count(DISK_COUNT, &[&page.after, &page.probe()])
            .await?;
        let (count, more) = page.fit(available);
        let limit = i64::try_from(count).unwrap_or(i64::MAX);
        let rows = snapshot.rows(DISK_PAGE, &[&page.after, &limit]).await?;
        Ok(DiskPage {
            count,
            more,
            rows: DiskRows(rows),
        })
    }

    /// A page of the sessions of every other live instance, in
    /// `session_id` order; only authenticated ones (bound to a VM that
    /// exists) when `authenticated`.
    pub async fn remote_session_page(
        &self,
        page: Page<u64>,
        authenticated: bool,
        my_instance_id: i64,
    ) -> Result<SessionPage> {
        let after = i64::try_from(page.after).unwrap_or(i64::MAX);
        let probe = page.probe();
        let mut snapshot = Snapshot::begin(self).await?;
        let params: [&(dyn ToSql + Sync); 4] = [&after, &probe, &authenticated, &my_instance_id];
        let available = snapshot.count(SESSION_COUNT, &params).await?;
        let rows = snapshot.rows(SESSION_PAGE, &params).await?;
        Ok(SessionPage {
            available,
            rows: SessionRows(rows),
        })
    }
}
