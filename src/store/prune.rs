//! Deleting old rows of the tables dingsync prunes (the `retention` job): raw events
//! (`dingsync.events`, migration V2, by received_at), their dedup keys (`dingsync.event_keys`,
//! migration V11, by received_at, kept longer) and the scheduler's run log (`dingsync.job_runs`,
//! migration V7, by started_at). The callback path writes events and keys through `store::batch`,
//! the scheduler its runs through `store::job_runs`.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

/// A table that is pruned by age, and the column that dates its rows (BRIN-indexed in all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aged {
    Events,
    EventKeys,
    JobRuns,
}

impl Aged {
    /// The table, the column that tells its rows apart within an organisation, and the column
    /// that dates them.
    fn table_key_and_column(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Aged::Events => ("dingsync.events", "id", "received_at"),
            Aged::EventKeys => ("dingsync.event_keys", "dedup_key", "received_at"),
            Aged::JobRuns => ("dingsync.job_runs", "id", "started_at"),
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
    let (table, key, column) = table.table_key_and_column();
    let done = sqlx::query(&format!(
        "DELETE FROM {table}
         WHERE corp_id = $1 AND {key} IN (
             SELECT {key} FROM {table}
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
