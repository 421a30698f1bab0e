//! Deleting old rows of the tables dingsync prunes (the `retention` job): raw events
//! (`dingsync.events`, migration V2, by received_at) and the scheduler's run log
//! (`dingsync.job_runs`, migration V7, by started_at). The callback path writes events through
//! `store::batch`, the scheduler its runs through `store::job_runs`.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

/// A table that is pruned by age, and the column that dates its rows (BRIN-indexed in both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aged {
    Events,
    JobRuns,
}

impl Aged {
    fn table_and_column(self) -> (&'static str, &'static str) {
        match self {
            Aged::Events => ("dingsync.events", "received_at"),
            Aged::JobRuns => ("dingsync.job_runs", "started_at"),
        }
    }
}

/// Deletes at most `limit` rows of `corp_id` in `table` dated before `before`; returns how many.
/// One short statement per batch, so no long transaction holds back vacuum or replication; the
/// BRIN index on the date column finds the old rows.
pub async fn older_than(
    db: impl PgExecutor<'_>,
    table: Aged,
    corp_id: &str,
    before: DateTime<Utc>,
    limit: i64,
) -> sqlx::Result<u64> {
    let (table, column) = table.table_and_column();
    let done = sqlx::query(&format!(
        "DELETE FROM {table}
         WHERE corp_id = $1 AND id IN (
             SELECT id FROM {table}
             WHERE corp_id = $1 AND {column} < $2
             LIMIT $3)"
    ))
    .bind(corp_id)
    .bind(before)
    .bind(limit)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}
