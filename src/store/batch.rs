//! Storing one batch of events (callbacks, the failed-push list) and everything they change, by a
//! single statement: the events go into `dingsync.events` (new ones only), their folded changes
//! into `approvals` and `approval_tasks` (monotonically), and listeners are notified. One
//! statement is one round trip and, outside an explicit transaction, one atomic commit: all of it
//! is stored or none of it. Batching and the group commit are `ingest`'s.
//!
//! Changes are applied only for approvals that have at least one *new* event in the batch, so a
//! batch of redeliveries changes nothing. A redelivered event that shares a batch with a new event
//! of the same approval is folded in too, which is harmless: applying a change twice is a no-op
//! under the monotonic rules.
//!
//! Two forms of the statement: one skips the events that are stored already (`ON CONFLICT DO
//! NOTHING`), the other expects every event to be new and fails with a unique violation on
//! `events_dedup_key_unique` (storing nothing) when one is not. `ON CONFLICT` makes PostgreSQL
//! look each key up before inserting it (a second descent of the dedup index) and insert it
//! speculatively (a lock and an extra WAL record per row): about a tenth of the backend's CPU
//! per event, spent for the rare redelivery. [`store_events`] tries the second form when the
//! caller expects no redeliveries ([`Expect::New`]) and falls back to the first.

use std::collections::{HashMap, HashSet, hash_map::Entry};

use sqlx::{Acquire, PgConnection, Postgres, postgres::PgArguments, query::Query};

use crate::event::{ApprovalChange, Event, TaskChange};

/// The folded changes of a batch: at most one per approval and one per task.
pub struct Changes<'a> {
    pub approvals: Vec<(&'a str, ApprovalChange)>,
    pub tasks: Vec<(&'a str, TaskChange)>,
}

/// What the caller expects of a batch's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// All new (no redeliveries): try the cheaper statement, fall back when one is stored.
    New,
    /// Some may be stored already (redeliveries, the failed-push list).
    Any,
}

/// Which events of a stored batch were new.
#[derive(Debug)]
pub enum New {
    All,
    /// The `(corp_id, dedup_key)` of the new ones.
    Only(HashSet<(String, String)>),
}

impl New {
    /// How many of the batch's `total` events were new.
    pub fn count(&self, total: usize) -> usize {
        match self {
            New::All => total,
            New::Only(keys) => keys.len(),
        }
    }

    /// Whether `event` (of the batch) was new, rather than stored before.
    pub fn contains(&self, event: &Event) -> bool {
        match self {
            New::All => true,
            New::Only(keys) => keys.contains(&(event.corp_id.clone(), event.dedup_key.clone())),
        }
    }
}

/// Stores the events that are new, applies their changes and notifies, in one statement (one
/// transaction unless `db` is inside one already). Returns which events were new.
pub async fn store_events<'c>(
    db: impl Acquire<'c, Database = Postgres>,
    events: &[&Event],
    expect: Expect,
) -> sqlx::Result<New> {
    // A statement may touch a row once, and one row version per approval is cheaper than one
    // per event: fold each approval's (and task's) changes of this batch into one, in arrival
    // order, with the same monotonic rule the SQL applies against the stored row.
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
    let mut conn = db.acquire().await?;
    if expect == Expect::New {
        match write_new(&mut conn, events, &changes).await {
            Ok(()) => return Ok(New::All),
            // Nothing was written: write the batch again, skipping what is stored.
            Err(e) if is_not_new(&e) => {}
            Err(e) => return Err(e),
        }
    }
    write(&mut conn, events, &changes).await.map(New::Only)
}

/// Writes the batch; returns the `(corp_id, dedup_key)` of the events that were new.
async fn write(
    conn: &mut PgConnection,
    events: &[&Event],
    changes: &Changes<'_>,
) -> sqlx::Result<HashSet<(String, String)>> {
    let columns = Columns::new(events, changes);
    columns
        .bind(SQL)
        .try_map(|row: sqlx::postgres::PgRow| {
            use sqlx::Row;
            Ok((row.try_get(0)?, row.try_get(1)?))
        })
        .fetch_all(conn)
        .await
        .map(|rows: Vec<(String, String)>| rows.into_iter().collect())
}

/// Writes a batch whose events are all new. When one is stored already (or is in the batch
/// twice) it fails with [`is_not_new`] and writes nothing.
async fn write_new(
    conn: &mut PgConnection,
    events: &[&Event],
    changes: &Changes<'_>,
) -> sqlx::Result<()> {
    Columns::new(events, changes)
        .bind(SQL_NEW)
        .execute(conn)
        .await
        .map(drop)
}

/// Whether `e` is [`write_new`] refusing an event that is not new.
fn is_not_new(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().as_deref() == Some("23505")
            && db.constraint() == Some("events_dedup_key_unique"))
}

