//! This instance's metrics, in a Prometheus registry of its own (one per
//! [`Context`](crate::Context), so that several servers in one process, or
//! in one test binary, do not add into each other's figures).
//!
//! The names are fixed because dashboards and alerts depend on them, and
//! label values come only from fixed sets (command names from the
//! registry, error codes, outcomes), so that no client can create series.
//!
//! Counting a request must cost a few atomic operations: the counters of
//! each command and outcome are found by the command's position in the
//! registry, created on first use (the only allocation), then kept.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, TextEncoder,
};

use crate::protocol::ErrorCode;
use crate::registry::Registry;

/// The `command` label of requests whose command is not registered (or
/// that had none): never the name the client sent.
pub const UNKNOWN_COMMAND: &str = "(unknown)";

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Latency buckets, in seconds: a ping takes well under a millisecond, a
/// login with argon2 tens of milliseconds, a large list seconds.
pub(crate) const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Outcomes: `success`, then each error code in [`ErrorCode::ALL`]'s order.
const OUTCOMES: usize = 1 + ErrorCode::ALL.len();

/// One command's series, each made when first needed.
#[derive(Debug, Default)]
struct CommandSeries {
    outcomes: [OnceLock<IntCounter>; OUTCOMES],
    duration: OnceLock<Histogram>,
}

#[derive(Debug)]
pub struct Metrics {
    registry: prometheus::Registry,
    /// Open connections on this instance.
    pub connections: IntGauge,
    commands_total: IntCounterVec,
    command_duration: HistogramVec,
    /// The command names, by their position in the command registry.
    names: Vec<&'static str>,
    /// Indexed like `names`, then one more for [`UNKNOWN_COMMAND`].
    series: Vec<CommandSeries>,
    password_hashes: IntCounter,
    lease_renewals_success: IntCounter,
    lease_renewals_failure: IntCounter,
    lease_age: Gauge,
    sessions_connected: IntGauge,
    sessions_authenticated: IntGauge,
    sessions_operator: IntGauge,
    password_queue: IntGauge,
    pool_idle: IntGauge,
    pool_in_use: IntGauge,
    pool_waiting: IntGauge,
    watchers: IntGauge,
    /// Connections refused at the connection limit (`--max-connections`).
    pub refused_max_connections: IntCounter,
    /// Connections refused at the per-address limit.
    pub refused_per_ip: IntCounter,
    /// TLS handshakes that failed or did not finish in time.
    pub refused_tls: IntCounter,
    /// Connections closed for the PROXY protocol: from an untrusted peer,
    /// or without a valid header in time.
    pub refused_proxy: IntCounter,
    /// Event lines written to watchers.
    pub events_delivered: IntCounter,
    /// Watchers disconnected for falling behind their events.
    pub watchers_lagged: IntCounter,
    /// Watchers disconnected for not reading their events.
    pub watchers_slow: IntCounter,
    /// Indexed like [`LIST_TYPES`].
    list_bytes: Vec<IntCounter>,
    started: Instant,
    renewed: Mutex<Option<Instant>>,
    /// Serialises scrapes, which bring the figures read at scrape time up
    /// to date before encoding.
    scrape: Mutex<()>,
}

/// A command's slot in [`Metrics`]: its position in the registry, or the
/// one for unknown commands.
#[derive(Debug, Clone, Copy)]
pub struct CommandSlot(usize);

/// The `list_type` label values of `vmm_list_bytes_total`: the list types
/// of the `list` command, each a list reply's `data` key.
pub const LIST_TYPES: [&str; 4] = ["active_vms", "authenticated_vms", "all_vms", "all_disks"];

/// The figures read at scrape time from the parts of the instance that
/// keep them (sessions, password hasher, database pool), rather than
/// counted as they change, so that serving requests costs nothing more.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scrape {
    /// The password hasher's count of hashes computed.
    pub hashes_run: u64,
    /// Live sessions, whatever their state.
    pub sessions: usize,
    /// Of which authenticated as a VM.
    pub vm_sessions: usize,
    /// Of which opened with the admin token.
    pub operator_sessions: usize,
    /// Sessions watching change events.
    pub watchers: usize,
    /// Hashes waiting for a hashing slot.
    pub password_queue: usize,
    /// Database connections open in the pool.
    pub pool_size: usize,
    /// Of which idle.
    pub pool_available: usize,
    /// Requests waiting for a database connection.
    pub pool_waiting: usize,
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("a valid metric definition")
}

