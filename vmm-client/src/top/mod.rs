//! `vmm-client top --admin`: the whole fleet at a glance, from one
//! operator session. Every `--interval` it asks `stats`, which answers for
//! every live instance from the snapshots they write with their leases,
//! so one connection to any instance sees them all.
//!
//! On a terminal (stdout, without `--json` or `--once`) it is a live view:
//! the connection also `watch`es, so the latest events show under the
//! figures as they happen; `q` or Ctrl-C quits. Anywhere else it prints a
//! plain table per refresh (with `--json`, the `stats` reply line) until
//! SIGINT or SIGTERM, or once with `--once`.
//!
//! Like `watch` and `list --watch`, a lost connection ends the run (exit
//! 3) rather than being retried: the figures would otherwise stop moving
//! without saying why.
//!
//! The modules, from the top down: `terminal` (raw mode, the alternate
//! screen and the keys) draws through `view`; `view` and `plain` lay out the
//! cells of `table`, which formats the figures of `stats`.

mod plain;
mod stats;
mod table;
mod terminal;
mod view;

use std::io::{self, IsTerminal};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

use self::stats::Fleet;
use self::terminal::{Input, Screen};
use self::view::Model;
use crate::conn::{Conn, sleep_until};
use crate::failure::{Failure, describe};
use crate::op::Op;
use crate::signals::Signals;
use crate::{out, secrets};

/// How `top` runs, from its flags.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The time between two `stats` requests.
    pub interval: Duration,
    /// One refresh, printed plainly, and exit.
    pub once: bool,
}

/// Runs until `q`, a signal (`Ok`) or a failure; `keepalive` as for
/// `watch` (it matters only with an interval longer than it).
pub async fn run(
    addr: &str,
    json: bool,
    keepalive: Option<Duration>,
    options: Options,
) -> Result<(), Failure> {
    let admin_token = secrets::admin_token()?;
    let mut signals = Signals::install()
        .map_err(|err| Failure::Usage(format!("cannot handle signals: {err}")))?;
    let live = !json && !options.once && io::stdout().is_terminal();
    let start = async {
        let mut conn = Conn::connect(addr, json).await?;
        conn.hold_events();
        conn.operator(admin_token).await?;
        if live {
            conn.prepare(&Op::Watch {
                topics: Vec::new(),
                since: None,
            })
            .await?;
        }
        let first = stats(&mut conn, json).await?;
        Ok::<_, Failure>((conn, first))
    };
    let (conn, first) = tokio::select! {
        biased;
        _ = signals.recv() => return Ok(()),
        started = start => started?,
    };
    let mut top = Top {
        conn,
        signals,
        keepalive,
        interval: options.interval,
        fetched_at: Instant::now(),
    };
    if live {
        top.live(first.1).await
    } else {
        top.plain(json, options.once, first).await
    }
}

/// A `stats` reply line and the fleet it holds. An error reply is a
/// failure (printed as the run's document with `--json`).
async fn stats(conn: &mut Conn, json: bool) -> Result<(String, Fleet), Failure> {
    let (line, reply) = conn.fetch(&Op::Stats).await?;
    if !reply.is_success() {
        if json {
            out::line(&line);
        }
        return Err(Failure::from_reply(&reply));
    }
    let fleet = Fleet::from_data(&reply.data).map_err(|what| conn.nonsense(what))?;
    Ok((line, fleet))
}

/// A run after its start: the operator session, and when to ask next.
struct Top {
    conn: Conn,
    signals: Signals,
    keepalive: Option<Duration>,
    interval: Duration,
    /// When `stats` was last asked.
    fetched_at: Instant,
}

