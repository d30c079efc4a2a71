//! Comparing and storing secrets without leaking them through timing.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// SHA-256 of a secret: what is stored or compared instead of the secret.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether two secrets are equal, in time that depends on neither (their
/// digests are compared, so not even on their lengths).
pub fn same(given: &str, expected: &str) -> bool {
    digest(given).ct_eq(&digest(expected)).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares() {
        assert!(same("s3cret", "s3cret"));
        assert!(!same("s3cret", "s3cret "));
        assert!(!same("", "x"));
    }
}
