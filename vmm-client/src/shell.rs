//! The interactive shell: one connection, one command per line, anything a
//! command lacks asked for. [`COMMANDS`] is what it accepts: `help` prints
//! that table, and a line is run only when it names an entry of it, so the
//! two cannot disagree (an [`Action`] missing from the table is a variant
//! never built, which the compiler reports).
//!
//! Questions are checked as they are answered, against vmm-core's own rules
//! ([`vmm_core::params`], [`vmm_core::protocol::limits`]): the rule is in the
//! prompt, and an answer the server would refuse is refused at once and asked
//! again (up to [`TRIES`] times), rather than after every other question.
//! `register` asks for the password twice.
//!
//! History: on a terminal, command lines go into a history file, which
//! outlives the session; [`remember`] keeps out every line that holds a
//! password, token or secret, and every line that is not a command at all
//! (such as a password typed at the prompt by mistake).
//!
//! Keepalive: the server closes connections that send nothing for its idle
//! timeout, and a person may well sit at the prompt (or at a question of a
//! command) for longer. So whenever the shell waits for input it also keeps a
//! timer, and when the connection has sent nothing for `--keepalive` it sends
//! a `ping` and reads the reply silently. The input thread keeps reading
//! meanwhile, so neither the prompt nor a half-typed line is disturbed; a
//! ping that finds the connection lost ends the shell like any lost
//! connection (exit 3).
//!
//! Events: after `watch`, change events are printed as they arrive while the
//! shell waits for input (on a terminal, above the prompt, which is then
//! redrawn), and those that arrive while a command waits for its reply are
//! printed before what the reply prints. `unwatch` (or `logout`) stops them.
//! `watch since SEQ` first prints the events after SEQ that the server keeps.
//!
//! Lists come a page at a time, so that a long one neither scrolls away nor
//! arrives in one huge reply: on a terminal a page fills the screen and the
//! shell asks before the next one ([`MORE`], read through the line editor
//! like any answer, so keepalive pings and events go on meanwhile).
//! Otherwise (stdin or stdout not a terminal) pages of [`UNKNOWN_HEIGHT`]
//! follow each other without a question.

use std::future::Future;
use std::io::{self, IsTerminal};
use std::time::Duration;

use serde_json::Value;
use vmm_core::ErrorCode;
use vmm_core::client::{Registration, Update};
use vmm_core::params;
use vmm_core::protocol::{ListType, limits};

use crate::args::parse_resize;
use crate::conn::{Conn, sleep_until};
use crate::failure::Failure;
use crate::input::{Input, Read};
use crate::op::Op;
use crate::{out, pages, secrets};

/// What a command does; [`Shell::execute`] matches on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Ping,
    Register,
    Authenticate,
    List,
    ListActive,
    ListAuth,
    ListAll,
    ListDisks,
    UpdateRam,
    Update,
    Logout,
    Watch,
    Unwatch,
    Raw,
    Help,
    Quit,
}

/// A command of the shell: how it is called, what `help` says of it.
#[derive(Debug)]
struct Entry {
    /// Its name, then its aliases.
    names: &'static [&'static str],
    /// Its arguments, as `help` shows them.
    args: &'static str,
    /// What it does, a line each.
    help: &'static [&'static str],
    action: Action,
}

