//! Done-when 8: a command registered outside vmm-core is served, and `help`
//! lists it, both in this test binary and in the example host.

use std::io::{BufRead, BufReader};
use std::process::{Command as Process, Stdio};

use serde_json::json;
use vmm_core::{Command, Context, Data, HandlerFuture, Session, Success};
use vmm_tests::{RawConn, TestDb, TestServer, err, ok};

/// `live_sessions`: how many connections the server has open.
fn live_sessions<'a>(ctx: &'a Context, _: &'a mut Session, _: Data) -> HandlerFuture<'a> {
    Box::pin(async move { Success::new("counted").with("live_sessions", ctx.sessions.len()) })
}

vmm_core::inventory::submit! {
    Command { name: "live_sessions", summary: "count open connections (registered by a test)", handler: live_sessions }
}

#[tokio::test]
async fn a_command_registered_by_the_host_is_served_and_listed() {
    let server = TestServer::start().await;
    let _other = server.raw().await;
    let mut conn = server.raw().await;
    let reply = conn
        .call(json!({"command": "live_sessions", "id": 1}))
        .await;
    assert_eq!(ok(&reply)["live_sessions"], 2);
    assert_eq!(reply["id"], 1);

    let help = conn.call(json!({"command": "help"})).await;
    let names: Vec<&str> = ok(&help)["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "audit",
            "authenticate",
            "help",
            "list",
            "live_sessions",
            "logout",
            "ping",
            "register",
            "revoke",
            "stats",
            "unwatch",
            "update",
            "watch"
        ]
    );
    err(
        &conn.call(json!({"command": "whoami"})).await,
        "unknown_command",
    );
}

#[tokio::test]
async fn the_example_host_serves_its_own_command() {
    vmm_tests::init_logging();
    let db = TestDb::create().await;
    let host = vmm_tests::example("host");
    let mut child = Process::new(host)
        .env("DATABASE_URL", &db.url)
        .env("VMM_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the example host");
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await
    .unwrap()
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .parse()
        .unwrap();

    let mut conn = RawConn::connect(addr).await;
    let reply = conn.call(json!({"command": "whoami", "data": {}})).await;
    let data = ok(&reply);
    assert_eq!(data["authenticated"], false);
    assert!(data["session_id"].is_u64());
    let help = conn.call(json!({"command": "help"})).await;
    assert!(
        ok(&help)["commands"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "whoami")
    );
    // A built-in command works next to it.
    assert_eq!(
        conn.call(json!({"command": "ping"})).await["message"],
        "PONG"
    );
    let _ = child.kill();
    let _ = child.wait();
}
