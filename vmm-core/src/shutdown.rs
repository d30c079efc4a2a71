//! The stop signal that every connection waits on beside its input, so
//! that shutdown can stop reading new requests and let the ones in flight
//! finish.
//!
//! A `tokio::sync::broadcast` channel does this, but waiting on it again
//! (which a connection does at every wake-up, in the `select!` over its
//! input) takes the channel's one lock, shared by every connection: with
//! many connections on several cores, that lock is on the path of every
//! request. Here a connection's wait touches only its own waker and reads
//! one flag that changes once; the lock is taken when a connection starts
//! and ends, and once to stop.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use futures_util::task::AtomicWaker;

/// The sending side: [`Shutdown::stop`] ends every [`Stop::stopped`].
#[derive(Debug, Default)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    stopped: AtomicBool,
    waiters: Mutex<Waiters>,
}

#[derive(Debug, Default)]
struct Waiters {
    next: u64,
    wakers: HashMap<u64, Arc<AtomicWaker>>,
}

impl Inner {
    fn waiters(&self) -> std::sync::MutexGuard<'_, Waiters> {
        // The map stays consistent whatever panicked while it was held.
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// A receiver, for one connection.
    pub fn subscribe(&self) -> Stop {
        let waker = Arc::new(AtomicWaker::new());
        let mut waiters = self.inner.waiters();
        let key = waiters.next;
        waiters.next += 1;
        waiters.wakers.insert(key, Arc::clone(&waker));
        Stop {
            inner: Arc::clone(&self.inner),
            waker,
            key,
        }
    }

    /// Ends every receiver's wait, those subscribed later too.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        for waker in self.inner.waiters().wakers.values() {
            waker.wake();
        }
    }

    /// Receivers not dropped yet.
    pub fn receivers(&self) -> usize {
        self.inner.waiters().wakers.len()
    }
}

/// One connection's end of the stop signal.
#[derive(Debug)]
pub struct Stop {
    inner: Arc<Inner>,
    waker: Arc<AtomicWaker>,
    key: u64,
}

impl Stop {
    /// Completes once [`Shutdown::stop`] has been called. Waiting again
    /// after a wake-up costs a store of the task's waker (when it changed)
    /// and a load of the flag.
    pub fn stopped(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            // Registered first, then checked: a stop in between either
            // sees this waker or is seen here.
            self.waker.register(cx.waker());
            if self.inner.stopped.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

impl Drop for Stop {
    fn drop(&mut self) {
        self.inner.waiters().wakers.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn stop_ends_every_wait_and_later_ones_at_once() {
        let shutdown = Shutdown::new();
        let waiting: Vec<_> = (0..50)
            .map(|_| {
                let stop = shutdown.subscribe();
                tokio::spawn(async move { stop.stopped().await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(
            waiting.iter().all(|task| !task.is_finished()),
            "nothing stops before stop()"
        );
        shutdown.stop();
        for task in waiting {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("every wait ends")
                .expect("no panic");
        }
        let late = shutdown.subscribe();
        tokio::time::timeout(Duration::from_secs(10), late.stopped())
            .await
            .expect("a receiver subscribed after stop() is stopped at once");
    }

    #[tokio::test]
    async fn a_dropped_receiver_is_forgotten() {
        let shutdown = Shutdown::new();
        let kept = shutdown.subscribe();
        drop(shutdown.subscribe());
        assert_eq!(shutdown.receivers(), 1);
        drop(kept);
        assert_eq!(shutdown.receivers(), 0);
    }

    /// Stops racing waits on another thread: no wait is missed, whichever
    /// comes first (the waker registered, or the flag set).
    #[test]
    fn a_stop_racing_a_wait_is_never_missed() {
        for _ in 0..200 {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_time()
                .build()
                .expect("a runtime");
            let shutdown = Shutdown::new();
            let stop = shutdown.subscribe();
            let waiting = runtime.spawn(async move { stop.stopped().await });
            let stopping = std::thread::spawn(move || shutdown.stop());
            runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), waiting).await })
                .expect("the wait ends")
                .expect("no panic");
            stopping.join().expect("no panic");
        }
    }
}
