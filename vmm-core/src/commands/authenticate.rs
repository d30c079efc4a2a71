//! `authenticate`: makes the connection's session act as a VM. An already
//! authenticated session switches to the new VM.
//!
//! ```text
//! -> {"command": "authenticate", "data": {"vm_id": "stalin", "password": "securePass123"}}
//! <- {"status":"success","message":"authenticated as stalin","data":{"vm":{...}}}
//! ```
//!
//! An unknown VM and a wrong password give the same `invalid_credentials`
//! reply, and take the same time: an unknown VM is checked against a dummy
//! hash.
//!
//! Failed attempts are counted per `vm_id` and per client address, in the
//! database so that it holds across instances. After 5 failures with no
//! 5-minute pause, a key is blocked for 30 s, doubling with each further
//! failure up to 15 minutes; while either key is blocked the reply is
//! `too_many_attempts` with `data.retry_after_ms`, and no hash is spent. A
//! success clears the VM's count (not the address's).
//!
//! A successful password login returns a session `token` (256 random bits,
//! base64url; stored only as its SHA-256 digest) valid for `--token-ttl`.
//! `{"vm_id", "token"}` instead of a password resumes a session after a
//! reconnect, with no hashing; an unknown, revoked (by `logout`) or expired
//! token is `not_authenticated`.

use serde::Deserialize;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::password::Verified;
use crate::protocol::{Data, ErrorCode, Timestamp};
use crate::registry::{Command, HandlerFuture, Success};
use crate::session::Session;
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
    let state = ctx.store.login_state(&vm_id, &keys).await?;
    if let Some(retry_after_ms) = state.retry_after_ms {
        tracing::info!(vm_id = %vm_id, retry_after_ms, "authentication throttled");
        ctx.audit(session, Some(&vm_id), "authenticate", "throttled", "")
            .await;
        return Err(throttled(retry_after_ms));
    }
    match ctx.passwords.verify(password, state.password_hash).await? {
        Verified::No => {
            tracing::info!(vm_id = %vm_id, "authentication failed");
            ctx.store
                .record_failure(&keys, &ctx.config.throttle)
                .await?;
            let detail = "wrong password or unknown VM";
            ctx.audit(session, Some(&vm_id), "authenticate", "failure", detail)
                .await;
            return Err(Error::invalid_credentials());
        }
        Verified::Yes => {}
        Verified::YesRehashed(hash) => {
            ctx.store.set_password_hash(&vm_id, &hash).await?;
            tracing::info!(vm_id = %vm_id, "password re-hashed with the current argon2 parameters");
        }
    }
    let token = secrets::new_token().ok_or_else(|| {
        tracing::error!("no randomness for a session token");
        Error::internal()
    })?;
    let digest = secrets::digest(&token);
    let expires_at = ctx
        .store
        .issue_token(&vm_id, &digest, ctx.config.token_ttl)
        .await?;
    let success = enter(ctx, session, &vm_id).await?;
    session.set_token(digest, expires_at);
    if state.has_failures {
        ctx.store.clear_failures(&vm_key).await?;
    }
    ctx.audit(session, Some(&vm_id), "authenticate", "success", "password")
        .await;
    success
        .with("token", token)?
        .with("token_expires_at", Timestamp(expires_at))
}

/// Resumes a session with a token from an earlier `authenticate`: no
/// password, no hashing.
async fn with_token(
    ctx: &Context,
    session: &mut Session,
    vm_id: String,
    token: &str,
) -> Result<Success> {
    let digest = secrets::digest(token);
    let Some(expires_at) = ctx.store.token_expiry(&vm_id, &digest).await? else {
        tracing::info!(vm_id = %vm_id, "token refused");
        ctx.audit(
            session,
            Some(&vm_id),
            "authenticate",
            "failure",
            "unknown, revoked or expired token",
        )
        .await;
        return Err(Error::new(
            ErrorCode::NotAuthenticated,
            "the token is unknown, revoked or expired: authenticate with the password",
        ));
    };
    let success = enter(ctx, session, &vm_id).await?;
    session.set_token(digest, expires_at);
    ctx.audit(session, Some(&vm_id), "authenticate", "success", "token")
        .await;
    success.with("token_expires_at", Timestamp(expires_at))
}

/// Opens an operator session with the admin token. Failures count against
/// the client's address like wrong passwords.
async fn as_operator(ctx: &Context, session: &mut Session, admin_token: &str) -> Result<Success> {
    let keys = [format!("ip:{}", session.peer_ip())];
    let state = ctx.store.login_state("", &keys).await?;
    if let Some(retry_after_ms) = state.retry_after_ms {
        ctx.audit(session, None, "authenticate", "throttled", "operator")
            .await;
        return Err(throttled(retry_after_ms));
    }
    let valid = ctx
        .config
        .admin_token
        .as_deref()
        .is_some_and(|expected| secrets::same(admin_token, expected));
    if !valid {
        tracing::info!("operator authentication failed");
        ctx.store
            .record_failure(&keys, &ctx.config.throttle)
            .await?;
        ctx.audit(session, None, "authenticate", "failure", "operator")
            .await;
        return Err(Error::invalid_credentials());
    }
    session.become_operator().await?;
    tracing::info!("operator session opened");
    ctx.audit(session, None, "authenticate", "success", "operator")
        .await;
    Ok(Success::new("operator session"))
}

fn throttled(retry_after_ms: i64) -> Error {
    let mut err = Error::new(
        ErrorCode::TooManyAttempts,
        format!(
            "too many failed attempts; try again in {} s",
            (retry_after_ms + 999) / 1000
        ),
    );
    err.data
        .insert("retry_after_ms".into(), retry_after_ms.into());
    err
}

/// Makes the session act as `vm_id`, once its credentials are checked.
async fn enter(ctx: &Context, session: &mut Session, vm_id: &str) -> Result<Success> {
    // The VM this connection leaves (if it switches) was last seen now.
    let mut seen = vec![vm_id];
    seen.extend(session.vm_id().filter(|previous| *previous != vm_id));
    ctx.store.touch(&seen).await?;
    let Some(vm) = ctx.store.vm(vm_id).await? else {
        return Err(Error::invalid_credentials());
    };
    session.authenticate(&vm.vm_id).await?;
    tracing::info!(vm_id = %vm.vm_id, "authenticated");
    Success::new(format!("authenticated as {}", vm.vm_id)).with("vm", vm)
}
