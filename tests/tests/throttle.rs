//! Login throttling, per VM and per client address, across instances.

use serde_json::{Value, json};
use vmm_tests::{RawConn, TestServer, err, ok, password_for, registration};

fn login(vm_id: &str, password: &str) -> Value {
    json!({"command": "authenticate", "data": {"vm_id": vm_id, "password": password}})
}

#[track_caller]
fn throttled(reply: &Value) -> i64 {
    assert_eq!(reply["status"], "error", "{reply}");
    assert_eq!(reply["code"], "too_many_attempts", "{reply}");
    let retry = reply["data"]["retry_after_ms"]
        .as_i64()
        .expect("retry_after_ms");
    assert!(retry > 0 && retry <= 30_000, "{reply}");
    retry
}

async fn wrong(conn: &mut RawConn, vm_id: &str) {
    err(
        &conn.call(login(vm_id, "not-the-password")).await,
        "invalid_credentials",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sixth_wrong_password_is_refused_on_another_instance_without_hashing() {
    let a = TestServer::start().await;
    let b = a.start_beside(|_| {}).await;
    a.client()
        .await
        .register(&registration("target", 64, vec![]))
        .await
        .unwrap();

    let mut on_a = a.raw().await;
    for _ in 0..5 {
        wrong(&mut on_a, "target").await;
    }
    let mut on_b = b.raw().await;
    let hashes_before = b.context.passwords.hashes_run();
    throttled(&on_b.call(login("target", "not-the-password")).await);
    // Even the right password waits: the key is blocked.
    throttled(&on_b.call(login("target", &password_for("target"))).await);
    assert_eq!(
        b.context.passwords.hashes_run(),
        hashes_before,
        "no hash is spent while blocked"
    );
    assert_eq!(
        on_b.call(json!({"command": "ping"})).await["message"],
        "PONG"
    );
}

/// Failures spread over many addresses block the VM, and only the VM: the
/// reply says so in its message and in `data.scope`.
#[tokio::test]
async fn a_blocked_vm_is_named_as_the_scope() {
    let server = TestServer::start().await;
    server
        .client()
        .await
        .register(&registration("guessed", 64, vec![]))
        .await
        .unwrap();
    for n in 1..=5 {
        let mut conn = RawConn::connect_from(n, server.addr).await;
        wrong(&mut conn, "guessed").await;
    }
    let mut conn = RawConn::connect_from(6, server.addr).await;
    let reply = conn.call(login("guessed", &password_for("guessed"))).await;
    throttled(&reply);
    assert_eq!(reply["data"]["scope"], "vm", "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("this VM"),
        "{reply}"
    );
}

#[tokio::test]
async fn failures_from_one_address_block_it_for_every_vm() {
    let server = TestServer::start().await;
    server
        .client()
        .await
        .register(&registration("real", 64, vec![]))
        .await
        .unwrap();
    let mut conn = server.raw().await;
    for i in 0..5 {
        wrong(&mut conn, &format!("guess-{i}")).await;
    }
    let reply = conn.call(login("real", &password_for("real"))).await;
    throttled(&reply);
    // The right password of a VM nobody guessed at: the block is the
    // address's, and the reply says so.
    assert_eq!(reply["data"]["scope"], "address", "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("your address"),
        "{reply}"
    );
}

#[tokio::test]
async fn a_success_clears_the_vms_count_but_not_the_addresss() {
    let server = TestServer::start().await;
    server
        .client()
        .await
        .register(&registration("v", 64, vec![]))
        .await
        .unwrap();
    let mut conn = server.raw().await;
    for _ in 0..4 {
        wrong(&mut conn, "v").await;
    }
    ok(&conn.call(login("v", &password_for("v"))).await);
    let db = server.db.connect().await;
    let rows = db
        .query(
            "SELECT key, attempts, blocked_until IS NOT NULL FROM login_attempts ORDER BY key",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(String, i32, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(rows, [("ip:127.0.0.1".to_owned(), 4, false)]);
}
