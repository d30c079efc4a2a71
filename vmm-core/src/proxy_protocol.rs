//! The PROXY protocol (HAProxy's, v1 text and v2 binary): behind a TCP
//! balancer every connection comes from the balancer's address, so the
//! balancer sends the client's own address in a header before anything
//! else, and that address becomes the connection's peer for the lists, the
//! audit trail, login throttling and `--max-connections-per-ip`.
//!
//! Only the balancers may say who a client is: a header from any other
//! direct peer would let a client pick its own address, and escape the
//! per-address limits with it. So the direct peer must be in
//! [`ProxyProtocol::trusted`], and with the protocol on, a connection that
//! does not start with a valid header is closed without a reply (a reply
//! would tell a scanner what listens here).
//!
//! Headers are parsed by the `proxy-header` crate; the reading around it is
//! here, bounded in size (and by the caller, in time).

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use proxy_header::{ParseConfig, Protocol, ProxyHeader};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The PROXY protocol's settings: with them in [`crate::Config`], every
/// connection must start with a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocol {
    /// The direct peers (the balancers) allowed to send a header; a
    /// connection from any other is closed at once. Empty: none.
    pub trusted: Vec<Cidr>,
}

impl ProxyProtocol {
    /// Whether `ip`, a direct peer, may send a header.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|cidr| cidr.contains(ip))
    }
}

/// A block of addresses, `10.0.0.0/8` or `fd00::/8`; a bare address is a
/// block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(address: IpAddr, prefix: u8) -> Result<Cidr, CidrError> {
        let bits = match address {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix > bits {
            return Err(CidrError(format!(
                "prefix length /{prefix} is longer than the address's {bits} bits"
            )));
        }
        // Host bits are cleared rather than refused: `172.18.0.5/16`, as
        // `docker network inspect` shows a gateway, means its network.
        let network = match address {
            IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & mask_v4(prefix)).into()),
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & mask_v6(prefix)).into()),
        };
        Ok(Cidr { network, prefix })
    }

    /// Whether `ip` is in the block. An IPv4 peer of a dual-stack listener
    /// (`::ffff:10.0.0.5`) counts as the IPv4 address it is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                u32::from(ip) & mask_v4(self.prefix) == u32::from(network)
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                u128::from(ip) & mask_v6(self.prefix) == u128::from(network)
            }
            _ => false,
        }
    }
}

fn mask_v4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_v6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let text = text.trim();
        let invalid = || {
            CidrError(format!(
                "{text:?} is not an address block (such as 10.0.0.0/8, 172.16.0.0/12 or fd00::/8) \
                 nor an address"
            ))
        };
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => {
                let prefix = prefix.parse::<u8>().map_err(|_| invalid())?;
                (address.parse::<IpAddr>().map_err(|_| invalid())?, prefix)
            }
            None => {
                let address = text.parse::<IpAddr>().map_err(|_| invalid())?;
                (address, if address.is_ipv4() { 32 } else { 128 })
            }
        };
        Cidr::new(address, prefix)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrError(pub String);

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CidrError {}

/// The longest header read. A v1 header is at most 107 bytes; a v2 header
/// may declare up to 64 KiB of extensions (TLVs), but balancers send a few
/// dozen bytes of them (HAProxy's SSL details, a cloud's endpoint ID), and
/// a connection that has not been placed yet should not hold more.
pub const MAX_HEADER: usize = 4096;

/// Why a connection's header was not accepted.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The peer closed before a complete header.
    Closed,
    /// Not a PROXY header, or a malformed one.
    Invalid,
    /// Still incomplete after [`MAX_HEADER`] bytes.
    TooLong,
    Io(io::Error),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Closed => f.write_str("closed before a complete PROXY header"),
            Refusal::Invalid => f.write_str("no valid PROXY header"),
            Refusal::TooLong => write!(f, "PROXY header longer than {MAX_HEADER} bytes"),
            Refusal::Io(err) => write!(f, "read failed before a PROXY header: {err}"),
        }
    }
}

