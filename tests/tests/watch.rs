//! `watch`: events of changes made through any instance, in order.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use vmm_core::client::Update;
use vmm_tests::{PATIENCE, RawConn, TestServer, err, ok, password_for, registration};

async fn watcher(server: &TestServer, vm_id: &str, topics: Option<Value>) -> RawConn {
    let mut conn = server.raw().await;
    ok(&conn.call(json!({"command": "register", "data": {"vm_id": vm_id, "ram": 1, "cpu": 1, "password": password_for(vm_id)}})).await);
    err(
        &conn.call(json!({"command": "watch"})).await,
        "not_authenticated",
    );
    ok(&conn.call(json!({"command": "authenticate", "data": {"vm_id": vm_id, "password": password_for(vm_id)}})).await);
    let data = match topics {
        Some(topics) => json!({"topics": topics}),
        None => json!({}),
    };
    let reply = conn.call(json!({"command": "watch", "data": data})).await;
    ok(&reply);
    conn
}

/// Reads event lines as they come, with the time each arrived.
fn collect(conn: RawConn) -> tokio::sync::mpsc::UnboundedReceiver<(Instant, Value)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut reader = conn.reader;
    tokio::spawn(async move {
        let _writer = conn.writer;
        let mut line = String::new();
        while reader.read_line(&mut line).await.is_ok_and(|n| n > 0) {
            if let Ok(value) = serde_json::from_str::<Value>(&line)
                && tx.send((Instant::now(), value)).is_err()
            {
                break;
            }
            line.clear();
        }
    });
    rx
}

fn about(event: &Value, vm_id: &str) -> bool {
    event["data"]["vm_id"] == vm_id || event["data"]["vm"]["vm_id"] == vm_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_on_b_sees_what_happens_on_a_in_order() {
    let a = TestServer::start().await;
    let b = a.start_beside(|_| {}).await;
    let mut events = collect(watcher(&b, "watcher", None).await);

    let mut actor = a.client().await;
    let mut done = Vec::new();
    actor
        .register(&registration("actor", 512, vec![10]))
        .await
        .unwrap();
    done.push(("vm_registered", Instant::now()));
    actor
        .authenticate("actor", &password_for("actor"))
        .await
        .unwrap();
    done.push(("session_authenticated", Instant::now()));
    actor
        .update(&Update {
            ram: Some(1024),
            attach: vec![20],
            ..Update::default()
        })
        .await
        .unwrap();
    done.push(("vm_updated", Instant::now()));
    actor.logout().await.unwrap();
    done.push(("session_logged_out", Instant::now()));
    drop(actor);
    done.push(("session_closed", Instant::now()));

    let mut seen = Vec::new();
    while seen.len() < done.len() {
        let (at, event) = tokio::time::timeout(vmm_tests::PATIENCE, events.recv())
            .await
            .expect("events arrive")
            .expect("the watcher is connected");
        assert!(
            event.get("status").is_none(),
            "an event is not a reply: {event}"
        );
        assert!(
            event["at"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{event}"
        );
        if about(&event, "actor") {
            seen.push((event["event"].as_str().unwrap().to_owned(), at, event));
        }
    }
    let names: Vec<&str> = seen.iter().map(|(name, _, _)| name.as_str()).collect();
    assert_eq!(
        names,
        done.iter().map(|(name, _)| *name).collect::<Vec<_>>()
    );
    for ((name, at, _), (_, action)) in seen.iter().zip(&done) {
        let delay = at.saturating_duration_since(*action);
        assert!(
            delay < Duration::from_secs(1),
            "{name} arrived {delay:?} after the action"
        );
    }
    let (_, _, updated) = &seen[2];
    assert_eq!(updated["data"]["vm"]["ram"], 1024);
    assert_eq!(updated["data"]["vm"]["disks"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn topics_filter_and_unwatch_stops() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    ok(&conn.call(json!({"command": "register", "data": {"vm_id": "w", "ram": 1, "cpu": 1, "password": password_for("w")}})).await);
    ok(&conn.call(json!({"command": "authenticate", "data": {"vm_id": "w", "password": password_for("w")}})).await);
    err(
        &conn
            .call(json!({"command": "watch", "data": {"topics": ["weather"]}}))
            .await,
        "invalid_params",
    );
    err(
        &conn
            .call(json!({"command": "watch", "data": {"topics": []}}))
            .await,
        "invalid_params",
    );
    ok(&conn
        .call(json!({"command": "watch", "data": {"topics": ["vms"]}}))
        .await);

    // A session event is filtered out, a VM event comes through, and the
    // connection keeps answering requests between events.
    let _other = server.raw().await;
    let mut actor = server.client().await;
    actor
        .register(&registration("v2", 1, vec![]))
        .await
        .unwrap();
    let event = conn.reply().await;
    assert_eq!(event["event"], "vm_registered", "{event}");
    assert_eq!(event["data"]["vm"]["vm_id"], "v2");
    assert_eq!(
        conn.call(json!({"command": "ping", "id": 1})).await["id"],
        1
    );

    ok(&conn.call(json!({"command": "unwatch"})).await);
    actor
        .register(&registration("v3", 1, vec![]))
        .await
        .unwrap();
    // The next line is the ping's reply, not an event about v3.
    let reply = conn.call(json!({"command": "ping", "id": 2})).await;
    assert_eq!(reply["id"], 2, "{reply}");
}

/// Event lines come from PostgreSQL's NOTIFY, whose `json` text is spaced
/// (`"event" : ...`); they reach watchers compact, like replies, with their
/// keys in the documented order.
#[tokio::test]
async fn event_lines_are_compact_json() {
    let server = TestServer::start().await;
    let mut conn = watcher(&server, "compact-watcher", Some(json!(["vms"]))).await;
    let mut actor = server.client().await;
    actor
        .register(&registration("compact-actor", 512, vec![10]))
        .await
        .unwrap();
    let mut line = String::new();
    let read = tokio::time::timeout(PATIENCE, conn.reader.read_line(&mut line)).await;
    assert!(
        matches!(read, Ok(Ok(n)) if n > 0),
        "no event line in time: {read:?}"
    );
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["event"], "vm_registered", "{line}");
    assert!(about(&event, "compact-actor"), "{line}");
    assert_eq!(line, format!("{event}\n"), "not compact: {line}");
    let keys: Vec<&str> = event
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["event", "data", "at", "seq"]);
    assert!(event["seq"].as_i64().unwrap() > 0, "{line}");
}

#[tokio::test]
async fn the_client_keeps_events_apart_from_replies() {
    let server = TestServer::start().await;
    let mut watcher = server.client().await;
    watcher
        .register(&registration("w", 1, vec![]))
        .await
        .unwrap();
    watcher.authenticate("w", &password_for("w")).await.unwrap();
    assert_eq!(watcher.watch(&["vms"]).await.unwrap(), ["vms"]);
    let mut actor = server.client().await;
    actor
        .register(&registration("a1", 1, vec![]))
        .await
        .unwrap();
    actor
        .register(&registration("a2", 1, vec![]))
        .await
        .unwrap();
    // Requests still get their replies while events are queued.
    watcher.ping().await.unwrap();
    let first: Value = serde_json::from_str(&watcher.next_event().await.unwrap()).unwrap();
    let second: Value = serde_json::from_str(&watcher.next_event().await.unwrap()).unwrap();
    assert_eq!(first["data"]["vm"]["vm_id"], "a1");
    assert_eq!(second["data"]["vm"]["vm_id"], "a2");
    watcher.unwatch().await.unwrap();
}
