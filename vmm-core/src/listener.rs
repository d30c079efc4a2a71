//! The one connection per instance that LISTENs for what every instance
//! publishes with NOTIFY: change events, for the watchers (see
//! [`crate::events`]), and token revocations, which end this instance's
//! sessions of the revoked tokens.
//!
//! Events that happen while the listening connection is down are not lost:
//! it reconnects with backoff, then reads what it missed from the event log
//! (migration V9) and passes it on before the live events, skipping those
//! it had already passed. Revocations are not lost either: after each
//! (re)connect the tokens of this instance's sessions are checked.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::context::Context;
use crate::events::{CHANNEL, Event, WATCHER_BACKLOG};
use crate::task::AbortOnDrop;

/// The event that tells every instance which token families were revoked
/// (migration V7); for the sessions, never for watchers.
const REVOKED: &str = "tokens_revoked";

/// Ends this instance's sessions of the revoked families.
fn revoke(context: &Context, event: &Event) {
    #[derive(Deserialize)]
    struct Revoked {
        data: Families,
    }
    #[derive(Deserialize)]
    struct Families {
        families: Vec<i64>,
    }
    let line = event.line.trim_end();
    match serde_json::from_str::<Revoked>(line) {
        Ok(revoked) => {
            let told = context.sessions.revoke(&revoked.data.families);
            if told > 0 {
                tracing::info!(sessions = told, "token revoked: ending its sessions");
            }
        }
        Err(_) => tracing::warn!("ignoring a malformed revocation"),
    }
}

/// Revocations committed while this instance was not listening reached no
/// one here: after (re)connecting, the families of its VM sessions are
/// checked against the token store, in one query, and the dead ones end.
async fn revoke_missed(context: &Context) {
    let families = context.sessions.live_families();
    if families.is_empty() {
        return;
    }
    match context.store.live_families(&families).await {
        Ok(live) => {
            let live: std::collections::HashSet<i64> = live.into_iter().collect();
            let dead: Vec<i64> = families.into_iter().filter(|f| !live.contains(f)).collect();
            let told = context.sessions.revoke(&dead);
            if told > 0 {
                tracing::info!(
                    sessions = told,
                    "tokens revoked while not listening: ending their sessions"
                );
            }
        }
        Err(err) => tracing::warn!(error = %err, "cannot check for missed revocations"),
    }
}

/// Listens for events until dropped, reconnecting when the connection fails.
pub(crate) fn listen(context: Arc<Context>) -> AbortOnDrop {
    AbortOnDrop::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        // The `seq` of the last event passed on, once known.
        let mut last = None;
        loop {
            let result = relay(&context, &mut last).await;
            context.events.listening.send_replace(false);
            match result {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(err) => {
                    tracing::warn!(error = %err, "event listener disconnected; catching up from the event log once it is back");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

/// Events read from the log at once when catching up.
const CATCH_UP_PAGE: i64 = 1000;

/// Passes on the logged events after `last`, up to the latest; on the first
/// connection, only notes where the log stands.
async fn catch_up(context: &Context, last: &mut Option<i64>) -> crate::error::Result<()> {
    let Some(mut after) = *last else {
        *last = Some(context.store.event_log().await?.latest);
        return Ok(());
    };
    let mut passed = 0usize;
    loop {
        let Some(page) = context.store.events_after(after, CATCH_UP_PAGE).await? else {
            let latest = context.store.event_log().await?.latest;
            tracing::warn!(
                after,
                latest,
                "events were pruned from the log before this instance could pass them on; \
                 its watchers missed them"
            );
            *last = Some(latest);
            return Ok(());
        };
        let done = (page.len() as i64) < CATCH_UP_PAGE;
        for event in page {
            after = event.seq;
            passed += 1;
            drop(context.events.sender.send(event));
        }
        *last = Some(after);
        if done {
            if passed > 0 {
                tracing::info!(
                    events = passed,
                    "passed on the events missed while not listening"
                );
            }
            return Ok(());
        }
    }
}

/// One listening connection's life: LISTEN, catch up from the log, then
/// forward every notification.
async fn relay(context: &Context, last: &mut Option<i64>) -> Result<(), RelayError> {
    let (client, mut connection) =
        tokio_postgres::connect(&context.config.database_url, NoTls).await?;
    let (notes, mut received) = mpsc::channel(WATCHER_BACKLOG);
    // The connection must be polled for the LISTEN to complete and for
    // notifications to arrive: a task drives it and hands them over.
    let driver = AbortOnDrop::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(note))) => {
                    if notes.send(note).await.is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "event connection failed");
                    break;
                }
                None => break,
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    tracing::debug!("listening for events");
    // Listening already, so that what is published while the log is read
    // is in one or the other.
    catch_up(context, last).await?;
    let events = &context.events;
    events.listening.send_replace(true);
    revoke_missed(context).await;
    while let Some(note) = received.recv().await {
        match Event::from_payload(note.payload()) {
            Some(event) if &*event.name == REVOKED => revoke(context, &event),
            Some(event) if last.is_some_and(|last| event.seq <= last) => {}
            Some(event) => {
                *last = Some(event.seq);
                // No receiver is fine: nobody is watching.
                drop(events.sender.send(event));
            }
            None => tracing::warn!("ignoring a malformed event"),
        }
    }
    events.listening.send_replace(false);
    drop(driver);
    Ok(())
}

/// Why a listening connection ended.
#[derive(Debug)]
enum RelayError {
    Listen(tokio_postgres::Error),
    Log(crate::error::Error),
}

impl From<tokio_postgres::Error> for RelayError {
    fn from(err: tokio_postgres::Error) -> RelayError {
        RelayError::Listen(err)
    }
}

impl From<crate::error::Error> for RelayError {
    fn from(err: crate::error::Error) -> RelayError {
        RelayError::Log(err)
    }
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayError::Listen(err) => write!(f, "{err}"),
            RelayError::Log(err) => write!(f, "cannot read the event log: {}", err.message),
        }
    }
}
