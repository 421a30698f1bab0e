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