impl Metrics {
    /// The metrics of an instance serving `commands`.
    pub fn new(commands: &Registry) -> Metrics {
        let registry = prometheus::Registry::new();
        let build_info = IntGaugeVec::new(
            Opts::new(
                "vmm_build_info",
                "Always 1; the label is the vmm version this instance runs.",
            ),
            &["version"],
        )
        .expect("a valid metric definition");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let connections = IntGauge::new("vmm_connections", "Open connections on this instance.")
            .expect("a valid metric definition");
        let commands_total = IntCounterVec::new(
            Opts::new(
                "vmm_commands_total",
                "Commands answered, by command and outcome (success or the error code).",
            ),
            &["command", "outcome"],
        )
        .expect("a valid metric definition");
        let command_duration = HistogramVec::new(
            HistogramOpts::new(
                "vmm_command_duration_seconds",
                "Time to answer a request, its decoding included, until its reply is queued.",
            )
            .buckets(BUCKETS.to_vec()),
            &["command"],
        )
        .expect("a valid metric definition");
        let password_hashes = IntCounter::new(
            "vmm_password_hashes_total",
            "argon2id hashes computed (registrations, logins, re-hashes).",
        )
        .expect("a valid metric definition");
        let lease_renewals = IntCounterVec::new(
            Opts::new(
                "vmm_lease_renewals_total",
                "Renewals of this instance's lease in the shared database, by outcome.",
            ),
            &["outcome"],
        )
        .expect("a valid metric definition");
        let lease_age = Gauge::new(
            "vmm_lease_age_seconds",
            "Seconds since this instance's lease was last renewed (since start before the first).",
        )
        .expect("a valid metric definition");
        let sessions = IntGaugeVec::new(
            Opts::new(
                "vmm_sessions",
                "This instance's live sessions by state: connected (not authenticated), \
                 authenticated (as a VM) or operator.",
            ),
            &["state"],
        )
        .expect("a valid metric definition");
        let password_queue = gauge(
            "vmm_password_queue",
            "Password hashes waiting for a hashing slot (--hash-concurrency).",
        );
        let pool = IntGaugeVec::new(
            Opts::new(
                "vmm_db_pool_connections",
                "Database connections open in this instance's pool, idle or in use.",
            ),
            &["state"],
        )
        .expect("a valid metric definition");
        let pool_waiting = gauge(
            "vmm_db_pool_waiting",
            "Requests waiting for a database connection from the pool.",
        );
        let refused = IntCounterVec::new(
            Opts::new(
                "vmm_connections_refused_total",
                "Connections refused or closed before their first request, by reason.",
            ),
            &["reason"],
        )
        .expect("a valid metric definition");
        let watchers = gauge("vmm_watchers", "Sessions watching change events.");
        let events_delivered = IntCounter::new(
            "vmm_events_delivered_total",
            "Event lines written to watchers.",
        )
        .expect("a valid metric definition");
        let dropped = IntCounterVec::new(
            Opts::new(
                "vmm_watchers_dropped_total",
                "Watchers disconnected: lagged (fell behind the events) or slow (did not read them).",
            ),
            &["reason"],
        )
        .expect("a valid metric definition");
        let list_bytes = IntCounterVec::new(
            Opts::new(
                "vmm_list_bytes_total",
                "Bytes of complete list replies, their newline included, by list type.",
            ),
            &["list_type"],
        )
        .expect("a valid metric definition");
        for collector in [
            Box::new(build_info) as Box<dyn prometheus::core::Collector>,
            Box::new(connections.clone()),
            Box::new(commands_total.clone()),
            Box::new(command_duration.clone()),
            Box::new(password_hashes.clone()),
            Box::new(lease_renewals.clone()),
            Box::new(lease_age.clone()),
            Box::new(sessions.clone()),
            Box::new(password_queue.clone()),
            Box::new(pool.clone()),
            Box::new(pool_waiting.clone()),
            Box::new(refused.clone()),
            Box::new(watchers.clone()),
            Box::new(events_delivered.clone()),
            Box::new(dropped.clone()),
            Box::new(list_bytes.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are distinct");
        }
        let names: Vec<&'static str> = commands.commands().map(|command| command.name).collect();
        let series = (0..=names.len())
            .map(|_| CommandSeries::default())
            .collect();
        Metrics {
            registry,
            connections,
            commands_total,
            command_duration,
            names,
            series,
            password_hashes,
            lease_renewals_success: lease_renewals.with_label_values(&["success"]),
            lease_renewals_failure: lease_renewals.with_label_values(&["failure"]),
            lease_age,
            sessions_connected: sessions.with_label_values(&["connected"]),
            sessions_authenticated: sessions.with_label_values(&["authenticated"]),
            sessions_operator: sessions.with_label_values(&["operator"]),
            password_queue,
            pool_idle: pool.with_label_values(&["idle"]),
            pool_in_use: pool.with_label_values(&["in_use"]),
            pool_waiting,
            watchers,
            refused_max_connections: refused.with_label_values(&["max_connections"]),
            refused_per_ip: refused.with_label_values(&["max_connections_per_ip"]),
            refused_tls: refused.with_label_values(&["tls"]),
            refused_proxy: refused.with_label_values(&["proxy"]),
            events_delivered,
            watchers_lagged: dropped.with_label_values(&["lagged"]),
            watchers_slow: dropped.with_label_values(&["slow"]),
            list_bytes: LIST_TYPES
                .iter()
                .map(|list_type| list_bytes.with_label_values(&[list_type]))
                .collect(),
            started: Instant::now(),
            renewed: Mutex::new(None),
            scrape: Mutex::new(()),
        }
    }

    /// The slot of the command at `index` in the registry, or of unknown
    /// commands.
    pub fn slot(&self, index: Option<usize>) -> CommandSlot {
        match index {
            Some(index) if index < self.names.len() => CommandSlot(index),
            _ => CommandSlot(self.names.len()),
        }
    }

    fn name(&self, slot: CommandSlot) -> &'static str {
        self.names.get(slot.0).copied().unwrap_or(UNKNOWN_COMMAND)
    }

