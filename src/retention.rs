//! The `retention` job (issue 6): deletes raw `dingsync.events` older than
//! `retention.events_days` for this replica's organisation. Events are only hints kept for
//! operators; approvals, approval_tasks and outbox rows are never deleted here.
//!
//! Deletes go in batches of [`BATCH`] rows, each its own short statement: no long transaction,
//! and the dead rows of one batch can be reclaimed while the next runs. Autovacuum reclaims the
//! space for new events (the table does not shrink on disk, nor does it need to: it stays at
//! about `events_days` of traffic).

use chrono::TimeDelta;
use tokio_util::sync::CancellationToken;

use crate::{
    reconcile::{Context, Counts},
    store,
};

/// Rows per DELETE statement.
pub const BATCH: i64 = 10_000;

/// Deletes the events older than the configured number of days, batch by batch, stopping between
/// batches on shutdown. Counts: `deleted` rows and `batches` statements.
pub async fn prune_events(ctx: &Context, shutdown: &CancellationToken) -> anyhow::Result<Counts> {
    let mut counts = Counts::from([("deleted", 0), ("batches", 0)]);
    let days = ctx.retention().events_days;
    if days == 0 {
        return Ok(counts); // keep forever
    }
    // One cutoff for the whole run (the database's clock, which stamped received_at), so the run
    // ends even while new events arrive.
    let before = store::approvals::clock(ctx.pool()).await? - TimeDelta::days(i64::from(days));
    while !shutdown.is_cancelled() {
        let deleted =
            store::events::delete_received_before(ctx.pool(), ctx.corp_id(), before, BATCH).await?;
        *counts.entry("batches").or_default() += 1;
        *counts.entry("deleted").or_default() += deleted;
        if deleted < BATCH as u64 {
            break;
        }
    }
    Ok(counts)
}
