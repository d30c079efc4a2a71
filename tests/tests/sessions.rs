//! Done-when 4: the four lists with connections in different states, logout,
//! and a disconnect.

use std::time::{Duration, Instant};

use vmm_tests::{TestServer, password_for, registration};

#[tokio::test]
async fn lists_follow_connections() {
    let server = TestServer::start().await;

    // Three connections in three states, plus an operator that looks.
    let mut registered_only = server.client().await;
    registered_only
        .register(&registration("reg", 1024, vec![5]))
        .await
        .unwrap();
    let mut authenticated = server.client().await;
    authenticated
        .register(&registration("auth", 1024, vec![6, 7]))
        .await
        .unwrap();
    authenticated
        .authenticate("auth", &password_for("auth"))
        .await
        .unwrap();
    let mut anonymous = server.client().await;
    anonymous.ping().await.unwrap();
    let mut operator = server.session_as("op").await;

    let active = operator.list_active().await.unwrap();
    assert_eq!(active.len(), 4);
    let by_vm = |vm: Option<&str>| {
        active
            .iter()
            .find(|s| s.vm_id.as_deref() == vm)
            .unwrap_or_else(|| panic!("no session for {vm:?} in {active:?}"))
    };
    assert!(!by_vm(Some("reg")).authenticated);
    assert_eq!(by_vm(Some("reg")).vm.as_ref().unwrap().disks.len(), 1);
    assert!(by_vm(Some("auth")).authenticated);
    assert_eq!(by_vm(Some("auth")).vm.as_ref().unwrap().disks.len(), 2);
    assert!(by_vm(None).vm.is_none() && !by_vm(None).authenticated);
    let mut ids: Vec<u64> = active.iter().map(|s| s.session_id).collect();
    ids.dedup();
    assert_eq!(ids.len(), 4, "session ids are distinct");

    let auth = operator.list_authenticated().await.unwrap();
    let names: Vec<&str> = auth.iter().map(|s| s.vm.vm_id.as_str()).collect();
    assert_eq!(names, ["auth", "op"]);

    let all = operator.list_all().await.unwrap();
    let status = |vm: &str| all.iter().find(|s| s.vm.vm_id == vm).unwrap();
    assert_eq!(all.len(), 3);
    assert!(status("reg").connected && !status("reg").authenticated);
    assert!(status("auth").connected && status("auth").authenticated);

    let disks = operator.list_disks().await.unwrap();
    let owners: Vec<(&str, u32)> = disks
        .iter()
        .map(|d| (d.vm_id.as_str(), d.disk_size))
        .collect();
    assert_eq!(owners, [("reg", 5), ("auth", 6), ("auth", 7)]);

    // Logout: gone from authenticated_vms, still active and bound.
    authenticated.logout().await.unwrap();
    let auth = operator.list_authenticated().await.unwrap();
    assert!(auth.iter().all(|s| s.vm.vm_id != "auth"));
    let active = operator.list_active().await.unwrap();
    let entry = active
        .iter()
        .find(|s| s.vm_id.as_deref() == Some("auth"))
        .unwrap();
    assert!(!entry.authenticated);
    assert!(
        authenticated.list_all().await.is_err(),
        "a logged-out session cannot list"
    );

    // Disconnect: gone from the live lists at once, still in all_vms.
    drop(authenticated);
    drop(registered_only);
    let closed_at = Instant::now();
    // Poll with a deadline: the server notices the close asynchronously.
    loop {
        let active = operator.list_active().await.unwrap();
        if active.len() == 2 {
            break;
        }
        assert!(
            closed_at.elapsed() < Duration::from_secs(1),
            "still in active_vms after {:?}: {active:?}",
            closed_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all = operator.list_all().await.unwrap();
    assert_eq!(all.len(), 3);
    let auth_vm = all.iter().find(|s| s.vm.vm_id == "auth").unwrap();
    assert!(!auth_vm.connected && !auth_vm.authenticated);
    assert!(auth_vm.last_seen_at.is_some());
}

#[tokio::test]
async fn last_seen_at_is_recorded_on_disconnect() {
    let server = TestServer::start().await;
    let vm = server.session_as("seen").await;
    let db = server.db.connect().await;
    let before: std::time::SystemTime = db
        .query_one("SELECT last_seen_at FROM vms WHERE vm_id = 'seen'", &[])
        .await
        .unwrap()
        .get(0);
    drop(vm);
    vmm_tests::eventually("last_seen_at moves on disconnect", || async {
        let after: std::time::SystemTime = db
            .query_one("SELECT last_seen_at FROM vms WHERE vm_id = 'seen'", &[])
            .await
            .unwrap()
            .get(0);
        (after > before).then_some(())
    })
    .await;
}

#[tokio::test]
async fn authenticate_switches_and_register_binds() {
    let server = TestServer::start().await;
    let mut conn = server.client().await;
    conn.register(&registration("one", 1024, vec![]))
        .await
        .unwrap();
    conn.register(&registration("two", 1024, vec![]))
        .await
        .unwrap();
    let active = conn.list_active().await;
    assert!(active.is_err(), "register does not authenticate");
    conn.authenticate("one", &password_for("one"))
        .await
        .unwrap();
    conn.authenticate("two", &password_for("two"))
        .await
        .unwrap();
    let auth = conn.list_authenticated().await.unwrap();
    assert_eq!(auth.len(), 1);
    assert_eq!(auth[0].vm.vm_id, "two");
    let updated = conn
        .update(&vmm_core::client::Update {
            ram: Some(77),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(updated.vm_id, "two");
}
