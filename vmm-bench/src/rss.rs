//! The server's resident memory, read from /proc: which process listens on
//! the target's port, and its VmRSS over a run.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// The process listening on `addr`'s port (on that address or on every
/// address), found through the socket's inode in /proc/net/tcp{,6} and
/// the descriptors in /proc/*/fd. `None` where /proc says nothing (another
/// machine, a container, another user's process).
pub fn pid_listening_on(addr: SocketAddr) -> Option<u32> {
    let tables: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .collect();
    // A listener on every address serves the target only if the target
    // is an address of this machine.
    let local = addr.ip().is_loopback() || tables.iter().any(|t| has_local_address(t, addr.ip()));
    let inode = tables
        .iter()
        .find_map(|table| listening_inode(table, addr, local))?;
    let wanted = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == wanted.as_str()) {
                return Some(pid);
            }
        }
    }
    None
}

/// Whether some socket in a /proc/net/tcp table is bound to `ip`.
fn has_local_address(table: &str, ip: IpAddr) -> bool {
    table.lines().skip(1).any(|line| {
        line.split_whitespace()
            .nth(1)
            .and_then(|local| parse_ip(local.split_once(':')?.0))
            == Some(ip)
    })
}

/// The inode of the LISTEN socket on `addr` in one /proc/net/tcp table;
/// a listener on every address counts when `local` (the target is an
/// address of this machine).
fn listening_inode(table: &str, addr: SocketAddr, on_this_machine: bool) -> Option<u64> {
    const LISTEN: &str = "0A";
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
        if *state != LISTEN {
            return None;
        }
        let (ip, port) = local.split_once(':')?;
        if u16::from_str_radix(port, 16).ok()? != addr.port() {
            return None;
        }
        let ip = parse_ip(ip)?;
        let serves = ip == addr.ip() || (on_this_machine && ip.is_unspecified());
        let inode: u64 = inode.parse().ok()?;
        (serves && inode != 0).then_some(inode)
    })
}

/// /proc/net/tcp prints addresses as native-endian 32-bit words in hex.
fn parse_ip(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let text = hex.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(text, 16).ok()?.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let ip = Ipv6Addr::from(bytes);
            // A dual-stack listener on ::ffff:127.0.0.1 serves 127.0.0.1.
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(ip),
            })
        }
        _ => None,
    }
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The server's RSS over one workload, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RssFigures {
    pub before_kib: Option<u64>,
    pub peak_kib: Option<u64>,
    pub after_kib: Option<u64>,
    /// After the run, once it stopped falling (register and idle only).
    pub settled_kib: Option<u64>,
}

/// Samples a process's RSS every 100 ms in the background, keeping the
/// peak, from [`RssWatch::start`] to [`RssWatch::finish`].
pub struct RssWatch {
    pid: Option<u32>,
    before: Option<u64>,
    peak: Arc<AtomicU64>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RssWatch {
    pub fn start(pid: Option<u32>) -> RssWatch {
        let before = pid.and_then(rss_kib);
        let peak = Arc::new(AtomicU64::new(before.unwrap_or(0)));
        let task = pid.map(|pid| {
            let peak = Arc::clone(&peak);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    if let Some(now) = rss_kib(pid) {
                        peak.fetch_max(now, Ordering::Relaxed);
                    }
                }
            })
        });
        RssWatch {
            pid,
            before,
            peak,
            task,
        }
    }

    pub fn finish(mut self) -> RssFigures {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let after = self.pid.and_then(rss_kib);
        if let Some(after) = after {
            self.peak.fetch_max(after, Ordering::Relaxed);
        }
        let peak = self.peak.load(Ordering::Relaxed);
        RssFigures {
            before_kib: self.before,
            peak_kib: (self.pid.is_some() && peak > 0).then_some(peak),
            after_kib: after,
            settled_kib: None,
        }
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Polls RSS every 100 ms until it has not fallen for `quiet` (2 s),
/// for at most `limit` (15 s); the last value read.
pub async fn settle(pid: Option<u32>, quiet: Duration, limit: Duration) -> Option<u64> {
    let pid = pid?;
    let started = Instant::now();
    let mut lowest = rss_kib(pid)?;
    let mut last = lowest;
    let mut fell_at = Instant::now();
    while started.elapsed() < limit && fell_at.elapsed() < quiet {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(now) = rss_kib(pid) else { break };
        last = now;
        if now < lowest {
            lowest = now;
            fell_at = Instant::now();
        }
    }
    Some(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_lines_are_read() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:22B8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n\
           1: 0100007F:22B8 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 100 0 0 10 0\n";
        let addr: SocketAddr = "127.0.0.1:8888".parse().unwrap();
        assert_eq!(listening_inode(table, addr, true), Some(4242));
        let other_port = "127.0.0.1:8889".parse().unwrap();
        assert_eq!(listening_inode(table, other_port, true), None);
        let any = "  sl  local_address rem_address   st\n   0: 00000000:22B8 00000000:0000 0A 0 0 0 0 0 77\n";
        assert_eq!(listening_inode(any, addr, true), Some(77));
        // Not an address of this machine: a local listener is not it.
        let remote: SocketAddr = "192.0.2.7:8888".parse().unwrap();
        assert_eq!(listening_inode(any, remote, false), None);
        assert!(has_local_address(table, IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert!(!has_local_address(table, remote.ip()));
        assert_eq!(
            parse_ip("0000000000000000FFFF00000100007F"),
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
    }

    #[tokio::test]
    async fn this_process_is_found_by_its_listening_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(pid_listening_on(addr), Some(std::process::id()));
        assert!(rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
    }
}
