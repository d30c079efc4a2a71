//! Load figures for vmm: ping latency under many connections (alone, while
//! passwords are being hashed, and while 2,000 connections open), register
//! and authenticate throughput, update throughput, list latency as the
//! number of VMs grows, and listing 2,000 connections of one instance from
//! another.
//!
//! ```text
//! VMM_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --release -p vmm-tests --example bench -- [CONNECTIONS] [VMS]
//! ```
//!
//! It starts a server in this process on a fresh database (found as the tests
//! find theirs), so it measures the server plus loopback, not a network.
//! Bounded: every loop has a fixed count.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_core::client::{Registration, Update};
use vmm_tests::{TestServer, password_for};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn report(what: &str, mut samples: Vec<Duration>, elapsed: Duration) {
    samples.sort();
    let rate = samples.len() as f64 / elapsed.as_secs_f64();
    println!(
        "{what:<44} n={:<6} {rate:>9.0}/s  p50={:>9.3?}  p99={:>9.3?}  max={:>9.3?}",
        samples.len(),
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        samples.last().copied().unwrap_or_default(),
    );
}

async fn pings(
    server: &TestServer,
    connections: usize,
    per_connection: usize,
) -> (Vec<Duration>, Duration) {
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(server.client().await);
    }
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(per_connection);
                for _ in 0..per_connection {
                    let t = Instant::now();
                    client.ping().await.expect("ping");
                    samples.push(t.elapsed());
                }
                samples
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("ping task"));
    }
    (all, started.elapsed())
}

async fn register_all(
    server: &Arc<TestServer>,
    prefix: &str,
    vms: usize,
    connections: usize,
) -> (Vec<Duration>, Vec<Duration>, Duration) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let server = Arc::clone(server);
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                let mut client = server.client().await;
                let (mut registers, mut authenticates) = (Vec::new(), Vec::new());
                for i in (c..vms).step_by(connections) {
                    let vm_id = format!("{prefix}-{i}");
                    let t = Instant::now();
                    client
                        .register(&Registration {
                            vm_id: vm_id.clone(),
                            ram: 1024,
                            cpu: 2,
                            password: password_for(&vm_id),
                            disks: vec![10, 20],
                            registration_secret: None,
                        })
                        .await
                        .expect("register");
                    registers.push(t.elapsed());
                    let t = Instant::now();
                    client
                        .authenticate(&vm_id, &password_for(&vm_id))
                        .await
                        .expect("authenticate");
                    authenticates.push(t.elapsed());
                }
                (registers, authenticates)
            })
        })
        .collect();
    let (mut registers, mut authenticates) = (Vec::new(), Vec::new());
    for task in tasks {
        let (r, a) = task.await.expect("register task");
        registers.extend(r);
        authenticates.extend(a);
    }
    (registers, authenticates, started.elapsed())
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let connections: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let vms: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let server = Arc::new(
        TestServer::start_with(|config| {
            config.db_pool_size = 16;
            // Every bench connection comes from 127.0.0.1.
            config.max_connections_per_ip = 100_000;
            // Measure wrong passwords without being throttled.
            config.throttle.limit = u32::MAX;
        })
        .await,
    );
    println!(
        "vmm bench: {connections} connections, {vms} VMs, {} CPUs",
        std::thread::available_parallelism().map_or(1, usize::from)
    );

    let (samples, elapsed) = pings(&server, connections, 200).await;
    report(
        &format!("ping, {connections} connections"),
        samples,
        elapsed,
    );

    // Ping while the server hashes passwords for 200 registrations.
    let background = {
        let server = Arc::clone(&server);
        tokio::spawn(async move { register_all(&server, "bg", 200, 16).await })
    };
    let (samples, elapsed) = pings(&server, 50, 100).await;
    report(
        "ping, 50 connections, during registrations",
        samples,
        elapsed,
    );
    let _ = background.await;

    let (registers, authenticates, elapsed) = register_all(&server, "vm", vms, 32).await;
    report(
        "register (argon2id hash + 3 statements)",
        registers,
        elapsed,
    );
    report("authenticate (argon2id verify)", authenticates, elapsed);

    let mut client = server.client().await;
    client
        .authenticate("vm-0", &password_for("vm-0"))
        .await
        .expect("authenticate");
    let total_vms = vms + 200;
    for (what, kind) in [
        (format!("list all_vms ({total_vms} VMs)"), 0),
        (format!("list all_disks ({} disks)", total_vms * 2), 1),
        ("list active_vms".to_owned(), 2),
    ] {
        let mut samples = Vec::new();
        let started = Instant::now();
        for _ in 0..50 {
            let t = Instant::now();
            match kind {
                0 => drop(client.list_all().await.expect("list")),
                1 => drop(client.list_disks().await.expect("list")),
                _ => drop(client.list_active().await.expect("list")),
            }
            samples.push(t.elapsed());
        }
        report(&what, samples, started.elapsed());
    }

    let mut samples = Vec::new();
    let started = Instant::now();
    for i in 0..500u32 {
        let t = Instant::now();
        client
            .update(&Update {
                ram: Some(1024 + i),
                cpu: Some(4),
                ..Update::default()
            })
            .await
            .expect("update");
        samples.push(t.elapsed());
    }
    report("update ram+cpu, one connection", samples, started.elapsed());

    wrong_password_timing(&server).await;
    connect_storm(&server, 2000).await;
}

