//! The measuring loop shared by every workload: connections opened and set
//! up first, then each one writes its requests (P at a time) and reads the
//! replies until a deadline, a shared request budget or a stop signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::conn::{Conn, HEAD, leading_count};
use crate::error::{BenchError, Result};
use crate::net::Dialer;
use crate::stats::Histogram;

/// What a connection sends.
pub enum Requests {
    /// The same line every time (pre-serialised, newline included).
    Same(Vec<u8>),
    /// These lines in turn.
    Cycle(Vec<Vec<u8>>),
    /// The line for the connection's n-th request, made when needed.
    Made(Box<dyn FnMut(u64) -> Vec<u8> + Send>),
}

/// When connections stop.
#[derive(Clone, Default)]
pub struct Plan {
    /// Requests in flight per connection.
    pub pipeline: usize,
    pub deadline: Option<Instant>,
    /// Requests left to make over all connections.
    pub budget: Option<Arc<AtomicU64>>,
    /// Set by whoever runs this beside other work, to end it.
    pub stop: Option<Arc<AtomicBool>>,
    /// Read the count at the start of each reply's message (lists).
    pub count_items: bool,
}

impl Plan {
    pub fn timed(pipeline: usize, secs: Duration) -> Plan {
        Plan {
            pipeline,
            deadline: Some(Instant::now() + secs),
            ..Plan::default()
        }
    }

    pub fn counted(pipeline: usize, requests: u64) -> Plan {
        Plan {
            pipeline,
            budget: Some(Arc::new(AtomicU64::new(requests))),
            ..Plan::default()
        }
    }

    fn over(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
            || self
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed))
    }

    /// Up to `want` requests from the budget.
    fn take(&self, want: usize) -> usize {
        let Some(budget) = &self.budget else {
            return want;
        };
        let mut got = 0;
        let _ = budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
            got = left.min(want as u64) as usize;
            Some(left - got as u64)
        });
        got
    }
}

/// What one or more connections saw.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub latency: Histogram,
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub bytes: u64,
    /// The count in the last reply's message that had one.
    pub items: Option<u64>,
}

impl Tally {
    pub fn merge(&mut self, other: &Tally) {
        self.latency.merge(&other.latency);
        self.requests += other.requests;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.bytes += other.bytes;
        self.items = self.items.or(other.items);
    }

    fn error(&mut self, text: String) {
        self.errors += 1;
        self.first_error.get_or_insert(text);
    }
}

/// Runs one connection until the plan says stop. A lost connection counts
/// as one error and ends it.
pub async fn drive(mut conn: Conn, mut requests: Requests, plan: Plan) -> Tally {
    let pipeline = plan.pipeline.max(1);
    let mut tally = Tally::default();
    let same_batch = match &requests {
        Requests::Same(line) => line.repeat(pipeline),
        _ => Vec::new(),
    };
    let mut batch = Vec::new();
    let mut sent = 0u64;
    while !plan.over() {
        let n = plan.take(pipeline);
        if n == 0 {
            break;
        }
        let bytes: &[u8] = match &mut requests {
            Requests::Same(line) => &same_batch[..line.len() * n],
            Requests::Cycle(lines) => {
                batch.clear();
                for i in 0..n as u64 {
                    batch.extend_from_slice(&lines[((sent + i) % lines.len() as u64) as usize]);
                }
                &batch
            }
            Requests::Made(make) => {
                batch.clear();
                for i in 0..n as u64 {
                    batch.extend_from_slice(&make(sent + i));
                }
                &batch
            }
        };
        sent += n as u64;
        let started = Instant::now();
        if let Err(err) = conn.send(bytes).await {
            tally.error(format!("connection lost: {err}"));
            return tally;
        }
        for _ in 0..n {
            match conn.reply(HEAD).await {
                Ok(bytes) => {
                    tally.latency.record(started.elapsed());
                    tally.requests += 1;
                    tally.bytes += bytes;
                    if !conn.succeeded() {
                        tally.error(conn.error_text());
                    } else if plan.count_items {
                        tally.items = leading_count(conn.head()).or(tally.items);
                    }
                }
                Err(err) => {
                    tally.error(format!("connection lost: {err}"));
                    return tally;
                }
            }
        }
    }
    tally
}

