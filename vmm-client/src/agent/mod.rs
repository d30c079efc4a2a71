//! `vmm-client agent`: the program that runs on a VM, keeps it
//! authenticated with the server for as long as it runs, and keeps the
//! server's record of the VM (RAM, CPUs, disks) true to the machine.
//!
//! The loop, one connection per turn:
//!
//! 1. Connect to the server.
//! 2. Unless the VM is known to exist (the state file says so, or the agent
//!    authenticated as it before), send `register` with what the agent wants
//!    (see [`wanted`]); a VM that already exists is answered
//!    `already_exists`, cheaply, which is fine. Then `authenticate`. On
//!    success the backoff starts over.
//! 3. Reconcile (see [`reconcile`]): compare what it wants with the record
//!    that `authenticate` returned, and send one `update` if they differ.
//! 4. Send `ping` every `--ping-interval` and check each reply; reconcile
//!    again every `--reconcile-interval`, against the record of the last
//!    `authenticate` or `update` reply (no request at all while nothing
//!    changes; a change made by someone else is seen at the next reconnect).
//! 5. When the connection is lost (it cannot be opened, the server closes it,
//!    an I/O error, no reply within [`REPLY_TIMEOUT`], or a reply saying the
//!    server cannot work right now: one of [`RETRIED`]), log why, wait for
//!    the backoff, and go back to 1.
//!
//! After the first password login the agent keeps the session token it was
//! given and resumes with it on later connections, so a fleet reconnecting
//! after a server restart costs the server no password hashes; if the token
//! is refused (expired, revoked) it logs in with the password again.
//!
//! Some failures cannot be fixed by retrying: `authenticate` answered
//! `invalid_credentials` (a wrong password, or a VM that does not exist and
//! that the agent could not register), `register` answered `invalid_params`,
//! or any other error reply. They are logged and end the agent with exit
//! code 1. An `update` the server refuses (`invalid_params`, `not_found`:
//! the record changed under the agent) is logged and not sent again until
//! the next connection: the VM's agent keeps it connected regardless.
//!
//! The backoff is capped exponential with equal jitter: the n-th consecutive
//! failed attempt (n = 0, 1, ...) waits a uniformly random time in
//! `[step/2, step]`, where `step = min(backoff_max, backoff_initial * 2^n)`.
//! Half the step is fixed, so a server that is down is not hammered by a
//! stream of near-zero waits; the other half is random, so agents that lost
//! the same server at the same moment do not all come back at once.
//!
//! SIGINT or SIGTERM ends the agent with exit code 0. When it is connected
//! and authenticated it first sends `logout` and waits for the reply (for at
//! most [`STOP_GRACE`]). A signal never cuts a request in flight short (its
//! reply would be taken for the next request's), it only bounds it by the
//! same grace.
//!
//! Every state change is one line on stderr: an RFC 3339 UTC timestamp,
//! `agent VM_ID:`, and what happened. The password is never logged: it
//! travels only inside requests, and the server's error replies never echo it.

mod fingerprint;
mod reconcile;
mod state;
mod wanted;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Args;
use tokio::time::Instant;
use vmm_core::client::{ClientError, Registration, Update};
use vmm_core::protocol::{VmView, limits};
use vmm_core::{Client, ErrorCode};

use crate::args::{parse_secs, unless_zero};
use crate::failure::{Failure, describe};
use crate::password::ENV as PASSWORD_ENV;
use crate::secrets;
use crate::signals::Signals;
use crate::text::chomp;

use fingerprint::{Needed, Rooted};
use reconcile::{Notice, Once};
use state::State;
use wanted::{Flags, Wanted};

/// How long connecting, or any one request, may take before the connection
/// counts as lost.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// After SIGINT or SIGTERM, how long the request in flight and `logout` may
/// take, together.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// Points the agent at a fake `/proc` and `/sys` (tests); not in the help.
pub const MACHINE_ROOT_ENV: &str = "VMM_AGENT_ROOT";

/// `vmm-client agent`'s arguments.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The VM's id.
    #[arg(long, env = "VMM_VM_ID")]
    vm_id: String,

    /// The VM's RAM in MiB, instead of MemTotal from /proc/meminfo.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(limits::RAM))]
    ram: Option<u32>,

    /// The VM's CPUs, instead of the CPUs this process may run on.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(limits::CPU))]
    cpu: Option<u32>,

    /// A disk (GiB); repeat for more disks. Given, these are the VM's disks
    /// instead of the block devices in /sys/block.
    #[arg(
        long = "disk",
        value_name = "GIB",
        value_parser = clap::value_parser!(u32).range(limits::DISK_SIZE)
    )]
    disks: Vec<u32>,

    /// Print what the machine has and what the agent would send, and exit
    /// without connecting.
    #[arg(long)]
    dry_run: bool,

    /// Compare the machine with the server's record every SECS while
    /// connected (fractions allowed; 0: only on each connection).
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_secs)]
    reconcile_interval: Duration,

    /// Where to keep the mapping from devices to disk ids [default:
    /// $STATE_DIRECTORY/VM_ID.json, else /var/lib/vmm-agent/VM_ID.json].
    #[arg(long, value_name = "PATH")]
    state_file: Option<PathBuf>,

    /// Read the machine under PATH instead of / (for tests).
    #[arg(long, value_name = "PATH", env = MACHINE_ROOT_ENV, hide = true)]
    machine_root: Option<PathBuf>,

    /// Read the password from the first line of PATH (else $VMM_PASSWORD).
    #[arg(long, value_name = "PATH")]
    password_file: Option<PathBuf>,

    /// Read the server's enrollment secret for `register` from PATH (its
    /// trailing newline dropped) instead of $VMM_REGISTRATION_SECRET (not
    /// both).
    #[arg(long, value_name = "PATH")]
    registration_secret_file: Option<PathBuf>,

    /// Ping the server every SECS while connected (fractions allowed).
    #[arg(long, value_name = "SECS", default_value = "15", value_parser = parse_secs)]
    ping_interval: Duration,

    /// The first wait before reconnecting; it doubles with each failed
    /// attempt (fractions allowed).
    #[arg(long, value_name = "SECS", default_value = "0.5", value_parser = parse_secs)]
    backoff_initial: Duration,

    /// The longest wait before reconnecting (fractions allowed).
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_secs)]
    backoff_max: Duration,
}

