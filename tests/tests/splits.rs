//! Property: however a stream of requests is split into writes, the server
//! gives the same replies.
//!
//! One stream of valid requests (compact, pretty-printed over several lines,
//! back to back without separators, padded with whitespace, plus one line of
//! invalid JSON and four unfinished values, each followed by a newline) is
//! sent to a fresh server in one write, then to a fresh server per split
//! pattern in chunks. The replies must be equal once the values the server
//! assigns (times, session ids, peers, tokens, disk ids relative to the
//! first) are normalised.
//!
//! The split patterns come from a seeded generator: set `VMM_SPLITS_SEED` to
//! try other ones. A failure prints the seed and the chunk boundaries.

use std::collections::HashMap;

use serde_json::{Value, json};
use vmm_tests::{Rng, TestServer, password_for};

const VM: &str = "splits-vm";
const DEFAULT_SEED: u64 = 0x5eed_0000_5b11_7500;

/// A request as it goes into the stream, and what its reply must be in the
/// unsplit run (`None`: success; `Some(code)`: that error).
struct Piece {
    text: String,
    expect: Option<&'static str>,
}

fn compact(value: Value) -> String {
    value.to_string()
}

fn pretty(value: Value) -> String {
    serde_json::to_string_pretty(&value).unwrap_or_default()
}

/// The requests, with the bytes that follow each one.
fn requests() -> Vec<(Piece, &'static str)> {
    let password = password_for(VM);
    let ok = |text: String| Piece { text, expect: None };
    let error = |text: String, code: &'static str| Piece {
        text,
        expect: Some(code),
    };
    vec![
        (ok(compact(json!({"command": "ping", "id": 1}))), "\n"),
        (
            ok(pretty(json!({"command": "ping", "data": {}, "id": "two"}))),
            "",
        ),
        (
            error(
                compact(json!({"command": "frobnicate", "data": {"x": [1, {"y": "}"}]}, "id": 3})),
                "unknown_command",
            ),
            "",
        ),
        (
            ok(pretty(json!({
                "command": "register",
                "data": {
                    "vm_id": VM,
                    "ram": 512,
                    "cpu": 2,
                    "password": password,
                    "disks": [{"disk_size": 100}, {"disk_size": 200}],
                },
                "id": 4,
            }))),
            "\r\n",
        ),
        (
            error(
                compact(json!({"command": "list", "data": {"list_type": "active_vms"}, "id": 5})),
                "not_authenticated",
            ),
            "\n",
        ),
        (
            ok(compact(json!({
                "command": "authenticate",
                "data": {"vm_id": VM, "password": password},
                "id": "auth \"6\" {",
            }))),
            "  \t\n\n",
        ),
        (
            ok(pretty(
                json!({"command": "list", "data": {"list_type": "active_vms"}, "id": 7}),
            )),
            "",
        ),
        (
            ok(compact(
                json!({"command": "list", "data": {"list_type": "authenticated_vms"}, "id": 8}),
            )),
            "",
        ),
        (
            ok(compact(
                json!({"id": 9, "command": "list", "data": {"list_type": "all_vms"}}),
            )),
            "\n",
        ),
        (
            ok(compact(
                json!({"command": "list", "data": {"list_type": "all_disks"}, "id": 10}),
            )),
            " ",
        ),
        (
            ok(pretty(json!({
                "command": "update",
                "data": {"ram": 1024, "disks": [{"id": 1, "disk_size": 150}, {"disk_size": 50}]},
                "id": 11,
            }))),
            "\n",
        ),
        (
            error(
                compact(json!({"command": "update", "data": {"ram": "lots"}, "id": 12})),
                "invalid_params",
            ),
            "\n",
        ),
        (
            // Invalid JSON: answered, and the rest of its line is skipped.
            error(
                "{\"command\": \"ping\", oops} ignored {\"id\": 0}".into(),
                "invalid_json",
            ),
            "\n",
        ),
        // Unfinished values: each is answered once the next line shows it
        // will not be finished, and the request on that line is served.
        (
            // The indented `{` cannot follow `"unfinished"` in an object.
            error(
                "{\"command\": \"ping\", \"id\": \"unfinished\"".into(),
                "invalid_json",
            ),
            "\n  ",
        ),
        // A `{` in the first column starts a new request.
        (error("[".into(), "invalid_json"), "\n"),
        (
            error("{\"command\": \"ping\", \"data\":".into(), "invalid_json"),
            "\r\n",
        ),
        (
            // A raw newline breaks a string at once.
            error(
                "{\"command\": \"ping\", \"id\": \"no closing quote".into(),
                "invalid_json",
            ),
            "\n",
        ),
        (
            ok(compact(json!({"command": "ping", "id": null}))),
            "\r\n\t  ",
        ),
        (
            error(
                compact(json!([1, 2, {"command": "ping"}])),
                "invalid_request",
            ),
            "\n",
        ),
        (ok(compact(json!({"command": "help", "id": 16}))), ""),
        (
            ok(compact(
                json!({"command": "list", "data": {"list_type": "all_disks"}, "id": 17}),
            )),
            "\n",
        ),
        (
            ok(compact(json!({"command": "logout", "id": "é 18 \\ }"}))),
            "\n",
        ),
        (
            error(
                pretty(json!({"command": "list", "data": {"list_type": "all_vms"}, "id": 19})),
                "not_authenticated",
            ),
            "",
        ),
        (ok(compact(json!({"command": "ping", "id": 20}))), "\n"),
    ]
}