/// A connection's header, read.
#[derive(Debug)]
pub(crate) struct Arrival {
    /// The client's address from the header, or the direct peer's for a
    /// header that names none: a v2 `LOCAL` command (the balancer's own
    /// health check), `UNKNOWN` or an unspecified family, a Unix socket, or
    /// a datagram (not what a TCP connection carries).
    pub peer: SocketAddr,
    /// Whether `peer` came from the header.
    pub proxied: bool,
    /// Bytes read after the header: the start of the client's first request
    /// (or of its TLS handshake).
    pub early: BytesMut,
}

impl Arrival {
    /// A connection without the PROXY protocol: its peer is the direct one.
    pub(crate) fn direct(peer: SocketAddr) -> Arrival {
        Arrival {
            peer,
            proxied: false,
            early: BytesMut::new(),
        }
    }
}

/// Reads the header at the start of `stream` from `direct`, and no more
/// than [`MAX_HEADER`] bytes. Bytes after it that came in the same reads
/// are returned, not lost. Not time-limited: the caller is.
pub(crate) async fn read_header(
    stream: &mut TcpStream,
    direct: SocketAddr,
) -> Result<Arrival, Refusal> {
    let config = ParseConfig {
        include_tlvs: false,
        allow_v1: true,
        allow_v2: true,
    };
    let mut buffer = BytesMut::with_capacity(MAX_HEADER);
    loop {
        let room = MAX_HEADER - buffer.len();
        if room == 0 {
            return Err(Refusal::TooLong);
        }
        let read = stream
            .read_buf(&mut (&mut buffer).limit(room))
            .await
            .map_err(Refusal::Io)?;
        if read == 0 {
            return Err(Refusal::Closed);
        }
        let (peer, used) = match ProxyHeader::parse(&buffer, config) {
            Ok((header, used)) => (
                header
                    .proxied_address()
                    .filter(|address| address.protocol == Protocol::Stream)
                    .map(|address| address.source),
                used,
            ),
            Err(proxy_header::Error::BufferTooShort) => continue,
            Err(_) => return Err(Refusal::Invalid),
        };
        buffer.advance(used);
        let early = if buffer.is_empty() {
            // Not kept for the connection's life: it holds its own buffer
            // only while input is pending.
            BytesMut::new()
        } else {
            buffer
        };
        return Ok(Arrival {
            peer: peer.unwrap_or(direct),
            proxied: peer.is_some(),
            early,
        });
    }
}

/// A stream whose first bytes were read already (with the PROXY header):
/// reads give them back first. For the TLS handshake, whose first bytes may
/// have come in the header's segment.
#[derive(Debug)]
pub(crate) struct Rewound<S> {
    early: BytesMut,
    inner: S,
}

