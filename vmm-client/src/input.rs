//! The shell's input, read on a thread of its own so that blocking reads
//! (rustyline, rpassword, a pipe) never stall the async runtime.
//!
//! On a terminal, lines come from rustyline (editing, history in
//! `$VMM_HISTORY`, by default `$HOME/.vmm_history`) and passwords from
//! rpassword (no echo). Otherwise lines are read plainly from stdin, no
//! prompt is printed, a password is simply the next line, and there is no
//! history.
//!
//! The history is a file that outlives the session, so what goes into it is
//! the shell's decision, not the line editor's: only command lines (never
//! answers, never passwords), and of those only the ones the shell's
//! `remember` accepts (see [`Input::start`]). Lines it would refuse are also
//! dropped from a history file when it is loaded, so that one written before
//! that rule existed is cleaned on the next save.
//!
//! On a terminal the line editor also provides a printer for what arrives
//! while a line is being edited (change events after `watch`): it prints
//! above the prompt and redraws the prompt and the half-typed line; and the
//! terminal's height, which sizes the shell's pages of a long list.

use std::io::{self, BufRead, IsTerminal};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc;
use std::thread;

use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;
use rustyline::history::History;
use tokio::sync::oneshot;

use crate::out::Printer;
use crate::text::chomp;

/// What the shell asks the input thread for.
#[derive(Debug)]
enum Ask {
    /// A command line; goes into the history if the shell's `remember`
    /// accepts it.
    Command(String),
    /// The answer to a question (not kept in the history).
    Answer(String),
    /// A password: no echo on a terminal, never in the history.
    Password(String),
}

/// What came back.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    Line(String),
    /// Ctrl-C at a terminal prompt: drop the current line or command.
    Interrupted,
    /// Ctrl-D or the end of the piped input.
    Eof,
}

type Reply = oneshot::Sender<io::Result<Read>>;

pub struct Input {
    asks: Option<mpsc::Sender<(Ask, Reply)>>,
    thread: Option<thread::JoinHandle<()>>,
    interactive: bool,
    printer: Option<Printer>,
    /// The terminal's height in lines as the input thread last saw it;
    /// 0 when unknown (not a terminal). Kept here because the line editor,
    /// which can tell, lives on the input thread.
    rows: Arc<AtomicU16>,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Input")
            .field("interactive", &self.interactive)
            .field("printer", &self.printer.is_some())
            .finish_non_exhaustive()
    }
}

/// Whether a command line may be kept in the history file.
pub type Remember = fn(&str) -> bool;

impl Input {
    /// Starts the input thread: interactive when stdin is a terminal.
    /// `remember` decides which command lines are kept in the history.
    pub fn start(remember: Remember) -> Input {
        let interactive = io::stdin().is_terminal();
        let (asks, receiver) = mpsc::channel::<(Ask, Reply)>();
        let (printer_sender, printer) = mpsc::channel::<Option<Printer>>();
        let rows = Arc::new(AtomicU16::new(0));
        let seen = Arc::clone(&rows);
        let thread = thread::spawn(move || {
            let mut source = Source::new(interactive, remember);
            seen.store(source.rows(), Ordering::Relaxed);
            let _ = printer_sender.send(source.printer());
            while let Ok((ask, reply)) = receiver.recv() {
                let read = source.read(ask);
                // Measured after each line, so that the command just typed
                // sees the terminal as it is now (it may have been resized).
                seen.store(source.rows(), Ordering::Relaxed);
                // The shell may have stopped waiting; nothing to do then.
                let _ = reply.send(read);
            }
            source.finish();
        });
        // Only waits for the line editor to be set up.
        let printer = printer.recv().ok().flatten();
        Input {
            asks: Some(asks),
            thread: Some(thread),
            interactive,
            printer,
            rows,
        }
    }

    /// The terminal's height in lines, when stdin and stdout are a
    /// terminal whose size is known.
    pub fn rows(&self) -> Option<u16> {
        Some(self.rows.load(Ordering::Relaxed)).filter(|&rows| rows > 0)
    }

    /// The line editor's printer, when stdin and stdout are a terminal (once).
    pub fn printer(&mut self) -> Option<Printer> {
        self.printer.take()
    }

    /// Whether input comes from a person at a terminal.
    pub fn interactive(&self) -> bool {
        self.interactive
    }

