//! The metrics and health listener (`--metrics-listen`): exact counts on
//! `/metrics` in a format promtool accepts, and `/readyz` following the
//! database while `/healthz` does not.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vmm_tests::{DbProxy, Deadline, RawConn, TestServer, err, ok, password_for};

const ADMIN: &str = "operator-token-0123456789";

struct Response {
    status: u16,
    head: String,
    body: String,
}

/// One HTTP/1.1 GET, read to the end (the server closes after it).
async fn get(addr: SocketAddr, path: &str) -> Response {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    Response {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// The value of the sample `series` (name and labels, as written), 0 when
/// it is absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_commands_exactly() {
    let server = TestServer::start().await;
    let metrics = server.metrics_listener().await;
    let before = get(metrics, "/metrics").await;
    assert_eq!(before.status, 200);
    assert!(
        before
            .head
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        before.head
    );

    let mut conn = server.raw().await;
    ok(&conn
        .call(json!({"command": "register", "data": {"vm_id": "m1", "ram": 64, "cpu": 1, "password": password_for("m1")}}))
        .await);
    for _ in 0..3 {
        ok(&conn.call(json!({"command": "ping"})).await);
    }
    err(
        &conn.call(json!({"command": "no-such-command"})).await,
        "unknown_command",
    );
    err(
        &conn
            .call(json!({"command": "authenticate", "data": {"vm_id": "m1", "password": "not the password"}}))
            .await,
        "invalid_credentials",
    );

    let after = get(metrics, "/metrics").await;
    assert_eq!(after.status, 200);
    let (before, after) = (before.body, after.body);
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(
        delta(r#"vmm_commands_total{command="ping",outcome="success"}"#),
        3.0
    );
    assert_eq!(
        delta(r#"vmm_commands_total{command="register",outcome="success"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"vmm_commands_total{command="(unknown)",outcome="unknown_command"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"vmm_commands_total{command="authenticate",outcome="invalid_credentials"}"#),
        1.0
    );
    assert!(!after.contains("no-such-command"), "{after}");
    assert_eq!(
        delta(r#"vmm_command_duration_seconds_bucket{command="ping",le="+Inf"}"#),
        3.0
    );
    assert_eq!(
        delta(r#"vmm_command_duration_seconds_count{command="ping"}"#),
        3.0
    );
    assert!(delta("vmm_password_hashes_total") >= 1.0, "{after}");
    assert_eq!(sample(&after, "vmm_connections"), 1.0, "{after}");
    assert!(
        sample(&after, r#"vmm_lease_renewals_total{outcome="success"}"#) >= 1.0,
        "{after}"
    );
    assert!(sample(&after, "vmm_lease_age_seconds") < 60.0, "{after}");
    let build = format!(
        r#"vmm_build_info{{version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&after, &build), 1.0, "{after}");

    promtool_accepts(&after);

    drop(conn);
    let deadline = Deadline::new("the closed connection leaves vmm_connections");
    while sample(&get(metrics, "/metrics").await.body, "vmm_connections") != 0.0 {
        deadline.tick().await;
    }
    assert_eq!(get(metrics, "/nothing-here").await.status, 404);
}

/// The figures read at scrape time (sessions by state, watchers, the
/// database pool, the password queue), events delivered, and the bytes of
/// a list reply, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_sessions_watchers_pool_and_list_bytes() {
    let server = TestServer::start_with(|config| config.admin_token = Some(ADMIN.into())).await;
    let metrics = server.metrics_listener().await;
    let scrape = || async { get(metrics, "/metrics").await.body };

    let _nobody = server.raw().await;
    let mut vm = server.raw().await;
    ok(&vm
        .call(json!({"command": "register", "data": {"vm_id": "s1", "ram": 64, "cpu": 1, "password": password_for("s1")}}))
        .await);
    ok(&vm
        .call(json!({"command": "authenticate", "data": {"vm_id": "s1", "password": password_for("s1")}}))
        .await);
    let mut op = server.raw().await;
    ok(&op
        .call(json!({"command": "authenticate", "data": {"admin_token": ADMIN}}))
        .await);

    let text = scrape().await;
    assert_eq!(
        sample(&text, r#"vmm_sessions{state="connected"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"vmm_sessions{state="authenticated"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"vmm_sessions{state="operator"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(sample(&text, "vmm_watchers"), 0.0, "{text}");
    assert!(text.contains("\nvmm_password_queue 0\n"), "{text}");
    let idle = sample(&text, r#"vmm_db_pool_connections{state="idle"}"#);
    let in_use = sample(&text, r#"vmm_db_pool_connections{state="in_use"}"#);
    assert!(idle >= 0.0 && in_use >= 0.0, "{text}");
    let open = idle + in_use;
    assert!(
        open >= 1.0 && open <= server.context.config.db_pool_size as f64,
        "{text}"
    );
    assert!(text.contains("\nvmm_db_pool_waiting 0\n"), "{text}");
    for reason in ["lagged", "slow"] {
        let series = format!(r#"vmm_watchers_dropped_total{{reason="{reason}"}} 0"#);
        assert!(text.contains(&series), "{series} in {text}");
    }
    promtool_accepts(&text);

    // A list's bytes: its whole reply line, the newline included.
    let before = scrape().await;
    op.send(format!(
        "{}\n",
        json!({"command": "list", "data": {"list_type": "all_vms"}})
    ))
    .await;
    let mut line = String::new();
    op.reader.read_line(&mut line).await.unwrap();
    assert!(line.ends_with('\n') && line.contains("\"s1\""), "{line}");
    let after = scrape().await;
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(
        delta(r#"vmm_list_bytes_total{list_type="all_vms"}"#),
        line.len() as f64,
        "{after}"
    );
    for other in ["active_vms", "authenticated_vms", "all_disks"] {
        let series = format!(r#"vmm_list_bytes_total{{list_type="{other}"}}"#);
        assert_eq!(delta(&series), 0.0, "{after}");
    }

    // A watcher, and an event delivered to it.
    ok(&op
        .call(json!({"command": "watch", "data": {"topics": ["vms"]}}))
        .await);
    let before = scrape().await;
    assert_eq!(sample(&before, "vmm_watchers"), 1.0, "{before}");
    let mut other = server.raw().await;
    ok(&other
        .call(json!({"command": "register", "data": {"vm_id": "s2", "ram": 64, "cpu": 1, "password": password_for("s2")}}))
        .await);
    let deadline = Deadline::new("the watcher sees s2 registered");
    loop {
        let event = op.reply().await;
        if event.to_string().contains("\"s2\"") {
            break;
        }
        deadline.tick().await;
    }
    let deadline = Deadline::new("vmm_events_delivered_total counts the event");
    while sample(&scrape().await, "vmm_events_delivered_total")
        <= sample(&before, "vmm_events_delivered_total")
    {
        deadline.tick().await;
    }
    ok(&op.call(json!({"command": "unwatch"})).await);
    assert_eq!(sample(&scrape().await, "vmm_watchers"), 0.0);

    // States follow logouts and closed connections.
    ok(&vm.call(json!({"command": "logout"})).await);
    drop(op);
    let deadline = Deadline::new("the operator's session ends");
    loop {
        let text = scrape().await;
        if sample(&text, r#"vmm_sessions{state="operator"}"#) == 0.0 {
            assert_eq!(
                sample(&text, r#"vmm_sessions{state="authenticated"}"#),
                0.0,
                "{text}"
            );
            // Nobody, the logged-out VM and `other`.
            assert_eq!(
                sample(&text, r#"vmm_sessions{state="connected"}"#),
                3.0,
                "{text}"
            );
            break;
        }
        deadline.tick().await;
    }
}

/// Refusals at the per-address limit are counted; the other reasons show
/// as 0 from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_counted_by_reason() {
    let server = TestServer::start_with(|config| config.max_connections_per_ip = 1).await;
    let metrics = server.metrics_listener().await;
    let text = get(metrics, "/metrics").await.body;
    for reason in ["max_connections", "max_connections_per_ip", "tls", "proxy"] {
        let series = format!(r#"vmm_connections_refused_total{{reason="{reason}"}} 0"#);
        assert!(text.contains(&series), "{series} in {text}");
    }

    let mut first = RawConn::connect_from(7, server.addr).await;
    ok(&first.call(json!({"command": "ping"})).await);
    let mut second = RawConn::connect_from(7, server.addr).await;
    assert!(second.closed().await);
    let deadline = Deadline::new("the refusal is counted");
    let text = loop {
        let text = get(metrics, "/metrics").await.body;
        if sample(
            &text,
            r#"vmm_connections_refused_total{reason="max_connections_per_ip"}"#,
        ) == 1.0
        {
            break text;
        }
        deadline.tick().await;
    };
    for reason in ["max_connections", "tls", "proxy"] {
        let series = format!(r#"vmm_connections_refused_total{{reason="{reason}"}} 0"#);
        assert!(text.contains(&series), "{series} in {text}");
    }
    promtool_accepts(&text);
    ok(&first.call(json!({"command": "ping"})).await);
}

/// `promtool check metrics` on `text`, when promtool is installed (Debian's
/// `prometheus` package); required when `VMM_REQUIRE_PROMTOOL` is set, as
/// CI sets it.
fn promtool_accepts(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(err) if std::env::var_os("VMM_REQUIRE_PROMTOOL").is_some() => {
            panic!("promtool is required (VMM_REQUIRE_PROMTOOL) but cannot run: {err}")
        }
        Err(err) => {
            eprintln!("promtool not run ({err}); install Debian's `prometheus` package");
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_database_and_healthz_does_not() {
    let a = TestServer::start().await;
    let proxy = DbProxy::start(&a.db).await;
    let b = a
        .start_through(&proxy, |config| {
            config.instance_lease = Duration::from_secs(3);
            config.presence_interval = Duration::from_millis(500);
        })
        .await;
    let health = b.metrics_listener().await;

    let deadline = Deadline::new("/readyz is 200 once the database was checked");
    while get(health, "/readyz").await.status != 200 {
        deadline.tick().await;
    }

    proxy.cut();
    let cut = Instant::now();
    let deadline = Deadline::new("/readyz turns 503 once the database is cut");
    let unready = loop {
        let readyz = get(health, "/readyz").await;
        if readyz.status == 503 {
            break readyz;
        }
        assert_eq!(readyz.status, 200);
        assert_eq!(get(health, "/healthz").await.status, 200);
        deadline.tick().await;
    };
    let took = cut.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "/readyz took {took:?} to notice"
    );
    assert!(unready.body.contains("database"), "{}", unready.body);
    assert_eq!(get(health, "/healthz").await.status, 200);

    proxy.restore();
    let deadline = Deadline::new("/readyz is 200 again after the restore");
    loop {
        let readyz = get(health, "/readyz").await;
        if readyz.status == 200 {
            break;
        }
        assert_eq!(readyz.status, 503, "{}", readyz.body);
        assert_eq!(get(health, "/healthz").await.status, 200);
        deadline.tick().await;
    }
    assert_eq!(get(health, "/healthz").await.status, 200);
}
