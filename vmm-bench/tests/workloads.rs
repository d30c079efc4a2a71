//! Every workload, briefly, through the library against a real server (in
//! this process, on its own database): requests are made and answered
//! without errors, seeding is idempotent and what it seeds is listed.

use std::time::Duration;

use clap::Parser;
use vmm_bench::{Cli, Report};
use vmm_tests::{PATIENCE, TestServer};

const ADMIN: &str = "bench-admin-token-0123456789";

async fn bench(server: &TestServer, args: &[&str]) -> Report {
    let addr = server.addr.to_string();
    let mut argv = vec!["vmm-bench", "--addr", &addr];
    argv.extend(args);
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|err| panic!("{argv:?}: {err}"));
    tokio::time::timeout(PATIENCE * 4, vmm_bench::run(cli))
        .await
        .unwrap_or_else(|_| panic!("{argv:?} did not finish in time"))
        .unwrap_or_else(|err| panic!("{argv:?} failed: {err}"))
}

/// Rows were measured, with requests and no errors; server rows carry the
/// RSS figures (found by port, here this test's own process).
#[track_caller]
fn clean(report: &Report, rows: usize) {
    assert!(report.failures.is_empty(), "{}", report.table());
    assert_eq!(report.rows.len(), rows, "{}", report.table());
    for row in &report.rows {
        assert!(row.requests > 0, "{row:?}");
        assert_eq!(row.errors, 0, "{row:?}");
        assert!(row.bytes_per_reply.is_some_and(|b| b > 0.0), "{row:?}");
        assert!(row.p50_ms.is_some() && row.p99_ms.is_some() && row.max_ms.is_some());
        assert_eq!(row.rss.is_some(), row.target == "server", "{row:?}");
    }
    assert_eq!(report.server_pid, Some(std::process::id()));
    serde_json::from_str::<serde_json::Value>(&report.json()).expect("the JSON document parses");
}

