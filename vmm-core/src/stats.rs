//! This instance's figures for `stats`, written with each lease renewal.
//!
//! Prometheus keeps totals since start; an operator at `vmm-client top`
//! wants rates and latencies *now*. So the lease task keeps a [`Window`]
//! of the command totals it sampled at each renewal over the last minute,
//! and writes the differences (rates over 10 s and 1 min, p50 and p99 over
//! 1 min) into this instance's row with the renewal itself: one statement,
//! and one query then answers for every instance. Figures are thus as old
//! as the last renewal (`presence_interval`, 2 s by default) at most.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::context::Context;
use crate::metrics::{BUCKETS, CommandTotal};
use crate::protocol::{CommandStats, PoolCounts, SessionCounts, StatsSnapshot};

/// The longer of the two windows.
const MINUTE: Duration = Duration::from_secs(60);
/// The shorter one.
const TEN_SECONDS: Duration = Duration::from_secs(10);

/// One sampling of the command totals.
#[derive(Debug)]
struct Sample {
    at: Instant,
    totals: Vec<CommandTotal>,
}

/// Samples of the command totals, from the newest back to one at least a
/// minute old (or the start): about 60 s / `presence_interval` of them.
#[derive(Debug)]
pub struct Window {
    samples: VecDeque<Sample>,
}

impl Window {
    /// A window whose first sample is all zeros at `start`, so that the
    /// first minute's rates count from the instance's start.
    pub fn new(start: Instant) -> Window {
        Window {
            samples: VecDeque::from([Sample {
                at: start,
                totals: Vec::new(),
            }]),
        }
    }

    /// Adds the totals sampled `at`, drops samples the windows no longer
    /// need, and returns each command's figures, busiest first. A command
    /// with no request in the last minute is left out.
    pub(crate) fn record(&mut self, at: Instant, totals: Vec<CommandTotal>) -> Vec<CommandStats> {
        // Keep the newest sample at least a minute old: the minute's base.
        while self
            .samples
            .get(1)
            .is_some_and(|next| at.saturating_duration_since(next.at) >= MINUTE)
        {
            self.samples.pop_front();
        }
        let minute = self.samples.front();
        let ten = self
            .samples
            .iter()
            .rev()
            .find(|sample| at.saturating_duration_since(sample.at) >= TEN_SECONDS)
            .or(minute);
        let mut stats: Vec<CommandStats> = totals
            .iter()
            .filter_map(|now| {
                let (minute_count, minute_buckets) = since(minute, now);
                if minute_count == 0 {
                    return None;
                }
                let (ten_count, _) = since(ten, now);
                Some(CommandStats {
                    command: now.name.to_owned(),
                    rate_10s: rate(ten_count, ten, at),
                    rate_1m: rate(minute_count, minute, at),
                    p50_ms: quantile(0.5, minute_count, &minute_buckets) * 1000.0,
                    p99_ms: quantile(0.99, minute_count, &minute_buckets) * 1000.0,
                })
            })
            .collect();
        stats.sort_by(|a, b| {
            b.rate_1m
                .total_cmp(&a.rate_1m)
                .then_with(|| a.command.cmp(&b.command))
        });
        self.samples.push_back(Sample { at, totals });
        stats
    }
}

/// The requests of `now`'s command since `base`, and their buckets.
fn since(base: Option<&Sample>, now: &CommandTotal) -> (u64, Vec<u64>) {
    let earlier = base.and_then(|sample| sample.totals.iter().find(|t| t.name == now.name));
    match earlier {
        None => (now.count, now.buckets.clone()),
        Some(earlier) => (
            now.count.saturating_sub(earlier.count),
            now.buckets
                .iter()
                .zip(earlier.buckets.iter().chain(std::iter::repeat(&0)))
                .map(|(now, then)| now.saturating_sub(*then))
                .collect(),
        ),
    }
}

/// Requests per second from `base` to `at`, rounded to a thousandth.
fn rate(count: u64, base: Option<&Sample>, at: Instant) -> f64 {
    let seconds = base.map_or(0.0, |sample| {
        at.saturating_duration_since(sample.at).as_secs_f64()
    });
    if seconds <= 0.0 {
        return 0.0;
    }
    (count as f64 / seconds * 1000.0).round() / 1000.0
}

