//! The limit server: answers every line with the same fixed ping reply and
//! does nothing else. What a client measures against it is the cost of the
//! protocol's bytes, the sockets and the client itself on this machine, so a
//! real server's rate is shown as a fraction of it.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::cpus::{self, Split};
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
    /// Why one of its threads could not be pinned to the servers' CPUs.
    pin_failure: Arc<OnceLock<String>>,
}

impl Canned {
    /// Listens on 127.0.0.1 at a port of its own, in this process. With a
    /// split, every thread of its runtime runs on the servers' CPUs, and
    /// there are as many workers as the process had CPUs before the split
    /// (as many as a server started on this machine has), not as many as
    /// the client's half that it is started from.
    pub async fn start(split: Option<&Split>) -> Result<Canned> {
        let cannot =
            |err: std::io::Error| BenchError::new(format!("cannot start the limit server: {err}"));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(cannot)?;
        listener.set_nonblocking(true).map_err(cannot)?;
        let addr = listener.local_addr().map_err(cannot)?;
        let pin_failure = Arc::new(OnceLock::new());
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.thread_name("vmm-bench-limit").enable_io();
        if let Some(split) = split {
            let cpus = split.server.clone();
            let failure = Arc::clone(&pin_failure);
            builder
                .worker_threads(split.all())
                .on_thread_start(move || {
                    if let Err(err) = cpus::pin_this_thread(&cpus) {
                        let _ = failure.set(err.0);
                    }
                });
        }
        let runtime = builder.build().map_err(cannot)?;
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
            pin_failure,
        })
    }

    /// Why one of the limit server's threads is not on the servers' CPUs,
    /// if one is not: then its figures are not those of a split run.
    pub fn pin_failure(&self) -> Option<&str> {
        self.pin_failure.get().map(String::as_str)
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
        let canned = Canned::start(None).await.unwrap();
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

    /// Split: every limit server thread (workers, and a blocking thread)
    /// runs on the servers' CPUs, and this (client) thread stays where it
    /// was.
    #[tokio::test]
    async fn a_split_puts_the_limit_servers_threads_on_the_servers_cpus() {
        let mine = cpus::allowed().unwrap();
        // Any CPU list works for the placement; with one CPU both "halves"
        // are that CPU.
        let last = *mine.last().unwrap();
        let split = Split {
            client: vec![mine[0]],
            server: vec![last],
        };
        let canned = Canned::start(Some(&split)).await.unwrap();
        let runtime = canned.runtime.as_ref().unwrap();
        assert_eq!(runtime.metrics().num_workers(), split.all());
        let placement = || {
            let name = std::thread::current().name().map(str::to_owned);
            (name, cpus::allowed().unwrap())
        };
        let mut seen = Vec::new();
        for _ in 0..64 {
            let task = runtime.spawn(async move {
                tokio::task::yield_now().await;
                placement()
            });
            seen.push(task.await.unwrap());
        }
        seen.push(runtime.spawn_blocking(placement).await.unwrap());
        for (name, cpus) in seen {
            assert_eq!(name.as_deref(), Some("vmm-bench-limit"));
            assert_eq!(cpus, [last]);
        }
        assert_eq!(canned.pin_failure(), None);
        assert_eq!(cpus::allowed().unwrap(), mine);
    }
}
