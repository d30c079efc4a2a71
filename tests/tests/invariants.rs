//! Every promise holds when clients race: many clients on two instances of
//! one database, released at one barrier ([`vmm_tests::race`]), each race
//! repeated three times.

use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use vmm_core::ErrorCode;
use vmm_core::client::{Client, ClientError, Update};
use vmm_core::password::HashCost;
use vmm_tests::race::{Pair, race};
use vmm_tests::{Deadline, RawConn, client_from, err, ok, password_for, registration};

const ROUNDS: usize = 3;
const ADMIN: &str = "an-operator-token-for-the-races";

/// argon2 at its cheapest, for races whose subject is not hashing.
fn cheap(config: &mut vmm_core::Config) {
    config.hash_cost = HashCost {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    config.admin_token = Some(ADMIN.into());
}

fn login(vm_id: &str, password: &str) -> Value {
    json!({"command": "authenticate", "data": {"vm_id": vm_id, "password": password}})
}

fn code(result: &Result<impl Sized, ClientError>) -> Option<ErrorCode> {
    result.as_ref().err().map(|err| {
        err.code()
            .unwrap_or_else(|| panic!("not an error reply: {err}"))
    })
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

async fn operator(addr: std::net::SocketAddr) -> RawConn {
    let mut conn = RawConn::connect(addr).await;
    ok(&conn
        .call(json!({"command": "authenticate", "data": {"admin_token": ADMIN}}))
        .await);
    conn
}

// ---- 1. the disk limit ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_limit_holds_when_sessions_of_one_vm_attach_at_once() {
    for sessions in [8, 30] {
        for round in 0..ROUNDS {
            let pair = Pair::start(cheap).await;
            let (_owner, token) = pair.a.owner("crowded").await;
            let results = race(sessions, |i, gate| {
                let (addr, token) = (pair.addr(i), token.clone());
                async move {
                    let mut client = client_from(i, addr).await;
                    client.resume("crowded", &token).await.expect("resume");
                    gate.open().await;
                    let attach = Update {
                        attach: vec![1; 20],
                        ..Update::default()
                    };
                    client.update(&attach).await
                }
            })
            .await;
            let successes = results.iter().filter(|r| r.is_ok()).count();
            for failure in results.iter().filter_map(|r| r.as_ref().err()) {
                assert_eq!(failure.code(), Some(ErrorCode::InvalidParams), "{failure}");
                assert!(failure.to_string().contains("64"), "{failure}");
            }
            let db = pair.a.db.connect().await;
            let disks = count(&db, "SELECT count(*) FROM disks WHERE vm_id = 'crowded'").await;
            assert!(
                disks <= 64,
                "round {round}, {sessions} sessions: {disks} disks"
            );
            assert_eq!(
                successes as i64 * 20,
                disks,
                "round {round}, {sessions} sessions: every success wrote its 20 disks, nothing else"
            );
            assert_eq!(
                successes, 3,
                "64 disks take 3 attaches of 20, and a 4th does not fit"
            );
        }
    }
}

#[tokio::test]
async fn the_database_refuses_a_65th_disk_whoever_writes_it() {
    let server = vmm_tests::TestServer::start().await;
    server
        .client()
        .await
        .register(&registration("direct", 64, vec![1; 60]))
        .await
        .unwrap();
    let db = server.db.connect().await;
    let refused = db
        .execute(
            "INSERT INTO disks (vm_id, disk_size) SELECT 'direct', 1 FROM generate_series(1, 5)",
            &[],
        )
        .await
        .unwrap_err();
    let cause = refused.as_db_error().expect("a database error");
    assert_eq!(cause.constraint(), Some("disks_per_vm"));
    assert_eq!(
        vmm_core::Error::from(refused).code,
        ErrorCode::InvalidParams
    );
    db.execute(
        "INSERT INTO disks (vm_id, disk_size) SELECT 'direct', 1 FROM generate_series(1, 4)",
        &[],
    )
    .await
    .expect("64 disks are fine");
}

// ---- 2. throttling ----

#[track_caller]
fn tally(replies: &[Value]) -> (usize, usize) {
    let checked = replies
        .iter()
        .filter(|r| r["code"] == "invalid_credentials")
        .count();
    let refused = replies
        .iter()
        .filter(|r| r["code"] == "too_many_attempts")
        .count();
    assert_eq!(checked + refused, replies.len(), "{replies:?}");
    for reply in replies.iter().filter(|r| r["code"] == "too_many_attempts") {
        assert!(
            reply["data"]["retry_after_ms"]
                .as_i64()
                .is_some_and(|ms| ms > 0),
            "{reply}"
        );
    }
    (checked, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_guesses_at_once_for_one_vm_check_at_most_five_passwords() {
    for round in 0..ROUNDS {
        let pair = Pair::start(|_| {}).await;
        pair.a
            .client()
            .await
            .register(&registration("target", 64, vec![]))
            .await
            .unwrap();
        let hashes = pair.hashes_run();
        let replies = race(30, |i, gate| {
            let addr = pair.addr(i);
            async move {
                let mut conn = RawConn::connect(addr).await;
                gate.open().await;
                conn.call(login("target", "not-the-password")).await
            }
        })
        .await;
        let (checked, _) = tally(&replies);
        let hashed = pair.hashes_run() - hashes;
        assert!(
            (1..=5).contains(&checked) && hashed <= 5,
            "round {round}: {checked} passwords answered, {hashed} hashed"
        );
        // The VM is blocked now, even for its own password.
        let mut late = RawConn::connect(pair.b.addr).await;
        err_with_retry(&late.call(login("target", &password_for("target"))).await);
        assert!(pair.hashes_run() - hashes <= 5);
    }
}

#[track_caller]
fn err_with_retry(reply: &Value) {
    assert_eq!(reply["code"], "too_many_attempts", "{reply}");
    assert!(
        reply["data"]["retry_after_ms"]
            .as_i64()
            .is_some_and(|ms| ms > 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_guesses_at_once_from_one_address_check_at_most_five_passwords() {
    for round in 0..ROUNDS {
        let pair = Pair::start(|_| {}).await;
        let mut setup = pair.a.client().await;
        for i in 0..30 {
            setup
                .register(&registration(&format!("vm-{i}"), 64, vec![]))
                .await
                .unwrap();
        }
        let hashes = pair.hashes_run();
        let replies = race(30, |i, gate| {
            let addr = pair.addr(i);
            async move {
                let mut conn = RawConn::connect(addr).await;
                gate.open().await;
                conn.call(login(&format!("vm-{i}"), "not-the-password"))
                    .await
            }
        })
        .await;
        let (checked, _) = tally(&replies);
        let hashed = pair.hashes_run() - hashes;
        assert!(
            (1..=5).contains(&checked) && hashed <= 5,
            "round {round}: {checked} passwords answered, {hashed} hashed"
        );
        let mut late = RawConn::connect(pair.b.addr).await;
        err_with_retry(&late.call(login("vm-29", &password_for("vm-29"))).await);
        // Another machine is not blocked.
        let mut elsewhere = RawConn::connect_from(7, pair.b.addr).await;
        ok(&elsewhere.call(login("vm-29", &password_for("vm-29"))).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_wrong_enrollment_secrets_at_once_check_at_most_five() {
    for _ in 0..ROUNDS {
        let pair =
            Pair::start(|config| config.registration_secret = Some("the-secret".into())).await;
        let replies = race(30, |i, gate| {
            let addr = pair.addr(i);
            async move {
                let mut conn = RawConn::connect(addr).await;
                gate.open().await;
                conn.call(json!({"command": "register", "data": {
                    "vm_id": format!("intruder-{i}"), "ram": 64, "cpu": 1,
                    "password": password_for("intruder"), "registration_secret": format!("guess-{i}")}}))
                    .await
            }
        })
        .await;
        let forbidden = replies.iter().filter(|r| r["code"] == "forbidden").count();
        let refused = replies
            .iter()
            .filter(|r| r["code"] == "too_many_attempts")
            .count();
        assert_eq!(forbidden + refused, 30, "{replies:?}");
        assert!((1..=5).contains(&forbidden), "{forbidden} secrets compared");
        let db = pair.a.db.connect().await;
        assert_eq!(count(&db, "SELECT count(*) FROM vms").await, 0);
        // The right secret from that address waits too; from another it works.
        let right = json!({"command": "register", "data": {"vm_id": "legit", "ram": 64, "cpu": 1,
            "password": password_for("legit"), "registration_secret": "the-secret"}});
        err_with_retry(
            &RawConn::connect(pair.a.addr)
                .await
                .call(right.clone())
                .await,
        );
        ok(&RawConn::connect_from(3, pair.a.addr)
            .await
            .call(right)
            .await);
    }
}

// ---- 3. revocation ----

#[derive(Clone, Copy, Debug)]
enum Revocation {
    Logout,
    Revoke,
    Expiry,
}

/// `n` sessions of VM `shared` resumed with one token, on both instances.
async fn holders(pair: &Pair, token: &str, n: usize) -> Vec<Client> {
    race(n, |i, gate| {
        let (addr, token) = (pair.addr(i), token.to_owned());
        async move {
            let mut client = client_from(i, addr).await;
            client.resume("shared", &token).await.expect("resume");
            gate.open().await;
            client
        }
    })
    .await
}

async fn authenticated_sessions(conn: &mut RawConn, vm_id: &str) -> usize {
    let reply = conn
        .call(json!({"command": "list", "data": {"list_type": "authenticated_vms"}}))
        .await;
    ok(&reply)["authenticated_vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["vm_id"] == vm_id)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_ends_every_session_holding_it_on_both_instances() {
    for how in [Revocation::Logout, Revocation::Revoke, Revocation::Expiry] {
        for round in 0..ROUNDS {
            let ttl = match how {
                Revocation::Expiry => Duration::from_secs(3),
                _ => Duration::from_secs(3600),
            };
            let pair = Pair::start(|config| {
                cheap(config);
                config.token_ttl = ttl;
            })
            .await;
            let mut owner = pair.a.client().await;
            owner
                .register(&registration("shared", 64, vec![]))
                .await
                .unwrap();
            let reply = owner
                .call(
                    "authenticate",
                    json!({"vm_id": "shared", "password": password_for("shared")}),
                )
                .await
                .unwrap();
            let token = reply.data["token"].as_str().unwrap().to_owned();
            let expires_at: SystemTime = serde_json::from_value::<vmm_core::protocol::Timestamp>(
                reply.data["token_expires_at"].clone(),
            )
            .unwrap()
            .0;
            let mut holders = holders(&pair, &token, 30).await;
            let (mut watch_a, mut watch_b) =
                (operator(pair.a.addr).await, operator(pair.b.addr).await);
            assert_eq!(
                authenticated_sessions(&mut watch_a, "shared").await,
                31,
                "every holder and the owner"
            );

            let from = match how {
                Revocation::Logout => {
                    // A holder logs out: the owner's session ends with the others.
                    holders[7].logout().await.unwrap();
                    SystemTime::now()
                }
                Revocation::Revoke => {
                    let reply = watch_b
                        .call(json!({"command": "revoke", "data": {"vm_id": "shared"}}))
                        .await;
                    assert_eq!(ok(&reply)["tokens"], 1);
                    SystemTime::now()
                }
                Revocation::Expiry => expires_at,
            };
            let deadline = Deadline::new("every session of the token to end");
            loop {
                let left = authenticated_sessions(&mut watch_a, "shared").await
                    + authenticated_sessions(&mut watch_b, "shared").await;
                if left == 0 {
                    break;
                }
                deadline.tick().await;
            }
            let took = SystemTime::now().duration_since(from).unwrap_or_default();
            assert!(
                took < Duration::from_secs(1),
                "{how:?}, round {round}: the last session ended {took:?} after the revocation"
            );
            // Each gets `not_authenticated` on its next command.
            holders.push(owner);
            for holder in &mut holders {
                let listed = holder.list_active().await;
                assert_eq!(code(&listed), Some(ErrorCode::NotAuthenticated), "{how:?}");
                let updated = holder
                    .update(&Update {
                        ram: Some(128),
                        ..Update::default()
                    })
                    .await;
                assert_eq!(code(&updated), Some(ErrorCode::NotAuthenticated));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_a_request_is_checked_against_the_live_store() {
    for _ in 0..ROUNDS {
        let pair = Pair::start(cheap).await;
        let (_owner, token) = pair.a.owner("shared").await;
        // 30 holders on both instances: the revocation lands while each is
        // about to write with the token. None may write after it committed.
        let holders: Vec<_> = holders(&pair, &token, 30)
            .await
            .into_iter()
            .map(|client| std::sync::Mutex::new(Some(client)))
            .collect();
        let mut op = operator(pair.b.addr).await;
        ok(&op
            .call(json!({"command": "revoke", "data": {"vm_id": "shared"}}))
            .await);
        let replies = race(30, |i, gate| {
            let (holder, token) = (holders[i].lock().unwrap().take(), token.clone());
            async move {
                let mut holder = holder.expect("each client is taken once");
                gate.open().await;
                let update = holder
                    .call("update", json!({"ram": 4096, "token": token}))
                    .await
                    .unwrap();
                let list = holder
                    .call("list", json!({"list_type": "all_vms", "token": token}))
                    .await
                    .unwrap();
                (update, list)
            }
        })
        .await;
        for (update, list) in replies {
            assert_eq!(update.code, Some(ErrorCode::NotAuthenticated), "{update:?}");
            assert_eq!(list.code, Some(ErrorCode::NotAuthenticated), "{list:?}");
        }
        let db = pair.a.db.connect().await;
        assert_eq!(
            count(&db, "SELECT ram::bigint FROM vms WHERE vm_id = 'shared'").await,
            64
        );
        // A live session given someone else's (revoked) token refuses it,
        // and stays what it is.
        let mut fresh = pair.b.client().await;
        fresh
            .authenticate("shared", &password_for("shared"))
            .await
            .unwrap();
        let wrong = fresh
            .call("list", json!({"list_type": "all_vms", "token": token}))
            .await
            .unwrap();
        assert_eq!(wrong.code, Some(ErrorCode::NotAuthenticated));
        fresh.list_all().await.expect("still authenticated");
    }
}

// ---- 4. re-authentication ----

/// Client `i`'s own VM in a round of switches.
fn own(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i}")
}

async fn register_all(pair: &Pair, prefixes: &[&str], n: usize) {
    let mut setup = pair.a.client().await;
    for prefix in prefixes {
        for i in 0..n {
            setup
                .register(&registration(&own(prefix, i), 64, vec![]))
                .await
                .unwrap();
        }
    }
}

/// The VM ids of every authenticated session, seen from both instances.
async fn authenticated_everywhere(pair: &Pair) -> Vec<String> {
    let mut all = Vec::new();
    for addr in [pair.a.addr, pair.b.addr] {
        let reply = operator(addr)
            .await
            .call(json!({"command": "list", "data": {"list_type": "authenticated_vms"}}))
            .await;
        let mut here: Vec<String> = ok(&reply)["authenticated_vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["vm_id"].as_str().unwrap().to_owned())
            .collect();
        here.sort();
        all.push(here);
    }
    assert_eq!(all[0], all[1], "both instances agree");
    all.swap_remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_identity_is_a_fresh_authentication() {
    for round in 0..ROUNDS {
        let pair = Pair::start(cheap).await;
        register_all(&pair, &["x", "y"], 30).await;
        // Half start as operators, half as VM x-i; all switch to VM y-i at once.
        let switched = race(30, |i, gate| {
            let addr = pair.addr(i);
            async move {
                let mut client = client_from(i, addr).await;
                let before = if i % 2 == 0 {
                    client
                        .call("authenticate", json!({"admin_token": ADMIN}))
                        .await
                        .unwrap();
                    None
                } else {
                    Some(
                        client
                            .login(&own("x", i), &password_for(&own("x", i)))
                            .await
                            .unwrap()
                            .1,
                    )
                };
                gate.open().await;
                let (vm, token) = client
                    .login(&own("y", i), &password_for(&own("y", i)))
                    .await
                    .expect("switch");
                assert_eq!(vm.vm_id, own("y", i));
                (client, before, token)
            }
        })
        .await;
        let expected: Vec<String> = {
            let mut ids: Vec<String> = (0..30).map(|i| own("y", i)).collect();
            ids.sort();
            ids
        };
        assert_eq!(
            authenticated_everywhere(&pair).await,
            expected,
            "round {round}"
        );

        for (i, (mut client, before, token)) in switched.into_iter().enumerate() {
            // It acts as y-i only.
            let updated = client
                .update(&Update {
                    ram: Some(1000 + i as u32),
                    ..Update::default()
                })
                .await
                .expect("a VM session may update");
            assert_eq!(
                (updated.vm_id.as_str(), updated.ram),
                (own("y", i).as_str(), 1000 + i as u32)
            );
            let audit = client.call("audit", json!({})).await.unwrap();
            assert_eq!(
                audit.code,
                Some(ErrorCode::Forbidden),
                "no longer an operator"
            );
            // A failed authenticate leaves it as it was.
            let failed = client
                .call(
                    "authenticate",
                    json!({"vm_id": own("x", i), "password": "not-the-password"}),
                )
                .await
                .unwrap();
            assert!(failed.code.is_some());
            let failed = client
                .call("authenticate", json!({"admin_token": "nope"}))
                .await
                .unwrap();
            assert!(failed.code.is_some());
            client.list_active().await.expect("still y-i");
            // Logout revokes the token it was given, and only that one.
            client.logout().await.unwrap();
            let mut again = client_from(i, pair.addr(i + 1)).await;
            assert_eq!(
                code(&again.resume(&own("y", i), &token).await),
                Some(ErrorCode::NotAuthenticated)
            );
            if let Some(before) = before {
                again
                    .resume(&own("x", i), &before)
                    .await
                    .expect("the token left behind still works");
            }
        }
        let db = pair.a.db.connect().await;
        assert_eq!(
            count(
                &db,
                "SELECT count(*) FROM vms WHERE vm_id LIKE 'x-%' AND ram <> 64"
            )
            .await,
            0,
            "no update reached the VM a session left"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_becomes_an_operator_is_no_longer_the_vm() {
    for _ in 0..ROUNDS {
        let pair = Pair::start(cheap).await;
        register_all(&pair, &["v"], 30).await;
        let clients = race(30, |i, gate| {
            let addr = pair.addr(i);
            async move {
                let mut client = client_from(i, addr).await;
                client
                    .login(&own("v", i), &password_for(&own("v", i)))
                    .await
                    .unwrap();
                gate.open().await;
                let reply = client
                    .call("authenticate", json!({"admin_token": ADMIN}))
                    .await
                    .unwrap();
                assert!(reply.is_success(), "{reply:?}");
                client
            }
        })
        .await;
        assert!(authenticated_everywhere(&pair).await.is_empty());
        for mut client in clients {
            let update = client.call("update", json!({"ram": 128})).await.unwrap();
            assert_eq!(update.code, Some(ErrorCode::Forbidden));
            assert!(client.call("audit", json!({})).await.unwrap().is_success());
            let logout = client.call("logout", json!({})).await.unwrap();
            assert_eq!(logout.message, "logged out of the operator session");
            assert_eq!(
                code(&client.list_active().await),
                Some(ErrorCode::NotAuthenticated)
            );
        }
    }
}

// ---- 5. bounded audit ----

async fn audit_rows(db: &tokio_postgres::Client) -> (i64, i64) {
    let row = db
        .query_one(
            "SELECT count(*), coalesce(sum(count), 0)::bigint FROM audit",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_clients_flooding_authenticate_add_at_most_fifty_audit_rows() {
    for round in 0..ROUNDS {
        let pair = Pair::start(|_| {}).await;
        pair.a
            .client()
            .await
            .register(&registration("target", 64, vec![]))
            .await
            .unwrap();
        let mut blocker = RawConn::connect(pair.a.addr).await;
        for _ in 0..5 {
            err(
                &blocker.call(login("target", "not-the-password")).await,
                "invalid_credentials",
            );
        }
        let db = pair.a.db.connect().await;
        let (rows_before, _) = audit_rows(&db).await;
        let sent = race(30, |i, gate| {
            let addr = pair.addr(i);
            async move {
                let mut conn = RawConn::connect(addr).await;
                gate.open().await;
                let until = Instant::now() + Duration::from_secs(5);
                let mut sent = 0i64;
                while Instant::now() < until {
                    let reply = conn.call(login("target", "not-the-password")).await;
                    err_with_retry(&reply);
                    sent += 1;
                }
                sent
            }
        })
        .await
        .into_iter()
        .sum::<i64>();
        let (rows, _) = audit_rows(&db).await;
        assert!(
            rows - rows_before <= 50,
            "round {round}: {} rows for {sent} refused attempts",
            rows - rows_before
        );
        // Nothing is lost: the rows count every refusal.
        vmm_tests::eventually("the repeats to be written", || async {
            let throttled = count(
                &db,
                "SELECT coalesce(sum(count), 0)::bigint FROM audit WHERE outcome = 'throttled'",
            )
            .await;
            (throttled == sent).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_repeated_refusal_coalesces() {
    let pair = Pair::start(|config| {
        cheap(config);
        config.registration_secret = Some("the-secret".into());
    })
    .await;
    let mut vm = pair.a.client().await;
    vm.call(
        "register",
        json!({"vm_id": "noisy", "ram": 64, "cpu": 1, "password": password_for("noisy"),
               "registration_secret": "the-secret"}),
    )
    .await
    .unwrap();
    vm.authenticate("noisy", &password_for("noisy"))
        .await
        .unwrap();
    let mut op = operator(pair.b.addr).await;
    let db = pair.a.db.connect().await;
    let (rows_before, _) = audit_rows(&db).await;
    let floods: [(&str, Value); 4] = [
        ("audit", json!({})),
        ("revoke", json!({"vm_id": "noisy"})),
        (
            "authenticate",
            json!({"vm_id": "noisy", "token": "forged-token"}),
        ),
        (
            "register",
            json!({"vm_id": "x", "ram": 64, "cpu": 1, "password": password_for("x"),
                            "registration_secret": "wrong"}),
        ),
    ];
    for (command, data) in floods {
        let mut conn = if command == "audit" || command == "revoke" {
            None
        } else {
            Some(RawConn::connect_from(5, pair.b.addr).await)
        };
        for _ in 0..200 {
            let reply = match conn.as_mut() {
                Some(conn) => conn.call(json!({"command": command, "data": data})).await,
                None => {
                    let reply = vm.call(command, data.clone()).await.unwrap();
                    serde_json::to_value(reply).unwrap()
                }
            };
            assert_eq!(reply["status"], "error", "{command}: {reply}");
        }
    }
    // An operator's update is refused the same way.
    for _ in 0..200 {
        let reply = op
            .call(json!({"command": "update", "data": {"ram": 1}}))
            .await;
        err(&reply, "forbidden");
    }
    let (rows, _) = audit_rows(&db).await;
    assert!(
        rows - rows_before <= 12,
        "{} rows for 1,000 refusals",
        rows - rows_before
    );
}
