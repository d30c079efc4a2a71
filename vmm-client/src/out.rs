//! Writing to stdout without panicking when it is closed early, as in
//! `vmm-client --json list all | head -1`.

use std::fmt::Display;
use std::io::{self, Write};
use std::process;

/// Prints `text` and a newline. A reader that went away (broken pipe) ends
/// the program quietly with 0; any other write error ends it with 2.
pub fn line(text: impl Display) {
    let mut stdout = io::stdout().lock();
    let written = writeln!(stdout, "{text}").and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => process::exit(0),
        Err(err) => {
            eprintln!("error: cannot write to stdout: {err}");
            process::exit(2);
        }
    }
}
