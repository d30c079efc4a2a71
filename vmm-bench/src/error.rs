//! One error type for the whole bench: a sentence for the person running it.

use std::fmt;

/// Why a workload (or the whole run) could not be measured. The text is
/// shown as it is, so it says what failed and, where it can, what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchError(pub String);

impl BenchError {
    pub fn new(message: impl Into<String>) -> BenchError {
        BenchError(message.into())
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

impl From<String> for BenchError {
    fn from(message: String) -> BenchError {
        BenchError(message)
    }
}

impl From<&str> for BenchError {
    fn from(message: &str) -> BenchError {
        BenchError(message.to_owned())
    }
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;
