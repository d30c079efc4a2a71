//! Done-when 7: SIGTERM with a request in flight: its reply arrives, and the
//! server exits 0. Runs the real `vmm-server` binary.

use serde_json::json;
use vmm_tests::{RawConn, ServerProcess, TestDb, eventually, ok, password_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish() {
    vmm_tests::init_logging();
    let db = TestDb::create().await;
    let server = ServerProcess::spawn(env!("CARGO_BIN_EXE_vmm-server"), &db, &[]).await;
    let addr = server.addr;

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

    server.signal("TERM");
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

    let exit = server.wait().await;
    assert!(exit.success(), "vmm-server exited with {exit}");
}
