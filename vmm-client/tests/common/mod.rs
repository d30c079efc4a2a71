//! Running the `vmm-client` binary in a test.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// How a run of `vmm-client` ended.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `command` (the client, with its arguments and environment) with
/// `stdin` piped in (none when `None`), and waits for it to end.
pub async fn run(mut command: Command, stdin: Option<&str>) -> Run {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("start vmm-client");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        // The client may exit before reading it all (it cannot connect, say).
        let _ = pipe.write_all(input.as_bytes()).await;
        drop(pipe);
    }
    let out = tokio::time::timeout(vmm_tests::PATIENCE, child.wait_with_output())
        .await
        .expect("vmm-client finishes")
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
