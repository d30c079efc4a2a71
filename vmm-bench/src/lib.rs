//! vmm-bench: load figures for a vmm server at any address.
//!
//! Every ping workload also runs against a built-in canned-reply server
//! ([`canned`]), the protocol's physical limit on the machine, so that a
//! server's rate reads as a fraction of what is possible at all. The hot
//! paths write pre-serialised requests and only scan replies for their
//! newline ([`conn`]), so the client is never what is being measured.
//!
//! - [`args`]: the command line.
//! - [`steps`]: workloads and scenarios as steps, and what each one runs.
//! - [`load`]: opening and setting up connections, the measuring loop.
//! - [`conn`]: one connection, raw bytes out, reply lines in.
//! - [`net`]: connecting, spread over loopback source addresses.
//! - [`canned`]: the limit server.
//! - [`seed`]: bench VMs, through `register` or COPY.
//! - [`rss`]: the server's process and its resident memory.
//! - [`stats`]: latency histograms.
//! - [`report`]: rows, the table and the JSON document.

pub mod args;
pub mod canned;
pub mod conn;
pub mod error;
pub mod load;
pub mod net;
pub mod report;
pub mod rss;
pub mod seed;
pub mod stats;
pub mod steps;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use args::Cli;
pub use error::{BenchError, Result};
pub use report::Report;

use args::{Options, Workload};
use net::Dialer;
use steps::Step;

/// A run in progress: the target, its server process, and the report.
pub struct Bench {
    pub options: Options,
    pub target: SocketAddr,
    pub server_pid: Option<u32>,
    pub timeout: Duration,
    pub report: Report,
    /// The request that authenticates a reading connection, once known.
    reader: Option<serde_json::Value>,
}

impl Bench {
    /// Resolves the target, raises the open-file limit and looks for the
    /// server's process.
    pub async fn new(options: Options) -> Result<Bench> {
        let timeout = Duration::try_from_secs_f64(options.timeout)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| BenchError::new("--timeout must be a positive number of seconds"))?;
        if let Some(secs) = options.secs
            && !(secs > 0.0 && secs.is_finite())
        {
            return Err(BenchError::new(
                "--secs must be a positive number of seconds",
            ));
        }
        let target = resolve(&options.addr, timeout).await?;
        let nofile_limit = net::raise_nofile();
        let server_pid = options.server_pid.or_else(|| rss::pid_listening_on(target));
        let report = Report {
            target: target.to_string(),
            server_pid,
            run: run_id(),
            nofile_limit,
            ..Report::default()
        };
        Ok(Bench {
            options,
            target,
            server_pid,
            timeout,
            report,
            reader: None,
        })
    }

    /// A dialer for the target with `per_address` connections per source
    /// address.
    pub fn dialer(&self, per_address: usize) -> Dialer {
        Dialer::new(self.target, per_address, self.timeout)
    }

    /// `--secs`, or 5 s.
    pub fn secs(&self) -> Duration {
        Duration::from_secs_f64(self.options.secs.unwrap_or(5.0))
    }

    /// One ping, so that a server that is not there is said so at once,
    /// not after the limit server's part of a run.
    pub async fn probe(&self) -> Result<()> {
        let stream = self.dialer(net::PER_ADDRESS).connect(0).await?;
        let mut conn = conn::Conn::new(stream, self.timeout);
        let reply = conn
            .call(&serde_json::json!({"command": "ping"}))
            .await
            .map_err(|err| {
                BenchError::new(format!("{} does not answer ping: {err}", self.target))
            })?;
        if reply["status"] != "success" {
            return Err(BenchError::new(format!(
                "{} answers ping with {reply}: is it a vmm server?",
                self.target
            )));
        }
        Ok(())
    }

    /// Runs the steps in order; a step that fails is recorded and the next
    /// one runs.
    pub async fn run_steps(&mut self, steps: Vec<Step>) {
        for step in steps {
            let name = step.name();
            progress(&format!("{name} ..."));
            if let Err(err) = self.run_step(&step).await {
                progress(&format!("{name} failed: {err}"));
                self.report.failures.push(format!("{name}: {err}"));
            }
        }
    }
}

/// Runs what the command line asks for and returns the report. An error is
/// a run that could not start at all; workloads that failed are in the
/// report's `failures`.
pub async fn run(cli: Cli) -> Result<Report> {
    let scenario = match (&cli.workload, cli.options.scenario) {
        (Some(Workload::Scenario { name }), _) => Some(*name),
        (None, Some(name)) => Some(name),
        (Some(_), Some(_)) => {
            return Err(BenchError::new(
                "give either a workload or --scenario, not both",
            ));
        }
        (None, None) => {
            return Err(BenchError::new(
                "no workload: give one (ping, register, authenticate, update, active_vms, \
                 authenticated_vms, all_vms, all_disks, lists, idle) or --scenario issue8",
            ));
        }
        (Some(_), None) => None,
    };
    let mut bench = Bench::new(cli.options).await?;
    bench.probe().await?;
    let steps = match (scenario, &cli.workload) {
        (Some(name), _) => steps::scenario(name, &bench.options),
        (None, Some(workload)) => steps::single(workload, &bench.options),
        (None, None) => Vec::new(),
    };
    bench.run_steps(steps).await;
    Ok(bench.report)
}

/// Progress goes to stderr, so that `--json` output stays one document.
pub fn progress(message: &str) {
    eprintln!("vmm-bench: {message}");
}

async fn resolve(addr: &str, timeout: Duration) -> Result<SocketAddr> {
    let found = tokio::time::timeout(timeout, tokio::net::lookup_host(addr))
        .await
        .map_err(|_| BenchError::new(format!("cannot resolve {addr}: no answer in time")))?
        .map_err(|err| BenchError::new(format!("cannot resolve --addr {addr}: {err}")))?;
    let all: Vec<SocketAddr> = found.collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| BenchError::new(format!("--addr {addr} resolves to no address")))
}

/// Unique enough between runs, short enough for VM ids: milliseconds
/// since the epoch, base 36.
fn run_id() -> String {
    let mut n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut id = Vec::new();
    while n > 0 {
        id.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
    }
    id.reverse();
    String::from_utf8(id).unwrap_or_default()
}
