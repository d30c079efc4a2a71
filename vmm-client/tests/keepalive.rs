//! The interactive shell keeps its connection open across the server's idle
//! timeout with `--keepalive` pings, and loses it without them.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use vmm_tests::TestServer;

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the shell with `--keepalive keepalive`: `ping`, then nothing for
/// 3 s (three times the server's idle timeout), then `ping` again and the end
/// of the input.
async fn ping_pause_ping(addr: &str, keepalive: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm-client"))
        .args(["--addr", addr, "--keepalive", keepalive])
        .env_remove("VMM_KEEPALIVE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start vmm-client");
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(b"ping\n")
        .await
        .expect("write to the shell");
    // The silence is the behaviour under test, so this sleep is real time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Without keepalive the shell is still running here: it only notices the
    // closed connection when this next request fails.
    stdin
        .write_all(b"ping\n")
        .await
        .expect("write to the shell");
    drop(stdin);
    let out = tokio::time::timeout(vmm_tests::PATIENCE, child.wait_with_output())
        .await
        .expect("the shell finishes")
        .expect("the shell's output");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn server_closing_idle_connections_after_1s() -> TestServer {
    TestServer::start_with(|config| config.idle_timeout = Some(Duration::from_secs(1))).await
}

#[tokio::test]
async fn keepalive_pings_keep_an_idle_shell_connected() {
    let server = server_closing_idle_connections_after_1s().await;
    let run = ping_pause_ping(&server.addr.to_string(), "0.2").await;
    assert_eq!(
        run.code,
        Some(0),
        "stdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    // The keepalive pings' replies are consumed silently: only the two
    // typed pings print.
    let pongs = run.stdout.lines().filter(|line| *line == "PONG").count();
    assert_eq!(pongs, 2, "stdout: {}", run.stdout);
    assert_eq!(run.stdout.lines().count(), 2, "stdout: {}", run.stdout);
}

#[tokio::test]
async fn without_keepalive_the_server_closes_the_idle_shell() {
    let server = server_closing_idle_connections_after_1s().await;
    let run = ping_pause_ping(&server.addr.to_string(), "0").await;
    assert_eq!(
        run.code,
        Some(3),
        "stdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    assert_eq!(run.stdout.lines().collect::<Vec<_>>(), ["PONG"]);
    assert!(
        run.stderr.contains("closed the connection") || run.stderr.contains("lost"),
        "{}",
        run.stderr
    );
}
