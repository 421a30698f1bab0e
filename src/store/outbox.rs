//! `dingsync.outbox` (and `dingsync.corps`): claiming due rows, recording what DingTalk answered,
//! and the operator's view. Every state change is one statement guarded by the state it expects,
//! so a late or repeated write changes nothing.
//!
//! States: `pending` → `sending` (claimed, create in flight) → `created` | `failed` | `pending`
//! (transient, backing off) | `unknown` (no answer: searched for, never blindly resent) →
//! `created` (found and adopted) | `pending` (certainly absent). Operators move `failed` back to
//! `pending` and `pending`/`failed` to `cancelled`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgExecutor, PgPool};

/// One outbox row as the worker and the CLI see it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub corp_id: String,
    pub id: i64,
    pub idempotency_key: String,
    pub process_code: String,
    pub originator_user_id: String,
    pub dept_id: i64,
    pub form_values: Value,
    pub approvers: Option<Value>,
    pub cc_list: Option<Vec<String>>,
    pub cc_position: Option<String>,
    /// `{"<actionerKey>": ["userid", ...]}` for the template's self-selected nodes (V19).
    pub select_approvers: Option<Value>,
    pub state: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub process_instance_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A claimed row and what to do with it.
#[derive(Debug, Clone)]
pub struct Claim {
    pub row: OutboxRow,
    pub work: Work,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Send the create (the row was pending; it is now `sending`, `attempts` counts this send).
    Send,
    /// Find out whether an unanswered create took effect (the row is `unknown`).
    Search,
    /// The row was left `sending` by a worker whose lease ran out (stopped or killed mid-send).
    /// It is now `unknown` and due only after `lost_settle_ms`: its create may have left just
    /// before the worker died and still be on its way through DingTalk's gateway, so the search
    /// waits as it does after any unanswered create. Nothing to do now.
    TakenOver,
}

const COLUMNS: &str = "o.corp_id, o.id, o.idempotency_key, o.process_code, o.originator_user_id, \
    o.dept_id, o.form_values, o.approvers, o.cc_list, o.cc_position, o.select_approvers, \
    o.state, o.attempts, \
    o.next_attempt_at, o.sent_at, o.last_error, o.process_instance_id, o.created_at";

/// Records that a daemon serves `corp_id` (see `dingsync.default_corp_id()`).
pub async fn register_corp(db: impl PgExecutor<'_>, corp_id: &str) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO dingsync.corps (corp_id) VALUES ($1)
         ON CONFLICT (corp_id) DO UPDATE SET last_started_at = now()",
    )
    .bind(corp_id)
    .execute(db)
    .await?;
    Ok(())
}

/// Claims up to `limit` due rows of `corp_id` in one short transaction (one statement), with a
/// lease of `lease`: pending rows become `sending`; `unknown` rows and `sending` rows whose lease
/// expired are handed out for a search. Rows another worker holds are skipped, not waited for.
pub async fn claim(
    pool: &PgPool,
    corp_id: &str,
    limit: i64,
    lease: Duration,
    settle: Duration,
) -> sqlx::Result<Vec<Claim>> {
    let sql = format!(
        "WITH due AS (
            SELECT corp_id, id, state AS previous FROM dingsync.outbox
            WHERE corp_id = $1 AND state IN ('pending', 'sending', 'unknown')
              AND next_attempt_at <= now()
            ORDER BY next_attempt_at
            LIMIT $2
            FOR UPDATE SKIP LOCKED
        )
        UPDATE dingsync.outbox o SET
            state = CASE WHEN due.previous = 'pending' THEN 'sending' ELSE 'unknown' END,
            attempts = o.attempts + CASE WHEN due.previous = 'pending' THEN 1 ELSE 0 END,
            sent_at = CASE WHEN due.previous = 'pending' THEN now() ELSE o.sent_at END,
            last_error = CASE WHEN due.previous = 'sending'
                THEN 'the worker sending this create stopped before it got an answer; searching DingTalk for the instance'
                ELSE o.last_error END,
            next_attempt_at = now() + make_interval(secs =>
                CASE WHEN due.previous = 'sending' THEN $4 ELSE $3 END),
            updated_at = now()
        FROM due
        WHERE o.corp_id = due.corp_id AND o.id = due.id
        RETURNING {COLUMNS}, due.previous"
    );
    let rows = sqlx::query(&sql)
        .bind(corp_id)
        .bind(limit)
        .bind(lease.as_secs_f64())
        .bind(settle.as_secs_f64())
        .try_map(|row: sqlx::postgres::PgRow| {
            use sqlx::{FromRow, Row};
            let previous: String = row.try_get("previous")?;
            let work = match previous.as_str() {
                "pending" => Work::Send,
                "sending" => Work::TakenOver,
                _ => Work::Search,
            };
            Ok(Claim {
                row: OutboxRow::from_row(&row)?,
                work,
            })
        })
        .fetch_all(pool)
        .await?;
    Ok(rows)
}

