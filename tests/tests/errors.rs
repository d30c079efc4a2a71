//! Done-when 3: every error code but `internal` is produced, and the
//! connection keeps working after each (but `request_too_large` and
//! `server_busy`, which close it by design).

use serde_json::{Value, json};
use vmm_core::{Config, Context};
use vmm_tests::{RawConn, TestServer, err, ok, password_for};

async fn still_serving(conn: &mut RawConn) {
    let reply = conn.call(json!({"command": "ping", "data": {}})).await;
    assert_eq!(reply["message"], "PONG", "the connection survives: {reply}");
}

async fn expect(conn: &mut RawConn, request: Value, code: &str) {
    let reply = conn.call(request.clone()).await;
    err(&reply, code);
    still_serving(conn).await;
}

fn register(vm_id: &str, disks: &[u32]) -> Value {
    let disks: Vec<Value> = disks.iter().map(|s| json!({"disk_size": s})).collect();
    json!({"command": "register", "data": {
        "vm_id": vm_id, "ram": 512, "cpu": 2, "password": password_for(vm_id), "disks": disks}})
}

fn authenticate(vm_id: &str) -> Value {
    json!({"command": "authenticate", "data": {"vm_id": vm_id, "password": password_for(vm_id)}})
}

#[tokio::test]
async fn request_level_errors() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;

    conn.send("{\"command\": ping}\n").await;
    err(&conn.reply().await, "invalid_json");
    still_serving(&mut conn).await;

    for bad in [
        json!([1, 2]),
        json!("ping"),
        json!(42),
        json!({"data": {}}),
        json!({"command": 1}),
        json!({"command": "ping", "data": "x"}),
        json!({"command": "ping", "id": [1]}),
    ] {
        expect(&mut conn, bad, "invalid_request").await;
    }
    let reply = conn.call(json!({"data": {}, "id": "keep"})).await;
    err(&reply, "invalid_request");
    assert_eq!(
        reply["id"], "keep",
        "the id is echoed when it could be read"
    );

    expect(
        &mut conn,
        json!({"command": "reboot", "data": {}}),
        "unknown_command",
    )
    .await;
    expect(&mut conn, json!({"command": "PING"}), "unknown_command").await;
}

