//! `vmm-client`: talks to a vmm server over its JSON-over-TCP protocol.
//!
//! With a subcommand it runs that one command (authenticating first on the
//! same connection when the command needs a session) and exits; without one
//! it opens an interactive shell over a single connection. People get tables
//! and message lines; `--json` prints the command's reply line, as the
//! server sent it, for scripts: one JSON document per run (the reply of an
//! authentication step before the command is not printed). All I/O goes
//! through [`vmm_core::Client`].
//!
//! `vmm-client completions SHELL` and `vmm-client man` print a completion
//! script and the man page, generated from the same clap definition that
//! parses the arguments; they need no server.
//!
//! `vmm-client watch` authenticates, sends `watch`, and then prints change
//! events as they arrive until SIGINT or SIGTERM; `--since` and
//! `--resume-file` resume after an event seen before.
//!
//! `vmm-client top --admin` shows every server instance's figures (the
//! `stats` command), refreshed every second, and the latest events: a live
//! view on a terminal, a plain table per refresh elsewhere.
//!
//! `vmm-client agent` is different: it runs on a VM and keeps it
//! authenticated, reconnecting when the connection is lost, until SIGINT or
//! SIGTERM.
//!
//! The modules, from the top down; each uses only modules named after it:
//! `main` parses the arguments and dispatches; `docs` prints the completion
//! scripts and the man page; `agent` is the agent, `shell` the interactive
//! shell, `watch` the one-shot `watch`, `list_watch` `list --watch` and
//! `top` the fleet's live view; `pages` lists a page at a time; `conn` runs requests over one connection; `input` is the shell's blocking input
//! thread; `resume` keeps `watch --resume-file`'s file; `events` prints
//! change events and `render` draws replies as
//! tables; `password` finds a one-shot command's password and `secrets` the
//! operator token and the enrollment secret. At the bottom, depending on
//! nothing in the crate: `op` (what a request carries, and its wire text),
//! `failure` (the ways a run fails, and their exit codes), `args` (argument
//! value parsers), `text` (small text forms), `out` (where output goes) and
//! `signals` (SIGINT and SIGTERM, for `agent` and `watch`).

mod agent;
mod args;
mod conn;
mod docs;
mod events;
mod failure;
mod input;
mod list_watch;
mod op;
mod out;
mod pages;
mod password;
mod render;
mod replace;
mod resume;
mod secrets;
mod shell;
mod signals;
mod text;
mod top;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use vmm_core::client::{Registration, Update};
use vmm_core::protocol::ListType;

use crate::args::{Resize, parse_addr, parse_interval, parse_resize, parse_secs, unless_zero};
use crate::conn::Conn;
use crate::failure::Failure;
use crate::op::Op;

const ABOUT: &str = "Command-line client and interactive shell for the vmm server";

const LONG_ABOUT: &str = "\
Command-line client and interactive shell for the vmm server.

With a subcommand, runs that one command and exits. Commands that need a
session (list, update, logout, watch) authenticate first on the same
connection. With --json, stdout gets one JSON line per run: the command's
reply as the server sent it (an error reply too), never the reply of the
authentication before it, and never a session token.
Passwords come from --password-stdin, else $VMM_PASSWORD, else a prompt
without echo on the terminal; never from a command-line argument.