    async fn ask(&self, ask: Ask) -> io::Result<Read> {
        let (reply, answer) = oneshot::channel();
        let gone = || io::Error::other("the input thread stopped");
        self.asks
            .as_ref()
            .ok_or_else(gone)?
            .send((ask, reply))
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    pub async fn command(&self, prompt: &str) -> io::Result<Read> {
        self.ask(Ask::Command(prompt.to_owned())).await
    }

    pub async fn answer(&self, prompt: &str) -> io::Result<Read> {
        self.ask(Ask::Answer(prompt.to_owned())).await
    }

    pub async fn password(&self, prompt: &str) -> io::Result<Read> {
        self.ask(Ask::Password(prompt.to_owned())).await
    }

    /// Stops the thread, which saves the history.
    pub async fn finish(mut self) {
        self.asks = None;
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

enum Source {
    Terminal(Terminal),
    Piped(io::StdinLock<'static>),
}

struct Terminal {
    /// `None` when rustyline could not be set up; plain reads are used then.
    editor: Option<Box<DefaultEditor>>,
    /// The history file, if any.
    history: Option<PathBuf>,
    remember: Remember,
    /// Entries were dropped from the loaded history: it must be written
    /// back even if nothing was added.
    scrubbed: bool,
}

/// The history file: `$VMM_HISTORY` (empty: none), else
/// `$HOME/.vmm_history`.
fn history_path() -> Option<PathBuf> {
    match std::env::var_os("VMM_HISTORY") {
        Some(path) if path.is_empty() => None,
        Some(path) => Some(PathBuf::from(path)),
        None => std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".vmm_history")),
    }
}

impl Source {
    fn new(interactive: bool, remember: Remember) -> Source {
        if !interactive {
            return Source::Piped(io::stdin().lock());
        }
        let history = history_path();
        let mut scrubbed = false;
        let editor = DefaultEditor::new().ok().map(|mut editor| {
            if let Some(path) = &history
                && editor.load_history(path).is_ok()
            {
                scrubbed = scrub(&mut editor, remember);
            }
            Box::new(editor)
        });
        Source::Terminal(Terminal {
            editor,
            history,
            remember,
            scrubbed,
        })
    }

    fn printer(&mut self) -> Option<Printer> {
        match self {
            Source::Terminal(Terminal {
                editor: Some(editor),
                ..
            }) => editor
                .create_external_printer()
                .ok()
                .map(|printer| Box::new(printer) as Printer),
            _ => None,
        }
    }

    /// The terminal's height, 0 when unknown. A terminal that reports no
    /// size (a fresh pseudo-terminal) reads as `u16::MAX`: unknown too.
    fn rows(&mut self) -> u16 {
        match self {
            Source::Terminal(Terminal {
                editor: Some(editor),
                ..
            }) => editor
                .dimensions()
                .map_or(0, |(_, rows)| if rows == u16::MAX { 0 } else { rows }),
            _ => 0,
        }
    }

    fn read(&mut self, ask: Ask) -> io::Result<Read> {
        match self {
            Source::Piped(stdin) => plain_line(stdin),
            Source::Terminal(Terminal {
                editor, remember, ..
            }) => match ask {
                Ask::Password(prompt) => match rpassword::prompt_password(prompt) {
                    Ok(password) => Ok(Read::Line(password)),
                    Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => Ok(Read::Eof),
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => Ok(Read::Interrupted),
                    Err(err) => Err(err),
                },
                Ask::Command(prompt) | Ask::Answer(prompt) if editor.is_none() => {
                    eprint!("{prompt}");
                    plain_line(&mut io::stdin().lock())
                }
                Ask::Command(prompt) => edited_line(editor, &prompt, Some(*remember)),
                Ask::Answer(prompt) => edited_line(editor, &prompt, None),
            },
        }
    }

    fn finish(self) {
        let Source::Terminal(Terminal {
            editor: Some(mut editor),
            history: Some(path),
            scrubbed,
            ..
        }) = self
        else {
            return;
        };
        // Not being able to save the history is no reason to complain.
        if scrubbed && editor.history().is_empty() {
            // rustyline writes nothing for an empty history; the file
            // still holds what was dropped from it.
            let _ = std::fs::write(&path, "");
        } else {
            let _ = editor.save_history(&path);
        }
    }
}

/// Drops the loaded history's entries that `remember` refuses; whether
/// there were any. The others are added again, which also makes rustyline
/// count them as new, so that the file is rewritten on save.
fn scrub(editor: &mut DefaultEditor, remember: Remember) -> bool {
    let entries: Vec<String> = editor.history().iter().cloned().collect();
    let kept: Vec<&String> = entries.iter().filter(|line| remember(line)).collect();
    if kept.len() == entries.len() {
        return false;
    }
    let _ = editor.clear_history();
    for line in kept {
        let _ = editor.add_history_entry(line.as_str());
    }
    true
}

fn plain_line(stdin: &mut impl BufRead) -> io::Result<Read> {
    let mut line = String::new();
    if stdin.read_line(&mut line)? == 0 {
        return Ok(Read::Eof);
    }
    Ok(Read::Line(chomp(line)))
}

/// A line from the line editor; kept in the history when `remember` is
/// given and accepts it.
fn edited_line(
    editor: &mut Option<Box<DefaultEditor>>,
    prompt: &str,
    remember: Option<Remember>,
) -> io::Result<Read> {
    let Some(editor) = editor else {
        return plain_line(&mut io::stdin().lock());
    };
    match editor.readline(prompt) {
        Ok(line) => {
            if remember.is_some_and(|remember| !line.trim().is_empty() && remember(&line)) {
                let _ = editor.add_history_entry(line.as_str());
            }
            Ok(Read::Line(line))
        }
        Err(ReadlineError::Interrupted) => Ok(Read::Interrupted),
        Err(ReadlineError::Eof) => Ok(Read::Eof),
        Err(ReadlineError::Io(err)) => Err(err),
        Err(err) => Err(io::Error::other(err)),
    }
}
