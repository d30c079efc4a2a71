//! Figures for the promises that must hold under races, at sizes the tests
//! do not use: a guess storm from one address, a flood from a blocked
//! address and what it costs the audit trail, how long a revocation takes to
//! end a thousand sessions on two instances, and sessions of one VM racing
//! for its disks.
//!
//! ```text
//! VMM_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --release -p vmm-tests --example races -- [SESSIONS]
//! ```
//!
//! Both instances run in this process, on a fresh database.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmm_core::client::Update;
use vmm_tests::race::{Pair, race};
use vmm_tests::{RawConn, client_from, registration};

const ADMIN: &str = "bench-operator";

fn login(vm_id: &str, password: &str) -> Value {
    json!({"command": "authenticate", "data": {"vm_id": vm_id, "password": password}})
}

async fn scalar(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.expect("query").get(0)
}

/// Like `TestServer::owner`, from a machine of its own: 127.0.0.1 is
/// blocked by the flood above.
async fn owner_elsewhere(pair: &Pair, vm_id: &str) -> (vmm_core::Client, String) {
    let mut client = client_from(60_000, pair.a.addr).await;
    client
        .register(&registration(vm_id, 64, vec![]))
        .await
        .expect("register");
    let (_, token) = client
        .login(vm_id, &vmm_tests::password_for(vm_id))
        .await
        .expect("login");
    (client, token)
}

#[tokio::main]
async fn main() {
    let sessions: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let pair = Pair::start(|config| {
        config.admin_token = Some(ADMIN.into());
        config.max_connections_per_ip = 100_000;
    })
    .await;
    let db = pair.a.db.connect().await;
    println!(
        "vmm races: two instances, {} CPUs",
        std::thread::available_parallelism().map_or(1, usize::from)
    );

    // 1. A guess storm: 250 connections from one address, one wrong
    // password each, at once, half on each instance.
    pair.a
        .client()
        .await
        .register(&registration("target", 64, vec![]))
        .await
        .expect("register");
    let hashes = pair.hashes_run();
    let started = Instant::now();
    let replies = race(250, |i, gate| {
        let addr = pair.addr(i);
        async move {
            let mut conn = RawConn::connect(addr).await;
            gate.open().await;
            conn.call(login("target", "not-the-password")).await
        }
    })
    .await;
    let checked = replies
        .iter()
        .filter(|r| r["code"] == "invalid_credentials")
        .count();
    println!(
        "{:<46} {checked} passwords checked, {} refused, {} hashes, all answered in {:.1?}",
        "250 wrong passwords at once, one address",
        replies.len() - checked,
        pair.hashes_run() - hashes,
        started.elapsed()
    );

    // 2. The blocked address floods for 5 s on 30 connections.
    let rows_before = scalar(&db, "SELECT count(*) FROM audit").await;
    let started = Instant::now();
    let sent: i64 = race(30, |i, gate| {
        let addr = pair.addr(i);
        async move {
            let mut conn = RawConn::connect(addr).await;
            gate.open().await;
            let until = Instant::now() + Duration::from_secs(5);
            let mut sent = 0;
            while Instant::now() < until {
                conn.call(login("target", "not-the-password")).await;
                sent += 1;
            }
            sent
        }
    })
    .await
    .into_iter()
    .sum();
    let elapsed = started.elapsed();
    let rows = scalar(&db, "SELECT count(*) FROM audit").await - rows_before;
    println!(
        "{:<46} {sent} refused ({:.0}/s), {rows} audit rows added",
        "flood from a blocked address, 30 conns, 5 s",
        sent as f64 / elapsed.as_secs_f64()
    );

    // 3. One token, `sessions` sessions on two instances; how long until a
    // logout, then an operator's revoke, ends them all.
    for how in ["logout", "revoke"] {
        let vm_id = format!("shared-{how}");
        let (mut owner, token) = owner_elsewhere(&pair, &vm_id).await;
        let holders = race(sessions, |i, gate| {
            let (addr, token, vm_id) = (pair.addr(i), token.clone(), vm_id.clone());
            async move {
                let mut client = client_from(i, addr).await;
                client.resume(&vm_id, &token).await.expect("resume");
                gate.open().await;
                client
            }
        })
        .await;
        // From a machine of its own: 127.0.0.1 is blocked by the flood.
        let mut operator = RawConn::connect_from(60_001, pair.b.addr).await;
        let reply = operator
            .call(json!({"command": "authenticate", "data": {"admin_token": ADMIN}}))
            .await;
        assert_eq!(reply["status"], "success", "{reply}");
        let started = Instant::now();
        match how {
            "logout" => owner.logout().await.expect("logout"),
            _ => {
                let reply = operator
                    .call(json!({"command": "revoke", "data": {"vm_id": vm_id}}))
                    .await;
                assert_eq!(reply["status"], "success", "{reply}");
            }
        }
        let revoked = started.elapsed();
        let sql = format!(
            "SELECT count(*) FROM sessions WHERE vm_id = '{vm_id}' AND authenticated_at IS NOT NULL"
        );
        while scalar(&db, &sql).await > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        println!(
            "{:<46} reply {revoked:.1?}, every session ended (in the sessions table) after {:.1?}",
            format!("{how}: {sessions} sessions of one token"),
            started.elapsed()
        );
        drop(holders);
    }

    // 4. Sessions of one VM racing to attach disks.
    let (_owner, token) = owner_elsewhere(&pair, "crowded").await;
    let started = Instant::now();
    let results = race(100, |i, gate| {
        let (addr, token) = (pair.addr(i), token.clone());
        async move {
            let mut client = client_from(i, addr).await;
            client.resume("crowded", &token).await.expect("resume");
            gate.open().await;
            let t = Instant::now();
            let result = client
                .update(&Update {
                    attach: vec![1; 20],
                    ..Update::default()
                })
                .await;
            (result.is_ok(), t.elapsed())
        }
    })
    .await;
    let successes = results.iter().filter(|(ok, _)| *ok).count();
    let slowest = results.iter().map(|(_, t)| *t).max().unwrap_or_default();
    let disks = scalar(&db, "SELECT count(*) FROM disks WHERE vm_id = 'crowded'").await;
    println!(
        "{:<46} {successes} succeeded, {disks} disks, slowest reply {slowest:.1?} (all in {:.1?})",
        "100 sessions of one VM attach 20 disks each",
        started.elapsed()
    );
}
