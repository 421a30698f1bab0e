//! `dingsync.approvals` and `dingsync.approval_tasks`: every write to them, and the reads of
//! reconcile (the detail-fetch and sweep queues, backfill, drift). Not the events themselves
//! (`store::batch`) nor the outbox rows (`store::outbox`).
//!
//! Three sources fold into the same rows, each through one entry point here:
//! - **a batch of events** (pushes, the failed-push list): [`Changes::fold`], then the CTEs of
//!   `event_changes_sql!` with `bind_event_changes`, which `store::batch` splices in. A tie keeps the stored row, so the
//!   first terminal state seen wins: events are hints that arrive late, twice and out of order,
//!   and a second terminal event at the same rank is no more right than the first (the detail
//!   fetch that every event asks for settles it). Descriptive fields fill in what is unknown.
//! - **a DingTalk snapshot** (`processinstance/get`): [`apply_snapshot`]. A tie takes DingTalk's:
//!   the snapshot is the truth as of its request, so it corrects a terminal state that events
//!   got wrong; it still never lowers a rank (an event may have moved the row further since the
//!   snapshot was requested; the next fetch confirms it). Details below.
//! - **an outbox link** (dingsync created the approval): the CTE of `outbox_link_sql!`, which
//!   `store::outbox` splices in. It only
//!   fills in and raises: the approval is at least RUNNING, and what events or a snapshot already
//!   said is never overwritten (the create's answer knows nothing newer than "it exists").
//!
//! All three decide the status by `dingsync.status_wins` (migration V9; the same rule as
//! `event::status_wins`, which folds a batch before it is written), with the tie as its
//! parameter; result, finish time, remark and next check follow the same answer.
//!
//! Why fragments: the event batch and the outbox link each write several tables in ONE statement
//! (one round trip, one commit; the event batch is the ingest hot path). Splitting out the
//! approval writes would cost a round trip per batch, so this module owns them as SQL fragments
//! (CTEs, spliced in with `concat!` at compile time) that `store::batch` and `store::outbox`
//! compose with the CTE of their own table. The statements stay single `&'static str`s with the
//! same plans, and the SQL that writes these two tables exists only in this file.
//!
//! The snapshot rule (applies to approvals and tasks alike):
//! - A snapshot is DingTalk's truth as of the moment it was requested (`snapshot_at`). One
//!   requested earlier than the snapshot already applied is ignored entirely: an older snapshot
//!   never overrides a newer one.
//! - The status never moves to a lower rank (`dingsync.status_wins` with ties winning). At the
//!   same or a higher rank the snapshot's status wins, with its result and finish time: so a
//!   snapshot corrects a terminal state that events got wrong (first-terminal-wins), but an event
//!   that moved the row further than a snapshot requested before it is kept (the next fetch
//!   confirms it).
//! - Descriptive fields (title, business id, originator, department, form values, operation
//!   records) are replaced by the snapshot's; `process_code`, `url` and `outbox_id` are never
//!   touched (the snapshot has no process_code or url; outbox_id belongs to the outbox).
//! - Times: the snapshot has whole seconds (Beijing-time strings), events have milliseconds. A
//!   stored time in the same second as the snapshot's is kept, so events and snapshots agree.

use std::collections::{HashMap, hash_map::Entry};

use chrono::{DateTime, Utc};
use sqlx::{Acquire, PgConnection, PgExecutor, Postgres, Row, postgres::PgArguments, query::Query};

use crate::{
    event::{ApprovalChange, Event, TaskChange},
    snapshot::Snapshot,
};

/// An approval waiting for its detail fetch.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub process_instance_id: String,
    pub wanted_at: DateTime<Utc>,
}

/// What became of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Applied; `changed` says whether status, result, times, form values or tasks changed.
    Yes { changed: bool },
    /// A snapshot requested later was applied already.
    Stale,
}

/// The database clock: the time a DingTalk request is stamped with (every replica shares it).
pub async fn clock(db: impl PgExecutor<'_>) -> sqlx::Result<DateTime<Utc>> {
    sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(db)
        .await
}

