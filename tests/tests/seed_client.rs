//! The compatibility contract with the original Python server's own client.
//! It sends one JSON value per write with no newline, reads each reply with
//! one `recv(4096)`, passes `data.token` back, sends disks back as `list
//! all_disks` shows them, and sits idle for as long as its person takes to
//! type. This test speaks exactly like it, against a server with the default
//! configuration.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vmm_tests::TestServer;

/// Longer than the 60 s after which vmm used to close a silent connection.
const IDLE: Duration = Duration::from_secs(70);

/// The seed client: one write per request, one read per reply.
struct SeedClient(TcpStream);

impl SeedClient {
    async fn send(&mut self, request: Value) -> Value {
        let text = serde_json::to_vec(&request).unwrap();
        self.0.write_all(&text).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(30), self.0.read(&mut buf))
            .await
            .expect("a reply within 30 s")
            .expect("the connection is open");
        assert!(n > 0, "the server closed the connection");
        // One read holds the whole reply: it is what this client decodes.
        serde_json::from_slice(&buf[..n]).unwrap_or_else(|err| {
            panic!(
                "one recv(4096) is not one reply ({err}): {:?}",
                String::from_utf8_lossy(&buf[..n])
            )
        })
    }
}

#[track_caller]
fn success(reply: &Value) -> &Value {
    assert_eq!(reply["status"], "success", "{reply}");
    &reply["data"]
}

#[tokio::test]
async fn the_seed_client_works_across_a_long_idle_gap() {
    let server = TestServer::start().await;
    let mut seed = SeedClient(TcpStream::connect(server.addr).await.unwrap());

    assert_eq!(
        seed.send(json!({"command": "ping", "data": {}})).await["message"],
        "PONG"
    );
    success(
        &seed
            .send(json!({"command": "register", "data": {
                "vm_id": "stalin", "ram": 512, "cpu": 4, "password": "securePass123",
                "disks": [{"disk_size": 100}, {"disk_size": 200}]}}))
            .await,
    );
    let login = seed
        .send(json!({"command": "authenticate", "data": {
            "vm_id": "stalin", "password": "securePass123"}}))
        .await;
    let token = success(&login)["token"].as_str().unwrap().to_owned();

    // Its person goes for coffee.
    tokio::time::sleep(IDLE).await;

    let disks = seed
        .send(json!({"command": "list", "data": {"list_type": "all_disks", "token": token}}))
        .await;
    let shown: Vec<Value> = success(&disks)["all_disks"].as_array().unwrap().clone();
    assert_eq!(shown.len(), 2, "{disks}");
    assert!(shown.iter().all(|d| d["vm_id"] == "stalin"), "{disks}");

    // Disks sent back as the list shows them, `vm_id` included, grown.
    let grown: Vec<Value> = shown
        .iter()
        .map(|d| {
            json!({"id": d["id"], "vm_id": d["vm_id"],
                   "disk_size": d["disk_size"].as_u64().unwrap() + 50})
        })
        .collect();
    let updated = seed
        .send(json!({"command": "update", "data": {
            "ram": 2048, "cpu": 8, "disks": grown, "token": token}}))
        .await;
    let vm = &success(&updated)["vm"];
    assert_eq!(vm["ram"], 2048, "{updated}");
    let sizes: Vec<u64> = vm["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["disk_size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [150, 250], "{updated}");

    // Another VM's name in a disk entry is refused, and nothing changes.
    let mut theirs = grown[0].clone();
    theirs["vm_id"] = json!("someone-else");
    theirs["disk_size"] = json!(999);
    let refused = seed
        .send(json!({"command": "update", "data": {"disks": [theirs], "token": token}}))
        .await;
    assert_eq!(refused["code"], "invalid_params", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("disks[0].vm_id"),
        "{refused}"
    );

    let all = seed
        .send(json!({"command": "list", "data": {"list_type": "all_vms", "token": token}}))
        .await;
    let vms = success(&all)["all_vms"].as_array().unwrap().clone();
    assert_eq!(vms.len(), 1, "{all}");
    assert_eq!(vms[0]["disks"][0]["disk_size"], 150, "{all}");

    success(
        &seed
            .send(json!({"command": "logout", "data": {"token": token}}))
            .await,
    );
}
