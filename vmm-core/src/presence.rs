//! This instance's lease in the shared `instances` table.
//!
//! An instance joins when it starts (removing what an earlier life of the same
//! name left), then renews its lease every `presence_interval`: one statement,
//! whatever the number of sessions, which also removes instances whose lease
//! ran out. Other instances list only sessions of instances with a live lease,
//! so a crashed instance disappears from every list within one lease. After
//! the database was unreachable, or after this instance's row was reaped, the
//! next renewal writes all of its live sessions again. Each renewal also
//! writes this instance's figures for `stats` (see [`crate::stats`]).

use std::sync::Arc;
use std::time::Instant;

use tokio::time::MissedTickBehavior;

use crate::context::Context;
use crate::error::Result;
use crate::session::Change;
use crate::stats::Window;
use crate::task::AbortOnDrop;

/// One round: join if needed, renew with this instance's figures, then
/// rewrite the sessions if writes were lost.
async fn renew(context: &Context, window: &mut Window) -> Result<()> {
    let sessions = &context.sessions;
    let config = &context.config;
    if sessions.instance_id() == 0 {
        sessions
            .join(&config.instance_name, config.instance_lease)
            .await?;
    }
    let id = sessions.instance_id();
    let stats = crate::stats::snapshot(context, window);
    if context
        .store
        .renew_instance(id, &config.instance_name, config.instance_lease, &stats)
        .await?
    {
        tracing::warn!(
            instance = id,
            "this instance's lease had run out; writing its sessions again"
        );
        sessions.mark_dirty();
    }
    context.metrics.lease_renewed(true);
    if sessions.take_dirty() {
        // Sessions opened before the instance first joined are known only here.
        let live: Vec<_> = sessions
            .local()
            .into_iter()
            .filter(|session| session.instance_id == id)
            .collect();
        if let Err(err) = context.store.reassert_sessions(id, &live).await {
            sessions.mark_dirty();
            return Err(err);
        }
        // A session that closed while its row was being rewritten may have
        // been written back: look again next round.
        let now: Vec<u64> = sessions.local().iter().map(|s| s.id).collect();
        if live.iter().any(|session| !now.contains(&session.id)) {
            sessions.mark_dirty();
        }
    }
    Ok(())
}

/// Renews the lease until dropped.
pub(crate) fn maintain(context: Arc<Context>) -> AbortOnDrop {
    AbortOnDrop::spawn(async move {
        let mut ticker = tokio::time::interval(context.config.presence_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut healthy = true;
        let mut window = Window::new(Instant::now());
        loop {
            ticker.tick().await;
            match renew(&context, &mut window).await {
                Ok(()) if !healthy => {
                    tracing::info!("database reachable again; presence restored");
                    healthy = true;
                }
                Ok(()) => {}
                Err(err) => {
                    context.metrics.lease_renewed(false);
                    if healthy {
                        tracing::warn!(error = %err, "cannot renew this instance's lease");
                    }
                    healthy = false;
                    context.sessions.mark_dirty();
                }
            }
        }
    })
}

/// Writes queued opens and closes in batches until dropped.
pub(crate) fn write_behind(context: Arc<Context>) -> Option<AbortOnDrop> {
    let mut changes = context.sessions.take_changes()?;
    Some(AbortOnDrop::spawn(async move {
        let mut batch = Vec::new();
        while changes.recv_many(&mut batch, 1000).await > 0 {
            let mut opened = Vec::new();
            let mut closed = Vec::new();
            for change in batch.drain(..) {
                match change {
                    Change::Opened(info) => opened.push(info),
                    Change::Closed(info) => closed.push(info),
                }
            }
            let id = context.sessions.instance_id();
            opened.retain(|s| s.instance_id == id);
            closed.retain(|s| s.instance_id == id);
            let written = context
                .sessions
                .store()
                .write_sessions(id, &opened, &closed)
                .await;
            if let Err(err) = written {
                tracing::debug!(error = %err, "session writes lost; rewriting at the next renewal");
                context.sessions.mark_dirty();
            }
        }
    }))
}

/// Removes this instance and its sessions from the shared tables (a graceful
/// shutdown).
pub(crate) async fn leave(context: &Context) {
    let id = context.sessions.instance_id();
    if id == 0 {
        return;
    }
    if let Err(err) = context.store.leave_instance(id).await {
        tracing::warn!(error = %err, "could not remove this instance; its lease will run out");
    }
}