async fn server() -> TestServer {
    TestServer::start_with(|config| {
        config.admin_token = Some(ADMIN.into());
        // Logins re-hash the seeded password at this cost once, then are cheap.
        config.hash_cost = vmm_core::password::HashCost {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
        };
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_vms_are_listed_by_every_list_workload() {
    let server = server().await;
    let url = server.db.url.clone();

    // Seeding straight into the tables; the seeded VMs are listed.
    let seeded = bench(
        &server,
        &[
            "all_vms",
            "--seed",
            "50",
            "--direct-db",
            &url,
            "--count",
            "3",
        ],
    )
    .await;
    clean(&seeded, 1);
    assert_eq!(seeded.seeding[0].added, 50);
    assert_eq!(seeded.rows[0].requests, 3);
    // 50 seeded VMs and the bench's reader.
    assert_eq!(
        seeded.rows[0].items_per_reply,
        Some(51),
        "{}",
        seeded.table()
    );
    let mut observer = server.session_as("test-observer").await;
    let all = observer.list_all().await.expect("all_vms");
    let bench_vms: Vec<_> = all
        .iter()
        .filter(|vm| vm.vm.vm_id.starts_with("bench-seed-"))
        .collect();
    assert_eq!(bench_vms.len(), 50);
    assert!(bench_vms.iter().all(|vm| vm.vm.disks.len() == 2));
    // And analysed, as autovacuum would have: `COPY` leaves `reltuples` at
    // -1, "never counted", and the lists' plans with it.
    let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(connection);
    let counted = db
        .query_one(
            "SELECT (SELECT reltuples FROM pg_class WHERE oid = 'vms'::regclass), \
                    (SELECT reltuples FROM pg_class WHERE oid = 'disks'::regclass)",
            &[],
        )
        .await
        .expect("read the tables' statistics");
    let (vms, disks): (f32, f32) = (counted.get(0), counted.get(1));
    assert!(
        vms >= 50.0 && disks >= 100.0,
        "reltuples: vms {vms}, disks {disks}"
    );

    // Again: nothing to add.
    let again = bench(
        &server,
        &[
            "all_disks",
            "--seed",
            "50",
            "--direct-db",
            &url,
            "--count",
            "2",
        ],
    )
    .await;
    clean(&again, 1);
    assert_eq!((again.seeding[0].existing, again.seeding[0].added), (50, 0));
    assert_eq!(again.rows[0].items_per_reply, Some(100));

    // Every page, 7 entries a page: 52 VMs (the seeded, the bench's reader
    // and this test's observer) in 8 pages, 100 disks in 15,
    // each once and as many as the full lists.
    let pages = bench(
        &server,
        &["pages", "--lists", "all_vms,all_disks", "--page-size", "7"],
    )
    .await;
    clean(&pages, 2);
    let walked: Vec<_> = pages
        .rows
        .iter()
        .map(|row| (row.workload.as_str(), row.requests))
        .collect();
    assert_eq!(walked, [("all_vms pages", 8), ("all_disks pages", 15)]);
    for expected in [
        "all_vms in pages of 7: 52 entries in 8 pages, each exactly once",
        "all_disks in pages of 7: 100 entries in 15 pages, each exactly once",
    ] {
        assert!(
            pages.notes.iter().any(|note| note.starts_with(expected)),
            "{expected}: {:?}",
            pages.notes
        );
    }

    // Every list at once as the operator, with a ping beside.
    let lists = bench(
        &server,
        &[
            "lists",
            "--lists",
            "active_vms,authenticated_vms,all_vms,all_disks",
            "--conns",
            "4",
            "--secs",
            "0.3",
            "--ping-beside",
            "--admin-token",
            ADMIN,
        ],
    )
    .await;
    clean(&lists, 5);
    assert_eq!(lists.rows[4].workload, "ping beside");
    assert!(lists.notes.iter().any(|n| n.starts_with("ping beside")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_against_the_limit_and_idle_connections() {
    let server = server().await;
    let ping = bench(
        &server,
        &["ping", "--conns", "2", "--pipeline", "4", "--secs", "0.3"],
    )
    .await;
    clean(&ping, 2);
    assert_eq!(ping.rows[0].target, "limit");
    assert!(ping.rows[1].ratio_to_limit.is_some_and(|r| r > 0.0));

    let idle = bench(&server, &["idle", "--conns", "20"]).await;
    clean(&idle, 1);
    assert_eq!(idle.rows[0].requests, 20);
    assert!(idle.notes.iter().any(|n| n.contains("per connection")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_authenticate_and_update() {
    let server = server().await;
    let register = bench(&server, &["register", "--count", "5", "--conns", "2"]).await;
    clean(&register, 1);
    assert_eq!(register.rows[0].requests, 5);
    assert!(
        register
            .notes
            .iter()
            .any(|n| n.starts_with("register: 5 VMs"))
    );

    // Password logins as VMs the bench seeds through `register` first.
    let auth = bench(&server, &["authenticate", "--conns", "2", "--secs", "0.5"]).await;
    clean(&auth, 1);
    assert_eq!(
        (auth.seeding[0].how, auth.seeding[0].added),
        ("register", 2)
    );

    let update = bench(&server, &["update", "--conns", "2", "--secs", "0.3"]).await;
    clean(&update, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_not_there_is_named_as_such() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let cli = Cli::try_parse_from([
        "vmm-bench",
        "--addr",
        &addr,
        "ping",
        "--no-limit",
        "--timeout",
        "5",
    ])
    .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), vmm_bench::run(cli))
        .await
        .expect("no hang")
        .expect_err("nothing to measure");
    assert!(
        err.0.contains(&format!("cannot connect to {addr}"))
            && err.0.contains("is vmm-server running?"),
        "{err}"
    );
}

/// `run_blocking` (what the binary calls) on a thread of its own, as the
/// binary's main thread: with --split-cpus it pins that thread. The CPUs
/// the thread ends up on come back with the outcome.
async fn bench_on_own_runtime(
    server: &TestServer,
    args: &[&str],
) -> (Result<Report, vmm_bench::BenchError>, Vec<usize>) {
    let addr = server.addr.to_string();
    let mut argv = vec!["vmm-bench", "--addr", &addr];
    argv.extend(args);
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|err| panic!("{argv:?}: {err}"));
    let thread = std::thread::spawn(move || {
        let outcome = vmm_bench::run_blocking(cli);
        (outcome, vmm_bench::cpus::allowed().unwrap())
    });
    tokio::time::timeout(
        PATIENCE * 4,
        tokio::task::spawn_blocking(move || thread.join()),
    )
    .await
    .unwrap_or_else(|_| panic!("{argv:?} did not finish in time"))
    .unwrap()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_cpus_puts_the_client_and_the_servers_apart() {
    let server = server().await;
    let allowed = vmm_bench::cpus::allowed().unwrap();
    let args = ["ping", "--split-cpus", "--conns", "2", "--secs", "1"];
    if allowed.len() < 2 {
        let (outcome, _) = bench_on_own_runtime(&server, &args).await;
        let err = outcome.expect_err("no split on one CPU");
        assert!(err.0.contains("at least 2 CPUs"), "{err}");
        return;
    }
    let halves = vmm_bench::cpus::split(&allowed).unwrap();

    // The server is inside this process: the client is pinned, the server
    // (and with it this test) is not.
    let (outcome, client_thread) = bench_on_own_runtime(&server, &args).await;
    let report = outcome.unwrap();
    clean(&report, 2);
    assert_eq!(client_thread, halves.client);
    assert_eq!(vmm_bench::cpus::allowed().unwrap(), allowed);
    let split = report.cpu_split.as_ref().expect("the split is reported");
    assert_eq!(split.client_cpus, halves.client);
    assert_eq!(split.server_cpus, halves.server);
    assert_eq!(split.server_threads_pinned, None);
    assert!(
        split.server.contains("inside the bench's own process"),
        "{}",
        split.server
    );
    let table = report.table();
    assert!(
        table.contains(&format!(
            "CPUs split: bench client on {}, limit and server on {}",
            vmm_bench::report::cpus_named(&halves.client),
            vmm_bench::report::cpus_named(&halves.server)
        )),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
    assert_eq!(
        json["cpu_split"]["client_cpus"],
        serde_json::json!(halves.client)
    );
    assert_eq!(
        json["cpu_split"]["server_cpus"],
        serde_json::json!(halves.server)
    );

    // A server process of its own (named with --server-pid; a stand-in,
    // since the server here is in this process): pinned for the run, its
    // affinity given back after.
    let mut stand_in = std::process::Command::new("sleep")
        .arg("120")
        .spawn()
        .unwrap();
    let before = vmm_bench::cpus::affinity_of(stand_in.id()).unwrap();
    let pid = stand_in.id().to_string();
    let (outcome, _) = bench_on_own_runtime(
        &server,
        &[
            "ping",
            "--split-cpus",
            "--no-limit",
            "--secs",
            "0.3",
            "--server-pid",
            &pid,
        ],
    )
    .await;
    let after = vmm_bench::cpus::affinity_of(stand_in.id()).unwrap();
    stand_in.kill().unwrap();
    stand_in.wait().unwrap();
    let report = outcome.unwrap();
    assert!(report.failures.is_empty(), "{}", report.table());
    let split = report.cpu_split.as_ref().expect("the split is reported");
    assert_eq!(split.server_threads_pinned, Some(1), "{}", split.server);
    assert!(split.server.contains(&format!("server pid {pid}")));
    assert_eq!(after, before);

    // The caller's runtime exists already: the split needs run_blocking.
    let cli = Cli::try_parse_from(["vmm-bench", "--split-cpus", "ping"]).unwrap();
    let err = vmm_bench::run(cli).await.expect_err("not on this runtime");
    assert!(err.0.contains("run_blocking"), "{err}");
}
