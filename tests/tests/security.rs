//! Done-when 5: isolation between VMs, authentication, and password storage.
//! (No password in replies or logs: see `secrets.rs`.)

use serde_json::json;
use vmm_core::client::Update;
use vmm_tests::{TestServer, err, ok, password_for, registration};

#[tokio::test]
async fn no_command_touches_another_vms_disks() {
    let server = TestServer::start().await;
    let mut mallory = server.client().await;
    let mut victim = server.client().await;
    mallory
        .register(&registration("mallory", 512, vec![1]))
        .await
        .unwrap();
    let theirs = victim
        .register(&registration("victim", 512, vec![10, 20]))
        .await
        .unwrap();
    mallory
        .authenticate("mallory", &password_for("mallory"))
        .await
        .unwrap();

    for disk in &theirs.disks {
        let attempt = Update {
            ram: Some(2048),
            resize: vec![(disk.id, 500)],
            ..Update::default()
        };
        let error = mallory.update(&attempt).await.unwrap_err();
        assert_eq!(error.code(), Some(vmm_core::ErrorCode::NotFound));
    }
    // All or nothing: the ram change in the refused update did not happen either.
    let db = server.db.connect().await;
    let rows = db
        .query("SELECT vm_id, ram FROM vms ORDER BY vm_id", &[])
        .await
        .unwrap();
    let rams: Vec<(String, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rams, [("mallory".into(), 512), ("victim".into(), 512)]);
    let sizes: Vec<i32> = db
        .query(
            "SELECT disk_size FROM disks WHERE vm_id = 'victim' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(sizes, [10, 20]);

    // A new disk goes to the caller's own VM, whatever it says.
    let mut raw = server.raw().await;
    ok(&raw.call(json!({"command": "authenticate", "data": {"vm_id": "mallory", "password": password_for("mallory")}})).await);
    let reply = raw
        .call(json!({"command": "update", "data": {"vm_id": "victim", "ram": 1}}))
        .await;
    err(&reply, "invalid_params");
    let reply = raw
        .call(json!({"command": "update", "data": {"disks": [{"disk_size": 5}]}}))
        .await;
    assert_eq!(ok(&reply)["vm"]["vm_id"], "mallory");
    assert!(
        victim.list_disks().await.is_err(),
        "victim is not authenticated"
    );
}

#[tokio::test]
async fn updates_resize_in_place_attach_and_refuse_shrinking() {
    let server = TestServer::start().await;
    let mut vm = server.client().await;
    let created = vm
        .register(&registration("grow", 512, vec![100, 200]))
        .await
        .unwrap();
    vm.authenticate("grow", &password_for("grow"))
        .await
        .unwrap();
    let (first, second) = (created.disks[0].id, created.disks[1].id);

    let shrink = Update {
        resize: vec![(first, 150), (second, 199)],
        ..Update::default()
    };
    assert_eq!(
        vm.update(&shrink).await.unwrap_err().code(),
        Some(vmm_core::ErrorCode::InvalidParams)
    );

    let grow = Update {
        cpu: Some(3),
        resize: vec![(second, 300)],
        attach: vec![50],
        ..Update::default()
    };
    let after = vm.update(&grow).await.unwrap();
    let disks: Vec<(i64, u32)> = after.disks.iter().map(|d| (d.id, d.disk_size)).collect();
    assert_eq!(
        disks[..2],
        [(first, 100), (second, 300)],
        "the refused shrink changed nothing"
    );
    assert_eq!(disks.len(), 3);
    assert!(disks[2].0 > second);
    assert_eq!((after.ram, after.cpu), (512, 3));
    assert!(after.updated_at > created.updated_at);

    let too_many = Update {
        attach: vec![1; 62],
        ..Update::default()
    };
    assert_eq!(
        vm.update(&too_many).await.unwrap_err().code(),
        Some(vmm_core::ErrorCode::InvalidParams)
    );
    let fill = Update {
        attach: vec![1; 61],
        ..Update::default()
    };
    assert_eq!(vm.update(&fill).await.unwrap().disks.len(), 64);
}

#[tokio::test]
async fn list_update_and_logout_need_authentication() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    let needs_auth = [
        json!({"command": "list", "data": {"list_type": "active_vms"}}),
        json!({"command": "list", "data": {"list_type": "all_disks"}}),
        json!({"command": "update", "data": {"ram": 1024}}),
        json!({"command": "logout", "data": {}}),
    ];
    for request in &needs_auth {
        err(&conn.call(request.clone()).await, "not_authenticated");
    }
    ok(&conn.call(json!({"command": "register", "data": {"vm_id": "v", "ram": 1, "cpu": 1, "password": password_for("v")}})).await);
    for request in &needs_auth {
        err(&conn.call(request.clone()).await, "not_authenticated");
    }
    ok(&conn.call(json!({"command": "authenticate", "data": {"vm_id": "v", "password": password_for("v")}})).await);
    ok(&conn.call(json!({"command": "logout", "data": {}})).await);
    for request in &needs_auth {
        err(&conn.call(request.clone()).await, "not_authenticated");
    }
}

#[tokio::test]
async fn unknown_vm_and_wrong_password_read_the_same() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    ok(&conn.call(json!({"command": "register", "data": {"vm_id": "real", "ram": 1, "cpu": 1, "password": password_for("real")}})).await);
    let wrong = conn
        .call(json!({"command": "authenticate", "data": {"vm_id": "real", "password": "not-the-password"}, "id": 1}))
        .await;
    let unknown = conn
        .call(json!({"command": "authenticate", "data": {"vm_id": "imaginary", "password": "not-the-password"}, "id": 1}))
        .await;
    err(&wrong, "invalid_credentials");
    assert_eq!(wrong, unknown);
}

#[tokio::test]
async fn passwords_are_stored_as_argon2id_phc_strings() {
    let server = TestServer::start().await;
    let mut conn = server.client().await;
    for vm in ["p1", "p2"] {
        conn.register(&registration(vm, 512, vec![])).await.unwrap();
    }
    let db = server.db.connect().await;
    let rows = db
        .query("SELECT vm_id, password_hash FROM vms", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let mut hashes = Vec::new();
    for row in rows {
        let (vm_id, hash): (String, String) = (row.get(0), row.get(1));
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert_eq!(hash.split('$').count(), 6, "a full PHC string: {hash}");
        assert!(!hash.contains(&password_for(&vm_id)));
        hashes.push(hash);
    }
    assert_ne!(hashes[0], hashes[1], "salted");
}
