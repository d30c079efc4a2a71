//! `vmm-client top --admin` against two server instances on one database:
//! the live view on a pseudo-terminal shows both, follows a registration
//! made through the other instance, follows the window's size, and puts the
//! terminal back when `q`, Ctrl-C or SIGTERM ends it; elsewhere it prints
//! plain tables (once, or until SIGTERM); without --admin it is a usage
//! error; a lost connection ends it with 3.

mod common;
#[path = "common/pty.rs"]
mod pty;

use std::process::Stdio;
use std::time::{Duration, Instant};

use pty::Terminal;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use vmm_tests::{TestServer, eventually, registration};

const ADMIN: &str = "operator-token-for-top";
/// Each instance writes its figures this often, so that the tests wait
/// little for them.
const PRESENCE: Duration = Duration::from_millis(200);
const ROWS: u16 = 40;
/// The pseudo-terminal's width (see [`Terminal::start`]).
const COLS: u16 = 200;

/// Two instances on one database, named `top-alpha` and `top-beta`.
async fn fleet() -> (TestServer, TestServer) {
    let named = |name: &'static str| {
        move |config: &mut vmm_core::Config| {
            config.admin_token = Some(ADMIN.into());
            config.presence_interval = PRESENCE;
            config.instance_name = name.into();
        }
    };
    let alpha = TestServer::start_with(named("top-alpha")).await;
    let beta = alpha.start_beside(named("top-beta")).await;
    (alpha, beta)
}

/// `vmm-client --addr ADDR ARGS...` with the admin token and nothing from
/// the test's own environment.
fn client(addr: &str, args: &[&str], token: Option<&str>) -> Command {
    Command::from(client_std(addr, args, token))
}

/// [`client`], for the pseudo-terminal.
fn client_std(addr: &str, args: &[&str], token: Option<&str>) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_vmm-client"));
    command
        .args(["--addr", addr])
        .args(args)
        .env_remove("VMM_ADMIN_TOKEN")
        .env_remove("VMM_VM_ID")
        .env_remove("VMM_PASSWORD")
        .env_remove("VMM_KEEPALIVE");
    if let Some(token) = token {
        command.env("VMM_ADMIN_TOKEN", token);
    }
    command
}

/// What the terminal shows after the bytes from `from` on, for a screen of
/// `rows` by `cols`: the rows of text, as a terminal would lay them out.
fn shown(terminal: &Terminal, from: usize, rows: u16, cols: u16) -> Vec<String> {
    let text = terminal.screen.text();
    let size = |n: u16| std::num::NonZeroU16::new(n).expect("a screen size above 0");
    let mut parser = vt100::Parser::new(size(rows), size(cols), 0);
    parser.process(text.as_bytes().get(from..).unwrap_or_default());
    parser.screen().rows(0, cols).collect()
}

/// The words of the first row that holds `what` (the borders' `│` too).
fn row_of(rows: &[String], what: &str) -> Option<Vec<String>> {
    let row = rows.iter().find(|row| row.contains(what))?;
    Some(row.split_whitespace().map(str::to_owned).collect())
}

/// The open connections an instance's row shows.
fn connections(rows: &[String], instance: &str) -> Option<String> {
    row_of(rows, &format!("│{instance} "))?.get(4).cloned()
}

