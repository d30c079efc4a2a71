//! What a run does, as a list of steps: a workload on the command line is
//! one step (after seeding, when asked), a scenario is several. Each step
//! adds its rows, notes or seeding to the report.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::args::{ListKind, Options, Scenario, Workload};
use crate::canned::Canned;
use crate::error::{BenchError, Result};
use crate::load::{Plan, Requests, Setup, Tally, drive, line, open_all, run_all, set_up};
use crate::net::{self, Dialer, PER_ADDRESS, PER_ADDRESS_LOGINS};
use crate::report::{Row, mib};
use crate::rss::{self, RssFigures, RssWatch};
use crate::seed::{self, PASSWORD, seeded_id};
use crate::{Bench, progress};

const PING: &[u8] = b"{\"command\":\"ping\"}\n";

/// The VM the bench reads lists as when it has no operator token.
const OBSERVER: &str = "bench-observer";

/// Beyond this many VMs, seeding through `register` (an argon2 hash each,
/// about a hundred a second) takes too long to be what anyone wants.
const PROTOCOL_SEED_MAX: usize = 5_000;

/// Seeding through --direct-db may take this many --timeout periods
/// (a million VMs take about 25 s).
const SEED_PATIENCE: u32 = 20;

/// Connections that seed through `register`.
const SEED_CONNS: usize = 8;

/// How long after a workload the server's RSS may take to stop falling,
/// and how long it must not fall to count as settled.
const SETTLE_LIMIT: Duration = Duration::from_secs(15);
const SETTLE_QUIET: Duration = Duration::from_secs(2);

/// When a timed or counted step stops: whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Until {
    pub secs: Option<Duration>,
    pub count: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Make sure this many bench VMs exist.
    Seed(usize),
    Ping {
        conns: usize,
        pipeline: usize,
        until: Until,
    },
    Register {
        conns: usize,
        until: Until,
    },
    Authenticate {
        conns: usize,
        /// Bench VMs to take turns with (at least one per connection).
        vms: usize,
        until: Until,
    },
    Update {
        conns: usize,
        until: Until,
    },
    /// Connection n loops `kinds[n % kinds.len()]`.
    Lists {
        kinds: Vec<ListKind>,
        conns: usize,
        until: Until,
        ping_beside: bool,
    },
    /// Every page of each list in turn, on one connection.
    Pages {
        kinds: Vec<ListKind>,
        page_size: u32,
    },
    Idle {
        conns: usize,
    },
}

impl Step {
    pub fn name(&self) -> String {
        match self {
            Step::Seed(n) => format!("seed {n} VMs"),
            Step::Ping {
                conns, pipeline, ..
            } => format!("ping, {conns} conns x {pipeline}"),
            Step::Register { conns, until } => match until.count {
                Some(count) => format!("register {count} VMs on {conns} conns"),
                None => format!("register on {conns} conns"),
            },
            Step::Authenticate { conns, .. } => format!("authenticate on {conns} conns"),
            Step::Update { conns, .. } => format!("update on {conns} conns"),
            Step::Lists {
                kinds,
                conns,
                ping_beside,
                ..
            } => {
                let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
                let beside = if *ping_beside { ", ping beside" } else { "" };
                format!("list {} on {conns} conns{beside}", kinds.join("+"))
            }
            Step::Pages { kinds, page_size } => {
                let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
                format!("every page of {} ({page_size} a page)", kinds.join(", "))
            }
            Step::Idle { conns } => format!("{conns} idle conns"),
        }
    }
}

/// `--secs` and `--count` as given; neither means 5 s.
fn until(options: &Options) -> Until {
    Until {
        secs: options
            .secs
            .or(options.count.is_none().then_some(5.0))
            .map(Duration::from_secs_f64),
        count: options.count,
    }
}

