//! Done-when 9: `vmm-client`'s one-shot subcommands and its interactive shell
//! (scripted through stdin) against a live server, with their exit codes.

mod common;

use common::Run;
use serde_json::Value;
use tokio::process::Command;
use vmm_tests::TestServer;

async fn client(
    server_addr: &str,
    args: &[&str],
    password: Option<&str>,
    stdin: Option<&str>,
) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmm-client"));
    command
        .args(args)
        .env("VMM_ADDR", server_addr)
        .env_remove("VMM_PASSWORD")
        .env_remove("VMM_VM_ID");
    if let Some(password) = password {
        command.env("VMM_PASSWORD", password);
    }
    common::run(command, stdin).await
}

#[track_caller]
fn expect(run: &Run, code: i32, stdout_has: &str) {
    assert_eq!(
        run.code, code,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    assert!(
        run.stdout.contains(stdout_has),
        "{stdout_has:?} not in stdout:\n{}",
        run.stdout
    );
}

const PASSWORD: &str = "securePass123";

#[tokio::test]
async fn one_shot_subcommands_and_exit_codes() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let addr = addr.as_str();

    expect(&client(addr, &["ping"], None, None).await, 0, "PONG");

    let register = [
        "register", "--vm-id", "stalin", "--ram", "512", "--cpu", "4", "--disk", "100", "--disk",
        "200",
    ];
    let run = client(addr, &register, Some(PASSWORD), None).await;
    expect(&run, 0, "stalin");
    assert!(!run.stdout.contains(PASSWORD));

    let run = client(addr, &register, Some(PASSWORD), None).await;
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("already_exists"), "{}", run.stderr);

    let run = client(
        addr,
        &["list", "all", "--vm-id", "stalin"],
        Some(PASSWORD),
        None,
    )
    .await;
    expect(&run, 0, "stalin");

    // --json: the list's reply line verbatim, and not authenticate's.
    let run = client(
        addr,
        &["--json", "list", "disks", "--vm-id", "stalin"],
        Some(PASSWORD),
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines: Vec<Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{}", run.stdout);
    let disks = lines[0]["data"]["all_disks"].as_array().unwrap();
    let first = disks[0]["id"].as_i64().unwrap();

    let resize = format!("{first}=150");
    let update = [
        "--json",
        "update",
        "--vm-id",
        "stalin",
        "--ram",
        "2048",
        "--cpu",
        "8",
        "--disk",
        &resize,
        "--new-disk",
        "50",
    ];
    // Stdin is a password source only with --password-stdin.
    let run = client(addr, &update, None, Some(&format!("{PASSWORD}\n"))).await;
    assert_eq!(run.code, 2, "{}", run.stderr);

    let with_stdin = [&update[..], &["--password-stdin"]].concat();
    let run = client(addr, &with_stdin, None, Some(&format!("{PASSWORD}\n"))).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let reply: Value = serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    let vm = &reply["data"]["vm"];
    assert_eq!(
        (vm["ram"].as_i64(), vm["cpu"].as_i64()),
        (Some(2048), Some(8))
    );
    assert_eq!(vm["disks"].as_array().unwrap().len(), 3);
    assert_eq!(vm["disks"][0]["disk_size"], 150);

    expect(
        &client(addr, &["logout", "--vm-id", "stalin"], Some(PASSWORD), None).await,
        0,
        "stalin",
    );

    let run = client(
        addr,
        &["list", "all", "--vm-id", "stalin"],
        Some("wrong-password"),
        None,
    )
    .await;
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("invalid_credentials"), "{}", run.stderr);

    let run = client(
        addr,
        &["send", r#"{"command": "ping", "id": 7}"#],
        None,
        None,
    )
    .await;
    expect(&run, 0, r#""id":7"#);
    let run = client(addr, &["send", r#"{"command": "reboot"}"#], None, None).await;
    assert_eq!(run.code, 1);

    expect(
        &client(addr, &["commands"], None, None).await,
        0,
        "register",
    );

    // Usage errors: 2.
    for args in [
        &["list", "sideways", "--vm-id", "stalin"][..],
        &["update", "--vm-id", "stalin", "--disk", "1=abc"][..],
        &[
            "register",
            "--vm-id",
            "x",
            "--ram",
            "1",
            "--cpu",
            "1",
            "--password",
            "p",
        ][..],
        &["frobnicate"][..],
    ] {
        let run = client(addr, args, Some(PASSWORD), None).await;
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
    }
    // No password from anywhere, and stdin is not a terminal: 2.
    let run = client(addr, &["list", "all", "--vm-id", "stalin"], None, None).await;
    assert_eq!(run.code, 2, "{}", run.stderr);

    // Cannot connect: 3, naming the address.
    let run = client("127.0.0.1:1", &["ping"], None, None).await;
    assert_eq!(run.code, 3);
    assert!(run.stderr.contains("127.0.0.1:1"), "{}", run.stderr);
}

#[tokio::test]
async fn the_interactive_shell_runs_a_script_from_stdin() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let script = "\
ping
register
vm1
512
2
100

secretpass1
secretpass1
authenticate vm1
secretpass1
list_active
update_ram 1024
update_ram_cpu_disks 2048 4 +30
list_all
list_all_disks
list_auth
{\"command\": \"ping\", \"id\": \"raw\"}
update_ram nope
logout
list_all
quit
";
    let run = client(&addr, &[], None, Some(script)).await;
    assert_eq!(
        run.code, 0,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    assert!(run.stdout.contains("PONG"));
    assert!(run.stdout.contains("VM vm1 registered"), "{}", run.stdout);
    assert!(run.stdout.contains("authenticated as vm1"));
    assert!(
        run.stdout.contains(r#""id":"raw""#),
        "raw JSON line answered verbatim"
    );
    assert!(run.stdout.contains("logged out of vm1"));
    assert!(!run.stdout.contains("secretpass1") && !run.stderr.contains("secretpass1"));
    // The last list_all came after logout.
    assert!(run.stderr.contains("not_authenticated"), "{}", run.stderr);

    let mut check = server.client().await;
    check.authenticate("vm1", "secretpass1").await.unwrap();
    let vms = check.list_all().await.unwrap();
    assert_eq!((vms[0].vm.ram, vms[0].vm.cpu), (2048, 4));
    let sizes: Vec<u32> = vms[0].vm.disks.iter().map(|d| d.disk_size).collect();
    assert_eq!(sizes, [100, 30]);

    // A shell whose server is gone: 3.
    let run = client("127.0.0.1:1", &[], None, Some("ping\n")).await;
    assert_eq!(run.code, 3, "{}", run.stderr);
}

/// Every environment variable the client reads: removed from its runs, so
/// that the developer's own settings do not change what a test sees.
const CLIENT_ENV: [&str; 11] = [
    "VMM_ADDR",
    "VMM_PASSWORD",
    "VMM_VM_ID",
    "VMM_REGISTRATION_SECRET",
    "VMM_ADMIN_TOKEN",
    "VMM_KEEPALIVE",
    "VMM_TLS",
    "VMM_CA_CERT",
    "VMM_TLS_SERVER_NAME",
    "VMM_CLIENT_CERT",
    "VMM_CLIENT_KEY",
];

/// The client with `args` and, of its environment variables, only `env`.
async fn bare(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmm-client"));
    command.args(args);
    for name in CLIENT_ENV {
        command.env_remove(name);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    common::run(command, stdin).await
}

/// An address nothing listens on: a run that must not connect names it.
const NOWHERE: (&str, &str) = ("VMM_ADDR", "127.0.0.1:1");

#[tokio::test]
async fn help_with_a_subcommand_shows_that_subcommands_help() {
    let run = bare(&["help", "register"], &[NOWHERE], None).await;
    expect(&run, 0, "Usage: vmm-client register");
    for flag in [
        "--vm-id",
        "--ram",
        "--cpu",
        "--disk",
        "--registration-secret-file",
    ] {
        assert!(run.stdout.contains(flag), "{flag}: {}", run.stdout);
    }
    assert!(
        run.stdout.contains("VMM_REGISTRATION_SECRET"),
        "{}",
        run.stdout
    );

    let run = bare(&["help", "list"], &[NOWHERE], None).await;
    expect(&run, 0, "Usage: vmm-client list");
    assert!(run.stdout.contains("--all-pages"), "{}", run.stdout);

    // The same text as `SUBCOMMAND --help`.
    let flag = bare(&["list", "--help"], &[NOWHERE], None).await;
    assert_eq!(flag.stdout, run.stdout);

    let run = bare(&["help"], &[NOWHERE], None).await;
    expect(&run, 0, "Usage: vmm-client");
    for subcommand in ["commands", "completions", "man", "help"] {
        let listed = run
            .stdout
            .lines()
            .any(|line| line.trim_start().starts_with(subcommand));
        assert!(listed, "{subcommand} not listed: {}", run.stdout);
    }

    let run = bare(&["help", "frobnicate"], &[NOWHERE], None).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
}

#[tokio::test]
async fn commands_lists_the_servers_commands() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let run = bare(&["commands"], &[("VMM_ADDR", &addr)], None).await;
    expect(&run, 0, "register");
    for command in ["authenticate", "list", "update", "logout", "ping"] {
        assert!(run.stdout.contains(command), "{command}: {}", run.stdout);
    }

    let run = bare(&["--json", "commands"], &[("VMM_ADDR", &addr)], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let reply: Value = serde_json::from_str(run.stdout.trim_end()).unwrap();
    let commands = reply["data"]["commands"].as_array().unwrap();
    assert!(commands.iter().any(|c| c["name"] == "register"), "{reply}");
}

#[tokio::test]
async fn completion_scripts_and_the_man_page_need_no_server() {
    // A CA file that does not exist would fail any run that connects.
    let env = [NOWHERE, ("VMM_CA_CERT", "/nonexistent/ca.pem")];
    let run = bare(&["completions", "bash"], &env, None).await;
    expect(&run, 0, "vmm-client");
    for word in [
        "commands",
        "register",
        "completions",
        "--registration-secret-file",
    ] {
        assert!(run.stdout.contains(word), "{word}: {}", run.stdout);
    }
    // Bash completes with it, subcommands' own flags too.
    let script = std::env::temp_dir().join(format!("vmm-client-{}.bash", std::process::id()));
    std::fs::write(&script, &run.stdout).unwrap();
    let complete = |words: &str| {
        let script = script.display();
        format!(
            "source {script}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             _vmm_client vmm-client \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
             echo \"${{COMPREPLY[*]}}\""
        )
    };
    let mut bash = Command::new("bash");
    bash.arg("-c").arg(complete("vmm-client com"));
    let words = common::run(bash, None).await;
    assert_eq!(
        words.stdout.trim(),
        "commands completions",
        "{}",
        words.stderr
    );
    let mut bash = Command::new("bash");
    bash.arg("-c").arg(complete("vmm-client register --reg"));
    let words = common::run(bash, None).await;
    let _ = std::fs::remove_file(&script);
    assert_eq!(
        words.stdout.trim(),
        "--registration-secret-file",
        "{}",
        words.stderr
    );

    let run = bare(&["completions", "zsh"], &env, None).await;
    expect(&run, 0, "#compdef vmm-client");
    assert!(run.stdout.contains("commands"), "{}", run.stdout);
    let run = bare(&["completions", "fish"], &env, None).await;
    expect(&run, 0, "complete -c vmm-client");
    assert!(run.stdout.contains("commands"), "{}", run.stdout);
    for shell in ["elvish", "powershell"] {
        let run = bare(&["completions", shell], &env, None).await;
        expect(&run, 0, "vmm-client");
        assert!(run.stdout.contains("register"), "{shell}: {}", run.stdout);
    }
    let run = bare(&["completions", "tcsh"], &env, None).await;
    assert_eq!(run.code, 2, "{}", run.stderr);

    let run = bare(&["man"], &env, None).await;
    expect(&run, 0, ".TH vmm-client 1");
    for roff in [
        ".SH NAME",
        "vmm\\-client \\-",
        ".SH SYNOPSIS",
        ".SH OPTIONS",
        ".SH \"EXIT STATUS\"",
    ] {
        assert!(run.stdout.contains(roff), "{roff}: {}", run.stdout);
    }
    // Every subcommand, and no page of its own that `man` does not write.
    for subcommand in ["register", "commands", "agent", "completions", "top"] {
        let entry = format!("\\fBvmm\\-client {subcommand}\\fR");
        assert!(run.stdout.contains(&entry), "{entry}: {}", run.stdout);
    }
    assert!(
        !run.stdout.contains("vmm\\-client\\-register(1)"),
        "{}",
        run.stdout
    );
}

/// Whether `value` holds a `token` key anywhere.
fn has_token(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.contains_key("token") || map.values().any(has_token),
        Value::Array(items) => items.iter().any(has_token),
        _ => false,
    }
}

/// The one JSON document on `run`'s stdout.
#[track_caller]
fn one_document(run: &Run) -> Value {
    let lines: Vec<&str> = run.stdout.lines().filter(|line| !line.is_empty()).collect();
    assert_eq!(lines.len(), 1, "one document: {}", run.stdout);
    let document: Value = serde_json::from_str(lines[0]).unwrap();
    assert!(!has_token(&document), "a token: {document}");
    document
}

#[tokio::test]
async fn json_prints_one_document_the_commands_reply_and_no_token() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let env = [("VMM_ADDR", addr.as_str())];
    let password = format!("{PASSWORD}\n");
    let stdin = Some(password.as_str());
    let register = [
        "--json",
        "register",
        "--vm-id",
        "j",
        "--ram",
        "64",
        "--cpu",
        "1",
        "--password-stdin",
    ];
    let run = bare(&register, &env, stdin).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(one_document(&run)["data"]["vm"]["vm_id"], "j");

    let list = [
        "--json",
        "list",
        "all_vms",
        "--vm-id",
        "j",
        "--password-stdin",
    ];
    let run = bare(&list, &env, stdin).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let reply = one_document(&run);
    assert_eq!(reply["data"]["all_vms"][0]["vm_id"], "j", "{reply}");

    // `authenticate` asked for: its reply, without the session token.
    let authenticate = ["--json", "authenticate", "--vm-id", "j", "--password-stdin"];
    let run = bare(&authenticate, &env, stdin).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let reply = one_document(&run);
    assert_eq!(reply["data"]["vm"]["vm_id"], "j", "{reply}");
    assert!(reply["data"]["token_expires_at"].is_string(), "{reply}");

    let update = [
        "--json",
        "update",
        "--vm-id",
        "j",
        "--ram",
        "128",
        "--password-stdin",
    ];
    let run = bare(&update, &env, stdin).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(one_document(&run)["data"]["vm"]["ram"], 128);

    // A refused authentication ends the run: its error reply is the document.
    let run = bare(&list, &env, Some("wrong-password\n")).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    let reply = one_document(&run);
    assert_eq!(reply["code"], "invalid_credentials", "{reply}");
}

#[tokio::test]
async fn every_missing_argument_is_reported_in_one_error() {
    #[track_caller]
    fn missing(run: &Run, named: &[&str], not_named: &[&str]) {
        assert_eq!(run.code, 2, "{}", run.stderr);
        assert_eq!(run.stderr.matches("error:").count(), 1, "{}", run.stderr);
        let message = run.stderr.split("Usage:").next().unwrap_or_default();
        for arg in named {
            assert!(message.contains(arg), "{arg} not in: {}", run.stderr);
        }
        for arg in not_named {
            assert!(!message.contains(arg), "{arg} in: {}", run.stderr);
        }
    }
    let run = bare(&["register"], &[NOWHERE], None).await;
    missing(&run, &["--vm-id", "--ram", "--cpu"], &[]);
    // $VMM_VM_ID stands in for --vm-id.
    let run = bare(&["register"], &[NOWHERE, ("VMM_VM_ID", "from-env")], None).await;
    missing(&run, &["--ram", "--cpu"], &["--vm-id"]);
    let run = bare(&["register", "--ram", "64"], &[NOWHERE], None).await;
    missing(&run, &["--vm-id", "--cpu"], &["--ram <"]);
    let run = bare(&["list"], &[NOWHERE], None).await;
    missing(&run, &["--vm-id", "<KIND>"], &[]);
    let run = bare(&["--admin", "list"], &[NOWHERE], None).await;
    missing(&run, &["<KIND>"], &["--vm-id"]);
    let run = bare(&["update"], &[NOWHERE], None).await;
    missing(&run, &["--vm-id", "--new-disk"], &[]);
    let run = bare(&["watch"], &[NOWHERE], None).await;
    missing(&run, &["--vm-id"], &[]);
    let run = bare(&["authenticate"], &[NOWHERE], None).await;
    missing(&run, &["--vm-id"], &[]);
}

#[tokio::test]
async fn an_address_that_cannot_be_one_is_a_usage_error() {
    for addr in [
        "not an address",
        "127.0.0.1:99999",
        "127.0.0.1:http",
        "[::1",
        "::1]:80",
    ] {
        let run = bare(&["--addr", addr, "ping"], &[], None).await;
        assert_eq!(run.code, 2, "{addr}: {}", run.stderr);
        assert!(run.stderr.contains("--addr"), "{}", run.stderr);
    }
    let run = bare(&["ping"], &[("VMM_ADDR", "vmm:port")], None).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    // An address that is one but where nothing listens is still 3.
    let run = bare(&["ping"], &[NOWHERE], None).await;
    assert_eq!(run.code, 3, "{}", run.stderr);
}

#[tokio::test]
async fn the_agents_help_lists_exactly_the_error_replies_it_retries() {
    let mut retried = [
        "unavailable",
        "server_busy",
        "internal",
        "too_many_attempts",
    ];
    retried.sort_unstable();
    let listed = |help: &str| -> Vec<Vec<String>> {
        help.lines()
            .filter_map(|line| line.trim().strip_prefix("Error replies retried:"))
            .map(|codes| {
                let mut codes: Vec<String> =
                    codes.split(',').map(|c| c.trim().to_owned()).collect();
                codes.sort();
                codes
            })
            .collect()
    };
    // The long help: in the description and in the exit codes.
    let run = bare(&["help", "agent"], &[NOWHERE], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(listed(&run.stdout), [retried, retried], "{}", run.stdout);
    // The short one: in the exit codes.
    let run = bare(&["agent", "-h"], &[NOWHERE], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(listed(&run.stdout), [retried], "{}", run.stdout);
}
