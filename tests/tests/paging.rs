//! Lists a page at a time: keyset paging visits every entry exactly once,
//! across instances for sessions, and bad pages are `invalid_params`. Also:
//! a list that fails half-way through its streamed reply closes the
//! connection and is counted, and the server goes on serving.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use vmm_tests::{RawConn, TestServer, err, eventually, ok, seed_fleet};

/// Every page of `list_type` with `limit`, following `next`.
async fn pages(conn: &mut RawConn, list_type: &str, limit: u64) -> Vec<Vec<Value>> {
    let mut pages = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut data = json!({"list_type": list_type, "limit": limit});
        if let Some(after) = &after {
            data["after"] = json!(after);
        }
        let reply = conn.call(json!({"command": "list", "data": data})).await;
        let data = ok(&reply).clone();
        let entries = data[list_type].as_array().cloned().unwrap_or_default();
        assert_eq!(
            reply["message"],
            format!("{} {list_type}", entries.len()),
            "the message counts the page's entries"
        );
        assert!(
            entries.len() as u64 <= limit,
            "a page holds at most `limit`"
        );
        pages.push(entries);
        match data.get("next") {
            Some(next) => after = Some(next.as_str().unwrap_or_default().to_owned()),
            None => return pages,
        }
        assert!(pages.len() < 10_000, "paging does not end");
    }
}