impl<S> Rewound<S> {
    pub(crate) fn new(early: BytesMut, inner: S) -> Rewound<S> {
        Rewound { early, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewound<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.early.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.early.len().min(buf.remaining());
        buf.put_slice(&self.early[..n]);
        self.early.advance(n);
        if self.early.is_empty() {
            self.early = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewound<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn blocks_contain_their_addresses_only() {
        let private = cidr("172.16.0.0/12");
        assert!(private.contains(ip("172.16.0.1")));
        assert!(private.contains(ip("172.31.255.255")));
        assert!(!private.contains(ip("172.32.0.0")));
        assert!(!private.contains(ip("172.15.255.255")));
        assert!(!private.contains(ip("fd00::1")), "other family");
        let one = cidr("10.1.2.3");
        assert_eq!(one.to_string(), "10.1.2.3/32");
        assert!(one.contains(ip("10.1.2.3")));
        assert!(!one.contains(ip("10.1.2.4")));
        let v6 = cidr("fd00::/8");
        assert!(v6.contains(ip("fd12::1")));
        assert!(!v6.contains(ip("fe80::1")));
        assert!(cidr("::1").contains(ip("::1")));
    }

    #[test]
    fn everything_and_mapped_addresses() {
        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!cidr("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
        // A dual-stack listener's IPv4 peer.
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.9.8.7")));
    }

    #[test]
    fn host_bits_are_cleared_and_bad_blocks_refused() {
        assert_eq!(cidr(" 172.18.0.5/16 ").to_string(), "172.18.0.0/16");
        assert_eq!(cidr("2001:db8::1/32").to_string(), "2001:db8::/32");
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0/8",
            "/8",
            "10.0.0.0/-1",
            "example.com",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn trust_is_any_listed_block() {
        let proxy = ProxyProtocol {
            trusted: vec![cidr("127.0.0.1"), cidr("10.0.0.0/8")],
        };
        assert!(proxy.trusts(ip("127.0.0.1")));
        assert!(proxy.trusts(ip("10.200.0.1")));
        assert!(!proxy.trusts(ip("127.0.0.2")));
        assert!(!ProxyProtocol { trusted: vec![] }.trusts(ip("127.0.0.1")));
    }

    async fn pair() -> (TcpStream, TcpStream, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, direct) = listener.accept().await.unwrap();
        (client, server, direct)
    }

    fn v2(source: &str) -> Vec<u8> {
        let header = ProxyHeader::with_address(proxy_header::ProxiedAddress::stream(
            source.parse().unwrap(),
            "127.0.0.1:8888".parse().unwrap(),
        ));
        let mut bytes = Vec::new();
        header.encode_v2(&mut bytes).unwrap();
        bytes
    }

    #[tokio::test]
    async fn a_header_split_across_writes_keeps_what_follows() {
        use tokio::io::AsyncWriteExt;
        let request = b"{\"command\":\"ping\"}\n";
        let (mut client, mut server, direct) = pair().await;
        let header = v2("192.0.2.7:4242");
        let reading = tokio::spawn(async move {
            let arrival = read_header(&mut server, direct).await;
            (arrival, server)
        });
        client.write_all(&header[..5]).await.unwrap();
        client.flush().await.unwrap();
        let mut rest = header[5..].to_vec();
        rest.extend_from_slice(request);
        client.write_all(&rest).await.unwrap();
        drop(client);
        let (arrival, mut server) = reading.await.unwrap();
        let arrival = arrival.unwrap();
        assert_eq!(arrival.peer, "192.0.2.7:4242".parse().unwrap());
        assert!(arrival.proxied);
        // Whatever came with the header, and the rest from the socket.
        let mut received = arrival.early.to_vec();
        server.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, request);
    }

    #[tokio::test]
    async fn local_and_unknown_keep_the_direct_peer() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server, direct) = pair().await;
        let mut local = Vec::new();
        ProxyHeader::with_local().encode_v2(&mut local).unwrap();
        client.write_all(&local).await.unwrap();
        let arrival = read_header(&mut server, direct).await.unwrap();
        assert_eq!((arrival.peer, arrival.proxied), (direct, false));
        assert!(arrival.early.is_empty());

        let (mut client, mut server, direct) = pair().await;
        client.write_all(b"PROXY UNKNOWN\r\nx").await.unwrap();
        let arrival = read_header(&mut server, direct).await.unwrap();
        assert_eq!((arrival.peer, arrival.proxied), (direct, false));
        assert_eq!(&arrival.early[..], b"x");
    }

    #[tokio::test]
    async fn garbage_endless_and_closed_are_refused() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server, direct) = pair().await;
        client.write_all(b"{\"command\":\"ping\"}\n").await.unwrap();
        assert!(matches!(
            read_header(&mut server, direct).await,
            Err(Refusal::Invalid)
        ));

        // A v2 header that declares more extensions than are accepted.
        let (mut client, mut server, direct) = pair().await;
        let mut big = v2("192.0.2.7:4242")[..14].to_vec();
        big.extend_from_slice(&u16::MAX.to_be_bytes());
        big.resize(MAX_HEADER + 100, 0);
        let writing = tokio::spawn(async move {
            let _ = client.write_all(&big).await;
            client
        });
        assert!(matches!(
            read_header(&mut server, direct).await,
            Err(Refusal::TooLong)
        ));
        drop(writing);

        let (client, mut server, direct) = pair().await;
        drop(client);
        assert!(matches!(
            read_header(&mut server, direct).await,
            Err(Refusal::Closed)
        ));
    }

    #[tokio::test]
    async fn rewound_reads_the_early_bytes_first() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server, _) = pair().await;
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut stream = Rewound::new(BytesMut::from(&b"hello"[..]), server);
        let mut all = String::new();
        stream.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }
}
