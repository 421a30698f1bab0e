//! Deleting old rows of the tables dingsync prunes (the `retention` job): raw events
//! (`dingsync.events`, migration V2, partitioned by UTC month of received_at since V22: whole
//! months are dropped, see [`drop_event_partition`]), their dedup keys (`dingsync.event_keys`,
//! migration V11, by received_at, kept longer) and the scheduler's run log (`dingsync.job_runs`,
//! migration V7, by started_at); and making the events' partitions ahead of time. The callback
//! path writes events and keys through `store::batch`, the scheduler its runs through
//! `store::job_runs`.

use chrono::{DateTime, Utc};
use sqlx::{Acquire, PgExecutor, Postgres};

/// Months of `dingsync.events` partitions kept ready beyond the current one. Start-up and every
/// retention run make them, so an insert lands in the default partition only after months
/// without either.
pub const MONTHS_AHEAD: i32 = 3;

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
    // The date condition outside too: on the partitioned events it keeps the DELETE's probes to
    // the partitions that can hold old rows.
    let done = sqlx::query(&format!(
        "DELETE FROM {table}
         WHERE corp_id = $1 AND {column} < $2 AND {key} IN (
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

/// Makes the partitions of `dingsync.events` for the current UTC month (the database's clock) and
/// the [`MONTHS_AHEAD`] after it, where missing (`dingsync.create_events_partition`, migration
/// V22, which also moves the default partition's rows of that month into it); returns how many
/// it made.
pub async fn create_event_partitions(db: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE made) FROM (
             SELECT dingsync.create_events_partition(
                 (date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => g))::date)
             FROM generate_series(0, $1) g) AS p(made)",
    )
    .bind(MONTHS_AHEAD)
    .fetch_one(db)
    .await
}

/// The monthly partitions of `dingsync.events` that hold only rows received before `before`
/// (their month ends at or before it), oldest first. Not the default partition.
pub async fn event_partitions_before(
    db: impl PgExecutor<'_>,
    before: DateTime<Utc>,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        r"SELECT c.relname::text
         FROM pg_inherits i
         JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'dingsync.events'::regclass
           AND c.relname ~ '^events_\d{4}_\d{2}$'
           AND (to_date(substr(c.relname, 8), 'YYYY_MM') + interval '1 month') AT TIME ZONE 'UTC' <= $1
         ORDER BY 1",
    )
    .bind(before)
    .fetch_all(db)
    .await
}

/// Drops the events partition `name` (from [`event_partitions_before`]) when every row in it is
/// `corp_id`'s; returns its row count, or `None` when another organisation has rows in it (its own
/// retention may keep them longer: the caller deletes this organisation's rows instead, and the
/// last organisation's run drops the month). One short transaction; the drop waits at most
/// `lock_timeout` for inserts into the parent to let go (an error then; the next run retries).
pub async fn drop_event_partition<'c>(
    db: impl Acquire<'c, Database = Postgres>,
    name: &str,
    corp_id: &str,
) -> sqlx::Result<Option<u64>> {
    // Names come from the catalog and match events_YYYY_MM; quoted all the same.
    let table = format!("dingsync.\"{}\"", name.replace('"', "\"\""));
    let mut tx = db.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .execute(&mut *tx)
        .await?;
    let shared: bool = sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM {table} WHERE corp_id <> $1)"
    ))
    .bind(corp_id)
    .fetch_one(&mut *tx)
    .await?;
    if shared {
        return Ok(None);
    }
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(rows as u64))
}
