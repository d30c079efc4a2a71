//! Database errors are answered by cause: every error that means the
//! database is not there, or went away, is `unavailable`; `internal` is left
//! for our own bugs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use vmm_core::ErrorCode;
use vmm_core::client::Update;
use vmm_core::password::HashCost;
use vmm_tests::race::{Pair, race};
use vmm_tests::{TestDb, client_from, password_for, registration};

/// The error a statement that fails with SQLSTATE `code` becomes.
async fn answer_to(db: &tokio_postgres::Client, code: &str) -> ErrorCode {
    let sql = format!("DO $$ BEGIN RAISE EXCEPTION 'test' USING ERRCODE = '{code}'; END $$");
    let err = db.batch_execute(&sql).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some(code));
    vmm_core::Error::from(err).code
}

#[tokio::test]
async fn each_sqlstate_class_is_answered_by_its_cause() {
    vmm_tests::init_logging();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let cases = [
        // 08: connection exception
        ("08006", ErrorCode::Unavailable),
        ("08001", ErrorCode::Unavailable),
        // 53: insufficient resources (too many connections, disk full)
        ("53300", ErrorCode::Unavailable),
        ("53100", ErrorCode::Unavailable),
        // 57: operator intervention (admin shutdown, crash shutdown,
        // cannot connect now, query cancelled)
        ("57P01", ErrorCode::Unavailable),
        ("57P02", ErrorCode::Unavailable),
        ("57P03", ErrorCode::Unavailable),
        ("57014", ErrorCode::Unavailable),
        // 58: system error (I/O)
        ("58030", ErrorCode::Unavailable),
        // a read-only standby after a failover
        ("25006", ErrorCode::Unavailable),
        // what our own statements should never cause
        ("23505", ErrorCode::Internal),
        ("42P01", ErrorCode::Internal),
        ("22012", ErrorCode::Internal),
        ("40P01", ErrorCode::Internal),
        ("XX000", ErrorCode::Internal),
    ];
    for (code, expected) in cases {
        assert_eq!(answer_to(&client, code).await, expected, "SQLSTATE {code}");
    }

    // A connection the administrator terminated, as the next query sees it.
    let victim = db.connect().await;
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    client
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let gone = vmm_tests::eventually("the terminated connection to fail", || async {
        victim.simple_query("SELECT 1").await.err()
    })
    .await;
    assert_eq!(vmm_core::Error::from(gone).code, ErrorCode::Unavailable);

    // A pool that is closed, or that times out.
    let closed = deadpool_postgres::PoolError::Closed;
    assert_eq!(vmm_core::Error::from(closed).code, ErrorCode::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_the_pool_during_writes_gives_only_success_or_unavailable() {
    for round in 0..3 {
        writes_while_connections_are_terminated(round).await;
    }
}

/// 30 clients on two instances write for 2 s while every connection of the
/// servers' pools is terminated every 250 ms.
async fn writes_while_connections_are_terminated(round: usize) {
    let pair = Pair::start(|config| {
        config.hash_cost = HashCost {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        };
    })
    .await;
    let mut setup = pair.a.client().await;
    for i in 0..30 {
        setup
            .register(&registration(&format!("w-{i}"), 64, vec![1]))
            .await
            .unwrap();
    }
    let admin = pair.a.db.connect().await;
    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicU64::new(0));
    let killer = {
        let (stop, kills, name) = (
            Arc::clone(&stop),
            Arc::clone(&kills),
            pair.a.db.name.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                let row = admin
                    .query_one(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                         WHERE datname = $1 AND application_name = 'vmm' AND pid <> pg_backend_pid()",
                        &[&name],
                    )
                    .await
                    .unwrap();
                kills.fetch_add(
                    u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
                    Ordering::SeqCst,
                );
            }
        })
    };
    let outcomes = race(30, |i, gate| {
        let addr = pair.addr(i);
        async move {
            let vm_id = format!("w-{i}");
            let mut client = client_from(i, addr).await;
            gate.open().await;
            let mut outcomes = Vec::new();
            let until = Instant::now() + Duration::from_secs(2);
            let mut authenticated = false;
            while Instant::now() < until {
                let reply = if authenticated {
                    let update = Update {
                        ram: Some(100 + outcomes.len() as u32 % 1000),
                        attach: if outcomes.len() % 7 == 0 {
                            vec![1]
                        } else {
                            vec![]
                        },
                        ..Update::default()
                    };
                    client.call("update", update.to_data()).await
                } else {
                    client
                        .call(
                            "authenticate",
                            json!({"vm_id": vm_id, "password": password_for(&vm_id)}),
                        )
                        .await
                };
                let reply = reply.expect("a reply");
                authenticated |= reply.is_success();
                outcomes.push(reply.code);
            }
            outcomes
        }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    killer.await.unwrap();
    assert!(
        kills.load(Ordering::SeqCst) > 0,
        "connections were terminated"
    );
    let outcomes: Vec<Option<ErrorCode>> = outcomes.into_iter().flatten().collect();
    let unavailable = outcomes
        .iter()
        .filter(|c| **c == Some(ErrorCode::Unavailable))
        .count();
    for outcome in &outcomes {
        assert!(
            matches!(outcome, None | Some(ErrorCode::Unavailable)),
            "only success or unavailable, got {outcome:?}"
        );
    }
    assert!(
        outcomes.iter().any(Option::is_none),
        "some writes succeeded"
    );
    eprintln!(
        "round {round}: {} replies, {unavailable} unavailable, {} connections terminated",
        outcomes.len(),
        kills.load(Ordering::SeqCst)
    );
    // And the service comes back.
    let mut after = pair.b.client().await;
    let deadline = vmm_tests::Deadline::new("writes to succeed again");
    while after
        .authenticate("w-0", &password_for("w-0"))
        .await
        .is_err()
    {
        deadline.tick().await;
    }
}
