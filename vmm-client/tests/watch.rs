//! `vmm-client watch` and the shell's `watch` against a live server: events
//! are printed as they happen, in order, in either format; SIGTERM ends the
//! one-shot command with 0, a lost connection with 3, and keepalive pings
//! hold an idle watcher's connection open. `--resume-file` and `--since`
//! resume a watcher without losing events, and a `since` the server cannot
//! serve fails with `gone`.

mod common;
#[path = "common/pty.rs"]
mod pty;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::task::JoinHandle;
use vmm_core::client::Update;
use vmm_tests::{TestServer, eventually, password_for, registration};

/// A running `vmm-client`, its stdout collected line by line as it comes.
struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<String>>>,
    reader: JoinHandle<()>,
}

impl Running {
    /// Starts `vmm-client --addr ADDR ARGS...`, with `password` (if any) in
    /// `VMM_PASSWORD` and, when `piped_stdin`, a stdin to write a script to.
    fn start(addr: &str, args: &[&str], password: Option<&str>, piped_stdin: bool) -> Running {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vmm-client"));
        command
            .args(["--addr", addr])
            .args(args)
            .env_remove("VMM_PASSWORD")
            .env_remove("VMM_VM_ID")
            .env_remove("VMM_KEEPALIVE")
            .stdin(if piped_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(password) = password {
            command.env("VMM_PASSWORD", password);
        }
        let mut child = command.spawn().expect("start vmm-client");
        let stdin = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let collected = Arc::clone(&lines);
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = out.next_line().await {
                if let Ok(mut lines) = collected.lock() {
                    lines.push(line);
                }
            }
        });
        Running {
            child,
            stdin,
            lines,
            reader,
        }
    }

    /// The lines printed so far.
    fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .map(|lines| lines.clone())
            .unwrap_or_default()
    }

    /// Waits until a line satisfies `check`; returns it.
    async fn line_where(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        eventually(what, || async {
            self.lines().into_iter().find(|line| check(line))
        })
        .await
    }

    async fn write(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("a piped stdin");
        stdin
            .write_all(text.as_bytes())
            .await
            .expect("write to vmm-client");
    }

    fn terminate(&self) {
        self.signal("-TERM");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("vmm-client is running");
        let killed = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(killed.success());
    }

    /// Waits (bounded) for the exit; the exit code and every line printed.
    async fn finished(mut self) -> (Option<i32>, Vec<String>) {
        drop(self.stdin.take());
        let status = tokio::time::timeout(vmm_tests::PATIENCE, self.child.wait())
            .await
            .expect("vmm-client exits in time")
            .expect("vmm-client's exit status");
        tokio::time::timeout(vmm_tests::PATIENCE, self.reader)
            .await
            .expect("vmm-client's stdout ends")
            .expect("the stdout reader");
        let lines = self.lines.lock().map(|lines| lines.clone());
        (status.code(), lines.expect("the collected stdout"))
    }
}

/// A server with the VM `watcher` registered.
async fn server_with_watcher(configure: impl FnOnce(&mut vmm_core::Config)) -> TestServer {
    let server = TestServer::start_with(configure).await;
    server
        .client()
        .await
        .register(&registration("watcher", 256, vec![]))
        .await
        .expect("register the watcher");
    server
}

/// Registers `actor`, authenticates it, updates its RAM, logs out and
/// disconnects: one event of each kind about `actor`, in this order.
const ACTOR_EVENTS: [&str; 5] = [
    "vm_registered",
    "session_authenticated",
    "vm_updated",
    "session_logged_out",
    "session_closed",
];

async fn act(server: &TestServer) {
    let mut actor = server.client().await;
    actor
        .register(&registration("actor", 512, vec![10]))
        .await
        .expect("register actor");
    actor
        .authenticate("actor", &password_for("actor"))
        .await
        .expect("authenticate actor");
    actor
        .update(&Update {
            ram: Some(1024),
            ..Update::default()
        })
        .await
        .expect("update actor");
    actor.logout().await.expect("log actor out");
    drop(actor);
}