    /// A tally of the requests of one batch (see [`Tally`]).
    pub fn tally(&self) -> Tally<'_> {
        Tally {
            metrics: self,
            counts: [(0, 0, 0); KEPT],
            counted: 0,
            first: None,
            durations: Vec::new(),
        }
    }

    /// Counts one answered request: its outcome (`None`: success) and how
    /// long it took.
    pub fn command(&self, slot: CommandSlot, outcome: Option<ErrorCode>, took: Duration) {
        let index = outcome.map_or(0, |code| code as usize + 1);
        if let Some(counter) = self.counter(slot, index) {
            counter.inc();
        }
        if let Some(histogram) = self.histogram(slot) {
            histogram.observe(took.as_secs_f64());
        }
    }

    fn counter(&self, slot: CommandSlot, outcome: usize) -> Option<&IntCounter> {
        let series = self.series.get(slot.0)?;
        let cell = series.outcomes.get(outcome)?;
        Some(cell.get_or_init(|| {
            let outcome = match outcome.checked_sub(1) {
                None => "success",
                Some(code) => ErrorCode::ALL.get(code).map_or("internal", |c| c.as_str()),
            };
            self.commands_total
                .with_label_values(&[self.name(slot), outcome])
        }))
    }

    fn histogram(&self, slot: CommandSlot) -> Option<&Histogram> {
        let series = self.series.get(slot.0)?;
        Some(
            series
                .duration
                .get_or_init(|| self.command_duration.with_label_values(&[self.name(slot)])),
        )
    }

    /// Every command's request count and cumulative latency buckets (one per
    /// [`BUCKETS`] bound) so far, for the windows of [`crate::stats`]; only
    /// commands that have been used.
    pub(crate) fn command_totals(&self) -> Vec<CommandTotal> {
        use prometheus::core::Metric;
        self.series
            .iter()
            .enumerate()
            .filter_map(|(slot, series)| {
                let histogram = series.duration.get()?;
                let metric = histogram.metric();
                let proto = metric.get_histogram();
                Some(CommandTotal {
                    name: self.name(CommandSlot(slot)),
                    count: proto.get_sample_count(),
                    buckets: proto
                        .get_bucket()
                        .iter()
                        .map(|bucket| bucket.cumulative_count())
                        .collect(),
                })
            })
            .collect()
    }

    /// Records a renewal of this instance's lease (or its joining).
    pub fn lease_renewed(&self, ok: bool) {
        if ok {
            self.lease_renewals_success.inc();
            *self.renewed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        } else {
            self.lease_renewals_failure.inc();
        }
    }

    /// Time since the lease was last renewed, `None` if it never was.
    pub fn lease_age(&self) -> Option<Duration> {
        let renewed = *self.renewed.lock().unwrap_or_else(|p| p.into_inner());
        renewed.map(|at| at.elapsed())
    }

    /// Counts the bytes of a complete list reply of type `list_type` (a
    /// list reply's `data` key); other keys are not counted.
    pub fn list_written(&self, list_type: &str, bytes: u64) {
        if let Some(index) = LIST_TYPES.iter().position(|t| *t == list_type)
            && let Some(counter) = self.list_bytes.get(index)
        {
            counter.inc_by(bytes);
        }
    }

    /// Every metric in the Prometheus text format, version 0.0.4
    /// ([`CONTENT_TYPE`]), with the figures of `scrape`.
    pub fn encode(&self, scrape: &Scrape) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let counted = self.password_hashes.get();
        if scrape.hashes_run > counted {
            self.password_hashes.inc_by(scrape.hashes_run - counted);
        }
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        // Read one after the other, the parts may not add up exactly; a
        // negative count would only mislead.
        let signed_in = scrape.vm_sessions + scrape.operator_sessions;
        self.sessions_connected
            .set(count(scrape.sessions.saturating_sub(signed_in)));
        self.sessions_authenticated.set(count(scrape.vm_sessions));
        self.sessions_operator.set(count(scrape.operator_sessions));
        self.watchers.set(count(scrape.watchers));
        self.password_queue.set(count(scrape.password_queue));
        self.pool_idle.set(count(scrape.pool_available));
        self.pool_in_use.set(count(
            scrape.pool_size.saturating_sub(scrape.pool_available),
        ));
        self.pool_waiting.set(count(scrape.pool_waiting));
        let age = self.lease_age().unwrap_or_else(|| self.started.elapsed());
        self.lease_age.set(age.as_secs_f64());
        let mut text = String::new();
        if let Err(err) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut text) {
            tracing::error!(error = %err, "cannot encode the metrics");
        }
        text
    }
}

