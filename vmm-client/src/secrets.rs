//! The secrets a run may need besides a VM's password: the operator token
//! for `--admin` and the server's enrollment secret for `register`. They come
//! from the environment, never from the command line (where `ps` and shell
//! history would show them). Out of `main`, so that the shell and the agent,
//! which register too, do not depend on it.

use crate::failure::Failure;

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
/// `VMM_REGISTRATION_SECRET`, never from the command line.
pub fn registration_secret() -> Option<String> {
    std::env::var("VMM_REGISTRATION_SECRET")
        .ok()
        .filter(|secret| !secret.is_empty())
}
