//! Password hashing, kept off the async worker threads.
//!
//! argon2id is deliberately slow and memory-hungry (19 MiB per hash with the
//! defaults). Each hash runs in `spawn_blocking`, and a semaphore lets at most
//! `concurrency` run at once, so a flood of `authenticate` attempts queues up
//! instead of exhausting memory or starving other connections.
//!
//! Each of those `concurrency` slots owns one argon2 memory block, allocated
//! by its first hash and reused by every hash after it. Allocating 19 MiB
//! per hash instead left the process holding hundreds of MiB that the
//! allocator never gave back; now hashing costs at most
//! `concurrency × m_cost` KiB, and an instance that never hashes costs
//! nothing.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use subtle::ConstantTimeEq;
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};

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
    /// Shared with the blocking tasks, which hold their permit until the
    /// hash is done even if the caller has gone: the cap is on hashes
    /// running, not on callers waiting.
    permits: Arc<Semaphore>,
    /// One argon2 memory per permit.
    memory: Arc<MemoryPool>,
    /// Hashes computed so far (hashing and verifying alike).
    runs: AtomicU64,
    /// Hashes waiting for a permit; counted per hash, which costs nothing
    /// beside the hash.
    queued: AtomicUsize,
    /// Verified against when the VM does not exist, so that an unknown VM and
    /// a wrong password take the same time.
    dummy_hash: OnceCell<String>,
}

impl Passwords {
    /// `concurrency` is the most hashes that run at once (at least one);
    /// each gets its own argon2 memory of `cost.memory_kib`, allocated by
    /// its first hash.
    pub fn new(concurrency: usize, cost: HashCost) -> std::result::Result<Passwords, String> {
        let params = cost.params()?;
        let slots = concurrency.max(1);
        Ok(Passwords {
            memory: Arc::new(MemoryPool::new(slots, params.block_count())),
            params,
            permits: Arc::new(Semaphore::new(slots)),
            runs: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
            dummy_hash: OnceCell::new(),
        })
    }

