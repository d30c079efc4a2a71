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

    // --json: the reply lines verbatim (authenticate's, then the list's).
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
    assert_eq!(lines.len(), 2, "{}", run.stdout);
    let disks = lines[1]["data"]["all_disks"].as_array().unwrap();
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

    expect(&client(addr, &["help"], None, None).await, 0, "register");

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