impl AgentArgs {
    fn flags(&self) -> Flags {
        Flags {
            ram: self.ram,
            cpu: self.cpu,
            disks: self.disks.clone(),
        }
    }

    fn machine(&self) -> Rooted {
        match &self.machine_root {
            Some(root) => Rooted::at(root),
            None => Rooted::host(),
        }
    }

    fn state_path(&self) -> Result<PathBuf, Failure> {
        match &self.state_file {
            Some(path) => Ok(path.clone()),
            None => {
                let dir = std::env::var(state::STATE_DIRECTORY_ENV).ok();
                state::default_path(&self.vm_id, dir.as_deref()).map_err(Failure::Usage)
            }
        }
    }
}

/// Runs the agent until a signal (0) or a failure retrying cannot fix (1);
/// bad arguments or no password are usage errors (2). `--dry-run` prints
/// and exits 0 (1 if the machine cannot be read).
pub async fn run(addr: &str, args: AgentArgs) -> ExitCode {
    if args.dry_run {
        return dry_run(addr, &args);
    }
    let agent = match Agent::new(addr, args) {
        Ok(agent) => agent,
        Err(failure) => {
            eprintln!("error: {failure}");
            return ExitCode::from(failure.exit_code());
        }
    };
    // Read once before connecting, so that a machine that cannot be read
    // fails at once rather than after registering.
    let wanted = match agent.wanted() {
        Ok((wanted, _)) => wanted,
        Err(why) => {
            agent.log(format_args!("{why}; exiting"));
            return ExitCode::FAILURE;
        }
    };
    let mut keeper = agent.keeper();
    let mut stop = match Stop::install() {
        Ok(stop) => stop,
        Err(err) => {
            agent.log(format_args!("cannot handle signals: {err}; exiting"));
            return ExitCode::FAILURE;
        }
    };
    let reconcile = match agent.reconcile_interval {
        Some(every) => format!("every {}", secs(every)),
        None => "on each connection".into(),
    };
    agent.log(format_args!(
        "starting: server {}, ping every {}, reconcile {reconcile}, state file {}; wants {wanted}",
        agent.addr,
        secs(agent.ping_interval),
        agent.state_path.display(),
    ));
    agent.run(&mut stop, &mut keeper).await
}

