//! `vmm-client agent` against a live server: it registers and authenticates,
//! comes back by itself after the server restarts, logs out and exits 0 on
//! SIGTERM, and gives up (exit 1) on a wrong password.

use std::process::Stdio;
use std::time::{Duration, Instant};

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use vmm_core::Client;
use vmm_core::protocol::Timestamp;
use vmm_tests::{TestServer, eventually, password_for, registration};

const AGENT: &str = "agent-vm";

/// The agent's `--backoff-max`.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The agent's stderr so far, and the task that collects it until it ends.
struct Stderr {
    so_far: Arc<std::sync::Mutex<String>>,
    reader: JoinHandle<()>,
}

impl Stderr {
    fn contains(&self, text: &str) -> bool {
        self.so_far
            .lock()
            .map(|so_far| so_far.contains(text))
            .unwrap_or(false)
    }
}

/// Starts the agent with `args` after `agent`, `password` in `VMM_PASSWORD`
/// (none: unset), and stderr collected until it exits.
fn start_agent(addr: &str, args: &[&str], password: Option<&str>) -> (Child, Stderr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmm-client"));
    command
        .args(["--addr", addr, "agent"])
        .args(args)
        .env_remove("VMM_PASSWORD")
        .env_remove("VMM_VM_ID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(password) = password {
        command.env("VMM_PASSWORD", password);
    }
    let mut child = command.spawn().expect("start the agent");
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    let so_far = Arc::new(std::sync::Mutex::new(String::new()));
    let collected = Arc::clone(&so_far);
    let reader = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(mut text) = collected.lock() {
                text.push_str(&line);
                text.push('\n');
            }
        }
    });
    (child, Stderr { so_far, reader })
}

/// Waits (bounded) for the agent to exit; its exit code and stderr.
async fn finished(mut child: Child, stderr: Stderr) -> (Option<i32>, String) {
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the agent exits in time")
        .expect("the agent's exit status");
    tokio::time::timeout(Duration::from_secs(10), stderr.reader)
        .await
        .expect("the agent's stderr ends")
        .expect("the stderr reader");
    let text = stderr.so_far.lock().map(|text| text.clone());
    (status.code(), text.expect("the collected stderr"))
}

/// Sends SIGTERM to the agent.
fn terminate(child: &Child) {
    let pid = child.id().expect("the agent is running");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
}

/// A connection authenticated as a VM of its own, to look at the lists.
async fn observer(server: &TestServer) -> Mutex<Client> {
    let mut client = server.client().await;
    client
        .authenticate("observer", &password_for("observer"))
        .await
        .expect("the observer authenticates");
    Mutex::new(client)
}

