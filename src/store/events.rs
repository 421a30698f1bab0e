//! `dingsync.events`: every event received, stored once.

use std::collections::HashSet;

use sqlx::PgConnection;

use crate::event::Event;

/// Inserts the events that are not stored yet (by `(corp_id, dedup_key)`) in one statement and
/// returns the keys of those that were new. A key already stored — or stored by a concurrent
/// transaction, which this waits for — is skipped: its effect was applied with it.
pub async fn insert_new(
    conn: &mut PgConnection,
    events: &[&Event],
) -> sqlx::Result<HashSet<(String, String)>> {
    let mut corp = Vec::with_capacity(events.len());
    let mut key = Vec::with_capacity(events.len());
    let mut source = Vec::with_capacity(events.len());
    let mut event_type = Vec::with_capacity(events.len());
    let mut change_type = Vec::with_capacity(events.len());
    let mut pid = Vec::with_capacity(events.len());
    let mut task_id = Vec::with_capacity(events.len());
    let mut event_time = Vec::with_capacity(events.len());
    let mut raw = Vec::with_capacity(events.len());
    for e in events {
        corp.push(e.corp_id.as_str());
        key.push(e.dedup_key.as_str());
        source.push(e.source.as_str());
        event_type.push(e.event_type.as_str());
        change_type.push(e.change_type.as_deref());
        pid.push(e.process_instance_id.as_deref());
        task_id.push(e.task_id);
        event_time.push(e.event_time);
        raw.push(e.raw.as_str());
    }
    let rows: Vec<(String, String)> = sqlx::query_as(
        "INSERT INTO dingsync.events
             (corp_id, dedup_key, source, event_type, change_type, process_instance_id, task_id,
              event_time, raw, payload)
         SELECT c, k, s, et, ct, p, t, tm, r, r::jsonb
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::bigint[], $8::timestamptz[], $9::text[])
              AS x(c, k, s, et, ct, p, t, tm, r)
         ON CONFLICT ON CONSTRAINT events_dedup_key_unique DO NOTHING
         RETURNING corp_id, dedup_key",
    )
    .bind(corp)
    .bind(key)
    .bind(source)
    .bind(event_type)
    .bind(change_type)
    .bind(pid)
    .bind(task_id)
    .bind(event_time)
    .bind(raw)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().collect())
}