#[tokio::test]
async fn the_live_view_shows_both_instances_and_follows_a_registration() {
    let (alpha, beta) = fleet().await;
    let command = client_std(
        &alpha.addr.to_string(),
        &["--admin", "top", "--interval", "0.2"],
        Some(ADMIN),
    );
    let mut terminal = Terminal::start(command, ROWS);
    // The view takes the alternate screen, leaving the shell's as it was.
    terminal.screen.wait_for("\x1b[?1049h", 0).await;

    // Both instances, each with its figures (the view's own operator
    // session on alpha, nothing on beta yet), their totals and the events'
    // pane. The bytes are read as they come, so a reading may catch a frame
    // half drawn: everything is looked for in the same reading, until one
    // has it all.
    let heading = format!("vmm top  {}  2 instances", alpha.addr);
    eventually("both instances on the screen", || async {
        let rows = shown(&terminal, 0, ROWS, COLS);
        let alpha = connections(&rows, "top-alpha")?;
        let beta = connections(&rows, "top-beta")?;
        let screen = rows.join("\n");
        (alpha == "1"
            && beta == "0"
            && rows[0].starts_with(&heading)
            && screen.contains("│total ")
            && screen.contains("┌latest events"))
        .then_some(())
    })
    .await;

    // A VM registers through beta: its connection, its command and its
    // event all show, though the view is connected to alpha.
    let mut vm = beta.client().await;
    vm.register(&registration("fresh-vm", 64, vec![10]))
        .await
        .expect("register fresh-vm");
    eventually("the registration on the screen", || async {
        let rows = shown(&terminal, 0, ROWS, COLS);
        // The register row: rates and a p99 in milliseconds.
        let register = row_of(&rows, "│register ")?;
        let figures = register.len() == 5 && register[3].parse::<f64>().is_ok();
        let event = rows
            .iter()
            .any(|row| row.contains("vm_registered fresh-vm ram=64 cpu=1 disks="));
        (connections(&rows, "top-beta")? == "1" && figures && event).then_some(())
    })
    .await;
    drop(vm);

    // A smaller window: the view is drawn again to its size.
    let resized_at = terminal.screen.text().len();
    terminal.resize(24, 100);
    eventually("the view redrawn 100 columns wide", || async {
        let rows = shown(&terminal, resized_at, 24, 100);
        let top = rows.get(1)?;
        (top.starts_with("┌instances") && top.chars().count() == 100 && top.ends_with('┐'))
            .then_some(())
    })
    .await;
    eventually("both instances after the resize", || async {
        let rows = shown(&terminal, resized_at, 24, 100);
        (connections(&rows, "top-alpha").is_some() && connections(&rows, "top-beta").is_some())
            .then_some(())
    })
    .await;

    // `q` quits with 0, and the terminal is as it was: the main screen
    // back, the cursor shown.
    // (What it wrote last may reach the test after its exit.)
    let before_quit = terminal.screen.text().len();
    terminal.typing("q");
    let status = terminal.exited().await;
    assert!(status.success(), "{status:?}");
    let left = terminal.screen.wait_for("\x1b[?1049l", before_quit).await;
    terminal.screen.wait_for("\x1b[?25h", left).await;
}

#[tokio::test]
async fn ctrl_c_and_sigterm_end_the_live_view_too() {
    let (alpha, _beta) = fleet().await;
    for how in ["Ctrl-C", "SIGTERM"] {
        let command = client_std(&alpha.addr.to_string(), &["--admin", "top"], Some(ADMIN));
        let mut terminal = Terminal::start(command, ROWS);
        eventually("the view", || async {
            connections(&shown(&terminal, 0, ROWS, COLS), "top-beta")
        })
        .await;
        if how == "Ctrl-C" {
            // Raw mode: Ctrl-C reaches the view as a key, not as SIGINT.
            terminal.typing("\x03");
        } else {
            let killed = std::process::Command::new("kill")
                .args(["-TERM", &terminal.child.id().to_string()])
                .status()
                .expect("run kill");
            assert!(killed.success());
        }
        let status = terminal.exited().await;
        assert!(status.success(), "{how}: {status:?}");
        terminal.screen.wait_for("\x1b[?1049l", 0).await;
    }
}

