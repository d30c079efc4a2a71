//! Several instances on one database: lists tell the truth across instances,
//! after crashes and after restarts.

use std::time::{Duration, Instant, SystemTime};

use vmm_tests::{TestServer, password_for};

fn names_active(list: &[vmm_core::protocol::ActiveSession]) -> Vec<&str> {
    list.iter().filter_map(|s| s.vm_id.as_deref()).collect()
}

fn names_auth(list: &[vmm_core::protocol::AuthenticatedSession]) -> Vec<&str> {
    list.iter().map(|s| s.vm.vm_id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_on_one_instance_shows_on_another() {
    let a = TestServer::start().await;
    let b = a.start_beside(|_| {}).await;
    let mut observer = b.session_as("observer").await;

    let mut vm = a.session_as("roamer").await;
    // Read your writes: no waiting after the authenticate reply.
    let active = observer.list_active().await.unwrap();
    assert!(names_active(&active).contains(&"roamer"), "{active:?}");
    let auth = observer.list_authenticated().await.unwrap();
    // In session_id order: A's sessions before B's.
    assert_eq!(names_auth(&auth), ["roamer", "observer"]);
    let all = observer.list_all().await.unwrap();
    let roamer = all.iter().find(|s| s.vm.vm_id == "roamer").unwrap();
    assert!(roamer.connected && roamer.authenticated);
    let ids: Vec<u64> = active.iter().map(|s| s.session_id).collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1], "session ids are unique across instances");

    vm.logout().await.unwrap();
    let auth = observer.list_authenticated().await.unwrap();
    assert_eq!(names_auth(&auth), ["observer"]);

    drop(vm);
    let closed = Instant::now();
    loop {
        let active = observer.list_active().await.unwrap();
        if !names_active(&active).contains(&"roamer") {
            break;
        }
        assert!(
            closed.elapsed() < Duration::from_secs(1),
            "still listed after {:?}",
            closed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all = observer.list_all().await.unwrap();
    let roamer = all.iter().find(|s| s.vm.vm_id == "roamer").unwrap();
    assert!(!roamer.connected && roamer.last_seen_at.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instance_vanishes_within_its_lease() {
    let lease = Duration::from_secs(2);
    let short = |config: &mut vmm_core::Config| {
        config.instance_lease = lease;
        config.presence_interval = Duration::from_millis(200);
    };
    let mut a = TestServer::start_with(short).await;
    let b = a.start_beside(short).await;
    let mut observer = b.session_as("observer").await;
    let _vm = a.session_as("doomed").await;
    assert!(names_auth(&observer.list_authenticated().await.unwrap()).contains(&"doomed"));

    let db = a.db.share();
    let crashed_at = SystemTime::now();
    let crashed = Instant::now();
    a.crash();

    loop {
        let active = observer.list_active().await.unwrap();
        if !names_active(&active).contains(&"doomed") {
            break;
        }
        assert!(
            crashed.elapsed() < lease + Duration::from_secs(1),
            "still listed {:?} after the crash",
            crashed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!names_auth(&observer.list_authenticated().await.unwrap()).contains(&"doomed"));

    // The survivor reaps the dead instance's rows and dates the VM's last
    // sighting to the dead instance's last renewal.
    let check = db.connect().await;
    vmm_tests::eventually("the survivor reaps the crashed instance", || async {
        let left: i64 = check
            .query_one(
                "SELECT count(*) FROM sessions s JOIN vms v USING (vm_id) WHERE v.vm_id = 'doomed'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (left == 0).then_some(())
    })
    .await;
    let last_seen: SystemTime = check
        .query_one("SELECT last_seen_at FROM vms WHERE vm_id = 'doomed'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        last_seen <= crashed_at + lease,
        "last_seen_at {last_seen:?} is after crash + lease"
    );
    assert!(
        last_seen + lease >= crashed_at,
        "last_seen_at {last_seen:?} is long before the crash"
    );
    let all = observer.list_all().await.unwrap();
    let doomed = all.iter().find(|s| s.vm.vm_id == "doomed").unwrap();
    assert!(!doomed.connected && !doomed.authenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_instance_shows_no_ghosts() {
    // A long lease: the ghosts would stay for a minute if nothing removed them.
    let slot = |config: &mut vmm_core::Config| {
        config.instance_name = "slot-a".into();
        config.instance_lease = Duration::from_secs(60);
    };
    let mut first = TestServer::start_with(slot).await;
    let first_instance = first.context.sessions.instance_id();
    let _ghost = first.session_as("ghost").await;
    let mut anonymous = first.raw().await;
    anonymous.call(serde_json::json!({"command": "ping"})).await;
    let old_ids: Vec<u64> = {
        let mut c = first.session_as("witness").await;
        c.list_active()
            .await
            .unwrap()
            .iter()
            .map(|s| s.session_id)
            .collect()
    };
    let second = first.start_beside(slot).await;
    first.crash();

    assert_ne!(second.context.sessions.instance_id(), first_instance);
    let mut observer = second.client().await;
    observer
        .authenticate("witness", &password_for("witness"))
        .await
        .unwrap();
    let active = observer.list_active().await.unwrap();
    assert_eq!(active.len(), 1, "only the observer itself: {active:?}");
    assert!(
        !old_ids.contains(&active[0].session_id),
        "no session id is reused"
    );
    assert!(names_auth(&observer.list_authenticated().await.unwrap()) == ["witness"]);
    let all = observer.list_all().await.unwrap();
    let ghost = all.iter().find(|s| s.vm.vm_id == "ghost").unwrap();
    assert!(!ghost.connected && ghost.last_seen_at.is_some());
}
