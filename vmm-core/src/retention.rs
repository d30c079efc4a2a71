//! The event log's upkeep: events older than `--event-retention` are
//! deleted, a batch at a time, so that the log holds about a retention's
//! worth of events whatever the fleet does. Every instance runs it; one at
//! a time does the work (see [`crate::store::Store::prune_events`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use crate::context::Context;
use crate::task::AbortOnDrop;

/// Events deleted per statement, so that no statement holds many locks or
/// runs long.
const BATCH: i64 = 10_000;

/// Prunes every quarter of the retention, at most every minute, until
/// dropped.
pub(crate) fn prune(context: Arc<Context>) -> AbortOnDrop {
    AbortOnDrop::spawn(async move {
        let retention = context.config.event_retention;
        let every = (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            loop {
                match context.store.prune_events(retention, BATCH).await {
                    Ok(deleted) if deleted >= BATCH => continue,
                    Ok(deleted) => {
                        if deleted > 0 {
                            tracing::debug!(deleted, "pruned old events");
                        }
                    }
                    Err(err) => tracing::debug!(error = %err, "cannot prune old events"),
                }
                break;
            }
        }
    })
}
