//! Migration V8: the reporting views give the right figures for hand-inserted rows, and
//! the least-privilege roles allow what they promise and nothing more.

mod common;

use common::{TestDb, test_config};
use dingsync::store;
use sqlx::{PgPool, Row, postgres::PgRow};

const CORP: &str = "dingreportcorp000001";

async fn migrated() -> (TestDb, PgPool) {
    let db = TestDb::new();
    let pool = store::connect_and_migrate(&test_config(&db.url).database)
        .await
        .unwrap();
    sqlx::query("INSERT INTO dingsync.corps (corp_id) VALUES ($1)")
        .bind(CORP)
        .execute(&pool)
        .await
        .unwrap();
    (db, pool)
}

/// An approval of `CORP` started at `created` (UTC text) and finished `hours` later, if at all.
async fn approval(
    pool: &PgPool,
    id: &str,
    code: &str,
    created: &str,
    status: &str,
    result: Option<&str>,
    hours: Option<i32>,
) {
    sqlx::query(
        "INSERT INTO dingsync.approvals
             (corp_id, process_instance_id, process_code, title, status, result, created_at,
              finished_at)
         VALUES ($1, $2, $3, 'title of ' || $2, $4, $5, $6::timestamptz,
                 $6::timestamptz + make_interval(hours => $7))",
    )
    .bind(CORP)
    .bind(id)
    .bind(code)
    .bind(status)
    .bind(result)
    .bind(created)
    .bind(hours)
    .execute(pool)
    .await
    .unwrap();
}

fn num(row: &PgRow, column: &str) -> f64 {
    row.get::<Option<f64>, _>(column).unwrap_or(f64::NAN)
}

