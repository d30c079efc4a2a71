//! The metrics and health listener: a small HTTP/1.1 server on a port of its
//! own (`--metrics-listen`), apart from the JSON protocol, for Prometheus
//! and for load balancers' health checks.
//!
//! - `GET /metrics`: [`crate::metrics`] in the Prometheus text format 0.0.4.
//! - `GET /healthz`: 200 while the process serves.
//! - `GET /readyz`: 200 only while the database answers and this instance's
//!   lease is current, else 503 with the reason. The database is asked
//!   every second with a one-second limit, so a lost database shows within
//!   about two seconds, and a balancer stops sending clients that every
//!   command would answer `unavailable`.
//!
//! Anything else is 404.

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::context::Context;
use crate::task::AbortOnDrop;

/// How often, and with what limit, the database is asked.
const CHECK_EVERY: Duration = Duration::from_secs(1);
const CHECK_LIMIT: Duration = Duration::from_secs(1);
/// A database check older than this counts as failed: the checker itself
/// is stuck.
const CHECK_STALE: Duration = Duration::from_secs(3);
/// Scrapes and health checks are few; more at once are turned away so that
/// this port cannot take the server's memory.
const MAX_CONNECTIONS: usize = 64;
/// A request's head must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The latest database check: when it ended and what it found.
type Checked = Option<(Instant, Result<(), String>)>;

struct State {
    context: Arc<Context>,
    database: Mutex<Checked>,
}

impl State {
    /// `Ok` when ready, else why not.
    fn readiness(&self) -> Result<(), String> {
        let checked = self
            .database
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match checked {
            None => return Err("the database has not been checked yet".to_owned()),
            Some((at, _)) if at.elapsed() > CHECK_STALE => {
                return Err(format!(
                    "the database check has not finished for {} s",
                    at.elapsed().as_secs()
                ));
            }
            Some((_, Err(reason))) => {
                return Err(format!("the database does not answer: {reason}"));
            }
            Some((_, Ok(()))) => {}
        }
        let lease = self.context.config.instance_lease;
        match self.context.metrics.lease_age() {
            None => Err("this instance has not joined the shared database yet".to_owned()),
            Some(age) if age >= lease => Err(format!(
                "this instance's lease was last renewed {:.1} s ago (lease: {} s)",
                age.as_secs_f64(),
                lease.as_secs()
            )),
            Some(_) => Ok(()),
        }
    }

    fn respond(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET {
            return text(StatusCode::NOT_FOUND, "not found\n".to_owned());
        }
        match request.uri().path() {
            "/metrics" => {
                let body = self.context.metrics.encode(&self.context.figures());
                let mut response = Response::new(Full::new(Bytes::from(body)));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
                );
                response
            }
            "/healthz" => text(StatusCode::OK, "ok\n".to_owned()),
            "/readyz" => match self.readiness() {
                Ok(()) => text(StatusCode::OK, "ready\n".to_owned()),
                Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
            },
            _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Asks the database every [`CHECK_EVERY`] until dropped.
fn check_database(state: Arc<State>) -> AbortOnDrop {
    AbortOnDrop::spawn(async move {
        let mut ticker = tokio::time::interval(CHECK_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let found = match tokio::time::timeout(CHECK_LIMIT, state.context.store.ping()).await {
                Ok(found) => found,
                Err(_) => Err(format!(
                    "no answer within {} s (or no free pooled connection)",
                    CHECK_LIMIT.as_secs()
                )),
            };
            *state.database.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((Instant::now(), found));
        }
    })
}

/// Serves `/metrics`, `/healthz` and `/readyz` of `context` on `listener`
/// until `shutdown` completes. vmm-server runs it beside
/// [`crate::serve`] when given `--metrics-listen`; a program embedding
/// vmm-core can do the same.
pub async fn serve(
    listener: TcpListener,
    context: Arc<Context>,
    shutdown: impl Future<Output = ()>,
) {
    let state = Arc::new(State {
        context,
        database: Mutex::new(None),
    });
    let _checker = check_database(Arc::clone(&state));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        tracing::debug!(error = %err, "metrics listener: accept failed");
                        // Out of descriptors, accept fails at once: do not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    continue; // dropped: too many at once
                };
                let state = Arc::clone(&state);
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let response = state.respond(&request);
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let served = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if let Err(err) = served {
                        tracing::debug!(error = %err, "metrics listener: connection failed");
                    }
                    drop(slot);
                });
            }
        }
    }
    connections.shutdown().await;
}
