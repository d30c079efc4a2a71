//! Opening client connections: with a deadline, with errors that say what to
//! do, and spread over many loopback source addresses so that no address
//! exceeds the server's per-address connection cap (256 by default).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

use crate::error::{BenchError, Result};

/// Connections per source address when spreading: under the server's
/// default `--max-connections-per-ip` of 256, with room for a margin.
pub const PER_ADDRESS: usize = 200;

/// Connections per source address for workloads that authenticate with a
/// password: the server lets at most 5 attempts per address run at once.
pub const PER_ADDRESS_LOGINS: usize = 4;

/// Opens connections to one target.
#[derive(Debug, Clone)]
pub struct Dialer {
    pub target: SocketAddr,
    /// Bind each client socket to a loopback address of its own group
    /// (only possible when the target is an IPv4 loopback address).
    spread: bool,
    per_address: usize,
    timeout: Duration,
}

impl Dialer {
    pub fn new(target: SocketAddr, per_address: usize, timeout: Duration) -> Dialer {
        Dialer {
            target,
            spread: matches!(target.ip(), IpAddr::V4(ip) if ip.is_loopback()),
            per_address: per_address.max(1),
            timeout,
        }
    }

    /// The same target with another number of connections per address.
    pub fn with_per_address(&self, per_address: usize) -> Dialer {
        Dialer {
            per_address: per_address.max(1),
            ..self.clone()
        }
    }

    pub fn spreads(&self) -> bool {
        self.spread
    }

    /// The source address of connection `n`: 127.77.x.y, `per_address`
    /// connections on each (never .0 or .255 as the last byte).
    pub fn source(&self, n: usize) -> Option<IpAddr> {
        if !self.spread {
            return None;
        }
        let group = n / self.per_address;
        let x = u8::try_from(group / 254 % 256).unwrap_or(0);
        let y = u8::try_from(group % 254 + 1).unwrap_or(1);
        Some(IpAddr::V4(Ipv4Addr::new(127, 77, x, y)))
    }

    /// Opens connection number `n` (which chooses its source address).
    pub async fn connect(&self, n: usize) -> Result<TcpStream> {
        let target = self.target;
        let socket = match target {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|err| BenchError::new(format!("cannot open a socket: {}", describe(&err))))?;
        if let Some(source) = self.source(n) {
            socket.bind(SocketAddr::new(source, 0)).map_err(|err| {
                BenchError::new(format!(
                    "cannot bind a client socket to {source}: {}",
                    describe(&err)
                ))
            })?;
        }
        let stream = match tokio::time::timeout(self.timeout, socket.connect(target)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => return Err(connect_error(target, &err)),
            Err(_) => {
                return Err(BenchError::new(format!(
                    "cannot connect to {target}: no answer within {:?} — is the address right?",
                    self.timeout
                )));
            }
        };
        stream.set_nodelay(true).map_err(|err| {
            BenchError::new(format!("cannot set TCP_NODELAY: {}", describe(&err)))
        })?;
        Ok(stream)
    }
}

/// `err`, with what usually causes it.
pub fn describe(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(EMFILE) => {
            let limit = rlimit::Resource::NOFILE
                .get()
                .map(|(soft, hard)| format!(" (RLIMIT_NOFILE soft {soft}, hard {hard})"))
                .unwrap_or_default();
            format!(
                "{err}: the bench is out of file descriptors{limit}; raise the hard limit \
                 (ulimit -Hn) or use fewer --conns"
            )
        }
        _ => err.to_string(),
    }
}

/// "Too many open files" on Linux and the BSDs alike.
const EMFILE: i32 = 24;

fn connect_error(target: SocketAddr, err: &io::Error) -> BenchError {
    let hint = match err.kind() {
        io::ErrorKind::ConnectionRefused => " — is vmm-server running?",
        io::ErrorKind::AddrNotAvailable => " — no free local port or address",
        _ => "",
    };
    BenchError::new(format!(
        "cannot connect to {target}: {}{hint}",
        lowercase_first(&describe(err))
    ))
}

/// "Connection refused (os error 111)" reads better mid-sentence as
/// "connection refused (os error 111)".
fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Raises the soft open-file limit to the hard one; returns the limit now.
pub fn raise_nofile() -> Option<u64> {
    rlimit::increase_nofile_limit(u64::MAX).ok()
}

/// Fails clearly when `connections` sockets (plus a margin) cannot be open
/// at once in this process.
pub fn check_nofile(connections: usize) -> Result<()> {
    let Ok((soft, hard)) = rlimit::Resource::NOFILE.get() else {
        return Ok(());
    };
    let needed = connections as u64 + 64;
    if soft < needed {
        return Err(BenchError::new(format!(
            "the bench can open only {soft} file descriptors (RLIMIT_NOFILE soft {soft}, hard {hard}) \
             and {connections} connections need about {needed}: raise the hard limit \
             (ulimit -Hn, or LimitNOFILE) or use fewer --conns"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_spread_over_distinct_addresses() {
        let dialer = Dialer::new("127.0.0.1:1".parse().unwrap(), 200, Duration::from_secs(1));
        assert!(dialer.spreads());
        assert_eq!(dialer.source(0), dialer.source(199));
        assert_ne!(dialer.source(199), dialer.source(200));
        let sources: std::collections::HashSet<_> =
            (0..10_000).step_by(200).map(|n| dialer.source(n)).collect();
        assert_eq!(sources.len(), 50);
        let far = Dialer::new("192.0.2.1:1".parse().unwrap(), 200, Duration::from_secs(1));
        assert_eq!(far.source(0), None);
        let v6 = Dialer::new("[::1]:1".parse().unwrap(), 200, Duration::from_secs(1));
        assert_eq!(v6.source(0), None);
    }
}
