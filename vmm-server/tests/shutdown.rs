//! Done-when 7: SIGTERM with a request in flight: its reply arrives, and the
//! server exits 0. Runs the real `vmm-server` binary.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use vmm_tests::{RawConn, TestDb, eventually, ok, password_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish() {
    vmm_tests::init_logging();
    let db = TestDb::create().await;
    let mut server = Command::new(env!("CARGO_BIN_EXE_vmm-server"))
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start vmm-server");
    let stdout = server.stdout.take().unwrap();
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<SocketAddr>();
    // Read the log until "listening", then keep draining it.
    std::thread::spawn(move || {
        let mut addr_tx = Some(addr_tx);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if entry["fields"]["message"] == "listening" {
                let addr = entry["fields"]["address"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                if let Some(tx) = addr_tx.take() {
                    let _ = tx.send(addr);
                }
            }
        }
    });
    let addr = tokio::time::timeout(vmm_tests::PATIENCE, addr_rx)
        .await
        .expect("the server logs its address")
        .unwrap();

    // Hold the VM table locked so that a register stays in flight.
    let mut blocker = db.connect().await;
    let lock = blocker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE vms IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    let mut conn = RawConn::connect(addr).await;
    conn.send(format!(
        "{}\n",
        json!({"command": "register", "id": "in-flight", "data": {
            "vm_id": "late", "ram": 64, "cpu": 1, "password": password_for("late")}})
    ))
    .await;
    let watcher = db.connect().await;
    eventually("the register waits on the lock", || async {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'vmm' AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (waiting > 0).then_some(())
    })
    .await;

    let pid = server.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    eventually("the server stops accepting", || async {
        tokio::net::TcpStream::connect(addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;

    lock.rollback().await.unwrap();
    let reply = conn.reply().await;
    assert_eq!(reply["id"], "in-flight");
    assert_eq!(ok(&reply)["vm"]["vm_id"], "late");
    assert!(conn.closed().await, "the connection closes after the reply");

    let exit = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "vmm-server exited with {exit}");
}
