//! `dingsync.actions`: claiming due actions, recording what came of them, and the operator's
//! view. Every state change is one statement guarded by the state it expects, so a late or
//! repeated write changes nothing.
//!
//! States: `pending` → `sending` (claimed; the call, or a read-back and then maybe the call, in
//! flight) → `done` | `failed` | `superseded` | `pending` (certainly not carried out: backing
//! off) | `unknown` (may have reached DingTalk without an answer) → read back → `done` |
//! `superseded` | `failed` | `sending` (certainly not carried out: sent again). Operators move
//! `failed` back to `pending` and `pending`/`failed` to `cancelled`.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::{PgExecutor, PgPool};

/// One action as the worker and the CLI see it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ActionRow {
    pub corp_id: String,
    pub id: i64,
    pub idempotency_key: String,
    pub action: String,
    pub process_instance_id: String,
    pub task_id: Option<i64>,
    pub actor_user_id: Option<String>,
    pub as_system: bool,
    pub to_user_id: Option<String>,
    pub remark: Option<String>,
    pub state: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub superseded_by: Option<String>,
    pub superseded_how: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A claimed action and what to do with it.
#[derive(Debug, Clone)]
pub struct ActionClaim {
    pub row: ActionRow,
    pub work: ActionWork,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionWork {
    /// Never sent: send it (the row is now `sending`, `attempts` counts this send).
    Send,
    /// Sent before (its answer lost, or refused for a reason that may pass): read the approval
    /// back first, and send again only if the action certainly has not taken effect. The row
    /// is `sending` (a retry; `attempts` counts it) or `unknown` (sent again through
    /// [`resend`]).
    Verify,
    /// Left `sending` by a worker whose lease ran out: now `unknown`, due after the settle time
    /// (its call may still be on its way through DingTalk's gateway). Nothing to do now.
    TakenOver,
}

const COLUMNS: &str = "a.corp_id, a.id, a.idempotency_key, a.action, a.process_instance_id, \
    a.task_id, a.actor_user_id, a.as_system, a.to_user_id, a.remark, a.state, a.attempts, \
    a.next_attempt_at, a.sent_at, a.last_error, a.superseded_by, a.superseded_how, a.created_at";

/// States the worker may still change.
const OPEN: &str = "('sending', 'unknown')";

/// Claims up to `limit` due actions of `corp_id` in one statement, with a lease of `lease`:
/// pending rows become `sending` (their attempt counted); `unknown` rows are handed out for a
/// read-back; `sending` rows whose lease expired become `unknown`, due after `settle`. Rows
/// another worker holds are skipped, not waited for.
pub async fn claim(
    pool: &PgPool,
    corp_id: &str,
    limit: i64,
    lease: Duration,
    settle: Duration,
) -> sqlx::Result<Vec<ActionClaim>> {
    let sql = format!(
        "WITH due AS (
            SELECT corp_id, id, state AS previous, attempts AS sends FROM dingsync.actions
            WHERE corp_id = $1 AND state IN ('pending', 'sending', 'unknown')
              AND next_attempt_at <= now()
            ORDER BY next_attempt_at
            LIMIT $2
            FOR UPDATE SKIP LOCKED
        )
        UPDATE dingsync.actions a SET
            state = CASE WHEN due.previous = 'pending' THEN 'sending' ELSE 'unknown' END,
            attempts = a.attempts + CASE WHEN due.previous = 'pending' THEN 1 ELSE 0 END,
            sent_at = CASE WHEN due.previous = 'pending' THEN coalesce(a.sent_at, now()) ELSE a.sent_at END,
            last_error = CASE WHEN due.previous = 'sending'
                THEN 'the worker sending this action stopped before it got an answer; reading the approval back before anything else'
                ELSE a.last_error END,
            next_attempt_at = now() + make_interval(secs =>
                CASE WHEN due.previous = 'sending' THEN $4 ELSE $3 END),
            updated_at = now()
        FROM due
        WHERE a.corp_id = due.corp_id AND a.id = due.id
        RETURNING {COLUMNS}, due.previous, due.sends"
    );
    sqlx::query(&sql)
        .bind(corp_id)
        .bind(limit)
        .bind(lease.as_secs_f64())
        .bind(settle.as_secs_f64())
        .try_map(|row: sqlx::postgres::PgRow| {
            use sqlx::{FromRow, Row};
            let previous: String = row.try_get("previous")?;
            let sends: i32 = row.try_get("sends")?;
            let work = match previous.as_str() {
                "pending" if sends == 0 => ActionWork::Send,
                "sending" => ActionWork::TakenOver,
                _ => ActionWork::Verify,
            };
            Ok(ActionClaim {
                row: ActionRow::from_row(&row)?,
                work,
            })
        })
        .fetch_all(pool)
        .await
}

