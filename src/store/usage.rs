//! `dingsync.usage` and `dingsync.quota_pause`: the ledger of DingTalk's monthly allowances (calls
//! and deliveries per organisation, Beijing day, API and purpose) and the pause DingTalk's 90020
//! starts. What is counted, and when a pause lifts, are `ledger`'s and `dingtalk::quota`'s rules;
//! this module only adds up and reads.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgExecutor, Row};

/// Counts to add to one ledger row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    pub corp_id: String,
    pub day: NaiveDate,
    pub kind: &'static str,
    pub api: String,
    pub purpose: &'static str,
    pub metered: bool,
    pub count: i64,
    pub last_at: DateTime<Utc>,
}

/// One ledger row as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub day: NaiveDate,
    pub kind: String,
    pub api: String,
    pub purpose: String,
    pub metered: bool,
    pub count: i64,
}

/// Adds `deltas` in one statement (rows with the same key are summed first).
pub async fn add(db: impl PgExecutor<'_>, deltas: &[Delta]) -> sqlx::Result<()> {
    if deltas.is_empty() {
        return Ok(());
    }
    let mut corp = Vec::with_capacity(deltas.len());
    let mut day = Vec::with_capacity(deltas.len());
    let mut kind = Vec::with_capacity(deltas.len());
    let mut api = Vec::with_capacity(deltas.len());
    let mut purpose = Vec::with_capacity(deltas.len());
    let mut metered = Vec::with_capacity(deltas.len());
    let mut count = Vec::with_capacity(deltas.len());
    let mut last_at = Vec::with_capacity(deltas.len());
    for d in deltas {
        corp.push(d.corp_id.as_str());
        day.push(d.day);
        kind.push(d.kind);
        api.push(d.api.as_str());
        purpose.push(d.purpose);
        metered.push(d.metered);
        count.push(d.count);
        last_at.push(d.last_at);
    }
    sqlx::query(
        "INSERT INTO dingsync.usage AS u (corp_id, day, kind, api, purpose, metered, count, last_at)
         SELECT corp_id, day, kind, api, purpose, metered, sum(count), max(last_at)
         FROM unnest($1::text[], $2::date[], $3::text[], $4::text[], $5::text[], $6::bool[],
                     $7::int8[], $8::timestamptz[])
              AS d(corp_id, day, kind, api, purpose, metered, count, last_at)
         GROUP BY corp_id, day, kind, api, purpose, metered
         -- A fixed order: two replicas flushing at once lock the rows in the same order.
         ORDER BY corp_id, day, kind, api, purpose, metered
         ON CONFLICT (corp_id, day, kind, api, purpose, metered) DO UPDATE
         SET count = u.count + excluded.count, last_at = greatest(u.last_at, excluded.last_at)",
    )
    .bind(&corp)
    .bind(&day)
    .bind(&kind)
    .bind(&api)
    .bind(&purpose)
    .bind(&metered)
    .bind(&count)
    .bind(&last_at)
    .execute(db)
    .await?;
    Ok(())
}

/// The ledger rows of `corp_id` from `from` to `until` (Beijing days, both included).
pub async fn rows(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    from: NaiveDate,
    until: NaiveDate,
) -> sqlx::Result<Vec<UsageRow>> {
    let rows = sqlx::query(
        "SELECT day, kind, api, purpose, metered, count FROM dingsync.usage
         WHERE corp_id = $1 AND day BETWEEN $2 AND $3
         ORDER BY day, kind, api, purpose, metered",
    )
    .bind(corp_id)
    .bind(from)
    .bind(until)
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(UsageRow {
                day: r.try_get(0)?,
                kind: r.try_get(1)?,
                api: r.try_get(2)?,
                purpose: r.try_get(3)?,
                metered: r.try_get(4)?,
                count: r.try_get(5)?,
            })
        })
        .collect()
}

/// When `corp_id` last received a delivery, if ever.
pub async fn last_delivery(
    db: impl PgExecutor<'_>,
    corp_id: &str,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar(
        "SELECT max(last_at) FROM dingsync.usage WHERE corp_id = $1 AND kind = 'delivery'",
    )
    .bind(corp_id)
    .fetch_one(db)
    .await
}

/// When `corp_id` last received a delivery it stored (`purpose` push), on the ledger's clock.
pub async fn last_push(
    db: impl PgExecutor<'_>,
    corp_id: &str,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar(
        "SELECT max(last_at) FROM dingsync.usage
         WHERE corp_id = $1 AND kind = 'delivery' AND purpose = 'push'",
    )
    .bind(corp_id)
    .fetch_one(db)
    .await
}

/// When anything was last counted for `corp_id` (a call or a delivery), on the ledger's clock.
pub async fn last_counted(
    db: impl PgExecutor<'_>,
    corp_id: &str,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar("SELECT max(last_at) FROM dingsync.usage WHERE corp_id = $1")
        .bind(corp_id)
        .fetch_one(db)
        .await
}

/// A pause of metered calls, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    pub month: NaiveDate,
    pub paused_at: DateTime<Utc>,
    pub allowance: i64,
    pub reason: String,
}

/// The pause of `corp_id`, if any.
pub async fn pause(db: impl PgExecutor<'_>, corp_id: &str) -> sqlx::Result<Option<Pause>> {
    let row = sqlx::query(
        "SELECT month, paused_at, allowance, reason FROM dingsync.quota_pause WHERE corp_id = $1",
    )
    .bind(corp_id)
    .fetch_optional(db)
    .await?;
    row.map(|r| {
        Ok(Pause {
            month: r.try_get(0)?,
            paused_at: r.try_get(1)?,
            allowance: r.try_get(2)?,
            reason: r.try_get(3)?,
        })
    })
    .transpose()
}

/// Pauses `corp_id`'s metered calls for `month` (a pause already there is kept: the first one
/// tells when it began).
pub async fn set_pause(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    month: NaiveDate,
    allowance: i64,
    reason: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO dingsync.quota_pause AS p (corp_id, month, paused_at, allowance, reason)
         VALUES ($1, $2, now(), $3, $4)
         ON CONFLICT (corp_id) DO UPDATE
         SET month = excluded.month, paused_at = excluded.paused_at,
             allowance = excluded.allowance, reason = excluded.reason
         WHERE p.month <> excluded.month OR p.allowance <> excluded.allowance",
    )
    .bind(corp_id)
    .bind(month)
    .bind(allowance)
    .bind(reason)
    .execute(db)
    .await?;
    Ok(())
}

/// Lifts `corp_id`'s pause; whether there was one.
pub async fn clear_pause(db: impl PgExecutor<'_>, corp_id: &str) -> sqlx::Result<bool> {
    let n = sqlx::query("DELETE FROM dingsync.quota_pause WHERE corp_id = $1")
        .bind(corp_id)
        .execute(db)
        .await?
        .rows_affected();
    Ok(n > 0)
}

/// Lifts `corp_id`'s pause if it belongs to another month than `month` or was taken under
/// another allowance than `allowance`; whether one was lifted.
pub async fn clear_stale_pause(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    month: NaiveDate,
    allowance: i64,
) -> sqlx::Result<bool> {
    let n = sqlx::query(
        "DELETE FROM dingsync.quota_pause
         WHERE corp_id = $1 AND (month <> $2 OR allowance <> $3)",
    )
    .bind(corp_id)
    .bind(month)
    .bind(allowance)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n > 0)
}
