//! Lists a page at a time: `Client::list_page`; `vmm-client list --limit`,
//! `--after` and `--all-pages` (tables and `--json`); and the shell, which
//! pages without asking when it is not on a terminal, and asks between
//! pages when it is (driven through a pseudo-terminal).

mod common;
#[path = "common/pty.rs"]
mod pty;

use common::Run;
use pty::Terminal;
use serde_json::{Value, json};
use tokio::process::Command;
use vmm_core::ErrorCode;
use vmm_core::client::Page;
use vmm_core::protocol::{DiskEntry, ListType, VmStatus};
use vmm_tests::{TestServer, seed_fleet};

const ADMIN: &str = "operator-token-for-paging";
const MORE: &str = "-- more (Enter: next page, q: stop) --";

/// Runs `vmm-client --addr ADDR ARGS` as the operator, `stdin` piped.
async fn client(addr: &str, args: &[&str], stdin: Option<&str>) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmm-client"));
    command
        .arg("--addr")
        .arg(addr)
        .args(args)
        .env("VMM_ADMIN_TOKEN", ADMIN)
        .env_remove("VMM_VM_ID")
        .env_remove("VMM_PASSWORD");
    common::run(command, stdin).await
}

#[track_caller]
fn succeeded(run: &Run) {
    assert_eq!(
        run.code, 0,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
}

/// The first column of the table rows that name a seeded VM.
fn vm_rows(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|line| line.strip_prefix('|'))
        .filter_map(|line| line.split('|').next())
        .map(str::trim)
        .filter(|cell| cell.starts_with("fleet-"))
        .map(str::to_owned)
        .collect()
}

fn fleet(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("fleet-{i:06}")).collect()
}

/// The cursor of `more: --after CURSOR` on stderr.
fn hint(stderr: &str) -> Option<String> {
    stderr
        .lines()
        .find_map(|line| line.strip_prefix("more: --after "))
        .map(str::to_owned)
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line}")))
        .collect()
}

#[tokio::test]
async fn list_page_walks_a_list_by_its_cursors() {
    let server = TestServer::start_with(|c| c.admin_token = Some(ADMIN.into())).await;
    seed_fleet(&server.db, 5, 2).await;
    let mut client = server.client().await;
    let reply = client
        .call("authenticate", json!({"admin_token": ADMIN}))
        .await
        .unwrap();
    assert!(reply.is_success(), "{reply:?}");

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page: Page<VmStatus> = client
            .list_page(ListType::AllVms, Some(2), after.as_deref())
            .await
            .unwrap();
        assert!(page.entries.len() <= 2);
        seen.extend(page.entries.into_iter().map(|vm| vm.vm.vm_id));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, fleet(5));
    let whole: Vec<String> = client
        .list_all()
        .await
        .unwrap()
        .into_iter()
        .map(|vm| vm.vm.vm_id)
        .collect();
    assert_eq!(seen, whole, "the existing list methods agree");

    let disks: Page<DiskEntry> = client
        .list_page(ListType::AllDisks, None, None)
        .await
        .unwrap();
    assert_eq!((disks.entries.len(), disks.next), (10, None));

    let err = client
        .list_page::<Value>(ListType::AllVms, Some(2), Some("not-a-cursor"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidParams), "{err}");
    let err = client
        .list_page::<Value>(ListType::AllVms, Some(0), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidParams), "{err}");
}

