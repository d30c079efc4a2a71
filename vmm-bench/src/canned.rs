//! The limit server: answers every line with the same fixed ping reply and
//! does nothing else. What a client measures against it is the cost of the
//! protocol's bytes, the sockets and the client itself on this machine, so a
//! real server's rate is shown as a fraction of it.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::error::{BenchError, Result};

/// The server's reply to `ping`, byte for byte.
pub const PONG: &[u8] = b"{\"status\":\"success\",\"message\":\"PONG\",\"data\":{}}\n";

/// A running canned server; stops (with all its connections) when dropped.
///
/// It runs on a runtime of its own, with as many worker threads as a
/// server's default runtime has: a server's wake-ups cross threads, and so
/// must the limit's, or it would gain from sharing the client's threads.
pub struct Canned {
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Canned {
    /// Listens on 127.0.0.1 at a port of its own, in this process.
    pub async fn start() -> Result<Canned> {
        let cannot =
            |err: std::io::Error| BenchError::new(format!("cannot start the limit server: {err}"));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(cannot)?;
        listener.set_nonblocking(true).map_err(cannot)?;
        let addr = listener.local_addr().map_err(cannot)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name("vmm-bench-limit")
            .enable_io()
            .build()
            .map_err(cannot)?;
        runtime.spawn(async move {
            let Ok(listener) = TcpListener::from_std(listener) else {
                return;
            };
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            connections.spawn(answer(stream));
                        }
                        // Out of descriptors and the like: the client sees
                        // its connect fail or time out.
                        Err(_) => tokio::task::yield_now().await,
                    },
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Ok(Canned {
            addr,
            runtime: Some(runtime),
        })
    }
}

impl Drop for Canned {
    fn drop(&mut self) {
        // Neither waits nor panics inside the caller's runtime.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Splits the input on newlines and writes one PONG per line, all replies
/// to the lines read so far in one write: it writes only when no further
/// complete line is buffered, as a server that batches its flushes would.
async fn answer(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let mut buf = vec![0u8; 64 * 1024];
    let mut filled = 0;
    let mut out = Vec::with_capacity(PONG.len() * 64);
    loop {
        if filled == buf.len() {
            // A line longer than the buffer: not a request of this protocol.
            filled = 0;
        }
        let n = match reader.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let fresh = &buf[filled..filled + n];
        let Some(last) = memchr::memrchr(b'\n', fresh) else {
            filled += n;
            continue;
        };
        let lines = memchr::memchr_iter(b'\n', fresh).count();
        out.clear();
        for _ in 0..lines {
            out.extend_from_slice(PONG);
        }
        if writer.write_all(&out).await.is_err() {
            return;
        }
        let rest = filled + last + 1..filled + n;
        let kept = rest.len();
        buf.copy_within(rest, 0);
        filled = kept;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_line_gets_a_pong_however_it_is_split() {
        let canned = Canned::start().await.unwrap();
        let mut stream = TcpStream::connect(canned.addr).await.unwrap();
        stream
            .write_all(b"{\"command\":\"ping\"}\n{\"comm")
            .await
            .unwrap();
        stream.write_all(b"and\":\"ping\"}\n\n").await.unwrap();
        let mut got = vec![0u8; PONG.len() * 3];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            stream.read_exact(&mut got),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(got, PONG.repeat(3));
    }
}
