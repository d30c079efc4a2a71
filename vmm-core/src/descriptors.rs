//! File descriptors. Every client connection is one, and a process out of
//! them cannot even accept a client to turn it away: `accept` fails with
//! `EMFILE` and clients wait in the listen backlog until they give up. So:
//!
//! - [`raise_limit`] raises the soft `RLIMIT_NOFILE` to the hard limit
//!   (process-wide policy: `vmm-server` calls it at start, an embedder may);
//! - [`serve`](crate::serve) lowers its connection limit to what fits under
//!   the soft limit, once, with a warning;
//! - the accept loop keeps a `Spare` descriptor: when `accept` fails with
//!   `EMFILE` anyway (something else used the descriptors), it frees the
//!   spare, accepts one client, answers it `server_busy`, closes it and
//!   takes the spare back, so that no client hangs;
//! - a `Throttle` keeps each such condition to one log line a second.

use std::fs::File;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use crate::context::Config;
use crate::protocol::{ErrorCode, Reply};

/// `server_busy` refusals answered at once with a graceful close (the reply,
/// then up to 500 ms of reading what the client still sends, then the audit
/// row). Each holds a descriptor meanwhile; past this many, a refusal is
/// answered and closed inline by [`refuse_now`].
pub(crate) const REFUSALS_IN_FLIGHT: usize = 32;

/// Descriptors kept for what else the process opens while it runs: name
/// lookups, files, a reconnecting event listener, an embedder's own.
const MARGIN: usize = 32;

/// The open-file limits before and after [`raise_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    /// The soft limit found.
    pub before: u64,
    /// The soft limit now.
    pub now: u64,
    /// The hard limit, the most the soft limit may be raised to.
    pub hard: u64,
}

/// Raises the soft open-file limit (`RLIMIT_NOFILE`) to the hard limit.
///
/// Many systems start processes with a soft limit of 1024 (or less) and a
/// much higher hard limit, and a server with thousands of connections needs
/// the higher one. Affects the whole process, so it is for the program's
/// `main` to call, before it opens connections. On macOS the limit is also
/// capped at `kern.maxfilesperproc`.
pub fn raise_limit() -> io::Result<Raised> {
    let (before, hard) = rlimit::Resource::NOFILE.get()?;
    let now = rlimit::increase_nofile_limit(u64::MAX)?;
    Ok(Raised { before, now, hard })
}

/// The soft open-file limit: descriptors numbered from it up cannot be had.
pub fn soft_limit() -> Option<u64> {
    rlimit::Resource::NOFILE.get().ok().map(|(soft, _)| soft)
}

/// How many descriptors the process has open, where the system lists them
/// (`/proc/self/fd` on Linux, `/dev/fd` on macOS and the BSDs).
pub fn open_now() -> Option<usize> {
    ["/proc/self/fd", "/dev/fd"].iter().find_map(|dir| {
        // The listing's own descriptor is in the listing.
        std::fs::read_dir(dir)
            .ok()
            .map(|entries| entries.count().saturating_sub(1))
    })
}

/// Descriptors that are not client connections but will be open while the
/// server runs, beyond those open when it starts: the database pool, the
/// event listener's connection, refusals in flight and a margin. (The
/// listener and the spare are open already, so counted in [`open_now`].)
fn reserve(config: &Config) -> usize {
    config.db_pool_size + 1 + REFUSALS_IN_FLIGHT + MARGIN
}

/// How many connections fit under `limit` with `open` descriptors open and
/// `reserve` more to come.
fn fits(limit: u64, open: usize, reserve: usize) -> usize {
    if limit == rlimit::INFINITY {
        return usize::MAX;
    }
    let taken = u64::try_from(open.saturating_add(reserve)).unwrap_or(u64::MAX);
    usize::try_from(limit.saturating_sub(taken)).unwrap_or(usize::MAX)
}

/// `config.max_connections`, or less if that many connections would not
/// fit under the soft open-file limit (logged once, at warn: a server that
/// runs out of descriptors cannot even refuse clients properly). At least 1.
pub(crate) fn fit_connections(config: &Config) -> usize {
    let wanted = config.max_connections;
    let (Some(limit), Some(open)) = (soft_limit(), open_now()) else {
        return wanted;
    };
    let reserved = reserve(config);
    let fit = fits(limit, open, reserved);
    if wanted <= fit {
        return wanted;
    }
    let lowered = fit.max(1);
    tracing::warn!(
        max_connections = wanted,
        lowered_to = lowered,
        open_file_limit = limit,
        open,
        reserved,
        "the connection limit does not fit under the open-file limit (RLIMIT_NOFILE), lowering it; \
         raise the limit (ulimit -n, LimitNOFILE=) to allow more"
    );
    lowered
}

/// True for `EMFILE` (this process is out of descriptors) and `ENFILE`
/// (the whole system is).
pub(crate) fn exhausted(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// True for errors of the system rather than of one connection (out of
/// buffer memory), which retrying at once would only spin on.
pub(crate) fn out_of_memory(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOBUFS | libc::ENOMEM))
}

/// One descriptor held in reserve (an open `/dev/null`), so that the server
/// can still accept a client when the process has none left.
#[derive(Debug)]
pub(crate) struct Spare(Option<File>);

