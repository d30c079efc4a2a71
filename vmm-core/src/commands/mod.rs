//! The built-in commands, one module each. Every module submits its own
//! [`Command`](crate::registry::Command) to the registry; nothing here lists
//! them, and dispatch finds them by name.

mod audit;
mod authenticate;
mod help;
mod list;
mod logout;
pub(crate) mod ping;
mod register;
mod revoke;
mod stats;
mod update;
mod watch;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::protocol::{Data, ErrorCode};
use crate::secrets;
use crate::session::{Ended, Session};
use crate::store::{Authority, TokenCheck};

/// The reply to a request whose token, or whose session's token, is not
/// live. A revoked session has ended by then.
fn token_refused(check: TokenCheck) -> Error {
    let message = match check {
        TokenCheck::WrongToken => "the `token` given is not this session's token",
        _ => "this session's token was revoked or has expired: authenticate again",
    };
    Error::new(ErrorCode::NotAuthenticated, message)
}

/// The reply to a command that needs an authenticated session, on one that
/// is not. Where the client could be misled it says why: its token was
/// revoked or expired under it, or it sent a `token` on a connection that
/// never authenticated (a client that reconnected and kept its old token).
fn unauthenticated(session: &Session, data: &Data) -> Error {
    let message = match session.ended_by() {
        Some(Ended::Revoked) => "this session's token was revoked: authenticate again",
        Some(Ended::Expired) => "this session's token has expired: authenticate again",
        None if data.contains_key("token") => {
            "this connection has not authenticated: a `token` from another connection does \
             not authenticate it; send `authenticate` with `vm_id` and that `token` (or the \
             password) first"
        }
        None => return Error::not_authenticated(),
    };
    Error::new(ErrorCode::NotAuthenticated, message)
}

/// Checks a `token` given in a VM session's request against the live token
/// store (never against a copy the session holds): it must be the token of
/// the session's own family, unrevoked and unexpired. Without one, the
/// session's revocation listener has already applied any revocation.
async fn check_token(ctx: &Context, session: &mut Session, token: Option<&str>) -> Result<()> {
    let (Some(token), Some(login)) = (token, session.vm_login()) else {
        return Ok(());
    };
    let digest = secrets::digest(token);
    let authority = Authority {
        family: login.family(),
        token: Some(&digest),
    };
    match ctx.store.check_token(authority).await? {
        TokenCheck::Valid => Ok(()),
        TokenCheck::Revoked => {
            session.end(Ended::Revoked).await;
            Err(token_refused(TokenCheck::Revoked))
        }
        wrong => Err(token_refused(wrong)),
    }
}
