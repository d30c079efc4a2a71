//! Password hashing, kept off the async worker threads.
//!
//! argon2id is deliberately slow and memory-hungry (19 MiB per hash with the
//! defaults). Each hash runs in `spawn_blocking`, and a semaphore lets at most
//! `concurrency` run at once, so a flood of `authenticate` attempts queues up
//! instead of exhausting memory or starving other connections.

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, PasswordHash, Version};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{OnceCell, Semaphore};

use crate::error::{Error, Result};

/// argon2id cost parameters for new hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashCost {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for HashCost {
    /// OWASP's recommendation for argon2id: 19 MiB, 2 iterations, 1 lane.
    fn default() -> HashCost {
        HashCost {
            memory_kib: 19_456,
            iterations: 2,
            parallelism: 1,
        }
    }
}

impl HashCost {
    /// The argon2 parameters, or why these are not valid.
    pub fn params(&self) -> std::result::Result<Params, String> {
        Params::new(self.memory_kib, self.iterations, self.parallelism, None)
            .map_err(|err| format!("invalid argon2 parameters: {err}"))
    }
}

/// The outcome of checking a password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// Wrong password, or no such VM.
    No,
    /// Right password, stored with the current parameters.
    Yes,
    /// Right password, stored with other parameters: here is a new hash
    /// with the current ones, to store instead.
    YesRehashed(String),
}

#[derive(Debug)]
pub struct Passwords {
    params: Params,
    permits: Semaphore,
    /// Hashes computed so far (hashing and verifying alike).
    runs: AtomicU64,
    /// Verified against when the VM does not exist, so that an unknown VM and
    /// a wrong password take the same time.
    dummy_hash: OnceCell<String>,
}

impl Passwords {
    /// `concurrency` is the most hashes that run at once (at least one).
    pub fn new(concurrency: usize, cost: HashCost) -> std::result::Result<Passwords, String> {
        Ok(Passwords {
            params: cost.params()?,
            permits: Semaphore::new(concurrency.max(1)),
            runs: AtomicU64::new(0),
            dummy_hash: OnceCell::new(),
        })
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
    /// when there is none, which always fails but costs the same. A right
    /// password stored with outdated parameters is hashed again.
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<Verified> {
        let (hash, known) = match hash {
            Some(hash) => (hash, true),
            None => (self.dummy_hash().await?, false),
        };
        let current = self.params.clone();
        self.blocking(move || {
            // Always verify, also against the dummy hash: skipping it would
            // make an unknown VM answer faster than a wrong password.
            let matches = Argon2::default()
                .verify_password(password.as_bytes(), hash.as_str())
                .is_ok();
            if !(known && matches) {
                return Ok(Verified::No);
            }
            let outdated = PasswordHash::new(&hash)
                .ok()
                .and_then(|parsed| Params::try_from(&parsed).ok())
                .is_none_or(|stored| {
                    (stored.m_cost(), stored.t_cost(), stored.p_cost())
                        != (current.m_cost(), current.t_cost(), current.p_cost())
                });
            if !outdated {
                return Ok(Verified::Yes);
            }
            Argon2::new(Algorithm::Argon2id, Version::V0x13, current)
                .hash_password(password.as_bytes())
                .map(|hash| Verified::YesRehashed(hash.to_string()))
                .map_err(|err| {
                    tracing::error!(error = %err, "password re-hashing failed");
                    Error::internal()
                })
        })
        .await
    }

    async fn dummy_hash(&self) -> Result<String> {
        self.dummy_hash
            .get_or_try_init(|| self.hash("vmm dummy password".to_owned()))
            .await
            .cloned()
    }

    /// How many hashes this instance has computed: a measure of the work
    /// that logins and registrations cost it.
    pub fn hashes_run(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
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
        self.runs.fetch_add(1, Ordering::Relaxed);
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
    async fn hashes_are_argon2id_verify_and_follow_new_parameters() {
        let passwords = Passwords::new(2, HashCost::default()).unwrap();
        assert_eq!(passwords.hashes_run(), 0);
        let hash = passwords.hash("securePass123".into()).await.unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(!hash.contains("securePass123"));
        assert_eq!(passwords.hashes_run(), 1, "every hash is counted");
        let check = |password: &str, hash: Option<String>| passwords.verify(password.into(), hash);
        assert_eq!(
            check("securePass123", Some(hash.clone())).await.unwrap(),
            Verified::Yes
        );
        assert_eq!(
            check("wrong", Some(hash.clone())).await.unwrap(),
            Verified::No
        );
        assert_eq!(
            check("vmm dummy password", None).await.unwrap(),
            Verified::No
        );

        // The same password under new parameters: verified, and re-hashed.
        let cheaper = HashCost {
            memory_kib: 8192,
            iterations: 1,
            parallelism: 1,
        };
        let updated = Passwords::new(2, cheaper).unwrap();
        let Verified::YesRehashed(new_hash) = updated
            .verify("securePass123".into(), Some(hash.clone()))
            .await
            .unwrap()
        else {
            panic!("expected a re-hash");
        };
        assert!(
            new_hash.starts_with("$argon2id$v=19$m=8192,t=1,p=1$"),
            "{new_hash}"
        );
        let again = updated
            .verify("securePass123".into(), Some(new_hash))
            .await
            .unwrap();
        assert_eq!(again, Verified::Yes);
        assert_eq!(
            updated.verify("wrong".into(), Some(hash)).await.unwrap(),
            Verified::No
        );
        let invalid = HashCost {
            memory_kib: 1,
            iterations: 1,
            parallelism: 1,
        };
        assert!(Passwords::new(1, invalid).is_err());
    }

    /// An unknown VM must cost a real verification (against the dummy hash),
    /// or timing would tell which VMs exist. Relative, so machine speed and
    /// load do not matter: skipping the hash makes it a thousand times faster.
    #[tokio::test]
    async fn an_unknown_vm_costs_a_full_verification() {
        let passwords = Passwords::new(1, HashCost::default()).unwrap();
        let hash = passwords.hash("securePass123".into()).await.unwrap();
        passwords.verify("warm".into(), None).await.unwrap();
        let mut known = Vec::new();
        let mut unknown = Vec::new();
        for _ in 0..5 {
            let t = std::time::Instant::now();
            passwords
                .verify("wrong".into(), Some(hash.clone()))
                .await
                .unwrap();
            known.push(t.elapsed());
            let t = std::time::Instant::now();
            passwords.verify("wrong".into(), None).await.unwrap();
            unknown.push(t.elapsed());
        }
        known.sort();
        unknown.sort();
        assert!(
            unknown[2] * 4 > known[2],
            "unknown {unknown:?} vs known {known:?}"
        );
    }
}