/// When the next row of `corp_id` falls due (None: nothing left to do).
pub async fn next_due(pool: &PgPool, corp_id: &str) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar(
        "SELECT min(next_attempt_at) FROM dingsync.outbox
         WHERE corp_id = $1 AND state IN ('pending', 'sending', 'unknown')",
    )
    .bind(corp_id)
    .fetch_one(pool)
    .await
}

/// Organisations other than `served` with outbox rows still to send, and how many: rows that no
/// app of this deployment will take (another deployment may serve them, or nobody does).
pub async fn open_rows_elsewhere(
    pool: &PgPool,
    served: &[String],
) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT corp_id, count(*) FROM dingsync.outbox
         WHERE state IN ('pending', 'sending', 'unknown') AND corp_id <> ALL($1)
         GROUP BY corp_id ORDER BY corp_id",
    )
    .bind(served)
    .fetch_all(pool)
    .await
}

/// The approvals exist in DingTalk: marks each row `(id, process_instance_id)` `created` and links
/// (or inserts) its approval row (`store::approvals::outbox_link_sql!`), all in one statement: one
/// commit for the whole batch, since commits that NOTIFY are serialised by PostgreSQL. A row is changed only while `sending` or
/// `unknown`; returns the ids that were. Fails as a whole if an instance is already owned by
/// another outbox row (`outbox_instance_unique`): see [`record_created`].
pub async fn record_created_batch(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    created: &[(i64, String)],
) -> sqlx::Result<Vec<i64>> {
    let ids: Vec<i64> = created.iter().map(|(id, _)| *id).collect();
    let pids: Vec<&str> = created.iter().map(|(_, pid)| pid.as_str()).collect();
    sqlx::query_scalar(concat!(
        "WITH o AS (
            UPDATE dingsync.outbox o SET
                state = 'created', process_instance_id = x.pid, last_error = NULL,
                done_at = now(), updated_at = now()
            FROM unnest($2::bigint[], $3::text[]) AS x(id, pid)
            WHERE o.corp_id = $1 AND o.id = x.id AND o.state IN ('sending', 'unknown')
            RETURNING o.corp_id, o.id, o.process_instance_id, o.process_code,
                      o.originator_user_id, o.dept_id
        ),
        ",
        super::approvals::outbox_link_sql!(),
        "
        SELECT outbox_id FROM ap WHERE pg_notify('dingsync_approval_changed', process_instance_id) IS NOT NULL",
    ))
    .bind(corp_id)
    .bind(ids)
    .bind(pids)
    .fetch_all(db)
    .await
}

/// One row's approval exists in DingTalk as `process_instance_id` (see [`record_created_batch`]).
/// Returns false when the row was no longer `sending`/`unknown` (someone else already recorded
/// an outcome) or when another outbox row already owns that instance.
pub async fn record_created(
    pool: &PgPool,
    corp_id: &str,
    id: i64,
    process_instance_id: &str,
) -> sqlx::Result<bool> {
    match record_created_batch(pool, corp_id, &[(id, process_instance_id.to_string())]).await {
        Ok(applied) => Ok(applied.contains(&id)),
        Err(e) if is_constraint(&e, "outbox_instance_unique") => Ok(false),
        Err(e) => Err(e),
    }
}

/// DingTalk refused the request for good: `failed` with its reason.
pub async fn record_failed(
    pool: &PgPool,
    corp_id: &str,
    id: i64,
    error: &str,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE dingsync.outbox SET state = 'failed', last_error = $3, done_at = now(),
                next_attempt_at = now(), updated_at = now()
         WHERE corp_id = $1 AND id = $2 AND state IN ('sending', 'unknown')",
    )
    .bind(corp_id)
    .bind(id)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Not created, certainly: back to `pending`, due after `delay`.