/// When `vm_id` last authenticated on a connection that still is, if it is.
async fn authenticated_at(observer: &Mutex<Client>, vm_id: &str) -> Option<Timestamp> {
    let sessions = observer
        .lock()
        .await
        .list_authenticated()
        .await
        .expect("list authenticated_vms");
    sessions
        .into_iter()
        .filter(|session| session.vm.vm_id == vm_id)
        .map(|session| session.authenticated_at)
        .max()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reconnects_after_a_restart_and_logs_out_on_sigterm() {
    let mut server = TestServer::start().await;
    let addr = server.addr.to_string();
    server
        .client()
        .await
        .register(&registration("observer", 256, vec![]))
        .await
        .expect("register the observer");
    let password = password_for(AGENT);
    let (child, stderr) = start_agent(
        &addr,
        &[
            "--vm-id",
            AGENT,
            "--ram",
            "512",
            "--cpu",
            "2",
            "--disk",
            "10",
            "--ping-interval",
            "0.2",
            "--backoff-initial",
            "0.1",
            "--backoff-max",
            "1",
        ],
        Some(&password),
    );

    let watch = observer(&server).await;
    let first = eventually("the agent to authenticate", || async {
        authenticated_at(&watch, AGENT).await
    })
    .await;
    drop(watch);

    // Down for 1.5 s, so that the agent's attempts fail and back off.
    server
        .restart(async { tokio::time::sleep(Duration::from_millis(1500)).await })
        .await;
    let back = Instant::now();

    // The observer's connection died with the old server.
    let watch = observer(&server).await;
    eventually("the agent to authenticate again", || async {
        authenticated_at(&watch, AGENT)
            .await
            .filter(|at| *at > first)
    })
    .await;
    let took = back.elapsed();
    // Once the server is back, the agent's next attempt comes within one
    // backoff step, which is at most --backoff-max; the 2 s on top are
    // generous slack for a loaded test machine (authentication hashes the
    // password, the observer reconnects and polls), not a measured latency.
    assert!(
        took < BACKOFF_MAX + Duration::from_secs(2),
        "the agent took {took:?} to come back after the server did"
    );

    terminate(&child);
    let (code, stderr) = finished(child, stderr).await;
    // Shown with --nocapture, or when the test fails.
    println!("the agent's stderr:\n{stderr}");
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    eventually("the agent to be logged out", || async {
        authenticated_at(&watch, AGENT)
            .await
            .is_none()
            .then_some(())
    })
    .await;

    assert!(stderr.contains("registered"), "stderr:\n{stderr}");
    assert!(stderr.contains("retrying in"), "stderr:\n{stderr}");
    let connections = stderr.matches("connected to").count();
    assert!(connections >= 2, "stderr:\n{stderr}");
    assert!(stderr.contains("logged out, exiting"), "stderr:\n{stderr}");
    assert!(
        stderr.contains("resumed the session with its token"),
        "after the restart the agent resumes with its token, without a password hash:\n{stderr}"
    );
    assert!(
        !stderr.contains(&password),
        "the password is logged:\n{stderr}"
    );
    for line in stderr.lines() {
        assert!(
            line.contains(&format!(" agent {AGENT}: ")),
            "not a log line: {line}"
        );
        let stamp = line.split(' ').next().unwrap_or_default();
        assert!(
            humantime::parse_rfc3339(stamp).is_ok(),
            "not an RFC 3339 UTC time: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_gives_up_on_a_wrong_password() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    server
        .client()
        .await
        .register(&registration("taken", 256, vec![]))
        .await
        .expect("register the VM");
    let wrong = "not-the-password";

    // With and without --ram/--cpu (then `register` answers already_exists,
    // which is fine, and `authenticate` fails).
    let with_registration = ["--vm-id", "taken", "--ram", "512", "--cpu", "1"];
    for args in [&with_registration[..], &["--vm-id", "taken"][..]] {
        let (child, stderr) = start_agent(&addr, args, Some(wrong));
        let (code, stderr) = finished(child, stderr).await;
        assert_eq!(code, Some(1), "{args:?}: stderr:\n{stderr}");
        assert!(stderr.contains("invalid_credentials"), "stderr:\n{stderr}");
        assert!(!stderr.contains(wrong), "the password is logged:\n{stderr}");
    }

    // A VM that does not exist, and nothing to register it with: 1 too.
    let (child, stderr) = start_agent(&addr, &["--vm-id", "nobody"], Some(wrong));
    let (code, stderr) = finished(child, stderr).await;
    assert_eq!(code, Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains("--ram"), "a hint to register: {stderr}");

    // No password at all: a usage error.
    let (child, stderr) = start_agent(&addr, &["--vm-id", "taken"], None);
    let (code, stderr) = finished(child, stderr).await;
    assert_eq!(code, Some(2), "stderr:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_while_disconnected_exits_0() {
    // A port that nothing listens on.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .to_string();
    let args = ["--vm-id", "lonely", "--backoff-initial", "0.1"];
    let (child, stderr) = start_agent(&addr, &args, Some("a-fine-password"));
    // Its signal handlers are installed before it logs anything.
    eventually("the agent to back off", || async {
        stderr.contains("retrying in").then_some(())
    })
    .await;
    terminate(&child);
    let (code, stderr) = finished(child, stderr).await;
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    assert!(stderr.contains("received SIGTERM"), "stderr:\n{stderr}");
}
