//! Slow and hostile clients: half a request, too many connections from one
//! address, a client that never reads its replies.

use std::time::{Duration, Instant};

use serde_json::json;
use vmm_tests::{TestServer, err, ok};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_request_is_cut_off_while_others_are_served() {
    let timeout = Duration::from_millis(500);
    let server = TestServer::start_with(|config| config.request_timeout = Some(timeout)).await;
    let mut slow = server.raw().await;
    let mut fine = server.raw().await;
    ok(&slow.call(json!({"command": "ping"})).await);

    // Before the send: the server may see the bytes before this task runs again.
    let started = Instant::now();
    slow.send(r#"{"command": "register", "data": {"vm_id": "slo"#)
        .await;
    // Answered `invalid_json` (not a silent close), then closed.
    let slow_task = tokio::spawn(async move {
        let reply = slow.try_reply().await;
        (reply, slow.closed().await)
    });
    let mut worst = Duration::ZERO;
    while !slow_task.is_finished() {
        let t = Instant::now();
        ok(&fine.call(json!({"command": "ping"})).await);
        worst = worst.max(t.elapsed());
        tokio::task::yield_now().await;
    }
    let (reply, closed) = slow_task.await.unwrap();
    let reply = reply.expect("the slow client got a reply before the close");
    err(&reply, "invalid_json");
    assert!(
        reply["message"]
            .as_str()
            .is_some_and(|m| m.contains("not complete within 0.5 s")),
        "{reply}"
    );
    assert!(closed, "the slow client was disconnected");
    assert!(
        started.elapsed() >= timeout,
        "not before the timeout: {:?}",
        started.elapsed()
    );
    // Stated by the issue as the bar for "unaffected"; a debug build on a
    // loaded 2-core machine answers in well under a millisecond.
    assert!(worst < Duration::from_millis(50), "a ping took {worst:?}");
    ok(&fine.call(json!({"command": "ping"})).await);
}

#[tokio::test]
async fn connections_per_address_are_capped() {
    let server = TestServer::start_with(|config| config.max_connections_per_ip = 2).await;
    let mut one = server.raw().await;
    let mut two = server.raw().await;
    ok(&one.call(json!({"command": "ping"})).await);
    ok(&two.call(json!({"command": "ping"})).await);
    let mut three = server.raw().await;
    let reply = three.reply().await;
    err(&reply, "server_busy");
    assert!(three.closed().await);
    // The refusal is in the audit trail.
    let db = server.db.connect().await;
    vmm_tests::eventually("the refusal is audited", || async {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM audit WHERE action = 'connect' AND outcome = 'refused'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    })
    .await;
    drop(one);
    vmm_tests::eventually("a freed place", || async {
        let mut again = server.raw().await;
        let reply = again.call(json!({"command": "ping"})).await;
        (reply["status"] == "success").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_disconnected() {
    let server =
        TestServer::start_with(|config| config.write_timeout = Duration::from_millis(300)).await;
    let greedy = server.raw().await;
    let (reader, mut writer) = (greedy.reader, greedy.writer);
    // Many requests with large replies, none of them read: the socket
    // buffers fill up, the server's write blocks, and it gives up. (The
    // writing itself may fail once the server has given up.)
    let batch = format!("{}\n", json!({"command": "help"})).repeat(20_000);
    let writing = tokio::spawn(async move {
        let _ = tokio::io::AsyncWriteExt::write_all(&mut writer, batch.as_bytes()).await;
        writer
    });
    vmm_tests::eventually("the server drops the client that does not read", || async {
        server.context.sessions.is_empty().then_some(())
    })
    .await;
    drop((reader, writing));
    // Others are served meanwhile and after.
    ok(&server.raw().await.call(json!({"command": "ping"})).await);
}
