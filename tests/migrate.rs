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
    let missing: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname || coalesce('.' || a.attname, '')
         FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'dingsync'
         LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         WHERE c.relkind IN ('r', 'v') AND c.relname <> 'schema_history'
           AND obj_description(c.oid, 'pg_class') IS NULL
            OR (c.relkind IN ('r', 'v') AND c.relname <> 'schema_history'
                AND a.attname IS NOT NULL AND col_description(c.oid, a.attnum) IS NULL)
         ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(missing.is_empty(), "without COMMENT ON: {missing:?}");
    pool.close().await;
}
