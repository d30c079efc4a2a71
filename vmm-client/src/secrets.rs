//! The secrets a run may need besides a VM's password: the operator token
//! for `--admin` and the server's enrollment secret for `register`. They come
//! from the environment or from a file, never from the command line itself
//! (where `ps` and shell history would show them). Out of `main`, so that the
//! shell and the agent, which register too, do not depend on it.

use std::path::Path;

use crate::failure::{Failure, describe};

/// The environment variable that may hold the server's enrollment secret.
pub const REGISTRATION_SECRET_ENV: &str = "VMM_REGISTRATION_SECRET";

/// The operator token for `--admin`: from `VMM_ADMIN_TOKEN`, never from the
/// command line.
pub fn admin_token() -> Result<String, Failure> {
    std::env::var("VMM_ADMIN_TOKEN")
        .ok()
        .filter(|token| !token.is_empty())
        .ok_or_else(|| {
            Failure::Usage("--admin needs the operator token in $VMM_ADMIN_TOKEN".into())
        })
}

/// The server's enrollment secret, for `register`: from
/// `VMM_REGISTRATION_SECRET`, never from the command line. What the shell's
/// `register` sends, having no flags of its own.
pub fn registration_secret() -> Option<String> {
    std::env::var(REGISTRATION_SECRET_ENV)
        .ok()
        .filter(|secret| !secret.is_empty())
}

/// The enrollment secret of a one-shot `register` or of the agent: the
/// contents of `file` (`--registration-secret-file`) without its trailing
/// line ending when given, else [`registration_secret`]. Both at once is a
/// usage error rather than a silent choice: a secret from a forgotten
/// environment variable would be refused with no clue why.
pub fn registration_secret_from(file: Option<&Path>) -> Result<Option<String>, Failure> {
    let Some(path) = file else {
        return Ok(registration_secret());
    };
    if registration_secret().is_some() {
        return Err(Failure::Usage(format!(
            "--registration-secret-file and ${REGISTRATION_SECRET_ENV} both give the enrollment secret; use one"
        )));
    }
    read_secret_file(path).map(Some)
}

/// The contents of `path` without the line ending(s) an editor or `echo`
/// leaves at its end.
fn read_secret_file(path: &Path) -> Result<String, Failure> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        Failure::Usage(format!(
            "cannot read the registration secret file {}: {}",
            path.display(),
            describe(&err)
        ))
    })?;
    let secret = text.trim_end_matches(['\n', '\r']);
    if secret.is_empty() {
        return Err(Failure::Usage(format!(
            "the registration secret file {} is empty",
            path.display()
        )));
    }
    Ok(secret.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_loses_its_trailing_line_ending_only() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("vmm-secret-test-{}", std::process::id()));
        let read = |contents: &str| {
            std::fs::write(&path, contents).unwrap();
            read_secret_file(&path)
        };
        assert_eq!(read("fleet secret\n").ok().as_deref(), Some("fleet secret"));
        assert_eq!(read(" s3cret\r\n\n").ok().as_deref(), Some(" s3cret"));
        assert_eq!(read("no-newline").ok().as_deref(), Some("no-newline"));
        assert!(matches!(read("\n"), Err(Failure::Usage(_))));
        let _ = std::fs::remove_file(&path);
        let missing = read_secret_file(Path::new("/nonexistent/vmm-secret"));
        assert!(matches!(missing, Err(Failure::Usage(_))));
    }
}