/// `--dry-run`: what the machine has, what the agent would send, and the
/// state file; nothing is connected to and nothing written.
fn dry_run(addr: &str, args: &AgentArgs) -> ExitCode {
    let flags = args.flags();
    let machine = args.machine();
    let found = match fingerprint::read(&machine, needed(&flags)) {
        Ok(found) => found,
        Err(why) => {
            eprintln!("error: {why}");
            return ExitCode::FAILURE;
        }
    };
    let (wanted, warnings) = match wanted::wanted(&flags, &found) {
        Ok(wanted) => wanted,
        Err(why) => {
            eprintln!("error: {why}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = String::new();
    let given = |flag: &str| format!("not read: {flag} given");
    out.push_str(&format!("machine: {}\n", machine.root().display()));
    out.push_str(&format!(
        "found ram: {}\n",
        found
            .ram_mib
            .map_or_else(|| given("--ram"), |mib| format!("{mib} MiB (MemTotal)"))
    ));
    out.push_str(&format!(
        "found cpu: {}\n",
        found.cpus.map_or_else(|| given("--cpu"), |n| n.to_string())
    ));
    match &found.disks {
        None => out.push_str(&format!("found disks: {}\n", given("--disk"))),
        Some(disks) if disks.is_empty() => out.push_str("found disks: none\n"),
        Some(disks) => {
            for disk in disks {
                out.push_str(&format!("found disk: {} {} GiB\n", disk.name, disk.gib));
            }
        }
    }
    for warning in &warnings {
        out.push_str(&format!("{warning}\n"));
    }
    out.push_str(&format!("wanted: {wanted}\n"));
    let sizes: Vec<String> = wanted.disks.iter().map(|d| d.size.to_string()).collect();
    out.push_str(&format!(
        "would register (if VM {} does not exist) at {addr}: ram {}, cpu {}, disks [{}]\n",
        args.vm_id,
        wanted.ram,
        wanted.cpu,
        sizes.join(", ")
    ));
    out.push_str(
        "then update the server's record to match, growing disks and attaching new ones\n",
    );
    match args.state_path() {
        Err(failure) => out.push_str(&format!("state file: {failure}\n")),
        Ok(path) => match state::load(&path, &args.vm_id) {
            Ok(Some(state)) => out.push_str(&format!(
                "state file: {} maps {}\n",
                path.display(),
                describe_mapping(&state.disks)
            )),
            Ok(None) => out.push_str(&format!("state file: {} (none yet)\n", path.display())),
            Err(why) => out.push_str(&format!("state file: {why}\n")),
        },
    }
    // A closed stdout is no failure of the dry run's.
    let _ = io::stdout().lock().write_all(out.as_bytes());
    ExitCode::SUCCESS
}

/// Which fields the flags leave to the fingerprint.
fn needed(flags: &Flags) -> Needed {
    Needed {
        ram: flags.ram.is_none(),
        cpu: flags.cpu.is_none(),
        disks: flags.disks.is_empty(),
    }
}

/// `vda → disk 3, vdb → disk 4`, or `no disks`.
fn describe_mapping(mapping: &BTreeMap<String, i64>) -> String {
    if mapping.is_empty() {
        return "no disks".into();
    }
    let pairs: Vec<String> = mapping
        .iter()
        .map(|(key, id)| format!("{key} → disk {id}"))
        .collect();
    pairs.join(", ")
}

/// A password, kept out of `Debug` output.
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<hidden>")
    }
}

/// The agent's settings.
#[derive(Debug)]
struct Agent {
    addr: String,
    vm_id: String,
    password: Secret,
    /// `--ram`, `--cpu`, `--disk`.
    flags: Flags,
    machine: Rooted,
    state_path: PathBuf,
    /// `None`: only on each connection.
    reconcile_interval: Option<Duration>,
    /// The enrollment secret `register` carries, if any. Never logged.
    registration_secret: Option<Secret>,
    ping_interval: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    /// The session token of the last password login: a reconnect resumes
    /// with it, so the server spends no password hash. Never logged.
    token: std::sync::Mutex<Option<Secret>>,
}

/// What the agent keeps across connections for reconciling.
#[derive(Debug)]
struct Keeper {
    /// The mapping as it should be.
    state: State,
    /// The mapping as the state file has it (`None`: no file).
    saved: Option<State>,
    /// The VM exists: the state file says so, or the agent authenticated.
    known: bool,
    /// Why `register` was not sent or not accepted, for the hint when the
    /// password is then refused.
    not_registered: Option<String>,
    /// The server's record, from the last `authenticate` or `update` reply.
    record: Option<VmView>,
    /// The last update the server refused: not sent again on this
    /// connection.
    refused: Option<Update>,
    /// An update with disks to attach whose reply was lost with the
    /// connection: if it went through, the next record shows the disks.
    unanswered: Option<Attaching>,
    notices: Once,
    /// The last state-file error logged, so that it is logged once.
    save_error: Option<String>,
}

/// The disks an update attaches, and the record it was planned against.
#[derive(Debug)]
struct Attaching {
    before: VmView,
    keys: Vec<String>,
    sizes: Vec<u32>,
}

/// How one connection ended.
enum End {
    /// Lost, or not usable right now: retry after the backoff.
    Lost(String),
    /// Retrying cannot help: exit 1.
    Fatal(String),
    /// A signal asked the agent to stop (already logged): exit 0.
    Stopped,
}

impl Agent {
    fn new(addr: &str, args: AgentArgs) -> Result<Agent, Failure> {
        let usage = |message: String| Err(Failure::Usage(message));
        if args.ping_interval.is_zero() {
            return usage("--ping-interval must be more than 0".into());
        }
        if args.backoff_initial.is_zero() {
            return usage("--backoff-initial must be more than 0".into());
        }
        if args.backoff_max < args.backoff_initial {
            return usage("--backoff-max must be at least --backoff-initial".into());
        }
        if args.disks.len() > limits::MAX_DISKS {
            return usage(format!("a VM has at most {} disks", limits::MAX_DISKS));
        }
        let state_path = args.state_path()?;
        let password = match &args.password_file {
            Some(path) => read_password_file(path)?,
            None => std::env::var(PASSWORD_ENV).map_err(|_| {
                Failure::Usage(format!(
                    "no password for {}: set {PASSWORD_ENV} or pass --password-file PATH",
                    args.vm_id
                ))
            })?,
        };
        if password.is_empty() {
            return usage(format!("the password for {} is empty", args.vm_id));
        }
        let registration_secret =
            secrets::registration_secret_from(args.registration_secret_file.as_deref())?;
        Ok(Agent {
            addr: addr.to_owned(),
            flags: args.flags(),
            machine: args.machine(),
            state_path,
            reconcile_interval: unless_zero(args.reconcile_interval),
            vm_id: args.vm_id,
            password: Secret(password),
            token: std::sync::Mutex::new(None),
            registration_secret: registration_secret.map(Secret),
            ping_interval: args.ping_interval,
            backoff_initial: args.backoff_initial,
            backoff_max: args.backoff_max,
        })
    }

    /// The keeper, from the state file; one that cannot be read is logged
    /// and started over (the VM's disks are then adopted in order, see
    /// [`reconcile`]), rather than keeping the VM disconnected.
    fn keeper(&self) -> Keeper {
        let saved = match state::load(&self.state_path, &self.vm_id) {
            Ok(saved) => saved,
            Err(why) => {
                self.log(format_args!("warning: {why}; starting a new one"));
                None
            }
        };
        if let Some(saved) = &saved {
            self.log(format_args!(
                "state file {}: {}",
                self.state_path.display(),
                describe_mapping(&saved.disks)
            ));
        }
        Keeper {
            state: saved.clone().unwrap_or_else(|| State {
                vm_id: self.vm_id.clone(),
                disks: BTreeMap::new(),
            }),
            known: saved.is_some(),
            saved,
            not_registered: None,
            record: None,
            refused: None,
            unanswered: None,
            notices: Once::default(),
            save_error: None,
        }
    }

    /// What the agent wants now, and the warnings about it.
    fn wanted(&self) -> Result<(Wanted, Vec<String>), String> {
        let found = fingerprint::read(&self.machine, needed(&self.flags))?;
        wanted::wanted(&self.flags, &found)
    }

    /// One line on stderr. A stderr that cannot be written to is no reason
    /// to stop keeping the VM connected, so write errors are ignored.
    fn log(&self, what: impl fmt::Display) {
        let now = humantime::format_rfc3339_millis(SystemTime::now());
        let _ = writeln!(io::stderr().lock(), "{now} agent {}: {what}", self.vm_id);
    }

    async fn run(&self, stop: &mut Stop, keeper: &mut Keeper) -> ExitCode {
        let mut backoff = Backoff::new(self.backoff_initial, self.backoff_max);
        loop {
            let why = match self.connection(stop, &mut backoff, keeper).await {
                End::Stopped => return ExitCode::SUCCESS,
                End::Fatal(why) => {
                    self.log(format_args!("{why}; exiting"));
                    return ExitCode::FAILURE;
                }
                End::Lost(why) => why,
            };
            if let Some(signal) = stop.requested() {
                self.log(format_args!("{why}; received {signal}, exiting"));
                return ExitCode::SUCCESS;
            }
            let delay = backoff.next_delay();
            self.log(format_args!("{why}; retrying in {}", secs(delay)));
            tokio::select! {
                biased;
                signal = stop.wait() => {
                    self.log(format_args!("received {signal} while disconnected, exiting"));
                    return ExitCode::SUCCESS;
                }
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One turn of the loop: connect, register, authenticate, reconcile and
    /// ping until something ends it.
    async fn connection(&self, stop: &mut Stop, backoff: &mut Backoff, keeper: &mut Keeper) -> End {
        let addr = self.addr.as_str();
        let connect = async { crate::conn::open(addr).await.map_err(ClientError::Io) };
        let mut client = match stop.guarded(connect).await {
            Ok(client) => client,
            Err(err) => return End::Lost(format!("cannot connect to {addr}: {}", cause(&err))),
        };
        self.log(format_args!("connected to {addr}"));
        if let Some(end) = self.stopping(stop, "connecting") {
            return end;
        }
        keeper.refused = None;

        if let Some(token) = self.token() {
            match stop.guarded(client.resume(&self.vm_id, &token)).await {
                Ok(vm) => {
                    self.log("resumed the session with its token");
                    backoff.reset();
                    keeper.record = Some(vm);
                    return self.keep_alive(client, stop, keeper).await;
                }
                Err(ClientError::Server {
                    code: ErrorCode::NotAuthenticated,
                    ..
                }) => {
                    self.log("the token was refused; logging in with the password");
                    self.set_token(None);
                }
                Err(err) => return self.failed("resuming", err),
            }
        }

        if !keeper.known {
            if let Err(end) = self.register(&mut client, stop, keeper).await {
                return end;
            }
            if let Some(end) = self.stopping(stop, "registering") {
                return end;
            }
        } else if keeper.record.is_none() {
            keeper.not_registered = Some(format!(
                "the state file {} says the VM was registered, so it was not registered \
                 again; if the server's database is new, remove the file",
                self.state_path.display()
            ));
        }

        let authenticate = client.login(&self.vm_id, &self.password.0);
        match stop.guarded(authenticate).await {
            Ok((vm, token)) => {
                self.set_token(Some(token));
                self.log("authenticated");
                backoff.reset();
                keeper.known = true;
                keeper.record = Some(vm);
            }
            Err(err) => {
                let hint = match &err {
                    ClientError::Server {
                        code: ErrorCode::InvalidCredentials,
                        ..
                    } => keeper.not_registered.take(),
                    _ => None,
                };
                return match (self.failed("authentication", err), hint) {
                    (End::Fatal(why), Some(hint)) => End::Fatal(format!("{why}; {hint}")),
                    (end, _) => end,
                };
            }
        }
        self.keep_alive(client, stop, keeper).await
    }

    /// Sends `register` with what the agent wants, and records the new
    /// disks' ids (they come back in the order sent).
    async fn register(
        &self,
        client: &mut Client,
        stop: &mut Stop,
        keeper: &mut Keeper,
    ) -> Result<(), End> {
        let wanted = match self.wanted() {
            Ok((wanted, _)) => wanted,
            Err(why) => return Err(End::Lost(format!("cannot read the machine: {why}"))),
        };
        let registration = Registration {
            vm_id: self.vm_id.clone(),
            ram: wanted.ram,
            cpu: wanted.cpu,
            password: self.password.0.clone(),
            disks: wanted.disks.iter().map(|disk| disk.size).collect(),
            registration_secret: self.registration_secret.as_ref().map(|s| s.0.clone()),
        };
        keeper.not_registered = None;
        match stop.guarded(client.register(&registration)).await {
            Ok(vm) => {
                self.log("registered");
                keeper.state.disks = wanted
                    .disks
                    .iter()
                    .zip(&vm.disks)
                    .map(|(disk, view)| (disk.key.clone(), view.id))
                    .collect();
                self.log(format_args!(
                    "with {wanted}: {}",
                    describe_mapping(&keeper.state.disks)
                ));
                self.save(keeper);
            }
            Err(ClientError::Server {
                code: ErrorCode::AlreadyExists,
                ..
            }) => self.log("already registered"),
            // Without a secret the agent cannot register on a server that
            // wants one, and a VM that exists needs none: authenticate.
            Err(ClientError::Server {
                code: code @ (ErrorCode::Forbidden | ErrorCode::TooManyAttempts),
                message,
            }) if self.registration_secret.is_none() => {
                self.log(format_args!(
                    "not registered: {message} ({code}); authenticating in case the VM exists"
                ));
                keeper.not_registered = Some(
                    "if the VM does not exist yet, registering it needs the server's \
                     enrollment secret (--registration-secret-file)"
                        .into(),
                );
            }
            Err(err) => return Err(self.failed("registration", err)),
        }
        Ok(())
    }

    fn token(&self) -> Option<String> {
        let token = self
            .token
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        token.as_ref().map(|secret| secret.0.clone())
    }

    fn set_token(&self, token: Option<String>) {
        *self
            .token
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = token.map(Secret);
    }

    /// Reconciles, then pings and reconciles on their intervals until
    /// something ends the connection; logs out on a signal.
    async fn keep_alive(&self, mut client: Client, stop: &mut Stop, keeper: &mut Keeper) -> End {
        if let Err(end) = self.reconcile(&mut client, stop, keeper).await {
            return end;
        }
        let mut next_ping = Instant::now() + self.ping_interval;
        let mut next_reconcile = self.reconcile_interval.map(|every| Instant::now() + every);
        loop {
            if let Some(signal) = stop.requested() {
                return self.logout(&mut client, stop, signal).await;
            }
            let wake = next_reconcile.map_or(next_ping, |at| at.min(next_ping));
            tokio::select! {
                biased;
                _ = stop.wait() => continue,
                () = tokio::time::sleep_until(wake) => {}
            }
            let now = Instant::now();
            if let (Some(at), Some(every)) = (next_reconcile, self.reconcile_interval)
                && now >= at
            {
                if let Err(end) = self.reconcile(&mut client, stop, keeper).await {
                    return end;
                }
                next_reconcile = Some(Instant::now() + every);
            }
            if now >= next_ping {
                if let Err(err) = stop.guarded(client.ping()).await {
                    return self.failed("ping", err);
                }
                next_ping = Instant::now() + self.ping_interval;
            }
        }
    }

    /// Compares what the agent wants with the server's record and sends one
    /// `update` when they differ; see [`reconcile`]. Only a lost connection
    /// or a failure retrying cannot fix ends the connection.
    async fn reconcile(
        &self,
        client: &mut Client,
        stop: &mut Stop,
        keeper: &mut Keeper,
    ) -> Result<(), End> {
        let Some(record) = keeper.record.clone() else {
            return Ok(());
        };
        let (wanted, mut notices) = match self.wanted() {
            Ok(wanted) => wanted,
            Err(why) => {
                let notice = format!("warning: cannot read the machine: {why}; not reconciling");
                for fresh in keeper.notices.fresh([notice]) {
                    self.log(fresh);
                }
                return Ok(());
            }
        };
        if let Some(attaching) = keeper.unanswered.take() {
            self.adopt_unanswered(&attaching, &record, keeper);
        }
        let plan = reconcile::plan(&wanted, &record, &keeper.state.disks);
        notices.extend(plan.notices.iter().map(Notice::to_string));
        for fresh in keeper.notices.fresh(notices) {
            self.log(fresh);
        }
        keeper.state.disks = plan.mapping;
        if let Some(update) = plan
            .update
            .filter(|update| keeper.refused.as_ref() != Some(update))
        {
            self.log(format_args!(
                "updating: {}",
                describe_update(&record, &update, &plan.attach_keys, &keeper.state.disks)
            ));
            if !update.attach.is_empty() {
                keeper.unanswered = Some(Attaching {
                    before: record.clone(),
                    keys: plan.attach_keys.clone(),
                    sizes: update.attach.clone(),
                });
            }
            let sent = stop.guarded(client.update(&update)).await;
            if !matches!(&sent, Err(err) if err.code().is_none()) {
                // Answered: the reply says what happened.
                keeper.unanswered = None;
            }
            match sent {
                Ok(vm) => {
                    let ids = reconcile::attached_ids(&record, &vm, plan.attach_keys.len());
                    match ids {
                        Some(ids) => {
                            for (key, id) in plan.attach_keys.iter().zip(ids) {
                                keeper.state.disks.insert(key.clone(), id);
                            }
                        }
                        None => self.log(
                            "warning: the update's reply does not show the disks attached; \
                             their ids are not recorded",
                        ),
                    }
                    self.log(format_args!(
                        "updated: {}",
                        describe_mapping(&keeper.state.disks)
                    ));
                    keeper.record = Some(vm);
                }
                Err(ClientError::Server {
                    code: code @ (ErrorCode::InvalidParams | ErrorCode::NotFound),
                    message,
                }) => {
                    self.log(format_args!(
                        "warning: update refused: {message} ({code}); not sent again before \
                         the next connection"
                    ));
                    keeper.refused = Some(update);
                }
                Err(ClientError::Server {
                    code: ErrorCode::NotAuthenticated,
                    message,
                }) => {
                    self.set_token(None);
                    return Err(End::Lost(format!(
                        "update refused: {message} ({})",
                        ErrorCode::NotAuthenticated
                    )));
                }
                Err(err) => return Err(self.failed("update", err)),
            }
        }
        self.save(keeper);
        Ok(())
    }

    /// Records the disks of an update whose reply was lost, if the record
    /// shows that it went through: exactly as many new disks as it
    /// attached, of the sizes it attached. Without this they would be
    /// attached a second time.
    fn adopt_unanswered(&self, attaching: &Attaching, record: &VmView, keeper: &mut Keeper) {
        let Some(ids) = reconcile::attached_ids(&attaching.before, record, attaching.keys.len())
        else {
            return;
        };
        let sizes: Vec<u32> = ids
            .iter()
            .filter_map(|id| record.disks.iter().find(|disk| disk.id == *id))
            .map(|disk| disk.disk_size)
            .collect();
        if sizes != attaching.sizes {
            return;
        }
        for (key, id) in attaching.keys.iter().zip(ids) {
            keeper.state.disks.insert(key.clone(), id);
        }
        self.log(format_args!(
            "the update whose reply was lost went through: {}",
            describe_mapping(&keeper.state.disks)
        ));
    }

    /// Writes the state file if the mapping changed, or if there is none
    /// yet (it also says that the VM exists). A failure is logged once per
    /// cause and retried at the next reconcile: the mapping is kept in
    /// memory meanwhile, and a VM's agent does not stop over it.
    fn save(&self, keeper: &mut Keeper) {
        if keeper.saved.as_ref() == Some(&keeper.state) {
            return;
        }
        match state::save(&self.state_path, &keeper.state) {
            Ok(()) => {
                keeper.saved = Some(keeper.state.clone());
                if keeper.save_error.take().is_some() {
                    self.log(format_args!(
                        "state file {} written",
                        self.state_path.display()
                    ));
                }
            }
            Err(why) => {
                if keeper.save_error.as_ref() != Some(&why) {
                    self.log(format_args!(
                        "warning: {why}; the disk mapping is kept in memory until it can be \
                         written (a restart before then matches disks by position again)"
                    ));
                    keeper.save_error = Some(why);
                }
            }
        }
    }

    /// After a signal that came before the agent authenticated: log and stop.
    fn stopping(&self, stop: &Stop, while_doing: &str) -> Option<End> {
        let signal = stop.requested()?;
        self.log(format_args!(
            "received {signal} while {while_doing}, exiting"
        ));
        Some(End::Stopped)
    }

    async fn logout(&self, client: &mut Client, stop: &mut Stop, signal: &str) -> End {
        self.log(format_args!("received {signal}, logging out"));
        match stop.guarded(client.logout()).await {
            Ok(()) => self.log("logged out, exiting"),
            Err(err) => self.log(format_args!("logout failed: {}; exiting", cause(&err))),
        }
        End::Stopped
    }

    /// What a failed step means: retry, or give up.
    fn failed(&self, step: &str, err: ClientError) -> End {
        let ClientError::Server { code, message } = &err else {
            return End::Lost(format!("connection lost: {}", cause(&err)));
        };
        if retryable(*code) {
            return End::Lost(format!("{step} failed: {message} ({code})"));
        }
        End::Fatal(format!("{step} refused: {message} ({code})"))
    }
}

/// `ram 512→1024 MiB, cpu 2→4, disk 7 (vda) 10→20 GiB, new disk vdc 3 GiB`.
fn describe_update(
    record: &VmView,
    update: &Update,
    attach_keys: &[String],
    mapping: &BTreeMap<String, i64>,
) -> String {
    let mut parts = Vec::new();
    // Both are always sent; only a change is worth a word.
    if let Some(ram) = update.ram.filter(|ram| *ram != record.ram) {
        parts.push(format!("ram {}→{ram} MiB", record.ram));
    }
    if let Some(cpu) = update.cpu.filter(|cpu| *cpu != record.cpu) {
        parts.push(format!("cpu {}→{cpu}", record.cpu));
    }
    for (id, size) in &update.resize {
        let key = mapping
            .iter()
            .find(|(_, mapped)| *mapped == id)
            .map_or("?", |(key, _)| key.as_str());
        let old = record
            .disks
            .iter()
            .find(|disk| disk.id == *id)
            .map_or(0, |disk| disk.disk_size);
        parts.push(format!("disk {id} ({key}) {old}→{size} GiB"));
    }
    for (key, size) in attach_keys.iter().zip(&update.attach) {
        parts.push(format!("new disk {key} {size} GiB"));
    }
    parts.join(", ")
}

/// Error replies that say the server cannot work right now, rather than that
/// the request is wrong: the agent reconnects after them. `too_many_attempts`
/// is among them: other clients' failures from the same address can block
/// this one's logins for a while, and attempts while blocked cost nothing and
/// count for nothing. `agent --help` lists them from here, so that the help
/// cannot say otherwise than the code does.
pub const RETRIED: &[ErrorCode] = &[
    ErrorCode::Unavailable,
    ErrorCode::ServerBusy,
    ErrorCode::Internal,
    ErrorCode::TooManyAttempts,
];

fn retryable(code: ErrorCode) -> bool {
    RETRIED.contains(&code)
}

/// The start of the help's line that lists [`RETRIED`].
const RETRIED_LINE: &str = "Error replies retried:";

/// `RETRIED_LINE` and the codes, e.g. `Error replies retried: unavailable, server_busy`.
fn retried_line() -> String {
    let codes: Vec<&str> = RETRIED.iter().map(|code| code.as_str()).collect();
    format!("{RETRIED_LINE} {}", codes.join(", "))
}

/// `agent --help`'s description. Built at run time, from [`RETRIED`],
/// [`REPLY_TIMEOUT`] and [`STOP_GRACE`], so that it cannot disagree with
/// what the agent does.
pub fn long_about() -> String {
    format!(
        "\
Run on a VM: stay registered and authenticated, reconnecting as needed, and
keep the server's record of the VM true to the machine.

What the VM has, unless given as a flag:
  RAM    MemTotal of /proc/meminfo, in MiB rounded down (--ram)
  CPUs   the CPUs this process may run on, as sched_getaffinity says (--cpu)
  disks  the whole block devices in /sys/block, except loop, ram, zram, dm-,
         sr, md and nbd devices and those of size 0, in GiB rounded up
         (--disk, repeated: then these are the disks)
Values found outside the protocol's limits are clamped into them, with a
warning; flags outside them are refused. --dry-run prints what was found and
what would be sent, and exits without connecting.

On each connection: unless the VM is known to exist (its state file exists,
or the agent authenticated before), send `register` with those values first
(a VM that exists already is fine); then `authenticate`. After the first
password login the agent keeps its session token and resumes with it on
later connections (no password hash on the server); a refused token means a
password login again. While connected, ping every --ping-interval.

Reconciling, after each authentication and every --reconcile-interval: when
the server's record differs, send one `update` that sets ram and cpu, grows
each known disk in place and attaches new ones. A disk smaller than its
record is not sent (a `shrink` warning), a device that is gone is not
detached (a `missing` warning); each is logged once per change. The state
file (--state-file, else $STATE_DIRECTORY/VM_ID.json, else
/var/lib/vmm-agent/VM_ID.json) maps each device (or --disk position, as
flag:N) to its disk id, and is written atomically; if it cannot be written
the agent warns and keeps going.

When the connection is lost (cannot connect, closed, I/O error, no reply
within {timeout}) or the server answers with an error reply saying that it
cannot work right now, wait and reconnect.
  {retried}
The n-th failed attempt in a row (n = 0, 1, ...) waits a random time between
step/2 and step, where step = min(--backoff-max, --backoff-initial * 2^n)
(equal jitter); a successful authentication starts the backoff over.

The password comes from --password-file (its first line), else
$VMM_PASSWORD; never from the command line, and it is never logged. The
enrollment secret that `register` carries comes from
--registration-secret-file, else ${secret_env}.

Each state change is logged to stderr as one line: an RFC 3339 UTC time,
`agent VM_ID:`, and what happened.

On SIGINT or SIGTERM: when authenticated, send `logout` (waiting at most
{grace} for the reply); then exit 0.",
        timeout = humantime::format_duration(REPLY_TIMEOUT),
        retried = retried_line(),
        secret_env = secrets::REGISTRATION_SECRET_ENV,
        grace = humantime::format_duration(STOP_GRACE),
    )
}

/// `agent --help`'s examples and exit codes, built from [`RETRIED`] like
/// [`long_about`].
pub fn after_help() -> String {
    format!(
        "\
Examples:
  vmm-client agent --vm-id stalin --dry-run
  VMM_PASSWORD=securePass123 vmm-client agent --vm-id stalin --ram 512 --cpu 4 --disk 100
  vmm-client --addr 10.0.0.5:8888 agent --vm-id stalin --password-file /etc/vmm/password

Exit codes:
  0  stopped by SIGINT or SIGTERM; or --dry-run printed what it found
  1  a failure retrying cannot fix: wrong password, or a VM that does not
     exist and could not be registered (invalid_credentials), a registration
     the server rejects (invalid_params, forbidden), or any other error reply
     than those retried; or the machine cannot be read:
     {retried}
  2  usage error: bad arguments, or no password",
        retried = retried_line(),
    )
}

/// Why a request failed, for the log.
fn cause(err: &ClientError) -> String {
    match err {
        ClientError::Io(err) => describe(err),
        ClientError::Closed => "the server closed the connection".into(),
        ClientError::Protocol(what) => format!("unexpected reply: {what}"),
        ClientError::Server { code, message } => format!("{message} ({code})"),
    }
}

/// The first line of `path`, without its line ending.
fn read_password_file(path: &Path) -> Result<String, Failure> {
    let cannot = |err: io::Error| {
        Failure::Usage(format!(
            "cannot read the password file {}: {}",
            path.display(),
            describe(&err)
        ))
    };
    let file = std::fs::File::open(path).map_err(cannot)?;
    let mut line = String::new();
    BufReader::new(file).read_line(&mut line).map_err(cannot)?;
    Ok(chomp(line))
}

/// `1.30s`.
fn secs(duration: Duration) -> String {
    format!("{:.2}s", duration.as_secs_f64())
}

/// Capped exponential backoff with equal jitter (see the module's doc).
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    /// The step of the next failed attempt.
    step: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            step: initial.min(max),
        }
    }

    /// The wait after one more failed attempt.
    fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = step.saturating_mul(2).min(self.max);
        equal_jitter(step, fastrand::f64())
    }

    /// Starts over, after a successful authentication.
    fn reset(&mut self) {
        self.step = self.initial.min(self.max);
    }
}