impl Spare {
    pub(crate) fn open() -> Spare {
        Spare(Self::take())
    }

    fn take() -> Option<File> {
        File::open("/dev/null").ok()
    }

    /// Closes the spare, freeing its descriptor for the caller; false when
    /// there was none (it could not be taken back last time, and still
    /// cannot).
    pub(crate) fn free(&mut self) -> bool {
        if self.0.is_none() {
            self.0 = Self::take();
        }
        self.0.take().is_some()
    }

    /// Takes the spare back, if a descriptor is free.
    pub(crate) fn retake(&mut self) {
        if self.0.is_none() {
            self.0 = Self::take();
        }
    }
}

/// Answers `server_busy` and lets the caller close the socket, without
/// waiting for anything: a non-blocking write of the reply (a new socket's
/// buffer has room for it), then a read of what the client has already
/// sent, so that the close is a FIN rather than a reset.
pub(crate) fn refuse_now(socket: &socket2::Socket, why: &str) {
    let _ = socket.set_nonblocking(true);
    let mut socket = socket;
    let _ = socket.write(&Reply::error(ErrorCode::ServerBusy, why).to_line());
    let mut sink = [0u8; 4096];
    for _ in 0..4 {
        if !matches!(socket.read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
}

/// Counts occurrences of a condition worth a log line, and says when a line
/// is due: at most one per second, carrying the count since the last one.
/// The first occurrence is logged at once; the ones after it within the
/// second wait for [`Throttle::due`].
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    last: Option<Instant>,
    pending: u64,
}

impl Throttle {
    const PERIOD: Duration = Duration::from_secs(1);

    /// Counts one occurrence at `now`; the count to log, if a line is due.
    pub(crate) fn hit(&mut self, now: Instant) -> Option<u64> {
        self.pending += 1;
        self.flush(now)
    }

    /// The count to log, if occurrences are pending and a line is due.
    pub(crate) fn flush(&mut self, now: Instant) -> Option<u64> {
        if self.pending == 0 || self.due().is_some_and(|due| now < due) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.pending))
    }

    /// When the occurrences not logged yet may be, if there are any.
    pub(crate) fn due(&self) -> Option<Instant> {
        let last = self.last?;
        (self.pending > 0).then_some(last + Self::PERIOD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_logs_the_first_at_once_then_one_count_a_second() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut throttle = Throttle::default();
        assert_eq!(throttle.due(), None);
        assert_eq!(throttle.hit(at(0)), Some(1));
        assert_eq!(throttle.due(), None, "nothing pending");
        for ms in [50, 100, 999] {
            assert_eq!(throttle.hit(at(ms)), None);
        }
        assert_eq!(throttle.due(), Some(at(1000)));
        assert_eq!(throttle.flush(at(999)), None);
        assert_eq!(throttle.flush(at(1000)), Some(3));
        assert_eq!(throttle.flush(at(5000)), None, "nothing pending");
        // After a quiet spell the next one is logged at once.
        assert_eq!(throttle.hit(at(5000)), Some(1));
        assert_eq!(throttle.hit(at(5100)), None);
        assert_eq!(throttle.hit(at(6100)), Some(2));
    }

    #[test]
    fn throttle_never_logs_twice_within_a_second() {
        let start = Instant::now();
        let mut throttle = Throttle::default();
        let mut lines = Vec::new();
        let mut total = 0;
        for ms in (0..10_000).step_by(7) {
            let now = start + Duration::from_millis(ms);
            if let Some(count) = throttle.hit(now) {
                lines.push(now);
                total += count;
            }
        }
        let end = start + Duration::from_secs(20);
        total += throttle.flush(end).unwrap_or(0);
        assert_eq!(
            total,
            (0..10_000).step_by(7).count() as u64,
            "every one counted"
        );
        assert!(
            lines
                .windows(2)
                .all(|w| w[1] - w[0] >= Duration::from_secs(1))
        );
        assert_eq!(lines.len(), 10);
    }

    #[test]
    fn fits_what_is_left_after_the_open_and_the_reserved() {
        assert_eq!(fits(1024, 20, 81), 923);
        assert_eq!(fits(100, 20, 81), 0);
        assert_eq!(fits(rlimit::INFINITY, 20, 81), usize::MAX, "no limit");
    }

    #[test]
    fn the_connection_limit_is_lowered_only_when_it_does_not_fit() {
        let limit = soft_limit().expect("RLIMIT_NOFILE is readable");
        let open = open_now().expect("open descriptors are listed");
        let small = Config {
            max_connections: 5,
            ..Config::default()
        };
        assert_eq!(fit_connections(&small), 5);
        let huge = Config {
            max_connections: usize::MAX,
            ..Config::default()
        };
        let fit = fit_connections(&huge);
        assert!(fit >= 1);
        assert!(
            (fit as u64) < limit.saturating_sub(open as u64),
            "{fit} connections under a limit of {limit} with {open} open"
        );
    }

    #[test]
    fn the_spare_is_freed_for_the_work_and_taken_back() {
        let mut spare = Spare::open();
        assert!(spare.0.is_some());
        assert!(spare.free());
        assert!(spare.0.is_none(), "freed");
        spare.retake();
        assert!(spare.0.is_some(), "taken back");
    }
}