/// The `q` quantile of `count` observations in cumulative `buckets` (one
/// per [`BUCKETS`] bound), interpolated within its bucket as Prometheus'
/// `histogram_quantile` does; past the last bound, that bound.
fn quantile(q: f64, count: u64, buckets: &[u64]) -> f64 {
    let rank = q * count as f64;
    let mut below = 0u64;
    let mut lower = 0.0;
    for (&bound, &cumulative) in BUCKETS.iter().zip(buckets) {
        if cumulative as f64 >= rank && cumulative > below {
            let within = (rank - below as f64) / (cumulative - below) as f64;
            return lower + (bound - lower) * within.clamp(0.0, 1.0);
        }
        below = cumulative;
        lower = bound;
    }
    lower
}

/// This instance's snapshot now, with `window` moved on to now.
pub(crate) fn snapshot(context: &Context, window: &mut Window) -> StatsSnapshot {
    let figures = context.figures();
    let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    let signed_in = figures.vm_sessions + figures.operator_sessions;
    StatsSnapshot {
        connections: u64::try_from(context.metrics.connections.get()).unwrap_or(0),
        sessions: SessionCounts {
            connected: count(figures.sessions.saturating_sub(signed_in)),
            authenticated: count(figures.vm_sessions),
            operator: count(figures.operator_sessions),
        },
        password_queue: count(figures.password_queue),
        db_pool: PoolCounts {
            size: count(figures.pool_size),
            idle: count(figures.pool_available),
            in_use: count(figures.pool_size.saturating_sub(figures.pool_available)),
            waiting: count(figures.pool_waiting),
        },
        watchers: count(figures.watchers),
        commands: window.record(Instant::now(), context.metrics.command_totals()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Totals of `count` requests, all in the bucket of `bound_index`.
    fn total(name: &'static str, count: u64, bound_index: usize) -> CommandTotal {
        CommandTotal {
            name,
            count,
            buckets: (0..BUCKETS.len())
                .map(|i| if i >= bound_index { count } else { 0 })
                .collect(),
        }
    }

    #[test]
    fn rates_and_quantiles_over_the_windows() {
        let start = Instant::now();
        let mut window = Window::new(start);
        // 0..50 s: 100 pings; 50..60 s: 50 more.
        let first = window.record(start + Duration::from_secs(50), vec![total("ping", 100, 3)]);
        assert_eq!(first[0].rate_1m, 2.0);
        let second = window.record(start + Duration::from_secs(60), vec![total("ping", 150, 3)]);
        let ping = &second[0];
        assert_eq!(ping.command, "ping");
        assert_eq!(ping.rate_10s, 5.0);
        assert_eq!(ping.rate_1m, 2.5);
        // Every request fell in (0.0005, 0.001]: interpolated within it.
        assert!(ping.p50_ms > 0.5 && ping.p50_ms <= 1.0, "{ping:?}");
        assert!(ping.p99_ms > ping.p50_ms && ping.p99_ms <= 1.0, "{ping:?}");

        // A minute later with nothing new, the command drops out.
        let quiet = window.record(
            start + Duration::from_secs(121),
            vec![total("ping", 150, 3)],
        );
        assert!(quiet.is_empty(), "{quiet:?}");
        assert!(window.samples.len() <= 3, "{:?}", window.samples.len());
    }

    #[test]
    fn busiest_first_and_slow_ones_capped_at_the_last_bound() {
        let start = Instant::now();
        let mut window = Window::new(start);
        let slow = CommandTotal {
            name: "list",
            count: 2,
            buckets: vec![0; BUCKETS.len()],
        };
        let stats = window.record(
            start + Duration::from_secs(1),
            vec![slow, total("ping", 10, 0)],
        );
        assert_eq!(stats[0].command, "ping");
        assert_eq!(stats[1].command, "list");
        assert_eq!(stats[1].p99_ms, BUCKETS[BUCKETS.len() - 1] * 1000.0);
    }
}