/// A wrong password for an existing VM and for an unknown one must take the
/// same time, or timing would tell which VMs exist.
async fn wrong_password_timing(server: &TestServer) {
    let mut client = server.client().await;
    let mut existing = Vec::new();
    let mut unknown = Vec::new();
    for i in 0..100 {
        let t = Instant::now();
        let _ = client.authenticate("vm-1", "wrong-password").await;
        existing.push(t.elapsed());
        let t = Instant::now();
        let _ = client
            .authenticate(&format!("nobody-{i}"), "wrong-password")
            .await;
        unknown.push(t.elapsed());
    }
    existing.sort();
    unknown.sort();
    let (a, b) = (percentile(&existing, 0.5), percentile(&unknown, 0.5));
    let difference =
        (a.as_secs_f64() - b.as_secs_f64()).abs() / a.as_secs_f64().max(b.as_secs_f64());
    println!(
        "{:<44} existing VM p50={a:>9.3?}  unknown VM p50={b:>9.3?}  difference {:.1}%",
        "wrong password, 100 each",
        difference * 100.0
    );
}

/// Opens `count` connections to one instance while another connection pings
/// it, then lists them from a second instance.
async fn connect_storm(server: &TestServer, count: usize) {
    let other = server.start_beside(|_| {}).await;
    let mut observer = other.client().await;
    observer
        .authenticate("vm-0", &password_for("vm-0"))
        .await
        .expect("authenticate");
    let mut pinger = server.client().await;

    let opener = {
        let addr = server.addr;
        tokio::spawn(async move {
            let tasks: Vec<_> = (0..20)
                .map(|_| {
                    tokio::spawn(async move {
                        let mut open = Vec::new();
                        for _ in 0..count / 20 {
                            open.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
                        }
                        open
                    })
                })
                .collect();
            let mut open = Vec::new();
            for task in tasks {
                open.extend(task.await.expect("open task"));
            }
            open
        })
    };
    let mut samples = Vec::new();
    let started = Instant::now();
    while !opener.is_finished() {
        let t = Instant::now();
        pinger.ping().await.expect("ping");
        samples.push(t.elapsed());
    }
    let storm = started.elapsed();
    let open = opener.await.expect("opener");
    report(
        &format!("ping while {count} connections open ({storm:.2?})"),
        samples,
        started.elapsed(),
    );

    let started = Instant::now();
    let mut lists = Vec::new();
    let listed = loop {
        let t = Instant::now();
        let active = observer.list_active().await.expect("list");
        lists.push(t.elapsed());
        if active.len() > count {
            break active.len();
        }
    };
    println!(
        "{:<44} {listed} sessions listed {:.2?} after the last connect, {} lists",
        "list active_vms from another instance",
        started.elapsed(),
        lists.len()
    );
    report(
        "list active_vms (2,000+ sessions)",
        lists,
        started.elapsed(),
    );
    drop(open);
}
