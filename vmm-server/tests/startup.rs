//! Starting `vmm-server` as a newcomer does: what it says when the database
//! cannot be used, where its logs go, and which addresses it listens on.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm_tests::{RawConn, TestDb, ok, with_database, with_user};

const SERVER: &str = env!("CARGO_BIN_EXE_vmm-server");

/// The server, run with `args` on `database_url`, to its exit: its exit
/// code, stderr and stdout, and how long it took.
fn run_to_exit(database_url: &str, args: &[&str]) -> (Option<i32>, String, String, Duration) {
    let started = Instant::now();
    let output = Command::new(SERVER)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("RUST_LOG")
        .output()
        .expect("run vmm-server");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn a_missing_database_or_user_fails_at_once_naming_it() {
    let db = TestDb::create().await;
    for (url, named) in [
        (
            with_database(&db.url, "vmm_no_such_database"),
            "database \"vmm_no_such_database\" does not exist",
        ),
        (
            with_user(&db.url, "vmm_no_such_user"),
            "role \"vmm_no_such_user\" does not exist",
        ),
    ] {
        let (code, stderr, _, took) = run_to_exit(&url, &[]);
        assert_eq!(code, Some(1), "{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
        assert_eq!(errors.len(), 1, "one line says why: {stderr}");
        assert!(errors[0].contains(named), "{stderr}");
        assert!(
            !stderr.contains("retrying") && !stderr.contains("Error occurred"),
            "waiting cannot fix it, and the pool's boilerplate is not shown: {stderr}"
        );
        // Without retries this takes milliseconds; the old behaviour took 30 s.
        assert!(took < Duration::from_secs(5), "took {took:?}: {stderr}");
    }
}

#[tokio::test]
async fn an_address_without_a_port_is_a_usage_error() {
    let db = TestDb::create().await;
    let started = Instant::now();
    let output = Command::new(SERVER)
        .args(["--listen", "127.0.0.1"])
        .env("DATABASE_URL", &db.url)
        .output()
        .expect("run vmm-server");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("HOST:PORT"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// A running server whose stderr is read line by line.
struct Running {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn start(db: &TestDb, listen: &str) -> Running {
        let mut child = Command::new(SERVER)
            .args(["--listen", listen])
            .env("DATABASE_URL", &db.url)
            .env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vmm-server");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Lines up to the one containing `marker`.
    fn until(&mut self, marker: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(marker) {
                        return line;
                    }
                }
                Err(_) => panic!("no {marker:?} in the log: {:#?}", self.seen),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn logs_go_to_stderr_without_colour_and_each_migration_once() {
    let db = TestDb::create().await;
    let mut server = Running::start(&db, "127.0.0.1:0");
    server.until("listening");
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations"))
        .expect("the migrations directory")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".sql"))
        .map(|name| name.trim_end_matches(".sql").to_owned())
        .collect::<Vec<_>>();
    assert!(!migrations.is_empty());
    for migration in &migrations {
        let lines = server
            .seen
            .iter()
            .filter(|line| line.contains(migration.as_str()))
            .count();
        assert_eq!(lines, 1, "{migration}: {:#?}", server.seen);
    }
    for line in &server.seen {
        assert!(!line.contains('\x1b'), "a colour code in a pipe: {line:?}");
    }
    // Nothing on stdout: it is not where logs go.
    let _ = server.child.kill();
    let _ = server.child.wait();
    let mut stdout = String::new();
    std::io::Read::read_to_string(server.child.stdout.as_mut().expect("stdout"), &mut stdout)
        .expect("read stdout");
    assert_eq!(stdout, "");
}

#[tokio::test]
async fn it_listens_on_a_host_name() {
    let db = TestDb::create().await;
    let mut server = Running::start(&db, "localhost:0");
    let line = server.until("listening");
    // `address=127.0.0.1:PORT` or `address=[::1]:PORT`.
    let address = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("address="))
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let mut conn = RawConn::connect(address.parse().expect("an address")).await;
    let reply = conn.call(serde_json::json!({"command": "ping"})).await;
    ok(&reply);
}
