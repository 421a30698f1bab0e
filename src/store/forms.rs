//! `dingsync.process_forms` and `dingsync.form_templates` (migration V21): the schema versions
//! of each template and the state of fetching them; and running the generated DDL of the form
//! views in schema `dingsync_forms` (written by `forms::view`, passed in as text: the store
//! knows nothing of forms, it runs them in one transaction per template).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor, PgPool, Row};

/// How long after its creation an approval's form values are still compared with the schema:
/// the detail fetch that brings them normally follows within seconds, but waits out an outage.
const COMPARE_MARGIN: &str = "6 hours";

/// A template's fetch state.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Template {
    pub process_code: String,
    pub wanted_at: Option<DateTime<Utc>>,
    pub checked_at: Option<DateTime<Utc>>,
    pub next_try_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub views: Vec<String>,
    pub view_hash: Option<String>,
    pub generated_at: Option<DateTime<Utc>>,
    /// Approvals of the template created since the last successful fetch.
    pub created_since_check: bool,
}

/// One stored version.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredVersion {
    pub version: i32,
    pub name: String,
    pub controls: Value,
    pub fetched_at: DateTime<Utc>,
}

/// Registers every template seen: in approvals (a loose index scan over
/// `approvals_process_created_idx`: one probe per template, not a scan of the approvals), in
/// the outbox's open rows, and `extra` (`reconcile.process_codes`). A new one is wanted at once.
pub async fn register_seen(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    extra: &[String],
) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "WITH RECURSIVE codes AS (
             (SELECT process_code FROM dingsync.approvals
              WHERE corp_id = $1 AND process_code IS NOT NULL ORDER BY process_code LIMIT 1)
             UNION ALL
             SELECT (SELECT a.process_code FROM dingsync.approvals a
                     WHERE a.corp_id = $1 AND a.process_code > c.process_code
                     ORDER BY a.process_code LIMIT 1)
             FROM codes c WHERE c.process_code IS NOT NULL
         ), seen AS (
             SELECT process_code FROM codes WHERE process_code IS NOT NULL
             UNION SELECT process_code FROM dingsync.outbox
                   WHERE corp_id = $1 AND state IN ('pending', 'sending', 'unknown')
             UNION SELECT unnest($2::text[])
         )
         INSERT INTO dingsync.form_templates (corp_id, process_code, wanted_at)
         SELECT $1, process_code, clock_timestamp() FROM seen
         ON CONFLICT (corp_id, process_code) DO NOTHING",
    )
    .bind(corp_id)
    .bind(extra)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Marks a fetch due for every fetched template one of whose approvals, created since it was
/// last compared (less [`COMPARE_MARGIN`]), carries a control id and label the newest version
/// lacks and that is not already known as unexplained: a control was added or renamed. The
/// others are compared up to now. Returns the templates marked.
pub async fn mark_changed(db: impl PgExecutor<'_>, corp_id: &str) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(&format!(
        "WITH compared AS (
             SELECT t.process_code, EXISTS (
                 SELECT 1 FROM dingsync.approvals a
                 CROSS JOIN LATERAL jsonb_array_elements(
                     CASE WHEN jsonb_typeof(a.form_values) = 'array' THEN a.form_values ELSE '[]' END) e
                 WHERE a.corp_id = t.corp_id AND a.process_code = t.process_code
                   AND a.created_at >= t.compared_until - interval '{COMPARE_MARGIN}'
                   AND jsonb_typeof(e) = 'object' AND e ? 'id'
                   AND NOT EXISTS (
                       SELECT 1 FROM jsonb_array_elements(f.controls) c
                       WHERE c ->> 'id' = e ->> 'id' AND c ->> 'label' = e ->> 'name')
                   AND NOT t.unexplained @> jsonb_build_array(jsonb_build_array(e ->> 'id', e ->> 'name'))
             ) AS changed
             FROM dingsync.form_templates t
             JOIN LATERAL (SELECT controls FROM dingsync.process_forms p
                           WHERE p.corp_id = t.corp_id AND p.process_code = t.process_code
                           ORDER BY version DESC LIMIT 1) f ON true
             WHERE t.corp_id = $1 AND t.wanted_at IS NULL AND t.compared_until IS NOT NULL
         )
         UPDATE dingsync.form_templates t
         SET wanted_at = CASE WHEN c.changed THEN clock_timestamp() END,
             compared_until = CASE WHEN c.changed THEN t.compared_until ELSE clock_timestamp() END
         FROM compared c
         WHERE t.corp_id = $1 AND t.process_code = c.process_code
         RETURNING CASE WHEN c.changed THEN t.process_code END"
    ))
    .bind(corp_id)
    .fetch_all(db)
    .await
    .map(|codes: Vec<Option<String>>| codes.into_iter().flatten().collect())
}

