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
//! - [`pages`]: the `pages` workload, which checks what paging promises.
//! - [`conn`]: one connection, raw bytes out, reply lines in.
//! - [`net`]: connecting, spread over loopback source addresses.
//! - [`canned`]: the limit server.
//! - [`cpus`]: `--split-cpus`, the client and the servers on CPUs of their own.
//! - [`seed`]: bench VMs, through `register` or COPY.
//! - [`rss`]: the server's process and its resident memory.
//! - [`stats`]: latency histograms.
//! - [`report`]: rows, the table and the JSON document.

pub mod args;
pub mod canned;
pub mod conn;
pub mod cpus;
pub mod error;
pub mod load;
pub mod net;
pub mod pages;
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
use cpus::{Pinned, Split};
use net::Dialer;
use report::CpuSplit;
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
    /// With --split-cpus: the CPUs of each side.
    pub split: Option<Split>,
    /// The real server's threads while they are on the servers' CPUs.
    pinned: Option<Pinned>,
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
            split: None,
            pinned: None,
        })
    }

    /// With a split, moves the real server's threads to the servers' CPUs
    /// for the run (see [`Bench::finish`]), where it is a process of its
    /// own on this machine; says in the report what was done.
    pub fn pin_server(&mut self) -> Result<()> {
        let Some(split) = &self.split else {
            return Ok(());
        };
        let on = report::cpus_named(&split.server);
        let (server, threads) = match self.server_pid {
            None => (
                "the server's process is not on this machine (or /proc does not show it): \
                 not pinned, only the bench's client is"
                    .to_owned(),
                None,
            ),
            // Pinning this process would move the client with the server.
            Some(pid) if pid == std::process::id() => (
                format!(
                    "the server runs inside the bench's own process (pid {pid}): not pinned, \
                     only the bench's client is"
                ),
                None,
            ),
            Some(pid) => {
                let pinned = cpus::pin_process(pid, &split.server)?;
                let threads = pinned.threads();
                self.pinned = Some(pinned);
                let plural = if threads == 1 { "" } else { "s" };
                (
                    format!(
                        "server pid {pid}: its {threads} thread{plural} pinned to {on} for the run, \
                         their affinity given back after"
                    ),
                    Some(threads),
                )
            }
        };
        progress(&format!(
            "CPUs split: client on {}, servers on {on}; {server}",
            report::cpus_named(&split.client)
        ));
        self.report.cpu_split = Some(CpuSplit {
            client_cpus: split.client.clone(),
            server_cpus: split.server.clone(),
            server_threads_pinned: threads,
            server,
        });
        Ok(())
    }

    /// Gives the real server its CPU affinity back, if it was pinned, and
    /// returns the report (with a failure if that could not be done).
    pub fn finish(mut self) -> Report {
        if let Some(pinned) = self.pinned.take()
            && let Err(err) = pinned.restore()
        {
            self.report.failures.push(err.0);
        }
        self.report
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

/// Runs what the command line asks for on a runtime of its own, built
/// here, and returns the report. With --split-cpus the calling thread is
/// pinned to the client's CPUs before the runtime is built, so that all of
/// the runtime's threads (which inherit it) run there; the calling thread
/// stays pinned.
pub fn run_blocking(cli: Cli) -> Result<Report> {
    let split = if cli.options.split_cpus {
        let split = cpus::split(&cpus::allowed()?)?;
        cpus::pin_this_thread(&split.client)?;
        Some(split)
    } else {
        None
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|err| BenchError::new(format!("cannot start the bench's runtime: {err}")))?;
    runtime.block_on(run_with(cli, split))
}

/// Runs what the command line asks for on the caller's runtime and returns
/// the report. An error is a run that could not start at all; workloads
/// that failed are in the report's `failures`. --split-cpus needs
/// [`run_blocking`]: the caller's runtime threads exist already.
pub async fn run(cli: Cli) -> Result<Report> {
    if cli.options.split_cpus {
        return Err(BenchError::new(
            "--split-cpus places the bench's threads before its runtime is built: \
             call vmm_bench::run_blocking",
        ));
    }
    run_with(cli, None).await
}

async fn run_with(cli: Cli, split: Option<Split>) -> Result<Report> {
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
    bench.split = split;
    bench.probe().await?;
    bench.pin_server()?;
    let steps = match (scenario, &cli.workload) {
        (Some(name), _) => steps::scenario(name, &bench.options),
        (None, Some(workload)) => steps::single(workload, &bench.options),
        (None, None) => Vec::new(),
    };
    if bench.pinned.is_none() {
        bench.run_steps(steps).await;
        return Ok(bench.finish());
    }
    // A server pinned by this run is given its affinity back on Ctrl-C
    // too (the default would end the process on the spot).
    let interrupted = tokio::select! {
        () = bench.run_steps(steps) => false,
        () = ctrl_c() => true,
    };
    let report = bench.finish();
    if interrupted {
        let undone = report
            .failures
            .iter()
            .map(|f| format!("; {f}"))
            .collect::<String>();
        return Err(BenchError::new(format!(
            "interrupted; the server's CPU affinity is given back{undone}"
        )));
    }
    Ok(report)
}

/// Ctrl-C; never, where its handler cannot be installed.
async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
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
