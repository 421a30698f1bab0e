//! `dingsync.events` (migration V2), as far as pruning goes: the callback path writes events
//! through `store::batch`.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

/// Deletes at most `limit` events of `corp_id` received before `before`; returns how many. One
/// short statement per batch, so no long transaction holds back vacuum or replication; the BRIN
/// index on received_at finds the old rows.
pub async fn delete_received_before(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    before: DateTime<Utc>,
    limit: i64,
) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "DELETE FROM dingsync.events
         WHERE corp_id = $1 AND id IN (
             SELECT id FROM dingsync.events
             WHERE corp_id = $1 AND received_at < $2
             LIMIT $3)",
    )
    .bind(corp_id)
    .bind(before)
    .bind(limit)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}
