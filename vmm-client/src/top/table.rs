//! The cells of `top`'s tables as text: one place for the columns, so that
//! the terminal view and the plain tables show the same figures under the
//! same headers.

use std::time::{Duration, SystemTime};

use super::stats::{CommandStats, Instance, Totals};
use crate::events::clean;

pub const INSTANCE_HEADERS: [&str; 11] = [
    "instance",
    "id",
    "up",
    "lease",
    "conns",
    "sess c/a/o",
    "watch",
    "pw q",
    "db pool",
    "db wait",
    "req/s",
];

/// The instance columns that hold numbers, right-aligned.
pub const INSTANCE_RIGHT: [usize; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];

pub const COMMAND_HEADERS: [&str; 4] = ["command", "req/s 10s", "req/s 1m", "p99 ms"];

pub const COMMAND_RIGHT: [usize; 3] = [1, 2, 3];

/// What the command table's figures are, for its title.
pub const COMMANDS_TITLE: &str =
    "busiest commands (rates summed over the instances, p99 the highest instance's)";

/// `sess c/a/o`: sessions by state, connected (not authenticated),
/// authenticated (as a VM), operator.
fn sessions(connected: u64, authenticated: u64, operator: u64) -> String {
    format!("{connected}/{authenticated}/{operator}")
}

pub fn instance_row(instance: &Instance, now: SystemTime) -> [String; 11] {
    let pool = &instance.db_pool;
    let s = &instance.sessions;
    [
        clean(&instance.name),
        instance.id.to_string(),
        instance.uptime(now).map_or_else(|| "-".into(), span),
        instance.lease_age_ms.map_or_else(|| "-".into(), lease),
        instance.connections.to_string(),
        sessions(s.connected, s.authenticated, s.operator),
        instance.watchers.to_string(),
        instance.password_queue.to_string(),
        format!("{}/{}", pool.in_use, pool.size),
        pool.waiting.to_string(),
        rate(instance.rate()),
    ]
}

/// The totals, under the instances; how many there are is said above the
/// table, which keeps this row's label (the first column's width) short.
pub fn totals_row(totals: &Totals) -> [String; 11] {
    let pool = &totals.db_pool;
    let s = &totals.sessions;
    [
        "total".to_owned(),
        String::new(),
        String::new(),
        String::new(),
        totals.connections.to_string(),
        sessions(s.connected, s.authenticated, s.operator),
        totals.watchers.to_string(),
        totals.password_queue.to_string(),
        format!("{}/{}", pool.in_use, pool.size),
        pool.waiting.to_string(),
        rate(totals.rate),
    ]
}

pub fn command_row(command: &CommandStats) -> [String; 4] {
    [
        clean(&command.command),
        rate(command.rate_10s),
        rate(command.rate_1m),
        command.p99_ms.map_or_else(|| "-".into(), millis),
    ]
}

/// `42s`, `12m05s`, `3h02m`, `2d03h`: an uptime, to two units.
pub fn span(duration: Duration) -> String {
    let secs = duration.as_secs();
    let (days, hours, mins) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{mins}m{:02}s", secs % 60),
        3600..86_400 => format!("{hours}h{mins:02}m"),
        _ => format!("{days}d{hours:02}h"),
    }
}

/// `412ms`, `2.4s`: how old a snapshot is.
pub fn lease(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

/// Requests per second, to a tenth.
pub fn rate(per_sec: f64) -> String {
    format!("{per_sec:.1}")
}

/// Milliseconds with about three significant digits: `0.42`, `12.5`, `250`.
pub fn millis(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::stats::{DbPool, Sessions};

    #[test]
    fn figures_read_short() {
        assert_eq!(span(Duration::from_secs(42)), "42s");
        assert_eq!(span(Duration::from_secs(725)), "12m05s");
        assert_eq!(span(Duration::from_secs(3 * 3600 + 120)), "3h02m");
        assert_eq!(span(Duration::from_secs(2 * 86_400 + 3 * 3600)), "2d03h");
        assert_eq!(lease(412), "412ms");
        assert_eq!(lease(2400), "2.4s");
        assert_eq!(rate(1.24), "1.2");
        assert_eq!(rate(0.0), "0.0");
        assert_eq!(millis(0.4213), "0.42");
        assert_eq!(millis(12.54), "12.5");
        assert_eq!(millis(250.4), "250");
    }

    #[test]
    fn a_row_per_instance_and_the_totals_under_the_same_headers() {
        let instance = Instance {
            id: 3,
            name: "vmm-1\u{1b}[2J".into(),
            started_at: Some("2026-11-29T15:00:00Z".into()),
            lease_age_ms: Some(412),
            connections: 5,
            sessions: Sessions {
                connected: 2,
                authenticated: 2,
                operator: 1,
            },
            password_queue: 1,
            db_pool: DbPool {
                size: 8,
                idle: 5,
                in_use: 3,
                waiting: 2,
            },
            watchers: 1,
            commands: vec![CommandStats {
                command: "ping".into(),
                rate_10s: 2.0,
                rate_1m: 1.0,
                p50_ms: None,
                p99_ms: Some(0.4),
            }],
        };
        let now = humantime::parse_rfc3339("2026-11-29T15:01:05Z").unwrap();
        assert_eq!(
            instance_row(&instance, now),
            [
                "vmm-1\\u{1b}[2J",
                "3",
                "1m05s",
                "412ms",
                "5",
                "2/2/1",
                "1",
                "1",
                "3/8",
                "2",
                "2.0"
            ]
        );
        let fleet = crate::top::stats::Fleet::new(vec![instance.clone(), instance]);
        assert_eq!(
            totals_row(&fleet.totals),
            [
                "total", "", "", "", "10", "4/4/2", "2", "2", "6/16", "4", "4.0"
            ]
        );
        assert_eq!(
            command_row(&fleet.commands[0]),
            ["ping", "4.0", "2.0", "0.40"]
        );
        assert_eq!(INSTANCE_HEADERS.len(), INSTANCE_RIGHT.len() + 1);
    }
}