/// The steps of one workload from the command line.
pub fn single(workload: &Workload, options: &Options) -> Vec<Step> {
    let conns = |default: usize| options.conns.map_or(default, |c| c as usize);
    let lists = |kinds: Vec<ListKind>| Step::Lists {
        conns: conns(kinds.len()),
        kinds,
        until: until(options),
        ping_beside: options.ping_beside,
    };
    let mut steps: Vec<Step> = options.seed.map(Step::Seed).into_iter().collect();
    steps.push(match workload {
        Workload::Ping => Step::Ping {
            conns: conns(1),
            pipeline: options.pipeline as usize,
            until: until(options),
        },
        Workload::Register => Step::Register {
            conns: conns(4),
            until: Until {
                secs: options.secs.map(Duration::from_secs_f64),
                count: options.count.or(options.secs.is_none().then_some(1_000)),
            },
        },
        Workload::Authenticate => Step::Authenticate {
            conns: conns(4),
            vms: options.seed.unwrap_or(0).max(conns(4)),
            until: until(options),
        },
        Workload::Update => Step::Update {
            conns: conns(4),
            until: until(options),
        },
        Workload::ActiveVms => lists(vec![ListKind::ActiveVms]),
        Workload::AuthenticatedVms => lists(vec![ListKind::AuthenticatedVms]),
        Workload::AllVms => lists(vec![ListKind::AllVms]),
        Workload::AllDisks => lists(vec![ListKind::AllDisks]),
        Workload::Lists => lists(options.lists.clone()),
        Workload::Pages => Step::Pages {
            kinds: options.lists.clone(),
            page_size: options.page_size,
        },
        Workload::Idle => Step::Idle { conns: conns(1000) },
        Workload::Scenario { name } => return scenario(*name, options),
    });
    steps
}

/// The steps of a scenario. `--secs` sets each timed step's length,
/// `--seed` the VMs listed (100,000 by default).
pub fn scenario(name: Scenario, options: &Options) -> Vec<Step> {
    let timed = Until {
        secs: Some(Duration::from_secs_f64(options.secs.unwrap_or(5.0))),
        count: None,
    };
    let once = Until {
        secs: None,
        count: Some(1),
    };
    let ping = |conns, pipeline| Step::Ping {
        conns,
        pipeline,
        until: timed,
    };
    // The memory figures first, on a server that has not yet built and
    // freed 100,000-VM lists: its heap would hide what they add.
    let mut steps = vec![
        ping(1, 1),
        ping(16, 1),
        ping(64, 1),
        ping(16, 16),
        Step::Register {
            conns: 8,
            until: Until {
                secs: None,
                count: Some(1_000),
            },
        },
        Step::Idle { conns: 10_000 },
        Step::Seed(options.seed.unwrap_or(100_000)),
        Step::Lists {
            kinds: vec![ListKind::AllVms],
            conns: 1,
            until: once,
            ping_beside: false,
        },
        Step::Pages {
            kinds: vec![ListKind::AllVms, ListKind::AllDisks],
            page_size: options.page_size,
        },
        Step::Lists {
            kinds: vec![ListKind::AllVms, ListKind::AllDisks],
            conns: 8,
            until: timed,
            ping_beside: true,
        },
    ];
    if name == Scenario::All {
        steps.extend([
            Step::Authenticate {
                conns: 4,
                vms: 4,
                until: timed,
            },
            Step::Update {
                conns: 4,
                until: timed,
            },
            Step::Lists {
                kinds: vec![ListKind::ActiveVms],
                conns: 1,
                until: timed,
                ping_beside: false,
            },
            Step::Lists {
                kinds: vec![ListKind::AuthenticatedVms],
                conns: 1,
                until: timed,
                ping_beside: false,
            },
        ]);
    }
    steps
}

/// One measured load: how to open, set up and drive its connections.
struct Load {
    conns: usize,
    pipeline: usize,
    setup: Setup,
    /// Set-ups at once (operator and password logins are throttled per
    /// address: at most 5 at once).
    setup_concurrency: usize,
    requests: Box<dyn Fn(usize) -> Requests + Send + Sync>,
    until: Until,
    count_items: bool,
    ping_beside: bool,
}

