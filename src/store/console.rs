//! What the admin console reads and nothing else writes here: summaries over the events, the
//! outbox, the actions, the run log and the approvals, each bounded (a time window or a row
//! limit) so that a page costs the database a few small queries. The console's retry and cancel
//! are `outbox::retry`/`cancel` and `actions::retry`/`cancel`, the CLI's own.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgExecutor, PgPool, Row};

/// Events stored in one minute from one source (`http_push`, `stream`, `failed_list`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MinuteCount {
    pub minute: DateTime<Utc>,
    pub source: String,
    pub count: i64,
}

/// Events stored per minute and source over the last `minutes` minutes (the BRIN index on
/// `received_at` keeps this to the newest block ranges).
pub async fn events_per_minute(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    minutes: i32,
) -> sqlx::Result<Vec<MinuteCount>> {
    let rows = sqlx::query(
        "SELECT date_trunc('minute', received_at) AS minute, source, count(*)
         FROM dingsync.events
         WHERE corp_id = $1 AND received_at > now() - make_interval(mins => $2)
         GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(corp_id)
    .bind(minutes)
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(MinuteCount {
                minute: r.try_get(0)?,
                source: r.try_get(1)?,
                count: r.try_get(2)?,
            })
        })
        .collect()
}

/// The newest stored event: when it was committed and where it came from.
pub async fn last_event(
    db: impl PgExecutor<'_>,
    corp_id: &str,
) -> sqlx::Result<Option<(DateTime<Utc>, String)>> {
    // By the primary key's order (arrival order), not received_at: the index is there.
    sqlx::query_as(
        "SELECT received_at, source FROM dingsync.events WHERE corp_id = $1
         ORDER BY id DESC LIMIT 1",
    )
    .bind(corp_id)
    .fetch_optional(db)
    .await
}

/// A replica as the run log shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Replica {
    pub replica: String,
    pub last_run_at: DateTime<Utc>,
    pub runs: i64,
}

/// Replicas that ran a job in the last `hours`, the most recent first.
pub async fn replicas(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    hours: i32,
) -> sqlx::Result<Vec<Replica>> {
    sqlx::query_as(
        "SELECT replica, max(started_at) AS last_run_at, count(*) AS runs
         FROM dingsync.job_runs
         WHERE corp_id = $1 AND started_at > now() - make_interval(hours => $2)
         GROUP BY replica ORDER BY 2 DESC LIMIT 20",
    )
    .bind(corp_id)
    .bind(hours)
    .fetch_all(db)
    .await
}

/// One run of a scheduled job.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRun {
    pub id: i64,
    pub job: String,
    pub replica: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: String,
    pub counts: Value,
    pub error: Option<String>,
}

/// The latest run of each job.
pub async fn latest_runs(db: impl PgExecutor<'_>, corp_id: &str) -> sqlx::Result<Vec<JobRun>> {
    sqlx::query_as(
        "SELECT DISTINCT ON (job) id, job, replica, started_at, finished_at, outcome, counts, error
         FROM dingsync.job_runs WHERE corp_id = $1
           AND started_at > now() - interval '30 days'
         ORDER BY job, started_at DESC",
    )
    .bind(corp_id)
    .fetch_all(db)
    .await
}

/// The newest `limit` runs, of every job.
pub async fn recent_runs(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    limit: i64,
) -> sqlx::Result<Vec<JobRun>> {
    sqlx::query_as(
        "SELECT id, job, replica, started_at, finished_at, outcome, counts, error
         FROM dingsync.job_runs WHERE corp_id = $1
         ORDER BY id DESC LIMIT $2",
    )
    .bind(corp_id)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Rows of `dingsync.outbox` (`table = Outbox`) or `dingsync.actions` by state.
#[derive(Debug, Clone, Copy)]
pub enum Queue {
    Outbox,
    Actions,
}

/// Every state with its number of rows, of every organisation.
pub async fn states(db: impl PgExecutor<'_>, queue: Queue) -> sqlx::Result<Vec<(String, i64)>> {
    let sql = match queue {
        Queue::Outbox => "SELECT state, count(*) FROM dingsync.outbox GROUP BY 1 ORDER BY 1",
        Queue::Actions => "SELECT state, count(*) FROM dingsync.actions GROUP BY 1 ORDER BY 1",
    };
    sqlx::query_as(sql).fetch_all(db).await
}

/// When an outbox row last changed and was finished: its history besides its events.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxTimes {
    pub updated_at: DateTime<Utc>,
    pub done_at: Option<DateTime<Utc>>,
}

