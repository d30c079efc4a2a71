//! The error a command returns. Each variant of [`ErrorCode`] is one protocol
//! error code, so what a handler returns is exactly what the client sees.

use std::borrow::Cow;
use std::fmt;

use crate::protocol::{Data, ErrorCode, Reply};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: ErrorCode,
    /// Shown to the client. Never built from request values, so that it cannot
    /// leak a password.
    pub message: Cow<'static, str>,
    /// The reply's `data`: `{}` but for the few errors that say more (such
    /// as `retry_after_ms`).
    pub data: Data,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Error {
        Error {
            code,
            message: message.into(),
            data: Data::new(),
        }
    }

    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Error {
        Error::new(ErrorCode::Forbidden, message)
    }

    pub fn invalid_params(message: impl Into<Cow<'static, str>>) -> Error {
        Error::new(ErrorCode::InvalidParams, message)
    }

    pub fn not_authenticated() -> Error {
        Error::new(
            ErrorCode::NotAuthenticated,
            "this command needs an authenticated session: run `authenticate` first",
        )
    }

    pub fn invalid_credentials() -> Error {
        Error::new(
            ErrorCode::InvalidCredentials,
            "unknown VM or wrong password",
        )
    }

    pub fn unavailable() -> Error {
        Error::new(
            ErrorCode::Unavailable,
            "the database is unreachable; try again shortly",
        )
    }

    pub fn internal() -> Error {
        Error::new(ErrorCode::Internal, "internal server error")
    }

    pub fn into_reply(self) -> Reply {
        let mut reply = Reply::error(self.code, self.message);
        reply.data = self.data;
        reply
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

/// A database error is `unavailable` when PostgreSQL could not be reached (or
/// went away mid-query), and `internal` when it answered with an error we did
/// not expect; the details of the latter go to the log, not to the client.
impl From<tokio_postgres::Error> for Error {
    fn from(err: tokio_postgres::Error) -> Error {
        use std::error::Error as _;
        if let Some(db) = err.as_db_error() {
            tracing::error!(code = db.code().code(), error = %db, "database error");
            Error::internal()
        } else if err.is_closed() || err.source().is_some_and(|s| s.is::<std::io::Error>()) {
            tracing::warn!(error = %err, "database unreachable");
            Error::unavailable()
        } else {
            // Encoding a parameter or decoding a row: a bug of ours.
            tracing::error!(error = %err, "database client error");
            Error::internal()
        }
    }
}

/// Not getting a connection at all (refused, timed out, or rejected while
/// logging in) means the database is unavailable to us.
impl From<deadpool_postgres::PoolError> for Error {
    fn from(err: deadpool_postgres::PoolError) -> Error {
        tracing::warn!(error = %err, "no database connection available");
        Error::unavailable()
    }
}