/// Chunk lengths that add up to `len`, in one of four styles.
fn split_pattern(rng: &mut Rng, style: usize, stream: &[u8]) -> Vec<usize> {
    let len = stream.len();
    let mut cuts: Vec<usize> = match style {
        // Even-ish small chunks.
        0 => {
            let max = [2, 3, 5, 8, 13, 32, 100][rng.between(0, 6)];
            let mut cuts = Vec::new();
            let mut at = 0;
            while at < len {
                at += rng.between(1, max);
                cuts.push(at.min(len));
            }
            cuts
        }
        // A few cuts anywhere.
        1 => (0..rng.between(1, 6))
            .map(|_| rng.between(1, len))
            .collect(),
        // Cuts next to bytes that matter to the decoder.
        2 => stream
            .iter()
            .enumerate()
            .filter(|(_, b)| b"\n\r{}[]\"\\: ".contains(b))
            .filter_map(|(i, _)| match rng.next_u64() % 3 {
                0 => Some(i),
                1 => Some(i + 1),
                _ => None,
            })
            .collect(),
        // Mostly single bytes, sometimes long runs.
        _ => {
            let mut cuts = Vec::new();
            let mut at = 0;
            while at < len {
                at += if rng.next_u64().is_multiple_of(3) {
                    rng.between(20, 300)
                } else {
                    1
                };
                cuts.push(at.min(len));
            }
            cuts
        }
    };
    cuts.push(len);
    cuts.retain(|&cut| cut > 0 && cut <= len);
    cuts.sort_unstable();
    cuts.dedup();
    let mut previous = 0;
    cuts.into_iter()
        .map(|cut| {
            let size = cut - previous;
            previous = cut;
            size
        })
        .collect()
}

/// Replaces what the server assigns with stable placeholders.
#[derive(Default)]
struct Normaliser {
    sessions: HashMap<u64, usize>,
    first_disk: Option<i64>,
}

impl Normaliser {
    fn normalise(&mut self, value: &mut Value) {
        match value {
            Value::Object(map) => {
                let is_disk = map.contains_key("disk_size");
                for (key, field) in map.iter_mut() {
                    match key.as_str() {
                        k if k.ends_with("_at") && field.is_string() => *field = json!("<time>"),
                        "peer" if field.is_string() => *field = json!("<peer>"),
                        "token" if field.is_string() => *field = json!("<token>"),
                        "session_id" if field.is_u64() => {
                            let next = self.sessions.len();
                            let id = field.as_u64().unwrap_or_default();
                            let n = *self.sessions.entry(id).or_insert(next);
                            *field = json!(format!("<session {n}>"));
                        }
                        "id" if is_disk && field.is_i64() => {
                            let id = field.as_i64().unwrap_or_default();
                            let first = *self.first_disk.get_or_insert(id);
                            *field = json!(format!("<disk {}>", id - first));
                        }
                        _ => self.normalise(field),
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|item| self.normalise(item)),
            _ => {}
        }
    }
}

/// Sends `stream` to a fresh server in chunks of `sizes` and returns the
/// normalised replies.
async fn replies(stream: &[u8], sizes: &[usize], count: usize) -> Vec<Value> {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    let mut at = 0;
    for &size in sizes {
        conn.send(&stream[at..at + size]).await;
        tokio::io::AsyncWriteExt::flush(&mut conn.writer)
            .await
            .unwrap_or_default();
        tokio::task::yield_now().await;
        at += size;
    }
    assert_eq!(at, stream.len());
    let mut normaliser = Normaliser::default();
    let mut replies = Vec::with_capacity(count);
    for _ in 0..count {
        let mut reply = conn.reply().await;
        normaliser.normalise(&mut reply);
        replies.push(reply);
    }
    replies
}

/// Where each chunk ends, for a failure message.
fn boundaries(sizes: &[usize]) -> Vec<usize> {
    sizes
        .iter()
        .scan(0, |at, size| {
            *at += size;
            Some(*at)
        })
        .collect()
}

#[tokio::test]
async fn any_split_of_a_request_stream_gives_the_same_replies() {
    let requests = requests();
    let mut stream = Vec::new();
    for (piece, after) in &requests {
        stream.extend_from_slice(piece.text.as_bytes());
        stream.extend_from_slice(after.as_bytes());
    }
    let count = requests.len();

    let whole = replies(&stream, &[stream.len()], count).await;
    // The unsplit run itself must be right, or the property proves little.
    for (reply, (piece, _)) in whole.iter().zip(&requests) {
        match piece.expect {
            None => assert_eq!(reply["status"], "success", "{} -> {reply}", piece.text),
            Some(code) => assert_eq!(reply["code"], code, "{} -> {reply}", piece.text),
        }
    }
    assert_eq!(
        whole[10]["data"]["vm"]["disks"].as_array().map(Vec::len),
        Some(3)
    );

    let seed = std::env::var("VMM_SPLITS_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let mut rng = Rng(seed);
    let mut patterns = vec![vec![1; stream.len()]]; // one byte per write
    for case in 0..15 {
        patterns.push(split_pattern(&mut rng, case % 4, &stream));
    }
    for sizes in patterns {
        let got = replies(&stream, &sizes, count).await;
        for (i, (got, want)) in got.iter().zip(&whole).enumerate() {
            assert_eq!(
                got,
                want,
                "reply {i} differs (seed {seed}, {} writes ending at {:?})",
                sizes.len(),
                boundaries(&sizes)
            );
        }
    }
}
