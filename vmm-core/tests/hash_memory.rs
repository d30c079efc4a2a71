//! Hashing reuses the argon2 memory each hashing slot allocated once: a
//! login or a registration allocates no megabytes. Its own test binary,
//! because it needs its own global allocator, which counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use vmm_core::password::{HashCost, Passwords, Verified};

/// Allocations this large are argon2 memory, not bookkeeping.
const LARGE: usize = 1024 * 1024;

/// Bytes allocated in blocks of at least [`LARGE`], by any thread.
static LARGE_BYTES: AtomicUsize = AtomicUsize::new(0);

struct Counting;

fn count(size: usize) {
    if size >= LARGE {
        LARGE_BYTES.fetch_add(size, Ordering::Relaxed);
    }
}

// SAFETY: every call goes straight to `System`, which upholds the contract.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: the caller's pointer, layout and size, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's pointer and layout, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn large_bytes() -> usize {
    LARGE_BYTES.load(Ordering::Relaxed)
}

/// One test, not several: tests run in parallel, and the counter is global.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashing_and_verifying_allocate_no_argon2_memory() {
    let before = large_bytes();
    let passwords = Arc::new(Passwords::new(2, HashCost::default()).unwrap());
    assert_eq!(large_bytes(), before, "nothing is reserved before a hash");

    // Warm-up: the runtime's blocking threads, the dummy hash, and both
    // hashing slots' memory (two hashes at once), which the counter sees,
    // so it would see a hash's own memory too.
    let (hash, _) = tokio::join!(
        passwords.hash("securePass123".into()),
        passwords.hash("another password".into())
    );
    let hash = hash.unwrap();
    assert!(
        large_bytes() - before >= 2 * 19_456 * 1024,
        "the slots' memory went uncounted: {} bytes",
        large_bytes() - before
    );
    passwords.verify("warm".into(), None).await.unwrap();

    let before = large_bytes();
    for n in 0..5 {
        let other = passwords.hash(format!("password {n}")).await.unwrap();
        assert_ne!(other, hash);
    }
    for _ in 0..3 {
        let verified = passwords
            .verify("securePass123".into(), Some(hash.clone()))
            .await
            .unwrap();
        assert_eq!(verified, Verified::Yes);
    }
    let wrong = passwords
        .verify("wrong".into(), Some(hash.clone()))
        .await
        .unwrap();
    assert_eq!(wrong, Verified::No);
    let unknown = passwords.verify("wrong".into(), None).await.unwrap();
    assert_eq!(unknown, Verified::No);
    assert_eq!(
        large_bytes() - before,
        0,
        "5 hashes and 5 verifications allocated megabytes"
    );
    // The warm-up's verification also made the dummy hash: four.
    assert_eq!(passwords.hashes_run(), 4 + 5 + 5);

    // As many at once as the semaphore allows: each finds memory of its own.
    let before = large_bytes();
    let tasks: Vec<_> = (0..6)
        .map(|n| {
            let passwords = Arc::clone(&passwords);
            tokio::spawn(async move { passwords.hash(format!("password {n}")).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(
        large_bytes() - before,
        0,
        "concurrent hashes allocated megabytes"
    );
}
