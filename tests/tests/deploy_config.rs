//! The deployment files keep the properties `deploy/smoke.sh` found they
//! need to start and stay up (that script needs Docker, which CI does not
//! have; these checks run everywhere):
//! - HAProxy starts under a 20,000-descriptor limit, keeps idle VMs for an
//!   hour at least with TCP keepalive both ways, re-dispatches connections
//!   whose server is gone, and resolves the servers' names at run time;
//! - both server services run one image, built once;
//! - the Docker build context leaves out what the build does not read.

use std::path::Path;
use std::time::Duration;

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|err| panic!("{}: {err}", full.display()))
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

#[test]
fn both_servers_run_one_image_built_once() {
    let compose = read("docker-compose.yml");
    // A service's lines: those after `  name:` that are indented deeper.
    let service = |name: &str| -> String {
        let header = format!("  {name}:");
        compose
            .lines()
            .skip_while(|line| *line != header)
            .skip(1)
            .take_while(|line| line.is_empty() || line.starts_with("   "))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let image = |body: &str| {
        body.lines()
            .find_map(|l| l.trim().strip_prefix("image:").map(|i| i.trim().to_owned()))
    };
    let (one, two) = (service("server"), service("server-2"));
    assert_eq!(image(&one), image(&two), "one image for both servers");
    assert!(image(&one).is_some());
    let builds = [&one, &two]
        .iter()
        .filter(|body| body.lines().any(|l| l.trim().starts_with("build:")))
        .count();
    assert_eq!(builds, 1, "built once, by one of the two services");
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
