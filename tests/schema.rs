//! `docs/schema.md` is the DBA's data dictionary: every table, view and column of schema
//! `dingsync` in a freshly migrated database must be in it, so the document cannot drift.

mod common;

use std::collections::BTreeMap;

use common::{TestDb, test_config};
use dingsync::store;

/// The doc's sections by object name: the text after each "### `dingsync.<name>`" heading.
fn sections(doc: &str) -> BTreeMap<&str, &str> {
    doc.split("\n### `dingsync.")
        .skip(1)
        .filter_map(|section| {
            let (name, rest) = section.split_once('`')?;
            Some((name, rest))
        })
        .collect()
}

#[tokio::test]
async fn every_table_view_and_column_is_in_the_data_dictionary() {
    let db = TestDb::new();
    let pool = store::connect_and_migrate(&test_config(&db.url).database)
        .await
        .unwrap();
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, a.attname::text
         FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'dingsync'
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         WHERE c.relkind IN ('r', 'v', 'm', 'p') AND NOT c.relispartition
         ORDER BY 1, a.attnum",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    assert!(columns.iter().any(|(t, _)| t == "report_sync_lag"));

    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/schema.md"))
        .expect("docs/schema.md");
    let sections = sections(&doc);
    let missing: Vec<String> = columns
        .iter()
        .filter(|(table, column)| {
            sections
                .get(table.as_str())
                .is_none_or(|text| !text.contains(&format!("\n| `{column}` |")))
        })
        .map(|(table, column)| format!("{table}.{column}"))
        .collect();
    assert!(
        missing.is_empty(),
        "not in docs/schema.md (a \"### `dingsync.<table>`\" section with a \"| `<column>` |\" row): {missing:?}"
    );
}

/// Tables that are not per organisation, and why. Everything else in schema `dingsync` is
/// distributed by `corp_id` on a sharded PostgreSQL (docs/scaling.md).
const GLOBAL_TABLES: &[(&str, &str)] = &[(
    "schema_history",
    "refinery's record of applied migrations: one per database, keyed by version",
)];

/// Ready for a sharded PostgreSQL (Citus, docs/scaling.md): every table has a primary key, and
/// every primary and unique key (constraint or index) leads with `corp_id`, so that it can be
/// enforced on the shard that holds the organisation. Partitions are checked through their
/// parent.
#[tokio::test]
async fn every_primary_and_unique_key_leads_with_corp_id() {
    let db = TestDb::new();
    let pool = store::connect_and_migrate(&test_config(&db.url).database)
        .await
        .unwrap();
    let keys: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT c.relname::text, i.relname::text,
                (SELECT a.attname::text FROM pg_attribute a
                 WHERE a.attrelid = c.oid AND a.attnum = x.indkey[0])
         FROM pg_index x
         JOIN pg_class i ON i.oid = x.indexrelid
         JOIN pg_class c ON c.oid = x.indrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'dingsync'
         WHERE (x.indisunique OR x.indisprimary) AND NOT c.relispartition
         ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let without_pkey: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'dingsync'
         WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
           AND NOT EXISTS (SELECT 1 FROM pg_index x WHERE x.indrelid = c.oid AND x.indisprimary)
         ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    assert!(keys.iter().any(|(t, ..)| t == "events"), "{keys:?}");
    let global = |table: &str| GLOBAL_TABLES.iter().any(|(t, _)| *t == table);
    let wrong: Vec<String> = keys
        .iter()
        .filter(|(table, _, first)| !global(table) && first.as_deref() != Some("corp_id"))
        .map(|(table, key, first)| {
            format!(
                "dingsync.{table}: {key} leads with {}",
                first.as_deref().unwrap_or("an expression")
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "keys that do not lead with corp_id (fix them, or list the table in GLOBAL_TABLES with the reason): {wrong:?}"
    );
    let missing: Vec<&String> = without_pkey.iter().filter(|t| !global(t)).collect();
    assert!(
        missing.is_empty(),
        "tables without a primary key: {missing:?}"
    );
}
