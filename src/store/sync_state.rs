//! `dingsync.sync_state` (migration V7): cursors of resumable jobs, one JSON document per
//! (job, scope).

use sqlx::PgExecutor;

pub async fn load(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    name: &str,
    scope: &str,
) -> sqlx::Result<Option<serde_json::Value>> {
    sqlx::query_scalar(
        "SELECT state FROM dingsync.sync_state WHERE corp_id = $1 AND name = $2 AND scope = $3",
    )
    .bind(corp_id)
    .bind(name)
    .bind(scope)
    .fetch_optional(db)
    .await
}

pub async fn save(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    name: &str,
    scope: &str,
    state: &serde_json::Value,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO dingsync.sync_state (corp_id, name, scope, state) VALUES ($1, $2, $3, $4)
         ON CONFLICT (corp_id, name, scope) DO UPDATE SET state = excluded.state, updated_at = now()",
    )
    .bind(corp_id)
    .bind(name)
    .bind(scope)
    .bind(state)
    .execute(db)
    .await?;
    Ok(())
}
