//! The interactive shell's questions and its history, piped and on a
//! terminal: `register` refuses a bad answer as soon as it is given and asks
//! again, asks for the password twice, and no password or token ever reaches
//! the history file.

mod common;
#[path = "common/pty.rs"]
mod pty;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use pty::Terminal;
use tokio::process::Command;
use vmm_tests::TestServer;

const PASSWORD: &str = "longenough1";
/// One character short of the protocol's minimum of eight.
const SHORT: &str = "shortpw";
const OTHER: &str = "different1";
const TOO_SHORT: &str = "`password` must be 8 to 128 characters";
const DIFFER: &str = "the two passwords differ";

/// A directory of its own for `$HOME`, removed at the end.
struct Home(PathBuf);

impl Home {
    fn new(test: &str) -> Home {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("vmm-shell-{test}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Home(dir)
    }

    fn history(&self) -> PathBuf {
        self.0.join(".vmm_history")
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The shell at `addr` with `home` as `$HOME` (so its history file is
/// `home/.vmm_history`) and no secret from the test's own environment.
fn shell(addr: &str, home: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmm-client"));
    command
        .args(["--addr", addr])
        .env("HOME", home)
        .env_remove("VMM_HISTORY")
        .env_remove("VMM_PASSWORD")
        .env_remove("VMM_VM_ID")
        .env_remove("VMM_REGISTRATION_SECRET");
    command
}

#[tokio::test]
async fn piped_register_refuses_each_bad_answer_at_once_and_asks_again() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let home = Home::new("piped");
    let raw =
        format!(r#"{{"command":"authenticate","data":{{"vm_id":"vm1","password":"{PASSWORD}"}}}}"#);
    // Each refused answer is followed by the right one: were anything
    // checked only after the last question, the answers would be out of step.
    let script = format!(
        "\
register
bad id!
vm1
0
512
2
100

{SHORT}
{PASSWORD}
{OTHER}
{PASSWORD}
{PASSWORD}
register vm2 64 1
a
b
c
ping
authenticate vm1
{PASSWORD}
{raw}
quit
"
    );
    let run = common::run(shell(&addr, &home.0), Some(&script)).await;
    assert_eq!(
        run.code, 0,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    assert!(run.stdout.contains("VM vm1 registered"), "{}", run.stdout);
    assert!(
        run.stdout.contains("authenticated as vm1"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("PONG"), "{}", run.stdout);
    assert!(run.stdout.contains(r#""token":""#), "{}", run.stdout);
    let refusals = [
        "`vm_id` must be 1 to 64 characters",
        "`ram` must be between 1 and 4194304 MiB",
        TOO_SHORT,
        DIFFER,
    ];
    for refusal in refusals {
        assert!(run.stderr.contains(refusal), "{refusal}: {}", run.stderr);
    }
    // vm2: three passwords too short, then the command is dropped and
    // `ping` is a command again.
    assert_eq!(
        run.stderr.matches(TOO_SHORT).count(),
        1 + 3,
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("3 answers refused; command dropped"),
        "{}",
        run.stderr
    );
    for secret in [PASSWORD, SHORT, OTHER] {
        assert!(!run.stderr.contains(secret), "{secret}: {}", run.stderr);
    }
    assert!(!run.stdout.contains(OTHER) && !run.stdout.contains(SHORT));

    let mut check = server.client().await;
    let vm = check.authenticate("vm1", PASSWORD).await.unwrap();
    assert_eq!((vm.ram, vm.cpu, vm.disks.len()), (512, 2, 1));
    assert!(
        check.authenticate("vm2", "a").await.is_err(),
        "vm2 never registered"
    );

    // Piped input keeps no history at all.
    assert!(!home.history().exists(), "a history file from piped input");
}

#[tokio::test]
async fn the_shell_says_where_the_registration_secret_comes_from() {
    let server =
        TestServer::start_with(|c| c.registration_secret = Some("fleet-secret".into())).await;
    let addr = server.addr.to_string();
    let home = Home::new("secret");
    let script = format!("register vm1 64 1\n{PASSWORD}\n{PASSWORD}\nquit\n");

    let run = common::run(shell(&addr, &home.0), Some(&script)).await;
    assert!(run.stderr.contains("forbidden"), "{}", run.stderr);
    assert!(
        run.stderr.contains("set $VMM_REGISTRATION_SECRET"),
        "{}",
        run.stderr
    );
    // The hint follows the server's message without saying it again.
    let error = run.stderr.lines().find(|line| line.contains("forbidden"));
    assert!(
        error.is_some_and(|line| line.matches("this server").count() == 1),
        "{}",
        run.stderr
    );

    let mut with_secret = shell(&addr, &home.0);
    with_secret.env("VMM_REGISTRATION_SECRET", "fleet-secret");
    let run = common::run(with_secret, Some(&script)).await;
    assert!(run.stdout.contains("VM vm1 registered"), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("sending the registration secret from $VMM_REGISTRATION_SECRET"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("fleet-secret"), "{}", run.stderr);
}

/// The `"token":"..."` of the last reply on `screen` that has one.
fn last_token(screen: &str) -> String {
    let start = screen.rfind(r#""token":""#).expect("a token") + r#""token":""#.len();
    let len = screen[start..].find('"').expect("the token's end");
    screen[start..start + len].to_owned()
}

#[tokio::test]
async fn on_a_terminal_passwords_are_checked_as_typed_and_never_reach_the_history() {
    let server = TestServer::start().await;
    let home = Home::new("terminal");
    // A history written before the rule: its secret line goes on the next save.
    let old_secret = "oldsecret1";
    std::fs::write(
        home.history(),
        format!(
            "#V2\nlist_all\n{{\"command\":\"authenticate\",\"data\":{{\"vm_id\":\"old\",\"password\":\"{old_secret}\"}}}}\n"
        ),
    )
    .unwrap();

    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_vmm-client"));
    command
        .args(["--addr", &server.addr.to_string()])
        .env("HOME", &home.0)
        .env_remove("VMM_HISTORY")
        .env_remove("VMM_REGISTRATION_SECRET");
    let mut terminal = Terminal::start(command, 40);
    let screen = terminal.screen.clone();
    let prompt = format!("vmm {}> ", server.addr);
    let first = "password for vm1 (8 to 128 characters): ";
    let again = "password for vm1 again: ";

    let at = screen.wait_for(&prompt, 0).await;
    terminal.typing("register\r");
    let at = screen
        .wait_for("vm_id (1 to 64 of A-Z a-z 0-9 . _ -): ", at)
        .await;
    terminal.typing("vm1\r");
    let at = screen.wait_for("ram (MiB, 1 to 4194304): ", at).await;
    terminal.typing("512\r");
    let at = screen.wait_for("cpu (1 to 1024): ", at).await;
    terminal.typing("2\r");
    let at = screen.wait_for("empty line = no more): ", at).await;
    terminal.typing("\r");

    // Too short: refused at once, and the same question again.
    let at = screen.wait_for(first, at).await;
    terminal.typing(&format!("{SHORT}\r"));
    let refused = screen.wait_for(TOO_SHORT, at).await;
    let asked = screen.wait_for(first, refused).await;
    assert!(
        !screen.text()[at..asked].contains(again),
        "a short password was confirmed before it was refused:\n{}",
        screen.text()
    );

    // Two that differ: both asked again.
    terminal.typing(&format!("{PASSWORD}\r"));
    let at = screen.wait_for(again, asked).await;
    terminal.typing(&format!("{OTHER}\r"));
    let at = screen.wait_for(DIFFER, at).await;
    let at = screen.wait_for(first, at).await;
    terminal.typing(&format!("{PASSWORD}\r"));
    let at = screen.wait_for(again, at).await;
    terminal.typing(&format!("{PASSWORD}\r"));
    let at = screen.wait_for("VM vm1 registered", at).await;
    let at = screen.wait_for(&prompt, at).await;

    terminal.typing("authenticate vm1\r");
    let at = screen.wait_for("password for vm1: ", at).await;
    terminal.typing(&format!("{PASSWORD}\r"));
    let at = screen.wait_for("authenticated as vm1", at).await;
    let vm_prompt = format!("vmm {} (vm1)> ", server.addr);
    let at = screen.wait_for(&vm_prompt, at).await;

    // Raw JSON lines with the password, then with the token it gave.
    terminal.typing(&format!(
        "{{\"command\":\"authenticate\",\"data\":{{\"vm_id\":\"vm1\",\"password\":\"{PASSWORD}\"}}}}\r"
    ));
    let at = screen.wait_for(r#""token":""#, at).await;
    let at = screen.wait_for(&vm_prompt, at).await;
    let token = last_token(&screen.text());
    terminal.typing(&format!(
        "{{\"command\":\"authenticate\",\"data\":{{\"vm_id\":\"vm1\",\"token\":\"{token}\"}}}}\r"
    ));
    let at = screen.wait_for(r#""status":"success""#, at).await;
    let at = screen.wait_for(&vm_prompt, at).await;

    // The password typed at the prompt by mistake: not a command.
    terminal.typing(&format!("{PASSWORD}\r"));
    let at = screen.wait_for("unknown command", at).await;
    let at = screen.wait_for(&vm_prompt, at).await;
    terminal.typing("ping\r");
    let at = screen.wait_for("PONG", at).await;
    screen.wait_for(&vm_prompt, at).await;
    terminal.typing("quit\r");
    let status = terminal.exited().await;
    assert!(status.success(), "{status:?}: {}", screen.text());

    let history = std::fs::read_to_string(home.history()).unwrap();
    for kept in ["list_all", "register", "authenticate vm1", "ping"] {
        assert!(
            history.lines().any(|line| line == kept),
            "{kept:?} not in the history:\n{history}"
        );
    }
    for secret in [
        PASSWORD, SHORT, OTHER, &token, old_secret, "password", "token",
    ] {
        assert!(
            !history.contains(secret),
            "{secret:?} in the history:\n{history}"
        );
    }
}
