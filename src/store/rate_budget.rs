//! `dingsync.rate_budget`: the next free call slot of each (organisation, app), shared by every
//! replica. The database clock (`clock_timestamp()`) is the one clock all replicas share, so
//! every slot is computed by it. The slot rules (spacing, priorities, pauses) are
//! `dingtalk::budget`'s; this module only reads and moves the row.

use std::time::Duration;

use sqlx::{PgExecutor, PgPool};

/// Takes the next slot if it lies within `horizon` from now: moves the app's next slot on by
/// `spacing` and returns how long until the slot taken (negative when it is already due).
/// `None`: no slot within the horizon, nothing taken.
pub async fn take_slot(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    app_key: &str,
    spacing: f64,
    horizon: Duration,
) -> sqlx::Result<Option<f64>> {
    sqlx::query_scalar(
        "INSERT INTO dingsync.rate_budget AS b (corp_id, app_key, next_at)
         VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
         ON CONFLICT (corp_id, app_key) DO UPDATE
         SET next_at = greatest(b.next_at, clock_timestamp()) + make_interval(secs => $3)
         WHERE greatest(b.next_at, clock_timestamp()) <= clock_timestamp() + make_interval(secs => $4)
         RETURNING extract(epoch FROM (next_at - make_interval(secs => $3)) - clock_timestamp())::float8",
    )
    .bind(corp_id)
    .bind(app_key)
    .bind(spacing)
    .bind(horizon.as_secs_f64())
    .fetch_optional(db)
    .await
}

/// Pushes the app's next slot out to at least `pause` from now (never earlier than it was).
pub async fn pause(
    pool: &PgPool,
    corp_id: &str,
    app_key: &str,
    pause: Duration,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO dingsync.rate_budget AS b (corp_id, app_key, next_at)
         VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
         ON CONFLICT (corp_id, app_key) DO UPDATE
         SET next_at = greatest(b.next_at, clock_timestamp() + make_interval(secs => $3))",
    )
    .bind(corp_id)
    .bind(app_key)
    .bind(pause.as_secs_f64())
    .execute(pool)
    .await
    .map(drop)
}
