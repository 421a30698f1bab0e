//! Storing one batch of events (callbacks, the failed-push list) and everything they change, by a
//! single statement: the events' keys go into `dingsync.event_keys`, the events into
//! `dingsync.events` (new ones only), their folded changes into `approvals` and `approval_tasks`,
//! and listeners are notified. One statement is one round
//! trip and, outside an explicit transaction, one atomic commit: all of it is stored or none of
//! it. This module owns the events' part and the composition; what the changes do to approvals
//! and tasks (their fold, their SQL and its parameters) is `store::approvals`' event entry point,
//! spliced in at compile time. Batching and the group commit are `ingest`'s.
//!
//! Changes are applied only for approvals that have at least one *new* event in the batch, so a
//! batch of redeliveries changes nothing. A redelivered event that shares a batch with a new event
//! of the same approval is folded in too, which is harmless: applying a change twice is a no-op
//! under the monotonic rules.
//!
//! Whether an event is new is decided by `dingsync.event_keys` (migration V11), which keeps every
//! key longer than retention keeps the raw events: a replay of an event whose raw row was pruned
//! is still a duplicate. The key's insert is one more CTE of the same statement (no round trip):
//! one small heap row and one btree entry per event. It is the only guard: `dingsync.events` is
//! partitioned by month (migration V22) and a unique key on it would have to include
//! `received_at`, so it has none on the dedup key; an event row is inserted only when its key
//! was new, once per key even when the batch holds the event twice.
//!
//! Two forms of the statement: one skips the events that are stored already (`ON CONFLICT DO
//! NOTHING` on the key, then only the events whose key was new), the other expects every event
//! to be new and fails with a unique violation on `event_keys_pkey` (storing nothing) when one
//! is not. `ON CONFLICT` makes PostgreSQL
//! look each key up before inserting it (a second descent of the dedup index) and insert it
//! speculatively (a lock and an extra WAL record per row): about a tenth of the backend's CPU
//! per event, spent for the rare redelivery. [`store_events`] tries the second form when the
//! caller expects no redeliveries ([`Expect::New`]) and falls back to the first.

use std::collections::HashSet;

use sqlx::{Acquire, PgConnection, Postgres, postgres::PgArguments, query::Query};

use super::approvals::{self, Changes};
use crate::event::Event;

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
    let changes = Changes::fold(events);
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
    bind(SQL, events, changes)
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
    bind(SQL_NEW, events, changes).execute(conn).await.map(drop)
}

/// Whether `e` is [`write_new`] refusing an event that is not new (its key is known).
fn is_not_new(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().as_deref() == Some("23505")
            && db.constraint() == Some("event_keys_pkey"))
}

/// The statement with its parameters: the events' `$1..$9` here, then the changes' (from `$10`)
/// by `store::approvals`.
fn bind<'a>(
    sql: &'static str,
    events: &[&'a Event],
    changes: &'a Changes<'a>,
) -> Query<'a, Postgres, PgArguments> {
    let ev = EventColumns::new(events);
    let query = sqlx::query(sql)
        .bind(ev.corp)
        .bind(ev.key)
        .bind(ev.source)
        .bind(ev.event_type)
        .bind(ev.change_type)
        .bind(ev.pid)
        .bind(ev.task_id)
        .bind(ev.event_time)
        .bind(ev.raw);
    approvals::bind_event_changes(query, changes)
}

/// `$1..$9` the events: their keys (the CTE `keys`: those that are new) and the events (the CTE
/// `ev`: those that are new), then the changes' CTEs `ap`, `touched` and `tk` with their
/// parameters (`store::approvals::event_changes_sql!`), then the notification of every approval
/// that `ap` or `touched` changed.
macro_rules! batch_sql {
    ($keys_on_conflict:literal, $distinct:literal, $only_new_keys:literal, $select:literal) => {
        concat!(
            "
WITH keys AS (
    INSERT INTO dingsync.event_keys (corp_id, dedup_key)
    SELECT c, k FROM unnest($1::text[], $2::text[]) AS x(c, k)
",
            $keys_on_conflict,
            "    RETURNING corp_id, dedup_key
),
ev AS (
    INSERT INTO dingsync.events
        (corp_id, dedup_key, source, event_type, change_type, process_instance_id, task_id,
         event_time, raw, payload)
    SELECT ",
            $distinct,
            "c, k, s, et, ct, p, t, tm, r, r::jsonb
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                $7::bigint[], $8::timestamptz[], $9::text[]) AS x(c, k, s, et, ct, p, t, tm, r)
",
            $only_new_keys,
            "    RETURNING corp_id, dedup_key, process_instance_id
),
",
            super::approvals::event_changes_sql!(),
            ",
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

/// Only events whose key is new are stored (an event repeated within the batch, too, is stored
/// once: its second key does nothing, and `DISTINCT ON` keeps one of its rows).
const SQL: &str = batch_sql!(
    "    ON CONFLICT ON CONSTRAINT event_keys_pkey DO NOTHING\n",
    "DISTINCT ON (x.c, x.k) ",
    "    WHERE (x.c, x.k) IN (SELECT corp_id, dedup_key FROM keys)\n",
    "SELECT ev.corp_id, ev.dedup_key FROM ev, notified\n"
);

/// The same without `ON CONFLICT`: every event is new, so the rows need not come back.
const SQL_NEW: &str = batch_sql!("", "", "", "SELECT n FROM notified\n");

/// The events' columns, `$1..$9`.
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

impl<'a> EventColumns<'a> {
    fn new(events: &[&'a Event]) -> Self {
        let n = events.len();
        let mut ev = EventColumns {
            corp: Vec::with_capacity(n),
            key: Vec::with_capacity(n),
            source: Vec::with_capacity(n),
            event_type: Vec::with_capacity(n),
            change_type: Vec::with_capacity(n),
            pid: Vec::with_capacity(n),
            task_id: Vec::with_capacity(n),
            event_time: Vec::with_capacity(n),
            raw: Vec::with_capacity(n),
        };
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
        ev
    }
}
