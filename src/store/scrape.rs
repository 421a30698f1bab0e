//! The reads `/metrics` makes at scrape time: outbox rows in progress by state, and the age of
//! the oldest approval change not yet fetched. Both are index-only or indexed reads (the outbox's
//! due index covers exactly the in-progress states; `detail_wanted_at` is indexed where not
//! null), cheap enough for every scrape.

use sqlx::PgExecutor;

/// The outbox states counted at scrape time, in the order they are reported.
pub const OUTBOX_IN_PROGRESS: [&str; 3] = ["pending", "sending", "unknown"];

/// Outbox rows in progress by state, every state of [`OUTBOX_IN_PROGRESS`] included (0 when none).
pub async fn outbox_in_progress(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(&'static str, i64)>> {
    let counted: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state, count(*) FROM dingsync.outbox
         WHERE state IN ('pending', 'sending', 'unknown') GROUP BY state",
    )
    .fetch_all(db)
    .await?;
    Ok(OUTBOX_IN_PROGRESS
        .into_iter()
        .map(|state| {
            let n = counted.iter().find(|(s, _)| s == state).map_or(0, |c| c.1);
            (state, n)
        })
        .collect())
}

/// Seconds since the oldest approval change that still waits for its detail fetch (0 when none).
pub async fn sync_lag_seconds(db: impl PgExecutor<'_>) -> sqlx::Result<f64> {
    let lag: f64 = sqlx::query_scalar(
        "SELECT coalesce(extract(epoch FROM now() - min(detail_wanted_at))::float8, 0)
         FROM dingsync.approvals WHERE detail_wanted_at IS NOT NULL",
    )
    .fetch_one(db)
    .await?;
    Ok(lag.max(0.0))
}