/// `step/2 + random * step/2`, for `random` in `[0, 1)`.
fn equal_jitter(step: Duration, random: f64) -> Duration {
    let half = step / 2;
    half.saturating_add(half.mul_f64(random.clamp(0.0, 1.0)))
}

/// SIGINT and SIGTERM, and whether (and by when) the agent is stopping.
struct Stop {
    signals: Signals,
    /// The signal that asked the agent to stop, and until when requests in
    /// flight may still run.
    requested: Option<(&'static str, Instant)>,
}

impl Stop {
    fn install() -> io::Result<Stop> {
        Ok(Stop {
            signals: Signals::install()?,
            requested: None,
        })
    }

    /// The signal that asked the agent to stop, if one did.
    fn requested(&self) -> Option<&'static str> {
        self.requested.map(|(signal, _)| signal)
    }

    /// Waits for SIGINT or SIGTERM (returns at once if one came already).
    async fn wait(&mut self) -> &'static str {
        if let Some((signal, _)) = self.requested {
            return signal;
        }
        let signal = self.signals.recv().await;
        self.requested = Some((signal, Instant::now() + STOP_GRACE));
        signal
    }

    /// Runs `request` (or a connect) to its end, bounded by [`REPLY_TIMEOUT`]
    /// and, once a signal came, by [`STOP_GRACE`] after it. A signal does
    /// not cancel the request: it is noted, and the caller sees it in
    /// [`Stop::requested`] afterwards.
    async fn guarded<T>(
        &mut self,
        request: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        let mut deadline = Instant::now() + REPLY_TIMEOUT;
        let mut request = std::pin::pin!(request);
        if self.requested.is_none() {
            tokio::select! {
                biased;
                result = tokio::time::timeout_at(deadline, &mut request) => {
                    return result.unwrap_or_else(|_| Err(timed_out()));
                }
                _ = self.wait() => {}
            }
        }
        if let Some((_, grace)) = self.requested {
            deadline = deadline.min(grace);
        }
        tokio::time::timeout_at(deadline, request)
            .await
            .unwrap_or_else(|_| Err(timed_out()))
    }
}

