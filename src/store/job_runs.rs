//! `dingsync.job_runs` (migration V7): the scheduler's run log and its run-once-per-tick guard;
//! and `dingsync.job_leases` (migration V27): the per-job lease that keeps two runs of one job
//! from overlapping on any replicas.
//!
//! A lease, not an advisory lock: a session-level lock does not survive a pooler in transaction
//! mode (the lock stays on the server connection that took it), and a transaction-level one
//! would pin a server connection per running job for the whole run. A lease holds no connection;
//! its holder renews it every third of [`LEASE`] while the job runs, and a process that dies
//! leaves it to lapse: the next run after that starts at most [`LEASE`] later.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

/// How long a lease lasts unless renewed.
pub const LEASE: Duration = Duration::from_secs(30);

/// Takes the lease of `job` for `holder` if it is free or lapsed; whether it did.
pub async fn try_lease(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    job: &str,
    holder: &str,
) -> sqlx::Result<bool> {
    let taken: Option<bool> = sqlx::query_scalar(
        "INSERT INTO dingsync.job_leases AS l (corp_id, job, holder, expires_at)
         VALUES ($1, $2, $3, clock_timestamp() + make_interval(secs => $4))
         ON CONFLICT ON CONSTRAINT job_leases_pkey DO UPDATE
             SET holder = excluded.holder, expires_at = excluded.expires_at
             WHERE l.expires_at < clock_timestamp()
         RETURNING true",
    )
    .bind(corp_id)
    .bind(job)
    .bind(holder)
    .bind(LEASE.as_secs_f64())
    .fetch_optional(db)
    .await?;
    Ok(taken.is_some())
}

/// Extends `holder`'s lease of `job` by [`LEASE`] from now; false when it is no longer its own
/// (it lapsed and another run took it).
pub async fn renew_lease(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    job: &str,
    holder: &str,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE dingsync.job_leases SET expires_at = clock_timestamp() + make_interval(secs => $4)
         WHERE corp_id = $1 AND job = $2 AND holder = $3",
    )
    .bind(corp_id)
    .bind(job)
    .bind(holder)
    .bind(LEASE.as_secs_f64())
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives `holder`'s lease of `job` back (nothing when it is no longer its own).
pub async fn release_lease(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    job: &str,
    holder: &str,
) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM dingsync.job_leases WHERE corp_id = $1 AND job = $2 AND holder = $3")
        .bind(corp_id)
        .bind(job)
        .bind(holder)
        .execute(db)
        .await?;
    Ok(())
}

/// Runs still marked running belong to a process that died (whoever holds the lease is the only
/// one running the job): mark them abandoned. Call with the job's lease held.
pub async fn abandon_stale(db: impl PgExecutor<'_>, corp_id: &str, job: &str) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "UPDATE dingsync.job_runs SET outcome = 'abandoned', finished_at = clock_timestamp()
         WHERE corp_id = $1 AND job = $2 AND outcome = 'running'",
    )
    .bind(corp_id)
    .bind(job)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Claims `tick_at` for this replica: the run's id, or `None` when another replica has already
/// run (or is running) this tick.
pub async fn begin(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    job: &str,
    tick_at: DateTime<Utc>,
    replica: &str,
) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar(
        "INSERT INTO dingsync.job_runs (corp_id, job, tick_at, replica) VALUES ($1, $2, $3, $4)
         ON CONFLICT ON CONSTRAINT job_runs_tick_unique DO NOTHING
         RETURNING id",
    )
    .bind(corp_id)
    .bind(job)
    .bind(tick_at)
    .bind(replica)
    .fetch_optional(db)
    .await
}

pub async fn finish(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    id: i64,
    outcome: &str,
    counts: &serde_json::Value,
    error: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE dingsync.job_runs
         SET outcome = $3, counts = $4, error = $5, finished_at = clock_timestamp()
         WHERE corp_id = $1 AND id = $2",
    )
    .bind(corp_id)
    .bind(id)
    .bind(outcome)
    .bind(counts)
    .bind(error)
    .execute(db)
    .await?;
    Ok(())
}

/// When a job of `corp_id` last started or finished (any replica), and the database's now.
pub async fn last_activity(
    db: impl PgExecutor<'_>,
    corp_id: &str,
) -> sqlx::Result<(Option<DateTime<Utc>>, DateTime<Utc>)> {
    sqlx::query_as(
        "SELECT max(greatest(started_at, finished_at)), clock_timestamp()
         FROM dingsync.job_runs WHERE corp_id = $1",
    )
    .bind(corp_id)
    .fetch_one(db)
    .await
}
