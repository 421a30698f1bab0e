//! `dingsync.access_tokens`: the DingTalk access token every replica shares, one row per
//! (organisation, app), and the lease of the replica fetching a new one. The row is a credential:
//! it is read and written only here, and only by `dingtalk::token`, which owns the caching and
//! fetching rules.
//!
//! No statement here spans DingTalk's answer: a fetch is [`claim_fetch`], then the HTTP call with
//! no connection held, then [`save`] (or [`release`]), each one short statement.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

/// What the shared row says, read in one statement. No `Debug`: it holds the token.
#[derive(sqlx::FromRow)]
pub struct Shared {
    pub access_token: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Another replica holds an unexpired lease to fetch a new token (judged by the database's
    /// clock, which set the lease).
    pub fetch_leased: bool,
}

impl Shared {
    /// The stored token and its expiry, if there is one.
    pub fn token(self) -> Option<(String, DateTime<Utc>)> {
        self.access_token.zip(self.expires_at)
    }
}

/// Until when the stored token is valid; `None` when there is none.
pub async fn expiry(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    app_key: &str,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    let expiry: Option<Option<DateTime<Utc>>> = sqlx::query_scalar(
        "SELECT expires_at FROM dingsync.access_tokens WHERE corp_id = $1 AND app_key = $2",
    )
    .bind(corp_id)
    .bind(app_key)
    .fetch_optional(db)
    .await?;
    Ok(expiry.flatten())
}

/// Drops the stored token if it is still `token` (another replica may have replaced it). A lease
/// held on the row stays: the replica holding it is fetching the replacement.
pub async fn clear(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    app_key: &str,
    token: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE dingsync.access_tokens
         SET access_token = NULL, expires_at = NULL, fetched_at = NULL
         WHERE corp_id = $1 AND app_key = $2 AND access_token = $3",
    )
    .bind(corp_id)
    .bind(app_key)
    .bind(token)
    .execute(db)
    .await
    .map(drop)
}

/// The stored token and whether a fetch is under way; `None` when the app has no row yet.
pub async fn read(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    app_key: &str,
) -> sqlx::Result<Option<Shared>> {
    sqlx::query_as(
        "SELECT access_token, expires_at, coalesce(fetching_until > now(), false) AS fetch_leased
         FROM dingsync.access_tokens WHERE corp_id = $1 AND app_key = $2",
    )
    .bind(corp_id)
    .bind(app_key)
    .fetch_optional(db)
    .await
}

/// Claims the fetch of a new token for `lease`, atomically: succeeds only when the stored token
/// (if any) expires at or before `stale_at` and no unexpired lease is held. Returns the lease's
/// end, which identifies it to [`release`]; `None` when another replica holds the lease or has
/// just stored a token fresh enough.
pub async fn claim_fetch(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    app_key: &str,
    stale_at: DateTime<Utc>,
    lease: Duration,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar(
        "INSERT INTO dingsync.access_tokens AS t (corp_id, app_key, fetching_until)
         VALUES ($1, $2, now() + make_interval(secs => $4))
         ON CONFLICT (corp_id, app_key) DO UPDATE SET fetching_until = excluded.fetching_until
         WHERE (t.expires_at IS NULL OR t.expires_at <= $3)
           AND (t.fetching_until IS NULL OR t.fetching_until <= now())
         RETURNING fetching_until",
    )
    .bind(corp_id)
    .bind(app_key)
    .bind(stale_at)
    .bind(lease.as_secs_f64())
    .fetch_optional(db)
    .await
}

/// Gives up the lease that ends at `lease_end` (the fetch failed), so that the next replica
/// needing a token need not wait for it to expire. A lease taken over since is left alone.
pub async fn release(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    app_key: &str,
    lease_end: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE dingsync.access_tokens SET fetching_until = NULL
         WHERE corp_id = $1 AND app_key = $2 AND fetching_until = $3",
    )
    .bind(corp_id)
    .bind(app_key)
    .bind(lease_end)
    .execute(db)
    .await
    .map(drop)
}

/// Stores a freshly fetched token, replacing the app's previous one, and ends the fetch lease.
/// Ending a lease another replica took over after ours expired is harmless: it too is fetching a
/// token that is valid now, and the replicas waiting for it can use this one.
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
         SET access_token = excluded.access_token, expires_at = excluded.expires_at,
             fetched_at = now(), fetching_until = NULL",
    )
    .bind(corp_id)
    .bind(app_key)
    .bind(token)
    .bind(expires_at)
    .execute(db)
    .await
    .map(drop)
}