/// Every command the shell accepts, in the order `help` lists them. A line
/// that starts with `{` is [`Action::Raw`], whatever follows.
const COMMANDS: &[Entry] = &[
    Entry {
        names: &["ping"],
        args: "",
        help: &["check that the server answers"],
        action: Action::Ping,
    },
    Entry {
        names: &["register"],
        args: "[VM_ID RAM CPU [GIB...]]",
        help: &[
            "register a VM (RAM in MiB, disk sizes",
            "in GiB); the password is asked twice;",
            "sends $VMM_REGISTRATION_SECRET if set",
        ],
        action: Action::Register,
    },
    Entry {
        names: &["authenticate"],
        args: "[VM_ID]",
        help: &["authenticate this connection as a VM"],
        action: Action::Authenticate,
    },
    Entry {
        names: &["list"],
        args: "[TYPE]",
        help: &[
            "list TYPE: active (open connections),",
            "auth (authenticated ones), all (every",
            "VM) or disks (every disk); on a",
            "terminal a page at a time (Enter: next",
            "page, q: stop)",
        ],
        action: Action::List,
    },
    Entry {
        names: &["list_active"],
        args: "",
        help: &["list active"],
        action: Action::ListActive,
    },
    Entry {
        names: &["list_auth"],
        args: "",
        help: &["list auth"],
        action: Action::ListAuth,
    },
    Entry {
        names: &["list_all"],
        args: "",
        help: &["list all"],
        action: Action::ListAll,
    },
    Entry {
        names: &["list_all_disks"],
        args: "",
        help: &["list disks"],
        action: Action::ListDisks,
    },
    Entry {
        names: &["update_ram"],
        args: "[RAM]",
        help: &["change the RAM (MiB)"],
        action: Action::UpdateRam,
    },
    Entry {
        names: &["update_ram_cpu_disks"],
        args: "[RAM CPU [CHANGE...]]",
        help: &[
            "change RAM, CPUs and disks; CHANGE is",
            "ID=SIZE (resize disk ID) or +SIZE (new",
            "disk); RAM or CPU `-` leaves it as is",
        ],
        action: Action::Update,
    },
    Entry {
        names: &["logout"],
        args: "",
        help: &[
            "end this connection's authentication",
            "(and stop watching)",
        ],
        action: Action::Logout,
    },
    Entry {
        names: &["watch"],
        args: "[TOPIC...] [since SEQ]",
        help: &[
            "print change events as they happen, also",
            "while waiting for input; TOPIC is vms,",
            "sessions or disks (default: all); with",
            "`since SEQ`, first the events after SEQ",
            "(a `seq` of a --json event line)",
        ],
        action: Action::Watch,
    },
    Entry {
        names: &["unwatch"],
        args: "",
        help: &["stop printing change events"],
        action: Action::Unwatch,
    },
    Entry {
        names: &["{...}"],
        args: "",
        help: &[
            "send a raw JSON request, print the reply",
            "verbatim: any server command (see",
            "`vmm-client commands`), several per line",
            "too",
        ],
        action: Action::Raw,
    },
    Entry {
        names: &["help", "?"],
        args: "",
        help: &["this help"],
        action: Action::Help,
    },
    Entry {
        names: &["quit", "exit"],
        args: "",
        help: &["leave (Ctrl-D too)"],
        action: Action::Quit,
    },
];

const HELP_HEAD: &str = "\
Shell commands (arguments left out are asked for, and each answer is checked
as it is given; passwords are always asked for, without echo on a terminal,
and read as the next line when piped):";

const HELP_TAIL: &str = "\
Lines starting with # are ignored. On a terminal, command lines are kept in
the history ($VMM_HISTORY, by default ~/.vmm_history), except those holding a
password, token or secret, and those that are not commands.";

/// Where the descriptions start in `help`.
const HELP_COLUMN: usize = 40;

/// The shell's `help`, made from [`COMMANDS`].
pub(crate) fn help_text() -> String {
    let mut text = format!("{HELP_HEAD}\n");
    let indent = " ".repeat(HELP_COLUMN);
    for entry in COMMANDS {
        let mut usage = entry.names.join(", ");
        if !entry.args.is_empty() {
            usage = format!("{usage} {}", entry.args);
        }
        let mut lines = entry.help.iter();
        let first = lines.next().copied().unwrap_or_default();
        if usage.len() + 4 <= HELP_COLUMN {
            text.push_str(&format!(
                "  {usage:<width$}{first}\n",
                width = HELP_COLUMN - 2
            ));
        } else {
            text.push_str(&format!("  {usage}\n{indent}{first}\n"));
        }
        for line in lines {
            text.push_str(&format!("{indent}{line}\n"));
        }
    }
    text.push('\n');
    text.push_str(HELP_TAIL);
    text
}

/// A command line taken apart: its entry and its arguments, whose shape
/// (how many, numbers where numbers go, known names) has been checked.
#[derive(Debug)]
struct Command<'a> {
    entry: &'static Entry,
    args: Vec<&'a str>,
}

/// Finds `line`'s entry in [`COMMANDS`] and checks its arguments' shape.
/// The message of an unknown command does not repeat it: it may be a
/// password typed at the prompt by mistake.
fn parse(line: &str) -> Result<Command<'_>, String> {
    let line = line.trim();
    if line.starts_with('{')
        && let Some(entry) = COMMANDS.iter().find(|entry| entry.action == Action::Raw)
    {
        return Ok(Command {
            entry,
            args: Vec::new(),
        });
    }
    let mut words = line.split_whitespace();
    let name = words.next().unwrap_or_default();
    let entry = COMMANDS
        .iter()
        .find(|entry| entry.action != Action::Raw && entry.names.contains(&name))
        .ok_or_else(|| "unknown command; type `help` for the commands".to_owned())?;
    let args: Vec<&str> = words.collect();
    shape(entry, &args)?;
    Ok(Command { entry, args })
}

