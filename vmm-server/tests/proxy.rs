//! `--proxy-protocol` and `--proxy-protocol-from` (and their environment
//! variables): the first is a usage error without the second, the second
//! alone is a warning, and together they make every connection start with
//! a PROXY header from a trusted peer.

use std::process::Command;

use serde_json::json;
use tokio::io::AsyncReadExt;
use vmm_tests::{PATIENCE, RawConn, ServerProcess, TestDb, ok};

const SERVER: &str = env!("CARGO_BIN_EXE_vmm-server");

/// Runs the server to its exit (it does not get as far as the database).
fn usage_error(args: &[&str], env: &[(&str, &str)]) -> String {
    let output = Command::new(SERVER)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .envs(env.iter().copied())
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .output()
        .expect("run vmm-server");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "a usage error: {stderr}");
    stderr
}

#[test]
fn the_protocol_needs_trusted_peers_and_blocks_must_parse() {
    let stderr = usage_error(&["--proxy-protocol"], &[]);
    assert!(stderr.contains("needs --proxy-protocol-from"), "{stderr}");
    let stderr = usage_error(&[], &[("VMM_PROXY_PROTOCOL", "true")]);
    assert!(stderr.contains("needs --proxy-protocol-from"), "{stderr}");
    // An empty list is no list.
    let stderr = usage_error(&["--proxy-protocol"], &[("VMM_PROXY_PROTOCOL_FROM", " ")]);
    assert!(stderr.contains("needs --proxy-protocol-from"), "{stderr}");
    let stderr = usage_error(
        &[
            "--proxy-protocol",
            "--proxy-protocol-from",
            "10.0.0.0/8,10.0.0.0/40",
        ],
        &[],
    );
    assert!(stderr.contains("/40"), "names the bad block: {stderr}");
}

#[tokio::test]
async fn from_the_environment_connections_need_a_header() {
    let db = TestDb::create().await;
    let mut command = Command::new(SERVER);
    command
        .env("VMM_PROXY_PROTOCOL", "1")
        .env("VMM_PROXY_PROTOCOL_FROM", "192.0.2.0/24, 127.0.0.1");
    let server = ServerProcess::spawn_command(command, &db, &[]).await;
    let on = server
        .log()
        .into_iter()
        .find(|entry| {
            entry["fields"]["message"]
                .as_str()
                .is_some_and(|message| message.starts_with("PROXY protocol on"))
        })
        .expect("the log says the PROXY protocol is on");
    assert_eq!(on["fields"]["from"], "192.0.2.0/24,127.0.0.1/32", "{on}");

    // A v1 header written by hand, with the first request after it.
    let mut proxied = RawConn::connect(server.addr).await;
    proxied
        .send(format!(
            "PROXY TCP4 127.10.20.30 127.0.0.1 4242 {}\r\n{}\n",
            server.addr.port(),
            json!({"command": "ping"})
        ))
        .await;
    ok(&proxied.reply().await);

    let mut plain = RawConn::connect(server.addr).await;
    plain
        .send(format!("{}\n", json!({"command": "ping"})))
        .await;
    let mut received = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, plain.reader.read_to_end(&mut received))
        .await
        .expect("closed in time");
    assert!(
        received.is_empty(),
        "no reply without a header: {received:?}"
    );
}

#[tokio::test]
async fn trusted_peers_without_the_protocol_are_a_warning() {
    let db = TestDb::create().await;
    let server = ServerProcess::spawn(SERVER, &db, &["--proxy-protocol-from", "10.0.0.0/8"]).await;
    let log = server.log();
    assert!(
        log.iter().any(|entry| entry["level"] == "WARN"
            && entry["fields"]["message"]
                .as_str()
                .is_some_and(|message| message.contains("--proxy-protocol-from is ignored"))),
        "{log:?}"
    );
    // Off: a client without a header is served.
    let mut plain = RawConn::connect(server.addr).await;
    ok(&plain.call(json!({"command": "ping"})).await);
}
