//! What a run found: one row per measured workload (and target), the
//! seedings, notes and failures; printed as a table or as one JSON document.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::load::Tally;
use crate::rss::RssFigures;
use crate::seed::Seeded;

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub workload: String,
    /// `limit` (the built-in canned server) or `server`.
    pub target: &'static str,
    pub conns: usize,
    pub pipeline: usize,
    pub requests: u64,
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    pub secs: f64,
    pub rate: f64,
    /// This rate over the limit server's with the same parameters.
    pub ratio_to_limit: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub bytes_per_reply: Option<f64>,
    /// The count in the replies' message (lists: entries per reply).
    pub items_per_reply: Option<u64>,
    /// The server's RSS; `None` for the limit server, fields `None` where
    /// the server's process is not known.
    pub rss: Option<RssFigures>,
}

impl Row {
    pub fn new(
        workload: impl Into<String>,
        target: &'static str,
        conns: usize,
        pipeline: usize,
        tally: &Tally,
        elapsed: Duration,
    ) -> Row {
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        let secs = elapsed.as_secs_f64();
        Row {
            workload: workload.into(),
            target,
            conns,
            pipeline,
            requests: tally.requests,
            errors: tally.errors,
            first_error: tally.first_error.clone(),
            secs,
            rate: if secs > 0.0 {
                tally.requests as f64 / secs
            } else {
                0.0
            },
            ratio_to_limit: None,
            p50_ms: ms(tally.latency.quantile(0.50)),
            p99_ms: ms(tally.latency.quantile(0.99)),
            max_ms: ms(tally.latency.max()),
            bytes_per_reply: (tally.requests > 0)
                .then(|| tally.bytes as f64 / tally.requests as f64),
            items_per_reply: tally.items,
            rss: None,
        }
    }
}

/// A --split-cpus run: the CPUs of each side, and whether the real server
/// could be placed on its side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CpuSplit {
    /// The bench's client threads.
    pub client_cpus: Vec<usize>,
    /// The limit server's threads, and the real server's when pinned.
    pub server_cpus: Vec<usize>,
    /// The real server's threads pinned to `server_cpus` for the run;
    /// `None` when it was not pinned (`server` says why).
    pub server_threads_pinned: Option<usize>,
    /// What was done with the real server, in a sentence.
    pub server: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub target: String,
    pub server_pid: Option<u32>,
    /// This run's id, in the names of the VMs it registers.
    pub run: String,
    /// The bench's own open-file limit after raising it.
    pub nofile_limit: Option<u64>,
    /// With --split-cpus: where each side ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_split: Option<CpuSplit>,
    pub seeding: Vec<Seeded>,
    pub rows: Vec<Row>,
    /// Figures that are not rows: RSS growth, RSS per connection, targets.
    pub notes: Vec<String>,
    /// Workloads that could not be measured, and why.
    pub failures: Vec<String>,
}

impl Report {
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|err| format!("{{\"error\":\"{err}\"}}"))
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let pid = self
            .server_pid
            .map_or_else(|| "n/a".to_owned(), |pid| pid.to_string());
        let _ = writeln!(
            out,
            "target {}  server pid {pid}  run {}",
            self.target, self.run
        );
        if let Some(split) = &self.cpu_split {
            let _ = writeln!(
                out,
                "CPUs split: bench client on {}, limit and server on {}; {}",
                cpus_named(&split.client_cpus),
                cpus_named(&split.server_cpus),
                split.server
            );
        }
        for s in &self.seeding {
            let _ = writeln!(
                out,
                "seeded {} bench VMs ({}): {} there already, {} added in {:.2} s",
                s.wanted, s.how, s.existing, s.added, s.secs
            );
        }
        let header = [
            "workload",
            "target",
            "conns",
            "pipe",
            "requests",
            "errors",
            "rate/s",
            "vs limit",
            "p50",
            "p99",
            "max",
            "bytes/reply",
            "RSS before",
            "peak",
            "after",
        ];
        let mut lines = vec![header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()];
        for row in &self.rows {
            let rss = row.rss.unwrap_or_default();
            let kib = |k: Option<u64>| {
                if row.rss.is_none() {
                    "-".to_owned()
                } else {
                    k.map_or_else(|| "n/a".to_owned(), mib)
                }
            };
            lines.push(vec![
                row.workload.clone(),
                row.target.to_owned(),
                row.conns.to_string(),
                row.pipeline.to_string(),
                row.requests.to_string(),
                row.errors.to_string(),
                rate(row.rate),
                row.ratio_to_limit
                    .map_or_else(|| "-".to_owned(), |r| format!("{:.1}%", r * 100.0)),
                duration(row.p50_ms),
                duration(row.p99_ms),
                duration(row.max_ms),
                row.bytes_per_reply.map_or_else(|| "-".to_owned(), bytes),
                kib(rss.before_kib),
                kib(rss.peak_kib),
                kib(rss.after_kib),
            ]);
        }
        if self.rows.is_empty() {
            lines.clear();
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|c| {
                lines
                    .iter()
                    .map(|l| l[c].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for line in &lines {
            let cells: Vec<String> = line
                .iter()
                .enumerate()
                .map(|(c, cell)| {
                    if c < 2 {
                        format!("{cell:<w$}", w = widths[c])
                    } else {
                        format!("{cell:>w$}", w = widths[c])
                    }
                })
                .collect();
            let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        }
        for row in self.rows.iter().filter(|r| r.errors > 0) {
            let _ = writeln!(
                out,
                "{} ({}): {} errors, the first: {}",
                row.workload,
                row.target,
                row.errors,
                row.first_error.as_deref().unwrap_or("?")
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "{note}");
        }
        for failure in &self.failures {
            let _ = writeln!(out, "FAILED {failure}");
        }
        out
    }
}

/// `CPU 0`, `CPUs 0-3`.
pub fn cpus_named(cpus: &[usize]) -> String {
    let plural = if cpus.len() == 1 { "" } else { "s" };
    format!("CPU{plural} {}", crate::cpus::cpu_list(cpus))
}

/// KiB as MiB with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn duration(ms: Option<f64>) -> String {
    match ms {
        None => "-".to_owned(),
        Some(ms) if ms < 1.0 => format!("{:.0} µs", ms * 1e3),
        Some(ms) if ms < 1_000.0 => format!("{ms:.2} ms"),
        Some(ms) => format!("{:.2} s", ms / 1e3),
    }
}

fn rate(per_second: f64) -> String {
    if per_second < 10.0 {
        format!("{per_second:.2}")
    } else if per_second < 100.0 {
        format!("{per_second:.1}")
    } else {
        format!("{per_second:.0}")
    }
}

fn bytes(n: f64) -> String {
    if n < 10_000.0 {
        format!("{n:.0} B")
    } else if n < 10_000_000.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{:.1} MiB", n / 1024.0 / 1024.0)
    }
}
