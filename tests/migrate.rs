//! Migrations: applied by the production runner, safe to run again and from replicas at once.

mod common;

use common::{TestDb, test_config};
use dingsync::store;

#[tokio::test]
async fn replicas_migrating_at_once_apply_each_migration_exactly_once() {
    let db = TestDb::new();
    let config = test_config(&db.url).database;
    // The first connect creates the database; then four "replicas" migrate concurrently.
    let pool = store::connect(&config).await.unwrap();
    // Each run opens its own connection and waits on the advisory lock, as a replica would.
    let (a, b, c, d) = tokio::join!(
        store::migrate(&pool),
        store::migrate(&pool),
        store::migrate(&pool),
        store::migrate(&pool)
    );
    let mut applied = vec![a.unwrap(), b.unwrap(), c.unwrap(), d.unwrap()];
    applied.sort();
    let total: usize = applied.iter().sum();
    assert_eq!(
        applied[..3],
        [0, 0, 0],
        "only one replica applies anything: {applied:?}"
    );
    let history: i64 = sqlx::query_scalar("SELECT count(*) FROM dingsync.schema_history")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(history as usize, total);
    assert_eq!(
        store::migrate(&pool).await.unwrap(),
        0,
        "a second run is a no-op"
    );
    pool.close().await;
}

#[tokio::test]
async fn every_table_and_column_has_a_comment() {
    let db = TestDb::new();
    let pool = store::connect_and_migrate(&test_config(&db.url).database)
        .await
        .unwrap();
    // A partition (dingsync.events_YYYY_MM) is described by its parent's comments.
    let missing: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname || coalesce('.' || a.attname, '')
         FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'dingsync'
         LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         WHERE c.relkind IN ('r', 'v', 'p') AND c.relname <> 'schema_history'
           AND NOT c.relispartition
           AND (obj_description(c.oid, 'pg_class') IS NULL
                OR (a.attname IS NOT NULL AND col_description(c.oid, a.attnum) IS NULL))
         ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(missing.is_empty(), "without COMMENT ON: {missing:?}");
    pool.close().await;
}

/// Migration V22 on a database that has events: a V21 schema with rows in several months (one a
/// redelivery-prone key), migrated by the production runner. Every row survives with its id, the
/// rows sit in their months' partitions, dedup still holds, the sequence continues past the old
/// ids, and the view that reads events still answers.
#[tokio::test]
async fn migration_v22_partitions_the_events_of_an_existing_database_and_keeps_them() {
    let db = TestDb::new();
    let config = test_config(&db.url).database;
    let pool = store::connect(&config).await.unwrap();
    store::migrate_up_to(&pool, 21).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO dingsync.corps (corp_id) VALUES ('dingcorpa'), ('dingcorpb');
         INSERT INTO dingsync.events
             (corp_id, dedup_key, source, event_type, process_instance_id, received_at, raw, payload)
         SELECT CASE WHEN g % 2 = 0 THEN 'dingcorpa' ELSE 'dingcorpb' END, 'event:e' || g,
                'http_push', 'bpms_instance_change', 'pid-' || g,
                now() - make_interval(days => 200 - g * 10), '{\"n\": ' || g || '}', '{}'
         FROM generate_series(1, 20) g;
         INSERT INTO dingsync.event_keys (corp_id, dedup_key, received_at)
         SELECT corp_id, dedup_key, received_at FROM dingsync.events;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let before: Vec<(String, i64, String, chrono::DateTime<chrono::Utc>, String)> = sqlx::query_as(
        "SELECT corp_id, id, dedup_key, received_at, raw FROM dingsync.events ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(before.len(), 20);

    assert!(store::migrate(&pool).await.unwrap() >= 1);

    let after: Vec<(String, i64, String, chrono::DateTime<chrono::Utc>, String)> = sqlx::query_as(
        "SELECT corp_id, id, dedup_key, received_at, raw FROM dingsync.events ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(after, before, "every event survives, id and all");
    let kind: String = sqlx::query_scalar(
        "SELECT relkind::text FROM pg_class WHERE oid = 'dingsync.events'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(kind, "p", "events is partitioned");
    let misplaced: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dingsync.events
         WHERE tableoid::regclass::text
               <> 'dingsync.events_' || to_char(received_at AT TIME ZONE 'UTC', 'YYYY_MM')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(misplaced, 0, "each row is in its month's partition");
    let ahead: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'dingsync.events'::regclass
           AND inhrelid::regclass::text = 'dingsync.events_'
               || to_char(now() AT TIME ZONE 'UTC' + interval '3 months', 'YYYY_MM')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(ahead, 1, "the partitions reach three months ahead");

    // A new event gets an id past every old one; a redelivery of an old event is not stored.
    let old = &before[3];
    let new_id: i64 = sqlx::query_scalar(
        "INSERT INTO dingsync.events (corp_id, dedup_key, source, event_type, raw, payload)
         VALUES ('dingcorpa', 'event:new', 'http_push', 'bpms_instance_change', '{}', '{}')
         RETURNING id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(new_id > before.last().unwrap().1);
    let redelivered = sqlx::query(
        "INSERT INTO dingsync.event_keys (corp_id, dedup_key) VALUES ($1, $2)
         ON CONFLICT ON CONSTRAINT event_keys_pkey DO NOTHING",
    )
    .bind(&old.0)
    .bind(&old.2)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(
        redelivered.rows_affected(),
        0,
        "the old event's key still makes its redelivery a duplicate"
    );

    let lag: Vec<(String, Option<chrono::DateTime<chrono::Utc>>)> = sqlx::query_as(
        "SELECT corp_id, newest_event_received_at FROM dingsync.report_sync_lag ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(lag.len(), 2);
    assert!(lag.iter().all(|(_, at)| at.is_some()), "{lag:?}");
    pool.close().await;
}