/// Every template registered for `corp_id`.
pub async fn templates(db: impl PgExecutor<'_>, corp_id: &str) -> sqlx::Result<Vec<Template>> {
    sqlx::query_as(
        "SELECT t.process_code, t.wanted_at, t.checked_at, t.next_try_at, t.last_error, t.views,
                t.view_hash, t.generated_at,
                t.checked_at IS NOT NULL AND EXISTS (
                    SELECT 1 FROM dingsync.approvals a
                    WHERE a.corp_id = t.corp_id AND a.process_code = t.process_code
                      AND a.created_at > t.checked_at) AS created_since_check
         FROM dingsync.form_templates t WHERE t.corp_id = $1 ORDER BY t.process_code",
    )
    .bind(corp_id)
    .fetch_all(db)
    .await
}

/// Marks `process_code` wanted now (an operator's `forms sync`), registering it if new.
pub async fn want(db: impl PgExecutor<'_>, corp_id: &str, process_code: &str) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO dingsync.form_templates (corp_id, process_code, wanted_at)
         VALUES ($1, $2, clock_timestamp())
         ON CONFLICT (corp_id, process_code)
         DO UPDATE SET wanted_at = clock_timestamp(), next_try_at = NULL",
    )
    .bind(corp_id)
    .bind(process_code)
    .execute(db)
    .await?;
    Ok(())
}

/// A fetched schema to store.
#[derive(Debug, Clone, Copy)]
pub struct FetchedSchema<'a> {
    /// SHA-256 of the controls (equal: the same version).
    pub fingerprint: &'a str,
    pub name: &'a str,
    pub modified: Option<&'a str>,
    pub controls: &'a Value,
}

/// What storing a fetched schema came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub version: i32,
    /// A new version (the controls differ from the newest stored one).
    pub new: bool,
}

/// Stores a fetched schema as a new version when its fingerprint differs from the newest one,
/// and records the fetch: checked now, no longer wanted (unless marked again after `started`,
/// the moment the fetch was sent), compared up to `started`; the control ids and labels
/// approvals carried that this schema still lacks become `unexplained` (not fetched for again).
pub async fn store_version(
    pool: &PgPool,
    corp_id: &str,
    process_code: &str,
    started: DateTime<Utc>,
    schema: FetchedSchema<'_>,
) -> sqlx::Result<Stored> {
    let FetchedSchema {
        fingerprint,
        name,
        modified,
        controls,
    } = schema;
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO dingsync.form_templates (corp_id, process_code) VALUES ($1, $2)
         ON CONFLICT DO NOTHING",
    )
    .bind(corp_id)
    .bind(process_code)
    .execute(&mut *tx)
    .await?;
    // One writer per template at a time (replicas, an operator's sync).
    sqlx::query(
        "SELECT 1 FROM dingsync.form_templates WHERE corp_id = $1 AND process_code = $2 FOR UPDATE",
    )
    .bind(corp_id)
    .bind(process_code)
    .execute(&mut *tx)
    .await?;
    let newest: Option<(i32, String)> = sqlx::query_as(
        "SELECT version, fingerprint FROM dingsync.process_forms
         WHERE corp_id = $1 AND process_code = $2 ORDER BY version DESC LIMIT 1",
    )
    .bind(corp_id)
    .bind(process_code)
    .fetch_optional(&mut *tx)
    .await?;
    let stored = match newest {
        Some((version, f)) if f == fingerprint => Stored {
            version,
            new: false,
        },
        other => {
            let version = other.map_or(1, |(v, _)| v + 1);
            sqlx::query(
                "INSERT INTO dingsync.process_forms
                     (corp_id, process_code, version, fingerprint, name, modified, controls)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(corp_id)
            .bind(process_code)
            .bind(version)
            .bind(fingerprint)
            .bind(name)
            .bind(modified)
            .bind(controls)
            .execute(&mut *tx)
            .await?;
            Stored { version, new: true }
        }
    };
    sqlx::query(&format!(
        "UPDATE dingsync.form_templates t
         SET checked_at = clock_timestamp(), last_error = NULL, next_try_at = NULL,
             wanted_at = CASE WHEN t.wanted_at > $3 THEN t.wanted_at END,
             compared_until = $3,
             unexplained = (
                 SELECT coalesce(jsonb_agg(DISTINCT pair), '[]') FROM (
                     SELECT jsonb_array_elements(t.unexplained) AS pair
                     UNION
                     SELECT jsonb_build_array(e ->> 'id', e ->> 'name')
                     FROM dingsync.approvals a
                     CROSS JOIN LATERAL jsonb_array_elements(
                         CASE WHEN jsonb_typeof(a.form_values) = 'array' THEN a.form_values ELSE '[]' END) e
                     WHERE a.corp_id = t.corp_id AND a.process_code = t.process_code
                       AND a.created_at >= coalesce(t.compared_until, $3) - interval '{COMPARE_MARGIN}'
                       AND jsonb_typeof(e) = 'object' AND e ? 'id'
                       AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements($4::jsonb) c
                                       WHERE c ->> 'id' = e ->> 'id' AND c ->> 'label' = e ->> 'name')
                 ) s)
         WHERE t.corp_id = $1 AND t.process_code = $2"
    ))
    .bind(corp_id)
    .bind(process_code)
    .bind(started)
    .bind(controls)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(stored)
}

