//! The deployment files keep the properties `deploy/smoke.sh` found they
//! need to start and stay up (that script needs Docker, which CI does not
//! have; these checks run everywhere):
//! - HAProxy starts under a 20,000-descriptor limit, keeps idle VMs for an
//!   hour at least with TCP keepalive both ways, re-dispatches connections
//!   whose server is gone, and resolves the servers' names at run time;
//! - the server services run one image, built once;
//! - the servers HAProxy balances (server-2, server-3) require its PROXY
//!   protocol header and trust it from HAProxy's fixed address alone, which
//!   no other container can take; `server`, reached directly, does not; and
//!   HAProxy sends the header to the servers but not with its health checks;
//! - the Docker build context leaves out what the build does not read;
//! - each server serves metrics and health on port 9100, HAProxy takes a
//!   server out on its /readyz, and Prometheus scrapes that port;
//! - promtool accepts prometheus.yml and alerts.yml, and the alerts pass
//!   their unit tests (alerts.test.yml), when promtool is installed
//!   (required where `VMM_REQUIRE_PROMTOOL` is set, as CI sets it);
//! - every series the alerts and their tests name is one a real server
//!   serves (this one needs the test database): a renamed metric or label
//!   would otherwise leave an alert that passes its tests and never fires.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmm_tests::{TestServer, err, ok, password_for};

/// The repository's top directory.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    let full = root().join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|err| panic!("{}: {err}", full.display()))
}

