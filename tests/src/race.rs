//! Races: many scripted clients against two instances that share one
//! database, all released at one barrier, so that every promise is tried the
//! way an attacker (or a fleet coming back at once) tries it.
//!
//! ```text
//! let pair = Pair::start(|_| {}).await;
//! let replies = race(30, |i, gate| {
//!     let addr = pair.addr(i);           // every other client on the other instance
//!     async move {
//!         let mut conn = RawConn::connect(addr).await;   // setup, before the barrier
//!         gate.open().await;                            // all clients at once from here
//!         conn.call(json!({"command": "ping"})).await
//!     }
//! })
//! .await;
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Barrier;
use vmm_core::Config;

use crate::{PATIENCE, TestServer};

/// Two instances on one database, as behind a load balancer.
pub struct Pair {
    pub a: TestServer,
    pub b: TestServer,
}

impl Pair {
    /// Starts two instances on a fresh database, both configured by
    /// `configure`.
    pub async fn start(configure: impl Fn(&mut Config)) -> Pair {
        let a = TestServer::start_with(&configure).await;
        let b = a.start_beside(&configure).await;
        Pair { a, b }
    }

    /// The instance client `i` talks to: A for even `i`, B for odd.
    pub fn server(&self, i: usize) -> &TestServer {
        if i.is_multiple_of(2) {
            &self.a
        } else {
            &self.b
        }
    }

    /// The address of [`Pair::server`]`(i)`.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.server(i).addr
    }

    /// Password hashes both instances have computed so far.
    pub fn hashes_run(&self) -> u64 {
        self.a.context.passwords.hashes_run() + self.b.context.passwords.hashes_run()
    }
}

/// The barrier of a race, handed to each script.
pub struct Gate(Arc<Barrier>);

impl Gate {
    /// Waits until every client of the race is here, then lets them all
    /// go. Fails the test if some client never arrives (its script failed
    /// before the barrier).
    pub async fn open(&self) {
        if tokio::time::timeout(PATIENCE, self.0.wait()).await.is_err() {
            panic!("not every client of the race reached the barrier");
        }
    }
}

/// Runs `n` clients, each as its own task: `script(i, gate)` sets client `i`
/// up, calls `gate.open()` when it is ready, then acts. All clients act at
/// once from the barrier on. Returns what each script returned, in client
/// order; a script that panics fails the race.
pub async fn race<T, F, Fut>(n: usize, script: F) -> Vec<T>
where
    F: Fn(usize, Gate) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let barrier = Arc::new(Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| tokio::spawn(script(i, Gate(Arc::clone(&barrier)))))
        .collect();
    let mut results = Vec::with_capacity(n);
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await {
            Ok(result) => results.push(result),
            Err(err) => panic!("client {i} of the race failed: {err}"),
        }
    }
    results
}