#[tokio::test]
async fn limit_prints_a_page_and_after_continues_from_its_hint() {
    let server = TestServer::start_with(|c| c.admin_token = Some(ADMIN.into())).await;
    seed_fleet(&server.db, 5, 0).await;
    let addr = server.addr.to_string();
    let addr = addr.as_str();

    let run = client(addr, &["--admin", "list", "all", "--limit", "2"], None).await;
    succeeded(&run);
    assert_eq!(vm_rows(&run.stdout), fleet(2), "{}", run.stdout);
    assert!(run.stdout.contains("(2 rows)"), "{}", run.stdout);
    let first = hint(&run.stderr).expect("a `more:` hint on stderr");

    let args = ["--admin", "list", "all", "--limit", "2", "--after", &first];
    let run = client(addr, &args, None).await;
    succeeded(&run);
    assert_eq!(vm_rows(&run.stdout), &fleet(4)[2..], "{}", run.stdout);
    let second = hint(&run.stderr).expect("a `more:` hint on stderr");

    let args = ["--admin", "list", "all", "--limit", "2", "--after", &second];
    let run = client(addr, &args, None).await;
    succeeded(&run);
    assert_eq!(vm_rows(&run.stdout), &fleet(5)[4..], "{}", run.stdout);
    assert!(run.stdout.contains("(1 row)"), "{}", run.stdout);
    assert_eq!(hint(&run.stderr), None, "the last page: {}", run.stderr);

    // --json: the page's reply line verbatim, `next` included.
    let args = ["--admin", "--json", "list", "all", "--limit", "2"];
    let run = client(addr, &args, None).await;
    succeeded(&run);
    let lines = json_lines(&run.stdout);
    assert_eq!(lines.len(), 1, "the page's line, not authenticate's");
    assert_eq!(
        lines[0]["data"]["all_vms"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(lines[0]["data"]["next"], first.as_str());
    assert_eq!(hint(&run.stderr).as_deref(), Some(first.as_str()));

    // No paging flags: the whole list, no hint.
    let run = client(addr, &["--admin", "list", "all"], None).await;
    succeeded(&run);
    assert_eq!(vm_rows(&run.stdout), fleet(5));
    assert_eq!(hint(&run.stderr), None);

    // A cursor of another list, or none at all, is the server's
    // invalid_params (1); a limit out of range is a usage error (2).
    let args = [
        "--admin", "list", "disks", "--limit", "2", "--after", &first,
    ];
    let run = client(addr, &args, None).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("invalid_params"), "{}", run.stderr);
    let args = ["--admin", "list", "all", "--after", "garbage!"];
    let run = client(addr, &args, None).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("invalid_params"), "{}", run.stderr);
    for limit in ["0", "10001"] {
        let run = client(addr, &["--admin", "list", "all", "--limit", limit], None).await;
        assert_eq!(run.code, 2, "--limit {limit}: {}", run.stderr);
    }
}

#[tokio::test]
async fn all_pages_prints_every_entry_exactly_once() {
    let server = TestServer::start_with(|c| c.admin_token = Some(ADMIN.into())).await;
    seed_fleet(&server.db, 5, 2).await;
    let addr = server.addr.to_string();
    let addr = addr.as_str();

    let args = ["--admin", "list", "all", "--all-pages", "--limit", "2"];
    let run = client(addr, &args, None).await;
    succeeded(&run);
    assert_eq!(vm_rows(&run.stdout), fleet(5), "{}", run.stdout);
    assert_eq!(
        run.stdout.matches("| vm_id").count(),
        3,
        "a table per page: {}",
        run.stdout
    );
    assert!(
        run.stdout.trim_end().ends_with("(5 rows)"),
        "{}",
        run.stdout
    );
    assert_eq!(run.stdout.matches("rows)").count(), 1, "{}", run.stdout);
    assert_eq!(hint(&run.stderr), None, "{}", run.stderr);

    // --json: one document shaped like the unpaged reply, with the same data.
    for (kind, key, entries) in [
        ("all", "all_vms", 5),
        ("disks", "all_disks", 10),
        ("auth", "authenticated_vms", 0),
    ] {
        let unpaged = client(addr, &["--admin", "--json", "list", kind], None).await;
        succeeded(&unpaged);
        let unpaged = json_lines(&unpaged.stdout);
        let args = [
            "--admin",
            "--json",
            "list",
            kind,
            "--all-pages",
            "--limit",
            "3",
        ];
        let run = client(addr, &args, None).await;
        succeeded(&run);
        let lines = json_lines(&run.stdout);
        assert_eq!(lines.len(), 1, "{kind}: {}", run.stdout);
        let paged = &lines[0];
        assert_eq!(paged["status"], "success");
        assert_eq!(paged["message"], format!("{entries} {key}"));
        assert_eq!(paged["data"][key].as_array().map(Vec::len), Some(entries));
        assert_eq!(paged["data"], unpaged[0]["data"], "{kind}");
        assert_eq!(paged["message"], unpaged[0]["message"], "{kind}");
    }
    let args = [
        "--admin",
        "--json",
        "list",
        "disks",
        "--all-pages",
        "--limit",
        "3",
    ];
    let lines = json_lines(&client(addr, &args, None).await.stdout);
    let ids: Vec<i64> = lines[0]["data"]["all_disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|disk| disk["id"].as_i64().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "once each, in order: {ids:?}"
    );

    // An empty list still shows its columns.
    let args = ["--admin", "list", "auth", "--all-pages"];
    let run = client(addr, &args, None).await;
    succeeded(&run);
    assert!(run.stdout.contains("| session"), "{}", run.stdout);
    assert!(
        run.stdout.trim_end().ends_with("(0 rows)"),
        "{}",
        run.stdout
    );

    // --after with --all-pages: from that cursor to the end.
    let first = client(addr, &["--admin", "list", "all", "--limit", "2"], None).await;
    let first = hint(&first.stderr).unwrap();
    let args = ["--admin", "list", "all", "--all-pages", "--after", &first];
    let run = client(addr, &args, None).await;
    succeeded(&run);
    assert_eq!(vm_rows(&run.stdout), &fleet(5)[2..], "{}", run.stdout);

    // A bad cursor: the error reply, and nothing half-written.
    let args = [
        "--admin",
        "--json",
        "list",
        "all",
        "--all-pages",
        "--after",
        "x",
    ];
    let run = client(addr, &args, None).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    let lines = json_lines(&run.stdout);
    assert_eq!(lines.len(), 1, "{}", run.stdout);
    assert_eq!(lines[0]["code"], "invalid_params");
}

