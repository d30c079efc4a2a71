//! `authenticate`: makes the connection's session act as a VM (or as an
//! operator). Any successful `authenticate` replaces who the session is,
//! completely, exactly as on a fresh connection: VM to VM, VM to operator,
//! operator to VM. A failed one leaves the session as it was.
//!
//! ```text
//! -> {"command": "authenticate", "data": {"vm_id": "stalin", "password": "securePass123"}}
//! <- {"status":"success","message":"authenticated as stalin","data":{"vm":{...},
//!     "token":"...","token_expires_at":"..."}}
//! ```
//!
//! An unknown VM and a wrong password give the same `invalid_credentials`
//! reply, and take the same time: an unknown VM is checked against a dummy
//! hash.
//!
//! Attempts are throttled per `vm_id` and per client address, in the
//! database so that it holds across instances. Each attempt reserves its
//! place before any password is checked (one statement), so attempts that
//! race on many connections count as they start: at most 5 run or fail
//! without a 5-minute pause, then the key is blocked for 30 s, doubling with
//! each further attempt up to 15 minutes. While a key is blocked the reply
//! is `too_many_attempts` with `data.retry_after_ms`, and no hash is spent.
//! A success gives its reservation back and clears the VM's count (not the
//! address's).
//!
//! A successful password login returns a session `token` (256 random bits,
//! base64url; stored only as its SHA-256 digest) valid for `--token-ttl`.
//! The token names a session family: `{"vm_id", "token"}` instead of a
//! password resumes a session of that family after a reconnect, with no
//! hashing. When the token is revoked (a `logout` by any of its sessions, an
//! operator's `revoke`) or expires, every session of the family ends, on
//! every instance; an unknown, revoked or expired token is
//! `not_authenticated`.

use serde::Deserialize;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::password::Verified;
use crate::protocol::{Data, ErrorCode, Timestamp};
use crate::registry::{Command, HandlerFuture, Success};
use crate::session::{Session, VmLogin};
use crate::store::Refused;
use crate::{params, secrets};

inventory::submit! {
    Command { name: "authenticate", summary: "authenticate this connection as a VM with its password", handler }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    vm_id: Option<String>,
    password: Option<String>,
    token: Option<String>,
    admin_token: Option<String>,
}

fn handler<'a>(ctx: &'a Context, session: &'a mut Session, data: Data) -> HandlerFuture<'a> {
    Box::pin(async move {
        let p: Params = params::parse(data)?;
        if let Some(admin_token) = p.admin_token {
            if p.vm_id.is_some() || p.password.is_some() || p.token.is_some() {
                return Err(Error::invalid_params(
                    "`admin_token` goes alone: an operator session is not a VM",
                ));
            }
            return as_operator(ctx, session, &admin_token).await;
        }
        let vm_id = p
            .vm_id
            .ok_or_else(|| Error::invalid_params("`vm_id` is required"))?;
        params::vm_id(&vm_id)?;
        match (p.password, p.token) {
            (Some(password), None) => with_password(ctx, session, vm_id, password).await,
            (None, Some(token)) => with_token(ctx, session, vm_id, &token).await,
            _ => Err(Error::invalid_params(
                "give either `password` or `token` (from an earlier authenticate)",
            )),
        }
    })
}

async fn with_password(
    ctx: &Context,
    session: &mut Session,
    vm_id: String,
    password: String,
) -> Result<Success> {
    params::password(&password)?;
    let vm_key = format!("vm:{vm_id}");
    let keys = [vm_key.clone(), format!("ip:{}", session.peer_ip())];
    let throttle = &ctx.config.throttle;
    let reservation = ctx
        .store
        .reserve_login(Some(&vm_id), &keys, throttle)
        .await?;
    if let Some(refused) = reservation.refused {
        return Err(throttled(ctx, session, Some(&vm_id), &refused).await);
    }
    // The attempt now holds a place under both keys: a failure keeps it,
    // anything else gives it back.
    let result = password_login(ctx, session, &vm_id, password, reservation.password_hash).await;
    let settled = match &result {
        Err(err) if err.code == ErrorCode::InvalidCredentials => {
            ctx.store.login_failed(&keys, throttle).await
        }
        Ok(_) => ctx.store.release_login(&keys, Some(&vm_key)).await,
        Err(_) => ctx.store.release_login(&keys, None).await,
    };
    if let Err(err) = settled {
        tracing::warn!(error = %err, "could not settle a login reservation");
    }
    result
}

async fn password_login(
    ctx: &Context,
    session: &mut Session,
    vm_id: &str,
    password: String,
    hash: Option<String>,
) -> Result<Success> {
    match ctx.passwords.verify(password, hash).await? {
        Verified::No => {
            tracing::info!(vm_id = %vm_id, "authentication failed");
            let detail = "wrong password or unknown VM";
            ctx.audit(session, Some(vm_id), "authenticate", "failure", detail)
                .await;
            return Err(Error::invalid_credentials());
        }
        Verified::Yes => {}
        Verified::YesRehashed(hash) => {
            ctx.store.set_password_hash(vm_id, &hash).await?;
            tracing::info!(vm_id = %vm_id, "password re-hashed with the current argon2 parameters");
        }
    }
    let no_randomness = || {
        tracing::error!("no randomness for a session token");
        Error::internal()
    };
    let token = secrets::new_token().ok_or_else(no_randomness)?;
    let family = secrets::new_family().ok_or_else(no_randomness)?;
    let digest = secrets::digest(&token);
    // Listening for the family's revocation before the token exists.
    let login = ctx.sessions.enroll(family);
    let expires_at = ctx
        .store
        .issue_token(vm_id, &digest, family, ctx.config.token_ttl)
        .await?;
    let success = enter(ctx, session, vm_id, login.expire_at(expires_at), false).await?;
    ctx.audit(session, Some(vm_id), "authenticate", "success", "password")
        .await;
    success
        .with("token", token)?
        .with("token_expires_at", Timestamp(expires_at))
}

