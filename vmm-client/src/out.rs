//! Writing to stdout without panicking when it is closed early, as in
//! `vmm-client --json list all | head -1`; and the type of the line editor's
//! printer, the other way output goes. That type is here, below both, so
//! that the shell's input thread (which makes one) and the event printer
//! (which prints through it) need not know each other.

use std::fmt::Display;
use std::io::{self, Write};
use std::process;

use rustyline::ExternalPrinter;

/// Prints above the line being edited and redraws the prompt; the shell's
/// input thread makes one when stdin and stdout are a terminal.
pub type Printer = Box<dyn ExternalPrinter + Send>;

/// Prints `text` and a newline. A reader that went away (broken pipe) ends
/// the program quietly with 0; any other write error ends it with 2.
pub fn line(text: impl Display) {
    write(format_args!("{text}\n"));
}

/// Prints `text` as it is, without a newline: a part of a line written a
/// piece at a time (a list streamed page by page). Like [`line`] otherwise.
pub fn part(text: &str) {
    write(format_args!("{text}"));
}

fn write(text: std::fmt::Arguments<'_>) {
    let mut stdout = io::stdout().lock();
    let written = stdout.write_fmt(text).and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => process::exit(0),
        Err(err) => {
            eprintln!("error: cannot write to stdout: {err}");
            process::exit(2);
        }
    }
}
