//! Issue 7, the spare descriptor: with its process out of descriptors (so
//! that `accept` fails with `EMFILE`), the server still answers every client
//! waiting to be accepted, `server_busy`, instead of leaving it in the
//! listen backlog, and logs `EMFILE` at most once a second, with a count.
//! Then, with descriptors free again, it serves as before.
//!
//! This file is a test binary of its own with one test: it lowers its
//! process's open-file limit, fills the descriptor table, and owns the
//! global log subscriber.

use std::fs::File;

use serde_json::json;
use vmm_tests::{Answer, TestServer, at_most_one_a_second, eventually, ok, ping_or_busy};

/// Clients waiting while the server is out of descriptors.
const CLIENTS: usize = 50;

/// Opens `/dev/null` until the process has no descriptor left.
fn fill_the_table() -> Vec<File> {
    let mut files = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(file) => files.push(file),
            Err(err) if err.raw_os_error() == Some(24) => return files, // EMFILE
            Err(err) => panic!("cannot open /dev/null: {err}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_waiting_clients_are_refused_not_left_hanging() {
    let logs = vmm_tests::CapturedLog::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter("warn")
        .with_writer(move || writer.clone())
        .init();
    // A low limit, so that filling the table is quick.
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    rlimit::setrlimit(rlimit::Resource::NOFILE, soft.min(512), hard).unwrap();

    let server = TestServer::start_with(|config| {
        config.db_pool_size = 2;
        config.max_connections_per_ip = 10_000;
    })
    .await;
    let mut first = server.raw().await;
    ok(&first.call(json!({"command": "ping"})).await);

    // The clients' sockets, made while descriptors are free; connecting
    // them needs none.
    let sockets: Vec<tokio::net::TcpSocket> = (0..CLIENTS)
        .map(|_| tokio::net::TcpSocket::new_v4().unwrap())
        .collect();
    let filler = fill_the_table();
    assert!(File::open("/dev/null").is_err(), "the table is full");

    let mut clients = tokio::task::JoinSet::new();
    for socket in sockets {
        let addr = server.addr;
        clients.spawn(async move {
            let stream = socket.connect(addr).await.expect("connected");
            ping_or_busy(stream).await
        });
    }
    let answers = clients.join_all().await;
    assert_eq!(answers.len(), CLIENTS, "every client got a reply");
    assert!(
        answers.iter().all(|(answer, _)| *answer == Answer::Busy),
        "with no descriptor free nobody is served: {answers:?}"
    );
    // The connection served before is not disturbed.
    ok(&first.call(json!({"command": "ping"})).await);

    // Every EMFILE is counted (one per refused client, and one more each
    // time the backlog ran empty), in at most one line a second.
    let counted = eventually("every EMFILE counted in the log", || async {
        let log = logs.entries();
        let lines = at_most_one_a_second(&log, "EMFILE");
        let counted: u64 = lines
            .iter()
            .map(|line| line["fields"]["count"].as_u64().unwrap_or(0))
            .sum();
        (counted >= CLIENTS as u64).then_some(counted)
    })
    .await;
    // More would mean that the accept loop spun on EMFILE.
    assert!(counted <= 2 * CLIENTS as u64, "{counted} EMFILE");
    eprintln!("{CLIENTS} clients refused, {counted} EMFILE counted");

    drop(answers);
    drop(filler);
    // With descriptors free, clients are served again.
    let mut later = server.raw().await;
    ok(&later.call(json!({"command": "ping"})).await);
    let log = logs.entries();
    let lines = at_most_one_a_second(&log, "EMFILE");
    assert!(
        lines.iter().all(|line| line["level"] == "WARN"),
        "{lines:?}"
    );
    server.shutdown().await;
}