/// The next page of the detail-fetch queue after `after` (keyset, so one run visits each row
/// once): approvals an event marked, whose events have been quiet for `quiet_ms` (a burst
/// becomes one fetch) or that have waited `max_wait_ms` since their first unfetched event.
pub async fn wanted_page(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    quiet_ms: u64,
    max_wait_ms: u64,
    after: Option<&Wanted>,
    limit: u32,
) -> sqlx::Result<Vec<Wanted>> {
    let rows = sqlx::query(
        "SELECT process_instance_id, detail_wanted_at FROM dingsync.approvals
         WHERE detail_wanted_at IS NOT NULL AND corp_id = $1
           AND (last_event_at IS NULL
                OR last_event_at <= clock_timestamp() - make_interval(secs => $2)
                OR detail_wanted_at <= clock_timestamp() - make_interval(secs => $3))
           AND ($4::timestamptz IS NULL OR (detail_wanted_at, process_instance_id) > ($4, $5))
         ORDER BY detail_wanted_at, process_instance_id
         LIMIT $6",
    )
    .bind(corp_id)
    .bind(quiet_ms as f64 / 1000.0)
    .bind(max_wait_ms as f64 / 1000.0)
    .bind(after.map(|w| w.wanted_at))
    .bind(after.map_or("", |w| w.process_instance_id.as_str()))
    .bind(i64::from(limit))
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Wanted {
                process_instance_id: r.try_get(0)?,
                wanted_at: r.try_get(1)?,
            })
        })
        .collect()
}

/// The planner's re-checks, counted per approval (`sweep_checks`, `gap_checks`, migration V14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Sweep,
    Gap,
}

/// The next page of open approvals due for a sweep check by `run_started`: fewer than
/// `max_checks` checks so far, at least `first_s × 4^checks` seconds old (real time: the
/// planner converts its clock), and not held after a failed fetch. A run meets each approval
/// once: a check counts (`checked`) or holds it past `run_started` (`postpone`).
pub async fn sweep_page(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    run_started: DateTime<Utc>,
    first_s: f64,
    max_checks: u32,
    limit: u32,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT process_instance_id FROM dingsync.approvals
         WHERE corp_id = $1 AND status IN ('NEW', 'RUNNING') AND sweep_checks < $4
           AND (next_check_at IS NULL OR next_check_at <= $2)
           AND coalesce(created_at, updated_at)
               + make_interval(secs => $3 * power(4, sweep_checks)) <= $2
         ORDER BY coalesce(created_at, updated_at), process_instance_id
         LIMIT $5",
    )
    .bind(corp_id)
    .bind(run_started)
    .bind(first_s)
    .bind(max_checks as i32)
    .bind(i64::from(limit))
    .fetch_all(db)
    .await
}

/// The next page of approvals that miss an event, by `run_started`, fetched once already (the
/// detail fetch comes first), quiet for `after_s × 6^checks` seconds (real time) since their last
/// event or snapshot, with fewer than `max_checks` gap checks so far; either
/// - open (NEW/RUNNING) in the database without a RUNNING task: a running approval always waits
///   for someone, so the next task's start or the instance's end went missing; or
/// - finished in the database with a task still RUNNING: a finished approval waits for nobody, so
///   that task's end went missing (found through the running tasks' partial index, migration V17,
///   never by scanning the finished approvals).
pub async fn gap_page(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    run_started: DateTime<Utc>,
    after_s: f64,
    max_checks: u32,
    limit: u32,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "WITH suspect AS (
             SELECT a.process_instance_id, greatest(a.last_event_at, a.snapshot_at) AS quiet_since,
                    a.gap_checks, a.detail_wanted_at, a.next_check_at
             FROM dingsync.approvals a
             WHERE a.corp_id = $1 AND a.status IN ('NEW', 'RUNNING')
               AND NOT EXISTS (SELECT 1 FROM dingsync.approval_tasks t
                               WHERE t.corp_id = a.corp_id
                                 AND t.process_instance_id = a.process_instance_id
                                 AND t.status = 'RUNNING')
             UNION
             SELECT a.process_instance_id, greatest(a.last_event_at, a.snapshot_at),
                    a.gap_checks, a.detail_wanted_at, a.next_check_at
             FROM dingsync.approval_tasks t
             JOIN dingsync.approvals a
               ON a.corp_id = t.corp_id AND a.process_instance_id = t.process_instance_id
             WHERE t.corp_id = $1 AND t.status = 'RUNNING'
               AND a.status NOT IN ('NEW', 'RUNNING'))
         SELECT process_instance_id FROM suspect
         WHERE gap_checks < $4 AND detail_wanted_at IS NULL
           AND (next_check_at IS NULL OR next_check_at <= $2)
           AND quiet_since <= $2 - make_interval(secs => $3 * power(6, gap_checks))
         ORDER BY quiet_since, process_instance_id
         LIMIT $5",
    )
    .bind(corp_id)
    .bind(run_started)
    .bind(after_s)
    .bind(max_checks as i32)
    .bind(i64::from(limit))
    .fetch_all(db)
    .await
}