#[tokio::test]
async fn without_a_terminal_top_prints_plain_tables() {
    let (alpha, _beta) = fleet().await;
    let addr = alpha.addr.to_string();

    let run = common::run(
        client(&addr, &["--admin", "top", "--once"], Some(ADMIN)),
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out = &run.stdout;
    assert_eq!(out.matches("== vmm top ").count(), 1, "{out}");
    assert!(out.contains(": 2 instances ==\n"), "{out}");
    for what in ["| top-alpha ", "| top-beta ", "| total "] {
        assert!(out.contains(what), "{what}: {out}");
    }
    assert!(
        !out.contains('\x1b'),
        "escape sequences in a plain table: {out}"
    );

    // --json: the stats reply, one line.
    let run = common::run(
        client(&addr, &["--json", "--admin", "top", "--once"], Some(ADMIN)),
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let reply: Value = serde_json::from_str(run.stdout.trim_end()).expect("one JSON line");
    let names: Vec<&str> = reply["data"]["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|instance| instance["name"].as_str())
        .collect();
    assert_eq!(names, ["top-alpha", "top-beta"], "{reply}");

    // Without --once: a table per refresh, each flushed as it is made,
    // until SIGTERM, which ends the run with 0.
    let mut command = client(&addr, &["--admin", "top", "--interval", "0.1"], Some(ADMIN));
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("start vmm-client");
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let mut refreshes = 0;
    let deadline = Instant::now() + vmm_tests::PATIENCE;
    while refreshes < 2 {
        assert!(Instant::now() < deadline, "two refreshes in time");
        let line = tokio::time::timeout(vmm_tests::PATIENCE, lines.next_line())
            .await
            .expect("a line in time")
            .expect("stdout")
            .expect("a refresh before the end");
        if line.starts_with("== vmm top ") {
            refreshes += 1;
        }
    }
    let pid = child.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let status = tokio::time::timeout(vmm_tests::PATIENCE, child.wait())
        .await
        .expect("exits in time")
        .expect("exit status");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn top_is_for_operators() {
    let (alpha, _beta) = fleet().await;
    let addr = alpha.addr.to_string();
    let run = common::run(client(&addr, &["top", "--once"], Some(ADMIN)), None).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("--admin"), "{}", run.stderr);

    let run = common::run(client(&addr, &["--admin", "top", "--once"], None), None).await;
    assert_eq!(run.code, 2, "no token: {}", run.stderr);

    let run = common::run(
        client(&addr, &["--admin", "top", "--once"], Some("not-the-token")),
        None,
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("invalid_credentials"), "{}", run.stderr);

    let run = common::run(
        client(&addr, &["--admin", "top", "--interval", "0"], Some(ADMIN)),
        None,
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.stderr);
}

#[tokio::test]
async fn a_lost_connection_ends_top_with_3() {
    let (alpha, beta) = fleet().await;
    let mut command = client(
        &alpha.addr.to_string(),
        &["--admin", "top", "--interval", "0.1"],
        Some(ADMIN),
    );
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("start vmm-client");
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let first = tokio::time::timeout(vmm_tests::PATIENCE, lines.next_line())
        .await
        .expect("a line in time")
        .expect("stdout");
    assert!(
        first.is_some_and(|line| line.starts_with("== vmm top ")),
        "no first refresh"
    );
    alpha.shutdown().await;
    let out = tokio::time::timeout(vmm_tests::PATIENCE, child.wait_with_output())
        .await
        .expect("exits in time")
        .expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    drop(beta);
}

#[tokio::test]
async fn a_lost_connection_ends_the_live_view_with_3_and_the_terminal_back() {
    let (alpha, _beta) = fleet().await;
    let command = client_std(&alpha.addr.to_string(), &["--admin", "top"], Some(ADMIN));
    let mut terminal = Terminal::start(command, ROWS);
    eventually("the view", || async {
        connections(&shown(&terminal, 0, ROWS, COLS), "top-beta")
    })
    .await;
    let before = terminal.screen.text().len();
    alpha.shutdown().await;
    let status = terminal.exited().await;
    assert_eq!(status.code(), Some(3), "{status:?}");
    // The main screen is back before the error is printed, so the error
    // stays on it.
    let left = terminal.screen.wait_for("\x1b[?1049l", before).await;
    terminal.screen.wait_for("error: ", left).await;
}