Without a subcommand, opens an interactive shell over one connection (type
`help` in it). When stdin is not a terminal the shell reads its commands, and
the answers to its questions (passwords included), one per line from stdin,
prints no prompts, and exits 0 at the end of the input even if some commands
got error replies (like redis-cli); only a lost connection (3) changes that.
The shell pings the server whenever its connection has been idle for
--keepalive seconds, so that an idle timeout (the server's --idle-timeout,
off by default, or a load balancer's) does not close it.

`watch` prints change events (VMs registered and updated, connections
opened, authenticated, logged out and closed, instances lost) one line each
as they happen, until SIGINT or SIGTERM (exit 0) or a lost connection
(exit 3); it pings like the shell. --since SEQ starts after an event seen
before, and --resume-file PATH keeps the last one printed, so that a
restarted watcher misses nothing. In the shell, `watch` and `unwatch` turn
the same events on and off between commands.

`top --admin` shows every server instance (connections, sessions, database
pool, request rates), the busiest commands and the latest events, refreshed
every second until `q`; a plain table per refresh when stdout is not a
terminal. See `help top`.

`agent` runs on a VM: it registers the VM with what the machine has (or
--ram, --cpu, --disk) and authenticates, keeps the VM's record true to the
machine (--reconcile-interval), pings every --ping-interval, reconnects with
capped exponential backoff when the connection is lost, logs each state
change to stderr, and on SIGINT or SIGTERM logs out and exits 0. See `help
agent`.

`help SUBCOMMAND` (or `SUBCOMMAND --help`) shows a subcommand's help;
`commands` lists the commands the server understands. `completions SHELL`
prints a completion script and `man` the man page.

Examples:
  vmm-client ping
  vmm-client register --vm-id stalin --ram 512 --cpu 4 --disk 100 --disk 200
  VMM_PASSWORD=securePass123 vmm-client list all --vm-id stalin
  VMM_PASSWORD=securePass123 vmm-client list all --vm-id stalin --limit 100
  VMM_PASSWORD=securePass123 vmm-client --json list disks --vm-id stalin --all-pages
  vmm-client update --vm-id stalin --ram 2048 --cpu 8 --disk 1=150 --new-disk 50
  echo securePass123 | vmm-client --json logout --vm-id stalin --password-stdin
  vmm-client send '{\"command\": \"ping\", \"id\": 1}'
  vmm-client commands
  VMM_PASSWORD=securePass123 vmm-client watch --vm-id stalin --topics vms,sessions
  VMM_ADMIN_TOKEN=... vmm-client --json watch --admin --resume-file /var/lib/vmm-watch.seq
  VMM_ADMIN_TOKEN=... vmm-client top --admin
  vmm-client --addr 10.0.0.5 --keepalive 10
  printf 'authenticate stalin\\nsecurePass123\\nlist_all\\n' | vmm-client
  VMM_PASSWORD=securePass123 vmm-client agent --vm-id stalin --ram 512 --cpu 4 --disk 100
  vmm-client agent --vm-id stalin --password-file /etc/vmm/password
  vmm-client completions bash > ~/.local/share/bash-completion/completions/vmm-client
  vmm-client man > ~/.local/share/man/man1/vmm-client.1";

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the server answered with an error reply (printed as `error: MESSAGE (CODE)`)
  2  usage error: bad arguments, or no password source
  3  cannot connect, the connection was lost, or the reply made no sense
`watch` runs until SIGINT or SIGTERM, and then exits 0; so does `top`
(also on `q` or Ctrl-C in its live view).
The shell reading a script from stdin exits 0 at the end of the input even if
some commands got error replies; only a lost connection makes it exit 3.";

#[derive(Debug, Parser)]
#[command(
    name = "vmm-client",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = EXIT_CODES
)]
struct Cli {
    /// Server address: HOST[:PORT], the port 8888 if none; an IPv6 address
    /// goes in brackets ([::1]:8888).
    #[arg(
        long,
        env = "VMM_ADDR",
        default_value = "127.0.0.1:8888",
        value_name = "HOST[:PORT]",
        value_parser = parse_addr,
        global = true
    )]
    addr: String,

    /// Print replies as the server sent them, one JSON line each, instead of
    /// tables: a one-shot command prints one, its own (never the reply of
    /// the authentication before it, nor a session token).
    #[arg(long, global = true)]
    json: bool,

    /// Act as the operator: `list`, `audit`, `revoke`, `watch` and `top` open
    /// an operator session with the admin token from $VMM_ADMIN_TOKEN instead
    /// of authenticating as a VM.
    #[arg(long, global = true)]
    admin: bool,

    /// Shell, watch and top: ping the server after SECS (fractions allowed)
    /// without sending anything, so that an idle timeout (the server's
    /// --idle-timeout, or a balancer's) keeps the connection open; 0 never
    /// pings.
    #[arg(
        long,
        env = "VMM_KEEPALIVE",
        value_name = "SECS",
        default_value = "20",
        value_parser = parse_secs,
        global = true
    )]
    keepalive: Duration,

    /// Speak TLS, trusting the system's root certificates (or --ca-cert's).
    #[arg(long, env = "VMM_TLS", global = true, value_parser = clap::builder::BoolishValueParser::new())]
    tls: bool,

    /// Trust only the CA certificates in this PEM file; implies --tls.
    #[arg(long, env = "VMM_CA_CERT", value_name = "PATH", global = true)]
    ca_cert: Option<std::path::PathBuf>,

    /// The name the server's certificate must carry [default: the host part
    /// of --addr].
    #[arg(long, env = "VMM_TLS_SERVER_NAME", value_name = "NAME", global = true)]
    tls_server_name: Option<String>,

    /// Client certificate chain (PEM) for mutual TLS; needs --client-key,
    /// implies --tls.
    #[arg(long, env = "VMM_CLIENT_CERT", value_name = "PATH", global = true)]
    client_cert: Option<std::path::PathBuf>,

    /// Private key (PEM) of --client-cert.
    #[arg(long, env = "VMM_CLIENT_KEY", value_name = "PATH", global = true)]
    client_key: Option<std::path::PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

