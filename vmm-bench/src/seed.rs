//! Bench VMs that exist before a workload runs: `bench-seed-<n>`, all with
//! the same password, so that the bench can authenticate as any of them.
//! Seeding is idempotent: only the missing ones are added.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::SinkExt;
use serde::Serialize;
use serde_json::json;

use crate::error::{BenchError, Result};
use crate::load::{Setup, open_all};
use crate::net::Dialer;

/// The password of every VM the bench seeds or registers. Not a secret: it
/// only ever protects bench VMs.
pub const PASSWORD: &str = "vmm-bench-password";

const PREFIX: &str = "bench-seed-";

pub fn seeded_id(n: usize) -> String {
    format!("{PREFIX}{n}")
}

/// What a seeding found and did.
#[derive(Debug, Clone, Serialize)]
pub struct Seeded {
    pub wanted: usize,
    /// Of the wanted ones, how many were there already.
    pub existing: usize,
    pub added: usize,
    pub how: &'static str,
    pub secs: f64,
}

/// The disks of a new bench VM: 10, 20, 30 ... GiB.
pub fn disk_sizes(disks: u8) -> Vec<u32> {
    (1..=u32::from(disks)).map(|i| i * 10).collect()
}

/// Seeds straight into the tables with COPY: one argon2id hash of
/// [`PASSWORD`], computed here once, for every VM.
pub async fn direct(url: &str, wanted: usize, disks: u8, timeout: Duration) -> Result<Seeded> {
    let started = Instant::now();
    let cannot = |err: tokio_postgres::Error| {
        BenchError::new(format!("cannot seed through --direct-db: {err}"))
    };
    let (mut client, connection) =
        tokio::time::timeout(timeout, tokio_postgres::connect(url, tokio_postgres::NoTls))
            .await
            .map_err(|_| BenchError::new("cannot connect to --direct-db: no answer in time"))?
            .map_err(|err| BenchError::new(format!("cannot connect to --direct-db: {err}")))?;
    let connection = tokio::spawn(connection);
    let rows = client
        .query("SELECT vm_id FROM vms WHERE vm_id LIKE 'bench-seed-%'", &[])
        .await
        .map_err(|err| {
            BenchError::new(format!(
                "cannot read the vms table through --direct-db ({err}); is it the server's \
                 database, migrated (vmm-server migrates it at start)?"
            ))
        })?;
    let present: HashSet<usize> = rows
        .iter()
        .filter_map(|row| row.get::<_, &str>(0).strip_prefix(PREFIX)?.parse().ok())
        .collect();
    let missing: Vec<usize> = (0..wanted).filter(|n| !present.contains(n)).collect();
    let mut quick_seed = false;
    if !missing.is_empty() {
        let hash = bench_hash().await?;
        let sizes = disk_sizes(disks);
        let tx = client.transaction().await.map_err(cannot)?;
        // Per-row triggers (a watch event for each VM, the foreign key and
        // disk-count checks) make up most of the cost of 100,000 rows;
        // what is written here satisfies those checks by construction.
        // Only a superuser may skip them: anyone else seeds with them.
        let quick = tx
            .batch_execute("SAVEPOINT quick; SET LOCAL session_replication_role = replica")
            .await
            .is_ok();
        if !quick {
            tx.batch_execute("ROLLBACK TO SAVEPOINT quick")
                .await
                .map_err(cannot)?;
        }
        copy(
            &tx,
            "COPY vms (vm_id, ram, cpu, password_hash) FROM STDIN",
            |out| {
                for n in &missing {
                    out.push(format!("{PREFIX}{n}\t1024\t2\t{hash}\n"));
                }
            },
        )
        .await
        .map_err(cannot)?;
        copy(&tx, "COPY disks (vm_id, disk_size) FROM STDIN", |out| {
            for n in &missing {
                for size in &sizes {
                    out.push(format!("{PREFIX}{n}\t{size}\n"));
                }
            }
        })
        .await
        .map_err(cannot)?;
        tx.commit().await.map_err(cannot)?;
        quick_seed = quick;
        // What autovacuum would do within a minute of such a load on a
        // live database: without statistics the planner takes the tables
        // for nearly empty, and a full list runs as a sequential scan and
        // a sort spilled to disk, three times slower than the index scans
        // it gets once they are analysed. Measured right after seeding
        // (or where autovacuum is off), the figures would be of that plan.
        client
            .batch_execute("ANALYZE vms, disks")
            .await
            .map_err(cannot)?;
    }
    drop(client);
    let _ = tokio::time::timeout(timeout, connection).await;
    Ok(Seeded {
        wanted,
        existing: wanted - missing.len(),
        added: missing.len(),
        how: if quick_seed {
            "COPY, triggers off"
        } else {
            "COPY"
        },
        secs: started.elapsed().as_secs_f64(),
    })
}