pub async fn record_retry(
    pool: &PgPool,
    corp_id: &str,
    id: i64,
    error: &str,
    delay: Duration,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE dingsync.outbox SET state = 'pending', last_error = $3,
                next_attempt_at = now() + make_interval(secs => $4), updated_at = now()
         WHERE corp_id = $1 AND id = $2 AND state IN ('sending', 'unknown')",
    )
    .bind(corp_id)
    .bind(id)
    .bind(error)
    .bind(delay.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// What the `last_error` of a row waiting for the monthly allowance begins with; how
/// [`resume_paused`] finds them.
pub const PAUSED: &str = "DingTalk's monthly API allowance is used up";

/// Not sent: the monthly allowance is used up (docs/dingtalk.md §7). Back to `pending` without
/// counting the attempt against `outbox.max_attempts` (the claim counted it), due after `delay`;
/// `last_error` is [`PAUSED`] followed by `detail`.
pub async fn record_paused(
    pool: &PgPool,
    corp_id: &str,
    id: i64,
    detail: &str,
    delay: Duration,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE dingsync.outbox SET state = 'pending', attempts = greatest(attempts - 1, 0),
                last_error = $3 || $4, next_attempt_at = now() + make_interval(secs => $5),
                updated_at = now()
         WHERE corp_id = $1 AND id = $2 AND state = 'sending'",
    )
    .bind(corp_id)
    .bind(id)
    .bind(PAUSED)
    .bind(detail)
    .bind(delay.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// The pause is lifted: `pending` rows of `corp_id` waiting for the allowance fall due after
/// `delay` (time for every replica's gate to see the lift); how many.
pub async fn resume_paused(pool: &PgPool, corp_id: &str, delay: Duration) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "UPDATE dingsync.outbox SET
                next_attempt_at = least(next_attempt_at, now() + make_interval(secs => $3)),
                updated_at = now()
         WHERE corp_id = $1 AND state = 'pending' AND starts_with(last_error, $2)",
    )
    .bind(corp_id)
    .bind(PAUSED)
    .bind(delay.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Maybe created, maybe not: `unknown`, to be searched for after `delay`.
pub async fn record_unknown(
    pool: &PgPool,
    corp_id: &str,
    ids: &[i64],
    error: &str,
    delay: Duration,
) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "UPDATE dingsync.outbox SET state = 'unknown', last_error = $3,
                next_attempt_at = now() + make_interval(secs => $4), updated_at = now()
         WHERE corp_id = $1 AND id = ANY($2) AND state IN ('sending', 'unknown')",
    )
    .bind(corp_id)
    .bind(ids)
    .bind(error)
    .bind(delay.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Gives back a claimed row that was never worked on (the worker is stopping): a `sending` row
/// whose create was not sent goes back to `pending` without counting the attempt, an `unknown`
/// row stays `unknown`; both are due at once for the next worker.
pub async fn release(pool: &PgPool, corp_id: &str, id: i64) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE dingsync.outbox SET
                state = CASE WHEN state = 'sending' THEN 'pending' ELSE state END,
                attempts = CASE WHEN state = 'sending' THEN attempts - 1 ELSE attempts END,
                next_attempt_at = now(), updated_at = now()
         WHERE corp_id = $1 AND id = $2 AND state IN ('sending', 'unknown')",
    )
    .bind(corp_id)
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Of these instance ids, the ones an outbox row of `corp_id` already owns.
pub async fn owned_instances(
    pool: &PgPool,
    corp_id: &str,
    ids: &[String],
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT process_instance_id FROM dingsync.outbox
         WHERE corp_id = $1 AND process_instance_id = ANY($2)",
    )
    .bind(corp_id)
    .bind(ids)
    .fetch_all(pool)
    .await
}

/// A row of one originator whose create may have taken effect in DingTalk without our knowing:
/// `unknown` (no answer), or `sending` (an answer may still be on its way).
#[derive(Debug, Clone)]
pub struct InDoubt {
    pub row: OutboxRow,
    /// An `unknown` row whose create has certainly ended in DingTalk: it is due (its settle time
    /// is over), or it was sent longer than `settled_after` ago.
    pub settled: bool,
}

/// The `unknown` and `sending` rows of `corp_id` with this template and originator, oldest send
/// first (the order in which the lost-answer search pairs rows with instances).
pub async fn in_doubt(
    pool: &PgPool,
    corp_id: &str,
    process_code: &str,
    originator_user_id: &str,
    settled_after: Duration,
) -> sqlx::Result<Vec<InDoubt>> {
    let sql = format!(
        "SELECT {COLUMNS},
                o.state = 'unknown' AND (o.next_attempt_at <= clock_timestamp()
                    OR coalesce(o.sent_at, o.created_at) + make_interval(secs => $4)
                       <= clock_timestamp()) AS settled
         FROM dingsync.outbox o
         WHERE o.corp_id = $1 AND o.state IN ('unknown', 'sending')
           AND o.process_code = $2 AND o.originator_user_id = $3
         ORDER BY coalesce(o.sent_at, o.created_at), o.id"
    );
    sqlx::query(&sql)
        .bind(corp_id)
        .bind(process_code)
        .bind(originator_user_id)
        .bind(settled_after.as_secs_f64())
        .try_map(|row: sqlx::postgres::PgRow| {
            use sqlx::{FromRow, Row};
            Ok(InDoubt {
                row: OutboxRow::from_row(&row)?,
                settled: row.try_get("settled")?,
            })
        })
        .fetch_all(pool)
        .await
}