/// The VM a command is about, and where its password comes from. The VM
/// is required by clap itself, so that it is reported with every other
/// missing argument in one error.
#[derive(Debug, Args)]
struct Login {
    /// The VM's id.
    #[arg(long, env = "VMM_VM_ID")]
    vm_id: String,

    /// Read the password from the first line of stdin (instead of $VMM_PASSWORD or a prompt).
    #[arg(long)]
    password_stdin: bool,
}

/// Like [`Login`], for the commands an operator runs too (`list`, `watch`):
/// with --admin there is no VM to name. [`parse`] makes `--vm-id` required
/// without --admin.
#[derive(Debug, Args)]
struct LoginUnlessAdmin {
    /// The VM's id (not needed with --admin).
    #[arg(long, env = "VMM_VM_ID")]
    vm_id: Option<String>,

    /// Read the password from the first line of stdin (instead of $VMM_PASSWORD or a prompt).
    #[arg(long)]
    password_stdin: bool,
}

impl LoginUnlessAdmin {
    /// The login as a VM, which is what the command does without --admin.
    fn vm(self) -> Result<Login, Failure> {
        let vm_id = self
            .vm_id
            .ok_or_else(|| Failure::Usage("--vm-id is required (or $VMM_VM_ID)".into()))?;
        Ok(Login {
            vm_id,
            password_stdin: self.password_stdin,
        })
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Client(ClientCommand),

    /// Run on a VM: stay registered and authenticated, reconnecting as needed.
    #[command(long_about = agent::long_about(), after_help = agent::after_help())]
    Agent(agent::AgentArgs),

    /// Print a shell completion script for vmm-client.
    #[command(long_about = COMPLETIONS_ABOUT)]
    Completions {
        /// The shell the script is for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },

    /// Print vmm-client's man page (roff).
    #[command(long_about = MAN_ABOUT)]
    Man,
}

const COMPLETIONS_ABOUT: &str = "\
Print a shell completion script for vmm-client on stdout.

Install it where the shell looks for completions, e.g.:
  bash:  vmm-client completions bash > ~/.local/share/bash-completion/completions/vmm-client
  zsh:   vmm-client completions zsh > ~/.zfunc/_vmm-client
         (with `fpath+=~/.zfunc; autoload -U compinit; compinit` in ~/.zshrc)
  fish:  vmm-client completions fish > ~/.config/fish/completions/vmm-client.fish
  elvish, in ~/.config/elvish/rc.elv:
         eval (vmm-client completions elvish | slurp)
  powershell, in $PROFILE:
         vmm-client completions powershell | Out-String | Invoke-Expression";

const MAN_ABOUT: &str = "\
Print vmm-client's man page (roff) on stdout.

Install it where man looks, e.g.:
  mkdir -p ~/.local/share/man/man1
  vmm-client man > ~/.local/share/man/man1/vmm-client.1
  man vmm-client";

#[derive(Debug, Subcommand)]
enum ClientCommand {
    /// Check that the server answers (prints PONG).
    Ping,

    /// Register a new VM with its disks.
    #[command(long_about = REGISTER_ABOUT)]
    Register {
        #[command(flatten)]
        login: Login,

        /// RAM in MiB.
        #[arg(long)]
        ram: u32,

        /// Number of CPUs.
        #[arg(long)]
        cpu: u32,

        /// A disk's size in GiB; repeat for more disks.
        #[arg(long = "disk", value_name = "GIB")]
        disks: Vec<u32>,

        /// Read the server's enrollment secret from PATH (its trailing
        /// newline dropped) instead of $VMM_REGISTRATION_SECRET; not both.
        #[arg(long, value_name = "PATH")]
        registration_secret_file: Option<PathBuf>,
    },

    /// Check a VM's credentials and show the VM.
    Authenticate {
        #[command(flatten)]
        login: Login,
    },

    /// List open connections, authenticated connections, all VMs or all disks.
    #[command(long_about = LIST_ABOUT)]
    List {
        /// What to list.
        #[arg(value_enum)]
        kind: ListKind,

        #[command(flatten)]
        login: LoginUnlessAdmin,

        #[command(flatten)]
        paging: Paging,

        /// Keep the list current until Ctrl-C: redrawn in place on a
        /// terminal, else a line per change (ADDED, MODIFIED, DELETED).
        #[arg(long, conflicts_with_all = ["limit", "after", "all_pages"])]
        watch: bool,
    },

    /// Change the VM's RAM, CPUs and disks (at least one change is needed).
    #[command(group(
        ArgGroup::new("changes")
            .required(true)
            .multiple(true)
            .args(["ram", "cpu", "resize", "attach"])
    ))]
    Update {
        #[command(flatten)]
        login: Login,

        /// New RAM in MiB.
        #[arg(long)]
        ram: Option<u32>,

        /// New number of CPUs.
        #[arg(long)]
        cpu: Option<u32>,

        /// Resize the existing disk ID to SIZE GiB; repeatable.
        #[arg(long = "disk", value_name = "ID=SIZE", value_parser = parse_resize)]
        resize: Vec<Resize>,

        /// Attach a new disk of SIZE GiB; repeatable.
        #[arg(long = "new-disk", value_name = "SIZE")]
        attach: Vec<u32>,
    },

    /// End the VM's authentication (authenticates first, then logs out).
    Logout {
        #[command(flatten)]
        login: Login,
    },

    /// Print change events as they happen, until SIGINT or SIGTERM.
    #[command(long_about = WATCH_ABOUT)]
    Watch {
        #[command(flatten)]
        login: LoginUnlessAdmin,

        /// Only these topics, comma-separated (default: all of them).
        #[arg(long, value_enum, value_delimiter = ',', value_name = "TOPIC,...")]
        topics: Vec<Topic>,

        /// Start after the event SEQ (a `seq` from an event line or a watch
        /// reply, or a resume file): the events after it that the server
        /// still keeps come first, then live ones. Wins over
        /// --resume-file's seq.
        #[arg(long, value_name = "SEQ", value_parser = clap::value_parser!(i64).range(0..))]
        since: Option<i64>,

        /// Keep the seq of the last event printed in PATH, and start after
        /// the one it holds: a restarted watcher misses nothing. Created if
        /// missing (its directory must exist).
        #[arg(long, value_name = "PATH")]
        resume_file: Option<PathBuf>,
    },

    /// Read the audit trail, newest first (needs --admin).
    Audit {
        /// Only this VM's events.
        #[arg(long)]
        vm_id: Option<String>,

        /// At most this many events (1 to 1000; default 100).
        #[arg(long)]
        limit: Option<u32>,
    },

    /// End every session of a VM by revoking its tokens (needs --admin).
    Revoke {
        /// The VM whose sessions end.
        vm_id: String,
    },

    /// A live view of every server instance, the busiest commands and the
    /// latest events (needs --admin).
    #[command(long_about = TOP_ABOUT)]
    Top {
        /// Seconds between two refreshes (fractions allowed, more than 0).
        #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_interval)]
        interval: Duration,

        /// Print one plain table (with --json: the `stats` reply) and exit.
        #[arg(long)]
        once: bool,
    },

    /// Send TEXT exactly as given and print the reply line(s) verbatim.
    Send {
        /// The raw request, e.g. '{"command": "ping"}'.
        text: String,
    },

    /// List the commands the server understands (its `help` command).
    Commands,
}

