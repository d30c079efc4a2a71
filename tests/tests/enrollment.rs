//! The enrollment secret: without it, nobody who can reach the port can
//! register a VM.

use serde_json::{Value, json};
use vmm_tests::{TestServer, err, ok, password_for};

fn register(vm_id: &str, secret: Option<&str>) -> Value {
    let mut data = json!({"vm_id": vm_id, "ram": 64, "cpu": 1, "password": password_for(vm_id),
                          "disks": [{"disk_size": 5}]});
    if let Some(secret) = secret {
        data["registration_secret"] = json!(secret);
    }
    json!({"command": "register", "data": data})
}

#[tokio::test]
async fn register_needs_the_enrollment_secret() {
    let server =
        TestServer::start_with(|config| config.registration_secret = Some("let-me-in-42".into()))
            .await;
    let mut conn = server.raw().await;
    for (vm, secret) in [
        ("none", None),
        ("wrong", Some("let-me-in-43")),
        ("empty", Some("")),
        ("prefix", Some("let-me-in")),
    ] {
        let reply = conn.call(register(vm, secret)).await;
        err(&reply, "forbidden");
        assert!(
            !reply.to_string().contains("let-me-in"),
            "the secret is not echoed: {reply}"
        );
    }
    let db = server.db.connect().await;
    let stored: i64 = db
        .query_one(
            "SELECT (SELECT count(*) FROM vms) + (SELECT count(*) FROM disks)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "a refused registration stores nothing");

    ok(&conn.call(register("welcome", Some("let-me-in-42"))).await);
    // The connection keeps working after `forbidden`.
    assert_eq!(
        conn.call(json!({"command": "ping"})).await["message"],
        "PONG"
    );
}

#[tokio::test]
async fn without_a_secret_configured_anyone_may_register() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    ok(&conn.call(register("open", None)).await);
    // A client configured with a secret still works against such a server.
    ok(&conn.call(register("open-2", Some("whatever"))).await);
}
