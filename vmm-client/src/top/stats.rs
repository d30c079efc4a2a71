//! What `stats` answers, and the fleet made of it: every live instance's
//! figures, their totals, and the commands of all instances merged into
//! one ranking. Pure: no I/O, no clock (the caller says what time it is).
//!
//! Every field is optional on the wire (`#[serde(default)]`) and unknown
//! ones are ignored, so that a newer server that adds or drops a figure
//! still shows the rest rather than failing the whole view.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use vmm_core::Data;

/// One instance's snapshot, written with its lease renewal.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Instance {
    pub id: i64,
    pub name: String,
    /// RFC 3339, UTC.
    pub started_at: Option<String>,
    /// How old the snapshot is: the figures are at most this stale.
    pub lease_age_ms: Option<u64>,
    pub connections: u64,
    pub sessions: Sessions,
    pub password_queue: u64,
    pub db_pool: DbPool,
    pub watchers: u64,
    pub commands: Vec<CommandStats>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Sessions {
    pub connected: u64,
    pub authenticated: u64,
    pub operator: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct DbPool {
    pub size: u64,
    pub idle: u64,
    pub in_use: u64,
    pub waiting: u64,
}

/// A command's traffic on one instance, or (after [`Fleet::new`]) on all.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct CommandStats {
    pub command: String,
    /// Requests per second over the last 10 s, every outcome.
    pub rate_10s: f64,
    /// Requests per second over the last minute.
    pub rate_1m: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Instance {
    /// Requests per second over the last 10 s, all commands.
    pub fn rate(&self) -> f64 {
        // Not `sum()`, whose empty sum is -0.0, shown as `-0.0`.
        self.commands
            .iter()
            .fold(0.0, |sum, command| sum + command.rate_10s)
    }

    /// How long the instance has been up at `now`; `None` when its start
    /// time is missing or unreadable (or after `now`: clocks disagree).
    pub fn uptime(&self, now: SystemTime) -> Option<Duration> {
        let started = humantime::parse_rfc3339(self.started_at.as_deref()?).ok()?;
        now.duration_since(started).ok()
    }
}

/// The sums over every instance.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub instances: usize,
    pub connections: u64,
    pub sessions: Sessions,
    pub password_queue: u64,
    pub db_pool: DbPool,
    pub watchers: u64,
    /// Requests per second over the last 10 s.
    pub rate: f64,
}

/// Every live instance, their totals, and the commands of the whole fleet,
/// busiest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fleet {
    /// As the server ordered them: by name, then id.
    pub instances: Vec<Instance>,
    pub totals: Totals,
    /// One entry per command: rates summed over the instances, `p99_ms`
    /// (and `p50_ms`) the highest instance's, an upper bound of the
    /// fleet's own (which cannot be computed from per-instance
    /// percentiles). Busiest first: by the 10 s rate, then the 1 min rate,
    /// then name.
    pub commands: Vec<CommandStats>,
}

impl Fleet {
    /// The fleet in a successful `stats` reply's `data`; `Err` says what
    /// did not have the expected shape.
    pub fn from_data(data: &Data) -> Result<Fleet, String> {
        let instances = data
            .get("instances")
            .cloned()
            .ok_or("no `data.instances` in the stats reply")?;
        let instances: Vec<Instance> =
            serde_json::from_value(instances).map_err(|err| format!("`data.instances`: {err}"))?;
        Ok(Fleet::new(instances))
    }

    pub fn new(instances: Vec<Instance>) -> Fleet {
        let mut totals = Totals {
            instances: instances.len(),
            ..Totals::default()
        };
        let mut commands: BTreeMap<&str, CommandStats> = BTreeMap::new();
        for instance in &instances {
            totals.connections += instance.connections;
            totals.sessions.connected += instance.sessions.connected;
            totals.sessions.authenticated += instance.sessions.authenticated;
            totals.sessions.operator += instance.sessions.operator;
            totals.password_queue += instance.password_queue;
            totals.db_pool.size += instance.db_pool.size;
            totals.db_pool.idle += instance.db_pool.idle;
            totals.db_pool.in_use += instance.db_pool.in_use;
            totals.db_pool.waiting += instance.db_pool.waiting;
            totals.watchers += instance.watchers;
            totals.rate += instance.rate();
            for command in &instance.commands {
                let merged = commands
                    .entry(&command.command)
                    .or_insert_with(|| CommandStats {
                        command: command.command.clone(),
                        ..CommandStats::default()
                    });
                merged.rate_10s += command.rate_10s;
                merged.rate_1m += command.rate_1m;
                merged.p50_ms = highest(merged.p50_ms, command.p50_ms);
                merged.p99_ms = highest(merged.p99_ms, command.p99_ms);
            }
        }
        let mut commands: Vec<CommandStats> = commands.into_values().collect();
        commands.sort_by(|a, b| {
            descending(a.rate_10s, b.rate_10s)
                .then_with(|| descending(a.rate_1m, b.rate_1m))
                .then_with(|| a.command.cmp(&b.command))
        });
        Fleet {
            instances,
            totals,
            commands,
        }
    }
}