/// When the next action of `corp_id` falls due (None: nothing left to do).
pub async fn next_due(pool: &PgPool, corp_id: &str) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar(
        "SELECT min(next_attempt_at) FROM dingsync.actions
         WHERE corp_id = $1 AND state IN ('pending', 'sending', 'unknown')",
    )
    .bind(corp_id)
    .fetch_one(pool)
    .await
}

/// A read-back found the action not carried out: send it again, `sending`, its attempt counted
/// and its lease renewed. False when the row was resolved meanwhile.
pub async fn resend(pool: &PgPool, corp_id: &str, id: i64, lease: Duration) -> sqlx::Result<bool> {
    let sql = format!(
        "UPDATE dingsync.actions SET state = 'sending', attempts = attempts + 1,
                sent_at = coalesce(sent_at, now()),
                next_attempt_at = now() + make_interval(secs => $3), updated_at = now()
         WHERE corp_id = $1 AND id = $2 AND state IN {OPEN}"
    );
    let done = sqlx::query(&sql)
        .bind(corp_id)
        .bind(id)
        .bind(lease.as_secs_f64())
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// DingTalk carried these actions out: `done`, in one statement (one commit for the batch:
/// PostgreSQL serialises the commits of transactions that NOTIFY, and each row's change does).
/// Returns the ids that changed (the others were resolved elsewhere).
pub async fn record_done(pool: &PgPool, corp_id: &str, ids: &[i64]) -> sqlx::Result<Vec<i64>> {
    let sql = format!(
        "UPDATE dingsync.actions SET state = 'done', last_error = NULL, done_at = now(),
                next_attempt_at = now(), updated_at = now()
         WHERE corp_id = $1 AND id = ANY($2) AND state IN {OPEN}
         RETURNING id"
    );
    sqlx::query_scalar(&sql)
        .bind(corp_id)
        .bind(ids)
        .fetch_all(pool)
        .await
}

/// DingTalk refused the action for good: `failed` with its reason.
pub async fn record_failed(
    pool: &PgPool,
    corp_id: &str,
    id: i64,
    error: &str,
) -> sqlx::Result<bool> {
    let sql = format!(
        "UPDATE dingsync.actions SET state = 'failed', last_error = $3, done_at = now(),
                next_attempt_at = now(), updated_at = now()
         WHERE corp_id = $1 AND id = $2 AND state IN {OPEN}"
    );
    let done = sqlx::query(&sql)
        .bind(corp_id)
        .bind(id)
        .bind(error)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Someone acted in DingTalk first: `superseded`, with who (when DingTalk says), how and when.
pub async fn record_superseded(
    pool: &PgPool,
    corp_id: &str,
    id: i64,
    by: Option<&str>,
    how: &str,
    at: Option<DateTime<Utc>>,
    detail: &str,
) -> sqlx::Result<bool> {
    let sql = format!(
        "UPDATE dingsync.actions SET state = 'superseded', superseded_by = $3,
                superseded_how = $4, superseded_at = $5, last_error = $6, done_at = now(),
                next_attempt_at = now(), updated_at = now()
         WHERE corp_id = $1 AND id = $2 AND state IN {OPEN}"
    );
    let done = sqlx::query(&sql)
        .bind(corp_id)
        .bind(id)
        .bind(by)
        .bind(how)
        .bind(at)
        .bind(detail)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Certainly not carried out: back to `pending`, due after `delay`.
pub async fn record_retry(
    pool: &PgPool,
    corp_id: &str,
    id: i64,
    error: &str,
    delay: Duration,
) -> sqlx::Result<bool> {
    let sql = format!(
        "UPDATE dingsync.actions SET state = 'pending', last_error = $3,
                next_attempt_at = now() + make_interval(secs => $4), updated_at = now()
         WHERE corp_id = $1 AND id = $2 AND state IN {OPEN}"
    );
    let done = sqlx::query(&sql)
        .bind(corp_id)
        .bind(id)
        .bind(error)
        .bind(delay.as_secs_f64())
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Not sent: the monthly allowance is used up (docs/dingtalk.md §7). Back to `pending` without
/// counting the attempt (the claim counted it), due after `delay`; `last_error` is the outbox's
/// [`PAUSED`](super::outbox::PAUSED) followed by `detail`, so that `dingsync quota resume` finds
/// it ([`resume_paused`]). Only from `sending`: an `unknown` row stays one (its read-back is
/// what waits).
pub async fn record_paused(
    pool: &PgPool,
    corp_id: &str,
    id: i64,
    detail: &str,
    delay: Duration,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE dingsync.actions SET state = 'pending', attempts = greatest(attempts - 1, 0),
                last_error = $3 || $4, next_attempt_at = now() + make_interval(secs => $5),
                updated_at = now()
         WHERE corp_id = $1 AND id = $2 AND state = 'sending'",
    )
    .bind(corp_id)
    .bind(id)
    .bind(super::outbox::PAUSED)
    .bind(detail)
    .bind(delay.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// The pause is lifted: actions of `corp_id` waiting for the allowance fall due after `delay`.
pub async fn resume_paused(pool: &PgPool, corp_id: &str, delay: Duration) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "UPDATE dingsync.actions SET
                next_attempt_at = least(next_attempt_at, now() + make_interval(secs => $3)),
                updated_at = now()
         WHERE corp_id = $1 AND state IN ('pending', 'unknown') AND starts_with(last_error, $2)",
    )
    .bind(corp_id)
    .bind(super::outbox::PAUSED)
    .bind(delay.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Maybe carried out, maybe not: `unknown`, read back after `delay`.
pub async fn record_unknown(
    pool: &PgPool,
    corp_id: &str,
    ids: &[i64],
    error: &str,
    delay: Duration,
) -> sqlx::Result<u64> {
    let sql = format!(
        "UPDATE dingsync.actions SET state = 'unknown', last_error = $3,
                next_attempt_at = now() + make_interval(secs => $4), updated_at = now()
         WHERE corp_id = $1 AND id = ANY($2) AND state IN {OPEN}"
    );
    let done = sqlx::query(&sql)
        .bind(corp_id)
        .bind(ids)
        .bind(error)
        .bind(delay.as_secs_f64())
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

/// Gives back a claimed row never worked on (the worker is stopping): `sending` goes back to
/// `pending` without counting the attempt, `unknown` stays `unknown`; both due at once.
pub async fn release(pool: &PgPool, corp_id: &str, id: i64) -> sqlx::Result<()> {
    let sql = format!(
        "UPDATE dingsync.actions SET
                state = CASE WHEN state = 'sending' THEN 'pending' ELSE state END,
                attempts = CASE WHEN state = 'sending' THEN greatest(attempts - 1, 0) ELSE attempts END,
                next_attempt_at = now(), updated_at = now()
         WHERE corp_id = $1 AND id = $2 AND state IN {OPEN}"
    );
    sqlx::query(&sql)
        .bind(corp_id)
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// How long before an action's insert a comment found on read-back may be dated and still be
/// its own: DingTalk's v1.0 times are whole minutes (docs/dingtalk.md §2.6), and the clocks of
/// DingTalk and PostgreSQL may disagree by a few seconds.
const COMMENT_MARGIN: TimeDelta = TimeDelta::seconds(65);

/// A comment's read-back: `found` are the dates of the comments DingTalk holds with this
/// action's author and text. Each `done` comment action with the same author and text owns one
/// of them, so the action is `done` when DingTalk holds more of them (dated no earlier than the
/// oldest such action) than those actions; otherwise it was not carried out. Serialised per
/// approval (an advisory lock for the transaction), so that two read-backs never both take the
/// same comment. Returns whether the row became `done`.
pub async fn record_comment_found(
    pool: &PgPool,
    corp_id: &str,
    row: &ActionRow,
    found: &[Option<DateTime<Utc>>],
) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 20))")
        .bind(corp_id)
        .bind(&row.process_instance_id)
        .execute(&mut *tx)
        .await?;
    let (oldest, done): (Option<DateTime<Utc>>, i64) = sqlx::query_as(
        "SELECT min(created_at) FILTER (WHERE state NOT IN ('failed', 'cancelled')),
                count(*) FILTER (WHERE state = 'done')
         FROM dingsync.actions
         WHERE corp_id = $1 AND process_instance_id = $2 AND action = 'comment'
           AND actor_user_id = $3 AND remark = $4",
    )
    .bind(corp_id)
    .bind(&row.process_instance_id)
    .bind(&row.actor_user_id)
    .bind(&row.remark)
    .fetch_one(&mut *tx)
    .await?;
    let since = oldest.unwrap_or(row.created_at) - COMMENT_MARGIN;
    let held = found
        .iter()
        .filter(|d| d.is_none_or(|d| d >= since))
        .count() as i64;
    let mut became_done = false;
    if held > done {
        let sql = format!(
            "UPDATE dingsync.actions SET state = 'done', last_error = NULL, done_at = now(),
                    next_attempt_at = now(), updated_at = now()
             WHERE corp_id = $1 AND id = $2 AND state IN {OPEN}"
        );
        became_done = sqlx::query(&sql)
            .bind(corp_id)
            .bind(row.id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
    }
    tx.commit().await?;
    Ok(became_done)
}

/// Rows for `dingsync actions list`, newest first.
pub async fn list(pool: &PgPool, state: Option<&str>, limit: i64) -> sqlx::Result<Vec<ActionRow>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM dingsync.actions a
         WHERE ($1::text IS NULL OR a.state = $1)
         ORDER BY a.id DESC LIMIT $2"
    );
    sqlx::query_as(&sql)
        .bind(state)
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// One row by id.
pub async fn get(pool: &PgPool, id: i64) -> sqlx::Result<Option<ActionRow>> {
    let sql = format!("SELECT {COLUMNS} FROM dingsync.actions a WHERE a.id = $1");
    sqlx::query_as(&sql).bind(id).fetch_optional(pool).await
}

/// `dingsync actions retry`: a `failed` or `cancelled` row goes back to `pending` with its
/// attempts reset, and the workers are woken. Returns the state the row was in (None: no such
/// row); the row changed only if that was `failed` or `cancelled`. The worker reads the approval
/// back before sending a row sent before, so a retry never doubles an action.
pub async fn retry(pool: &PgPool, id: i64) -> sqlx::Result<Option<String>> {
    let mut tx = pool.begin().await?;
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM dingsync.actions WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    if matches!(state.as_deref(), Some("failed" | "cancelled")) {
        // A fresh allowance of attempts; one sent before keeps attempts 1, so that its next claim
        // reads the approval back first.
        sqlx::query(
            "UPDATE dingsync.actions SET state = 'pending', attempts = least(attempts, 1),
                    next_attempt_at = now(),
                    done_at = NULL, updated_at = now(),
                    last_error = 'retried by an operator after: ' || coalesce(last_error, state)
             WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT pg_notify('dingsync_actions', '')")
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(state)
}

/// `dingsync actions cancel`: a `pending` or `failed` row becomes `cancelled`. Returns the state
/// the row was in. Rows in flight (`sending`, `unknown`) cannot be cancelled: DingTalk may
/// already have carried them out.
pub async fn cancel(pool: &PgPool, id: i64) -> sqlx::Result<Option<String>> {
    let mut tx = pool.begin().await?;
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM dingsync.actions WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    if matches!(state.as_deref(), Some("pending" | "failed")) {
        sqlx::query(
            "UPDATE dingsync.actions SET state = 'cancelled', done_at = now(), updated_at = now(),
                    last_error = coalesce(last_error || '; ', '') || 'cancelled by an operator'
             WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(state)
}

/// Acts on an approval the way a business app does, through `dingsync.request_action` (tests,
/// benchmarks and the demo use the same path as real apps). Returns the row id.
#[allow(clippy::too_many_arguments)]
pub async fn request_action(
    db: impl PgExecutor<'_>,
    idempotency_key: &str,
    action: &str,
    process_instance_id: &str,
    task_id: Option<i64>,
    actor_user_id: Option<&str>,
    remark: Option<&str>,
    to_user_id: Option<&str>,
    as_system: bool,
) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT dingsync.request_action($1, $2, $3, $4, $5, $6, $7, $8)")
        .bind(idempotency_key)
        .bind(action)
        .bind(process_instance_id)
        .bind(task_id)
        .bind(actor_user_id)
        .bind(remark)
        .bind(to_user_id)
        .bind(as_system)
        .fetch_one(db)
        .await
}