/// The next page of open approvals not fetched since `before` (never fetched first, then the
/// least recently checked), not held after a failed fetch: polling, and the pass after a month
/// in polling mode.
pub async fn unchecked_since_page(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    before: DateTime<Utc>,
    limit: u32,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT process_instance_id FROM dingsync.approvals
         WHERE corp_id = $1 AND status IN ('NEW', 'RUNNING')
           AND (snapshot_at IS NULL OR snapshot_at < $2)
           AND (next_check_at IS NULL OR next_check_at <= $2)
         ORDER BY snapshot_at NULLS FIRST, process_instance_id
         LIMIT $3",
    )
    .bind(corp_id)
    .bind(before)
    .bind(i64::from(limit))
    .fetch_all(db)
    .await
}

/// Counts one re-check of an approval.
pub async fn checked(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    process_instance_id: &str,
    check: Check,
) -> sqlx::Result<()> {
    let sql = match check {
        Check::Sweep => {
            "UPDATE dingsync.approvals SET sweep_checks = sweep_checks + 1
             WHERE corp_id = $1 AND process_instance_id = $2"
        }
        Check::Gap => {
            "UPDATE dingsync.approvals SET gap_checks = gap_checks + 1
             WHERE corp_id = $1 AND process_instance_id = $2"
        }
    };
    sqlx::query(sql)
        .bind(corp_id)
        .bind(process_instance_id)
        .execute(db)
        .await?;
    Ok(())
}

/// Approvals created through the outbox between `from` and `silence_s` seconds ago: how many
/// got no event at all, and how many in all. DingTalk pushes a start event within seconds of a
/// create, so silent ones say pushes are missing.
pub async fn outbox_silence(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    from: DateTime<Utc>,
    silence_s: f64,
) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE a.last_event_at IS NULL), count(*)
         FROM dingsync.approvals a
         JOIN dingsync.outbox o ON o.corp_id = a.corp_id AND o.id = a.outbox_id
         WHERE a.corp_id = $1 AND a.outbox_id IS NOT NULL
           AND o.done_at >= $2 AND o.done_at <= clock_timestamp() - make_interval(secs => $3)",
    )
    .bind(corp_id)
    .bind(from)
    .bind(silence_s)
    .fetch_one(db)
    .await
}

/// After a fetch that brought no snapshot (not found, unreadable, failed): leave the sweep queue
/// until `retry_in_s` from now, and (when `clear_wanted`) drop the detail-fetch mark unless an
/// event arrived after `requested_at`.
pub async fn postpone(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    process_instance_id: &str,
    requested_at: DateTime<Utc>,
    retry_in_s: u64,
    clear_wanted: bool,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE dingsync.approvals a
         SET next_check_at = clock_timestamp() + make_interval(secs => $3),
             detail_wanted_at = CASE WHEN $5 AND a.detail_wanted_at <= $4
                                          AND (a.last_event_at IS NULL OR a.last_event_at <= $4)
                                     THEN NULL ELSE a.detail_wanted_at END
         WHERE corp_id = $1 AND process_instance_id = $2",
    )
    .bind(corp_id)
    .bind(process_instance_id)
    .bind(retry_in_s as f64)
    .bind(requested_at)
    .bind(clear_wanted)
    .execute(db)
    .await?;
    Ok(())
}

/// Which of `ids` have a row already.
pub async fn known(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    ids: &[String],
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT process_instance_id FROM dingsync.approvals
         WHERE corp_id = $1 AND process_instance_id = ANY($2)",
    )
    .bind(corp_id)
    .bind(ids)
    .fetch_all(db)
    .await
}

/// What drift compares of one approval.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Stored {
    pub process_instance_id: String,
    pub status: String,
    pub result: Option<String>,
    pub title: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub form_values: Option<serde_json::Value>,
    /// `[task_id, status, result]` per task, ordered by task id.
    pub tasks: serde_json::Value,
}

/// The stored approvals with these ids.
pub async fn stored(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    ids: &[String],
) -> sqlx::Result<Vec<Stored>> {
    sqlx::query_as(
        "SELECT a.process_instance_id, a.status, a.result, a.title, a.created_at, a.finished_at,
                a.form_values,
                coalesce((SELECT jsonb_agg(jsonb_build_array(t.task_id, t.status, t.result)
                                           ORDER BY t.task_id)
                          FROM dingsync.approval_tasks t
                          WHERE t.corp_id = a.corp_id
                            AND t.process_instance_id = a.process_instance_id), '[]') AS tasks
         FROM dingsync.approvals a
         WHERE a.corp_id = $1 AND a.process_instance_id = ANY($2)",
    )
    .bind(corp_id)
    .bind(ids)
    .fetch_all(db)
    .await
}

/// Ids of approvals of `process_code` created in `[from, to]` (what a listing should return).
pub async fn ids_created_between(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    process_code: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT process_instance_id FROM dingsync.approvals
         WHERE corp_id = $1 AND process_code = $2 AND created_at BETWEEN $3 AND $4",
    )
    .bind(corp_id)
    .bind(process_code)
    .bind(from)
    .bind(to)
    .fetch_all(db)
    .await
}

