//! Password hashing, kept off the async worker threads.
//!
//! argon2id is deliberately slow and memory-hungry (19 MiB per hash with the
//! defaults). Each hash runs in `spawn_blocking`, and a semaphore lets at most
//! `concurrency` run at once, so a flood of `authenticate` attempts queues up
//! instead of exhausting memory or starving other connections.

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::{OnceCell, Semaphore};

use crate::error::{Error, Result};

#[derive(Debug)]
pub struct Passwords {
    params: Params,
    permits: Semaphore,
    /// Verified against when the VM does not exist, so that an unknown VM and
    /// a wrong password take the same time.
    dummy_hash: OnceCell<String>,
}

impl Passwords {
    /// `concurrency` is the most hashes that run at once (at least one).
    pub fn new(concurrency: usize) -> Passwords {
        Passwords {
            params: Params::default(),
            permits: Semaphore::new(concurrency.max(1)),
            dummy_hash: OnceCell::new(),
        }
    }

    /// Hashes a password into an argon2id PHC string.
    pub async fn hash(&self, password: String) -> Result<String> {
        let params = self.params.clone();
        self.blocking(move || {
            Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                .hash_password(password.as_bytes())
                .map(|hash| hash.to_string())
                .map_err(|err| {
                    tracing::error!(error = %err, "password hashing failed");
                    Error::internal()
                })
        })
        .await
    }

    /// Checks a password against a stored PHC string, or against a dummy hash
    /// when there is none, which always fails but costs the same.
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool> {
        let (hash, known) = match hash {
            Some(hash) => (hash, true),
            None => (self.dummy_hash().await?, false),
        };
        let matches = self
            .blocking(move || {
                Ok(Argon2::default()
                    .verify_password(password.as_bytes(), hash.as_str())
                    .is_ok())
            })
            .await?;
        Ok(known && matches)
    }

    async fn dummy_hash(&self) -> Result<String> {
        self.dummy_hash
            .get_or_try_init(|| self.hash("vmm dummy password".to_owned()))
            .await
            .cloned()
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::internal())?;
        tokio::task::spawn_blocking(work).await.map_err(|err| {
            tracing::error!(error = %err, "password hashing task failed");
            Error::internal()
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_are_argon2id_and_verify() {
        let passwords = Passwords::new(2);
        let hash = passwords.hash("securePass123".into()).await.unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(!hash.contains("securePass123"));
        assert!(
            passwords
                .verify("securePass123".into(), Some(hash.clone()))
                .await
                .unwrap()
        );
        assert!(!passwords.verify("wrong".into(), Some(hash)).await.unwrap());
        assert!(
            !passwords
                .verify("vmm dummy password".into(), None)
                .await
                .unwrap()
        );
    }
}
