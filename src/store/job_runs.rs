//! `dingsync.job_runs` (migration V7): the scheduler's run log and its run-once-per-tick guard,
//! and the per-job advisory lock that keeps two runs of one job from overlapping on any replicas.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

/// Takes the job's session-level advisory lock on `conn` without waiting. The lock lives as long
/// as the session: the caller unlocks, or closes the connection (never returns it to the pool
/// locked).
pub async fn try_lock(conn: &mut PgConnection, corp_id: &str, job: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT pg_try_advisory_lock(hashtextextended('dingsync.job:' || $1 || ':' || $2, 0))",
    )
    .bind(corp_id)
    .bind(job)
    .fetch_one(conn)
    .await
}

pub async fn unlock(conn: &mut PgConnection, corp_id: &str, job: &str) -> sqlx::Result<()> {
    sqlx::query(
        "SELECT pg_advisory_unlock(hashtextextended('dingsync.job:' || $1 || ':' || $2, 0))",
    )
    .bind(corp_id)
    .bind(job)
    .execute(conn)
    .await?;
    Ok(())
}

/// Runs still marked running belong to a process that died (whoever holds the lock is the only
/// one running the job): mark them abandoned. Call with the job's lock held.
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