/// What a snapshot applied earlier says about who started an approval and with what: enough
/// for the outbox to recognise its request without asking DingTalk again.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Started {
    pub process_instance_id: String,
    pub originator_userid: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    /// `processinstance/get`'s `form_component_values`, as the snapshot stored them.
    pub form_values: serde_json::Value,
}

/// Of these ids, the approvals a snapshot has been applied to (only a snapshot stores form
/// values: events carry none).
pub async fn started(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    ids: &[String],
) -> sqlx::Result<Vec<Started>> {
    sqlx::query_as(
        "SELECT process_instance_id, originator_userid, created_at, form_values
         FROM dingsync.approvals
         WHERE corp_id = $1 AND process_instance_id = ANY($2) AND form_values IS NOT NULL",
    )
    .bind(corp_id)
    .bind(ids)
    .fetch_all(db)
    .await
}

/// Where a snapshot came from (`approvals.snapshot_source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotSource {
    Details,
    Sweep,
    Gap,
    Poll,
    Backfill,
    /// The outbox's search for an instance whose create got no answer (migration V15).
    Search,
}

impl SnapshotSource {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotSource::Details => "details",
            SnapshotSource::Sweep => "sweep",
            SnapshotSource::Gap => "gap",
            SnapshotSource::Poll => "poll",
            SnapshotSource::Backfill => "backfill",
            SnapshotSource::Search => "search",
        }
    }
}

/// The fields whose change is worth a notification: status, result, finished_at, form_values.
type Outcome = (
    String,
    Option<String>,
    Option<DateTime<Utc>>,
    Option<serde_json::Value>,
);

