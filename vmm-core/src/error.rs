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

/// Why a database call failed, by cause: the database was not there, a
/// rule of the schema said no, or something is wrong with our own code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbCause {
    /// The database cannot serve us now: unreachable, shutting down or
    /// restarting, terminated our connection, out of resources, or is a
    /// read-only standby. Retrying later can succeed.
    Unavailable,
    /// More disks than a VM may have (the `disks_per_vm` trigger).
    DiskLimit,
    /// Anything else: an error that our statements should never cause.
    Bug,
}

impl DbCause {
    /// The cause of an error reported by the server, from its SQLSTATE
    /// (and, for our own rules, the constraint it names).
    pub fn of_sqlstate(code: &str, constraint: Option<&str>) -> DbCause {
        if constraint == Some("disks_per_vm") {
            return DbCause::DiskLimit;
        }
        match code.get(..2) {
            // 08 connection exception, 53 insufficient resources (too many
            // connections, disk full, out of memory), 57 operator
            // intervention (admin or crash shutdown, cannot connect now,
            // query cancelled, database dropped), 58 system error (I/O).
            Some("08" | "53" | "57" | "58") => DbCause::Unavailable,
            // A failover left us on a standby.
            _ if code == "25006" => DbCause::Unavailable,
            _ => DbCause::Bug,
        }
    }

    /// The cause of a client-side error. tokio-postgres exposes no kind, so
    /// the errors that are ours (encoding a parameter, decoding a column, a
    /// wrong row count) are told by their fixed messages; every other one
    /// (I/O, closed, timeout, connecting, authentication, protocol) means
    /// the connection to the database is not usable.
    fn of_client_error(err: &tokio_postgres::Error) -> DbCause {
        if let Some(db) = err.as_db_error() {
            return DbCause::of_sqlstate(db.code().code(), db.constraint());
        }
        let text = err.to_string();
        let ours = [
            "error serializing parameter",
            "error deserializing column",
            "invalid column",
            "expected ",
            "query returned an unexpected number of",
            "error encoding message",
            "invalid connection string",
            "invalid configuration",
        ];
        if ours.iter().any(|prefix| text.starts_with(prefix)) {
            DbCause::Bug
        } else {
            DbCause::Unavailable
        }
    }
}

/// A database error becomes the reply its cause calls for; the details go to
/// the log, never to the client.
impl From<tokio_postgres::Error> for Error {
    fn from(err: tokio_postgres::Error) -> Error {
        match DbCause::of_client_error(&err) {
            DbCause::Unavailable => {
                tracing::warn!(error = %err, "database unavailable");
                Error::unavailable()
            }
            DbCause::DiskLimit => Error::invalid_params(format!(
                "`disks`: a VM has at most {} disks",
                crate::protocol::limits::MAX_DISKS
            )),
            DbCause::Bug => {
                match err.as_db_error() {
                    Some(db) => {
                        tracing::error!(code = db.code().code(), error = %db, "database error")
                    }
                    None => tracing::error!(error = %err, "database client error"),
                }
                Error::internal()
            }
        }
    }
}

/// Not getting a connection at all (refused, timed out, the pool closed, or
/// the connection rejected while logging in) means the database is
/// unavailable to us; only a misconfigured pool is a bug.
impl From<deadpool_postgres::PoolError> for Error {
    fn from(err: deadpool_postgres::PoolError) -> Error {
        use deadpool_postgres::PoolError;
        match err {
            PoolError::Backend(err) => Error::from(err),
            PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
                tracing::error!(error = %err, "database pool misconfigured");
                Error::internal()
            }
            PoolError::Timeout(_) | PoolError::Closed => {
                tracing::warn!(error = %err, "no database connection available");
                Error::unavailable()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_by_class() {
        for code in [
            "08006", "08001", "53300", "53100", "57P01", "57P02", "57P03", "57014", "58030",
            "25006",
        ] {
            assert_eq!(
                DbCause::of_sqlstate(code, None),
                DbCause::Unavailable,
                "{code}"
            );
        }
        for code in [
            "23505", "23514", "42P01", "22003", "40P01", "XX000", "P0001",
        ] {
            assert_eq!(DbCause::of_sqlstate(code, None), DbCause::Bug, "{code}");
        }
        assert_eq!(
            DbCause::of_sqlstate("23514", Some("disks_per_vm")),
            DbCause::DiskLimit
        );
    }
}
