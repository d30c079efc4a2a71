//! Resumable `watch`: every event has a `seq`; a watcher that was away
//! resumes with `since` and misses nothing; an instance whose listening
//! connection dropped passes on what it missed; a `since` the log cannot
//! serve is `gone`.

use std::time::Duration;

use serde_json::{Value, json};
use vmm_core::client::Update;
use vmm_tests::{
    DbProxy, Deadline, PATIENCE, RawConn, TestServer, err, ok, password_for, registration,
    seed_fleet,
};

/// A connection authenticated as a newly registered VM `vm_id`.
async fn vm(server: &TestServer, vm_id: &str) -> RawConn {
    let mut conn = server.raw().await;
    ok(&conn
        .call(
            json!({"command": "register", "data": {"vm_id": vm_id, "ram": 1, "cpu": 1,
            "password": password_for(vm_id)}}),
        )
        .await);
    ok(&conn
        .call(json!({"command": "authenticate", "data": {"vm_id": vm_id,
            "password": password_for(vm_id)}}))
        .await);
    conn
}

/// The next event line (a value without `status`), skipping nothing else:
/// a watcher's connection carries only events here.
async fn next_event(conn: &mut RawConn) -> Value {
    let line = tokio::time::timeout(PATIENCE, conn.reply())
        .await
        .unwrap_or_else(|_| panic!("no event within {PATIENCE:?}"));
    assert!(line.get("status").is_none(), "not an event: {line}");
    line
}

/// The reply to `request`, skipping the event lines before it.
async fn call_past_events(conn: &mut RawConn, request: Value) -> Value {
    conn.send(format!("{request}\n")).await;
    loop {
        let line = conn.reply().await;
        if line.get("status").is_some() {
            return line;
        }
    }
}

/// Sets `vm_id`'s RAM through `client`.
async fn set_ram(client: &mut vmm_core::Client, ram: u32) {
    client
        .update(&Update {
            ram: Some(ram),
            ..Update::default()
        })
        .await
        .unwrap();
}