/// Applies `snap` (requested at `requested_at`, DB clock) by the rule in the module docs, with
/// its tasks, in one transaction; notifies `dingsync_approval_changed` when something changed.
/// `process_code` fills a row that does not know it yet (a backfill knows what it listed).
pub async fn apply_snapshot(
    conn: &mut PgConnection,
    corp_id: &str,
    snap: &Snapshot,
    requested_at: DateTime<Utc>,
    source: SnapshotSource,
    process_code: Option<&str>,
) -> sqlx::Result<Applied> {
    let mut tx = conn.begin().await?;
    let before: Option<Outcome> = sqlx::query_as(
        "SELECT status, result, finished_at, form_values FROM dingsync.approvals
             WHERE corp_id = $1 AND process_instance_id = $2 FOR UPDATE",
    )
    .bind(corp_id)
    .bind(&snap.process_instance_id)
    .fetch_optional(&mut *tx)
    .await?;
    let precision = if snap.whole_minutes {
        "minute"
    } else {
        "second"
    };
    let after: Option<Outcome> = sqlx::query_as(APPLY_APPROVAL)
        .bind(corp_id)
        .bind(&snap.process_instance_id)
        .bind(process_code)
        .bind(&snap.title)
        .bind(&snap.business_id)
        .bind(&snap.originator_userid)
        .bind(&snap.originator_dept_id)
        .bind(&snap.status)
        .bind(&snap.result)
        .bind(&snap.form_values)
        .bind(&snap.operation_records)
        .bind(snap.created_at)
        .bind(snap.finished_at)
        .bind(requested_at)
        .bind(source.as_str())
        .bind(precision)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(after) = after else {
        tx.rollback().await?;
        return Ok(Applied::Stale);
    };
    let t = &snap.tasks;
    let tasks_changed = sqlx::query(APPLY_TASKS)
        .bind(corp_id)
        .bind(&snap.process_instance_id)
        .bind(t.iter().map(|t| t.task_id).collect::<Vec<_>>())
        .bind(
            t.iter()
                .map(|t| t.activity_id.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(t.iter().map(|t| t.userid.as_deref()).collect::<Vec<_>>())
        .bind(t.iter().map(|t| t.status.as_str()).collect::<Vec<_>>())
        .bind(t.iter().map(|t| t.result.as_deref()).collect::<Vec<_>>())
        .bind(t.iter().map(|t| t.remark.as_deref()).collect::<Vec<_>>())
        .bind(t.iter().map(|t| t.created_at).collect::<Vec<_>>())
        .bind(t.iter().map(|t| t.finished_at).collect::<Vec<_>>())
        .bind(precision)
        .execute(&mut *tx)
        .await?
        .rows_affected()
        > 0;
    let changed = before.as_ref() != Some(&after) || tasks_changed;
    if changed {
        sqlx::query("SELECT pg_notify('dingsync_approval_changed', $1)")
            .bind(&snap.process_instance_id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Applied::Yes { changed })
}

/// `$1..$13` the snapshot, `$14` requested_at, `$15` source, `$16` the precision of the snapshot's
/// times (`second` or `minute`): a stored time that truncates to the snapshot's is finer, and kept.
/// The `WHERE` of the update is the "an older snapshot never overrides a newer one" rule.
const APPLY_APPROVAL: &str = "
INSERT INTO dingsync.approvals AS a
    (corp_id, process_instance_id, process_code, title, business_id, originator_userid,
     originator_dept_id, status, result, form_values, operation_records, created_at, finished_at,
     detail_synced_at, snapshot_at, snapshot_source, next_check_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, now(), $14, $15, NULL, now())
ON CONFLICT (corp_id, process_instance_id) DO UPDATE SET
    process_code       = coalesce(a.process_code, excluded.process_code),
    title              = coalesce(excluded.title, a.title),
    business_id        = coalesce(excluded.business_id, a.business_id),
    originator_userid  = coalesce(excluded.originator_userid, a.originator_userid),
    originator_dept_id = coalesce(excluded.originator_dept_id, a.originator_dept_id),
    form_values        = excluded.form_values,
    operation_records  = excluded.operation_records,
    created_at = CASE WHEN excluded.created_at IS NULL
                        OR date_trunc($16::text, a.created_at) = excluded.created_at
                      THEN coalesce(a.created_at, excluded.created_at) ELSE excluded.created_at END,
    status      = CASE WHEN dingsync.status_wins(excluded.status, a.status, true)
                       THEN excluded.status ELSE a.status END,
    result      = CASE WHEN dingsync.status_wins(excluded.status, a.status, true)
                       THEN excluded.result ELSE a.result END,
    finished_at = CASE WHEN NOT dingsync.status_wins(excluded.status, a.status, true)
                       THEN a.finished_at
                       WHEN date_trunc($16::text, a.finished_at) = excluded.finished_at
                       THEN a.finished_at ELSE excluded.finished_at END,
    -- A hold after a failed fetch ends with a snapshot; when to look again is the planner's
    -- (bounded sweep and gap checks, src/planner.rs), not a cadence.
    next_check_at = NULL,
    -- Details once: with a snapshot the approval has its form; an event arriving mid-fetch
    -- brought its own status and tasks (applied by the event rule), so it asks for no second
    -- fetch.
    detail_wanted_at = NULL,
    detail_synced_at = now(),
    snapshot_at      = excluded.snapshot_at,
    snapshot_source  = excluded.snapshot_source,
    updated_at       = now()
WHERE a.snapshot_at IS NULL OR a.snapshot_at < excluded.snapshot_at
RETURNING status, result, finished_at, form_values
";

/// `$1` corp, `$2` instance, `$3..$10` the tasks, `$11` the precision of their times (as above).
/// Same status rule as approvals; a row is written only when something differs, so re-checking
/// an unchanged approval writes no task rows.
const APPLY_TASKS: &str = "
INSERT INTO dingsync.approval_tasks AS t
    (corp_id, task_id, process_instance_id, activity_id, userid, status, result, remark,
     created_at, finished_at, updated_at)
SELECT $1, id, $2, act, u, s, r, rm, ca, fa, now()
FROM unnest($3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
            $9::timestamptz[], $10::timestamptz[]) AS x(id, act, u, s, r, rm, ca, fa)
ON CONFLICT (corp_id, task_id) DO UPDATE SET
    process_instance_id = excluded.process_instance_id,
    activity_id = coalesce(excluded.activity_id, t.activity_id),
    userid      = coalesce(excluded.userid, t.userid),
    created_at  = CASE WHEN excluded.created_at IS NULL
                         OR date_trunc($11::text, t.created_at) = excluded.created_at
                       THEN coalesce(t.created_at, excluded.created_at) ELSE excluded.created_at END,
    status      = CASE WHEN dingsync.status_wins(excluded.status, t.status, true)
                       THEN excluded.status ELSE t.status END,
    result      = CASE WHEN dingsync.status_wins(excluded.status, t.status, true)
                       THEN excluded.result ELSE t.result END,
    finished_at = CASE WHEN NOT dingsync.status_wins(excluded.status, t.status, true)
                       THEN t.finished_at
                       WHEN date_trunc($11::text, t.finished_at) = excluded.finished_at
                       THEN t.finished_at ELSE excluded.finished_at END,
    remark      = coalesce(excluded.remark, t.remark),
    updated_at  = now()
WHERE (t.process_instance_id, t.activity_id, t.userid, t.status, t.result, t.remark,
       date_trunc($11::text, t.created_at), date_trunc($11::text, t.finished_at))
      IS DISTINCT FROM
      (excluded.process_instance_id, coalesce(excluded.activity_id, t.activity_id),
       coalesce(excluded.userid, t.userid),
       CASE WHEN dingsync.status_wins(excluded.status, t.status, true)
            THEN excluded.status ELSE t.status END,
       CASE WHEN dingsync.status_wins(excluded.status, t.status, true)
            THEN excluded.result ELSE t.result END,
       coalesce(excluded.remark, t.remark),
       coalesce(excluded.created_at, date_trunc($11::text, t.created_at)),
       CASE WHEN dingsync.status_wins(excluded.status, t.status, true)
            THEN excluded.finished_at ELSE date_trunc($11::text, t.finished_at) END)
";

// ---- A batch of events -------------------------------------------------------------------

/// The folded changes of a batch of events: at most one per approval and one per task.
pub struct Changes<'a> {
    approvals: Vec<(&'a str, ApprovalChange)>,
    tasks: Vec<(&'a str, TaskChange)>,
}

impl<'a> Changes<'a> {
    /// Folds each approval's (and task's) changes of `events` into one, in arrival order, with
    /// the rule the SQL applies against the stored row (`ApprovalChange::merge`). A statement may
    /// touch a row once, and one row version per approval is cheaper than one per event.
    pub fn fold(events: &[&'a Event]) -> Changes<'a> {
        let mut changes = Changes {
            approvals: Vec::new(),
            tasks: Vec::new(),
        };
        let mut approval_at: HashMap<(&str, &str), usize> = HashMap::new();
        let mut task_at: HashMap<(&str, i64), usize> = HashMap::new();
        for e in events {
            let corp = e.corp_id.as_str();
            if let Some(change) = &e.approval {
                match approval_at.entry((corp, change.process_instance_id.as_str())) {
                    Entry::Occupied(at) => changes.approvals[*at.get()].1.merge(change),
                    Entry::Vacant(at) => {
                        at.insert(changes.approvals.len());
                        changes.approvals.push((corp, change.clone()));
                    }
                }
            }
            if let Some(change) = &e.task {
                match task_at.entry((corp, change.task_id)) {
                    Entry::Occupied(at) => changes.tasks[*at.get()].1.merge(change),
                    Entry::Vacant(at) => {
                        at.insert(changes.tasks.len());
                        changes.tasks.push((corp, change.clone()));
                    }
                }
            }
        }
        changes
    }
}

/// What a batch of events does to approvals and tasks, as the CTEs `ap`, `touched` and `tk` of
/// the batch statement (`store::batch`). They follow the CTE `ev` (the batch's events that are
/// new, with `corp_id` and `process_instance_id`) and apply changes only to approvals that have
/// a new event. Parameters `$10..$32` (`bind_event_changes`, after the events' nine):
/// `$10..$20` approval changes, `$21..$22` approvals only marked (an event without a status),
/// `$23..$32` task changes. A status (with its result, finish time and, for tasks, remark)
/// changes only when `dingsync.status_wins` says so, a tie keeping the stored one; descriptive
/// fields fill in what is still unknown. `ap` and `touched` return the `process_instance_id` of
/// each approval they changed, for the notification.
macro_rules! event_changes_sql {
    () => {
        "ap AS (
    INSERT INTO dingsync.approvals AS a
        (corp_id, process_instance_id, process_code, title, business_id, originator_userid,
         status, result, url, created_at, finished_at, last_event_at, detail_wanted_at, updated_at)
    SELECT c, p, pc, t, b, o, s, r, u, ca, fa, now(), now(), now()
    FROM unnest($10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::text[],
                $16::text[], $17::text[], $18::text[], $19::timestamptz[], $20::timestamptz[])
         AS x(c, p, pc, t, b, o, s, r, u, ca, fa)
    WHERE EXISTS (SELECT 1 FROM ev WHERE ev.corp_id = x.c AND ev.process_instance_id = x.p)
    ON CONFLICT (corp_id, process_instance_id) DO UPDATE SET
        process_code      = coalesce(a.process_code, excluded.process_code),
        title             = coalesce(a.title, excluded.title),
        business_id       = coalesce(a.business_id, excluded.business_id),
        originator_userid = coalesce(a.originator_userid, excluded.originator_userid),
        url               = coalesce(a.url, excluded.url),
        created_at        = coalesce(a.created_at, excluded.created_at),
        status      = CASE WHEN dingsync.status_wins(excluded.status, a.status, false)
                           THEN excluded.status ELSE a.status END,
        result      = CASE WHEN dingsync.status_wins(excluded.status, a.status, false)
                           THEN excluded.result ELSE a.result END,
        finished_at = CASE WHEN dingsync.status_wins(excluded.status, a.status, false)
                           THEN coalesce(excluded.finished_at, a.finished_at) ELSE a.finished_at END,
        last_event_at    = now(),
        -- Details once: only an approval never fetched asks for its form (events carry
        -- statuses and tasks, applied above; the planner's gap check covers lost ones).
        detail_wanted_at = CASE WHEN a.snapshot_at IS NULL
                                THEN coalesce(a.detail_wanted_at, now()) ELSE a.detail_wanted_at END,
        updated_at       = now()
    RETURNING a.process_instance_id
),
touched AS (
    UPDATE dingsync.approvals a
    SET last_event_at = now(),
        detail_wanted_at = CASE WHEN a.snapshot_at IS NULL
                                THEN coalesce(a.detail_wanted_at, now()) ELSE a.detail_wanted_at END,
        updated_at = now()
    FROM unnest($21::text[], $22::text[]) AS x(c, p)
    WHERE a.corp_id = x.c AND a.process_instance_id = x.p
      AND EXISTS (SELECT 1 FROM ev WHERE ev.corp_id = x.c AND ev.process_instance_id = x.p)
    RETURNING a.process_instance_id
),
tk AS (
    INSERT INTO dingsync.approval_tasks AS t
        (corp_id, task_id, process_instance_id, activity_id, userid, status, result, remark,
         created_at, finished_at, last_event_at, updated_at)
    SELECT c, id, p, act, u, s, r, rm, ca, fa, now(), now()
    FROM unnest($23::text[], $24::bigint[], $25::text[], $26::text[], $27::text[], $28::text[],
                $29::text[], $30::text[], $31::timestamptz[], $32::timestamptz[])
         AS x(c, id, p, act, u, s, r, rm, ca, fa)
    WHERE EXISTS (SELECT 1 FROM ev WHERE ev.corp_id = x.c AND ev.process_instance_id = x.p)
    ON CONFLICT (corp_id, task_id) DO UPDATE SET
        activity_id = coalesce(t.activity_id, excluded.activity_id),
        userid      = coalesce(t.userid, excluded.userid),
        created_at  = coalesce(t.created_at, excluded.created_at),
        status      = CASE WHEN dingsync.status_wins(excluded.status, t.status, false)
                           THEN excluded.status ELSE t.status END,
        result      = CASE WHEN dingsync.status_wins(excluded.status, t.status, false)
                           THEN excluded.result ELSE t.result END,
        remark      = CASE WHEN dingsync.status_wins(excluded.status, t.status, false)
                           THEN coalesce(excluded.remark, t.remark) ELSE coalesce(t.remark, excluded.remark) END,
        finished_at = CASE WHEN dingsync.status_wins(excluded.status, t.status, false)
                           THEN coalesce(excluded.finished_at, t.finished_at) ELSE t.finished_at END,
        last_event_at = now(),
        updated_at    = now()
    RETURNING 1
)"
    };
}
pub(super) use event_changes_sql;

/// Binds the parameters of `event_changes_sql!` (`$10..$32`) after the events' `$1..$9`.
pub(super) fn bind_event_changes<'a>(
    query: Query<'a, Postgres, PgArguments>,
    changes: &'a Changes<'a>,
) -> Query<'a, Postgres, PgArguments> {
    // A change without a status only marks its approval (`touched`): the upsert would need a
    // status for a row it creates.
    let (with_status, touch): (Vec<_>, Vec<_>) = changes
        .approvals
        .iter()
        .partition(|(_, a)| a.status.is_some());
    let ap = ApprovalColumns::from(&with_status);
    let touch_corp: Vec<&str> = touch.iter().map(|(c, _)| *c).collect();
    let touch_pid: Vec<&str> = touch
        .iter()
        .map(|(_, a)| a.process_instance_id.as_str())
        .collect();
    let tk = TaskColumns::from(&changes.tasks);
    query
        .bind(ap.corp)
        .bind(ap.pid)
        .bind(ap.code)
        .bind(ap.title)
        .bind(ap.business)
        .bind(ap.originator)
        .bind(ap.status)
        .bind(ap.result)
        .bind(ap.url)
        .bind(ap.created)
        .bind(ap.finished)
        .bind(touch_corp)
        .bind(touch_pid)
        .bind(tk.corp)
        .bind(tk.task)
        .bind(tk.pid)
        .bind(tk.activity)
        .bind(tk.user)
        .bind(tk.status)
        .bind(tk.result)
        .bind(tk.remark)
        .bind(tk.created)
        .bind(tk.finished)
}

type Time = Option<chrono::DateTime<chrono::Utc>>;

struct ApprovalColumns<'a> {
    corp: Vec<&'a str>,
    pid: Vec<&'a str>,
    code: Vec<Option<&'a str>>,
    title: Vec<Option<&'a str>>,
    business: Vec<Option<&'a str>>,
    originator: Vec<Option<&'a str>>,
    status: Vec<Option<&'static str>>,
    result: Vec<Option<&'static str>>,
    url: Vec<Option<&'a str>>,
    created: Vec<Time>,
    finished: Vec<Time>,
}

impl<'a> ApprovalColumns<'a> {
    fn from(changes: &[&'a (&'a str, ApprovalChange)]) -> Self {
        ApprovalColumns {
            corp: changes.iter().map(|(c, _)| *c).collect(),
            pid: changes
                .iter()
                .map(|(_, a)| a.process_instance_id.as_str())
                .collect(),
            code: changes
                .iter()
                .map(|(_, a)| a.process_code.as_deref())
                .collect(),
            title: changes.iter().map(|(_, a)| a.title.as_deref()).collect(),
            business: changes
                .iter()
                .map(|(_, a)| a.business_id.as_deref())
                .collect(),
            originator: changes
                .iter()
                .map(|(_, a)| a.originator_userid.as_deref())
                .collect(),
            status: changes.iter().map(|(_, a)| a.status).collect(),
            result: changes.iter().map(|(_, a)| a.result).collect(),
            url: changes.iter().map(|(_, a)| a.url.as_deref()).collect(),
            created: changes.iter().map(|(_, a)| a.created_at).collect(),
            finished: changes.iter().map(|(_, a)| a.finished_at).collect(),
        }
    }
}

struct TaskColumns<'a> {
    corp: Vec<&'a str>,
    task: Vec<i64>,
    pid: Vec<&'a str>,
    activity: Vec<Option<&'a str>>,
    user: Vec<Option<&'a str>>,
    status: Vec<&'static str>,
    result: Vec<Option<&'static str>>,
    remark: Vec<Option<&'a str>>,
    created: Vec<Time>,
    finished: Vec<Time>,
}

impl<'a> TaskColumns<'a> {
    fn from(changes: &'a [(&'a str, TaskChange)]) -> Self {
        TaskColumns {
            corp: changes.iter().map(|(c, _)| *c).collect(),
            task: changes.iter().map(|(_, t)| t.task_id).collect(),
            pid: changes
                .iter()
                .map(|(_, t)| t.process_instance_id.as_str())
                .collect(),
            activity: changes
                .iter()
                .map(|(_, t)| t.activity_id.as_deref())
                .collect(),
            user: changes.iter().map(|(_, t)| t.userid.as_deref()).collect(),
            status: changes.iter().map(|(_, t)| t.status).collect(),
            result: changes.iter().map(|(_, t)| t.result).collect(),
            remark: changes.iter().map(|(_, t)| t.remark.as_deref()).collect(),
            created: changes.iter().map(|(_, t)| t.created_at).collect(),
            finished: changes.iter().map(|(_, t)| t.finished_at).collect(),
        }
    }
}