/// Whether `args` fit `entry`: the checks that need no question answered.
/// The values are checked against the protocol's rules when used.
fn shape(entry: &Entry, args: &[&str]) -> Result<(), String> {
    let name = entry.names[0];
    let at_most = |n: usize, what: &str| {
        if args.len() <= n {
            Ok(())
        } else {
            Err(format!("`{name}` takes {what}"))
        }
    };
    let whole = |text: &str| text.parse::<i64>().is_ok();
    match entry.action {
        Action::Ping
        | Action::ListActive
        | Action::ListAuth
        | Action::ListAll
        | Action::ListDisks
        | Action::Logout
        | Action::Unwatch
        | Action::Help
        | Action::Quit
        | Action::Raw => at_most(0, "no arguments"),
        Action::Authenticate => at_most(1, "at most a VM id; the password is asked for"),
        Action::List => {
            at_most(1, "one argument: active, auth, all or disks")?;
            match args.first() {
                Some(kind) if list_type(kind).is_none() => Err(format!(
                    "`{kind}` is not a list: active, auth, all or disks"
                )),
                _ => Ok(()),
            }
        }
        Action::Register => {
            if args.iter().skip(1).all(|arg| whole(arg)) {
                Ok(())
            } else {
                Err(format!(
                    "`{name}` takes VM_ID RAM CPU [GIB...]: whole numbers after the VM id"
                ))
            }
        }
        Action::UpdateRam => {
            at_most(1, "one argument: RAM in MiB")?;
            if args.iter().all(|arg| whole(arg)) {
                Ok(())
            } else {
                Err(format!("`{name}` takes RAM in MiB, a whole number"))
            }
        }
        Action::Update => {
            let numbers = args.iter().take(2).all(|arg| *arg == "-" || whole(arg));
            let changes = args.iter().skip(2).all(|arg| disk_change(arg).is_ok());
            if numbers && changes {
                Ok(())
            } else {
                Err(format!(
                    "`{name}` takes RAM CPU [CHANGE...]: whole numbers (or -), \
                     then ID=SIZE or +SIZE"
                ))
            }
        }
        Action::Watch => watch_args(args).map(drop),
    }
}

/// The topics `watch` knows.
const TOPICS: [&str; 3] = ["vms", "sessions", "disks"];

/// `watch`'s topics and `since`: `watch vms sessions since 41`.
fn watch_args(args: &[&str]) -> Result<(Vec<String>, Option<i64>), String> {
    let (args, since) = match args {
        [topics @ .., "since", seq] => {
            let seq = seq
                .parse::<i64>()
                .ok()
                .filter(|seq| *seq >= 0)
                .ok_or_else(|| format!("`since` takes a seq (0 or more), not {seq:?}"))?;
            (topics, Some(seq))
        }
        _ => (args, None),
    };
    let topics = topics(args);
    if !topics.iter().all(|topic| TOPICS.contains(&topic.as_str())) {
        return Err("the topics are vms, sessions and disks (then `since SEQ`)".to_owned());
    }
    Ok((topics, since))
}