/// Records a failed fetch: not tried again for `retry_after_s`; a refusal (`settled`) also
/// counts as this round's check, so that it waits for the next daily one.
pub async fn record_failure(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    process_code: &str,
    error: &str,
    retry_after_s: i64,
    settled: bool,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE dingsync.form_templates
         SET last_error = $3, next_try_at = clock_timestamp() + make_interval(secs => $4),
             wanted_at = CASE WHEN $5 THEN NULL ELSE wanted_at END,
             checked_at = CASE WHEN $5 THEN clock_timestamp() ELSE checked_at END
         WHERE corp_id = $1 AND process_code = $2",
    )
    .bind(corp_id)
    .bind(process_code)
    .bind(error)
    .bind(retry_after_s as f64)
    .bind(settled)
    .execute(db)
    .await?;
    Ok(())
}

/// Every stored version of a template, oldest first.
pub async fn versions(
    db: impl PgExecutor<'_>,
    corp_id: &str,
    process_code: &str,
) -> sqlx::Result<Vec<StoredVersion>> {
    sqlx::query_as(
        "SELECT version, name, controls, fetched_at FROM dingsync.process_forms
         WHERE corp_id = $1 AND process_code = $2 ORDER BY version",
    )
    .bind(corp_id)
    .bind(process_code)
    .fetch_all(db)
    .await
}

/// One view to (re)create: its name in schema `dingsync_forms`, its SELECT, and the COMMENT
/// statements to run after it.
#[derive(Debug, Clone)]
pub struct ViewDdl {
    pub name: String,
    pub select: String,
    pub comments: Vec<String>,
}

fn qualified(name: &str) -> String {
    format!("dingsync_forms.\"{}\"", name.replace('"', "\"\""))
}

/// Replaces a template's views in one transaction: views it had and no longer has are dropped;
/// each view is replaced in place (`CREATE OR REPLACE VIEW`: grants and views built on it stay)
/// or, when its columns changed in a way PostgreSQL cannot replace (a renamed column, a changed
/// type), dropped and created again; comments and grants follow. A DBA's view that depends on a
/// view that must be dropped makes the transaction fail, naming it, and nothing changes.
pub async fn replace_views(
    pool: &PgPool,
    corp_id: &str,
    process_code: &str,
    views: &[ViewDdl],
    hash: &str,
) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended('dingsync.forms:' || $1 || ':' || $2, 0))",
    )
    .bind(corp_id)
    .bind(process_code)
    .execute(&mut *tx)
    .await?;
    let old: Vec<String> = sqlx::query_scalar(
        "SELECT unnest(views) FROM dingsync.form_templates WHERE corp_id = $1 AND process_code = $2",
    )
    .bind(corp_id)
    .bind(process_code)
    .fetch_all(&mut *tx)
    .await?;
    // Children first (they are listed after their parent).
    for name in old.iter().rev() {
        if !views.iter().any(|v| &v.name == name) {
            run(&mut tx, &format!("DROP VIEW IF EXISTS {}", qualified(name))).await?;
        }
    }
    let readers: Vec<String> = sqlx::query_scalar(
        "SELECT rolname::text FROM pg_roles WHERE rolname IN ('dingsync_report', 'dingsync_app')",
    )
    .fetch_all(&mut *tx)
    .await?;
    for view in views {
        replace_view(&mut tx, view).await?;
        for comment in &view.comments {
            run(&mut tx, comment).await?;
        }
        // Default privileges (V21) grant it too; explicitly, for views made by another role.
        for role in &readers {
            let grant = format!("GRANT SELECT ON {} TO \"{role}\"", qualified(&view.name));
            run(&mut tx, &grant).await?;
        }
    }
    let names: Vec<&str> = views.iter().map(|v| v.name.as_str()).collect();
    sqlx::query(
        "INSERT INTO dingsync.form_templates (corp_id, process_code, views, view_hash, generated_at)
         VALUES ($1, $2, $3, $4, clock_timestamp())
         ON CONFLICT (corp_id, process_code)
         DO UPDATE SET views = $3, view_hash = $4, generated_at = clock_timestamp()",
    )
    .bind(corp_id)
    .bind(process_code)
    .bind(&names)
    .bind(hash)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// One statement of generated DDL, sent as a simple query (nothing to prepare or cache).
