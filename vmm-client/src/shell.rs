//! The interactive shell: one connection, one command per line, anything a
//! command lacks asked for. See [`HELP`] for the commands.
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
//!
//! Lists come a page at a time, so that a long one neither scrolls away nor
//! arrives in one huge reply: on a terminal a page fills the screen and the
//! shell asks before the next one ([`MORE`], read through the line editor
//! like any answer, so keepalive pings and events go on meanwhile).
//! Otherwise (stdin or stdout not a terminal) pages of [`UNKNOWN_HEIGHT`]
//! follow each other without a question.

use std::future::Future;
use std::io::{self, IsTerminal};
use std::str::FromStr;
use std::time::Duration;

use serde_json::Value;
use vmm_core::client::{Registration, Update};
use vmm_core::protocol::ListType;

use crate::args::parse_resize;
use crate::conn::{Conn, sleep_until};
use crate::failure::Failure;
use crate::input::{Input, Read};
use crate::op::Op;
use crate::{out, pages, secrets};

const HELP: &str = "\
Shell commands (arguments left out are asked for; passwords are always asked
for, without echo on a terminal, and read as the next line when piped):
  ping                                  check that the server answers
  register [VM_ID RAM CPU [GIB...]]     register a VM: RAM in MiB, disk sizes in GiB
  authenticate [VM_ID]                  authenticate this connection as a VM
  list [TYPE]                           list TYPE: active (open connections),
                                        auth (authenticated ones), all (every
                                        VM) or disks (every disk); on a
                                        terminal a page at a time (Enter: next
                                        page, q: stop)
  list_active                           list active
  list_auth                             list auth
  list_all                              list all
  list_all_disks                        list disks
  update_ram [RAM]                      change the RAM (MiB)
  update_ram_cpu_disks [RAM CPU [CHANGE...]]
                                        change RAM, CPUs and disks; CHANGE is
                                        ID=SIZE (resize disk ID) or +SIZE (new
                                        disk); RAM or CPU `-` leaves it as is
  logout                                end this connection's authentication
                                        (and stop watching)
  watch [TOPIC...]                      print change events as they happen, also
                                        while waiting for input; TOPIC is vms,
                                        sessions or disks (default: all)
  unwatch                               stop printing change events
  {...}                                 send a raw JSON request, print the reply
  help                                  this help, then the server's commands
  quit, exit, Ctrl-D                    leave";

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
    let mut input = Input::start();
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
        if line.starts_with('{') {
            self.raw(line).await?;
            return Ok(Flow::Continue);
        }
        let mut words = line.split_whitespace();
        let name = words.next().unwrap_or_default();
        let args: Vec<&str> = words.collect();
        let no_args = |args: &[&str]| {
            if args.is_empty() {
                Ok(())
            } else {
                Err(usage(format!("`{name}` takes no arguments")))
            }
        };
        match name {
            "quit" | "exit" => return Ok(Flow::Quit),
            "help" | "?" => {
                no_args(&args)?;
                if self.json {
                    eprintln!("{HELP}");
                } else {
                    out::line(format_args!("{HELP}\n\nServer commands:"));
                }
                self.conn.run(&Op::Help).await?;
            }
            "ping" => {
                no_args(&args)?;
                self.conn.run(&Op::Ping).await?;
            }
            "register" => {
                let op = self.registration(&args).await?;
                self.conn.run(&op).await?;
            }
            "authenticate" => {
                if args.len() > 1 {
                    return Err(usage(
                        "`authenticate` takes at most a VM id; the password is asked for",
                    ));
                }
                let vm_id = self.arg_or_ask(args.first(), "vm_id: ").await?;
                let password = self.password(&vm_id).await?;
                let reply = self.conn.run(&Op::Authenticate { vm_id, password }).await?;
                self.vm = authenticated_vm(&reply);
            }
            "list" => {
                if args.len() > 1 {
                    return Err(usage(
                        "`list` takes one argument: active, auth, all or disks",
                    ));
                }
                let name = self
                    .arg_or_ask(args.first(), "list (active, auth, all or disks): ")
                    .await?;
                let kind = list_type(&name).ok_or_else(|| {
                    usage(format!(
                        "`{name}` is not a list: active, auth, all or disks"
                    ))
                })?;
                self.list(kind).await?;
            }
            "list_active" | "list_auth" | "list_all" | "list_all_disks" => {
                no_args(&args)?;
                let kind = match name {
                    "list_active" => ListType::ActiveVms,
                    "list_auth" => ListType::AuthenticatedVms,
                    "list_all" => ListType::AllVms,
                    _ => ListType::AllDisks,
                };
                self.list(kind).await?;
            }
            "update_ram" => {
                if args.len() > 1 {
                    return Err(usage("`update_ram` takes one argument: RAM in MiB"));
                }
                let ram = self.arg_or_ask(args.first(), "ram (MiB): ").await?;
                let update = Update {
                    ram: Some(number("ram", &ram)?),
                    ..Update::default()
                };
                self.conn.run(&Op::Update(update)).await?;
            }
            "update_ram_cpu_disks" => {
                let op = self.update(&args).await?;
                self.conn.run(&op).await?;
            }
            "logout" => {
                no_args(&args)?;
                self.conn.run(&Op::Logout).await?;
                self.vm = None;
                self.watching = false;
            }
            "watch" => {
                // `watch vms sessions` and `watch vms,sessions` alike.
                let topics = args
                    .iter()
                    .flat_map(|arg| arg.split(','))
                    .filter(|topic| !topic.is_empty())
                    .map(str::to_owned)
                    .collect();
                self.conn.run(&Op::Watch(topics)).await?;
                self.watching = true;
            }
            "unwatch" => {
                no_args(&args)?;
                self.conn.run(&Op::Unwatch).await?;
                self.watching = false;
            }
            _ => {
                return Err(usage(format!(
                    "unknown command `{name}`; type `help` for the commands"
                )));
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
    /// empty line.
    async fn registration(&mut self, args: &[&str]) -> Result<Op, Abort> {
        let vm_id = self.arg_or_ask(args.first(), "vm_id: ").await?;
        let ram = number("ram", &self.arg_or_ask(args.get(1), "ram (MiB): ").await?)?;
        let cpu = number("cpu", &self.arg_or_ask(args.get(2), "cpu: ").await?)?;
        let mut disks = Vec::new();
        if args.len() >= 3 {
            for size in &args[3..] {
                disks.push(number("disk size", size)?);
            }
        } else {
            loop {
                let size = self.ask("disk size (GiB, empty line = no more): ").await?;
                if size.is_empty() {
                    break;
                }
                disks.push(number("disk size", &size)?);
            }
        }
        let password = self.password(&vm_id).await?;
        Ok(Op::Register(Registration {
            vm_id,
            ram,
            cpu,
            password,
            disks,
            registration_secret: secrets::registration_secret(),
        }))
    }

    /// `update_ram_cpu_disks [RAM CPU [CHANGE...]]`: like `register`, the
    /// changes are asked for one per line unless RAM and CPU were given.
    async fn update(&mut self, args: &[&str]) -> Result<Op, Abort> {
        let keep = |text: &str| text.is_empty() || text == "-";
        let ram = self
            .arg_or_ask(args.first(), "ram (MiB, empty = unchanged): ")
            .await?;
        let ram = if keep(&ram) {
            None
        } else {
            Some(number("ram", &ram)?)
        };
        let cpu = self
            .arg_or_ask(args.get(1), "cpu (empty = unchanged): ")
            .await?;
        let cpu = if keep(&cpu) {
            None
        } else {
            Some(number("cpu", &cpu)?)
        };
        let mut update = Update {
            ram,
            cpu,
            ..Update::default()
        };
        if args.len() >= 2 {
            for change in &args[2..] {
                disk_change(&mut update, change)?;
            }
        } else {
            loop {
                let change = self
                    .ask("disk (ID=SIZE resizes, +SIZE adds; empty line = no more): ")
                    .await?;
                if change.is_empty() {
                    break;
                }
                disk_change(&mut update, &change)?;
            }
        }
        Ok(Op::Update(update))
    }

    async fn arg_or_ask(&mut self, arg: Option<&&str>, prompt: &str) -> Result<String, Abort> {
        match arg {
            Some(arg) => Ok((*arg).to_owned()),
            None => self.ask(prompt).await,
        }
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

    /// A password, as typed (only the line ending is removed).
    async fn password(&mut self, vm_id: &str) -> Result<String, Abort> {
        let prompt = format!("password for {vm_id}: ");
        let read = waiting(
            &mut self.conn,
            self.keepalive,
            self.watching,
            self.input.password(&prompt),
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

fn number<T: FromStr>(what: &str, text: &str) -> Result<T, Abort> {
    text.trim()
        .parse()
        .map_err(|_| usage(format!("{what} must be a whole number, not `{text}`")))
}

/// Adds `ID=SIZE` (resize) or `+SIZE` (new disk) to `update`.
fn disk_change(update: &mut Update, change: &str) -> Result<(), Abort> {
    if let Some(size) = change.strip_prefix('+') {
        update.attach.push(number("disk size", size)?);
        return Ok(());
    }
    let resize = parse_resize(change).map_err(|_| {
        usage(format!(
            "`{change}` is neither ID=SIZE (resize disk ID) nor +SIZE (new disk)"
        ))
    })?;
    update.resize.push((resize.id, resize.size));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_changes_parse() {
        let mut update = Update::default();
        for change in ["1=150", "2=250", "+50"] {
            assert!(disk_change(&mut update, change).is_ok());
        }
        assert_eq!(update.resize, vec![(1, 150), (2, 250)]);
        assert_eq!(update.attach, vec![50]);
        assert!(disk_change(&mut update, "50").is_err());
        assert!(disk_change(&mut update, "+x").is_err());
        assert!(disk_change(&mut update, "1=").is_err());
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
    fn numbers_are_checked() {
        assert_eq!(number::<u32>("ram", " 512 ").ok(), Some(512));
        assert!(number::<u32>("ram", "-1").is_err());
        assert!(number::<u32>("ram", "").is_err());
    }
}
