//! Done-when 5, last part: no reply and no log line holds a password, even
//! when the password is sent where it does not belong. This file owns its
//! test binary's global log subscriber, at the most verbose level.

use serde_json::json;
use vmm_tests::TestServer;

const SECRET: &str = "Tr0ub4dor&3-unique-marker";

#[tokio::test]
async fn no_reply_or_log_line_contains_a_password() {
    let logs = vmm_tests::CapturedLog::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(move || writer.clone())
        .init();

    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    let long = format!("{SECRET}{}", "x".repeat(120));
    let requests = [
        json!({"command": "register", "data": {"vm_id": "s1", "ram": 512, "cpu": 1, "password": SECRET, "disks": [{"disk_size": 1}]}}),
        json!({"command": "register", "data": {"vm_id": "s1", "ram": 512, "cpu": 1, "password": SECRET}}),
        json!({"command": "register", "data": {"vm_id": "s2", "ram": SECRET, "cpu": 1, "password": SECRET}}),
        json!({"command": "register", "data": {"vm_id": "s2", "ram": 1, "cpu": 1, "password": long}}),
        json!({"command": "register", "data": {"vm_id": "s2", "ram": 1, "cpu": 1, "password": SECRET, "note": SECRET}}),
        json!({"command": "register", "data": {"vm_id": SECRET, "ram": 1, "cpu": 1, "password": SECRET}}),
        json!({"command": "authenticate", "data": {"vm_id": "s1", "password": format!("{SECRET}-wrong")}}),
        json!({"command": "authenticate", "data": {"vm_id": "nobody", "password": SECRET}}),
        json!({"command": "authenticate", "data": {"vm_id": "s1", "password": [SECRET]}}),
        json!({"command": "authenticate", "data": {"vm_id": "s1", "password": SECRET}}),
        json!({"command": "update", "data": {"ram": SECRET}}),
        json!({"command": "update", "data": {"disks": [{"disk_size": SECRET}]}}),
        json!({"command": "list", "data": {"list_type": SECRET}}),
        json!({"command": SECRET, "data": {}}),
        json!({"command": "ping", "data": {"password": SECRET}}),
        json!({"data": {"password": SECRET}}),
    ];
    let mut replies = String::new();
    for request in requests {
        replies.push_str(&conn.call(request).await.to_string());
    }
    conn.send(format!(
        "{{\"command\": \"register\", \"password\": \"{SECRET}\" oops}}\n"
    ))
    .await;
    replies.push_str(&conn.reply().await.to_string());
    conn.send(format!(
        "{{\"command\": \"x\", \"data\": {{\"password\": \"{SECRET}{}\"}}}}\n",
        "y".repeat(70_000)
    ))
    .await;
    replies.push_str(&conn.reply().await.to_string());
    // Tokens: issued, used, resumed, revoked; never logged. (`conn` was
    // closed by the oversized request.)
    let mut conn = server.raw().await;
    let login = conn
        .call(json!({"command": "authenticate", "data": {"vm_id": "s1", "password": SECRET}}))
        .await;
    let token = login["data"]["token"].as_str().expect("a token").to_owned();
    let mut other = server.raw().await;
    for request in [
        json!({"command": "authenticate", "data": {"vm_id": "s1", "token": token}}),
        json!({"command": "list", "data": {"list_type": "all_vms", "token": token}}),
        json!({"command": "list", "data": {"list_type": "all_vms", "token": format!("{token}x")}}),
        json!({"command": "logout", "data": {"token": token}}),
        json!({"command": "authenticate", "data": {"vm_id": "s1", "token": token}}),
    ] {
        let reply = other.call(request).await;
        assert!(
            !reply.to_string().contains(&token),
            "a reply echoes the token: {reply}"
        );
    }
    drop(other);
    drop(conn);
    server.shutdown().await;

    assert!(replies.contains("invalid_credentials") && replies.contains("request_too_large"));
    assert!(
        !replies.contains(SECRET),
        "a reply holds the password: {replies}"
    );
    let logs = logs.text();
    assert!(logs.contains("authenticated"), "the log was captured");
    let leaks: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(SECRET) || l.contains(&token))
        .collect();
    assert!(leaks.is_empty(), "log lines hold the password: {leaks:#?}");
}
