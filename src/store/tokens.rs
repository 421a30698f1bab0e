//! `dingsync.access_tokens`: the DingTalk access token every replica shares, one row per
//! (organisation, app). The row is a credential: it is read and written only here, and only by
//! `dingtalk::token`, which owns the caching and fetching rules.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

/// Until when the stored token is valid; `None` when there is none.
pub async fn expiry(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    app_key: &str,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar(
        "SELECT expires_at FROM dingsync.access_tokens WHERE corp_id = $1 AND app_key = $2",
    )
    .bind(corp_id)
    .bind(app_key)
    .fetch_optional(db)
    .await
}

/// Deletes the stored token if it is still `token` (another replica may have replaced it).
pub async fn delete(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    app_key: &str,
    token: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "DELETE FROM dingsync.access_tokens WHERE corp_id = $1 AND app_key = $2 AND access_token = $3",
    )
    .bind(corp_id)
    .bind(app_key)
    .bind(token)
    .execute(db)
    .await
    .map(drop)
}

/// Takes the app's token lock for the rest of `tx`: replicas needing a token queue here, the
/// first fetches and the others find its token.
pub async fn lock(tx: &mut PgConnection, corp_id: &str, app_key: &str) -> sqlx::Result<()> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended('dingsync.access_token:' || $1 || ':' || $2, 0))",
    )
    .bind(corp_id)
    .bind(app_key)
    .execute(tx)
    .await
    .map(drop)
}

/// The stored token and its expiry.
pub async fn read(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    app_key: &str,
) -> sqlx::Result<Option<(String, DateTime<Utc>)>> {
    sqlx::query_as(
        "SELECT access_token, expires_at FROM dingsync.access_tokens WHERE corp_id = $1 AND app_key = $2",
    )
    .bind(corp_id)
    .bind(app_key)
    .fetch_optional(db)
    .await
}

/// Stores a freshly fetched token, replacing the app's previous one.
pub async fn save(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    app_key: &str,
    token: &str,
    expires_at: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO dingsync.access_tokens (corp_id, app_key, access_token, expires_at, fetched_at)
         VALUES ($1, $2, $3, $4, now())
         ON CONFLICT (corp_id, app_key) DO UPDATE
         SET access_token = excluded.access_token, expires_at = excluded.expires_at, fetched_at = now()",
    )
    .bind(corp_id)
    .bind(app_key)
    .bind(token)
    .bind(expires_at)
    .execute(db)
    .await
    .map(drop)
}
