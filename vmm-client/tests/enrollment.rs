//! `vmm-client register` and the agent send the enrollment secret, from
//! `VMM_REGISTRATION_SECRET` or from `--registration-secret-file`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use vmm_tests::TestServer;

const SECRET: &str = "fleet-secret";

/// Where the secret comes from.
#[derive(Clone, Copy)]
struct Source<'a> {
    env: Option<&'a str>,
    file: Option<&'a Path>,
}

const NONE: Source<'static> = Source {
    env: None,
    file: None,
};

async fn register(addr: &str, vm_id: &str, secret: Source<'_>) -> (i32, String) {
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
    if let Some(secret) = secret.env {
        command.env("VMM_REGISTRATION_SECRET", secret);
    }
    if let Some(file) = secret.file {
        command.arg("--registration-secret-file").arg(file);
    }
    let out = command.output().await.expect("run vmm-client");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A file holding `contents`, removed when dropped.
struct SecretFile(PathBuf);

impl SecretFile {
    fn new(name: &str, contents: &str) -> SecretFile {
        let path =
            std::env::temp_dir().join(format!("vmm-enrollment-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        SecretFile(path)
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn server_with_secret() -> TestServer {
    TestServer::start_with(|c| c.registration_secret = Some(SECRET.into())).await
}

#[tokio::test]
async fn the_client_sends_the_enrollment_secret_from_the_environment() {
    let server = server_with_secret().await;
    let addr = server.addr.to_string();
    let (code, stderr) = register(&addr, "vm-a", NONE).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("forbidden"), "{stderr}");
    let env = Source {
        env: Some(SECRET),
        file: None,
    };
    let (code, stderr) = register(&addr, "vm-a", env).await;
    assert_eq!(code, 0, "{stderr}");
}

#[tokio::test]
async fn the_client_reads_the_enrollment_secret_from_a_file() {
    let server = server_with_secret().await;
    let addr = server.addr.to_string();
    let right = SecretFile::new("right", &format!("{SECRET}\n"));
    let wrong = SecretFile::new("wrong", "not-the-secret\n");
    fn from(file: &SecretFile) -> Source<'_> {
        Source {
            env: None,
            file: Some(file.0.as_path()),
        }
    }

    let (code, stderr) = register(&addr, "vm-wrong", from(&wrong)).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("forbidden"), "{stderr}");
    let (code, stderr) = register(&addr, "vm-file", from(&right)).await;
    assert_eq!(code, 0, "{stderr}");
    server
        .client()
        .await
        .authenticate("vm-file", "enrolled-password")
        .await
        .unwrap();

    // The file and the environment both: which one was meant is unknown.
    let both = Source {
        env: Some(SECRET),
        file: Some(right.0.as_path()),
    };
    let (code, stderr) = register(&addr, "vm-both", both).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--registration-secret-file") && stderr.contains("VMM_REGISTRATION_SECRET"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(SECRET),
        "the secret is not echoed: {stderr}"
    );

    let missing = Path::new("/nonexistent/vmm-enrollment");
    let source = Source {
        env: None,
        file: Some(missing),
    };
    let (code, stderr) = register(&addr, "vm-missing", source).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("/nonexistent/vmm-enrollment"), "{stderr}");
}

#[tokio::test]
async fn the_agent_reads_the_enrollment_secret_from_a_file() {
    let server = server_with_secret().await;
    let addr = server.addr.to_string();
    let file = SecretFile::new("agent", &format!("{SECRET}\r\n"));
    // Its state file, never under the real /var/lib.
    let state = SecretFile::new("agent-state.json", "");
    let _ = std::fs::remove_file(&state.0);
    let agent = |env_secret: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vmm-client"));
        command
            .args(["--addr", &addr, "agent", "--vm-id", "vm-agent"])
            .args(["--ram", "64", "--cpu", "1", "--disk", "1", "--state-file"])
            .arg(&state.0)
            .arg("--registration-secret-file")
            .arg(&file.0)
            .env("VMM_PASSWORD", "agent-password")
            .env_remove("VMM_REGISTRATION_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(secret) = env_secret {
            command.env("VMM_REGISTRATION_SECRET", secret);
        }
        command
    };

    let out = agent(Some(SECRET)).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // Its log says when it registered; then the VM exists, with the
    // agent's password.
    let mut running = agent(None).spawn().unwrap();
    let mut log = BufReader::new(running.stderr.take().unwrap()).lines();
    let registered = tokio::time::timeout(vmm_tests::PATIENCE, async {
        while let Ok(Some(line)) = log.next_line().await {
            if line.ends_with("agent vm-agent: registered") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(registered.ok(), Some(true), "the agent logged `registered`");
    let _ = running.start_kill();
    let _ = running.wait().await;
    server
        .client()
        .await
        .authenticate("vm-agent", "agent-password")
        .await
        .unwrap();
}
