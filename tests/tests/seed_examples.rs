//! Done-when 1: every example of the original README, sent verbatim (pretty-
//! printed as written there), gets a success reply of the documented shape.

use serde_json::Value;
use vmm_tests::{TestServer, ok};

/// The README of the program vmm replaces, kept as it was.
const SEED_README: &str = include_str!("../fixtures/seed-README.ru.md");

/// `(heading, json text)` for every example under "Примеры команд".
fn examples() -> Vec<(String, String)> {
    let mut examples = Vec::new();
    let mut heading = String::new();
    let mut lines = SEED_README.lines();
    while let Some(line) = lines.next() {
        if let Some(title) = line.strip_prefix("### ") {
            heading = title.trim().to_owned();
        } else if line.trim() == "```json" {
            let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            examples.push((heading.clone(), block.join("\n") + "\n"));
        }
    }
    examples
}

fn assert_vm_view(vm: &Value) {
    for key in ["vm_id", "ram", "cpu", "disks", "created_at", "updated_at"] {
        assert!(vm.get(key).is_some(), "VmView lacks {key}: {vm}");
    }
    for disk in vm["disks"].as_array().unwrap() {
        assert!(disk["id"].is_i64() && disk["disk_size"].is_u64(), "{disk}");
    }
    let created = vm["created_at"].as_str().unwrap();
    assert!(created.ends_with('Z') && created.contains('T'), "{created}");
}

#[tokio::test]
async fn every_seed_example_succeeds_verbatim() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    let examples = examples();
    let names: Vec<&str> = examples.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "ping",
            "register",
            "authenticate",
            "list_active",
            "list_auth",
            "list_all",
            "list_all_disks",
            "update_ram",
            "update_ram_cpu_disks",
            "logout"
        ]
    );

    let mut disk_ids = Vec::new();
    for (name, text) in examples {
        let text = if name == "update_ram_cpu_disks" {
            // The example names disks 1 and 2: use the ids register returned.
            assert!(text.contains("\"id\": 1,") && text.contains("\"id\": 2,"));
            text.replace("\"id\": 1,", &format!("\"id\": {},", disk_ids[0]))
                .replace("\"id\": 2,", &format!("\"id\": {},", disk_ids[1]))
        } else {
            text
        };
        assert!(
            text.contains('\n') && text.starts_with("{\n"),
            "pretty-printed: {text}"
        );
        conn.send(&text).await;
        let reply = conn.reply().await;
        let keys: Vec<&String> = reply.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["status", "message", "data"], "{name}: {reply}");
        let data = ok(&reply);
        match name.as_str() {
            "ping" => {
                assert_eq!(reply["message"], "PONG");
                assert_eq!(*data, serde_json::json!({}));
            }
            "register" => {
                let vm = &data["vm"];
                assert_vm_view(vm);
                assert_eq!(vm["vm_id"], "stalin");
                assert_eq!(vm["ram"], 512);
                assert_eq!(vm["cpu"], 4);
                let sizes: Vec<i64> = vm["disks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d["disk_size"].as_i64().unwrap())
                    .collect();
                assert_eq!(sizes, [100, 200]);
                disk_ids = vm["disks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d["id"].as_i64().unwrap())
                    .collect();
            }
            "authenticate" => assert_vm_view(&data["vm"]),
            "list_active" => {
                let list = data["active_vms"].as_array().unwrap();
                assert_eq!(list.len(), 1);
                assert_eq!(list[0]["vm_id"], "stalin");
                assert_eq!(list[0]["authenticated"], true);
                assert_vm_view(&list[0]["vm"]);
            }
            "list_auth" => {
                let list = data["authenticated_vms"].as_array().unwrap();
                assert_eq!(list.len(), 1);
                assert_vm_view(&list[0]);
                assert!(list[0]["session_id"].is_u64() && list[0]["authenticated_at"].is_string());
            }
            "list_all" => {
                let list = data["all_vms"].as_array().unwrap();
                assert_eq!(list.len(), 1);
                assert_vm_view(&list[0]);
                assert_eq!(list[0]["connected"], true);
                assert_eq!(list[0]["authenticated"], true);
            }
            "list_all_disks" => {
                let list = data["all_disks"].as_array().unwrap();
                assert_eq!(list.len(), 2);
                assert!(list.iter().all(|d| d["vm_id"] == "stalin"));
            }
            "update_ram" => assert_eq!(data["vm"]["ram"], 1024),
            "update_ram_cpu_disks" => {
                let vm = &data["vm"];
                assert_eq!(vm["ram"], 2048);
                assert_eq!(vm["cpu"], 8);
                let disks: Vec<(i64, i64)> = vm["disks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| (d["id"].as_i64().unwrap(), d["disk_size"].as_i64().unwrap()))
                    .collect();
                assert_eq!(
                    disks,
                    [(disk_ids[0], 150), (disk_ids[1], 250)],
                    "resized in place"
                );
            }
            "logout" => assert_eq!(*data, serde_json::json!({})),
            other => panic!("unexpected example {other}"),
        }
    }
}