/// One COPY ... FROM STDIN of the text lines `fill` makes, sent in chunks
/// of about a megabyte.
async fn copy(
    tx: &tokio_postgres::Transaction<'_>,
    statement: &str,
    fill: impl FnOnce(&mut Vec<String>),
) -> Result<u64, tokio_postgres::Error> {
    let mut lines = Vec::new();
    fill(&mut lines);
    let sink = tx.copy_in::<_, Bytes>(statement).await?;
    let mut sink = std::pin::pin!(sink);
    let mut chunk = Vec::with_capacity(1 << 20);
    for line in lines {
        chunk.extend_from_slice(line.as_bytes());
        if chunk.len() >= 1 << 20 {
            sink.send(Bytes::from(std::mem::take(&mut chunk))).await?;
        }
    }
    if !chunk.is_empty() {
        sink.send(Bytes::from(chunk)).await?;
    }
    sink.as_mut().finish().await
}

/// An argon2id PHC string of [`PASSWORD`] with vmm's default cost. A
/// server with other costs verifies it all the same (and re-hashes it at
/// the first login).
pub async fn bench_hash() -> Result<String> {
    let passwords = vmm_core::password::Passwords::new(1, vmm_core::password::HashCost::default())
        .map_err(BenchError::new)?;
    passwords
        .hash(PASSWORD.to_owned())
        .await
        .map_err(|err| BenchError::new(format!("cannot hash the bench password: {err}")))
}

/// The `register` request of a bench VM.
pub fn registration(vm_id: &str, disks: u8, secret: Option<&str>) -> serde_json::Value {
    let disks: Vec<_> = disk_sizes(disks)
        .into_iter()
        .map(|size| json!({"disk_size": size}))
        .collect();
    let mut data =
        json!({"vm_id": vm_id, "ram": 1024, "cpu": 2, "password": PASSWORD, "disks": disks});
    if let Some(secret) = secret {
        data["registration_secret"] = json!(secret);
    }
    json!({"command": "register", "data": data})
}

/// Seeds through `register` on `conns` connections (one argon2 hash each
/// on the server); a VM that exists already answers `already_exists`,
/// which costs no hash.
pub async fn through_protocol(
    dialer: &Dialer,
    wanted: usize,
    conns: usize,
    disks: u8,
    secret: Option<&str>,
    timeout: Duration,
) -> Result<Seeded> {
    let started = Instant::now();
    let conns = conns.clamp(1, wanted.max(1));
    let (opened, _) = open_all(dialer, 0, conns, 16, Setup::Nothing, timeout).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for (c, mut conn) in opened.into_iter().enumerate() {
        let secret = secret.map(str::to_owned);
        tasks.spawn(async move {
            let (mut existing, mut added) = (0, 0);
            for n in (c..wanted).step_by(conns) {
                let vm_id = seeded_id(n);
                let reply = conn
                    .call(&registration(&vm_id, disks, secret.as_deref()))
                    .await?;
                match (reply["status"].as_str(), reply["code"].as_str()) {
                    (Some("success"), _) => added += 1,
                    (_, Some("already_exists")) => existing += 1,
                    (_, code) => {
                        return Err(BenchError::new(format!(
                            "cannot register {vm_id}: {}: {}",
                            code.unwrap_or("error"),
                            reply["message"].as_str().unwrap_or_default()
                        )));
                    }
                }
            }
            Ok((existing, added))
        });
    }
    let (mut existing, mut added) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        let (e, a) =
            done.map_err(|err| BenchError::new(format!("a seeding task failed: {err}")))??;
        existing += e;
        added += a;
    }
    Ok(Seeded {
        wanted,
        existing,
        added,
        how: "register",
        secs: started.elapsed().as_secs_f64(),
    })
}
