//! `vmm-client watch` and the shell's `watch` against a live server: events
//! are printed as they happen, in order, in either format; SIGTERM ends the
//! one-shot command with 0, a lost connection with 3, and keepalive pings
//! hold an idle watcher's connection open.

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
        let pid = self.child.id().expect("vmm-client is running");
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
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