/// `updated_at` and `done_at` of an outbox row (not in `outbox::OutboxRow`, which the worker reads).
pub async fn outbox_times(db: impl PgExecutor<'_>, id: i64) -> sqlx::Result<Option<OutboxTimes>> {
    sqlx::query_as("SELECT updated_at, done_at FROM dingsync.outbox WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await
}

/// One approval as the console lists it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApprovalSummary {
    pub corp_id: String,
    pub process_instance_id: String,
    pub process_code: Option<String>,
    /// The template's name, from the newest stored form schema.
    pub template: Option<String>,
    pub title: Option<String>,
    pub business_id: Option<String>,
    pub originator_userid: Option<String>,
    pub status: String,
    pub result: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outbox_id: Option<i64>,
    pub last_event_at: Option<DateTime<Utc>>,
    pub detail_synced_at: Option<DateTime<Utc>>,
    pub detail_wanted_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

const SUMMARY: &str = "a.corp_id, a.process_instance_id, a.process_code,
    (SELECT f.name FROM dingsync.process_forms f
     WHERE f.corp_id = a.corp_id AND f.process_code = a.process_code
     ORDER BY f.version DESC LIMIT 1) AS template,
    a.title, a.business_id, a.originator_userid, a.status, a.result, a.created_at,
    a.finished_at, a.outbox_id, a.last_event_at, a.detail_synced_at, a.detail_wanted_at,
    a.updated_at";

/// Approvals whose instance id, business key (`business_id`, or the outbox row's
/// idempotency key), originator, template code or template name is `term` (an empty term: the
/// latest approvals), the most recently changed first.
pub async fn search_approvals(
    db: impl PgExecutor<'_>,
    term: &str,
    limit: i64,
) -> sqlx::Result<Vec<ApprovalSummary>> {
    let sql = format!(
        "SELECT {SUMMARY} FROM dingsync.approvals a
         WHERE $1 = ''
            OR a.process_instance_id = $1 OR a.business_id = $1 OR a.originator_userid = $1
            OR a.process_code = $1
            OR EXISTS (SELECT 1 FROM dingsync.outbox o
                       WHERE o.corp_id = a.corp_id AND o.id = a.outbox_id
                         AND o.idempotency_key = $1)
            OR EXISTS (SELECT 1 FROM dingsync.process_forms f
                       WHERE f.corp_id = a.corp_id AND f.process_code = a.process_code
                         AND f.name = $1)
         ORDER BY a.updated_at DESC LIMIT $2"
    );
    sqlx::query_as(&sql)
        .bind(term)
        .bind(limit)
        .fetch_all(db)
        .await
}

/// One approval by instance id (of any organisation served here).
pub async fn approval(
    db: impl PgExecutor<'_>,
    process_instance_id: &str,
) -> sqlx::Result<Option<ApprovalSummary>> {
    let sql = format!(
        "SELECT {SUMMARY} FROM dingsync.approvals a WHERE a.process_instance_id = $1
         ORDER BY a.updated_at DESC LIMIT 1"
    );
    sqlx::query_as(&sql)
        .bind(process_instance_id)
        .fetch_optional(db)
        .await
}

/// Approvals an event marked for a detail fetch that has not happened yet, oldest first, and
/// how many there are in all.
pub async fn awaiting_details(
    pool: &PgPool,
    corp_id: &str,
    limit: i64,
) -> sqlx::Result<(i64, Vec<ApprovalSummary>)> {
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dingsync.approvals
         WHERE corp_id = $1 AND detail_wanted_at IS NOT NULL",
    )
    .bind(corp_id)
    .fetch_one(pool)
    .await?;
    let sql = format!(
        "SELECT {SUMMARY} FROM dingsync.approvals a
         WHERE a.corp_id = $1 AND a.detail_wanted_at IS NOT NULL
         ORDER BY a.detail_wanted_at LIMIT $2"
    );
    let rows = sqlx::query_as(&sql)
        .bind(corp_id)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok((total, rows))
}

/// One stored event of an approval, and what it set.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApprovalEvent {
    pub id: i64,
    pub source: String,
    pub event_type: String,
    pub change_type: Option<String>,
    pub task_id: Option<i64>,
    pub event_time: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    /// The payload's fields that change the row: `result`, `type`, `staffId`, `title`, ...
    pub payload: Value,
}

/// Every stored event of one approval in arrival order (at most `limit`).
pub async fn approval_events(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    process_instance_id: &str,
    limit: i64,
) -> sqlx::Result<Vec<ApprovalEvent>> {
    sqlx::query_as(
        "SELECT id, source, event_type, change_type, task_id, event_time, received_at, payload
         FROM dingsync.events
         WHERE corp_id = $1 AND process_instance_id = $2
         ORDER BY id LIMIT $3",
    )
    .bind(corp_id)
    .bind(process_instance_id)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// One approver task of an approval.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Task {
    pub task_id: i64,
    pub userid: Option<String>,
    pub status: String,
    pub result: Option<String>,
}

/// The approval's tasks by id.
pub async fn approval_tasks(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    process_instance_id: &str,
) -> sqlx::Result<Vec<Task>> {
    sqlx::query_as(
        "SELECT task_id, userid, status, result FROM dingsync.approval_tasks
         WHERE corp_id = $1 AND process_instance_id = $2 ORDER BY task_id LIMIT 200",
    )
    .bind(corp_id)
    .bind(process_instance_id)
    .fetch_all(db)
    .await
}