#[tokio::test]
async fn invalid_params_name_the_field() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    let cases = [
        (json!({"command": "ping", "data": {"x": 1}}), "x"),
        (
            json!({"command": "register", "data": {"vm_id": "a", "ram": "512", "cpu": 1, "password": "password1"}}),
            "ram",
        ),
        (
            json!({"command": "register", "data": {"vm_id": "a", "ram": 512.5, "cpu": 1, "password": "password1"}}),
            "ram",
        ),
        (
            json!({"command": "register", "data": {"vm_id": "a", "ram": 0, "cpu": 1, "password": "password1"}}),
            "ram",
        ),
        (
            json!({"command": "register", "data": {"vm_id": "a", "ram": 4194305, "cpu": 1, "password": "password1"}}),
            "ram",
        ),
        (
            json!({"command": "register", "data": {"vm_id": "a", "ram": 1, "cpu": 1025, "password": "password1"}}),
            "cpu",
        ),
        (
            json!({"command": "register", "data": {"vm_id": "a", "ram": 1, "cpu": -1, "password": "password1"}}),
            "cpu",
        ),
        (
            json!({"command": "register", "data": {"vm_id": "bad id", "ram": 1, "cpu": 1, "password": "password1"}}),
            "vm_id",
        ),
        (
            json!({"command": "register", "data": {"vm_id": "x".repeat(65), "ram": 1, "cpu": 1, "password": "password1"}}),
            "vm_id",
        ),
        (
            json!({"command": "register", "data": {"vm_id": "a", "ram": 1, "cpu": 1, "password": "short"}}),
            "password",
        ),
        (
            json!({"command": "register", "data": {"vm_id": "a", "ram": 1, "cpu": 1}}),
            "password",
        ),
        (
            json!({"command": "register", "data": {"vm_id": "a", "ram": 1, "cpu": 1, "password": "password1", "colour": "red"}}),
            "colour",
        ),
        (
            json!({"command": "register", "data": {"vm_id": "a", "ram": 1, "cpu": 1, "password": "password1", "disks": [{"disk_size": 0}]}}),
            "disks[0].disk_size",
        ),
        (
            json!({"command": "register", "data": {"vm_id": "a", "ram": 1, "cpu": 1, "password": "password1", "disks": [{"disk_size": 1048577}]}}),
            "disks[0].disk_size",
        ),
        (
            json!({"command": "register", "data": {"vm_id": "a", "ram": 1, "cpu": 1, "password": "password1", "disks": [{"size": 1}]}}),
            "disks[0].size",
        ),
        (
            json!({"command": "register", "data": {"vm_id": "a", "ram": 1, "cpu": 1, "password": "password1",
                "disks": vec![json!({"disk_size": 1}); 65]}}),
            "disks",
        ),
        (
            json!({"command": "authenticate", "data": {"vm_id": "a"}}),
            "password",
        ),
    ];
    for (request, field) in cases {
        let reply = conn.call(request.clone()).await;
        err(&reply, "invalid_params");
        let message = reply["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("`{field}")),
            "{request} -> {message}"
        );
        still_serving(&mut conn).await;
    }
}

#[tokio::test]
async fn state_errors() {
    let server = TestServer::start().await;
    let mut a = server.raw().await;
    let mut b = server.raw().await;

    ok(&a.call(register("alpha", &[10])).await);
    expect(&mut a, register("alpha", &[]), "already_exists").await;

    expect(&mut a, json!({"command": "authenticate", "data": {"vm_id": "alpha", "password": "wrong-password"}}),
        "invalid_credentials").await;
    expect(&mut a, json!({"command": "authenticate", "data": {"vm_id": "ghost", "password": "wrong-password"}}),
        "invalid_credentials").await;

    expect(
        &mut a,
        json!({"command": "list", "data": {"list_type": "all_vms"}}),
        "not_authenticated",
    )
    .await;
    expect(
        &mut a,
        json!({"command": "update", "data": {"ram": 1}}),
        "not_authenticated",
    )
    .await;
    expect(
        &mut a,
        json!({"command": "logout", "data": {}}),
        "not_authenticated",
    )
    .await;

    let beta = b.call(register("beta", &[20])).await;
    let beta_disk = ok(&beta)["vm"]["disks"][0]["id"].clone();
    ok(&a.call(authenticate("alpha")).await);
    expect(
        &mut a,
        json!({"command": "update", "data": {"disks": [{"id": beta_disk, "disk_size": 30}]}}),
        "not_found",
    )
    .await;
    expect(
        &mut a,
        json!({"command": "update", "data": {"disks": [{"id": 999999, "disk_size": 30}]}}),
        "not_found",
    )
    .await;
    expect(
        &mut a,
        json!({"command": "update", "data": {}}),
        "invalid_params",
    )
    .await;
    expect(
        &mut a,
        json!({"command": "list", "data": {"list_type": "everything"}}),
        "invalid_params",
    )
    .await;
    expect(
        &mut a,
        json!({"command": "list", "data": {}}),
        "invalid_params",
    )
    .await;
}

#[tokio::test]
async fn request_too_large_closes() {
    let server = TestServer::start_with(|config| config.max_request_bytes = 100).await;
    let mut conn = server.raw().await;
    still_serving(&mut conn).await;
    conn.send(format!(
        "{{\"command\": \"ping\", \"id\": \"{}\"}}\n",
        "z".repeat(200)
    ))
    .await;
    err(&conn.reply().await, "request_too_large");
    assert!(conn.closed().await);
    // Other connections are not affected.
    still_serving(&mut server.raw().await).await;
}

#[tokio::test]
async fn server_busy_past_the_connection_limit() {
    let server = TestServer::start_with(|config| config.max_connections = 2).await;
    let mut first = server.raw().await;
    let mut second = server.raw().await;
    still_serving(&mut first).await;
    still_serving(&mut second).await;

    let mut third = server.raw().await;
    err(&third.reply().await, "server_busy");
    assert!(third.closed().await);
    // Counted before the refusal is answered.
    let metrics = &server.context.metrics;
    assert_eq!(metrics.refused_max_connections.get(), 1);
    assert_eq!(metrics.refused_per_ip.get(), 0);

    still_serving(&mut first).await;
    drop(second);
    // The freed slot is reusable once the server has noticed the close.
    let mut next = vmm_tests::eventually("a free connection slot", || async {
        let mut conn = server.raw().await;
        let reply = conn.call(json!({"command": "ping"})).await;
        (reply["status"] == "success").then_some(conn)
    })
    .await;
    still_serving(&mut next).await;
}

#[tokio::test]
async fn unavailable_while_the_database_is_unreachable() {
    vmm_tests::init_logging();
    // Nothing listens on port 1: every database call fails at once.
    let context = Context::new(Config {
        database_url: "postgres://vmm@127.0.0.1:1/vmm".into(),
        ..Config::default()
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(vmm_core::serve(listener, context, std::future::pending()));

    let mut conn = RawConn::connect(addr).await;
    still_serving(&mut conn).await;
    expect(&mut conn, register("gamma", &[]), "unavailable").await;
    expect(&mut conn, authenticate("gamma"), "unavailable").await;
}
