//! Comparing and storing secrets without leaking them through timing.

use base64ct::{Base64UrlUnpadded, Encoding};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// SHA-256 of a secret: what is stored or compared instead of the secret.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether two secrets are equal, in time that depends on neither (their
/// digests are compared, so not even on their lengths).
pub fn same(given: &str, expected: &str) -> bool {
    matches_digest(given, &digest(expected))
}

/// Whether a secret has this digest, in constant time.
pub fn matches_digest(given: &str, expected: &[u8; 32]) -> bool {
    digest(given).ct_eq(expected).into()
}

/// A new session token: 256 random bits, base64url without padding.
pub fn new_token() -> Option<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).ok()?;
    Some(Base64UrlUnpadded::encode_string(&bytes))
}

/// A new token family id: 63 random bits, so that ids say nothing about
/// how many tokens were issued, and no instance has to ask the database for
/// one before it can listen for its revocation.
pub fn new_family() -> Option<i64> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).ok()?;
    Some(i64::from_le_bytes(bytes) & i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares() {
        assert!(same("s3cret", "s3cret"));
        assert!(!same("s3cret", "s3cret "));
        assert!(!same("", "x"));
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }
}