struct Measured {
    tallies: Vec<Tally>,
    elapsed: Duration,
    rss: RssFigures,
    beside: Option<Tally>,
}

/// Adds up the tallies of some connections into a row.
fn row(
    name: &str,
    target: &'static str,
    pipeline: usize,
    tallies: &[&Tally],
    elapsed: Duration,
) -> Row {
    let mut all = Tally::default();
    for tally in tallies {
        all.merge(tally);
    }
    Row::new(name, target, tallies.len(), pipeline, &all, elapsed)
}

fn authenticate_request(vm_id: &str) -> Value {
    json!({"command": "authenticate", "data": {"vm_id": vm_id, "password": PASSWORD}})
}

impl Bench {
    pub async fn run_step(&mut self, step: &Step) -> Result<()> {
        match step {
            Step::Seed(n) => self.seed(*n).await,
            Step::Ping {
                conns,
                pipeline,
                until,
            } => self.ping(*conns, *pipeline, *until).await,
            Step::Register { conns, until } => self.register(*conns, *until).await,
            Step::Authenticate { conns, vms, until } => {
                self.authenticate(*conns, *vms, *until).await
            }
            Step::Update { conns, until } => self.update(*conns, *until).await,
            Step::Lists {
                kinds,
                conns,
                until,
                ping_beside,
            } => self.lists(kinds, *conns, *until, *ping_beside).await,
            Step::Pages { kinds, page_size } => self.pages(kinds, *page_size).await,
            Step::Idle { conns } => self.idle(*conns).await,
        }
    }