#[tokio::test]
async fn turnaround_counts_outcomes_and_hours_per_beijing_month() {
    let (_db, pool) = migrated().await;
    // 2026-01-31 20:00 UTC is 2026-02-01 04:00 in Beijing: a February approval.
    approval(
        &pool,
        "a1",
        "PROC-A",
        "2026-01-31 20:00Z",
        "COMPLETED",
        Some("agree"),
        Some(2),
    )
    .await;
    approval(
        &pool,
        "a2",
        "PROC-A",
        "2026-02-10 00:00Z",
        "COMPLETED",
        Some("refuse"),
        Some(4),
    )
    .await;
    approval(
        &pool,
        "a3",
        "PROC-A",
        "2026-02-11 00:00Z",
        "TERMINATED",
        None,
        Some(6),
    )
    .await;
    approval(
        &pool,
        "a4",
        "PROC-A",
        "2026-02-12 00:00Z",
        "RUNNING",
        None,
        None,
    )
    .await;
    approval(
        &pool,
        "a5",
        "PROC-A",
        "2026-01-15 00:00Z",
        "COMPLETED",
        Some("agree"),
        Some(10),
    )
    .await;
    approval(
        &pool,
        "b1",
        "PROC-B",
        "2026-02-03 00:00Z",
        "NEW",
        None,
        None,
    )
    .await;

    let rows = sqlx::query(
        "SELECT process_code, month::text AS month, started, finished, approved, refused,
                terminated, canceled, avg_hours::float8 AS avg_hours,
                p50_hours::float8 AS p50_hours, p90_hours::float8 AS p90_hours
         FROM dingsync.report_turnaround WHERE corp_id = $1 ORDER BY process_code, month",
    )
    .bind(CORP)
    .fetch_all(&pool)
    .await
    .unwrap();
    let summary: Vec<(String, String, [i64; 6])> = rows
        .iter()
        .map(|r| {
            (
                r.get("process_code"),
                r.get("month"),
                [
                    "started",
                    "finished",
                    "approved",
                    "refused",
                    "terminated",
                    "canceled",
                ]
                .map(|c| r.get::<i64, _>(c)),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("PROC-A".into(), "2026-01-01".into(), [1, 1, 1, 0, 0, 0]),
            ("PROC-A".into(), "2026-02-01".into(), [4, 3, 1, 1, 1, 0]),
            ("PROC-B".into(), "2026-02-01".into(), [1, 0, 0, 0, 0, 0]),
        ]
    );
    let february = &rows[1];
    assert_eq!(num(february, "avg_hours"), 4.0);
    assert_eq!(num(february, "p50_hours"), 4.0);
    // Continuous percentile over 2, 4, 6 hours: 4 + 0.8 * 2.
    assert_eq!(num(february, "p90_hours"), 5.6);
    assert_eq!(num(&rows[0], "p50_hours"), 10.0);
    assert!(rows[2].get::<Option<f64>, _>("avg_hours").is_none());
}

#[tokio::test]
async fn pending_tasks_lists_only_open_tasks_with_their_approval() {
    let (_db, pool) = migrated().await;
    approval(
        &pool,
        "p1",
        "PROC-A",
        "2026-03-01 00:00Z",
        "RUNNING",
        None,
        None,
    )
    .await;
    sqlx::query(
        "INSERT INTO dingsync.approval_tasks
             (corp_id, task_id, process_instance_id, userid, status, result, created_at)
         VALUES ($1, 1, 'p1', 'boss', 'COMPLETED', 'AGREE', now() - interval '2 days'),
                ($1, 2, 'p1', 'cfo', 'RUNNING', NULL, now() - interval '5 hours'),
                ($1, 3, 'p1', 'ceo', 'NEW', NULL, now() - interval '1 hour'),
                ($1, 4, 'p1', 'old', 'CANCELED', NULL, now() - interval '9 days')",
    )
    .bind(CORP)
    .execute(&pool)
    .await
    .unwrap();
    let rows: Vec<(String, String, String, String, f64)> = sqlx::query_as(
        "SELECT userid, process_instance_id, title, process_code,
                extract(epoch FROM age)::float8 / 3600
         FROM dingsync.report_pending_tasks WHERE corp_id = $1 ORDER BY age DESC",
    )
    .bind(CORP)
    .fetch_all(&pool)
    .await
    .unwrap();
    let who: Vec<_> = rows
        .iter()
        .map(|r| (r.0.as_str(), r.1.as_str(), r.2.as_str(), r.3.as_str()))
        .collect();
    assert_eq!(
        who,
        [
            ("cfo", "p1", "title of p1", "PROC-A"),
            ("ceo", "p1", "title of p1", "PROC-A")
        ]
    );
    assert!(
        (rows[0].4 - 5.0).abs() < 0.1,
        "age of cfo's task: {}",
        rows[0].4
    );
}

/// state, row_count, oldest (HH:MI UTC), max_attempts, p50 and p90 seconds.
type HealthRow = (String, i64, String, i32, Option<f64>, Option<f64>);

#[tokio::test]
async fn outbox_health_counts_states_and_times_created_rows() {
    let (_db, pool) = migrated().await;
    sqlx::query(
        "INSERT INTO dingsync.outbox
             (corp_id, idempotency_key, process_code, originator_user_id, form_values, state,
              attempts, process_instance_id, created_at, done_at, last_error)
         SELECT $1, 'k' || n, 'PROC-A', 'u1', '[{\"name\": \"a\", \"value\": \"b\"}]', s.state,
                s.attempts, CASE WHEN s.state = 'created' THEN 'inst' || n END,
                '2026-03-01 00:00Z'::timestamptz - make_interval(mins => n),
                CASE WHEN s.state <> 'pending'
                     THEN '2026-03-01 00:00Z'::timestamptz - make_interval(mins => n)
                          + make_interval(secs => s.secs) END,
                CASE WHEN s.state = 'failed' THEN 'errcode 1' END
         FROM (VALUES (1, 'created', 1, 10), (2, 'created', 2, 20), (3, 'created', 1, 30),
                      (4, 'pending', 0, NULL), (5, 'pending', 3, NULL),
                      (6, 'failed', 8, 5)) AS s(n, state, attempts, secs)",
    )
    .bind(CORP)
    .execute(&pool)
    .await
    .unwrap();
    let rows: Vec<HealthRow> = sqlx::query_as(
        "SELECT state, row_count, to_char(oldest_created_at AT TIME ZONE 'UTC', 'HH24:MI'),
                max_attempts, p50_seconds_to_done::float8, p90_seconds_to_done::float8
         FROM dingsync.report_outbox_health WHERE corp_id = $1 ORDER BY state",
    )
    .bind(CORP)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            (
                "created".into(),
                3,
                "23:57".into(),
                2,
                Some(20.0),
                Some(28.0)
            ),
            ("failed".into(), 1, "23:54".into(), 8, None, None),
            ("pending".into(), 2, "23:55".into(), 3, None, None),
        ]
    );
}