async fn operator(server: &TestServer, name: &str) -> RawConn {
    let mut conn = server.raw().await;
    let password = vmm_tests::password_for(name);
    ok(&conn
        .call(json!({"command": "register", "data": {
            "vm_id": name, "ram": 64, "cpu": 1, "password": password, "disks": []}}))
        .await);
    ok(&conn
        .call(json!({"command": "authenticate", "data": {"vm_id": name, "password": password}}))
        .await);
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_visits_every_vm_and_disk_exactly_once() {
    let server = TestServer::start().await;
    seed_fleet(&server.db, 2_500, 2).await;
    let mut conn = operator(&server, "observer").await;

    let whole = conn
        .call(json!({"command": "list", "data": {"list_type": "all_vms"}}))
        .await;
    let whole: Vec<String> = ok(&whole)["all_vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["vm_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(whole.len(), 2_501);
    assert!(
        ok(&conn
            .call(json!({"command": "list", "data": {"list_type": "all_vms"}}))
            .await)
        .get("next")
        .is_none()
    );

    let vm_pages = pages(&mut conn, "all_vms", 1_000).await;
    assert_eq!(
        vm_pages.iter().map(Vec::len).collect::<Vec<_>>(),
        [1_000, 1_000, 501]
    );
    let paged: Vec<String> = vm_pages
        .iter()
        .flatten()
        .map(|vm| vm["vm_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        paged, whole,
        "pages in key order give the whole list, once each"
    );
    // Entry for entry, disks included: pages and the whole list are read
    // by different statements.
    let whole_entries = conn
        .call(json!({"command": "list", "data": {"list_type": "all_vms"}}))
        .await;
    // A connected VM's last_seen_at moves with its requests.
    let settled = |vm: &Value| {
        let mut vm = vm.clone();
        if vm["connected"] == true {
            vm["last_seen_at"] = Value::Null;
        }
        vm
    };
    let paged_entries: Vec<Value> = vm_pages.iter().flatten().map(settled).collect();
    let whole_entries: Vec<Value> = ok(&whole_entries)["all_vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(settled)
        .collect();
    assert_eq!(paged_entries.len(), whole_entries.len());
    for (paged, whole) in paged_entries.iter().zip(&whole_entries) {
        assert_eq!(paged, whole, "a page's entry differs from the whole list's");
    }
    let first = &vm_pages[0][0];
    assert_eq!(first["vm_id"], "fleet-000001");
    assert_eq!(first["disks"].as_array().unwrap().len(), 2);
    assert_eq!(first["connected"], false);
    let me = vm_pages
        .iter()
        .flatten()
        .find(|vm| vm["vm_id"] == "observer")
        .unwrap();
    assert_eq!(
        (me["connected"].clone(), me["authenticated"].clone()),
        (json!(true), json!(true))
    );

    // Exactly full pages: the last full page says there is no next one.
    let disk_pages = pages(&mut conn, "all_disks", 1_000).await;
    assert_eq!(disk_pages.len(), 5);
    let ids: Vec<i64> = disk_pages
        .iter()
        .flatten()
        .map(|d| d["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 5_000);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "disks in id order, none twice"
    );

    // A VM registered between two pages, after the cursor, is on a later
    // page; none already listed comes again.
    let reply = conn
        .call(json!({"command": "list", "data": {"list_type": "all_vms", "limit": 2}}))
        .await;
    let next = ok(&reply)["next"].as_str().unwrap().to_owned();
    seed_more(&server).await;
    let reply = conn
        .call(
            json!({"command": "list", "data": {"list_type": "all_vms", "limit": 2, "after": next}}),
        )
        .await;
    let ids: Vec<&str> = ok(&reply)["all_vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["vm_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["fleet-000002x", "fleet-000003"]);
}

async fn seed_more(server: &TestServer) {
    server
        .db
        .connect()
        .await
        .batch_execute(
            "INSERT INTO vms (vm_id, ram, cpu, password_hash) VALUES ('fleet-000002x', 1, 1, '$argon2id$x')",
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pages_are_invalid_params_and_the_connection_survives() {
    let server = TestServer::start().await;
    let mut conn = operator(&server, "observer").await;
    let reply = conn
        .call(json!({"command": "list", "data": {"list_type": "all_disks", "limit": 1}}))
        .await;
    assert!(ok(&reply).get("next").is_none(), "{reply}");
    let reply = conn
        .call(json!({"command": "list", "data": {"list_type": "all_vms", "limit": 1}}))
        .await;
    assert!(
        ok(&reply).get("next").is_none(),
        "one VM, one page: {reply}"
    );
    let vms_cursor = ok(&conn
        .call(json!({"command": "list", "data": {"list_type": "active_vms", "limit": 1}}))
        .await)
    .get("next")
    .cloned();
    assert!(vms_cursor.is_none(), "one session, one page");

    // A real cursor of another list.
    seed_fleet(&server.db, 3, 1).await;
    let reply = conn
        .call(json!({"command": "list", "data": {"list_type": "all_vms", "limit": 1}}))
        .await;
    let all_vms_cursor = ok(&reply)["next"].clone();
    for data in [
        json!({"list_type": "all_vms", "limit": 0}),
        json!({"list_type": "all_vms", "limit": 10_001}),
        json!({"list_type": "all_vms", "limit": -1}),
        json!({"list_type": "all_vms", "limit": "10"}),
        json!({"list_type": "all_vms", "limit": 1.5}),
        json!({"list_type": "all_vms", "after": "not a cursor"}),
        json!({"list_type": "all_vms", "after": ""}),
        json!({"list_type": "all_vms", "after": 5}),
        json!({"list_type": "all_disks", "after": all_vms_cursor}),
        json!({"list_type": "active_vms", "after": all_vms_cursor}),
        json!({"list_type": "all_vms", "limit": 1, "cursor": all_vms_cursor}),
    ] {
        let reply = conn
            .call(json!({"command": "list", "data": data, "id": 7}))
            .await;
        err(&reply, "invalid_params");
        assert_eq!(reply["id"], 7);
    }
    ok(&conn.call(json!({"command": "ping"})).await);
    // The largest page is allowed, and the cursor still works after all that.
    let reply = conn
        .call(json!({"command": "list", "data": {"list_type": "all_vms", "limit": 10_000, "after": all_vms_cursor}}))
        .await;
    assert_eq!(ok(&reply)["all_vms"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pages_merge_both_instances_in_session_order() {
    let a = TestServer::start().await;
    let b = a.start_beside(|_| {}).await;
    let mut observer = operator(&b, "observer").await;
    let mut kept = Vec::new();
    for i in 0..4 {
        kept.push(operator(&a, &format!("on-a-{i}")).await);
        kept.push(operator(&b, &format!("on-b-{i}")).await);
        kept.push(a.raw().await); // connected, not authenticated
    }
    let deadline = vmm_tests::Deadline::new("A's sessions are visible from B");
    let expected = loop {
        let reply = observer
            .call(json!({"command": "list", "data": {"list_type": "active_vms"}}))
            .await;
        let all = ok(&reply)["active_vms"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if all.len() == 13 {
            break all;
        }
        deadline.tick().await;
    };
    let ids: Vec<u64> = expected
        .iter()
        .map(|s| s["session_id"].as_u64().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "session_id order: {ids:?}"
    );

    for limit in [1, 2, 5, 13, 10_000] {
        let paged: Vec<Value> = pages(&mut observer, "active_vms", limit).await.concat();
        assert_eq!(paged, expected, "active_vms in pages of {limit}");
    }
    let authenticated: BTreeSet<String> = pages(&mut observer, "authenticated_vms", 2)
        .await
        .concat()
        .iter()
        .map(|s| s["vm_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(authenticated.len(), 9, "{authenticated:?}");
    assert!(authenticated.contains("on-a-3") && authenticated.contains("observer"));
    drop(kept);
}

/// The list's query is ended in PostgreSQL while its reply is half sent
/// (the client reads slowly): the line cannot be finished or turned into an
/// error, so the connection closes, and the failure is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_that_fails_half_way_closes_the_connection() {
    use tokio::io::AsyncReadExt;
    let server = TestServer::start().await;
    // Bigger than the socket buffers between server and client, so the
    // server cannot finish while the client does not read.
    seed_fleet(&server.db, 40_000, 2).await;
    let mut conn = operator(&server, "observer").await;
    conn.send("{\"command\":\"list\",\"data\":{\"list_type\":\"all_vms\"}}\n")
        .await;
    let mut head = vec![0u8; 64 * 1024];
    conn.reader.read_exact(&mut head).await.unwrap();
    assert!(head.starts_with(b"{\"status\":\"success\",\"message\":\"40001 all_vms\""));

    let db = server.db.connect().await;
    eventually("the list's query is ended", || async {
        let ended = db
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                   AND query LIKE '%FROM vms WHERE vm_id > $1%'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        (ended > 0).then_some(())
    })
    .await;
    let mut rest = Vec::new();
    tokio::time::timeout(vmm_tests::PATIENCE, conn.reader.read_to_end(&mut rest))
        .await
        .expect("the server closes the connection")
        .ok();
    assert!(
        !rest.ends_with(b"}\n"),
        "the reply is cut short, not finished or turned into another line"
    );
    assert_eq!(server.context.lists.broken(), 1);

    // The server goes on serving lists.
    let mut again = operator(&server, "again").await;
    let reply = again
        .call(json!({"command": "list", "data": {"list_type": "all_vms", "limit": 3}}))
        .await;
    assert_eq!(ok(&reply)["all_vms"].as_array().unwrap().len(), 3);
}

/// Many clients on two instances list the whole fleet at once, released at
/// one barrier: far more lists than either instance runs at a time (a
/// quarter of its pool), so most queue. Every list comes back whole and
/// consistent, none fails or breaks off, and pings are answered throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_lists_at_once_on_two_instances_all_come_back_whole() {
    const CLIENTS: usize = 12;
    let a = TestServer::start_with(|config| config.max_connections_per_ip = 1_000).await;
    let b = a
        .start_beside(|config| config.max_connections_per_ip = 1_000)
        .await;
    seed_fleet(&a.db, 2_000, 2).await;
    assert_eq!(a.context.lists.limit(), 2, "the test pool is 8 connections");
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let server = if i % 2 == 0 { &a } else { &b };
        clients.push(operator(server, &format!("lister-{i}")).await);
    }
    let vms = 2_000 + CLIENTS;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(CLIENTS + 1));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut conn| {
            let barrier = std::sync::Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                let mut counts = Vec::new();
                for list_type in ["all_vms", "all_disks", "all_vms"] {
                    let reply = conn
                        .call(json!({"command": "list", "data": {"list_type": list_type}}))
                        .await;
                    let entries = ok(&reply)[list_type].as_array().map(Vec::len);
                    assert_eq!(
                        reply["message"],
                        format!("{} {list_type}", entries.unwrap_or(0))
                    );
                    counts.push(entries);
                }
                counts
            })
        })
        .collect();
    let mut pinger = a.raw().await;
    barrier.wait().await;
    let mut pings = 0;
    while !tasks.iter().all(|task| task.is_finished()) {
        ok(&pinger.call(json!({"command": "ping"})).await);
        pings += 1;
        tokio::task::yield_now().await;
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), [Some(vms), Some(4_000), Some(vms)]);
    }
    assert!(pings > 0);
    assert_eq!(a.context.lists.broken() + b.context.lists.broken(), 0);
}