/// `watch vms sessions` and `watch vms,sessions` alike.
fn topics(args: &[&str]) -> Vec<String> {
    args.iter()
        .flat_map(|arg| arg.split(','))
        .filter(|topic| !topic.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Whether a command line may go into the history file: a JSON line only
/// when no key in it, at any depth, names a password, token or secret (and
/// it is JSON throughout: a broken line cannot be checked); any other line
/// only when it is a command of [`COMMANDS`], whose arguments never hold a
/// secret (a password is always asked for).
pub fn remember(line: &str) -> bool {
    let line = line.trim();
    if line.starts_with('{') {
        let mut values = serde_json::Deserializer::from_str(line).into_iter::<Value>();
        return values.all(|value| value.is_ok_and(|value| !holds_secret(&value)));
    }
    !line.starts_with('#') && parse(line).is_ok()
}

/// Whether a key of `value`, at any depth, names a password, token or
/// secret (`password`, `token`, `admin_token`, `registration_secret`...).
fn holds_secret(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.iter().any(|(key, value)| {
            let key = key.to_ascii_lowercase();
            ["password", "token", "secret"]
                .iter()
                .any(|word| key.contains(word))
                || holds_secret(value)
        }),
        Value::Array(values) => values.iter().any(holds_secret),
        _ => false,
    }
}

/// How many answers to one question are refused before the command is
/// dropped: enough for typos, few enough that a script whose answers are
/// out of step does not feed its next commands in as answers for long.
const TRIES: usize = 3;

/// Asked between two pages of a list on a terminal.
const MORE: &str = "-- more (Enter: next page, q: stop) --";

/// The page size of a list when the terminal's height is unknown (or there
/// is no terminal).
const UNKNOWN_HEIGHT: u32 = 50;

/// The most entries a page may hold (the server's bound on `limit`).
const MAX_PAGE: u32 = 10_000;

/// Lines a page shows besides its rows: the table's top border, header,
/// header rule and bottom border, the row count, and [`MORE`].
const PAGE_FRAME: u16 = 6;

/// How many rows fit on a terminal of `rows` lines with the frame of a
/// page (at least one, at most [`MAX_PAGE`]).
fn page_size(rows: Option<u16>) -> u32 {
    rows.map_or(UNKNOWN_HEIGHT, |rows| {
        u32::from(rows.saturating_sub(PAGE_FRAME).max(1)).min(MAX_PAGE)
    })
}

/// The list a `list` argument names: the names of `vmm-client list` and
/// those of the protocol.
fn list_type(name: &str) -> Option<ListType> {
    Some(match name {
        "active" | "active_vms" => ListType::ActiveVms,
        "auth" | "authenticated_vms" => ListType::AuthenticatedVms,
        "all" | "all_vms" => ListType::AllVms,
        "disks" | "all_disks" => ListType::AllDisks,
        _ => return None,
    })
}

/// What to do after a command.
enum Flow {
    Continue,
    Quit,
}

/// Why a command stopped early.
enum Abort {
    /// Ctrl-C (or Ctrl-D at a question on a terminal): drop the command.
    Cancelled,
    /// The piped input ended: leave the shell.
    Eof,
    /// Cannot read input at all: leave the shell.
    Input(io::Error),
    /// Print it and go on, unless the connection is gone.
    Failed(Failure),
}

impl From<Failure> for Abort {
    fn from(failure: Failure) -> Abort {
        Abort::Failed(failure)
    }
}

fn usage(message: impl Into<String>) -> Abort {
    Abort::Failed(Failure::Usage(message.into()))
}

/// Runs the shell until `quit`, the end of the input, or a lost connection.
/// `keepalive`: ping after this long without sending anything (`None`: never).
pub async fn run(addr: &str, json: bool, keepalive: Option<Duration>) -> Result<(), Failure> {
    let mut conn = Conn::connect(addr, json).await?;
    let mut input = Input::start(remember);
    if let Some(printer) = input.printer() {
        conn.use_terminal(printer);
    }
    if input.interactive() {
        eprintln!("connected to {addr}; type `help` for the commands, `quit` to leave");
    }
    let mut shell = Shell {
        conn,
        input,
        json,
        keepalive,
        vm: None,
        watching: false,
    };
    let result = shell.repl().await;
    shell.input.finish().await;
    result
}

struct Shell {
    conn: Conn,
    input: Input,
    json: bool,
    keepalive: Option<Duration>,
    /// The VM this connection is authenticated as, for the prompt.
    vm: Option<String>,
    /// Whether `watch` succeeded (and no `unwatch` or `logout` since): then
    /// events are printed while the shell waits for input.
    watching: bool,
}

impl Shell {
    fn prompt(&self) -> String {
        match &self.vm {
            Some(vm) => format!("vmm {} ({vm})> ", self.conn.addr()),
            None => format!("vmm {}> ", self.conn.addr()),
        }
    }

    async fn repl(&mut self) -> Result<(), Failure> {
        loop {
            let prompt = self.prompt();
            let read = waiting(
                &mut self.conn,
                self.keepalive,
                self.watching,
                self.input.command(&prompt),
            )
            .await?;
            let line = match read {
                Ok(Read::Line(line)) => line,
                Ok(Read::Interrupted) => continue,
                Ok(Read::Eof) => return Ok(()),
                Err(err) => return Err(Failure::Usage(format!("cannot read input: {err}"))),
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match self.execute(line).await {
                Ok(Flow::Continue) | Err(Abort::Cancelled) => {}
                Ok(Flow::Quit) | Err(Abort::Eof) => return Ok(()),
                Err(Abort::Input(err)) => {
                    return Err(Failure::Usage(format!("cannot read input: {err}")));
                }
                Err(Abort::Failed(failure @ Failure::Connection(_))) => return Err(failure),
                Err(Abort::Failed(failure)) => eprintln!("error: {failure}"),
            }
        }
    }

    async fn execute(&mut self, line: &str) -> Result<Flow, Abort> {
        let Command { entry, args } = parse(line).map_err(usage)?;
        match entry.action {
            Action::Quit => return Ok(Flow::Quit),
            Action::Raw => self.raw(line).await?,
            Action::Help => {
                if self.json {
                    eprintln!("{}", help_text());
                } else {
                    out::line(help_text());
                }
            }
            Action::Ping => {
                self.conn.run(&Op::Ping).await?;
            }
            Action::Register => {
                let op = self.registration(&args).await?;
                let secret_sent = matches!(
                    &op,
                    Op::Register(registration) if registration.registration_secret.is_some()
                );
                self.conn.run(&op).await.map_err(|failure| match failure {
                    Failure::Server {
                        message,
                        code: Some(ErrorCode::Forbidden),
                    } if !secret_sent => Failure::Server {
                        message: format!(
                            "{message}; set $VMM_REGISTRATION_SECRET before starting the shell"
                        ),
                        code: Some(ErrorCode::Forbidden),
                    },
                    other => other,
                })?;
            }
            Action::Authenticate => {
                let vm_id = self.given_or_ask(args.first(), "vm_id: ", vm_id).await?;
                let password = self.password(&format!("password for {vm_id}: ")).await?;
                let reply = self.conn.run(&Op::Authenticate { vm_id, password }).await?;
                self.vm = authenticated_vm(&reply);
            }
            Action::List => {
                let prompt = "list (active, auth, all or disks): ";
                let kind = self
                    .given_or_ask(args.first(), prompt, |name| {
                        list_type(name).ok_or_else(|| {
                            format!("`{name}` is not a list: active, auth, all or disks")
                        })
                    })
                    .await?;
                self.list(kind).await?;
            }
            Action::ListActive => self.list(ListType::ActiveVms).await?,
            Action::ListAuth => self.list(ListType::AuthenticatedVms).await?,
            Action::ListAll => self.list(ListType::AllVms).await?,
            Action::ListDisks => self.list(ListType::AllDisks).await?,
            Action::UpdateRam => {
                let prompt = format!("ram (MiB, {}): ", range(&limits::RAM));
                let ram = self.given_or_ask(args.first(), &prompt, ram).await?;
                let update = Update {
                    ram: Some(ram),
                    ..Update::default()
                };
                self.conn.run(&Op::Update(update)).await?;
            }
            Action::Update => {
                let op = self.update(&args).await?;
                self.conn.run(&op).await?;
            }
            Action::Logout => {
                self.conn.run(&Op::Logout).await?;
                self.vm = None;
                self.watching = false;
            }
            Action::Watch => {
                let (topics, since) = watch_args(&args).map_err(usage)?;
                self.conn.run(&Op::Watch { topics, since }).await?;
                self.watching = true;
            }
            Action::Unwatch => {
                self.conn.run(&Op::Unwatch).await?;
                self.watching = false;
            }
        }
        Ok(Flow::Continue)
    }

    /// Shows `kind` a page at a time: on a terminal, a screenful and then
    /// [`MORE`] while more follow; otherwise every page without asking.
    async fn list(&mut self, kind: ListType) -> Result<(), Abort> {
        let asking = self.input.interactive() && io::stdout().is_terminal();
        let size = page_size(self.input.rows());
        let mut after = None;
        while let Some(next) = pages::show(&mut self.conn, kind, Some(size), after).await? {
            if asking && !self.more().await? {
                break;
            }
            after = Some(next);
        }
        Ok(())
    }

    /// Whether to show the next page: anything but `q` (or Ctrl-C, Ctrl-D)
    /// at [`MORE`].
    async fn more(&mut self) -> Result<bool, Abort> {
        match self.ask(MORE).await {
            Ok(answer) => Ok(!matches!(
                answer.to_ascii_lowercase().as_str(),
                "q" | "quit"
            )),
            Err(Abort::Cancelled) => Ok(false),
            Err(abort) => Err(abort),
        }
    }

    /// Sends a raw line; keeps the prompt right when it authenticates or logs
    /// out, and notes when it starts or stops watching.
    async fn raw(&mut self, text: &str) -> Result<(), Abort> {
        let replies = self.conn.raw(text).await?;
        for reply in &replies {
            if !reply.is_success() {
                eprintln!("error: {}", Failure::from_reply(reply));
            }
        }
        if let ([reply], Ok(request)) = (replies.as_slice(), serde_json::from_str::<Value>(text))
            && reply.is_success()
        {
            match request.get("command").and_then(Value::as_str) {
                Some("authenticate") => self.vm = authenticated_vm(reply),
                Some("logout") => {
                    self.vm = None;
                    self.watching = false;
                }
                Some("watch") => self.watching = true,
                Some("unwatch") => self.watching = false,
                _ => {}
            }
        }
        Ok(())
    }

    /// `register [VM_ID RAM CPU [GIB...]]`: with all of VM_ID, RAM and CPU
    /// given, the disks are what follows them (maybe none); otherwise
    /// everything missing is asked for, then disks one per line up to an
    /// empty line. Each answer is checked as it comes; the password is
    /// asked twice.
    async fn registration(&mut self, args: &[&str]) -> Result<Op, Abort> {
        let prompt = format!(
            "vm_id (1 to {} of A-Z a-z 0-9 . _ -): ",
            limits::VM_ID_MAX_LEN
        );
        let vm_id = self.given_or_ask(args.first(), &prompt, vm_id).await?;
        let prompt = format!("ram (MiB, {}): ", range(&limits::RAM));
        let ram = self.given_or_ask(args.get(1), &prompt, ram).await?;
        let prompt = format!("cpu ({}): ", range(&limits::CPU));
        let cpu = self.given_or_ask(args.get(2), &prompt, cpu).await?;
        let mut disks = Vec::new();
        if args.len() >= 3 {
            for size in &args[3..] {
                disks.push(disk_size(size).map_err(usage)?);
            }
        } else {
            let prompt = format!(
                "disk size (GiB, {}; empty line = no more): ",
                range(&limits::DISK_SIZE)
            );
            while disks.len() < limits::MAX_DISKS {
                let size = self
                    .ask_until(&prompt, |text| unchanged_or(text, disk_size))
                    .await?;
                match size {
                    Some(size) => disks.push(size),
                    None => break,
                }
            }
        }
        let password = self.new_password(&vm_id).await?;
        let registration_secret = secrets::registration_secret();
        if registration_secret.is_some() {
            eprintln!("sending the registration secret from $VMM_REGISTRATION_SECRET");
        }
        Ok(Op::Register(Registration {
            vm_id,
            ram,
            cpu,
            password,
            disks,
            registration_secret,
        }))
    }

    /// A new VM's password: its length rule is in the prompt, one that
    /// breaks it is refused at once, and it is asked again to confirm (both
    /// again when the two differ). Never echoed, never in the history.
    async fn new_password(&mut self, vm_id: &str) -> Result<String, Abort> {
        let first = format!(
            "password for {vm_id} ({} characters): ",
            range(&limits::PASSWORD_LEN)
        );
        let again = format!("password for {vm_id} again: ");
        for _ in 0..TRIES {
            let password = self.password(&first).await?;
            if let Err(err) = params::password(&password) {
                eprintln!("{}", err.message);
                continue;
            }
            if self.password(&again).await? == password {
                return Ok(password);
            }
            eprintln!("the two passwords differ");
        }
        Err(refused())
    }

    /// `update_ram_cpu_disks [RAM CPU [CHANGE...]]`: like `register`, the
    /// changes are asked for one per line unless RAM and CPU were given.
    async fn update(&mut self, args: &[&str]) -> Result<Op, Abort> {
        let prompt = format!("ram (MiB, {}; empty = unchanged): ", range(&limits::RAM));
        let ram = self
            .given_or_ask(args.first(), &prompt, |text| unchanged_or(text, ram))
            .await?;
        let prompt = format!("cpu ({}; empty = unchanged): ", range(&limits::CPU));
        let cpu = self
            .given_or_ask(args.get(1), &prompt, |text| unchanged_or(text, cpu))
            .await?;
        let mut update = Update {
            ram,
            cpu,
            ..Update::default()
        };
        let mut changes = Vec::new();
        if args.len() >= 2 {
            for change in &args[2..] {
                changes.push(disk_change(change).map_err(usage)?);
            }
        } else {
            let prompt = format!(
                "disk (ID=SIZE resizes, +SIZE adds, SIZE in GiB {}; empty line = no more): ",
                range(&limits::DISK_SIZE)
            );
            while let Some(change) = self
                .ask_until(&prompt, |text| unchanged_or(text, disk_change))
                .await?
            {
                changes.push(change);
            }
        }
        for change in changes {
            match change {
                Change::Resize(id, size) => update.resize.push((id, size)),
                Change::Attach(size) => update.attach.push(size),
            }
        }
        Ok(Op::Update(update))
    }

    /// `given` checked by `check` (a usage error when it fails: it was
    /// typed on the command line, nothing to ask again), or else the answer
    /// to `prompt`, asked until `check` takes it.
    async fn given_or_ask<T>(
        &mut self,
        given: Option<&&str>,
        prompt: &str,
        check: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, Abort> {
        match given {
            Some(given) => check(given).map_err(usage),
            None => self.ask_until(prompt, check).await,
        }
    }

    /// Asks `prompt` until `check` takes the answer, saying why it did not;
    /// after [`TRIES`] refusals the command is dropped.
    async fn ask_until<T>(
        &mut self,
        prompt: &str,
        check: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, Abort> {
        for _ in 0..TRIES {
            let answer = self.ask(prompt).await?;
            match check(&answer) {
                Ok(value) => return Ok(value),
                Err(why) => eprintln!("{why}"),
            }
        }
        Err(refused())
    }

    /// The answer to a question, trimmed.
    async fn ask(&mut self, prompt: &str) -> Result<String, Abort> {
        let read = waiting(
            &mut self.conn,
            self.keepalive,
            self.watching,
            self.input.answer(prompt),
        )
        .await?;
        self.answered(read).map(|answer| answer.trim().to_owned())
    }

    /// A password, as typed (only the line ending is removed), asked with
    /// `prompt`: without echo on a terminal, never into the history.
    async fn password(&mut self, prompt: &str) -> Result<String, Abort> {
        let read = waiting(
            &mut self.conn,
            self.keepalive,
            self.watching,
            self.input.password(prompt),
        )
        .await?;
        self.answered(read)
    }

    fn answered(&self, read: io::Result<Read>) -> Result<String, Abort> {
        match read {
            Ok(Read::Line(line)) => Ok(line),
            Ok(Read::Interrupted) => Err(Abort::Cancelled),
            Ok(Read::Eof) if self.input.interactive() => Err(Abort::Cancelled),
            Ok(Read::Eof) => Err(Abort::Eof),
            Err(err) => Err(Abort::Input(err)),
        }
    }
}

/// Waits for `read` (an answer from the input thread), meanwhile sending a
/// keepalive ping over `conn` each time it has been idle for `keepalive`,
/// and, when `watching`, printing events as they arrive. `read` is polled
/// across the pings and events, never dropped, so no input is lost.
async fn waiting<T>(
    conn: &mut Conn,
    keepalive: Option<Duration>,
    watching: bool,
    read: impl Future<Output = T>,
) -> Result<T, Failure> {
    let mut read = std::pin::pin!(read);
    loop {
        let ping_at = keepalive.map(|idle| conn.idle_until(idle));
        tokio::select! {
            biased;
            value = &mut read => return Ok(value),
            () = sleep_until(ping_at) => conn.keepalive().await?,
            shown = conn.show_next_event(), if watching => shown?,
        }
    }
}

/// The VM a successful `authenticate` reply names.
fn authenticated_vm(reply: &vmm_core::Reply) -> Option<String> {
    reply
        .data
        .get("vm")
        .and_then(|vm| vm.get("vm_id"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn refused() -> Abort {
    usage(format!("{TRIES} answers refused; command dropped"))
}

/// `1 to 1024`: a range as prompts show it.
fn range<T: std::fmt::Display>(range: &std::ops::RangeInclusive<T>) -> String {
    format!("{} to {}", range.start(), range.end())
}

// The checks of typed values are vmm-core's own (`params`), so that the
// shell refuses at once exactly what the server would refuse after every
// question. Their messages never repeat the value.

fn vm_id(text: &str) -> Result<String, String> {
    params::vm_id(text)
        .map(|()| text.to_owned())
        .map_err(|err| err.message.into_owned())
}

fn whole(field: &str, text: &str) -> Result<i64, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("`{field}` must be a whole number"))
}

fn ram(text: &str) -> Result<u32, String> {
    params::ram(whole("ram", text)?).map_err(|err| err.message.into_owned())
}

fn cpu(text: &str) -> Result<u32, String> {
    params::cpu(whole("cpu", text)?).map_err(|err| err.message.into_owned())
}

fn disk_size(text: &str) -> Result<u32, String> {
    params::disk_size("disk_size", whole("disk_size", text)?)
        .map_err(|err| err.message.into_owned())
}

/// `None` for an empty answer or `-` (none, or leave it as it is), else
/// `check`ed.
fn unchanged_or<T>(
    text: &str,
    check: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, String> {
    if text.is_empty() || text == "-" {
        Ok(None)
    } else {
        check(text).map(Some)
    }
}

/// A disk change of `update_ram_cpu_disks`.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    /// `ID=SIZE`: resize disk ID.
    Resize(i64, u32),
    /// `+SIZE`: a new disk.
    Attach(u32),
}

fn disk_change(change: &str) -> Result<Change, String> {
    if let Some(size) = change.strip_prefix('+') {
        return disk_size(size).map(Change::Attach);
    }
    let resize = parse_resize(change)
        .map_err(|_| "a disk change is ID=SIZE (resize disk ID) or +SIZE (new disk)".to_owned())?;
    let size = params::disk_size("disk_size", i64::from(resize.size))
        .map_err(|err| err.message.into_owned())?;
    Ok(Change::Resize(resize.id, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_changes_parse() {
        assert_eq!(disk_change("1=150"), Ok(Change::Resize(1, 150)));
        assert_eq!(disk_change("+50"), Ok(Change::Attach(50)));
        for wrong in ["50", "+x", "1=", "+0", "1=0", "+9999999"] {
            assert!(disk_change(wrong).is_err(), "{wrong}");
        }
    }

    #[test]
    fn a_page_fills_the_terminal() {
        assert_eq!(page_size(None), UNKNOWN_HEIGHT);
        assert_eq!(page_size(Some(24)), 18);
        assert_eq!(page_size(Some(8)), 2);
        assert_eq!(page_size(Some(3)), 1);
        assert_eq!(page_size(Some(10_006)), 10_000);
        assert_eq!(page_size(Some(u16::MAX - 1)), MAX_PAGE);
    }

    #[test]
    fn lists_go_by_either_name() {
        assert_eq!(list_type("all"), Some(ListType::AllVms));
        assert_eq!(
            list_type("authenticated_vms"),
            Some(ListType::AuthenticatedVms)
        );
        assert_eq!(list_type("sideways"), None);
    }

    #[test]
    fn answers_are_checked_by_the_protocol_rules() {
        assert_eq!(ram(" 512 "), Ok(512));
        assert!(ram("-1").is_err() && ram("").is_err() && ram("0").is_err());
        assert!(ram("4194305").unwrap_err().contains("4194304"));
        assert_eq!(cpu("1024"), Ok(1024));
        assert!(cpu("1025").is_err());
        assert_eq!(disk_size("100"), Ok(100));
        assert!(vm_id("stalin").is_ok() && vm_id("no spaces").is_err());
        assert_eq!(unchanged_or("-", ram), Ok(None));
        assert_eq!(unchanged_or("", ram), Ok(None));
        assert_eq!(unchanged_or("64", ram), Ok(Some(64)));
    }

    #[test]
    fn help_lists_exactly_the_commands_that_run() {
        let help = help_text();
        assert!(help.lines().all(|line| line.len() <= 80), "{help}");
        for entry in COMMANDS {
            for name in entry.names {
                assert!(help.contains(name), "{name} is not in the help");
                if entry.action != Action::Raw {
                    let parsed = parse(name).map(|command| command.entry.action);
                    assert_eq!(parsed.ok(), Some(entry.action), "{name}");
                }
            }
        }
        let mut names: Vec<&str> = COMMANDS
            .iter()
            .flat_map(|entry| entry.names)
            .copied()
            .collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count, "a name used twice");
        // Server commands the shell has no entry for are not accepted.
        for name in ["update", "audit", "revoke", "send", "frobnicate"] {
            assert!(parse(name).is_err(), "{name}");
            assert!(!help.contains(&format!("\n  {name} ")), "{name}");
        }
        assert_eq!(
            parse(r#"{"command":"revoke"}"#)
                .map(|command| command.entry.action)
                .ok(),
            Some(Action::Raw)
        );
    }

    #[test]
    fn arguments_are_checked_before_anything_is_sent() {
        for good in [
            "ping",
            "register",
            "register vm1 512 2 100 200",
            "authenticate vm1",
            "list",
            "list disks",
            "update_ram 64",
            "update_ram_cpu_disks - 4 1=150 +50",
            "watch vms,sessions disks",
            "watch since 41",
            "watch vms since 0",
            "quit",
        ] {
            assert!(parse(good).is_ok(), "{good}");
        }
        for bad in [
            "ping now",
            "authenticate vm1 hunter22",
            "register vm1 512 hunter22",
            "list sideways",
            "update_ram lots",
            "update_ram_cpu_disks 1 2 hunter22",
            "watch everything",
            "watch since",
            "watch since -1",
            "watch since 4 vms",
            "watch vms since soon",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let unknown = parse("hunter22").unwrap_err();
        assert!(!unknown.contains("hunter22"), "{unknown}");
    }

    #[test]
    fn lines_with_secrets_are_not_remembered() {
        for kept in [
            "ping",
            "register",
            "authenticate vm1",
            "list_all",
            r#"{"command": "ping", "id": 1}"#,
            r#"{"command":"list","data":{"list_type":"all_vms"}} {"command":"ping"}"#,
        ] {
            assert!(remember(kept), "{kept}");
        }
        for secret in [
            r#"{"command":"authenticate","data":{"vm_id":"a","password":"hunter22"}}"#,
            r#"{"command":"authenticate","data":{"vm_id":"a","token":"t0k3n"}}"#,
            r#"{"command":"authenticate","data":{"admin_token":"t0k3n"}}"#,
            r#"{"command":"register","data":{"registration_secret":"s"}}"#,
            r#"{"a":[{"b":{"Password":"x"}}]}"#,
            r#"{"command":"ping"} {"data":{"pass\u0077ord":"x"}}"#,
            r#"{"command":"authenticate","data":{"password":"hunter22""#,
            "hunter22",
            "authenticate vm1 hunter22",
            "# my password is hunter22",
        ] {
            assert!(!remember(secret), "{secret}");
        }
    }
}
