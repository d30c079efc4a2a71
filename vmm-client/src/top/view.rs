//! `top` on a terminal: what is on screen, and drawing it into a ratatui
//! frame of any size. Top to bottom: a heading (the server, how many
//! instances, when the figures came, the keys), the instances with their
//! totals, the busiest commands, and the latest events, which take what
//! room is left. Drawing does no I/O, so tests draw into ratatui's
//! `TestBackend`.

use std::collections::VecDeque;
use std::time::SystemTime;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Style, Stylize};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table};

use super::stats::Fleet;
use super::table::{
    COMMAND_HEADERS, COMMAND_RIGHT, COMMANDS_TITLE, INSTANCE_HEADERS, INSTANCE_RIGHT, command_row,
    instance_row, totals_row,
};
use crate::events;

/// How many events are kept: more than any screen shows.
const EVENTS_KEPT: usize = 500;

/// At most this many commands are listed, however tall the screen, so
/// that the events keep some room.
const COMMANDS_SHOWN: usize = 10;

/// What the screen shows.
#[derive(Debug)]
pub struct Model {
    addr: String,
    fleet: Fleet,
    /// When the last `stats` reply came: what uptimes count to.
    updated: SystemTime,
    /// The latest events, as people read them; newest last.
    events: VecDeque<String>,
}

impl Model {
    pub fn new(addr: &str, fleet: Fleet, now: SystemTime) -> Model {
        Model {
            addr: addr.to_owned(),
            fleet,
            updated: now,
            events: VecDeque::new(),
        }
    }

    pub fn update(&mut self, fleet: Fleet, now: SystemTime) {
        self.fleet = fleet;
        self.updated = now;
    }

    /// Adds an event line as the server sent it.
    pub fn push_event(&mut self, line: &str) {
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(events::human(line));
    }
}

pub fn draw(frame: &mut Frame<'_>, model: &Model) {
    let fleet = &model.fleet;
    let commands = fleet.commands.len().clamp(1, COMMANDS_SHOWN);
    // Borders, header; and the instances' totals.
    let [heading, instances, busiest, events] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(height(fleet.instances.len() + 1)),
        Constraint::Length(height(commands)),
        Constraint::Min(3),
    ])
    .areas(frame.area());

    let noun = if fleet.instances.len() == 1 {
        "instance"
    } else {
        "instances"
    };
    let title = format!(
        "vmm top  {}  {} {noun}  {}  q quits",
        events::clean(&model.addr),
        fleet.instances.len(),
        humantime::format_rfc3339_seconds(model.updated)
    );
    frame.render_widget(Paragraph::new(Line::from(title).bold()), heading);

    let rows: Vec<Vec<String>> = fleet
        .instances
        .iter()
        .map(|instance| instance_row(instance, model.updated).to_vec())
        .collect();
    let totals = totals_row(&fleet.totals).to_vec();
    let listed = table(&INSTANCE_HEADERS, &INSTANCE_RIGHT, &rows, Some(&totals));
    frame.render_widget(
        listed.block(Block::bordered().title("instances")),
        instances,
    );

    let rows: Vec<Vec<String>> = fleet
        .commands
        .iter()
        .take(COMMANDS_SHOWN)
        .map(|command| command_row(command).to_vec())
        .collect();
    let block = Block::bordered().title(COMMANDS_TITLE);
    if rows.is_empty() {
        let none = Paragraph::new("no commands in the last minute").block(block);
        frame.render_widget(none, busiest);
    } else {
        let listed = table(&COMMAND_HEADERS, &COMMAND_RIGHT, &rows, None);
        frame.render_widget(listed.block(block), busiest);
    }

    draw_events(frame, model, events);
}

/// The height of a bordered table of `rows` rows under a header.
fn height(rows: usize) -> u16 {
    u16::try_from(rows + 3).unwrap_or(u16::MAX)
}

/// The newest events that fit, newest at the bottom.
fn draw_events(frame: &mut Frame<'_>, model: &Model, area: Rect) {
    let room = usize::from(area.height.saturating_sub(2));
    let skip = model.events.len().saturating_sub(room);
    let lines: Vec<Line<'_>> = if model.events.is_empty() {
        vec![Line::from("no events yet").dim()]
    } else {
        model
            .events
            .iter()
            .skip(skip)
            .map(|line| Line::from(line.as_str()))
            .collect()
    };
    let block = Block::bordered().title("latest events");
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