/// The names of the events about `vm_id` among JSON `lines`, in order.
fn events_about(lines: &[String], vm_id: &str) -> Vec<String> {
    lines
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line.get("status").is_none())
        .filter(|event| event["data"]["vm_id"] == vm_id || event["data"]["vm"]["vm_id"] == vm_id)
        .filter_map(|event| event["event"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_watch_prints_event_lines_in_order_until_sigterm() {
    let server = server_with_watcher(|_| {}).await;
    let password = password_for("watcher");
    let watch = Running::start(
        &server.addr.to_string(),
        &["--json", "watch", "--vm-id", "watcher"],
        Some(&password),
        false,
    );
    // The watch reply: from then on, every change is an event.
    watch
        .line_where("the watch reply", |line| {
            serde_json::from_str::<Value>(line).is_ok_and(|reply| {
                reply["status"] == "success" && reply["data"]["topics"].is_array()
            })
        })
        .await;

    act(&server).await;
    eventually("every event about actor", || async {
        (events_about(&watch.lines(), "actor").len() >= ACTOR_EVENTS.len()).then_some(())
    })
    .await;

    watch.terminate();
    let (code, lines) = watch.finished().await;
    assert_eq!(code, Some(0), "stdout:\n{}", lines.join("\n"));
    assert_eq!(events_about(&lines, "actor"), ACTOR_EVENTS);
    // The watch reply first (not the authenticate one, which carries the
    // session token), then only events (verbatim: each has its `at`).
    let reply: Value = serde_json::from_str(&lines[0]).expect("a JSON reply line");
    assert_eq!(reply["message"], "watching vms, sessions, disks");
    for line in &lines[1..] {
        let event: Value = serde_json::from_str(line).expect("a JSON event line");
        assert!(event.get("status").is_none(), "not an event: {line}");
        assert!(event["at"].is_string(), "{line}");
    }
    assert!(!lines.iter().any(|line| line.contains(&password)));
    assert!(!lines.iter().any(|line| line.contains(r#""token""#)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn human_watch_prints_one_readable_line_per_event() {
    let server = server_with_watcher(|_| {}).await;
    let watch = Running::start(
        &server.addr.to_string(),
        &["watch", "--vm-id", "watcher", "--topics", "vms,sessions"],
        Some(&password_for("watcher")),
        false,
    );
    watch
        .line_where("the watch message", |line| line == "watching vms, sessions")
        .await;

    act(&server).await;
    let registered = watch
        .line_where("vm_registered actor", |line| {
            line.contains("vm_registered") && line.contains("actor")
        })
        .await;
    let closed = watch
        .line_where("session_closed actor", |line| {
            line.contains("session_closed actor")
        })
        .await;

    watch.terminate();
    let (code, lines) = watch.finished().await;
    assert_eq!(code, Some(0), "stdout:\n{}", lines.join("\n"));
    // `HH:MM:SS.mmm vm_registered actor ram=512 cpu=1 disks=ID:10G`.
    let words: Vec<&str> = registered.split(' ').collect();
    assert_eq!(words.len(), 6, "{registered}");
    assert!(
        words[0].len() == 12 && words[0].as_bytes()[8] == b'.',
        "{registered}"
    );
    assert_eq!(words[1..5], ["vm_registered", "actor", "ram=512", "cpu=1"]);
    assert!(
        words[5].starts_with("disks=") && words[5].ends_with(":10G"),
        "{registered}"
    );
    assert!(
        closed.contains(" session=") && closed.contains(" peer=127.0.0.1:"),
        "{closed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scripted_shell_prints_events_while_it_waits_for_input() {
    let server = server_with_watcher(|_| {}).await;
    // No keepalive: a ping's reply would bring queued events along, and the
    // event must be printed without one.
    let mut shell = Running::start(&server.addr.to_string(), &["--keepalive", "0"], None, true);
    let password = password_for("watcher");
    shell
        .write(&format!("authenticate watcher\n{password}\nwatch vms\n"))
        .await;
    shell
        .line_where("the watch message", |line| line == "watching vms")
        .await;

    // No more input comes until the event has been printed: the shell
    // prints it while it waits.
    server
        .client()
        .await
        .register(&registration("late", 128, vec![]))
        .await
        .expect("register late");
    shell
        .line_where("vm_registered late", |line| {
            line.contains("vm_registered late ")
        })
        .await;
    shell.write("quit\n").await;
    let (code, lines) = shell.finished().await;
    assert_eq!(code, Some(0), "stdout:\n{}", lines.join("\n"));
    assert!(!lines.iter().any(|line| line.contains(&password)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_holds_an_idle_watcher_and_a_lost_connection_exits_3() {
    let server =
        server_with_watcher(|config| config.idle_timeout = Some(Duration::from_secs(1))).await;
    let watch = Running::start(
        &server.addr.to_string(),
        &["--keepalive", "0.2", "watch", "--vm-id", "watcher"],
        Some(&password_for("watcher")),
        false,
    );
    watch
        .line_where("the watch message", |line| line.starts_with("watching "))
        .await;
    // The silence is the behaviour under test (2.5 times the server's idle
    // timeout), so this sleep is real time.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    server
        .client()
        .await
        .register(&registration("after-silence", 128, vec![]))
        .await
        .expect("register after-silence");
    watch
        .line_where("vm_registered after-silence", |line| {
            line.contains("vm_registered after-silence ")
        })
        .await;

    server.shutdown().await;
    // It exits by itself (finished() only waits, up to PATIENCE).
    let (code, lines) = watch.finished().await;
    assert_eq!(code, Some(3), "stdout:\n{}", lines.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_tells_events_from_replies() {
    // About 95 KB of pings: under Linux's 128 KiB limit on one argument.
    const PINGS: usize = 5000;
    let server = server_with_watcher(|_| {}).await;
    // One line that watches, causes an event, and asks for many more
    // replies: more than the server reads at once, so that the event comes
    // among them (the server sends an event when it has read all it has).
    let password = password_for("watcher");
    let mut text = format!(
        r#"{{"command":"authenticate","data":{{"vm_id":"watcher","password":"{password}"}}}} {{"command":"watch","data":{{"topics":["vms"]}}}} {{"command":"register","data":{{"vm_id":"sent","ram":1,"cpu":1,"password":"{password}"}}}}"#
    );
    for _ in 0..PINGS {
        text.push_str(r#" {"command":"ping"}"#);
    }
    let send = Running::start(
        &server.addr.to_string(),
        &["--json", "send", &text],
        None,
        false,
    );
    let (code, lines) = send.finished().await;
    // Not the whole stdout: it is thousands of PONGs.
    let odd: Vec<&String> = lines
        .iter()
        .filter(|line| !line.contains(r#""message":"PONG""#))
        .collect();
    assert_eq!(code, Some(0), "the lines other than PONGs:\n{odd:#?}");
    let values: Vec<Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    let replies = values.iter().filter(|v| v.get("status").is_some()).count();
    assert_eq!(replies, 3 + PINGS, "the lines other than PONGs:\n{odd:#?}");
    assert!(
        values
            .iter()
            .all(|v| v["status"] == "success" || v["event"] == "vm_registered"),
        "the lines other than PONGs:\n{odd:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_watch_shows_the_table_then_a_line_per_change() {
    let server = server_with_watcher(|_| {}).await;
    let password = password_for("watcher");
    // Stdout is a pipe, not a terminal: a line per change.
    let watch = Running::start(
        &server.addr.to_string(),
        &["list", "all_vms", "--watch", "--vm-id", "watcher"],
        Some(&password),
        false,
    );
    watch
        .line_where("the table's row count", |line| line == "(1 row)")
        .await;
    assert!(
        watch
            .lines()
            .iter()
            .any(|line| line.starts_with("| watcher ")),
        "{:?}",
        watch.lines()
    );

    // Registered, authenticated and updated over other connections.
    let mut late = server.client().await;
    late.register(&registration("late", 512, vec![10]))
        .await
        .expect("register late");
    let added = watch
        .line_where("ADDED late", |line| line.starts_with("ADDED late "))
        .await;
    let words: Vec<&str> = added.split(' ').collect();
    assert_eq!(words.len(), 8, "{added}");
    assert_eq!(
        [words[2], words[3], words[5], words[6]],
        // The registering connection is bound to the VM, not authenticated.
        ["ram=512", "cpu=1", "connected=yes", "authenticated=no"],
        "{added}"
    );
    assert!(
        words[4].starts_with("disks=") && words[4].ends_with(":10G"),
        "{added}"
    );
    late.authenticate("late", &password_for("late"))
        .await
        .expect("authenticate late");
    late.update(&Update {
        ram: Some(1024),
        ..Update::default()
    })
    .await
    .expect("update late");
    watch
        .line_where("MODIFIED late ram=1024", |line| {
            line.starts_with("MODIFIED late ram=1024 ") && line.contains(" authenticated=yes ")
        })
        .await;

    watch.terminate();
    let (code, lines) = watch.finished().await;
    assert_eq!(code, Some(0), "stdout:\n{}", lines.join("\n"));
    let added: Vec<&String> = lines
        .iter()
        .filter(|line| line.starts_with("ADDED "))
        .collect();
    assert_eq!(added.len(), 1, "each change once: {lines:#?}");
    // A MODIFIED line shows something its row did not show before.
    let mut shown: std::collections::HashMap<&str, &str> = Default::default();
    for line in &lines {
        let Some((change, row)) = line.split_once(' ') else {
            continue;
        };
        let key = row.split(' ').next().unwrap_or_default();
        if change == "MODIFIED" {
            assert_ne!(
                shown.get(key),
                Some(&row),
                "a change that shows nothing: {lines:#?}"
            );
        }
        if ["ADDED", "MODIFIED"].contains(&change) {
            shown.insert(key, row);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_watch_redraws_the_table_in_place_on_a_terminal_until_ctrl_c() {
    let server = TestServer::start_with(|c| c.admin_token = Some("operator-token".into())).await;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_vmm-client"));
    command
        .args(["--addr", &server.addr.to_string(), "--admin"])
        .args(["list", "disks", "--watch"])
        .env("VMM_ADMIN_TOKEN", "operator-token");
    let mut terminal = pty::Terminal::start(command, 40);
    let screen = terminal.screen.clone();
    let at = screen.wait_for("(0 rows)\r\n", 0).await;

    server
        .client()
        .await
        .register(&registration("disky", 64, vec![5, 6]))
        .await
        .expect("register disky");
    // Back up over the five lines of the empty table, clear, draw anew.
    let redrawn = screen.wait_for("\x1b[5A\x1b[J", at).await;
    let end = screen.wait_for("(2 rows)", redrawn).await;
    let text = screen.text();
    assert_eq!(text[redrawn..end].matches("| disky").count(), 2, "{text}");
    assert!(
        !text.contains("ADDED"),
        "no change lines on a terminal: {text}"
    );

    terminal.typing("\x03"); // Ctrl-C
    let status = terminal.exited().await;
    assert!(status.success(), "{status:?}: {}", screen.text());
}

/// A fresh directory for a test's resume file, and the file's path in it.
fn resume_path(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-client-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the test's directory");
    dir.join("watch.seq")
}

/// The seq in the resume file, if it holds one.
fn resume_seq(path: &std::path::Path) -> Option<i64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The `vm_updated` events of `vm_id` among JSON `lines`: (seq, ram).
fn updates_of(lines: &[String], vm_id: &str) -> Vec<(i64, u64)> {
    lines
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["event"] == "vm_updated" && event["data"]["vm"]["vm_id"] == vm_id)
        .map(|event| {
            let seq = event["seq"].as_i64().expect("an event's seq");
            (
                seq,
                event["data"]["vm"]["ram"].as_u64().expect("the VM's ram"),
            )
        })
        .collect()
}

/// The seqs of the events among JSON `lines` (the reply has none).
fn seqs(lines: &[String]) -> Vec<i64> {
    lines
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line.get("status").is_none())
        .map(|event| event["seq"].as_i64().expect("an event's seq"))
        .collect()
}

/// The watch reply among JSON `lines`, once printed.
fn watch_reply(lines: &[String]) -> Option<Value> {
    lines
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| line["status"] == "success" && line["data"]["topics"].is_array())
}

/// Sets the RAM of the VM `client` is authenticated as.
async fn set_ram(client: &mut vmm_core::Client, ram: u32) {
    client
        .update(&Update {
            ram: Some(ram),
            ..Update::default()
        })
        .await
        .expect("update the RAM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_watcher_with_a_resume_file_prints_what_it_missed_then_live_events() {
    let server = server_with_watcher(|_| {}).await;
    let beside = server.start_beside(|_| {}).await;
    let mut mover = beside.session_as("mover").await;
    let path = resume_path("restart");
    let file = path.to_str().expect("a UTF-8 path");
    let args = [
        "--json",
        "watch",
        "--vm-id",
        "watcher",
        "--topics",
        "vms",
        "--resume-file",
        file,
    ];
    let password = password_for("watcher");
    let addr = server.addr.to_string();

    let first = Running::start(&addr, &args, Some(&password), false);
    let reply = eventually("the watch reply", || async { watch_reply(&first.lines()) }).await;
    let start = reply["data"]["seq"].as_i64().expect("the reply's seq");
    // A watcher that saw no event resumes from where it started.
    eventually("the reply's seq in the file", || async {
        (resume_seq(&path) == Some(start)).then_some(())
    })
    .await;
    set_ram(&mut mover, 100).await;
    let seen = eventually("the first update", || async {
        updates_of(&first.lines(), "mover").first().copied()
    })
    .await;
    assert_eq!(seen.1, 100);
    // Once printed, the event's seq is in the file.
    eventually("the update's seq in the file", || async {
        (resume_seq(&path) == Some(seen.0)).then_some(())
    })
    .await;
    first.terminate();
    let (code, lines) = first.finished().await;
    assert_eq!(code, Some(0), "stdout:\n{}", lines.join("\n"));
    assert_eq!(resume_seq(&path), Some(seen.0));

    // Made on the other instance while nobody watches.
    for ram in [201, 202, 203] {
        set_ram(&mut mover, ram).await;
    }
    let second = Running::start(&addr, &args, Some(&password), false);
    eventually("the three missed updates", || async {
        (updates_of(&second.lines(), "mover").len() >= 3).then_some(())
    })
    .await;
    set_ram(&mut mover, 300).await;
    eventually("the live update", || async {
        (updates_of(&second.lines(), "mover").len() >= 4).then_some(())
    })
    .await;
    second.terminate();
    let (code, lines) = second.finished().await;
    assert_eq!(code, Some(0), "stdout:\n{}", lines.join("\n"));
    let reply = watch_reply(&lines).expect("the watch reply");
    assert_eq!(reply["data"]["seq"], seen.0, "it resumed from the file");
    // Exactly the three it missed, in order, then the live one: no other
    // event, none twice.
    let updates = updates_of(&lines, "mover");
    let rams: Vec<u64> = updates.iter().map(|(_, ram)| *ram).collect();
    assert_eq!(rams, [201, 202, 203, 300], "stdout:\n{}", lines.join("\n"));
    let seqs = seqs(&lines);
    assert_eq!(seqs.len(), 4, "stdout:\n{}", lines.join("\n"));
    assert!(seqs[0] > seen.0, "{seqs:?} after {}", seen.0);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(resume_seq(&path), seqs.last().copied());
    let _ = std::fs::remove_dir_all(path.parent().expect("the test's directory"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_prints_the_events_after_that_seq_first() {
    let server = server_with_watcher(|_| {}).await;
    let mut mover = server.session_as("mover").await;
    for ram in [1, 2, 3] {
        set_ram(&mut mover, ram).await;
    }
    // Where to start: the updates' seqs, as a watcher that saw them has.
    let password = password_for("watcher");
    let addr = server.addr.to_string();
    let all = Running::start(
        &addr,
        &["--json", "watch", "--vm-id", "watcher", "--since", "0"],
        Some(&password),
        false,
    );
    let updates = eventually("the three updates from the start of the log", || async {
        let updates = updates_of(&all.lines(), "mover");
        (updates.len() >= 3).then_some(updates)
    })
    .await;
    all.terminate();
    let (code, _) = all.finished().await;
    assert_eq!(code, Some(0));
    assert_eq!(updates.iter().map(|u| u.1).collect::<Vec<_>>(), [1, 2, 3]);

    // --since wins over a resume file's seq (one it does not keep, here),
    // and the file is kept from then on.
    let since = updates[0].0.to_string();
    let path = resume_path("since");
    std::fs::write(&path, "999999\n").expect("write the resume file");
    let file = path.to_str().expect("a UTF-8 path");
    let watch = Running::start(
        &addr,
        &[
            "--json",
            "watch",
            "--vm-id",
            "watcher",
            "--since",
            &since,
            "--resume-file",
            file,
        ],
        Some(&password),
        false,
    );
    eventually("the updates after the first", || async {
        (updates_of(&watch.lines(), "mover").len() >= 2).then_some(())
    })
    .await;
    set_ram(&mut mover, 4).await;
    eventually("the live update", || async {
        (updates_of(&watch.lines(), "mover").len() >= 3).then_some(())
    })
    .await;
    watch.terminate();
    let (code, lines) = watch.finished().await;
    assert_eq!(code, Some(0), "stdout:\n{}", lines.join("\n"));
    let reply = watch_reply(&lines).expect("the watch reply");
    assert_eq!(reply["data"]["seq"], updates[0].0);
    let rams: Vec<u64> = updates_of(&lines, "mover").iter().map(|u| u.1).collect();
    assert_eq!(rams, [2, 3, 4], "stdout:\n{}", lines.join("\n"));
    let seqs = seqs(&lines);
    assert!(seqs.iter().all(|seq| *seq > updates[0].0), "{seqs:?}");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(resume_seq(&path), seqs.last().copied());
    let _ = std::fs::remove_dir_all(path.parent().expect("the test's directory"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_since_the_server_never_issued_is_gone_and_the_resume_file_is_named() {
    let server = server_with_watcher(|_| {}).await;
    let addr = server.addr.to_string();
    let watch = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vmm-client"));
        command
            .args(["--addr", &addr])
            .args(args)
            .env_remove("VMM_VM_ID")
            .env("VMM_PASSWORD", password_for("watcher"));
        common::run(command, None)
    };

    let run = watch(&["watch", "--vm-id", "watcher", "--since", "999999"]).await;
    assert_eq!(
        run.code, 1,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    for said in [
        "never issued seq 999999",
        "its latest is ",
        "without --since",
        "(gone)",
    ] {
        assert!(run.stderr.contains(said), "{said:?} not in: {}", run.stderr);
    }
    // --json: the error reply is the run's document, with what the server
    // keeps.
    let run = watch(&["--json", "watch", "--vm-id", "watcher", "--since", "999999"]).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    let reply: Value = serde_json::from_str(run.stdout.trim_end()).expect("one JSON line");
    assert_eq!(reply["code"], "gone");
    assert!(reply["data"]["latest"].is_i64(), "{reply}");

    // From a resume file: the run fails, names the file, and leaves it.
    let path = resume_path("gone");
    std::fs::write(&path, "999999\n").expect("write the resume file");
    let file = path.to_str().expect("a UTF-8 path");
    let run = watch(&["watch", "--vm-id", "watcher", "--resume-file", file]).await;
    assert_eq!(
        run.code, 1,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    for said in [
        "never issued seq 999999",
        "remove the resume file",
        file,
        "(gone)",
    ] {
        assert!(run.stderr.contains(said), "{said:?} not in: {}", run.stderr);
    }
    assert_eq!(resume_seq(&path), Some(999999));

    // A file that holds no seq is refused before connecting (usage, 2).
    std::fs::write(&path, "").expect("empty the resume file");
    let run = watch(&["watch", "--vm-id", "watcher", "--resume-file", file]).await;
    assert_eq!(
        run.code, 2,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    assert!(run.stderr.contains(file), "{}", run.stderr);
    // A seq is 0 or more.
    let run = watch(&["watch", "--vm-id", "watcher", "--since", "-1"]).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    let _ = std::fs::remove_dir_all(path.parent().expect("the test's directory"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resume_file_is_never_ahead_of_what_was_printed() {
    const UPDATES: u32 = 40;
    let server = server_with_watcher(|_| {}).await;
    let mut mover = server.session_as("mover").await;
    let path = resume_path("killed");
    let file = path.to_str().expect("a UTF-8 path");
    let args = [
        "--json",
        "watch",
        "--vm-id",
        "watcher",
        "--topics",
        "vms",
        "--resume-file",
        file,
    ];
    let password = password_for("watcher");
    let addr = server.addr.to_string();

    let first = Running::start(&addr, &args, Some(&password), false);
    eventually("the watch reply", || async { watch_reply(&first.lines()) }).await;
    let updating = tokio::spawn(async move {
        for ram in 1..=UPDATES {
            set_ram(&mut mover, ram).await;
        }
        mover
    });
    eventually("some updates printed", || async {
        (updates_of(&first.lines(), "mover").len() >= 5).then_some(())
    })
    .await;
    // Killed mid-stream, with no chance to tidy up.
    first.signal("-KILL");
    let (_, killed_lines) = first.finished().await;
    let printed = seqs(&killed_lines);
    let recorded = resume_seq(&path).expect("a seq in the resume file");
    assert!(
        printed.contains(&recorded),
        "the file holds {recorded}, not a printed event: {printed:?}"
    );
    // At most the event being printed when it was killed is not recorded.
    let behind = printed.iter().filter(|seq| **seq > recorded).count();
    assert!(behind <= 1, "{recorded} is {behind} behind {printed:?}");

    let mut mover = updating.await.expect("the updates");
    let second = Running::start(&addr, &args, Some(&password), false);
    eventually("the last update", || async {
        updates_of(&second.lines(), "mover")
            .iter()
            .any(|(_, ram)| *ram == u64::from(UPDATES))
            .then_some(())
    })
    .await;
    set_ram(&mut mover, 1000).await;
    eventually("the live update", || async {
        updates_of(&second.lines(), "mover")
            .iter()
            .any(|(_, ram)| *ram == 1000)
            .then_some(())
    })
    .await;
    // Quiet now: once its line is printed, the file names the last event.
    let last = *seqs(&second.lines()).last().expect("events");
    eventually("the last seq in the file", || async {
        (resume_seq(&path) == Some(last)).then_some(())
    })
    .await;
    second.terminate();
    let (code, lines) = second.finished().await;
    assert_eq!(code, Some(0), "stdout:\n{}", lines.join("\n"));
    // Between the two runs every update was printed, at most one twice.
    let mut rams: Vec<u64> = updates_of(&killed_lines, "mover")
        .into_iter()
        .chain(updates_of(&lines, "mover"))
        .map(|(_, ram)| ram)
        .collect();
    let shown = rams.len();
    rams.dedup();
    let expected: Vec<u64> = (1..=u64::from(UPDATES)).chain([1000]).collect();
    assert_eq!(rams, expected);
    assert!(shown - rams.len() <= 1, "{} repeated", shown - rams.len());
    let _ = std::fs::remove_dir_all(path.parent().expect("the test's directory"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_watches_since_a_seq() {
    let server = server_with_watcher(|_| {}).await;
    let mut mover = server.session_as("mover").await;
    set_ram(&mut mover, 77).await;
    let mut shell = Running::start(
        &server.addr.to_string(),
        &["--json", "--keepalive", "0"],
        None,
        true,
    );
    let password = password_for("watcher");
    shell
        .write(&format!(
            "authenticate watcher\n{password}\nwatch vms since 0\n"
        ))
        .await;
    // Made before the watch: it comes from the log.
    shell
        .line_where("the earlier update", |line| {
            updates_of(&[line.to_owned()], "mover")
                .iter()
                .any(|(_, ram)| *ram == 77)
        })
        .await;
    shell.write("quit\n").await;
    let (code, lines) = shell.finished().await;
    assert_eq!(code, Some(0), "stdout:\n{}", lines.join("\n"));
    let reply = watch_reply(&lines).expect("the watch reply");
    assert_eq!(reply["data"]["seq"], 0);
}