    /// Hashes a password into an argon2id PHC string.
    pub async fn hash(&self, password: String) -> Result<String> {
        let params = self.params.clone();
        self.blocking(move |memory| {
            hash_into(&params, password.as_bytes(), memory).map_err(|err| {
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
        self.blocking(move |memory| {
            let Ok(stored) = PasswordHash::new(&hash) else {
                return Ok(Verified::No);
            };
            // Always verify, also against the dummy hash: skipping it would
            // make an unknown VM answer faster than a wrong password.
            let matches = matches(password.as_bytes(), &stored, memory);
            if !(known && matches) {
                return Ok(Verified::No);
            }
            if !outdated(&stored, &current) {
                return Ok(Verified::Yes);
            }
            hash_into(&current, password.as_bytes(), memory)
                .map(Verified::YesRehashed)
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

    /// Hashes waiting for a hashing slot.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut [Block]) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let waiting = Waiting::new(&self.queued);
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| Error::internal())?;
        drop(waiting);
        self.runs.fetch_add(1, Ordering::Relaxed);
        let pool = Arc::clone(&self.memory);
        tokio::task::spawn_blocking(move || {
            // Taken and given back on the blocking thread, together with the
            // permit: a caller that goes away, or a panic, cannot leave a
            // permit without its memory.
            let mut lease = pool.take(permit)?;
            work(&mut lease.memory)
        })
        .await
        .map_err(|err| {
            tracing::error!(error = %err, "password hashing task failed");
            Error::internal()
        })?
    }
}

/// A new argon2id PHC string for `password`, with a fresh random salt,
/// computed in `memory`.
fn hash_into(
    params: &Params,
    password: &[u8],
    memory: &mut [Block],
) -> std::result::Result<String, String> {
    let mut salt = [0u8; Salt::RECOMMENDED_LENGTH];
    getrandom::fill(&mut salt).map_err(|err| format!("no random salt: {err}"))?;
    let salt = Salt::new(&salt).map_err(|err| err.to_string())?;
    let mut output = [0u8; Params::DEFAULT_OUTPUT_LEN];
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    compute(&argon2, password, &salt, &mut output, memory).map_err(|err| err.to_string())?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(params).map_err(|err| err.to_string())?,
        salt: Some(salt),
        hash: Some(Output::new(&output).map_err(|err| err.to_string())?),
    };
    Ok(phc.to_string())
}

/// Whether `password` hashes to `stored` under the algorithm, version,
/// parameters and salt written in it.
fn matches(password: &[u8], stored: &PasswordHash, memory: &mut [Block]) -> bool {
    let (Some(salt), Some(expected)) = (&stored.salt, &stored.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::new(stored.algorithm.as_str()) else {
        return false;
    };
    let Ok(version) = stored
        .version
        .map_or(Ok(Version::default()), Version::try_from)
    else {
        return false;
    };
    // Carries the stored output length, so the output is computed at that length.
    let Ok(params) = Params::try_from(stored) else {
        return false;
    };
    let mut output = [0u8; Output::MAX_LENGTH];
    let Some(output) = output.get_mut(..expected.len()) else {
        return false;
    };
    let argon2 = Argon2::new(algorithm, version, params);
    compute(&argon2, password, salt, output, memory).is_ok()
        && bool::from(output.ct_eq(expected.as_bytes()))
}

/// Whether a hash that matched was made otherwise than new hashes are now.
fn outdated(stored: &PasswordHash, current: &Params) -> bool {
    let same_function = stored.algorithm == Algorithm::Argon2id.ident()
        && stored.version == Some(Version::V0x13.into());
    let same_cost = Params::try_from(stored).is_ok_and(|stored| {
        (stored.m_cost(), stored.t_cost(), stored.p_cost())
            == (current.m_cost(), current.t_cost(), current.p_cost())
    });
    !(same_function && same_cost)
}

/// Hashes in `memory` when it is large enough. A stored hash with a larger
/// memory cost than today's (the cost was lowered since) gets memory of its
/// own for this one verification, until its re-hash replaces it.
fn compute(
    argon2: &Argon2<'_>,
    password: &[u8],
    salt: &[u8],
    output: &mut [u8],
    memory: &mut [Block],
) -> argon2::Result<()> {
    match memory.get_mut(..argon2.params().block_count()) {
        Some(memory) => argon2.hash_password_into_with_memory(password, salt, output, memory),
        None => argon2.hash_password_into(password, salt, output),
    }
}

/// A hash in [`Passwords`]' queue until dropped: also when its caller
/// gives up while it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(queued: &'a AtomicUsize) -> Waiting<'a> {
        queued.fetch_add(1, Ordering::Relaxed);
        Waiting(queued)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The argon2 memories of the hashing slots not in use.
struct MemoryPool {
    free: Mutex<Vec<Vec<Block>>>,
    blocks_each: usize,
}

impl MemoryPool {
    fn new(slots: usize, blocks_each: usize) -> MemoryPool {
        MemoryPool {
            free: Mutex::new(Vec::with_capacity(slots)),
            blocks_each,
        }
    }

    /// A free memory, for the holder of `permit`, allocated the first time
    /// a slot is used: there are never more than there are permits.
    fn take(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Result<Lease> {
        let free = self.lock().pop();
        let memory = match free {
            Some(memory) => memory,
            None => allocate(self.blocks_each).ok_or_else(|| {
                tracing::error!(
                    kib = self.blocks_each * Block::SIZE / 1024,
                    "cannot allocate argon2 memory"
                );
                Error::internal()
            })?,
        };
        Ok(Lease {
            memory,
            pool: Arc::clone(self),
            _permit: permit,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<Block>>> {
        // The vector is whole even if a holder panicked.
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for MemoryPool {
    /// Counts, not the blocks themselves: megabytes of numbers.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `try_lock`: formatting must not wait for, or deadlock on, a hash.
        let free = self.free.try_lock().map(|free| free.len()).ok();
        f.debug_struct("MemoryPool")
            .field("free", &free)
            .field("blocks_each", &self.blocks_each)
            .finish()
    }
}

/// `blocks` argon2 blocks, or `None` when they cannot be had.
fn allocate(blocks: usize) -> Option<Vec<Block>> {
    let mut memory = Vec::new();
    memory.try_reserve_exact(blocks).ok()?;
    memory.resize(blocks, Block::new());
    Some(memory)
}

/// A hashing slot in use: its memory goes back to the pool when it is
/// dropped, before its permit is released (fields drop after `drop`), so
/// the next holder of the permit finds it there.
struct Lease {
    memory: Vec<Block>,
    pool: Arc<MemoryPool>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let memory = std::mem::take(&mut self.memory);
        self.pool.lock().push(memory);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hash waiting for the only slot is in the queue until it has it.
    #[tokio::test]
    async fn queued_counts_hashes_waiting_for_a_slot() {
        let cheap = HashCost {
            memory_kib: 8192,
            iterations: 1,
            parallelism: 1,
        };
        let passwords = Arc::new(Passwords::new(1, cheap).unwrap());
        let held = Arc::clone(&passwords.permits)
            .acquire_owned()
            .await
            .unwrap();
        let hashing = tokio::spawn({
            let passwords = Arc::clone(&passwords);
            async move { passwords.hash("queued-password".into()).await }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while passwords.queued() != 1 {
            assert!(std::time::Instant::now() < deadline, "never queued");
            tokio::task::yield_now().await;
        }
        drop(held);
        hashing.await.unwrap().unwrap();
        assert_eq!(passwords.queued(), 0);
        assert_eq!(passwords.hashes_run(), 1);
    }

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

    /// Stored by the code before the memory pool (argon2's own
    /// `hash_password`), for "securePass123": they must still verify.
    const BEFORE_DEFAULT: &str = "$argon2id$v=19$m=19456,t=2,p=1$p7Gko9SXi+dA4eTbKxYTiA$SBRCCUH6pQ0vT4Zg9w73bJCXmEuFwJSZxBKvo50fQS8";
    const BEFORE_CHEAPER: &str = "$argon2id$v=19$m=8192,t=1,p=1$3kSQTxLtjfRUBjLceT+wxg$4KFHY8SzqOlkfsb8w07vY9ykFNaraEkcKEHQN0qkxwI";
    const BEFORE_ARGON2I: &str = "$argon2i$v=19$m=19456,t=2,p=1$miLlZgNK+bOK4qoc66L91w$DLqvp2h5zYECThofJyPx66VpurcjQtOabVob8uvWhqY";

    #[tokio::test]
    async fn hashes_stored_before_the_memory_pool_still_verify() {
        let passwords = Passwords::new(1, HashCost::default()).unwrap();
        let verify =
            |password: &str, hash: &str| passwords.verify(password.into(), Some(hash.into()));
        assert_eq!(
            verify("securePass123", BEFORE_DEFAULT).await.unwrap(),
            Verified::Yes
        );
        assert_eq!(
            verify("securePass124", BEFORE_DEFAULT).await.unwrap(),
            Verified::No
        );
        for (before, starts) in [
            // A smaller memory cost: computed in part of the pooled memory.
            (BEFORE_CHEAPER, "$argon2id$v=19$m=19456,t=2,p=1$"),
            // Another argon2 variant, same cost: verified under its own
            // algorithm, then replaced by argon2id.
            (BEFORE_ARGON2I, "$argon2id$v=19$m=19456,t=2,p=1$"),
        ] {
            let Verified::YesRehashed(new_hash) = verify("securePass123", before).await.unwrap()
            else {
                panic!("expected a re-hash of {before}");
            };
            assert!(new_hash.starts_with(starts), "{new_hash}");
            assert_eq!(
                verify("securePass123", &new_hash).await.unwrap(),
                Verified::Yes
            );
            assert_eq!(verify("wrong", before).await.unwrap(), Verified::No);
        }

        // A larger memory cost than the pooled memory: verified in memory of
        // its own, then re-hashed at the cheaper cost.
        let cheaper = HashCost {
            memory_kib: 8192,
            iterations: 1,
            parallelism: 1,
        };
        let cheap = Passwords::new(1, cheaper).unwrap();
        let Verified::YesRehashed(new_hash) = cheap
            .verify("securePass123".into(), Some(BEFORE_DEFAULT.into()))
            .await
            .unwrap()
        else {
            panic!("expected a re-hash");
        };
        assert!(
            new_hash.starts_with("$argon2id$v=19$m=8192,t=1,p=1$"),
            "{new_hash}"
        );
        assert_eq!(
            cheap
                .verify("wrong".into(), Some(BEFORE_DEFAULT.into()))
                .await
                .unwrap(),
            Verified::No
        );
    }

    /// The same PHC layout as argon2's `hash_password`: 16 bytes of salt and
    /// 32 of hash, in B64 without padding.
    #[tokio::test]
    async fn new_hashes_keep_the_phc_layout() {
        let passwords = Passwords::new(1, HashCost::default()).unwrap();
        let hash = passwords.hash("securePass123".into()).await.unwrap();
        let fields: Vec<&str> = hash.split('$').collect();
        assert_eq!(
            fields[..4],
            ["", "argon2id", "v=19", "m=19456,t=2,p=1"],
            "{hash}"
        );
        let b64 = |field: &str| {
            field
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        };
        assert!(fields[4].len() == 22 && b64(fields[4]), "salt of {hash}");
        assert!(fields[5].len() == 43 && b64(fields[5]), "hash of {hash}");
        assert_eq!(fields.len(), 6, "{hash}");
        let other = passwords.hash("securePass123".into()).await.unwrap();
        assert_ne!(hash, other, "every hash has its own salt");
    }

    #[tokio::test]
    async fn malformed_stored_hashes_do_not_verify() {
        let passwords = Passwords::new(1, HashCost::default()).unwrap();
        for stored in [
            "",
            "not a hash",
            "$argon2id$v=19$m=19456,t=2,p=1$p7Gko9SXi+dA4eTbKxYTiA",
            "$argon2id$v=19$m=19456,t=2,p=1$p7Gko9SXi+dA4eTbKxYTiA$",
            "$argon2id$v=16$m=19456,t=2,p=1$p7Gko9SXi+dA4eTbKxYTiA$SBRCCUH6pQ0vT4Zg9w73bJCXmEuFwJSZxBKvo50fQS8",
            "$scrypt$ln=15,r=8,p=1$p7Gko9SXi+dA4eTbKxYTiA$SBRCCUH6pQ0vT4Zg9w73bJCXmEuFwJSZxBKvo50fQS8",
            "$argon2id$v=19$m=1,t=2,p=1$p7Gko9SXi+dA4eTbKxYTiA$SBRCCUH6pQ0vT4Zg9w73bJCXmEuFwJSZxBKvo50fQS8",
        ] {
            let verified = passwords
                .verify("securePass123".into(), Some(stored.into()))
                .await
                .unwrap();
            assert_eq!(verified, Verified::No, "{stored:?}");
        }
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