fn timed_out() -> ClientError {
    ClientError::Io(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no reply within {}", secs(REPLY_TIMEOUT)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_its_cap_and_starts_over() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(500), ms(3000));
        let mut steps = Vec::new();
        for _ in 0..6 {
            steps.push(backoff.step);
            let delay = backoff.next_delay();
            let step = *steps.last().unwrap_or(&Duration::ZERO);
            assert!(delay >= step / 2 && delay <= step, "{delay:?} for {step:?}");
        }
        assert_eq!(
            steps,
            [ms(500), ms(1000), ms(2000), ms(3000), ms(3000), ms(3000)]
        );
        backoff.reset();
        assert_eq!(backoff.step, ms(500));
    }

    #[test]
    fn equal_jitter_keeps_half_the_step() {
        let step = Duration::from_secs(2);
        assert_eq!(equal_jitter(step, 0.0), Duration::from_secs(1));
        assert_eq!(equal_jitter(step, 0.5), Duration::from_millis(1500));
        assert!(equal_jitter(step, 0.999_999) <= step);
        assert_eq!(equal_jitter(step, 7.0), step);
    }

    #[test]
    fn a_huge_cap_does_not_overflow() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::MAX);
        for _ in 0..200 {
            backoff.next_delay();
        }
        assert_eq!(backoff.step, Duration::MAX);
    }

    #[test]
    fn only_a_server_that_cannot_work_now_is_retried() {
        assert!(retryable(ErrorCode::Unavailable));
        assert!(retryable(ErrorCode::ServerBusy));
        assert!(retryable(ErrorCode::TooManyAttempts));
        assert!(!retryable(ErrorCode::InvalidCredentials));
        assert!(!retryable(ErrorCode::InvalidParams));
    }

    /// The codes on the help's retried lines, each line's, sorted.
    fn listed(help: &str) -> Vec<Vec<String>> {
        help.lines()
            .filter_map(|line| line.trim().strip_prefix(RETRIED_LINE))
            .map(|codes| {
                let mut codes: Vec<String> = codes
                    .split(',')
                    .map(|code| code.trim().to_owned())
                    .collect();
                codes.sort();
                codes
            })
            .collect()
    }

    #[test]
    fn the_help_lists_exactly_the_codes_retried() {
        let mut retried: Vec<String> = ErrorCode::ALL
            .into_iter()
            .filter(|code| retryable(*code))
            .map(|code| code.as_str().to_owned())
            .collect();
        retried.sort();
        assert_eq!(listed(&long_about()), [retried.clone()]);
        assert_eq!(listed(&after_help()), [retried]);
    }

    #[test]
    fn a_password_file_gives_its_first_line() {
        let path = std::env::temp_dir().join(format!("vmm-agent-test-{}", std::process::id()));
        let written = std::fs::write(&path, "s3cret pass\r\nsecond line\n");
        assert!(written.is_ok());
        let read = read_password_file(&path);
        let _ = std::fs::remove_file(&path);
        assert_eq!(read.ok().as_deref(), Some("s3cret pass"));
        let missing = read_password_file(Path::new("/nonexistent/vmm-password"));
        assert!(matches!(missing, Err(Failure::Usage(_))));
    }

    #[test]
    fn the_password_is_not_in_debug_output() {
        let secret = Secret("hunter2-hunter2".into());
        assert_eq!(format!("{secret:?}"), "<hidden>");
    }
}
