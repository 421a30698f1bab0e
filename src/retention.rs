//! The `retention` job: removes raw `dingsync.events` older than `retention.events_days`, their
//! dedup keys `dingsync.event_keys` older than `retention.event_keys_days` (longer: a replayed
//! event stays a duplicate after its raw row is gone) and the scheduler's run log
//! `dingsync.job_runs` older than `retention.job_runs_days`, for this replica's organisation; and
//! makes the events' partitions for the months ahead. Events are only hints kept for operators,
//! and old runs only history; approvals, approval_tasks and outbox rows are never deleted here.
//!
//! Events go by whole UTC months (the table's partitions, migration V22): an event is removed once
//! its month has ended more than `events_days` ago, so events are kept between `events_days` and
//! about a month longer. A month whose rows are all this organisation's is dropped (no dead rows,
//! no vacuum); in a month shared with another organisation, and in the default partition, this
//! organisation's rows of such months are deleted in batches.
//!
//! Deletes go in batches of [`BATCH`] rows, each its own short statement: no long transaction,
//! and the dead rows of one batch can be reclaimed while the next runs. Autovacuum reclaims the
//! space for new rows (the tables do not shrink on disk, nor do they need to: they stay at about
//! their retention's worth of traffic).

use std::future::Future;

use chrono::{DateTime, Datelike, TimeDelta, TimeZone, Utc};
use tokio_util::sync::CancellationToken;

use crate::{
    jobs::{Context, Counts},
    store::{self, prune::Aged},
};

/// Rows per DELETE statement.
pub const BATCH: i64 = 10_000;

/// Makes the coming months' event partitions, then removes the events, their keys, then the job
/// runs, older than their configured number of days, stopping between statements on shutdown.
/// Counts: events `deleted` (in dropped partitions and by batch), `partitions_dropped`, `batches`
/// (DELETE statements on events), `partitions_created`, `event_keys_deleted` and
/// `job_runs_deleted`.
pub async fn prune(ctx: &Context, shutdown: &CancellationToken) -> anyhow::Result<Counts> {
    let mut counts = Counts::from([
        ("deleted", 0),
        ("batches", 0),
        ("partitions_dropped", 0),
        ("partitions_created", 0),
        ("event_keys_deleted", 0),
        ("job_runs_deleted", 0),
    ]);
    let retention = ctx.retention();
    let (pool, corp) = (ctx.pool(), ctx.corp_id());
    let created = store::prune::create_event_partitions(pool).await?;
    counts.insert("partitions_created", created as u64);
    // One cutoff for the whole run (the database's clock, which stamped the rows), so the run
    // ends even while new rows arrive.
    let now = store::approvals::clock(pool).await?;
    // Events older than the start of this month go (whole months, see the module docs).
    let events_before = (retention.events_days > 0)
        .then(|| month_start(now - TimeDelta::days(i64::from(retention.events_days))));
    if let Some(before) = events_before {
        let (mut deleted, mut dropped) = (0, 0);
        for name in store::prune::event_partitions_before(pool, before).await? {
            if shutdown.is_cancelled() {
                break;
            }
            if let Some(rows) = store::prune::drop_event_partition(pool, &name, corp).await? {
                tracing::info!(partition = %name, rows, "retention: dropped the events partition {name}");
                deleted += rows;
                dropped += 1;
            }
        }
        // What is left: the default partition's, and months other organisations share.
        let (by_batch, batches) = in_batches(shutdown, || {
            store::prune::older_than(pool, Aged::Events, corp, before, BATCH)
        })
        .await?;
        counts.insert("deleted", deleted + by_batch);
        counts.insert("batches", batches);
        counts.insert("partitions_dropped", dropped);
    }
    // Configuration keeps these at least as long as the events (`config::validate`); and a key
    // never goes before its event, which can outlive events_days by most of a month.
    if retention.event_keys_days > 0 {
        let mut before = now - TimeDelta::days(i64::from(retention.event_keys_days));
        if let Some(events_before) = events_before {
            before = before.min(events_before);
        }
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

/// The first instant of `t`'s UTC month (the events' partition bounds).
fn month_start(t: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
        .single()
        .expect("the first of a month at midnight UTC exists")
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