/// A table whose columns are as wide as their widest cell; the columns
/// whose index is in `right` are right-aligned; `footer` in bold.
fn table<'a>(
    headers: &[&'a str],
    right: &[usize],
    rows: &'a [Vec<String>],
    footer: Option<&'a Vec<String>>,
) -> Table<'a> {
    let widths = headers.iter().enumerate().map(|(i, header)| {
        let cells = rows.iter().chain(footer).filter_map(|row| row.get(i));
        let widest = cells.map(|cell| cell.chars().count()).max().unwrap_or(0);
        let width = widest.max(header.chars().count());
        Constraint::Length(u16::try_from(width).unwrap_or(u16::MAX))
    });
    let widths: Vec<Constraint> = widths.collect();
    let cell = |i: usize, text: &'a str| {
        let line = Line::from(text);
        Cell::from(if right.contains(&i) {
            line.right_aligned()
        } else {
            line
        })
    };
    let row = |texts: &'a [String]| {
        Row::new(
            texts
                .iter()
                .enumerate()
                .map(|(i, text)| cell(i, text.as_str())),
        )
    };
    let header = Row::new(headers.iter().enumerate().map(|(i, text)| cell(i, text)));
    let mut table = Table::new(rows.iter().map(|texts| row(texts)), widths)
        .header(header.style(Style::new().bold()))
        .column_spacing(1);
    if let Some(footer) = footer {
        table = table.footer(row(footer).style(Style::new().bold()));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::stats::{CommandStats, Instance, Sessions};
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn screen(model: &Model, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|frame| draw(frame, model)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..buffer.area.height)
            .map(|y| {
                (0..buffer.area.width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
            })
            .collect()
    }

    fn model() -> Model {
        let instance = |id: i64, name: &str, rate: f64| Instance {
            id,
            name: name.into(),
            started_at: Some("2026-11-29T15:00:00.123456Z".into()),
            lease_age_ms: Some(412),
            connections: 3,
            sessions: Sessions {
                connected: 1,
                authenticated: 1,
                operator: 1,
            },
            commands: vec![CommandStats {
                command: "register".into(),
                rate_10s: rate,
                rate_1m: rate / 2.0,
                p50_ms: Some(3.0),
                p99_ms: Some(rate * 10.0),
            }],
            ..Instance::default()
        };
        let fleet = Fleet::new(vec![instance(1, "vmm-a", 1.0), instance(2, "vmm-b", 3.0)]);
        let now = humantime::parse_rfc3339("2026-11-29T16:01:00Z").unwrap();
        let mut model = Model::new("127.0.0.1:8888", fleet, now);
        model.push_event(
            r#"{"event":"vm_registered","data":{"vm":{"vm_id":"vm-1","ram":512,"cpu":2,"disks":[]}},"at":"2026-11-29T16:00:59.5Z"}"#,
        );
        model
    }

    #[test]
    fn the_screen_shows_instances_totals_commands_and_events() {
        let lines = screen(&model(), 120, 24);
        let text = lines.join("\n");
        assert!(
            lines[0].starts_with("vmm top  127.0.0.1:8888  2 instances  2026-11-29T16:01:00Z"),
            "{text}"
        );
        let row = |name: &str| {
            lines
                .iter()
                .find(|line| line.contains(name))
                .map(|line| line.split_whitespace().collect::<Vec<_>>())
        };
        assert_eq!(
            row("vmm-a").unwrap(),
            [
                "│vmm-a", "1", "1h00m", "412ms", "3", "1/1/1", "0", "0", "0/0", "0", "1.0", "│"
            ],
            "{text}"
        );
        let totals = row("│total ").unwrap();
        assert_eq!(
            totals[1..],
            ["6", "2/2/2", "0", "0", "0/0", "0", "4.0", "│"],
            "{text}"
        );
        // One row for the command, merged over both instances.
        assert_eq!(
            row("register").unwrap(),
            ["│register", "4.0", "2.0", "30.0", "│"],
            "{text}"
        );
        assert!(
            text.contains("16:00:59.500 vm_registered vm-1 ram=512 cpu=2 disks=-"),
            "{text}"
        );
        // Numbers are right-aligned under their headers.
        let header = lines.iter().find(|line| line.contains("req/s")).unwrap();
        let a = lines.iter().find(|line| line.contains("vmm-a")).unwrap();
        assert_eq!(
            header.find("req/s").map(|at| at + 5),
            a.find("1.0").map(|at| at + 3)
        );
    }

    #[test]
    fn the_newest_events_that_fit_are_shown() {
        let mut model = model();
        for i in 0..40 {
            model.push_event(&format!(
                r#"{{"event":"e{i:02}","at":"2026-11-29T16:00:00Z"}}"#
            ));
        }
        let text = screen(&model, 100, 24).join("\n");
        assert!(text.contains(" e39"), "{text}");
        assert!(!text.contains(" e00"), "{text}");
        let kept = (0..EVENTS_KEPT + 10).fold(model, |mut model, _| {
            model.push_event("{}");
            model
        });
        assert_eq!(kept.events.len(), EVENTS_KEPT);
    }

    #[test]
    fn any_size_draws_even_one_too_small_to_show_everything() {
        let mut empty = model();
        empty.update(Fleet::default(), SystemTime::UNIX_EPOCH);
        let text = screen(&empty, 100, 12).join("\n");
        assert!(text.contains("no commands in the last minute"), "{text}");
        for (width, height) in [(1, 1), (20, 5), (60, 8), (300, 100)] {
            screen(&model(), width, height);
        }
    }
}
