//! The one connection per instance that LISTENs for what every instance
//! publishes with NOTIFY: change events, for the watchers (see
//! [`crate::events`]), and token revocations, which end this instance's
//! sessions of the revoked tokens.
//!
//! Events that happen while the listening connection is down are lost to
//! the watchers; it reconnects with backoff. Revocations are not lost: after
//! each (re)connect the tokens of this instance's sessions are checked.

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
        loop {
            let result = relay(&context).await;
            context.events.listening.send_replace(false);
            match result {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(err) => {
                    tracing::warn!(error = %err, "event listener disconnected; events are lost until it is back");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

/// One listening connection's life: LISTEN, then forward every notification.
async fn relay(context: &Context) -> Result<(), tokio_postgres::Error> {
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
    let events = &context.events;
    events.listening.send_replace(true);
    revoke_missed(context).await;
    while let Some(note) = received.recv().await {
        match Event::from_payload(note.payload()) {
            Some(event) if &*event.name == REVOKED => revoke(context, &event),
            // No receiver is fine: nobody is watching.
            Some(event) => drop(events.sender.send(event)),
            None => tracing::warn!("ignoring a malformed event"),
        }
    }
    events.listening.send_replace(false);
    drop(driver);
    Ok(())
}