/// A service's lines in docker-compose.yml: those after `  name:` that are
/// indented deeper.
fn compose_service(name: &str) -> String {
    let compose = read("docker-compose.yml");
    let header = format!("  {name}:");
    compose
        .lines()
        .skip_while(|line| *line != header)
        .skip(1)
        .take_while(|line| line.is_empty() || line.starts_with("   "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The value of `key: value` among a service's lines, unquoted.
fn setting(body: &str, key: &str) -> Option<String> {
    body.lines().find_map(|line| {
        let (k, v) = line.trim().split_once(':')?;
        (k == key).then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// The names of docker-compose.yml's services (the keys under `services:`).
fn compose_services() -> Vec<String> {
    read("docker-compose.yml")
        .lines()
        .skip_while(|line| *line != "services:")
        .skip(1)
        .take_while(|line| line.is_empty() || line.starts_with(' ') || line.starts_with('#'))
        .filter_map(|line| line.strip_prefix("  ")?.strip_suffix(':'))
        .filter(|name| !name.starts_with([' ', '#']))
        .map(str::to_owned)
        .collect()
}

/// The top-level `networks:` section of docker-compose.yml.
fn compose_networks() -> String {
    read("docker-compose.yml")
        .lines()
        .skip_while(|line| *line != "networks:")
        .skip(1)
        .take_while(|line| line.is_empty() || line.starts_with(' '))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `addr` is in the address block `cidr` (`172.28.0.0/24`).
fn in_block(addr: Ipv4Addr, cidr: &str) -> bool {
    let (base, len) = cidr.split_once('/').unwrap_or((cidr, "32"));
    let base: Ipv4Addr = base.parse().unwrap_or_else(|_| panic!("a block: {cidr}"));
    let len: u32 = len.parse().unwrap_or_else(|_| panic!("a block: {cidr}"));
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(addr) & mask == u32::from(base) & mask
}

/// Runs `promtool ARGS` in the repository's top directory and fails the test
/// if promtool rejects the files. Returns false (and says so) when promtool
/// is not installed (Debian's `prometheus` package), unless
/// `VMM_REQUIRE_PROMTOOL` is set: then a missing promtool fails the test.
fn promtool(args: &[&str]) -> bool {
    let output = match Command::new("promtool")
        .args(args)
        .current_dir(root())
        .output()
    {
        Ok(output) => output,
        Err(err) if std::env::var_os("VMM_REQUIRE_PROMTOOL").is_some() => {
            panic!("promtool is required (VMM_REQUIRE_PROMTOOL) but cannot run: {err}")
        }
        Err(err) => {
            eprintln!("promtool not run ({err}); install Debian's `prometheus` package");
            return false;
        }
    };
    assert!(
        output.status.success(),
        "promtool {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    true
}

/// The configuration's lines, without comments and blank lines, trimmed.
fn haproxy() -> Vec<String> {
    read("deploy/haproxy.cfg")
        .lines()
        .map(|line| line.split('#').next().unwrap_or("").trim().to_owned())
        .filter(|line| !line.is_empty())
        .collect()
}

/// `24h`, `30s`, `5m`, `100` (milliseconds), as HAProxy reads them.
fn haproxy_time(text: &str) -> Duration {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().unwrap_or_else(|_| panic!("a time: {text}"));
    match unit {
        "" | "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        other => panic!("unknown unit {other} in {text}"),
    }
}

fn value_of<'a>(lines: &'a [String], key: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter_map(|line| line.strip_prefix(key))
        .filter(|rest| rest.starts_with(' '))
        .map(str::trim)
        .collect()
}

#[test]
fn haproxy_starts_under_20000_descriptors_and_keeps_idle_vms() {
    let lines = haproxy();
    let has = |line: &str| lines.iter().any(|l| l == line);
    // Each proxied connection holds two descriptors; HAProxy >= 2.6 refuses
    // to start when it cannot get what maxconn needs, unless told not to.
    let maxconn: Vec<u64> = value_of(&lines, "maxconn")
        .iter()
        .map(|n| n.parse().expect("maxconn is a number"))
        .collect();
    assert!(
        has("no strict-limits") || maxconn.iter().all(|n| 2 * n + 100 <= 20_000),
        "maxconn {maxconn:?} needs more than 20,000 descriptors"
    );
    for key in ["timeout client", "timeout server"] {
        let values = value_of(&lines, key);
        assert!(!values.is_empty(), "no {key}");
        for value in values {
            assert!(
                haproxy_time(value) >= Duration::from_secs(3600),
                "{key} {value}: idle VMs would be cut"
            );
        }
    }
    for line in [
        "option clitcpka",
        "option srvtcpka",
        "option redispatch",
        "resolvers docker",
    ] {
        assert!(has(line), "haproxy.cfg lacks `{line}`");
    }
    assert!(
        value_of(&lines, "retries")
            .iter()
            .any(|n| n.parse::<u32>().is_ok_and(|n| n >= 1)),
        "redispatch needs retries"
    );
    let servers: Vec<&String> = lines.iter().filter(|l| l.starts_with("server ")).collect();
    assert!(servers.len() >= 2, "{servers:?}");
    let resolved = lines
        .iter()
        .any(|l| l.starts_with("default-server") && l.contains("resolvers docker"))
        || servers.iter().all(|l| l.contains("resolvers docker"));
    assert!(resolved, "the servers' names are resolved at run time");
}

/// The server services: `server`, reached directly, and the two HAProxy
/// balances.
const SERVERS: [&str; 3] = ["server", "server-2", "server-3"];
const BALANCED: [&str; 2] = ["server-2", "server-3"];

#[test]
fn the_servers_run_one_image_built_once() {
    let bodies: Vec<String> = SERVERS.iter().map(|name| compose_service(name)).collect();
    let image = setting(&bodies[0], "image");
    assert!(image.is_some(), "{}", bodies[0]);
    for (name, body) in SERVERS.iter().zip(&bodies) {
        assert_eq!(
            setting(body, "image"),
            image,
            "{name}: one image for all servers"
        );
    }
    let builds = bodies
        .iter()
        .filter(|body| body.lines().any(|l| l.trim().starts_with("build:")))
        .count();
    assert_eq!(builds, 1, "built once, by one of the services");
}

#[test]
fn the_balanced_servers_take_proxy_headers_from_the_balancer_alone() {
    // HAProxy has a fixed address, in the network's fixed subnet, outside
    // the range the other containers' addresses come from.
    let lb = compose_service("lb");
    let lb_address: Ipv4Addr = setting(&lb, "ipv4_address")
        .unwrap_or_else(|| panic!("lb has no fixed address:\n{lb}"))
        .parse()
        .expect("lb's ipv4_address is an IPv4 address");
    let networks = compose_networks();
    let subnet = setting(&networks, "- subnet").expect("a fixed subnet");
    assert!(
        in_block(lb_address, &subnet),
        "{lb_address} outside {subnet}"
    );
    let range = setting(&networks, "ip_range").expect("an ip_range for the others");
    assert!(
        !in_block(lb_address, &range),
        "another container may take {lb_address}: it is in the ip_range {range}"
    );

    // Every service is on that network (else HAProxy's address is another).
    let services = compose_services();
    assert!(services.len() >= 6, "{services:?}");
    for name in &services {
        let body = compose_service(name);
        let lines: Vec<&str> = body.lines().map(str::trim).collect();
        assert!(
            lines.contains(&"networks: [vmm]")
                || lines.windows(2).any(|w| w == ["networks:", "vmm:"]),
            "{name} is not on the vmm network:\n{body}"
        );
    }

    // The servers behind it require the header, from its address only (not
    // the subnet, which holds Docker's gateway too), and publish no port.
    for name in BALANCED {
        let body = compose_service(name);
        assert_eq!(
            setting(&body, "VMM_PROXY_PROTOCOL").as_deref(),
            Some("true"),
            "{name}:\n{body}"
        );
        assert_eq!(
            setting(&body, "VMM_PROXY_PROTOCOL_FROM"),
            Some(lb_address.to_string()),
            "{name} trusts others than the balancer:\n{body}"
        );
        assert!(
            setting(&body, "ports").is_none(),
            "{name} is published:\n{body}"
        );
    }
    // `server` takes clients directly: no header.
    let server = compose_service("server");
    assert!(
        matches!(
            setting(&server, "VMM_PROXY_PROTOCOL").as_deref(),
            None | Some("false")
        ),
        "server requires a PROXY header, which its direct clients do not send:\n{server}"
    );
    assert!(
        setting(&server, "VMM_PROXY_PROTOCOL_FROM").is_none(),
        "{server}"
    );

    // HAProxy balances exactly those, and sends them the header.
    let lines = haproxy();
    let servers: Vec<&String> = lines.iter().filter(|l| l.starts_with("server ")).collect();
    let mut hosts: Vec<&str> = servers
        .iter()
        .filter_map(|l| l.split_whitespace().nth(2))
        .map(|addr| addr.split(':').next().unwrap_or(addr))
        .collect();
    hosts.sort_unstable();
    assert_eq!(hosts, BALANCED, "{servers:?}");
    let has_word = |line: &str, word: &str| line.split_whitespace().any(|w| w == word);
    let default_server = lines.iter().find(|l| l.starts_with("default-server"));
    assert!(
        default_server.is_some_and(|l| has_word(l, "send-proxy-v2"))
            || servers.iter().all(|l| has_word(l, "send-proxy-v2")),
        "the servers get no PROXY v2 header: {lines:#?}"
    );
    // Its checks go to the metrics port, which speaks plain HTTP: they must
    // send no header (HAProxy sends none on a check with a `port` of its
    // own, unless told to with check-send-proxy).
    assert!(
        !lines.iter().any(|l| has_word(l, "check-send-proxy")),
        "the health checks would send a PROXY header to /readyz: {lines:#?}"
    );
}

#[test]
fn the_build_context_leaves_out_what_the_build_does_not_read() {
    let ignore = read(".dockerignore");
    let rules: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    // Everything is left out, then only what the build reads is let back.
    assert_eq!(rules.first(), Some(&"*"), "{rules:?}");
    for never in [
        "README.md",
        "target",
        ".git",
        "deploy",
        "docker-compose.yml",
    ] {
        assert!(
            !rules.iter().any(
                |rule| rule.trim_start_matches('!').starts_with(never) && rule.starts_with('!')
            ),
            "{never} is sent to the build"
        );
    }
    let dockerfile = read("Dockerfile");
    // Dependencies first, from the manifests alone, then the sources.
    let manifests = dockerfile
        .find("COPY Cargo.toml Cargo.lock")
        .expect("manifests copied first");
    let sources = dockerfile
        .find("COPY vmm-core/src")
        .expect("sources copied");
    assert!(manifests < sources);
    let dependency_build = dockerfile[manifests..sources]
        .find("cargo build")
        .expect("dependencies built before the sources are copied");
    assert!(dependency_build > 0);
}

#[test]
fn each_server_serves_metrics_on_9100_for_haproxy_and_prometheus() {
    for name in SERVERS {
        let body = compose_service(name);
        let lines: Vec<&str> = body.lines().map(str::trim).collect();
        assert!(
            lines.contains(&"VMM_METRICS_LISTEN: 0.0.0.0:9100"),
            "{name} does not serve metrics on 9100:\n{body}"
        );
        assert!(
            lines.contains(&"expose:") && lines.contains(&"- \"9100\""),
            "{name} does not expose 9100:\n{body}"
        );
    }

    // HAProxy asks /readyz on the metrics port, not whether the client port
    // accepts: a server without its database accepts all the same.
    let lines = haproxy();
    let has = |line: &str| lines.iter().any(|l| l == line);
    assert!(has("option httpchk GET /readyz"), "{lines:#?}");
    assert!(has("http-check expect status 200"), "{lines:#?}");
    assert!(!has("option tcp-check"), "one kind of check: {lines:#?}");
    let checked_on_9100 = |line: &str| {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.contains(&"check") && words.windows(2).any(|w| w == ["port", "9100"])
    };
    let servers: Vec<&String> = lines.iter().filter(|l| l.starts_with("server ")).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("default-server") && checked_on_9100(l))
            || servers.iter().all(|l| checked_on_9100(l)),
        "the servers are not checked on port 9100: {lines:#?}"
    );

    // Prometheus scrapes each of them there, with the alert rules.
    let prometheus = read("deploy/prometheus.yml");
    let items: Vec<&str> = prometheus
        .lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter_map(|line| line.strip_prefix("- "))
        .collect();
    for name in SERVERS {
        let target = format!("{name}:9100");
        assert!(
            items.contains(&target.as_str()),
            "prometheus.yml does not scrape {target}"
        );
    }
    assert!(items.contains(&"alerts.yml"), "no rule file: {items:?}");
}

#[test]
fn promtool_accepts_the_prometheus_config_and_its_rules() {
    // The config names alerts.yml relative to itself; promtool checks both.
    if promtool(&["check", "config", "deploy/prometheus.yml"]) {
        promtool(&["check", "rules", "deploy/alerts.yml"]);
    }
}

#[test]
fn the_alerts_fire_when_they_should_and_only_then() {
    promtool(&["test", "rules", "deploy/alerts.test.yml"]);
}

/// A series named in a rule or test file: a metric name and its label
/// matchers with `=` (regular expressions and negations match anything).
#[derive(Debug)]
struct Selector {
    name: String,
    labels: Vec<(String, String)>,
}

/// The `vmm_*` selectors outside comments in `text`.
fn selectors(text: &str) -> Vec<Selector> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut found = Vec::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let mut rest = line;
        while let Some(at) = rest.find("vmm_") {
            let boundary = !rest[..at].ends_with(is_name);
            let tail = &rest[at..];
            let end = tail.find(|c: char| !is_name(c)).unwrap_or(tail.len());
            let name = &tail[..end];
            rest = &tail[end..];
            if !boundary {
                continue;
            }
            let mut labels = Vec::new();
            if let Some(inner) = rest.strip_prefix('{') {
                let close = inner.find('}').expect("a closing brace");
                for matcher in inner[..close].split(',').map(str::trim) {
                    let Some((label, value)) = matcher.split_once('=') else {
                        continue;
                    };
                    if label.ends_with('!') || value.starts_with('~') {
                        continue;
                    }
                    labels.push((label.trim().to_owned(), value.trim_matches('"').to_owned()));
                }
                rest = &inner[close..];
            }
            found.push(Selector {
                name: name.to_owned(),
                labels,
            });
        }
    }
    found
}

/// `/metrics` of `server`, after one request of each command the alerts
/// and their tests name (and a failed login).
async fn scrape_after_commands(server: &TestServer) -> String {
    let addr = server.metrics_listener().await;
    let mut vm = server.raw().await;
    ok(&vm
        .call(json!({"command": "register", "data": {"vm_id": "d1", "ram": 64, "cpu": 1, "password": password_for("d1")}}))
        .await);
    err(
        &vm.call(json!({"command": "authenticate", "data": {"vm_id": "d1", "password": "not the password"}}))
            .await,
        "invalid_credentials",
    );
    ok(&vm
        .call(json!({"command": "authenticate", "data": {"vm_id": "d1", "password": password_for("d1")}}))
        .await);
    ok(&vm
        .call(json!({"command": "update", "data": {"ram": 128}}))
        .await);
    ok(&vm
        .call(json!({"command": "list", "data": {"list_type": "all_vms"}}))
        .await);

    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    body.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_the_alerts_read_is_one_the_server_serves() {
    let server = TestServer::start().await;
    let text = scrape_after_commands(&server).await;
    let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    // Target labels Prometheus adds, and the error codes that only the
    // made-up series of the tests carry.
    let not_served = ["job", "instance", "outcome"];
    let mut checked = 0;
    for file in ["deploy/alerts.yml", "deploy/alerts.test.yml"] {
        for selector in selectors(&read(file)) {
            let served = samples.iter().any(|line| {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                line[..end] == selector.name
                    && selector
                        .labels
                        .iter()
                        .filter(|(label, _)| !not_served.contains(&label.as_str()))
                        .all(|(label, value)| line[end..].contains(&format!("{label}=\"{value}\"")))
            });
            assert!(served, "{file}: {selector:?} is no series of:\n{text}");
            checked += 1;
        }
    }
    // The scan itself found the alerts' series (not nothing at all).
    assert!(checked >= 20, "only {checked} selectors found");
}
