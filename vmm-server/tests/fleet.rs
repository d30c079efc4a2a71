//! A fleet of 20,000 VMs with 2 disks each, written straight into the
//! tables, listed whole from a real `vmm-server` process: the lists are
//! streamed, so the server's resident memory grows by at most 64 MiB (one
//! `all_vms` reply alone is about 5 MB here, and the server used to build
//! the whole list in memory several times over). Paged with `limit` 1,000,
//! every VM is visited exactly once.

use std::collections::BTreeSet;

use serde_json::json;
use vmm_tests::{RawConn, ServerProcess, TestDb, ok, password_for, proc_status_kib, seed_fleet};

const FLEET: usize = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_is_listed_whole_in_bounded_memory_and_paged_once_each() {
    let db = TestDb::create().await;
    let server = ServerProcess::spawn(env!("CARGO_BIN_EXE_vmm-server"), &db, &[]).await;
    seed_fleet(&db, FLEET, 2).await;
    let mut conn = RawConn::connect(server.addr).await;
    let password = password_for("observer");
    ok(&conn
        .call(json!({"command": "register", "data": {
            "vm_id": "observer", "ram": 64, "cpu": 1, "password": password, "disks": []}}))
        .await);
    ok(&conn
        .call(
            json!({"command": "authenticate", "data": {"vm_id": "observer", "password": password}}),
        )
        .await);
    // Every code path of a list once, on a small page, before measuring.
    for list_type in ["all_vms", "all_disks", "active_vms", "authenticated_vms"] {
        ok(&conn
            .call(json!({"command": "list", "data": {"list_type": list_type, "limit": 10}}))
            .await);
    }

    let pid = server.child.id();
    let before = proc_status_kib(pid, "VmRSS");
    for _ in 0..3 {
        let vms = conn
            .call(json!({"command": "list", "data": {"list_type": "all_vms"}}))
            .await;
        assert_eq!(
            ok(&vms)["all_vms"].as_array().map(Vec::len),
            Some(FLEET + 1)
        );
        let disks = conn
            .call(json!({"command": "list", "data": {"list_type": "all_disks"}}))
            .await;
        assert_eq!(
            ok(&disks)["all_disks"].as_array().map(Vec::len),
            Some(2 * FLEET)
        );
    }
    let peak = proc_status_kib(pid, "VmHWM");
    let grown_mib = peak.saturating_sub(before) / 1024;
    eprintln!("server RSS before {before} KiB, peak {peak} KiB: grew {grown_mib} MiB");
    assert!(
        grown_mib <= 64,
        "listing {FLEET} VMs grew the server's resident memory by {grown_mib} MiB"
    );

    let mut seen = BTreeSet::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut data = json!({"list_type": "all_vms", "limit": 1_000});
        if let Some(after) = &after {
            data["after"] = json!(after);
        }
        let reply = conn.call(json!({"command": "list", "data": data})).await;
        let data = ok(&reply);
        let page = data["all_vms"].as_array().cloned().unwrap_or_default();
        assert!(page.len() <= 1_000);
        pages += 1;
        for vm in &page {
            let vm_id = vm["vm_id"].as_str().unwrap_or_default().to_owned();
            assert!(seen.insert(vm_id), "{vm} is on two pages");
        }
        match data["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), FLEET + 1, "every VM is visited");
    assert_eq!(pages, 21);
}