#[tokio::test]
async fn sync_lag_shows_waiting_fetches_open_approvals_and_the_last_event() {
    let (_db, pool) = migrated().await;
    approval(
        &pool,
        "s1",
        "PROC-A",
        "2026-03-01 00:00Z",
        "RUNNING",
        None,
        None,
    )
    .await;
    approval(
        &pool,
        "s2",
        "PROC-A",
        "2026-03-01 00:00Z",
        "NEW",
        None,
        None,
    )
    .await;
    approval(
        &pool,
        "s3",
        "PROC-A",
        "2026-03-01 00:00Z",
        "COMPLETED",
        Some("agree"),
        Some(1),
    )
    .await;
    sqlx::query(
        "UPDATE dingsync.approvals SET detail_wanted_at = now() - interval '90 seconds'
         WHERE process_instance_id IN ('s1', 's3')",
    )
    .execute(&pool)
    .await
    .unwrap();
    for (key, received) in [("e1", "2026-03-02 10:00Z"), ("e2", "2026-03-02 11:00Z")] {
        sqlx::query(
            "INSERT INTO dingsync.events
                 (corp_id, dedup_key, source, event_type, received_at, raw, payload)
             VALUES ($1, $2, 'http_push', 'bpms_instance_change', $3::timestamptz, '{}', '{}')",
        )
        .bind(CORP)
        .bind(key)
        .bind(received)
        .execute(&pool)
        .await
        .unwrap();
    }
    let (wanted, age_s, open, newest): (i64, f64, i64, String) = sqlx::query_as(
        "SELECT detail_wanted, extract(epoch FROM oldest_detail_wanted_age)::float8,
                open_approvals, to_char(newest_event_received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI')
         FROM dingsync.report_sync_lag WHERE corp_id = $1",
    )
    .bind(CORP)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((wanted, open, newest.as_str()), (2, 2, "2026-03-02 11:00"));
    assert!((age_s - 90.0).abs() < 5.0, "oldest wait: {age_s}s");
}

/// Runs `sql` as `role` (SET ROLE inside a transaction that is rolled back).
async fn as_role(pool: &PgPool, role: &str, sql: &str) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("SET LOCAL ROLE {role}"))
        .execute(&mut *tx)
        .await?;
    let done = sqlx::raw_sql(sql).execute(&mut *tx).await;
    tx.rollback().await?;
    Ok(done?.rows_affected())
}

fn assert_denied(result: Result<u64, sqlx::Error>, what: &str) {
    match result {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {}
        other => panic!("{what}: expected insufficient_privilege, got {other:?}"),
    }
}

#[tokio::test]
async fn app_role_reads_and_requests_but_cannot_change_approvals_or_read_tokens() {
    let (_db, pool) = migrated().await;
    approval(
        &pool,
        "r1",
        "PROC-A",
        "2026-03-01 00:00Z",
        "RUNNING",
        None,
        None,
    )
    .await;
    let app = "dingsync_app";
    as_role(&pool, app, "SELECT * FROM dingsync.approvals")
        .await
        .unwrap();
    as_role(&pool, app, "SELECT * FROM dingsync.approval_tasks")
        .await
        .unwrap();
    let requested = as_role(
        &pool,
        app,
        "SELECT dingsync.request_approval('k1', 'PROC-A', 'u1', '[{\"name\": \"a\", \"value\": \"b\"}]')",
    )
    .await;
    assert!(requested.is_ok(), "request_approval: {requested:?}");
    let inserted = as_role(
        &pool,
        app,
        "INSERT INTO dingsync.outbox (idempotency_key, process_code, originator_user_id, form_values)
         VALUES ('k2', 'PROC-A', 'u1', '[{\"name\": \"a\", \"value\": \"b\"}]')",
    )
    .await;
    assert_eq!(inserted.unwrap(), 1);
    assert_denied(
        as_role(
            &pool,
            app,
            "UPDATE dingsync.approvals SET status = 'COMPLETED'",
        )
        .await,
        "update approvals",
    );
    assert_denied(
        as_role(&pool, app, "DELETE FROM dingsync.approvals").await,
        "delete approvals",
    );
    assert_denied(
        as_role(&pool, app, "SELECT * FROM dingsync.access_tokens").await,
        "read access_tokens",
    );
}

#[tokio::test]
async fn report_role_reads_the_views_but_not_the_tables() {
    let (_db, pool) = migrated().await;
    for view in [
        "report_turnaround",
        "report_pending_tasks",
        "report_outbox_health",
        "report_sync_lag",
    ] {
        let read = as_role(
            &pool,
            "dingsync_report",
            &format!("SELECT * FROM dingsync.{view}"),
        )
        .await;
        assert!(read.is_ok(), "{view}: {read:?}");
    }
    for table in [
        "approvals",
        "approval_tasks",
        "outbox",
        "events",
        "access_tokens",
    ] {
        assert_denied(
            as_role(
                &pool,
                "dingsync_report",
                &format!("SELECT * FROM dingsync.{table}"),
            )
            .await,
            table,
        );
    }
}
