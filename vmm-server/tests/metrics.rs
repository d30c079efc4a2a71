//! `--metrics-listen`: vmm-server serves its metrics and health checks on a
//! port of their own, and nothing there when the flag is not given.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmm_tests::{Deadline, ServerProcess, TestDb};

const SERVER: &str = env!("CARGO_BIN_EXE_vmm-server");

/// The status line and body of one HTTP/1.1 GET.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_owned();
    (status, body.to_owned())
}

#[tokio::test]
async fn metrics_listen_serves_metrics_and_health() {
    let db = TestDb::create().await;
    let server = ServerProcess::spawn(SERVER, &db, &["--metrics-listen", "127.0.0.1:0"]).await;
    let log = server.log();
    let addr: SocketAddr = log
        .iter()
        .find(|entry| entry["fields"]["message"] == "serving metrics and health checks")
        .and_then(|entry| entry["fields"]["address"].as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in the log: {log:?}"));

    assert_eq!(get(addr, "/healthz").await.0, "HTTP/1.1 200 OK");
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("\nvmm_connections 0\n"), "{body}");
    let deadline = Deadline::new("/readyz is 200 once the database was checked");
    while get(addr, "/readyz").await.0 != "HTTP/1.1 200 OK" {
        deadline.tick().await;
    }
}

#[tokio::test]
async fn no_metrics_listener_by_default() {
    let db = TestDb::create().await;
    let server = ServerProcess::spawn(SERVER, &db, &[]).await;
    assert!(
        !server
            .log()
            .iter()
            .any(|entry| entry["fields"]["message"] == "serving metrics and health checks"),
        "{:?}",
        server.log()
    );
}