/// Takes the search lease of one originator's lost answers (`dingsync.outbox_search`) for
/// `lease`, unless another search holds it. Returns the lease's end, the token [`end_search`]
/// needs, or None when it is held.
pub async fn take_search(
    pool: &PgPool,
    corp_id: &str,
    process_code: &str,
    originator_user_id: &str,
    lease: Duration,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar(
        "INSERT INTO dingsync.outbox_search AS s
             (corp_id, process_code, originator_user_id, held_until)
         VALUES ($1, $2, $3, clock_timestamp() + make_interval(secs => $4))
         ON CONFLICT (corp_id, process_code, originator_user_id)
             DO UPDATE SET held_until = excluded.held_until
             WHERE s.held_until <= clock_timestamp()
         RETURNING held_until",
    )
    .bind(corp_id)
    .bind(process_code)
    .bind(originator_user_id)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await
}

/// Gives the search lease back, if it is still the one [`take_search`] returned.
pub async fn end_search(
    pool: &PgPool,
    corp_id: &str,
    process_code: &str,
    originator_user_id: &str,
    held_until: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query(
        "DELETE FROM dingsync.outbox_search
         WHERE corp_id = $1 AND process_code = $2 AND originator_user_id = $3
           AND held_until = $4",
    )
    .bind(corp_id)
    .bind(process_code)
    .bind(originator_user_id)
    .bind(held_until)
    .execute(pool)
    .await?;
    Ok(())
}

/// Rows for `dingsync outbox list`, newest first.
pub async fn list(pool: &PgPool, state: Option<&str>, limit: i64) -> sqlx::Result<Vec<OutboxRow>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM dingsync.outbox o
         WHERE ($1::text IS NULL OR o.state = $1)
         ORDER BY o.id DESC LIMIT $2"
    );
    sqlx::query_as(&sql)
        .bind(state)
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// One row by id.
pub async fn get(pool: &PgPool, id: i64) -> sqlx::Result<Option<OutboxRow>> {
    let sql = format!("SELECT {COLUMNS} FROM dingsync.outbox o WHERE o.id = $1");
    sqlx::query_as(&sql).bind(id).fetch_optional(pool).await
}

/// `dingsync outbox retry`: a `failed` or `cancelled` row goes back to `pending` with its attempts
/// reset, and the workers are woken. Returns the state the row was in (None: no such row); the
/// row changed only if that was `failed` or `cancelled`. Safe: a failed or cancelled row never
/// reached DingTalk as an approval.
pub async fn retry(pool: &PgPool, id: i64) -> sqlx::Result<Option<String>> {
    let mut tx = pool.begin().await?;
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM dingsync.outbox WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    if matches!(state.as_deref(), Some("failed" | "cancelled")) {
        sqlx::query(
            "UPDATE dingsync.outbox SET state = 'pending', attempts = 0, next_attempt_at = now(),
                    done_at = NULL, updated_at = now(),
                    last_error = 'retried by an operator after: ' || coalesce(last_error, state)
             WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT pg_notify('dingsync_outbox', '')")
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(state)
}

/// `dingsync outbox cancel`: a `pending` or `failed` row becomes `cancelled`. Returns the state
/// the row was in. Rows in flight (`sending`, `unknown`) cannot be cancelled: DingTalk may already
/// hold their approval.
pub async fn cancel(pool: &PgPool, id: i64) -> sqlx::Result<Option<String>> {
    let mut tx = pool.begin().await?;
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM dingsync.outbox WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    if matches!(state.as_deref(), Some("pending" | "failed")) {
        sqlx::query(
            "UPDATE dingsync.outbox SET state = 'cancelled', done_at = now(), updated_at = now(),
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

fn is_constraint(e: &sqlx::Error, name: &str) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.constraint() == Some(name))
}

/// Asks for an approval the way a business app does, through `dingsync.request_approval` (the
/// demo app uses it, so the demo exercises the same path as real apps). Returns the row id.
pub async fn request_approval(
    db: impl PgExecutor<'_>,
    idempotency_key: &str,
    process_code: &str,
    originator_user_id: &str,
    form_values: &serde_json::Value,
) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT dingsync.request_approval($1, $2, $3, $4)")
        .bind(idempotency_key)
        .bind(process_code)
        .bind(originator_user_id)
        .bind(form_values)
        .fetch_one(db)
        .await
}
