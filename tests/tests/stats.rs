//! `stats`: every live instance's figures, from one query, for operators.

use std::time::Duration;

use serde_json::{Value, json};
use vmm_tests::{Deadline, RawConn, TestServer, err, ok, password_for};

const ADMIN: &str = "operator-token-0123456789";

fn configure(name: &'static str) -> impl FnOnce(&mut vmm_core::Config) {
    move |config| {
        config.admin_token = Some(ADMIN.into());
        config.instance_name = name.into();
        // Snapshots are written with each renewal: renew often, so that
        // the test sees changes soon.
        config.presence_interval = Duration::from_millis(100);
    }
}

async fn operator(server: &TestServer) -> RawConn {
    let mut op = server.raw().await;
    ok(&op
        .call(json!({"command": "authenticate", "data": {"admin_token": ADMIN}}))
        .await);
    op
}

/// The `stats` entry of the instance named `name`, if listed.
fn instance<'a>(reply: &'a Value, name: &str) -> Option<&'a Value> {
    ok(reply)["instances"]
        .as_array()?
        .iter()
        .find(|entry| entry["name"] == name)
}

/// `command`'s entry in an instance's `commands`, if listed.
fn command<'a>(entry: &'a Value, command: &str) -> Option<&'a Value> {
    entry["commands"]
        .as_array()?
        .iter()
        .find(|c| c["command"] == command)
}

#[tokio::test]
async fn an_operator_sees_both_instances_with_their_figures() {
    let a = TestServer::start_with(configure("stats-a")).await;
    let b = a.start_beside(configure("stats-b")).await;

    // On b: a VM that registers and authenticates, and a connection that
    // only pings.
    let mut vm = b.raw().await;
    ok(&vm
        .call(
            json!({"command": "register", "data": {"vm_id": "counted", "ram": 512, "cpu": 2,
            "password": password_for("counted"), "disks": []}}),
        )
        .await);
    ok(&vm
        .call(
            json!({"command": "authenticate", "data": {"vm_id": "counted",
            "password": password_for("counted")}}),
        )
        .await);
    let mut pinger = b.raw().await;
    for _ in 0..5 {
        ok(&pinger.call(json!({"command": "ping"})).await);
    }
    ok(&vm.call(json!({"command": "watch"})).await);

    let mut op = operator(&a).await;
    let deadline = Deadline::new("stats showing b's sessions and commands");
    let reply = loop {
        let reply = op.call(json!({"command": "stats"})).await;
        let ready = instance(&reply, "stats-b").is_some_and(|b| {
            b["sessions"]["authenticated"] == 1
                && b["watchers"] == 1
                && command(b, "ping").is_some()
                && command(b, "watch").is_some()
        }) && instance(&reply, "stats-a")
            .is_some_and(|a| a["sessions"]["operator"] == 1);
        if ready {
            break reply;
        }
        deadline.tick().await;
    };
    assert_eq!(
        ok(&reply)["instances"].as_array().unwrap().len(),
        2,
        "{reply}"
    );
    assert_eq!(reply["message"], "2 instances");

    let entry_b = instance(&reply, "stats-b").unwrap();
    assert_eq!(entry_b["connections"], 2, "{entry_b}");
    assert_eq!(
        entry_b["sessions"],
        json!({"connected": 1, "authenticated": 1, "operator": 0}),
        "{entry_b}"
    );
    assert_eq!(entry_b["password_queue"], 0);
    let pool = &entry_b["db_pool"];
    assert_eq!(
        pool["idle"].as_u64().unwrap() + pool["in_use"].as_u64().unwrap(),
        pool["size"].as_u64().unwrap(),
        "{pool}"
    );
    assert!(pool["size"].as_u64().unwrap() >= 1, "{pool}");
    assert!(entry_b["started_at"].as_str().unwrap().ends_with('Z'));
    assert!(entry_b["lease_age_ms"].is_u64(), "{entry_b}");
    assert!(entry_b["id"].is_i64(), "{entry_b}");
    for name in ["ping", "register", "authenticate", "watch"] {
        let figures = command(entry_b, name).unwrap_or_else(|| panic!("{name} in {entry_b}"));
        assert!(figures["rate_1m"].as_f64().unwrap() > 0.0, "{figures}");
        assert!(figures["rate_10s"].as_f64().unwrap() > 0.0, "{figures}");
        let (p50, p99) = (
            figures["p50_ms"].as_f64().unwrap(),
            figures["p99_ms"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p50 <= p99, "{figures}");
    }
    // Five pings and one of each other: ping is the busiest.
    assert_eq!(entry_b["commands"][0]["command"], "ping", "{entry_b}");
    // Nothing was asked of b that it did not answer.
    assert!(command(entry_b, "stats").is_none(), "{entry_b}");

    let entry_a = instance(&reply, "stats-a").unwrap();
    assert_eq!(
        entry_a["sessions"],
        json!({"connected": 0, "authenticated": 0, "operator": 1}),
        "{entry_a}"
    );
    assert_eq!(entry_a["connections"], 1, "{entry_a}");
    assert!(command(entry_a, "ping").is_none(), "{entry_a}");

    // An instance that leaves drops out of the fleet's figures.
    b.shutdown().await;
    let deadline = Deadline::new("stats without b");
    loop {
        let reply = op.call(json!({"command": "stats"})).await;
        if instance(&reply, "stats-b").is_none() {
            assert!(instance(&reply, "stats-a").is_some(), "{reply}");
            assert_eq!(reply["message"], "1 instance");
            break;
        }
        deadline.tick().await;
    }
}

#[tokio::test]
async fn stats_are_for_operators_only() {
    let server = TestServer::start_with(configure("stats-only")).await;
    let mut anonymous = server.raw().await;
    err(
        &anonymous.call(json!({"command": "stats"})).await,
        "not_authenticated",
    );

    let mut vm = server.raw().await;
    ok(&vm
        .call(
            json!({"command": "register", "data": {"vm_id": "nosy", "ram": 512, "cpu": 1,
            "password": password_for("nosy"), "disks": []}}),
        )
        .await);
    ok(&vm
        .call(json!({"command": "authenticate", "data": {"vm_id": "nosy",
            "password": password_for("nosy")}}))
        .await);
    let refused = vm.call(json!({"command": "stats"})).await;
    err(&refused, "forbidden");
    assert!(
        refused
            .get("data")
            .is_none_or(|d| d.get("instances").is_none())
    );
    // The connection survives the refusal.
    ok(&vm.call(json!({"command": "ping"})).await);

    let mut op = operator(&server).await;
    err(
        &op.call(json!({"command": "stats", "data": {"instance": "x"}}))
            .await,
        "invalid_params",
    );
    ok(&op.call(json!({"command": "stats"})).await);

    // The refusal is in the audit trail.
    let trail = op
        .call(json!({"command": "audit", "data": {"vm_id": "nosy"}}))
        .await;
    let refusal = ok(&trail)["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "stats")
        .cloned();
    assert_eq!(
        refusal.map(|e| e["outcome"].clone()),
        Some(json!("forbidden"))
    );
}
