//! Where a one-shot command's password comes from. Never from argv: a value
//! there shows up in `ps` and in shell history.

use std::io::{self, BufRead, IsTerminal};

use crate::failure::Failure;
use crate::text::chomp;

/// The environment variable that may hold the password.
pub const ENV: &str = "VMM_PASSWORD";

/// The password, from (in this order) one line of stdin when `from_stdin`,
/// `$VMM_PASSWORD`, or a prompt without echo when stdin is a terminal.
/// Blocking: call it off the async threads.
pub fn obtain(from_stdin: bool, vm_id: &str) -> Result<String, Failure> {
    if from_stdin {
        let mut line = String::new();
        return match io::stdin().lock().read_line(&mut line) {
            Ok(0) => Err(Failure::Usage(
                "--password-stdin: stdin ended before a password line".into(),
            )),
            Ok(_) => Ok(chomp(line)),
            Err(err) => Err(Failure::Usage(format!(
                "--password-stdin: cannot read stdin: {err}"
            ))),
        };
    }
    if let Ok(password) = std::env::var(ENV) {
        return Ok(password);
    }
    if !io::stdin().is_terminal() {
        return Err(Failure::Usage(format!(
            "no password for {vm_id}: set {ENV}, pass --password-stdin, or run on a terminal to be prompted"
        )));
    }
    rpassword::prompt_password(format!("password for {vm_id}: "))
        .map_err(|err| Failure::Usage(format!("cannot read the password: {err}")))
}

/// [`obtain`] on a blocking thread.
pub async fn obtain_async(from_stdin: bool, vm_id: &str) -> Result<String, Failure> {
    let vm_id = vm_id.to_owned();
    tokio::task::spawn_blocking(move || obtain(from_stdin, &vm_id))
        .await
        .map_err(|err| Failure::Usage(format!("cannot read the password: {err}")))?
}
