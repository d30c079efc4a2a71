//! Done-when 7 of issue 7: under a soft open-file limit of 200 and
//! `--max-connections 10000`, 300 clients at once each get `PONG` or
//! `server_busy`, and the log has at most one `EMFILE` line a second. Runs
//! the real `vmm-server` binary under `sh -c 'ulimit ...; exec'`.

use std::process::Command;
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::Barrier;
use vmm_tests::{Answer, ServerProcess, TestDb, at_most_one_a_second, eventually, ping_or_busy};

const CLIENTS: usize = 300;

/// `vmm-server` with the open-file limit set by `ulimit` first.
fn under_ulimit(ulimit: &str) -> Command {
    let mut command = Command::new("sh");
    command.args([
        "-c",
        &format!("{ulimit} && exec \"$0\" \"$@\""),
        env!("CARGO_BIN_EXE_vmm-server"),
    ]);
    command
}

async fn start(ulimit: &str, db: &TestDb) -> ServerProcess {
    // The clients need their own 300 descriptors here.
    vmm_core::descriptors::raise_limit().expect("the test's own limit can be raised");
    let args = [
        "--max-connections",
        "10000",
        "--max-connections-per-ip",
        "10000",
        "--db-pool-size",
        "4",
    ];
    ServerProcess::spawn_command(under_ulimit(ulimit), db, &args).await
}

/// 300 clients connect at once and ping; what each got. They stay
/// connected until all have their reply, as VMs would, so that served
/// clients do not make room for the others.
async fn flood(server: &ServerProcess) -> Vec<Answer> {
    let addr = server.addr;
    let start = Arc::new(Barrier::new(CLIENTS));
    let replied = Arc::new(Barrier::new(CLIENTS));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (start, replied) = (Arc::clone(&start), Arc::clone(&replied));
        clients.spawn(async move {
            start.wait().await;
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .expect("connected (the listen backlog has room)");
            let (answer, stream) = ping_or_busy(stream).await;
            replied.wait().await;
            drop(stream);
            answer
        });
    }
    clients.join_all().await
}

/// Stops the server and returns its whole log.
async fn stop(server: ServerProcess) -> Vec<Value> {
    server.signal("TERM");
    eventually("the server logs that it stopped", || async {
        let log = server.log();
        log.iter()
            .any(|entry| entry["fields"]["message"] == "stopped")
            .then_some(())
    })
    .await;
    let log = server.log();
    let exit = server.wait().await;
    assert!(exit.success(), "vmm-server exited with {exit}");
    log
}

fn message<'a>(log: &'a [Value], starts: &str) -> Option<&'a Value> {
    log.iter().find(|entry| {
        entry["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with(starts))
    })
}

fn check(answers: &[Answer], log: &[Value]) {
    assert_eq!(answers.len(), CLIENTS, "every client got a reply");
    let pongs = answers.iter().filter(|a| **a == Answer::Pong).count();
    assert!(pongs > 0, "some clients were served: {answers:?}");
    at_most_one_a_second(log, "too many open files");
    eprintln!("{pongs} PONG, {} server_busy", answers.len() - pongs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_limit_200_lowers_the_connection_limit() {
    let db = TestDb::create().await;
    let server = start("ulimit -S -n 200 && ulimit -H -n 200", &db).await;
    let answers = flood(&server).await;
    let log = stop(server).await;
    check(&answers, &log);
    let lowered = message(&log, "the connection limit does not fit")
        .unwrap_or_else(|| panic!("the lowering is logged: {log:#?}"));
    assert_eq!(lowered["level"], "WARN");
    assert_eq!(lowered["fields"]["max_connections"], 10_000);
    assert_eq!(lowered["fields"]["open_file_limit"], 200);
    let to = lowered["fields"]["lowered_to"].as_u64().unwrap_or(0);
    assert!((1..200).contains(&to), "lowered to {to}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_limit_200_is_raised_to_the_hard_limit() {
    let hard = vmm_core::descriptors::raise_limit()
        .expect("the test's own limit can be raised")
        .hard;
    assert!(
        hard >= 400,
        "this test needs a hard open-file limit well above 200 to raise to, not {hard}"
    );
    let db = TestDb::create().await;
    let server = start("ulimit -S -n 200", &db).await;
    let answers = flood(&server).await;
    let log = stop(server).await;
    check(&answers, &log);
    let raised = message(&log, "raised the open-file limit")
        .unwrap_or_else(|| panic!("the raise is logged: {log:#?}"));
    assert_eq!(raised["fields"]["from"], 200);
    assert_eq!(raised["fields"]["to"], hard);
}
