//! An instance that loses the database keeps serving `ping`, drops out of the
//! other instances' lists when its lease runs out, and writes its live
//! sessions again when the database is back.

use std::time::Duration;

use serde_json::json;
use vmm_tests::{DbProxy, Deadline, TestServer, err, ok, password_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_reasserted_after_an_outage() {
    let short = |config: &mut vmm_core::Config| {
        config.instance_lease = Duration::from_secs(1);
        config.presence_interval = Duration::from_millis(200);
    };
    let a = TestServer::start_with(short).await;
    let proxy = DbProxy::start(&a.db).await;
    let b = a.start_through(&proxy, short).await;

    let mut observer = a.session_as("observer").await;
    let mut far = b.raw().await;
    ok(&far.call(json!({"command": "register", "data": {"vm_id": "far", "ram": 1, "cpu": 1, "password": password_for("far")}})).await);
    ok(&far.call(json!({"command": "authenticate", "data": {"vm_id": "far", "password": password_for("far")}})).await);
    let listed = |auth: &[vmm_core::protocol::AuthenticatedSession]| {
        auth.iter().any(|s| s.vm.vm_id == "far")
    };
    assert!(listed(&observer.list_authenticated().await.unwrap()));

    proxy.cut();
    ok(&far.call(json!({"command": "ping"})).await);
    let deadline = Deadline::new("B drops out of A's lists once its lease runs out");
    while listed(&observer.list_authenticated().await.unwrap()) {
        deadline.tick().await;
    }
    ok(&far.call(json!({"command": "ping"})).await);
    err(
        &far.call(json!({"command": "list", "data": {"list_type": "all_vms"}}))
            .await,
        "unavailable",
    );

    proxy.restore();
    let deadline = Deadline::new("B writes its sessions again");
    while !listed(&observer.list_authenticated().await.unwrap()) {
        deadline.tick().await;
    }
    let deadline = Deadline::new("B serves database commands again");
    loop {
        let reply = far
            .call(json!({"command": "list", "data": {"list_type": "authenticated_vms"}}))
            .await;
        if reply["status"] == "success" {
            let names: Vec<&str> = reply["data"]["authenticated_vms"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["vm_id"].as_str().unwrap())
                .collect();
            assert_eq!(names, ["observer", "far"]);
            break;
        }
        deadline.tick().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_quickly_then_recovered_with_the_data_intact() {
    let a = TestServer::start().await;
    let proxy = DbProxy::start(&a.db).await;
    let b = a.start_through(&proxy, |_| {}).await;
    let mut conn = b.raw().await;
    ok(&conn
        .call(
            json!({"command": "register", "data": {"vm_id": "kept", "ram": 64, "cpu": 2,
        "password": password_for("kept"), "disks": [{"disk_size": 7}, {"disk_size": 8}]}}),
        )
        .await);
    ok(&conn.call(json!({"command": "authenticate", "data": {"vm_id": "kept", "password": password_for("kept")}})).await);
    let before = conn
        .call(json!({"command": "list", "data": {"list_type": "all_disks"}}))
        .await;
    ok(&before);

    proxy.cut();
    let cut = std::time::Instant::now();
    err(
        &conn
            .call(json!({"command": "list", "data": {"list_type": "all_disks"}}))
            .await,
        "unavailable",
    );
    assert!(
        cut.elapsed() < Duration::from_secs(2),
        "unavailable after {:?}",
        cut.elapsed()
    );
    err(
        &conn
            .call(json!({"command": "update", "data": {"ram": 128}}))
            .await,
        "unavailable",
    );
    let t = std::time::Instant::now();
    ok(&conn.call(json!({"command": "ping"})).await);
    assert!(
        t.elapsed() < Duration::from_millis(50),
        "ping took {:?}",
        t.elapsed()
    );

    proxy.restore();
    let restored = std::time::Instant::now();
    let deadline = Deadline::new("database commands succeed again");
    let after = loop {
        let reply = conn
            .call(json!({"command": "list", "data": {"list_type": "all_disks"}}))
            .await;
        if reply["status"] == "success" {
            break reply;
        }
        deadline.tick().await;
    };
    assert!(
        restored.elapsed() < Duration::from_secs(5),
        "recovered after {:?}",
        restored.elapsed()
    );
    assert_eq!(
        after["data"], before["data"],
        "the data from before the cut is intact"
    );
    // The refused update changed nothing.
    let vms = conn
        .call(json!({"command": "list", "data": {"list_type": "all_vms"}}))
        .await;
    assert_eq!(ok(&vms)["all_vms"][0]["ram"], 64);
}