/// The `vm_updated` events of `vm_id` among the next events, until `count`
/// of them came, with their `seq`s.
async fn updates_of(conn: &mut RawConn, vm_id: &str, count: usize) -> Vec<(i64, u64)> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let event = next_event(conn).await;
        if event["event"] == "vm_updated" && event["data"]["vm"]["vm_id"] == vm_id {
            seen.push((
                event["seq"].as_i64().unwrap(),
                event["data"]["vm"]["ram"].as_u64().unwrap(),
            ));
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_was_away_gets_what_it_missed_in_order() {
    let a = TestServer::start().await;
    let b = a.start_beside(|_| {}).await;
    let mut actor = a.client().await;
    actor
        .register(&registration("mover", 100, vec![10]))
        .await
        .unwrap();
    actor
        .authenticate("mover", &password_for("mover"))
        .await
        .unwrap();

    let mut watcher = vm(&b, "away").await;
    let reply = watcher
        .call(json!({"command": "watch", "data": {"topics": ["vms"]}}))
        .await;
    let start = ok(&reply)["seq"].as_i64().unwrap();
    set_ram(&mut actor, 200).await;
    let [(seen, 200)] = updates_of(&mut watcher, "mover", 1).await[..] else {
        panic!("not the update to 200");
    };
    assert!(seen > start, "{seen} after {start}");
    drop(watcher);

    // Three updates on a while the watcher is away.
    for ram in [300, 400, 500] {
        set_ram(&mut actor, ram).await;
    }

    let mut watcher = b.raw().await;
    ok(&watcher
        .call(json!({"command": "authenticate", "data": {"vm_id": "away",
            "password": password_for("away")}}))
        .await);
    let reply = watcher
        .call(json!({"command": "watch", "data": {"topics": ["vms"], "since": seen}}))
        .await;
    assert_eq!(ok(&reply)["seq"], seen, "{reply}");
    let missed = updates_of(&mut watcher, "mover", 3).await;
    assert_eq!(
        missed.iter().map(|(_, ram)| *ram).collect::<Vec<_>>(),
        [300, 400, 500]
    );
    assert!(missed[0].0 > seen, "{missed:?} after {seen}");
    assert!(missed.windows(2).all(|w| w[0].0 < w[1].0), "{missed:?}");

    // Then live, after the seam: the next update once, nothing repeated.
    set_ram(&mut actor, 600).await;
    let mut last = missed[2].0;
    loop {
        let event = next_event(&mut watcher).await;
        let seq = event["seq"].as_i64().unwrap();
        assert!(seq > last, "{seq} after {last}: {event}");
        last = seq;
        if event["data"]["vm"]["ram"] == 600 {
            break;
        }
        assert_ne!(event["data"]["vm"]["vm_id"], "mover", "{event}");
    }
}

/// Far behind: more events than one page of the log, all of them, in
/// order, each once, then live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_far_behind_reads_the_log_page_by_page() {
    let server = TestServer::start().await;
    let mut watcher = vm(&server, "far").await;
    let reply = watcher
        .call(json!({"command": "watch", "data": {"topics": ["vms"]}}))
        .await;
    let start = ok(&reply)["seq"].as_i64().unwrap();
    ok(&watcher.call(json!({"command": "unwatch"})).await);

    // 300 registrations in one transaction: 300 events.
    seed_fleet(&server.db, 300, 0).await;

    let reply = watcher
        .call(json!({"command": "watch", "data": {"topics": ["vms"], "since": start}}))
        .await;
    ok(&reply);
    let mut seqs = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    while ids.len() < 300 {
        let event = next_event(&mut watcher).await;
        assert_eq!(event["event"], "vm_registered", "{event}");
        seqs.push(event["seq"].as_i64().unwrap());
        assert!(ids.insert(event["data"]["vm"]["vm_id"].as_str().unwrap().to_owned()));
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "out of order");
    assert!(seqs[0] > start);

    let mut actor = server.client().await;
    actor
        .register(&registration("after-the-log", 1, vec![]))
        .await
        .unwrap();
    let event = next_event(&mut watcher).await;
    assert_eq!(event["data"]["vm"]["vm_id"], "after-the-log", "{event}");
    assert!(event["seq"].as_i64().unwrap() > *seqs.last().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_lost_its_listening_connection_passes_on_the_gap() {
    let a = TestServer::start().await;
    let proxy = DbProxy::start(&a.db).await;
    let b = a.start_through(&proxy, |_| {}).await;
    let mut actor = a.client().await;
    actor
        .register(&registration("gap-mover", 100, vec![]))
        .await
        .unwrap();
    actor
        .authenticate("gap-mover", &password_for("gap-mover"))
        .await
        .unwrap();
    let mut watcher = vm(&b, "gap-watcher").await;
    ok(&watcher
        .call(json!({"command": "watch", "data": {"topics": ["vms"]}}))
        .await);
    set_ram(&mut actor, 150).await;
    let live = updates_of(&mut watcher, "gap-mover", 1).await;
    assert_eq!(live[0].1, 150);

    // b loses the database, its listening connection with it.
    proxy.cut();
    for ram in [250, 350, 450] {
        set_ram(&mut actor, ram).await;
    }
    proxy.restore();

    let gap = updates_of(&mut watcher, "gap-mover", 3).await;
    assert_eq!(
        gap.iter().map(|(_, ram)| *ram).collect::<Vec<_>>(),
        [250, 350, 450]
    );
    assert!(gap[0].0 > live[0].0 && gap.windows(2).all(|w| w[0].0 < w[1].0));
}

#[tokio::test]
async fn a_since_the_log_cannot_serve_is_gone() {
    let server = TestServer::start_with(|config| {
        config.event_retention = Duration::from_millis(500);
    })
    .await;
    let mut watcher = vm(&server, "late").await;
    err(
        &watcher
            .call(json!({"command": "watch", "data": {"since": -1}}))
            .await,
        "invalid_params",
    );

    // Never issued.
    let reply = watcher
        .call(json!({"command": "watch", "data": {"since": 1_000_000_000}}))
        .await;
    assert_eq!(reply["code"], "gone", "{reply}");
    let latest = reply["data"]["latest"].as_i64().unwrap();
    assert!(latest >= 2, "{reply}");
    assert!(reply["message"].as_str().unwrap().contains("never issued"));

    // Pruned: once the events of the registration are older than the
    // retention, `since` 0 asks for them.
    let deadline = Deadline::new("the first events pruned");
    let gone = loop {
        // A connection each time: one whose watch from 0 succeeded may be
        // pruned past while it reads the log, and is then disconnected.
        let mut poll = server.raw().await;
        ok(&poll
            .call(json!({"command": "authenticate", "data": {"vm_id": "late",
                "password": password_for("late")}}))
            .await);
        let reply =
            call_past_events(&mut poll, json!({"command": "watch", "data": {"since": 0}})).await;
        if reply["code"] == "gone" {
            break reply;
        }
        ok(&reply);
        deadline.tick().await;
    };
    assert!(
        gone["message"].as_str().unwrap().contains("no longer kept"),
        "{gone}"
    );
    let oldest = &gone["data"]["oldest"];
    assert!(oldest.is_null() || oldest.as_i64().unwrap() > 1, "{gone}");
    let latest = gone["data"]["latest"].as_i64().unwrap();
    // Where the log stands now is always servable.
    let reply = call_past_events(
        &mut watcher,
        json!({"command": "watch", "data": {"since": latest}}),
    )
    .await;
    assert_eq!(ok(&reply)["seq"], latest);
}

/// `seq` follows commit order even when many writers on two instances
/// commit at once: a live watcher and one that resumes afterwards with
/// `since` see the same events, each once, in the same order, and every
/// VM's updates in the order they were made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_on_two_instances_reach_live_and_resumed_watchers_alike() {
    use vmm_tests::race::{Pair, race};
    const WRITERS: usize = 20;
    const UPDATES: u64 = 10;
    let pair = Pair::start(|_| {}).await;
    let mut live = vm(&pair.a, "race-live").await;
    let reply = live
        .call(json!({"command": "watch", "data": {"topics": ["vms"]}}))
        .await;
    let start = ok(&reply)["seq"].as_i64().unwrap();

    race(WRITERS, |i, gate| {
        let addr = pair.addr(i);
        async move {
            let vm_id = format!("racer-{i}");
            // A machine each: logins from one address at once are throttled.
            let mut conn = RawConn::connect_from(i + 1, addr).await;
            ok(&conn
                .call(
                    json!({"command": "register", "data": {"vm_id": vm_id, "ram": 1,
                    "cpu": 1, "password": password_for(&vm_id)}}),
                )
                .await);
            ok(&conn
                .call(json!({"command": "authenticate", "data": {"vm_id": vm_id,
                    "password": password_for(&vm_id)}}))
                .await);
            gate.open().await;
            for ram in 2..2 + UPDATES {
                ok(&conn
                    .call(json!({"command": "update", "data": {"ram": ram}}))
                    .await);
            }
        }
    })
    .await;

    // The racers' updates, as a watcher saw them: (seq, vm, ram).
    async fn racer_updates(conn: &mut RawConn) -> Vec<(i64, String, u64)> {
        let mut seen = Vec::new();
        while seen.len() < WRITERS * UPDATES as usize {
            let event = next_event(conn).await;
            let vm = &event["data"]["vm"];
            if event["event"] == "vm_updated"
                && vm["vm_id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("racer-"))
            {
                seen.push((
                    event["seq"].as_i64().unwrap(),
                    vm["vm_id"].as_str().unwrap().to_owned(),
                    vm["ram"].as_u64().unwrap(),
                ));
            }
        }
        seen
    }
    let seen_live = racer_updates(&mut live).await;

    let mut resumed = vm(&pair.b, "race-resumed").await;
    ok(&resumed
        .call(json!({"command": "watch", "data": {"topics": ["vms"], "since": start}}))
        .await);
    let seen_resumed = racer_updates(&mut resumed).await;

    assert_eq!(
        seen_live, seen_resumed,
        "the log and the live events differ"
    );
    assert!(
        seen_live.windows(2).all(|w| w[0].0 < w[1].0),
        "seq out of order"
    );
    for i in 0..WRITERS {
        let vm_id = format!("racer-{i}");
        let rams: Vec<u64> = seen_live
            .iter()
            .filter(|(_, id, _)| *id == vm_id)
            .map(|(_, _, ram)| *ram)
            .collect();
        assert_eq!(rams, (2..2 + UPDATES).collect::<Vec<_>>(), "{vm_id}");
    }
}