const REGISTER_ABOUT: &str = "\
Register a new VM with its disks.

The VM's password comes from --password-stdin (one line of stdin), else
$VMM_PASSWORD, else a prompt without echo on the terminal. A server that
requires an enrollment secret gets it from $VMM_REGISTRATION_SECRET, or from
the file named by --registration-secret-file (not both); never from the
command line.";

const LIST_ABOUT: &str = "\
List open connections, authenticated connections, all VMs or all disks.

Entries come in key order: vm_id for VMs, id for disks, session_id for
connections. Without paging flags the whole list comes in one reply.
--limit N prints one page of at most N entries and, when more follow,
`more: --after CURSOR` on stderr: pass that to get the next page. With
--all-pages every page is fetched (--limit entries each, 1000 by default)
and printed as it arrives: a table per page and one row count at the end;
with --json one line shaped like an unpaged reply, every entry in its list
(its `message` comes last).";

/// `list`'s paging flags.
#[derive(Debug, Args)]
struct Paging {
    /// At most N entries (1 to 10,000): one page; with --all-pages, the
    /// size of each page (1000 if not given).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    limit: Option<u32>,

    /// Start after CURSOR, the one the page before printed as `more:
    /// --after CURSOR`.
    #[arg(long, value_name = "CURSOR")]
    after: Option<String>,

    /// Fetch every page and print them all.
    #[arg(long)]
    all_pages: bool,
}

const WATCH_ABOUT: &str = "\
Print change events as they happen, until SIGINT or SIGTERM.