/// Runs every connection with its requests under one plan; the tallies in
/// connection order and the time from start to the last one done.
pub async fn run_all(work: Vec<(Conn, Requests)>, plan: &Plan) -> (Vec<Tally>, Duration) {
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, (conn, requests)) in work.into_iter().enumerate() {
        let plan = plan.clone();
        tasks.spawn(async move { (i, drive(conn, requests, plan).await) });
    }
    let mut tallies: Vec<(usize, Tally)> = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(tally) => tallies.push(tally),
            Err(err) => {
                let mut failed = Tally::default();
                failed.error(format!("a connection's task failed: {err}"));
                tallies.push((usize::MAX, failed));
            }
        }
    }
    let elapsed = started.elapsed();
    tallies.sort_by_key(|(i, _)| *i);
    (tallies.into_iter().map(|(_, t)| t).collect(), elapsed)
}

/// What a connection does once it is open and before it is measured.
#[derive(Clone)]
pub enum Setup {
    Nothing,
    /// Sends the request made for connection n; it must succeed. Refusals
    /// for too many attempts at once are retried after the delay the server
    /// gives.
    Request(Arc<dyn Fn(usize) -> Value + Send + Sync>),
}

/// How long a connection's set-up may keep retrying throttled attempts.
const SETUP_PATIENCE: Duration = Duration::from_secs(120);

/// Opens connections `first..first + count`, `concurrency` at a time, and
/// sets each up. The connections in order, and how long each set-up
/// request took. Fails on the first connection that cannot be had.
pub async fn open_all(
    dialer: &Dialer,
    first: usize,
    count: usize,
    concurrency: usize,
    setup: Setup,
    timeout: Duration,
) -> Result<(Vec<Conn>, Vec<Duration>)> {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for n in first..first + count {
        let (dialer, setup, permits) = (dialer.clone(), setup.clone(), Arc::clone(&permits));
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let stream = dialer.connect(n).await?;
            let mut conn = Conn::new(stream, timeout);
            let took = match &setup {
                Setup::Nothing => Duration::ZERO,
                Setup::Request(make) => {
                    set_up(&mut conn, &make(n))
                        .await
                        .map_err(|err| BenchError::new(format!("connection {n}: {err}")))?
                        .1
                }
            };
            Ok::<_, BenchError>((n, conn, took))
        });
    }
    let mut opened = Vec::with_capacity(count);
    while let Some(done) = tasks.join_next().await {
        let result = done.map_err(|err| BenchError::new(format!("a set-up task failed: {err}")));
        match result.and_then(|r| r) {
            Ok(conn) => opened.push(conn),
            Err(err) if opened.is_empty() => return Err(err),
            Err(err) => {
                return Err(BenchError::new(format!(
                    "opened {} of {count} connections, then: {err}",
                    opened.len()
                )));
            }
        }
    }
    opened.sort_by_key(|(n, _, _)| *n);
    Ok(opened
        .into_iter()
        .map(|(_, conn, took)| (conn, took))
        .unzip())
}

/// Sends a set-up request until it succeeds or is refused for good; the
/// successful reply and how long it took.
pub async fn set_up(conn: &mut Conn, request: &Value) -> Result<(Value, Duration)> {
    let give_up = Instant::now() + SETUP_PATIENCE;
    loop {
        let started = Instant::now();
        let reply = conn.call(request).await?;
        let took = started.elapsed();
        if reply["status"] == "success" {
            return Ok((reply, took));
        }
        let code = reply["code"].as_str().unwrap_or("error");
        let message = reply["message"].as_str().unwrap_or_default();
        if code == "too_many_attempts" && Instant::now() < give_up {
            let wait = reply["data"]["retry_after_ms"].as_u64().unwrap_or(100);
            tokio::time::sleep(Duration::from_millis(wait.clamp(20, 5_000))).await;
            continue;
        }
        return Err(BenchError::new(format!("{code}: {message}")));
    }
}

/// One line of a request, newline included.
pub fn line(request: &Value) -> Vec<u8> {
    let mut bytes = request.to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}
