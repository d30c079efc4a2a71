//! The operator role and the audit trail.

use serde_json::{Value, json};
use vmm_tests::{TestServer, err, ok, password_for};

const ADMIN: &str = "operator-token-0123456789";

fn admin_login(token: &str) -> Value {
    json!({"command": "authenticate", "data": {"admin_token": token}})
}

#[tokio::test]
async fn the_operator_lists_and_audits_but_is_not_a_vm() {
    let server = TestServer::start_with(|config| config.admin_token = Some(ADMIN.into())).await;

    // A VM's life, to be audited.
    let mut vm = server.raw().await;
    ok(&vm
        .call(
            json!({"command": "register", "data": {"vm_id": "audited", "ram": 512, "cpu": 2,
        "password": password_for("audited"), "disks": [{"disk_size": 10}]}}),
        )
        .await);
    err(&vm.call(json!({"command": "authenticate", "data": {"vm_id": "audited", "password": "wrong-password"}})).await,
        "invalid_credentials");
    let login = vm.call(json!({"command": "authenticate", "data": {"vm_id": "audited", "password": password_for("audited")}})).await;
    let token = ok(&login)["token"].as_str().unwrap().to_owned();
    let disk = login["data"]["vm"]["disks"][0]["id"].clone();
    ok(&vm.call(json!({"command": "update", "data": {"ram": 1024, "disks": [{"id": disk, "disk_size": 15}, {"disk_size": 5}]}})).await);
    // A VM session may not read the trail.
    err(&vm.call(json!({"command": "audit"})).await, "forbidden");
    ok(&vm.call(json!({"command": "logout"})).await);

    let mut op = server.raw().await;
    err(
        &op.call(json!({"command": "audit"})).await,
        "not_authenticated",
    );
    err(
        &op.call(admin_login("not-the-admin-token")).await,
        "invalid_credentials",
    );
    let reply = op.call(admin_login(ADMIN)).await;
    ok(&reply);
    for list_type in ["active_vms", "authenticated_vms", "all_vms", "all_disks"] {
        ok(&op
            .call(json!({"command": "list", "data": {"list_type": list_type}}))
            .await);
    }
    ok(&op
        .call(json!({"command": "watch", "data": {"topics": ["vms"]}}))
        .await);
    ok(&op.call(json!({"command": "unwatch"})).await);
    err(
        &op.call(json!({"command": "update", "data": {"ram": 1}}))
            .await,
        "forbidden",
    );

    let trail = op
        .call(json!({"command": "audit", "data": {"vm_id": "audited"}}))
        .await;
    let events = ok(&trail)["events"].as_array().unwrap().clone();
    let summary: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("logout", "success"),
        ("audit", "forbidden"),
        ("update", "success"),
        ("authenticate", "success"),
        ("authenticate", "failure"),
        ("register", "success"),
    ];
    assert_eq!(
        summary,
        expected.map(|(a, o)| (a.to_owned(), o.to_owned())),
        "newest first: {events:#?}"
    );
    let update = &events[2]["detail"];
    assert_eq!(
        update, "ram 512→1024 MiB; disk 1 10→15 GiB; new disk 5 GiB",
        "{update}"
    );
    assert!(events.iter().all(|e| {
        e["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:"))
    }));

    let all = op
        .call(json!({"command": "audit", "data": {"limit": 2}}))
        .await;
    let latest = ok(&all)["events"].as_array().unwrap().clone();
    assert_eq!(latest.len(), 2);
    assert_eq!(
        latest[0]["action"], "update",
        "the operator's refused update: {latest:?}"
    );
    assert_eq!(latest[0]["outcome"], "forbidden");

    // Neither a password nor a token is in the trail.
    let db = server.db.connect().await;
    let rows = db
        .query(
            "SELECT coalesce(vm_id, '') || ' ' || action || ' ' || detail FROM audit",
            &[],
        )
        .await
        .unwrap();
    for row in rows {
        let line: String = row.get(0);
        assert!(
            !line.contains(&token)
                && !line.contains(&password_for("audited"))
                && !line.contains(ADMIN),
            "{line}"
        );
    }
    ok(&op.call(json!({"command": "logout"})).await);
    err(
        &op.call(json!({"command": "audit"})).await,
        "not_authenticated",
    );
}

#[tokio::test]
async fn no_admin_token_configured_means_no_operator() {
    let server = TestServer::start().await;
    let mut op = server.raw().await;
    err(&op.call(admin_login(ADMIN)).await, "invalid_credentials");
    err(
        &op.call(json!({"command": "authenticate", "data": {"admin_token": ADMIN, "vm_id": "x"}}))
            .await,
        "invalid_params",
    );
}
