//! `vmm-client agent`: the program that runs on a VM and keeps it
//! authenticated with the server for as long as it runs.
//!
//! The loop, one connection per turn:
//!
//! 1. Connect to the server.
//! 2. With `--ram` and `--cpu`, send `register` (a VM that already exists is
//!    answered `already_exists`, cheaply, which is fine); then `authenticate`.
//!    On success the backoff starts over.
//! 3. Send `ping` every `--ping-interval` and check each reply.
//! 4. When the connection is lost (it cannot be opened, the server closes it,
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
//! that the agent was not told how to register), `register` answered
//! `invalid_params`, or any other error reply. They are logged and end the
//! agent with exit code 1.
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

use std::fmt;
use std::future::Future;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Args;
use tokio::time::Instant;
use vmm_core::client::{ClientError, Registration};
use vmm_core::{Client, ErrorCode};

use crate::args::parse_secs;
use crate::failure::{Failure, describe};
use crate::password::ENV as PASSWORD_ENV;
use crate::secrets;
use crate::signals::Signals;
use crate::text::chomp;

/// How long connecting, or any one request, may take before the connection
/// counts as lost.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// After SIGINT or SIGTERM, how long the request in flight and `logout` may
/// take, together.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// `vmm-client agent`'s arguments.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The VM's id.
    #[arg(long, env = "VMM_VM_ID")]
    vm_id: String,

    /// Register the VM with this much RAM (MiB) before authenticating, if it
    /// does not exist yet; needs --cpu.
    #[arg(long, value_name = "MIB", requires = "cpu")]
    ram: Option<u32>,

    /// Register the VM with this many CPUs; needs --ram.
    #[arg(long, value_name = "N", requires = "ram")]
    cpu: Option<u32>,

    /// A disk (GiB) to register the VM with; repeat for more disks; needs
    /// --ram and --cpu.
    #[arg(long = "disk", value_name = "GIB", requires = "ram")]
    disks: Vec<u32>,

    /// Read the password from the first line of PATH (else $VMM_PASSWORD).
    #[arg(long, value_name = "PATH")]
    password_file: Option<PathBuf>,

    /// Read the server's enrollment secret for `register` from PATH (its
    /// trailing newline dropped) instead of $VMM_REGISTRATION_SECRET (not
    /// both); needs --ram and --cpu.
    #[arg(long, value_name = "PATH", requires = "ram")]
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

