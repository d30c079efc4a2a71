//! `vmm-client --admin`: lists and the audit trail without a VM's credentials.

use std::process::Stdio;

use tokio::process::Command;
use vmm_tests::{TestServer, registration};

const ADMIN: &str = "operator-token-for-tests";

async fn client(addr: &str, args: &[&str], token: Option<&str>) -> (i32, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmm-client"));
    command
        .arg("--addr")
        .arg(addr)
        .args(args)
        .env_remove("VMM_ADMIN_TOKEN")
        .env_remove("VMM_VM_ID")
        .env_remove("VMM_PASSWORD")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(token) = token {
        command.env("VMM_ADMIN_TOKEN", token);
    }
    let out = command.output().await.expect("run vmm-client");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_operator_lists_and_reads_the_audit_trail() {
    let server = TestServer::start_with(|c| c.admin_token = Some(ADMIN.into())).await;
    server
        .client()
        .await
        .register(&registration("fleet-1", 64, vec![3]))
        .await
        .unwrap();
    let addr = server.addr.to_string();

    let (code, out, err) = client(&addr, &["--admin", "list", "all"], Some(ADMIN)).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("fleet-1"), "{out}");

    let (code, out, err) = client(
        &addr,
        &["--admin", "audit", "--vm-id", "fleet-1"],
        Some(ADMIN),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("register") && out.contains("success"), "{out}");

    let (code, _, err) = client(
        &addr,
        &["--admin", "list", "all"],
        Some("not-the-operator-token"),
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("invalid_credentials"), "{err}");
    let (code, _, err) = client(&addr, &["--admin", "list", "all"], None).await;
    assert_eq!(code, 2, "no token: {err}");
    let (code, _, err) = client(&addr, &["audit"], Some(ADMIN)).await;
    assert_eq!(code, 2, "audit needs --admin: {err}");
}

#[tokio::test]
async fn the_operator_revokes_every_session_of_a_vm() {
    let server = TestServer::start_with(|c| c.admin_token = Some(ADMIN.into())).await;
    let mut vm = server.client().await;
    vm.register(&registration("stolen", 64, vec![]))
        .await
        .unwrap();
    let (_, token) = vm
        .login("stolen", &vmm_tests::password_for("stolen"))
        .await
        .unwrap();
    let mut thief = server.client().await;
    thief.resume("stolen", &token).await.unwrap();
    let addr = server.addr.to_string();

    let (code, out, err) = client(&addr, &["--admin", "revoke", "stolen"], Some(ADMIN)).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked 1 tokens of stolen"), "{out}");
    // Both sessions end (within a second; polled here, not timed).
    for session in [&mut vm, &mut thief] {
        let deadline = vmm_tests::Deadline::new("the session to end");
        while session.list_active().await.is_ok() {
            deadline.tick().await;
        }
        let refused = session.list_active().await.unwrap_err();
        assert_eq!(refused.code(), Some(vmm_core::ErrorCode::NotAuthenticated));
    }

    let (code, _, err) = client(&addr, &["--admin", "revoke", "nobody"], Some(ADMIN)).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not_found"), "{err}");
    let (code, _, err) = client(&addr, &["revoke", "stolen"], Some(ADMIN)).await;
    assert_eq!(code, 2, "revoke needs --admin: {err}");
}

#[tokio::test]
async fn the_operator_watches_without_a_vm() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let server = TestServer::start_with(|c| c.admin_token = Some(ADMIN.into())).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm-client"))
        .args([
            "--addr",
            &server.addr.to_string(),
            "--admin",
            "--json",
            "watch",
            "--topics",
            "vms",
        ])
        .env("VMM_ADMIN_TOKEN", ADMIN)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start vmm-client");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || {
        tokio::time::timeout(vmm_tests::PATIENCE, lines.next_line())
            .await
            .expect("a line in time")
            .unwrap()
            .expect("a line")
    };
    // The watch reply first: with --json the operator session's is not shown.
    assert!(next().await.contains("watching"));
    server
        .client()
        .await
        .register(&registration("seen-by-op", 64, vec![]))
        .await
        .unwrap();
    let event = next().await;
    assert!(
        event.contains("vm_registered") && event.contains("seen-by-op"),
        "{event}"
    );
    let _ = child.start_kill();
}