/// A command's totals since start (see [`Metrics::command_totals`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CommandTotal {
    pub name: &'static str,
    pub count: u64,
    /// Requests at or under each of [`BUCKETS`]' bounds.
    pub buckets: Vec<u64>,
}

/// Counts an open connection in [`Metrics::connections`] until dropped.
#[derive(Debug)]
pub struct Connected(IntGauge);

impl Connected {
    pub fn new(metrics: &Metrics) -> Connected {
        metrics.connections.inc();
        Connected(metrics.connections.clone())
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Distinct (command, outcome) pairs a tally keeps; a batch with more adds
/// the rest to the shared series directly.
const KEPT: usize = 4;

/// The requests of one batch (those a connection had buffered), counted
/// here and added to the shared series once, when the tally is dropped.
/// The shared series are atomics that every connection writes: written per
/// request, two workers answering pipelined requests fight over their cache
/// lines. A batch usually holds one command with one outcome, and often a
/// single request, so a tally allocates nothing until a second request of
/// the same command needs a local histogram.
pub struct Tally<'a> {
    metrics: &'a Metrics,
    /// `(slot, outcome index, count)`; the first `counted` are in use.
    counts: [(usize, usize, u64); KEPT],
    counted: usize,
    /// The first request's time, kept until a second request of the same
    /// command makes a local histogram worth it.
    first: Option<(usize, f64)>,
    durations: Vec<(usize, prometheus::local::LocalHistogram)>,
}

impl Tally<'_> {
    /// Counts one answered request: its outcome (`None`: success) and how
    /// long it took.
    pub fn command(&mut self, slot: CommandSlot, outcome: Option<ErrorCode>, took: Duration) {
        self.commands(slot, outcome, 1, took);
    }

