//! The `retention` job: deletes raw `dingsync.events` older than
//! `retention.events_days`, their dedup keys `dingsync.event_keys` older than
//! `retention.event_keys_days` (longer: a replayed event stays a duplicate after its raw row is
//! gone) and the scheduler's run log `dingsync.job_runs` older than `retention.job_runs_days`,
//! for this replica's organisation. Events are only hints kept for operators, and old runs only
//! history; approvals, approval_tasks and outbox rows are never deleted here.
//!
//! Deletes go in batches of [`BATCH`] rows, each its own short statement: no long transaction,
//! and the dead rows of one batch can be reclaimed while the next runs. Autovacuum reclaims the
//! space for new rows (the tables do not shrink on disk, nor do they need to: they stay at about
//! their retention's worth of traffic).

use std::future::Future;

use chrono::{DateTime, TimeDelta, Utc};
use tokio_util::sync::CancellationToken;

use crate::{
    jobs::{Context, Counts},
    store::{self, prune::Aged},
};

/// Rows per DELETE statement.
pub const BATCH: i64 = 10_000;

/// Deletes the events, their keys, then the job runs, older than their configured number of
/// days, batch by batch, stopping between batches on shutdown. Counts: events `deleted` and
/// `batches` statements, `event_keys_deleted` and `job_runs_deleted`.
pub async fn prune(ctx: &Context, shutdown: &CancellationToken) -> anyhow::Result<Counts> {
    let mut counts = Counts::from([
        ("deleted", 0),
        ("batches", 0),
        ("event_keys_deleted", 0),
        ("job_runs_deleted", 0),
    ]);
    let retention = ctx.retention();
    // One cutoff for the whole run (the database's clock, which stamped the rows), so the run
    // ends even while new rows arrive.
    let now = store::approvals::clock(ctx.pool()).await?;
    let (pool, corp) = (ctx.pool(), ctx.corp_id());
    if retention.events_days > 0 {
        let before = now - TimeDelta::days(i64::from(retention.events_days));
        let (deleted, batches) = in_batches(shutdown, || {
            store::prune::older_than(pool, Aged::Events, corp, before, BATCH)
        })
        .await?;
        counts.insert("deleted", deleted);
        counts.insert("batches", batches);
    }
    // Configuration keeps these at least as long as the events (`config::validate`).
    if retention.event_keys_days > 0 {
        let before = now - TimeDelta::days(i64::from(retention.event_keys_days));
        let (deleted, _) = in_batches(shutdown, || {
            store::prune::older_than(pool, Aged::EventKeys, corp, before, BATCH)
        })
        .await?;
        counts.insert("event_keys_deleted", deleted);
    }
    if retention.job_runs_days > 0 {
        let before: DateTime<Utc> = now - TimeDelta::days(i64::from(retention.job_runs_days));
        let (deleted, _) = in_batches(shutdown, || {
            store::prune::older_than(pool, Aged::JobRuns, corp, before, BATCH)
        })
        .await?;
        counts.insert("job_runs_deleted", deleted);
    }
    Ok(counts)
}

/// Runs `delete` (one batch of at most [`BATCH`] rows) until a batch comes back short or the
/// daemon stops; returns the rows deleted and the statements run.
async fn in_batches<F, Fut>(shutdown: &CancellationToken, mut delete: F) -> sqlx::Result<(u64, u64)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = sqlx::Result<u64>>,
{
    let (mut deleted, mut batches) = (0, 0);
    while !shutdown.is_cancelled() {
        let n = delete().await?;
        batches += 1;
        deleted += n;
        if n < BATCH as u64 {
            break;
        }
    }
    Ok((deleted, batches))
}