/// Runs the agent until a signal (0) or a failure retrying cannot fix (1);
/// bad arguments or no password are usage errors (2).
pub async fn run(addr: &str, args: AgentArgs) -> ExitCode {
    let agent = match Agent::new(addr, args) {
        Ok(agent) => agent,
        Err(failure) => {
            eprintln!("error: {failure}");
            return ExitCode::from(failure.exit_code());
        }
    };
    let mut stop = match Stop::install() {
        Ok(stop) => stop,
        Err(err) => {
            agent.log(format_args!("cannot handle signals: {err}; exiting"));
            return ExitCode::FAILURE;
        }
    };
    agent.log(format_args!(
        "starting: server {}, ping every {}",
        agent.addr,
        secs(agent.ping_interval)
    ));
    agent.run(&mut stop).await
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
    /// RAM and CPUs and disks to register with, if given.
    registration: Option<(u32, u32, Vec<u32>)>,
    /// The enrollment secret `register` carries, if any. Never logged.
    registration_secret: Option<Secret>,
    ping_interval: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    /// The session token of the last password login: a reconnect resumes
    /// with it, so the server spends no password hash. Never logged.
    token: std::sync::Mutex<Option<Secret>>,
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
        let registration = match (args.ram, args.cpu) {
            (Some(ram), Some(cpu)) => Some((ram, cpu, args.disks)),
            _ => None,
        };
        let registration_secret = match registration {
            Some(_) => secrets::registration_secret_from(args.registration_secret_file.as_deref())?,
            None => None,
        };
        Ok(Agent {
            addr: addr.to_owned(),
            vm_id: args.vm_id,
            password: Secret(password),
            token: std::sync::Mutex::new(None),
            registration,
            registration_secret: registration_secret.map(Secret),
            ping_interval: args.ping_interval,
            backoff_initial: args.backoff_initial,
            backoff_max: args.backoff_max,
        })
    }

    /// One line on stderr. A stderr that cannot be written to is no reason
    /// to stop keeping the VM connected, so write errors are ignored.
    fn log(&self, what: impl fmt::Display) {
        let now = humantime::format_rfc3339_millis(SystemTime::now());
        let _ = writeln!(io::stderr().lock(), "{now} agent {}: {what}", self.vm_id);
    }

    async fn run(&self, stop: &mut Stop) -> ExitCode {
        let mut backoff = Backoff::new(self.backoff_initial, self.backoff_max);
        loop {
            let why = match self.connection(stop, &mut backoff).await {
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

    /// One turn of the loop: connect, register, authenticate, ping until
    /// something ends it.
    async fn connection(&self, stop: &mut Stop, backoff: &mut Backoff) -> End {
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

        if let Some(token) = self.token() {
            match stop.guarded(client.resume(&self.vm_id, &token)).await {
                Ok(_) => {
                    self.log("resumed the session with its token");
                    backoff.reset();
                    return self.keep_alive(client, stop).await;
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

        if let Some((ram, cpu, disks)) = &self.registration {
            let registration = Registration {
                vm_id: self.vm_id.clone(),
                ram: *ram,
                cpu: *cpu,
                password: self.password.0.clone(),
                disks: disks.clone(),
                registration_secret: self.registration_secret.as_ref().map(|s| s.0.clone()),
            };
            match stop.guarded(client.register(&registration)).await {
                Ok(_) => self.log("registered"),
                Err(ClientError::Server {
                    code: ErrorCode::AlreadyExists,
                    ..
                }) => self.log("already registered"),
                Err(err) => return self.failed("registration", err),
            }
            if let Some(end) = self.stopping(stop, "registering") {
                return end;
            }
        }

        let authenticate = client.login(&self.vm_id, &self.password.0);
        match stop.guarded(authenticate).await {
            Ok((_, token)) => {
                self.set_token(Some(token));
                self.log("authenticated");
                backoff.reset();
            }
            Err(err) => return self.failed("authentication", err),
        }
        self.keep_alive(client, stop).await
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

    /// Pings until something ends the connection; logs out on a signal.
    async fn keep_alive(&self, mut client: Client, stop: &mut Stop) -> End {
        loop {
            if let Some(signal) = stop.requested() {
                return self.logout(&mut client, stop, signal).await;
            }
            tokio::select! {
                biased;
                _ = stop.wait() => continue,
                () = tokio::time::sleep(self.ping_interval) => {}
            }
            if let Err(err) = stop.guarded(client.ping()).await {
                return self.failed("ping", err);
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
        let hint = if *code == ErrorCode::InvalidCredentials && self.registration.is_none() {
            "; if the VM does not exist yet, pass --ram and --cpu to register it"
        } else {
            ""
        };
        End::Fatal(format!("{step} refused: {message} ({code}){hint}"))
    }
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
Run on a VM: stay registered and authenticated, reconnecting as needed.

On each connection: with --ram and --cpu, send `register` first (a VM that
exists already is fine); then `authenticate`. After the first password login
the agent keeps its session token and resumes with it on later connections
(no password hash on the server); a refused token means a password login
again. While connected, ping every --ping-interval.

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
  VMM_PASSWORD=securePass123 vmm-client agent --vm-id stalin --ram 512 --cpu 4 --disk 100
  vmm-client --addr 10.0.0.5:8888 agent --vm-id stalin --password-file /etc/vmm/password

Exit codes:
  0  stopped by SIGINT or SIGTERM
  1  a failure retrying cannot fix: wrong password, or a VM that does not
     exist without --ram/--cpu (invalid_credentials), a registration the
     server rejects (invalid_params, forbidden), or any other error reply
     than those retried:
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