    /// Counts `count` requests of one command with the same outcome that
    /// were answered together in `took`: each is given an equal share of it.
    pub fn commands(
        &mut self,
        slot: CommandSlot,
        outcome: Option<ErrorCode>,
        count: usize,
        took: Duration,
    ) {
        if count == 0 {
            return;
        }
        let index = outcome.map_or(0, |code| code as usize + 1);
        let added = u64::try_from(count).unwrap_or(u64::MAX);
        let kept = &mut self.counts[..self.counted];
        if let Some((_, _, kept)) = kept
            .iter_mut()
            .find(|(s, o, _)| *s == slot.0 && *o == index)
        {
            *kept += added;
        } else if let Some(free) = self.counts.get_mut(self.counted) {
            *free = (slot.0, index, added);
            self.counted += 1;
        } else if let Some(counter) = self.metrics.counter(slot, index) {
            counter.inc_by(added);
        }
        let seconds = (took / u32::try_from(count).unwrap_or(u32::MAX)).as_secs_f64();
        if let Some((_, local)) = self.durations.iter().find(|(s, _)| *s == slot.0) {
            (0..count).for_each(|_| local.observe(seconds));
            return;
        }
        let Some(histogram) = self.metrics.histogram(slot) else {
            return;
        };
        match self.first {
            None if count == 1 => self.first = Some((slot.0, seconds)),
            // A second request of the same command: a local histogram is
            // worth it now.
            Some((first, earlier)) if first == slot.0 => {
                let local = histogram.local();
                local.observe(earlier);
                (0..count).for_each(|_| local.observe(seconds));
                self.durations.push((slot.0, local));
                self.first = None;
            }
            None => {
                let local = histogram.local();
                (0..count).for_each(|_| local.observe(seconds));
                self.durations.push((slot.0, local));
            }
            // Another command in the same batch, and its first: rare
            // enough to add directly.
            Some(_) => (0..count).for_each(|_| histogram.observe(seconds)),
        }
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        for &(slot, outcome, count) in &self.counts[..self.counted] {
            if let Some(counter) = self.metrics.counter(CommandSlot(slot), outcome) {
                counter.inc_by(count);
            }
        }
        for (_, local) in &self.durations {
            local.flush();
        }
        if let Some((slot, seconds)) = self.first
            && let Some(histogram) = self.metrics.histogram(CommandSlot(slot))
        {
            histogram.observe(seconds);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_the_error_codes() {
        for (index, code) in ErrorCode::ALL.into_iter().enumerate() {
            assert_eq!(code as usize, index);
        }
    }

    #[test]
    fn counts_by_command_and_outcome_with_unknown_names_folded() {
        let registry = Registry::global().unwrap();
        let metrics = Metrics::new(registry);
        let (ping, _) = registry.find("ping").unwrap();
        let ping = metrics.slot(Some(ping));
        let unknown = metrics.slot(None);
        for _ in 0..3 {
            metrics.command(ping, None, Duration::from_micros(50));
        }
        metrics.command(
            unknown,
            Some(ErrorCode::UnknownCommand),
            Duration::from_micros(5),
        );
        metrics.command(
            metrics.slot(Some(usize::MAX)),
            Some(ErrorCode::UnknownCommand),
            Duration::from_micros(5),
        );
        let _open = Connected::new(&metrics);
        let text = metrics.encode(&Scrape {
            hashes_run: 2,
            ..Scrape::default()
        });
        assert!(
            text.contains("vmm_commands_total{command=\"ping\",outcome=\"success\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "vmm_commands_total{command=\"(unknown)\",outcome=\"unknown_command\"} 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("vmm_command_duration_seconds_count{command=\"ping\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("vmm_connections 1\n"), "{text}");
        assert!(text.contains("vmm_password_hashes_total 2\n"), "{text}");
        assert!(text.contains(&format!(
            "vmm_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
        // Series appear only once used.
        assert!(!text.contains("outcome=\"internal\""), "{text}");
    }

    /// A batch's tally adds exactly what counting each request would, and
    /// only when the batch ends.
    #[test]
    fn a_tally_adds_its_batch_when_dropped() {
        let registry = Registry::global().unwrap();
        let metrics = Metrics::new(registry);
        let (ping, _) = registry.find("ping").unwrap();
        let (help, _) = registry.find("help").unwrap();
        let (ping, help) = (metrics.slot(Some(ping)), metrics.slot(Some(help)));
        let mut tally = metrics.tally();
        for _ in 0..5 {
            tally.command(ping, None, Duration::from_micros(50));
        }
        tally.command(help, None, Duration::from_millis(2));
        tally.command(
            ping,
            Some(ErrorCode::InvalidParams),
            Duration::from_micros(30),
        );
        let during = metrics.encode(&Scrape::default());
        assert!(!during.contains("vmm_commands_total{"), "{during}");
        drop(tally);
        let text = metrics.encode(&Scrape::default());
        for line in [
            "vmm_commands_total{command=\"ping\",outcome=\"success\"} 5\n",
            "vmm_commands_total{command=\"ping\",outcome=\"invalid_params\"} 1\n",
            "vmm_commands_total{command=\"help\",outcome=\"success\"} 1\n",
            "vmm_command_duration_seconds_count{command=\"ping\"} 6\n",
            "vmm_command_duration_seconds_count{command=\"help\"} 1\n",
            "vmm_command_duration_seconds_bucket{command=\"help\",le=\"0.001\"} 0\n",
            "vmm_command_duration_seconds_bucket{command=\"help\",le=\"0.0025\"} 1\n",
        ] {
            assert!(text.contains(line), "{line}in {text}");
        }

        // A single request; then more distinct outcomes than a tally keeps.
        let mut single = metrics.tally();
        single.command(help, None, Duration::from_millis(2));
        drop(single);
        let mut mixed = metrics.tally();
        let codes = &ErrorCode::ALL[..KEPT + 2];
        for code in codes {
            mixed.command(help, Some(*code), Duration::from_micros(10));
        }
        drop(mixed);
        let text = metrics.encode(&Scrape::default());
        assert!(
            text.contains("vmm_commands_total{command=\"help\",outcome=\"success\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("vmm_command_duration_seconds_count{command=\"help\"} 8\n"),
            "{text}"
        );
        for code in codes {
            let line = format!(
                "vmm_commands_total{{command=\"help\",outcome=\"{}\"}} 1\n",
                code.as_str()
            );
            assert!(text.contains(&line), "{line}in {text}");
        }
    }

    /// The figures read at scrape time land in their series; connected is
    /// what is neither a VM nor an operator; list bytes go by list type.
    #[test]
    fn scraped_figures_and_list_bytes() {
        let metrics = Metrics::new(Registry::global().unwrap());
        metrics.list_written("all_vms", 120);
        metrics.list_written("all_vms", 30);
        metrics.list_written("not_a_list", 7);
        let text = metrics.encode(&Scrape {
            sessions: 5,
            vm_sessions: 2,
            operator_sessions: 1,
            watchers: 1,
            password_queue: 4,
            pool_size: 3,
            pool_available: 1,
            pool_waiting: 2,
            ..Scrape::default()
        });
        for line in [
            "vmm_sessions{state=\"connected\"} 2\n",
            "vmm_sessions{state=\"authenticated\"} 2\n",
            "vmm_sessions{state=\"operator\"} 1\n",
            "vmm_watchers 1\n",
            "vmm_password_queue 4\n",
            "vmm_db_pool_connections{state=\"idle\"} 1\n",
            "vmm_db_pool_connections{state=\"in_use\"} 2\n",
            "vmm_db_pool_waiting 2\n",
            "vmm_list_bytes_total{list_type=\"all_vms\"} 150\n",
            "vmm_list_bytes_total{list_type=\"all_disks\"} 0\n",
            "vmm_connections_refused_total{reason=\"proxy\"} 0\n",
        ] {
            assert!(text.contains(line), "{line}in {text}");
        }
        assert!(!text.contains("not_a_list"), "{text}");
    }
}