    /// Opens and sets up the load's connections, then drives them under
    /// one plan while the server's RSS is sampled.
    async fn measure(&self, dialer: &Dialer, load: &Load, pid: Option<u32>) -> Result<Measured> {
        net::check_nofile(load.conns + usize::from(load.ping_beside))?;
        let (conns, _) = open_all(
            dialer,
            0,
            load.conns,
            load.setup_concurrency,
            load.setup.clone(),
            self.timeout,
        )
        .await?;
        let beside = if load.ping_beside {
            let (mut one, _) =
                open_all(dialer, load.conns, 1, 1, Setup::Nothing, self.timeout).await?;
            one.pop()
        } else {
            None
        };
        let work: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(c, conn)| (conn, (load.requests)(c)))
            .collect();
        // Neither a length nor a count would never end: 5 s then.
        let secs = match load.until {
            Until {
                secs: None,
                count: None,
            } => Some(Duration::from_secs(5)),
            Until { secs, .. } => secs,
        };
        let plan = Plan {
            pipeline: load.pipeline,
            deadline: secs.map(|secs| Instant::now() + secs),
            budget: load.until.count.map(|n| Arc::new(AtomicU64::new(n))),
            stop: None,
            count_items: load.count_items,
        };
        let watch = RssWatch::start(pid);
        let stop = Arc::new(AtomicBool::new(false));
        let beside = beside.map(|conn| {
            let plan = Plan {
                pipeline: 1,
                stop: Some(Arc::clone(&stop)),
                ..Plan::default()
            };
            tokio::spawn(drive(conn, Requests::Same(PING.to_vec()), plan))
        });
        let (tallies, elapsed) = run_all(work, &plan).await;
        stop.store(true, Ordering::Relaxed);
        let beside = match beside {
            Some(task) => Some(task.await.unwrap_or_else(|err| Tally {
                errors: 1,
                first_error: Some(format!("the ping beside failed: {err}")),
                ..Tally::default()
            })),
            None => None,
        };
        Ok(Measured {
            tallies,
            elapsed,
            rss: watch.finish(),
            beside,
        })
    }

    async fn seed(&mut self, n: usize) -> Result<()> {
        if n == 0 || self.report.seeding.iter().any(|s| s.wanted >= n) {
            return Ok(());
        }
        let disks = self.options.disks_per_vm;
        let seeded = match &self.options.direct_db {
            Some(url) => {
                let seeding = seed::direct(url, n, disks, self.timeout);
                tokio::time::timeout(self.timeout * SEED_PATIENCE, seeding)
                    .await
                    .map_err(|_| {
                        BenchError::new(format!(
                            "seeding through --direct-db took more than {:?}",
                            self.timeout * SEED_PATIENCE
                        ))
                    })??
            }
            None if n > PROTOCOL_SEED_MAX => {
                return Err(BenchError::new(format!(
                    "seeding {n} VMs through `register` costs one argon2 hash each on the server \
                     (about a hundred a second): give --direct-db URL (the server's database), \
                     or a --seed of at most {PROTOCOL_SEED_MAX}"
                )));
            }
            None => {
                seed::through_protocol(
                    &self.dialer(PER_ADDRESS_LOGINS),
                    n,
                    SEED_CONNS,
                    disks,
                    self.options.registration_secret.as_deref(),
                    self.timeout,
                )
                .await?
            }
        };
        progress(&format!(
            "seeded {n} VMs ({}): {} there already, {} added in {:.2} s",
            seeded.how, seeded.existing, seeded.added, seeded.secs
        ));
        self.report.seeding.push(seeded);
        Ok(())
    }

    async fn ping(&mut self, conns: usize, pipeline: usize, until: Until) -> Result<()> {
        let load = Load {
            conns,
            pipeline,
            setup: Setup::Nothing,
            setup_concurrency: 64,
            requests: Box::new(|_| Requests::Same(PING.to_vec())),
            until,
            count_items: false,
            ping_beside: false,
        };
        let rounds = if self.options.no_limit {
            1
        } else {
            self.options.rounds.max(1)
        };
        let mut ratios = Vec::new();
        for _ in 0..rounds {
            let mut limit = None;
            if !self.options.no_limit {
                // The limit server's ends of the connections are in this process too.
                net::check_nofile(2 * conns)?;
                let canned = Canned::start(self.split.as_ref()).await?;
                let dialer = Dialer::new(canned.addr, PER_ADDRESS, self.timeout);
                let m = self.measure(&dialer, &load, None).await?;
                if let Some(failure) = canned.pin_failure() {
                    return Err(BenchError::new(format!(
                        "the limit server could not be placed on the servers' CPUs: {failure}"
                    )));
                }
                drop(canned);
                let tallies: Vec<&Tally> = m.tallies.iter().collect();
                let limit_row = row("ping", "limit", pipeline, &tallies, m.elapsed);
                limit = Some(limit_row.rate).filter(|rate| *rate > 0.0);
                self.report.rows.push(limit_row);
            }
            let m = self
                .measure(&self.dialer(PER_ADDRESS), &load, self.server_pid)
                .await?;
            let tallies: Vec<&Tally> = m.tallies.iter().collect();
            let mut server_row = row("ping", "server", pipeline, &tallies, m.elapsed);
            server_row.ratio_to_limit = limit.map(|limit| server_row.rate / limit);
            server_row.rss = Some(m.rss);
            if let Some(ratio) = server_row.ratio_to_limit {
                ratios.push((ratio, server_row.rate));
            }
            self.report.rows.push(server_row);
        }
        if let Some((ratio, rate)) = median(&mut ratios) {
            let each = if ratios.len() > 1 {
                let each: Vec<String> = ratios
                    .iter()
                    .map(|(ratio, _)| format!("{:.1}%", ratio * 100.0))
                    .collect();
                format!(", median of {} rounds: {}", ratios.len(), each.join(" "))
            } else {
                String::new()
            };
            self.report.notes.push(format!(
                "ping {conns} conns x {pipeline}: {rate:.0}/s, {:.1}% of the limit's {:.0}/s \
                 (target ≥ 95%){each}",
                ratio * 100.0,
                rate / ratio
            ));
        }
        Ok(())
    }

    async fn register(&mut self, conns: usize, until: Until) -> Result<()> {
        let run = self.report.run.clone();
        let next = Arc::new(AtomicU64::new(0));
        let disks = self.options.disks_per_vm;
        let secret = self.options.registration_secret.clone();
        let load = Load {
            conns,
            pipeline: 1,
            setup: Setup::Nothing,
            setup_concurrency: 16,
            requests: Box::new(move |_| {
                let (run, next, secret) = (run.clone(), Arc::clone(&next), secret.clone());
                Requests::Made(Box::new(move |_| {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let vm_id = format!("bench-{run}-{n}");
                    line(&seed::registration(&vm_id, disks, secret.as_deref()))
                }))
            }),
            until,
            count_items: false,
            ping_beside: false,
        };
        // With an enrollment secret, at most 5 registrations per address run at once.
        let m = self
            .measure(&self.dialer(PER_ADDRESS_LOGINS), &load, self.server_pid)
            .await?;
        progress("waiting for the server's RSS to settle ...");
        let settled = rss::settle(self.server_pid, SETTLE_QUIET, SETTLE_LIMIT).await;
        let tallies: Vec<&Tally> = m.tallies.iter().collect();
        let mut r = row("register", "server", 1, &tallies, m.elapsed);
        r.rss = Some(RssFigures {
            settled_kib: settled,
            ..m.rss
        });
        let registered = r.requests - r.errors;
        if let (Some(before), Some(after), Some(settled)) =
            (m.rss.before_kib, m.rss.after_kib, settled)
        {
            let growth = settled as f64 - before as f64;
            let per_thousand = if registered > 0 {
                format!(
                    ", {:.1} MiB per 1,000 (target ≤ 64 MiB)",
                    growth / 1024.0 * 1000.0 / registered as f64
                )
            } else {
                String::new()
            };
            self.report.notes.push(format!(
                "register: {registered} VMs; server RSS {} before, {} right after, {} settled: \
                 {:+.1} MiB{per_thousand}",
                mib(before),
                mib(after),
                mib(settled),
                growth / 1024.0
            ));
        } else {
            self.report
                .notes
                .push(format!("register: {registered} VMs; server RSS n/a"));
        }
        self.report.rows.push(r);
        Ok(())
    }

    async fn authenticate(&mut self, conns: usize, vms: usize, until: Until) -> Result<()> {
        let vms = vms.max(conns);
        self.seed(vms).await?;
        let load = Load {
            conns,
            pipeline: 1,
            setup: Setup::Nothing,
            setup_concurrency: 16,
            requests: Box::new(move |c| {
                // Each VM belongs to one connection: no VM has two logins
                // at once, which its throttle would refuse past five.
                let lines = (c..vms)
                    .step_by(conns)
                    .take(1_000)
                    .map(|n| line(&authenticate_request(&seeded_id(n))))
                    .collect();
                Requests::Cycle(lines)
            }),
            until,
            count_items: false,
            ping_beside: false,
        };
        let m = self
            .measure(&self.dialer(PER_ADDRESS_LOGINS), &load, self.server_pid)
            .await?;
        let tallies: Vec<&Tally> = m.tallies.iter().collect();
        let mut r = row("authenticate", "server", 1, &tallies, m.elapsed);
        r.rss = Some(m.rss);
        self.report.rows.push(r);
        Ok(())
    }

    async fn update(&mut self, conns: usize, until: Until) -> Result<()> {
        self.seed(self.options.seed.unwrap_or(0).max(conns)).await?;
        let updates =
            [2048, 1024].map(|ram| line(&json!({"command": "update", "data": {"ram": ram}})));
        let load = Load {
            conns,
            pipeline: 1,
            // Connection n is bench-seed-n: one session per VM.
            setup: Setup::Request(Arc::new(|n| authenticate_request(&seeded_id(n)))),
            setup_concurrency: 8,
            requests: Box::new(move |_| Requests::Cycle(updates.to_vec())),
            until,
            count_items: false,
            ping_beside: false,
        };
        let m = self
            .measure(&self.dialer(PER_ADDRESS_LOGINS), &load, self.server_pid)
            .await?;
        let tallies: Vec<&Tally> = m.tallies.iter().collect();
        let mut r = row("update", "server", 1, &tallies, m.elapsed);
        r.rss = Some(m.rss);
        self.report.rows.push(r);
        Ok(())
    }

    /// The `authenticate` request that lets a connection read lists: the
    /// operator token, or a session of the bench's own VM (registered and
    /// logged in once; every connection resumes with its token, which
    /// costs the server no hash).
    pub(crate) async fn reader_request(&mut self) -> Result<Value> {
        if let Some(token) = &self.options.admin_token {
            return Ok(json!({"command": "authenticate", "data": {"admin_token": token}}));
        }
        if let Some(request) = &self.reader {
            return Ok(request.clone());
        }
        let dialer = self.dialer(PER_ADDRESS_LOGINS);
        let (mut conns, _) = open_all(&dialer, 0, 1, 1, Setup::Nothing, self.timeout).await?;
        let Some(mut conn) = conns.pop() else {
            return Err(BenchError::new("no connection for the bench's reader"));
        };
        let secret = self.options.registration_secret.as_deref();
        let reply = conn.call(&seed::registration(OBSERVER, 0, secret)).await?;
        if reply["status"] != "success" && reply["code"] != "already_exists" {
            return Err(BenchError::new(format!(
                "cannot register the bench's reader VM {OBSERVER}: {}: {} (or give --admin-token)",
                reply["code"].as_str().unwrap_or("error"),
                reply["message"].as_str().unwrap_or_default()
            )));
        }
        let (reply, _) = set_up(&mut conn, &authenticate_request(OBSERVER))
            .await
            .map_err(|err| {
                BenchError::new(format!(
                    "cannot authenticate as the bench's reader VM {OBSERVER}: {err} \
                     (or give --admin-token)"
                ))
            })?;
        let Some(token) = reply["data"]["token"].as_str() else {
            return Err(BenchError::new(
                "the server's authenticate reply has no token",
            ));
        };
        let request =
            json!({"command": "authenticate", "data": {"vm_id": OBSERVER, "token": token}});
        self.reader = Some(request.clone());
        Ok(request)
    }

    async fn lists(
        &mut self,
        kinds: &[ListKind],
        conns: usize,
        until: Until,
        ping_beside: bool,
    ) -> Result<()> {
        if kinds.is_empty() {
            return Err(BenchError::new("no list to loop (--lists is empty)"));
        }
        let reader = self.reader_request().await?;
        let operator = self.options.admin_token.is_some();
        let lines: Vec<Vec<u8>> = kinds
            .iter()
            .map(|kind| line(&json!({"command": "list", "data": {"list_type": kind.as_str()}})))
            .collect();
        let load = Load {
            conns,
            pipeline: 1,
            setup: Setup::Request(Arc::new(move |_| reader.clone())),
            // Operator logins are throttled per address; token resumes are not.
            setup_concurrency: if operator { 4 } else { 16 },
            requests: Box::new(move |c| Requests::Same(lines[c % lines.len()].clone())),
            until,
            count_items: true,
            ping_beside,
        };
        let m = self
            .measure(&self.dialer(PER_ADDRESS), &load, self.server_pid)
            .await?;
        let listing: Vec<String> = kinds.iter().map(|k| k.as_str().to_owned()).collect();
        for (i, kind) in kinds.iter().enumerate() {
            let tallies: Vec<&Tally> = m
                .tallies
                .iter()
                .enumerate()
                .filter(|(c, _)| c % kinds.len() == i)
                .map(|(_, t)| t)
                .collect();
            if tallies.is_empty() {
                continue;
            }
            let mut r = row(kind.as_str(), "server", 1, &tallies, m.elapsed);
            r.rss = Some(m.rss);
            if let (Some(items), Some(bytes), Some(p50)) =
                (r.items_per_reply, r.bytes_per_reply, r.p50_ms)
            {
                self.report.notes.push(format!(
                    "{}: {items} entries, {:.1} MiB a reply, {:.1} ms to the last byte (p50) \
                     on {} of {conns} conns",
                    kind.as_str(),
                    bytes / 1024.0 / 1024.0,
                    p50,
                    r.conns
                ));
            }
            self.report.rows.push(r);
        }
        if let Some(beside) = &m.beside {
            let mut r = row("ping beside", "server", 1, &[beside], m.elapsed);
            r.rss = Some(m.rss);
            if let Some(p99) = r.p99_ms {
                self.report.notes.push(format!(
                    "ping beside {} on {conns} conns: p50 {:.2} ms, p99 {p99:.2} ms, max {:.2} ms \
                     (target: p99 ≤ 5 ms while 8 conns loop full lists of 100,000 VMs)",
                    listing.join("+"),
                    r.p50_ms.unwrap_or_default(),
                    r.max_ms.unwrap_or_default(),
                ));
            }
            self.report.rows.push(r);
        }
        Ok(())
    }

    async fn idle(&mut self, conns: usize) -> Result<()> {
        net::check_nofile(conns)?;
        let dialer = self.dialer(PER_ADDRESS);
        if !dialer.spreads() && conns > 256 {
            progress(
                "the target is not an IPv4 loopback address: every connection comes from one \
                 address, and the server allows 256 per address by default",
            );
        }
        let pid = self.server_pid;
        let before = pid.and_then(rss::rss_kib);
        let watch = RssWatch::start(pid);
        let started = Instant::now();
        let ping = json!({"command": "ping"});
        let setup = Setup::Request(Arc::new(move |_| ping.clone()));
        let (open, took) = open_all(&dialer, 0, conns, 64, setup, self.timeout).await?;
        let elapsed = started.elapsed();
        let mut rss = watch.finish();
        rss.before_kib = before;
        progress(&format!(
            "{conns} connections open in {:.2} s; waiting for the server's RSS to settle ...",
            elapsed.as_secs_f64()
        ));
        rss.settled_kib = rss::settle(pid, SETTLE_QUIET, SETTLE_LIMIT).await;
        drop(open);
        let mut tally = Tally::default();
        for t in &took {
            tally.latency.record(*t);
        }
        tally.requests = took.len() as u64;
        tally.bytes = tally.requests * crate::canned::PONG.len() as u64;
        let mut r = Row::new("idle (ping once)", "server", conns, 1, &tally, elapsed);
        r.rss = Some(rss);
        self.report.rows.push(r);
        match (before, rss.settled_kib.or(rss.after_kib)) {
            (Some(before), Some(after)) => {
                let per = (after as f64 - before as f64) / conns as f64;
                self.report.notes.push(format!(
                    "idle: {conns} connections: server RSS {} before, {} after: {per:.2} KiB per \
                     connection (target ≤ 8 KiB at 10,000)",
                    mib(before),
                    mib(after)
                ));
            }
            _ => self
                .report
                .notes
                .push(format!("idle: {conns} connections: server RSS n/a")),
        }
        Ok(())
    }
}

/// The median round by its ratio (the upper one of an even count), with
/// its rate; sorts `ratios`.
fn median(ratios: &mut [(f64, f64)]) -> Option<(f64, f64)> {
    ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
    ratios.get(ratios.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn the_median_round_is_the_middle_ratio_with_its_own_rate() {
        assert_eq!(median(&mut []), None);
        let mut rounds = [(0.9, 90.0), (1.2, 120.0), (0.8, 80.0)];
        assert_eq!(median(&mut rounds), Some((0.9, 90.0)));
        let mut even = [(1.0, 1.0), (0.5, 2.0), (0.7, 3.0), (2.0, 4.0)];
        assert_eq!(median(&mut even), Some((1.0, 1.0)));
    }
}