// ---- An outbox link ----------------------------------------------------------------------

/// What the outbox's "created" does to approvals, as the CTE `ap` of `store::outbox`'s statement:
/// follows a CTE `o` of the outbox rows just marked created (`corp_id`, `id`,
/// `process_instance_id`, `process_code`, `originator_user_id`, `dept_id`) and links or inserts
/// each one's approval; returns `process_instance_id` and `outbox_id` of each. No parameters.
macro_rules! outbox_link_sql {
    () => {
        "ap AS (
    -- The instance is running in DingTalk; events and the detail fetch fill in the rest
    -- (detail_wanted_at asks for it). Never moves an approval backwards.
    INSERT INTO dingsync.approvals AS a
        (corp_id, process_instance_id, process_code, originator_userid,
         originator_dept_id, status, outbox_id, detail_wanted_at, updated_at)
    SELECT corp_id, process_instance_id, process_code, originator_user_id,
           dept_id::text, 'RUNNING', id, now(), now()
    FROM o
    -- The lock order of the callback ingest (store::batch), so the two never deadlock.
    ORDER BY corp_id, process_instance_id
    ON CONFLICT (corp_id, process_instance_id) DO UPDATE SET
        outbox_id          = excluded.outbox_id,
        process_code       = coalesce(a.process_code, excluded.process_code),
        originator_userid  = coalesce(a.originator_userid, excluded.originator_userid),
        originator_dept_id = coalesce(a.originator_dept_id, excluded.originator_dept_id),
        status = CASE WHEN dingsync.status_wins(excluded.status, a.status, false)
                      THEN excluded.status ELSE a.status END,
        detail_wanted_at   = CASE WHEN a.snapshot_at IS NULL
                                  THEN coalesce(a.detail_wanted_at, now()) ELSE a.detail_wanted_at END,
        updated_at         = now()
    RETURNING a.process_instance_id, a.outbox_id
)"
    };
}
pub(super) use outbox_link_sql;
