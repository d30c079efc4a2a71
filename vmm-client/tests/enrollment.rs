//! `vmm-client register` and the agent send `VMM_REGISTRATION_SECRET`.

use std::process::Stdio;

use tokio::process::Command;
use vmm_tests::TestServer;

async fn register(addr: &str, vm_id: &str, secret: Option<&str>) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmm-client"));
    command
        .args([
            "--addr", addr, "register", "--vm-id", vm_id, "--ram", "64", "--cpu", "1",
        ])
        .env("VMM_PASSWORD", "enrolled-password")
        .env_remove("VMM_REGISTRATION_SECRET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(secret) = secret {
        command.env("VMM_REGISTRATION_SECRET", secret);
    }
    let out = command.output().await.expect("run vmm-client");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_client_sends_the_enrollment_secret_from_the_environment() {
    let server =
        TestServer::start_with(|c| c.registration_secret = Some("fleet-secret".into())).await;
    let addr = server.addr.to_string();
    let (code, stderr) = register(&addr, "vm-a", None).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("forbidden"), "{stderr}");
    let (code, stderr) = register(&addr, "vm-a", Some("fleet-secret")).await;
    assert_eq!(code, 0, "{stderr}");
}
