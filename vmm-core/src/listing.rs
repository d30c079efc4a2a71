//! Replies too big to build: lists whose entries are written into the
//! connection's buffer as they arrive from PostgreSQL.
//!
//! A list of the whole fleet is tens of megabytes. Built as one value it
//! would cost that much memory per list in flight, so a list command returns
//! a [`Listing`] instead: the reply's head (`message`, count included) is
//! known, and its entries are produced a batch at a time by [`Entries`],
//! while the connection sends each batch before asking for the next. The
//! socket's backpressure paces the query, and memory per list stays a
//! constant whatever the size of the fleet.
//!
//! Lists that run at once are bounded per instance ([`Lists`]): each holds a
//! database connection until its last byte is sent, and lists must not take
//! every pooled connection from the small requests.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};
use crate::protocol::ErrorCode;

/// How many bytes of entries a [`Entries::fill`] call adds before it lets
/// the connection send them: big enough for few system calls, small enough
/// to keep a list's memory flat.
pub const BATCH_BYTES: usize = 32 * 1024;

/// The outcome of one [`Entries::fill`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fill {
    /// There are more entries.
    More,
    /// That was the last entry. `next` is the cursor of the following page
    /// (`data.next`), when a page limit cut the list short.
    Done { next: Option<String> },
}

/// Boxed, because [`Entries`] is used as a trait object.
pub type FillFuture<'a> = Pin<Box<dyn Future<Output = Result<Fill>> + Send + 'a>>;

/// A list's entries, produced a batch at a time.
pub trait Entries: Send {
    /// Appends the next entries to `out` through [`Batch`], about
    /// [`BATCH_BYTES`] at a time. An error here comes after the reply has
    /// started, so it cannot become an error reply: the connection closes.
    fn fill<'a>(&'a mut self, out: &'a mut Batch) -> FillFuture<'a>;
}

/// Where entries are written: the connection's buffer, with the commas
/// between entries.
#[derive(Debug, Default)]
pub struct Batch {
    pub(crate) buf: Vec<u8>,
    pub(crate) entries: u64,
}

impl Batch {
    /// Writes one entry.
    pub fn entry(&mut self, entry: &impl Serialize) -> Result<()> {
        if self.entries > 0 {
            self.buf.push(b',');
        }
        serde_json::to_writer(&mut self.buf, entry).map_err(|err| {
            tracing::error!(error = %err, "cannot serialise a list entry");
            Error::internal()
        })?;
        self.entries += 1;
        Ok(())
    }

    /// Whether this batch is big enough to be sent.
    pub fn is_full(&self) -> bool {
        self.buf.len() >= BATCH_BYTES
    }

    /// Entries written so far in the whole list.
    pub fn entries(&self) -> u64 {
        self.entries
    }
}

/// A list reply: `data.<key>` is an array of the entries, followed by
/// `data.next` on a page that is not the last.
pub struct Listing {
    pub key: &'static str,
    /// How many entries follow (the reply's message says it first).
    pub count: u64,
    pub entries: Box<dyn Entries>,
    /// Held until the last byte is sent.
    _permit: Permit,
}

impl std::fmt::Debug for Listing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listing")
            .field("key", &self.key)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl Listing {
    pub fn new(key: &'static str, count: u64, entries: Box<dyn Entries>, permit: Permit) -> Self {
        Listing {
            key,
            count,
            entries,
            _permit: permit,
        }
    }
}

/// A place among the lists allowed to run at once.
#[derive(Debug)]
pub struct Permit {
    _held: OwnedSemaphorePermit,
}

/// The lists of one instance: how many may run at once, and how many broke
/// off half-way.
#[derive(Debug)]
pub struct Lists {
    permits: Arc<Semaphore>,
    limit: usize,
    broken: AtomicU64,
}

/// How long a list waits for its turn before it is answered `server_busy`.
const QUEUE_WAIT: Duration = Duration::from_secs(30);

impl Lists {
    /// A quarter of the pool, at least one: lists hold a connection each
    /// until their last byte, and the rest of the pool stays for the small
    /// requests.
    pub fn for_pool(pool_size: usize) -> Lists {
        let limit = (pool_size / 4).max(1);
        Lists {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            broken: AtomicU64::new(0),
        }
    }

    /// How many lists may run at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Waits for a turn (lists queue, fairly, in arrival order).
    pub async fn permit(&self) -> Result<Permit> {
        let permits = Arc::clone(&self.permits);
        match tokio::time::timeout(QUEUE_WAIT, permits.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Permit { _held: permit }),
            Ok(Err(_)) => Err(Error::internal()),
            Err(_) => Err(Error::new(
                ErrorCode::ServerBusy,
                "too many lists are running; try again later",
            )),
        }
    }

    /// Counts a list that failed after its reply had started.
    pub fn broke(&self) {
        self.broken.fetch_add(1, Ordering::Relaxed);
    }

    /// Lists that failed after their reply had started (their connection
    /// was closed).
    pub fn broken(&self) -> u64 {
        self.broken.load(Ordering::Relaxed)
    }
}