impl Top {
    /// A table per refresh (or the reply line, with `--json`).
    async fn plain(
        &mut self,
        json: bool,
        once: bool,
        first: (String, Fleet),
    ) -> Result<(), Failure> {
        let (mut line, mut fleet) = first;
        loop {
            if json {
                out::line(&line);
            } else {
                out::line(plain::refresh(&fleet, SystemTime::now()));
            }
            if once {
                return Ok(());
            }
            loop {
                let ping_at = self.keepalive.map(|idle| self.conn.idle_until(idle));
                tokio::select! {
                    biased;
                    _ = self.signals.recv() => return Ok(()),
                    () = tokio::time::sleep_until(self.fetched_at + self.interval) => break,
                    () = sleep_until(ping_at) => {
                        tokio::select! {
                            biased;
                            _ = self.signals.recv() => return Ok(()),
                            pinged = self.conn.keepalive() => pinged?,
                        }
                    }
                }
            }
            self.fetched_at = Instant::now();
            (line, fleet) = tokio::select! {
                biased;
                _ = self.signals.recv() => return Ok(()),
                fetched = stats(&mut self.conn, json) => fetched?,
            };
        }
    }

    /// The live view, until `q`, Ctrl-C or a signal.
    async fn live(&mut self, first: Fleet) -> Result<(), Failure> {
        let addr = self.conn.addr().to_owned();
        let mut model = Model::new(&addr, first, SystemTime::now());
        for line in self.conn.take_events() {
            model.push_event(&line);
        }
        let mut screen = Screen::enter().map_err(|err| cannot_draw(&err))?;
        let mut inputs = Some(terminal::inputs());
        loop {
            screen.draw(&model).map_err(|err| cannot_draw(&err))?;
            let ping_at = self.keepalive.map(|idle| self.conn.idle_until(idle));
            tokio::select! {
                biased;
                _ = self.signals.recv() => return Ok(()),
                input = next_input(&mut inputs) => {
                    if input == Input::Quit {
                        return Ok(());
                    }
                }
                () = tokio::time::sleep_until(self.fetched_at + self.interval) => {
                    self.fetched_at = Instant::now();
                    let fetch = stats(&mut self.conn, false);
                    let Some(fetched) =
                        while_drawn(fetch, &mut self.signals, &mut inputs, &mut screen, &model)
                            .await?
                    else {
                        return Ok(());
                    };
                    model.update(fetched?.1, SystemTime::now());
                    for line in self.conn.take_events() {
                        model.push_event(&line);
                    }
                }
                () = sleep_until(ping_at) => {
                    let ping = self.conn.keepalive();
                    let Some(pinged) =
                        while_drawn(ping, &mut self.signals, &mut inputs, &mut screen, &model)
                            .await?
                    else {
                        return Ok(());
                    };
                    pinged?;
                    for line in self.conn.take_events() {
                        model.push_event(&line);
                    }
                }
                line = self.conn.next_event() => model.push_event(&line?),
            }
        }
    }
}

/// Awaits `work` (a request) while still quitting on `q`, Ctrl-C or a
/// signal (`Ok(None)`) and redrawing on a resize, so that a slow server
/// does not hold the screen.
async fn while_drawn<T>(
    work: impl Future<Output = T>,
    signals: &mut Signals,
    inputs: &mut Option<UnboundedReceiver<Input>>,
    screen: &mut Screen,
    model: &Model,
) -> Result<Option<T>, Failure> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            _ = signals.recv() => return Ok(None),
            input = next_input(inputs) => match input {
                Input::Quit => return Ok(None),
                Input::Redraw => screen.draw(model).map_err(|err| cannot_draw(&err))?,
            },
            done = &mut work => return Ok(Some(done)),
        }
    }
}

/// The next input; never, once the terminal cannot be read any more (the
/// view goes on, and a signal still ends it).
async fn next_input(inputs: &mut Option<UnboundedReceiver<Input>>) -> Input {
    if let Some(receiver) = inputs.as_mut()
        && let Some(input) = receiver.recv().await
    {
        return input;
    }
    *inputs = None;
    std::future::pending().await
}

fn cannot_draw(err: &io::Error) -> Failure {
    Failure::Usage(format!("cannot draw on the terminal: {}", describe(err)))
}
