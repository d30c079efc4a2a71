//! Why a run did not succeed, and the exit code of each kind of failure; and
//! the text of an I/O error for such messages. It sits at the bottom of the
//! crate because every layer fails: reading a password, connecting, the
//! server's error replies, the shell and the agent.

use std::fmt;
use std::io;

use vmm_core::{ErrorCode, Reply};

/// Why a command did not succeed. Each kind has its own exit code.
#[derive(Debug)]
pub enum Failure {
    /// Bad arguments or input noticed on this side: exit 2.
    Usage(String),
    /// The server answered with an error reply: exit 1.
    Server {
        message: String,
        code: Option<ErrorCode>,
    },
    /// Cannot connect, the connection was lost, or the server's reply made no
    /// sense: exit 3.
    Connection(String),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Server { .. } => 1,
            Failure::Usage(_) => 2,
            Failure::Connection(_) => 3,
        }
    }

    /// The failure an error reply stands for.
    pub fn from_reply(reply: &Reply) -> Failure {
        Failure::Server {
            message: reply.message.clone(),
            code: reply.code,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Usage(message) | Failure::Connection(message) => f.write_str(message),
            Failure::Server {
                message,
                code: Some(code),
            } => write!(f, "{message} ({code})"),
            Failure::Server {
                message,
                code: None,
            } => f.write_str(message),
        }
    }
}

/// An I/O error's text without the trailing ` (os error N)`.
pub fn describe(err: &io::Error) -> String {
    let text = err.to_string();
    match err.raw_os_error() {
        Some(code) => text
            .strip_suffix(&format!(" (os error {code})"))
            .map_or_else(|| text.clone(), str::to_owned),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_error_suffix_is_dropped() {
        let err = io::Error::from_raw_os_error(111);
        assert!(!describe(&err).contains("os error"), "{}", describe(&err));
    }
}