fn highest(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn descending(a: f64, b: f64) -> Ordering {
    b.total_cmp(&a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn instance(name: &str, commands: Value) -> Value {
        json!({
            "id": 1, "name": name, "started_at": "2026-11-29T15:00:00.123456Z",
            "lease_age_ms": 412, "connections": 3,
            "sessions": {"connected": 1, "authenticated": 1, "operator": 1},
            "password_queue": 2,
            "db_pool": {"size": 4, "idle": 3, "in_use": 1, "waiting": 0},
            "watchers": 1,
            "commands": commands,
        })
    }

    fn fleet(instances: Value) -> Fleet {
        let data = json!({ "instances": instances });
        let Value::Object(data) = data else {
            unreachable!()
        };
        Fleet::from_data(&data).unwrap()
    }

    #[test]
    fn the_fleet_sums_the_instances_and_merges_their_commands() {
        let fleet = fleet(json!([
            instance(
                "a",
                json!([
                    {"command": "ping", "rate_10s": 1.0, "rate_1m": 0.5, "p50_ms": 0.1, "p99_ms": 0.4},
                    {"command": "list", "rate_10s": 0.5, "rate_1m": 2.0, "p50_ms": 3.0, "p99_ms": 9.0},
                ])
            ),
            instance(
                "b",
                json!([
                    {"command": "list", "rate_10s": 1.0, "rate_1m": 1.0, "p50_ms": 2.0, "p99_ms": 12.5},
                    {"command": "update", "rate_10s": 0.0, "rate_1m": 0.1, "p99_ms": 40.0},
                ])
            ),
        ]));
        let totals = &fleet.totals;
        assert_eq!(totals.instances, 2);
        assert_eq!(totals.connections, 6);
        assert_eq!(
            totals.sessions,
            Sessions {
                connected: 2,
                authenticated: 2,
                operator: 2
            }
        );
        assert_eq!(totals.password_queue, 4);
        assert_eq!(
            totals.db_pool,
            DbPool {
                size: 8,
                idle: 6,
                in_use: 2,
                waiting: 0
            }
        );
        assert_eq!(totals.watchers, 2);
        assert!((totals.rate - 2.5).abs() < 1e-9, "{}", totals.rate);
        assert!((fleet.instances[0].rate() - 1.5).abs() < 1e-9);

        let names: Vec<&str> = fleet.commands.iter().map(|c| c.command.as_str()).collect();
        assert_eq!(names, ["list", "ping", "update"]);
        let list = &fleet.commands[0];
        assert!((list.rate_10s - 1.5).abs() < 1e-9);
        assert!((list.rate_1m - 3.0).abs() < 1e-9);
        assert_eq!((list.p50_ms, list.p99_ms), (Some(3.0), Some(12.5)));
        assert_eq!(fleet.commands[2].p50_ms, None);
        assert_eq!(fleet.commands[2].p99_ms, Some(40.0));
    }

    #[test]
    fn equal_rates_rank_by_the_minute_then_by_name() {
        let fleet = fleet(json!([instance(
            "a",
            json!([
                {"command": "b", "rate_10s": 1.0, "rate_1m": 1.0},
                {"command": "a", "rate_10s": 1.0, "rate_1m": 1.0},
                {"command": "c", "rate_10s": 1.0, "rate_1m": 2.0},
            ])
        )]));
        let names: Vec<&str> = fleet.commands.iter().map(|c| c.command.as_str()).collect();
        assert_eq!(names, ["c", "a", "b"]);
    }

    #[test]
    fn unknown_and_missing_fields_are_no_error() {
        let fleet = fleet(json!([
            {"id": 7, "name": "new", "cpu_temperature": 80, "sessions": {"connected": 2, "idle": 9}},
            {},
        ]));
        assert_eq!(fleet.instances[0].sessions.connected, 2);
        assert_eq!(fleet.instances[0].lease_age_ms, None);
        assert_eq!(fleet.instances[1], Instance::default());
        assert_eq!(fleet.totals.instances, 2);
        assert!(fleet.commands.is_empty());
        assert!(fleet.instances[1].rate().is_sign_positive());
        assert_eq!(fleet.instances[0].uptime(SystemTime::now()), None);
    }

    #[test]
    fn a_reply_without_instances_is_an_error() {
        let Value::Object(data) = json!({"instances": "many"}) else {
            unreachable!()
        };
        assert!(Fleet::from_data(&data).is_err());
        assert!(Fleet::from_data(&Data::new()).is_err());
    }

    #[test]
    fn uptime_counts_from_the_start_time() {
        let fleet = fleet(json!([instance("a", json!([]))]));
        let started = humantime::parse_rfc3339("2026-11-29T15:00:00.123456Z").unwrap();
        let now = started + Duration::from_secs(3725);
        assert_eq!(
            fleet.instances[0].uptime(now),
            Some(Duration::from_secs(3725))
        );
        assert_eq!(
            fleet.instances[0].uptime(started - Duration::from_secs(1)),
            None
        );
    }
}
