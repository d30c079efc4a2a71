//! Parsers for argument values, shared by the command line (clap's value
//! parsers in `main` and `agent`) and the shell's own arguments: seconds with
//! fractions, a disk resize `ID=SIZE`, and the server's address. Out of
//! `main`, so that the modules `main` calls do not depend on it.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// The port of an `--addr` that names none: the server's default port.
pub const DEFAULT_PORT: u16 = 8888;

/// `--disk ID=SIZE` of `update`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resize {
    pub id: i64,
    pub size: u32,
}

/// Parses `ID=SIZE`, e.g. `1=150`.
pub fn parse_resize(text: &str) -> Result<Resize, String> {
    let wrong = || format!("`{text}` is not ID=SIZE (e.g. 1=150)");
    let (id, size) = text.split_once('=').ok_or_else(wrong)?;
    let id = id.trim().parse().map_err(|_| wrong())?;
    let size = size.trim().parse().map_err(|_| wrong())?;
    Ok(Resize { id, size })
}

/// Parses a number of seconds, fractions allowed (`0.3`, `15`).
pub fn parse_secs(text: &str) -> Result<Duration, String> {
    let wrong = |why: &str| format!("`{text}` is not a number of seconds: {why}");
    let secs: f64 = text.trim().parse().map_err(|_| wrong("not a number"))?;
    if secs.is_sign_negative() {
        return Err(wrong("negative"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| wrong("out of range"))
}

/// Parses a number of seconds that must be more than zero (`0.5`, `2`).
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let duration = parse_secs(text)?;
    if duration.is_zero() {
        return Err(format!(
            "`{text}` is not a number of seconds: it must be more than 0"
        ));
    }
    Ok(duration)
}

/// `Some(duration)`, or `None` for zero (off).
pub fn unless_zero(duration: Duration) -> Option<Duration> {
    (!duration.is_zero()).then_some(duration)
}

/// Parses a server address, `HOST[:PORT]`, into the `host:port` that
/// connecting takes. HOST is a host name, an IPv4 address, or an IPv6
/// address in brackets (`[::1]:8888`; bare `::1` is read as an address with
/// no port, since it can mean nothing else); no PORT means [`DEFAULT_PORT`].
/// Checked here, so that a typo is a usage error (exit 2) rather than a
/// failed connection (exit 3).
pub fn parse_addr(text: &str) -> Result<String, String> {
    // clap's message shows `text` already: these say only what is wrong.
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or("no `]` after the IPv6 address")?;
        let ip: Ipv6Addr = host
            .parse()
            .map_err(|_| format!("`{host}` is not an IPv6 address"))?;
        let port = match after {
            "" => DEFAULT_PORT,
            _ => match after.strip_prefix(':') {
                Some(port) => parse_port(port)?,
                None => return Err("only `:PORT` may follow `]`".into()),
            },
        };
        return Ok(format!("[{ip}]:{port}"));
    }
    if let Ok(ip) = text.parse::<Ipv6Addr>() {
        return Ok(format!("[{ip}]:{DEFAULT_PORT}"));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => (host, parse_port(port)?),
        None => (text, DEFAULT_PORT),
    };
    if host.contains(':') {
        return Err("not HOST[:PORT]; an IPv6 address goes in brackets, e.g. [::1]:8888".into());
    }
    check_host(host)?;
    Ok(format!("{host}:{port}"))
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port > 0 && !text.starts_with('+') => Ok(port),
        _ => Err(format!("the port `{text}` is not a number from 1 to 65535")),
    }
}

/// A host name (RFC 1123 labels; `_` too, which container and service
/// names use) or an IPv4 address. Digits and dots only must make an IPv4
/// address: `10.0.0.256` is a typo, not a name to look up.
fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("no host before the port".into());
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return host
            .parse::<Ipv4Addr>()
            .map(drop)
            .map_err(|_| format!("`{host}` is not an IPv4 address"));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!("`{host}` is not a host name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_may_be_fractional() {
        assert_eq!(parse_secs("0.3"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_secs("20"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_secs("0"), Ok(Duration::ZERO));
        for wrong in ["-1", "abc", "", "NaN", "inf", "1e30"] {
            assert!(parse_secs(wrong).is_err(), "{wrong}");
        }
        assert_eq!(unless_zero(Duration::ZERO), None);
        assert_eq!(parse_interval("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_interval("0").is_err());
        assert!(parse_interval("-1").is_err());
    }

    #[test]
    fn resize_takes_id_equals_size() {
        assert_eq!(parse_resize("1=150"), Ok(Resize { id: 1, size: 150 }));
        assert!(parse_resize("1=abc").is_err());
        assert!(parse_resize("150").is_err());
        assert!(parse_resize("=5").is_err());
    }

    #[test]
    fn an_address_without_a_port_means_the_default_port() {
        let parsed = |text: &str| parse_addr(text).ok();
        assert_eq!(parsed("127.0.0.1").as_deref(), Some("127.0.0.1:8888"));
        assert_eq!(parsed("127.0.0.1:9000").as_deref(), Some("127.0.0.1:9000"));
        assert_eq!(parsed("localhost").as_deref(), Some("localhost:8888"));
        assert_eq!(
            parsed("vmm.internal:443").as_deref(),
            Some("vmm.internal:443")
        );
        assert_eq!(
            parsed("vmm-1.example.com.").as_deref(),
            Some("vmm-1.example.com.:8888")
        );
        assert_eq!(parsed("vmm_db").as_deref(), Some("vmm_db:8888"));
        assert_eq!(parsed("[::1]").as_deref(), Some("[::1]:8888"));
        assert_eq!(parsed("[::1]:9000").as_deref(), Some("[::1]:9000"));
        assert_eq!(parsed("::1").as_deref(), Some("[::1]:8888"));
        assert_eq!(
            parsed("[2001:db8::7]:8443").as_deref(),
            Some("[2001:db8::7]:8443")
        );
    }

    #[test]
    fn an_address_that_cannot_be_one_is_refused() {
        for wrong in [
            "",
            ":8888",
            "host:",
            "host:port",
            "host:0",
            "host:65536",
            "host:+80",
            "host:-1",
            "10.0.0.256",
            "1.2.3",
            "::1:8888:x",
            "2001:db8::7:8443x",
            "[::1",
            "[::1]8888",
            "[::1]:",
            "[vmm]:8888",
            "[127.0.0.1]",
            "a b",
            "vmm..internal",
            "-vmm",
            "vmm/api",
            "user@vmm:8888",
            "tcp://vmm:8888",
            "h\u{e9}te",
        ] {
            assert!(
                parse_addr(wrong).is_err(),
                "{wrong:?}: {:?}",
                parse_addr(wrong)
            );
        }
    }
}