/// Resumes a session of the family of a token from an earlier
/// `authenticate`: no password, no hashing.
async fn with_token(
    ctx: &Context,
    session: &mut Session,
    vm_id: String,
    token: &str,
) -> Result<Success> {
    let digest = secrets::digest(token);
    let Some(grant) = ctx.store.find_token(&vm_id, &digest).await? else {
        return Err(token_refused(ctx, session, &vm_id).await);
    };
    let login = ctx
        .sessions
        .enroll(grant.family)
        .expire_at(grant.expires_at);
    let success = match enter(ctx, session, &vm_id, login, true).await {
        Err(err) if err.code == ErrorCode::NotAuthenticated => {
            return Err(token_refused(ctx, session, &vm_id).await);
        }
        other => other?,
    };
    ctx.audit(session, Some(&vm_id), "authenticate", "success", "token")
        .await;
    success.with("token_expires_at", Timestamp(grant.expires_at))
}

async fn token_refused(ctx: &Context, session: &Session, vm_id: &str) -> Error {
    tracing::info!(vm_id = %vm_id, "token refused");
    let detail = "unknown, revoked or expired token";
    ctx.audit(session, Some(vm_id), "authenticate", "failure", detail)
        .await;
    Error::new(
        ErrorCode::NotAuthenticated,
        "the token is unknown, revoked or expired: authenticate with the password",
    )
}

/// Opens an operator session with the admin token. Attempts are throttled
/// by the client's address like passwords.
async fn as_operator(ctx: &Context, session: &mut Session, admin_token: &str) -> Result<Success> {
    let keys = [format!("ip:{}", session.peer_ip())];
    let throttle = &ctx.config.throttle;
    let reservation = ctx.store.reserve_login(None, &keys, throttle).await?;
    if let Some(refused) = reservation.refused {
        return Err(throttled(ctx, session, None, &refused).await);
    }
    let valid = ctx
        .config
        .admin_token
        .as_deref()
        .is_some_and(|expected| secrets::same(admin_token, expected));
    if !valid {
        tracing::info!("operator authentication failed");
        ctx.store.login_failed(&keys, throttle).await?;
        ctx.audit(session, None, "authenticate", "failure", "operator")
            .await;
        return Err(Error::invalid_credentials());
    }
    let entered = session.become_operator().await;
    if let Err(err) = ctx.store.release_login(&keys, None).await {
        tracing::warn!(error = %err, "could not release a login reservation");
    }
    entered?;
    tracing::info!("operator session opened");
    ctx.audit(session, None, "authenticate", "success", "operator")
        .await;
    Ok(Success::new("operator session"))
}

/// The reply to an attempt a throttling key refused, audited once per
/// address and reason (repeats coalesce).
pub(super) async fn throttled(
    ctx: &Context,
    session: &Session,
    vm_id: Option<&str>,
    refused: &Refused,
) -> Error {
    let (whose, vm_id, action) = match refused.key.split_once(':') {
        Some(("vm", _)) => ("this VM", vm_id, "authenticate"),
        Some(("enroll", _)) => ("your address", None, "register"),
        _ => ("your address", None, "authenticate"),
    };
    let detail = match (refused.blocked, whose) {
        (true, "this VM") => "VM blocked after failures",
        (true, _) => "address blocked after failures",
        (false, "this VM") => "VM busy: attempts running",
        (false, _) => "address busy: attempts running",
    };
    tracing::debug!(
        key = whose,
        retry_after_ms = refused.retry_after_ms,
        detail,
        "attempt throttled"
    );
    ctx.audit(session, vm_id, action, "throttled", detail).await;
    let seconds = (refused.retry_after_ms + 999) / 1000;
    let message = if refused.blocked {
        format!("too many failed attempts from {whose}; try again in {seconds} s")
    } else {
        format!("too many attempts from {whose} at once; try again in {seconds} s")
    };
    let mut err = Error::new(ErrorCode::TooManyAttempts, message);
    err.data
        .insert("retry_after_ms".into(), refused.retry_after_ms.into());
    // Which block it is, for a client to act on: waiting out a VM's block
    // helps that VM only, an address's block stops every VM behind it.
    let scope = if whose == "this VM" { "vm" } else { "address" };
    err.data.insert("scope".into(), scope.into());
    err
}

/// Makes the session act as `vm_id`, once its credentials are checked. With
/// `by_token`, the login's family must still be live when the VM is read
/// (else `not_authenticated`): a revocation committed before that is seen
/// here, one committed after it reaches the login, which is listening.
async fn enter(
    ctx: &Context,
    session: &mut Session,
    vm_id: &str,
    login: VmLogin,
    by_token: bool,
) -> Result<Success> {
    // The VM this connection leaves (if it switches) was last seen now.
    if let Some(previous) = session.vm_id().filter(|previous| *previous != vm_id) {
        ctx.store.touch(previous).await?;
    }
    let family = by_token.then_some(login.family());
    let Some(vm) = ctx.store.vm_for_login(vm_id, family).await? else {
        return Err(if by_token {
            Error::not_authenticated()
        } else {
            Error::invalid_credentials()
        });
    };
    session.become_vm(&vm.vm_id, login).await?;
    tracing::info!(vm_id = %vm.vm_id, "authenticated");
    Success::new(format!("authenticated as {}", vm.vm_id)).with("vm", vm)
}