async fn run(conn: &mut PgConnection, sql: &str) -> sqlx::Result<()> {
    sqlx::Executor::execute(conn, sql).await.map(drop)
}

async fn replace_view(conn: &mut PgConnection, view: &ViewDdl) -> sqlx::Result<()> {
    let name = qualified(&view.name);
    run(conn, "SAVEPOINT replace_view").await?;
    let replaced = run(
        conn,
        &format!("CREATE OR REPLACE VIEW {name} AS\n{}", view.select),
    )
    .await;
    match replaced {
        Ok(()) => run(conn, "RELEASE SAVEPOINT replace_view").await?,
        // 42P16 invalid_table_definition: "cannot change name/data type of view column",
        // "cannot drop columns from view".
        Err(e) if super::is_code(&e, "42P16") || super::is_code(&e, "42804") => {
            run(conn, "ROLLBACK TO SAVEPOINT replace_view").await?;
            run(conn, &format!("DROP VIEW {name}")).await?;
            run(conn, &format!("CREATE VIEW {name} AS\n{}", view.select)).await?;
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Creates an expression index on `dingsync.approvals` unless one of that name exists,
/// without blocking writes (`CONCURRENTLY`, so outside any transaction). A build that failed
/// half-way leaves an invalid index, which is dropped and built again.
pub async fn ensure_index(pool: &PgPool, name: &str, definition: &str) -> sqlx::Result<bool> {
    let state: Option<bool> = sqlx::query_scalar(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE c.relname = $1 AND c.relnamespace = 'dingsync'::regnamespace",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?;
    match state {
        Some(true) => return Ok(false),
        Some(false) => {
            sqlx::raw_sql(&format!(
                "DROP INDEX CONCURRENTLY IF EXISTS dingsync.\"{name}\""
            ))
            .execute(pool)
            .await?;
        }
        None => {}
    }
    sqlx::raw_sql(&format!(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS \"{name}\" ON dingsync.approvals {definition}"
    ))
    .execute(pool)
    .await?;
    Ok(true)
}

/// A view's columns: name, type, comment.
pub async fn view_columns(
    db: impl PgExecutor<'_>,
    view: &str,
) -> sqlx::Result<Vec<(String, String, Option<String>)>> {
    sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                col_description(a.attrelid, a.attnum)
         FROM pg_attribute a
         JOIN pg_class c ON c.oid = a.attrelid
         WHERE c.relnamespace = 'dingsync_forms'::regnamespace AND c.relname = $1
           AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum",
    )
    .bind(view)
    .fetch_all(db)
    .await
}

/// The newest `limit` rows of a view as JSON objects (for `forms show`).
pub async fn view_sample(
    db: impl PgExecutor<'_>,
    view: &str,
    limit: i64,
) -> sqlx::Result<Vec<Value>> {
    let sql = format!(
        "SELECT to_jsonb(v) FROM {} v ORDER BY v.created_at DESC NULLS LAST LIMIT $1",
        qualified(view)
    );
    let rows = sqlx::query(&sql).bind(limit).fetch_all(db).await?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// The line-item views have no created_at: their newest rows by the approval's.
pub async fn child_sample(
    db: impl PgExecutor<'_>,
    view: &str,
    limit: i64,
) -> sqlx::Result<Vec<Value>> {
    let sql = format!("SELECT to_jsonb(v) FROM {} v LIMIT $1", qualified(view));
    let rows = sqlx::query(&sql).bind(limit).fetch_all(db).await?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// Rows in a view (for `forms list`).
pub async fn view_rows(db: impl PgExecutor<'_>, view: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {}", qualified(view)))
        .fetch_one(db)
        .await
}