#[tokio::test]
async fn all_pages_without_limit_asks_for_a_thousand_at_a_time() {
    let server = TestServer::start_with(|c| c.admin_token = Some(ADMIN.into())).await;
    seed_fleet(&server.db, 1_500, 0).await;
    let addr = server.addr.to_string();
    let run = client(&addr, &["--admin", "list", "all", "--all-pages"], None).await;
    succeeded(&run);
    assert_eq!(vm_rows(&run.stdout), fleet(1_500));
    assert_eq!(
        run.stdout.matches("| vm_id").count(),
        2,
        "pages of 1000 and 500"
    );
    assert!(run.stdout.trim_end().ends_with("(1500 rows)"));
}

#[tokio::test]
async fn the_shell_prints_every_page_without_asking_when_piped() {
    let server = TestServer::start_with(|c| c.admin_token = Some(ADMIN.into())).await;
    seed_fleet(&server.db, 120, 0).await;
    let addr = server.addr.to_string();
    let script = format!(
        "{}\nlist all\nlist\ndisks\nlist_all\nlist sideways\nquit\n",
        json!({"command": "authenticate", "data": {"admin_token": ADMIN}})
    );
    let run = client(&addr, &[], Some(&script)).await;
    succeeded(&run);
    let rows = vm_rows(&run.stdout);
    let twice: Vec<String> = fleet(120).into_iter().chain(fleet(120)).collect();
    assert_eq!(rows, twice, "`list all`, then `list_all`, each whole");
    // Pages of 50, the size when the terminal's height is unknown.
    assert_eq!(run.stdout.matches("(50 rows)").count(), 4, "{}", run.stdout);
    assert_eq!(run.stdout.matches("(20 rows)").count(), 2, "{}", run.stdout);
    assert!(
        run.stdout.contains("(0 rows)"),
        "`list` asked which list: {}",
        run.stdout
    );
    assert!(!run.stdout.contains("-- more") && !run.stderr.contains("-- more"));
    assert!(
        run.stderr.contains("`sideways` is not a list"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn the_shell_asks_between_pages_on_a_terminal() {
    let server = TestServer::start_with(|c| c.admin_token = Some(ADMIN.into())).await;
    seed_fleet(&server.db, 5, 0).await;
    // Eight lines: six for a page's frame and two rows.
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_vmm-client"));
    command
        .arg("--addr")
        .arg(server.addr.to_string())
        .env("VMM_HISTORY", ""); // no history file
    let mut terminal = Terminal::start(command, 8);
    let screen = terminal.screen.clone();
    let mut typing = |text: &str| terminal.typing(text);

    let prompt = format!("vmm {}> ", server.addr);
    let at = screen.wait_for(&prompt, 0).await;
    typing(&format!(
        "{}\r",
        json!({"command": "authenticate", "data": {"admin_token": ADMIN}})
    ));
    let at = screen.wait_for(r#""status":"success""#, at).await;
    let at = screen.wait_for(&prompt, at).await;

    typing("list all\r");
    let first = screen.wait_for(MORE, at).await;
    typing("\r");
    let second = screen.wait_for(MORE, first).await;
    typing("q\r");
    let end = screen.wait_for(&prompt, second).await;

    let text = screen.text();
    assert_eq!(vm_rows(&text[at..first]), fleet(2), "{text}");
    assert_eq!(vm_rows(&text[first..second]), &fleet(4)[2..], "{text}");
    assert!(vm_rows(&text[second..end]).is_empty(), "q stops: {text}");
    assert_eq!(text[at..first].matches("(2 rows)").count(), 1, "{text}");

    typing("quit\r");
    let status = terminal.exited().await;
    let text = screen.text();
    assert!(status.success(), "{status:?}: {text}");
    assert!(
        !text.contains("fleet-000005"),
        "the page after q never came"
    );
}