Authenticates as --vm-id (with --admin: opens an operator session), sends
`watch`, then prints each event on one line as it arrives, flushing stdout
after each:

  18:40:00.123 vm_updated stalin ram=1024 cpu=4 disks=1:150G,2:250G
  18:40:01.002 session_authenticated stalin session=4294967298 peer=127.0.0.1:50000
  18:40:02.310 session_closed - session=4294967299 peer=127.0.0.1:50002
  18:40:09.000 instance_lost instance=3 name=host:8888

The time is the event's, in UTC; `-` is a connection not authenticated as
any VM; an unknown event shows its name and data. With --json: the watch
reply line (not the authenticate one), then each event line verbatim. Events
come from changes made through any server instance, in the order they
happened. A ping is sent whenever nothing was sent for --keepalive seconds,
so that the server does not close the idle connection.

Topics: vms (vm_registered, vm_updated), disks (the same events, which carry
the disks), sessions (session_opened, session_authenticated,
session_logged_out, session_closed, instance_lost).

Every event has a seq (in its --json line), increasing in the order the
changes were made, over every instance. --since SEQ starts after that event:
the events after it that the server still keeps (--event-retention, 24 h by
default) come first, in order, then live ones, none twice. --resume-file
PATH makes a restarted watcher lossless: it starts after the seq in PATH (if
the file exists), and writes there the seq of each event once it has been
printed (and the watch reply's seq, where a watch with no event yet
resumes), by renaming a temporary file over it. The file is synced to disk
at most a second after a write, and on exit: after a crash the watcher may
print again the last events before it, but never skips one. With both,
--since says where to start and the file is still kept. A lost connection
ends the run (exit 3) rather than reconnecting: run the watcher under a
supervisor that restarts it, with --resume-file; in sh, restarting it only
after a lost connection:

  while vmm-client --json watch --admin --resume-file w.seq >> events.log
        [ $? -eq 3 ]; do sleep 1; done

A seq the server no longer keeps (or never issued) is refused with `gone`
(exit 1), naming the oldest and the latest seq it has: nothing is skipped
silently. Remove the resume file (or pass a --since it keeps) to start over,
and list to see the current state.

Exits 0 on SIGINT or SIGTERM, 1 when authentication or `watch` is refused
(`gone` too), 2 when the resume file cannot be read or written, 3 when the
connection is lost (also when the server disconnects a watcher that falls
too far behind).";

const TOP_ABOUT: &str = "\
A live view of every server instance, the busiest commands and the latest
events (needs --admin and $VMM_ADMIN_TOKEN).

Opens an operator session on one instance and asks `stats` every --interval
seconds; every live instance answers through it (each writes its figures
with its lease renewal, so they are at most a couple of seconds old: the
`lease` column says how old). On a terminal the view fills the screen and
follows its size:

  instances      a row each: name, id, up (uptime), lease (age of the
                 figures), conns (open connections), sess c/a/o
                 (sessions by state: connected and not authenticated,
                 authenticated as a VM, operator), watch (watchers), pw q (password hashes waiting for a
                 worker), db pool (in use/size), db wait (requests waiting
                 for a database connection), req/s (requests per second
                 over the last 10 s); and their totals
  busiest commands
                 per command over the fleet: req/s over 10 s and 1 min
                 (summed over the instances) and p99 in ms over the last
                 minute (the highest instance's: an upper bound)
  latest events  what `watch` prints, newest last

Keys: q or Ctrl-C quits (so do SIGINT and SIGTERM); the terminal is put
back as it was however the view ends.

When stdout is not a terminal (or with --once), each refresh is printed as
plain tables under a `== vmm top TIME: N instances ==` line, until SIGINT or
SIGTERM (exit 0); --once prints one and exits. With --json each refresh is
the `stats` reply line. A lost connection ends the run with exit code 3.";

/// A `watch` topic.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Topic {
    /// vm_registered, vm_updated.
    Vms,
    /// session_opened, session_authenticated, session_logged_out,
    /// session_closed, instance_lost.
    Sessions,
    /// vm_registered, vm_updated (they carry the VM's disks).
    Disks,
}

