//! `top` when stdout is not a terminal (a pipe, a file, a CI log): each
//! refresh is printed whole, as text that reads top to bottom, under a
//! heading line with the time, so that refreshes are told apart by eye and
//! by `grep '^== '`:
//!
//! ```text
//! == vmm top 2026-11-29T15:00:01Z: 2 instances ==
//! +----------+----+-----+-------+-------+------------+-- ...
//! | instance | id |  up | lease | conns | sess c/a/o | ...
//! ...
//! busiest commands (rates summed over the instances, p99 the highest instance's):
//! +---------+-----------+----------+--------+
//! ```

use std::time::SystemTime;

use super::stats::Fleet;
use super::table::{
    COMMAND_HEADERS, COMMAND_RIGHT, COMMANDS_TITLE, INSTANCE_HEADERS, INSTANCE_RIGHT, command_row,
    instance_row, totals_row,
};
use crate::render;

/// How many of the busiest commands a refresh lists.
pub const COMMANDS_SHOWN: usize = 10;

/// One refresh: the heading, the instances and their totals, the busiest
/// commands. Printed as a line, it ends in an empty line that parts it from
/// the next.
pub fn refresh(fleet: &Fleet, now: SystemTime) -> String {
    let noun = if fleet.instances.len() == 1 {
        "instance"
    } else {
        "instances"
    };
    let mut text = format!(
        "== vmm top {}: {} {noun} ==\n",
        humantime::format_rfc3339_seconds(now),
        fleet.instances.len()
    );
    let mut instances = render::table(&INSTANCE_HEADERS, &INSTANCE_RIGHT);
    for instance in &fleet.instances {
        instances.add_row(instance_row(instance, now));
    }
    instances.add_row(totals_row(&fleet.totals));
    text.push_str(&format!("{instances}\n"));
    if fleet.commands.is_empty() {
        text.push_str("no commands in the last minute\n");
    } else {
        let mut commands = render::table(&COMMAND_HEADERS, &COMMAND_RIGHT);
        for command in fleet.commands.iter().take(COMMANDS_SHOWN) {
            commands.add_row(command_row(command));
        }
        text.push_str(&format!("{COMMANDS_TITLE}:\n{commands}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::stats::{CommandStats, Instance};

    #[test]
    fn a_refresh_names_every_instance_the_totals_and_the_commands() {
        let command = |name: &str, rate: f64| CommandStats {
            command: name.into(),
            rate_10s: rate,
            rate_1m: rate,
            p50_ms: Some(0.1),
            p99_ms: Some(0.5),
        };
        let a = Instance {
            id: 1,
            name: "vmm-a".into(),
            connections: 2,
            commands: (0..12)
                .map(|i| command(&format!("c{i:02}"), f64::from(i)))
                .collect(),
            ..Instance::default()
        };
        let b = Instance {
            id: 2,
            name: "vmm-b".into(),
            connections: 1,
            ..Instance::default()
        };
        let now = humantime::parse_rfc3339("2026-11-29T15:00:01Z").unwrap();
        let text = refresh(&Fleet::new(vec![a, b]), now);
        assert!(
            text.starts_with("== vmm top 2026-11-29T15:00:01Z: 2 instances ==\n"),
            "{text}"
        );
        for word in ["vmm-a", "vmm-b", "| total ", "sess c/a/o", COMMANDS_TITLE] {
            assert!(text.contains(word), "{word}: {text}");
        }
        // The ten busiest only, busiest first.
        assert!(text.contains("| c11 "), "{text}");
        assert!(!text.contains("| c01 "), "{text}");
        assert!(text.find("| c11 ") < text.find("| c10 "), "{text}");
        assert!(text.ends_with("+\n"), "{text}");

        let quiet = refresh(&Fleet::new(Vec::new()), now);
        assert!(quiet.contains("0 instances"), "{quiet}");
        assert!(quiet.contains("no commands in the last minute"), "{quiet}");
    }
}