/// The statement's parameters, column by column.
struct Columns<'a> {
    ev: EventColumns<'a>,
    ap: ApprovalColumns<'a>,
    touch_corp: Vec<&'a str>,
    touch_pid: Vec<&'a str>,
    tk: TaskColumns<'a>,
}

impl<'a> Columns<'a> {
    fn new(events: &[&'a Event], changes: &'a Changes<'a>) -> Self {
        let mut ev = EventColumns::with_capacity(events.len());
        for e in events {
            ev.corp.push(e.corp_id.as_str());
            ev.key.push(e.dedup_key.as_str());
            ev.source.push(e.source.as_str());
            ev.event_type.push(e.event_type.as_str());
            ev.change_type.push(e.change_type.as_deref());
            ev.pid.push(e.process_instance_id.as_deref());
            ev.task_id.push(e.task_id);
            ev.event_time.push(e.event_time);
            ev.raw.push(e.raw.as_str());
        }
        let (with_status, touch): (Vec<_>, Vec<_>) = changes
            .approvals
            .iter()
            .partition(|(_, a)| a.status.is_some());
        Columns {
            ev,
            ap: ApprovalColumns::from(&with_status),
            touch_corp: touch.iter().map(|(c, _)| *c).collect(),
            touch_pid: touch
                .iter()
                .map(|(_, a)| a.process_instance_id.as_str())
                .collect(),
            tk: TaskColumns::from(&changes.tasks),
        }
    }

    fn bind(self, sql: &'static str) -> Query<'a, Postgres, PgArguments> {
        let Columns {
            ev,
            ap,
            touch_corp,
            touch_pid,
            tk,
        } = self;
        sqlx::query(sql)
            .bind(ev.corp)
            .bind(ev.key)
            .bind(ev.source)
            .bind(ev.event_type)
            .bind(ev.change_type)
            .bind(ev.pid)
            .bind(ev.task_id)
            .bind(ev.event_time)
            .bind(ev.raw)
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
}

/// `$1..$9` events, `$10..$20` approval changes, `$21..$22` approvals only marked, `$23..$32`
/// task changes. A status (with its result, finish time and, for tasks, remark) changes only when
/// `dingsync.status_wins` says so, a tie keeping the stored one (the first terminal state seen
/// wins); descriptive fields fill in what is still unknown.
macro_rules! batch_sql {
    ($on_conflict:literal, $select:literal) => {
        concat!(
            "
WITH ev AS (
    INSERT INTO dingsync.events
        (corp_id, dedup_key, source, event_type, change_type, process_instance_id, task_id,
         event_time, raw, payload)
    SELECT c, k, s, et, ct, p, t, tm, r, r::jsonb
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                $7::bigint[], $8::timestamptz[], $9::text[]) AS x(c, k, s, et, ct, p, t, tm, r)
",
            $on_conflict,
            "    RETURNING corp_id, dedup_key, process_instance_id
),
ap AS (
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
        detail_wanted_at = coalesce(a.detail_wanted_at, now()),
        updated_at       = now()
    RETURNING a.process_instance_id
),
touched AS (
    UPDATE dingsync.approvals a
    SET last_event_at = now(),
        detail_wanted_at = coalesce(a.detail_wanted_at, now()),
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
),
-- Delivered on commit, once per distinct id (LISTEN dingsync_approval_changed).
notified AS (
    SELECT count(pg_notify('dingsync_approval_changed', p)) AS n
    FROM (SELECT process_instance_id FROM ap UNION SELECT process_instance_id FROM touched) AS c(p)
)
-- Referencing `notified` makes PostgreSQL evaluate it (data-modifying CTEs always run).
",
            $select
        )
    };
}

const SQL: &str = batch_sql!(
    "    ON CONFLICT ON CONSTRAINT events_dedup_key_unique DO NOTHING\n",
    "SELECT ev.corp_id, ev.dedup_key FROM ev, notified\n"
);

/// The same without `ON CONFLICT`: every event is new, so the rows need not come back.
const SQL_NEW: &str = batch_sql!("", "SELECT n FROM notified\n");

struct EventColumns<'a> {
    corp: Vec<&'a str>,
    key: Vec<&'a str>,
    source: Vec<&'a str>,
    event_type: Vec<&'a str>,
    change_type: Vec<Option<&'a str>>,
    pid: Vec<Option<&'a str>>,
    task_id: Vec<Option<i64>>,
    event_time: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    raw: Vec<&'a str>,
}

impl EventColumns<'_> {
    fn with_capacity(n: usize) -> Self {
        EventColumns {
            corp: Vec::with_capacity(n),
            key: Vec::with_capacity(n),
            source: Vec::with_capacity(n),
            event_type: Vec::with_capacity(n),
            change_type: Vec::with_capacity(n),
            pid: Vec::with_capacity(n),
            task_id: Vec::with_capacity(n),
            event_time: Vec::with_capacity(n),
            raw: Vec::with_capacity(n),
        }
    }
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