impl Topic {
    fn name(self) -> &'static str {
        match self {
            Topic::Vms => "vms",
            Topic::Sessions => "sessions",
            Topic::Disks => "disks",
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ListKind {
    /// Every open connection (active_vms).
    #[value(alias = "active_vms")]
    Active,
    /// Every authenticated connection (authenticated_vms).
    #[value(alias = "authenticated_vms")]
    Auth,
    /// Every VM ever registered (all_vms).
    #[value(alias = "all_vms")]
    All,
    /// Every disk (all_disks).
    #[value(alias = "all_disks")]
    Disks,
}

impl From<ListKind> for ListType {
    fn from(kind: ListKind) -> ListType {
        match kind {
            ListKind::Active => ListType::ActiveVms,
            ListKind::Auth => ListType::AuthenticatedVms,
            ListKind::All => ListType::AllVms,
            ListKind::Disks => ListType::AllDisks,
        }
    }
}

/// The subcommands whose `--vm-id` is required unless --admin is given.
const VM_UNLESS_ADMIN: [&str; 2] = ["list", "watch"];

/// Parses `args` (the program's name first), reporting every missing
/// argument in one error. `required_unless_present = "admin"` cannot say
/// that `list` and `watch` need `--vm-id` without --admin: a global flag
/// given before the subcommand reaches it only after the subcommand has been
/// checked. So a first pass that ignores errors finds out whether --admin
/// was given, and the real pass requires `--vm-id` (or $VMM_VM_ID) when it
/// was not.
fn parse<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    let admin = Cli::command()
        .ignore_errors(true)
        .try_get_matches_from(&args)
        .ok()
        .and_then(|matches| matches.try_get_one::<bool>("admin").ok().flatten().copied())
        .unwrap_or(false);
    let mut command = Cli::command();
    if !admin {
        for name in VM_UNLESS_ADMIN {
            command =
                command.mut_subcommand(name, |sub| sub.mut_arg("vm_id", |arg| arg.required(true)));
        }
    }
    let matches = command.try_get_matches_from(&args)?;
    Cli::from_arg_matches(&matches).map_err(|err| err.format(&mut Cli::command()))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = parse(std::env::args_os()).unwrap_or_else(|err| err.exit());
    let command = match cli.command {
        Some(Command::Completions { shell }) => {
            return exit(docs::completions(shell, Cli::command()));
        }
        Some(Command::Man) => return exit(docs::man(Cli::command())),
        command => command,
    };
    let tls = conn::TlsOptions {
        tls: cli.tls,
        ca_cert: cli.ca_cert,
        server_name: cli.tls_server_name,
        client_cert: cli.client_cert,
        client_key: cli.client_key,
    };
    if let Err(failure) = tls.apply(&cli.addr) {
        eprintln!("error: {failure}");
        return ExitCode::from(failure.exit_code());
    }
    let result = match command {
        None => shell::run(&cli.addr, cli.json, unless_zero(cli.keepalive)).await,
        Some(Command::Agent(args)) => return agent::run(&cli.addr, args).await,
        Some(Command::Client(command)) => {
            let keepalive = unless_zero(cli.keepalive);
            one_shot(&cli.addr, cli.json, cli.admin, keepalive, command).await
        }
        Some(Command::Completions { .. } | Command::Man) => Ok(()),
    };
    exit(result)
}

/// The exit code of a run, after printing why it failed.
fn exit(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}

/// Runs a subcommand other than `agent`; `keepalive` is for `watch` and
/// `list --watch`.
async fn one_shot(
    addr: &str,
    json: bool,
    admin: bool,
    keepalive: Option<Duration>,
    command: ClientCommand,
) -> Result<(), Failure> {
    match command {
        ClientCommand::Ping => simple(addr, json, Op::Ping).await,
        ClientCommand::Commands => simple(addr, json, Op::Help).await,
        ClientCommand::Register {
            login,
            ram,
            cpu,
            disks,
            registration_secret_file,
        } => {
            let registration_secret =
                secrets::registration_secret_from(registration_secret_file.as_deref())?;
            let password = password::obtain_async(login.password_stdin, &login.vm_id).await?;
            let registration = Registration {
                vm_id: login.vm_id,
                ram,
                cpu,
                password,
                disks,
                registration_secret,
            };
            simple(addr, json, Op::Register(registration)).await
        }
        ClientCommand::Authenticate { login } => {
            let password = password::obtain_async(login.password_stdin, &login.vm_id).await?;
            let op = Op::Authenticate {
                vm_id: login.vm_id,
                password,
            };
            simple(addr, json, op).await
        }
        ClientCommand::List {
            kind,
            login,
            paging,
            watch,
        } => {
            let mut conn = if admin {
                operator(addr, json).await?
            } else {
                logged_in(addr, json, login.vm()?).await?
            };
            let kind = kind.into();
            if watch {
                return list_watch::run(conn, json, keepalive, kind).await;
            }
            if paging.all_pages {
                let size = paging.limit.unwrap_or(pages::DEFAULT_PAGE);
                pages::all(&mut conn, json, kind, size, paging.after).await
            } else {
                pages::one(&mut conn, kind, paging.limit, paging.after).await
            }
        }
        ClientCommand::Audit { vm_id, limit } => {
            if !admin {
                return Err(Failure::Usage(
                    "audit is for operators: add --admin (and set $VMM_ADMIN_TOKEN)".into(),
                ));
            }
            as_operator(addr, json, Op::Audit { vm_id, limit }).await
        }
        ClientCommand::Revoke { vm_id } => {
            if !admin {
                return Err(Failure::Usage(
                    "revoke is for operators: add --admin (and set $VMM_ADMIN_TOKEN)".into(),
                ));
            }
            as_operator(addr, json, Op::Revoke { vm_id }).await
        }
        ClientCommand::Update {
            login,
            ram,
            cpu,
            resize,
            attach,
        } => {
            let update = Update {
                ram,
                cpu,
                resize: resize.iter().map(|r| (r.id, r.size)).collect(),
                attach,
            };
            authenticated(addr, json, login, Op::Update(update)).await
        }
        ClientCommand::Logout { login } => authenticated(addr, json, login, Op::Logout).await,
        ClientCommand::Watch {
            login,
            topics,
            since,
            resume_file,
        } => {
            let who = if admin {
                watch::Who::Operator {
                    admin_token: secrets::admin_token()?,
                }
            } else {
                let login = login.vm()?;
                watch::Who::Vm {
                    vm_id: login.vm_id,
                    password_stdin: login.password_stdin,
                }
            };
            let watch = watch::Watch {
                who,
                topics: topics.iter().map(|topic| topic.name().to_owned()).collect(),
                since,
                resume_file,
            };
            watch::run(addr, json, keepalive, watch).await
        }
        ClientCommand::Top { interval, once } => {
            if !admin {
                return Err(Failure::Usage(
                    "top is for operators: add --admin (and set $VMM_ADMIN_TOKEN)".into(),
                ));
            }
            top::run(addr, json, keepalive, top::Options { interval, once }).await
        }
        ClientCommand::Send { text } => {
            conn::replies_expected(&text)?;
            let mut conn = Conn::connect(addr, json).await?;
            let replies = conn.raw(&text).await?;
            match replies.iter().find(|reply| !reply.is_success()) {
                Some(reply) => Err(Failure::from_reply(reply)),
                None => Ok(()),
            }
        }
    }
}

/// Connects and runs one command.
async fn simple(addr: &str, json: bool, op: Op) -> Result<(), Failure> {
    let mut conn = Conn::connect(addr, json).await?;
    conn.run(&op).await.map(drop)
}

/// Connects, authenticates as `login`, then runs `op` on the same connection.
async fn authenticated(addr: &str, json: bool, login: Login, op: Op) -> Result<(), Failure> {
    let mut conn = logged_in(addr, json, login).await?;
    conn.run(&op).await.map(drop)
}

/// Connects, opens an operator session with $VMM_ADMIN_TOKEN, then runs
/// `op` on the same connection.
async fn as_operator(addr: &str, json: bool, op: Op) -> Result<(), Failure> {
    let mut conn = operator(addr, json).await?;
    conn.run(&op).await.map(drop)
}

/// A connection authenticated as `login` (the password is found before
/// connecting, so that a missing one costs no connection).
async fn logged_in(addr: &str, json: bool, login: Login) -> Result<Conn, Failure> {
    let password = password::obtain_async(login.password_stdin, &login.vm_id).await?;
    let mut conn = Conn::connect(addr, json).await?;
    conn.login(&login.vm_id, password).await?;
    Ok(conn)
}

/// A connection with an operator session, opened with $VMM_ADMIN_TOKEN.
async fn operator(addr: &str, json: bool) -> Result<Conn, Failure> {
    let admin_token = secrets::admin_token()?;
    let mut conn = Conn::connect(addr, json).await?;
    conn.operator(admin_token).await?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The shell's help sends people to `vmm-client commands` for the
    /// server's commands: `vmm-client help` lists the client's subcommands.
    #[test]
    fn the_shell_help_points_at_the_server_commands_subcommand() {
        let help = shell::help_text();
        assert!(help.contains("`vmm-client commands`"), "{help}");
        assert!(!help.contains("`vmm-client help`"), "{help}");
        let commands = Cli::command();
        let commands = commands.find_subcommand("commands").map(|c| c.get_about());
        assert!(
            commands.is_some_and(|about| about.is_some_and(|about| about
                .to_string()
                .contains("commands the server understands"))),
            "{commands:?}"
        );
    }

    #[test]
    fn update_needs_a_change() {
        let parsed = Cli::try_parse_from(["vmm-client", "update", "--vm-id", "a"]);
        assert!(parsed.is_err());
        let parsed =
            Cli::try_parse_from(["vmm-client", "update", "--vm-id", "a", "--new-disk", "5"]);
        assert!(parsed.is_ok());
    }

    #[test]
    fn each_agent_flag_overrides_its_own_field_within_the_limits() {
        let parse = |args: &[&str]| {
            let argv = ["vmm-client", "agent", "--vm-id", "a"];
            Cli::try_parse_from(argv.iter().chain(args)).is_ok()
        };
        assert!(parse(&[]));
        assert!(parse(&["--ram", "512", "--cpu", "2", "--disk", "10"]));
        assert!(parse(&["--ram", "512"]));
        assert!(parse(&["--cpu", "2"]));
        assert!(parse(&["--disk", "10"]));
        assert!(!parse(&["--ram", "0"]));
        assert!(!parse(&["--cpu", "1025"]));
        assert!(!parse(&["--disk", "1048577"]));
        assert!(parse(&["--dry-run", "--reconcile-interval", "0.2"]));
        assert!(parse(&["--state-file", "/tmp/a.json"]));
        assert!(parse(&["--ping-interval", "0.2", "--backoff-max", "1.5"]));
        assert!(!parse(&["--ping-interval", "soon"]));
        assert!(!parse(&["--password", "secret"]));
    }

    #[test]
    fn list_pages_are_between_one_and_ten_thousand() {
        let parse = |args: &[&str]| {
            let argv = ["vmm-client", "list", "all"];
            Cli::try_parse_from(argv.iter().chain(args)).is_ok()
        };
        assert!(parse(&["--limit", "1"]));
        assert!(parse(&["--limit", "10000", "--after", "YWxsX3Ztczpi"]));
        assert!(parse(&["--all-pages"]));
        assert!(parse(&["--all-pages", "--limit", "2"]));
        assert!(!parse(&["--limit", "0"]));
        assert!(!parse(&["--limit", "10001"]));
        assert!(!parse(&["--limit", "-1"]));
        assert!(parse(&["--watch"]));
        assert!(!parse(&["--watch", "--all-pages"]));
        assert!(!parse(&["--watch", "--limit", "5"]));
    }

    #[test]
    fn an_address_without_a_port_gets_8888() {
        let addr = |given: &str| parse(["vmm-client", "--addr", given, "ping"]).map(|cli| cli.addr);
        assert_eq!(addr("127.0.0.1").ok().as_deref(), Some("127.0.0.1:8888"));
        assert_eq!(
            addr("vmm.internal").ok().as_deref(),
            Some("vmm.internal:8888")
        );
        assert_eq!(addr("[::1]").ok().as_deref(), Some("[::1]:8888"));
        assert_eq!(addr("[::1]:9000").ok().as_deref(), Some("[::1]:9000"));
        let bad = addr("127.0.0.1:http");
        assert_eq!(
            bad.map_err(|err| err.kind()).err(),
            Some(clap::error::ErrorKind::ValueValidation)
        );
    }

    #[test]
    fn an_operator_names_no_vm_wherever_admin_is_given() {
        for args in [
            &["vmm-client", "--admin", "list", "all"][..],
            &["vmm-client", "list", "--admin", "all"][..],
            &["vmm-client", "list", "all", "--admin"][..],
            &["vmm-client", "--admin", "watch", "--topics", "vms"][..],
            &["vmm-client", "watch", "--admin"][..],
        ] {
            let parsed = parse(args);
            assert!(
                parsed.as_ref().is_ok_and(|cli| cli.admin),
                "{args:?}: {parsed:?}"
            );
        }
        assert!(parse(["vmm-client", "list", "all", "--vm-id", "a"]).is_ok());
    }

    #[test]
    fn help_is_a_subcommand_again() {
        let err = parse(["vmm-client", "help", "register"]).err();
        assert_eq!(
            err.as_ref().map(clap::Error::kind),
            Some(clap::error::ErrorKind::DisplayHelp)
        );
        let help = err.map(|err| err.to_string()).unwrap_or_default();
        assert!(help.contains("--registration-secret-file"), "{help}");
    }

    #[test]
    fn there_is_no_password_flag() {
        let parsed = Cli::try_parse_from([
            "vmm-client",
            "authenticate",
            "--vm-id",
            "a",
            "--password",
            "secret",
        ]);
        assert!(parsed.is_err());
    }
}
