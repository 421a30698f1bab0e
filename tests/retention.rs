//! The `retention` job: removes raw events whose UTC month ended more than
//! `retention.events_days` ago (dropping the month's partition when it is this organisation's
//! alone, else in batches), their dedup keys older than `retention.event_keys_days` and job runs
//! older than `retention.job_runs_days`, in batches, and nothing else; a replay after its event
//! was pruned is still a duplicate.

mod common;

use common::{CORP_ID, TestApp};
use dingsync::{
    config::{Config, Secret},
    retention::BATCH,
    scheduler::{self, Job, Ran},
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const DORMANT: &str = "0 0 0 1 1 *";
const OTHER_CORP: &str = "dingothercorp0000001";

/// A daemon whose scheduled jobs never fire by themselves, with a (never reached) DingTalk so
/// that it has a job context.
async fn spawn(events_days: u32) -> TestApp {
    spawn_keeping(events_days, 30).await
}

async fn spawn_keeping(events_days: u32, job_runs_days: u32) -> TestApp {
    TestApp::spawn_with(|c: &mut Config| {
        c.dingtalk.app_key = "retention-test".into();
        c.dingtalk.app_secret = Secret::new("unused");
        c.outbox.enabled = false;
        for schedule in [
            &mut c.scheduler.details,
            &mut c.scheduler.sweep,
            &mut c.scheduler.backfill,
            &mut c.scheduler.failed,
            &mut c.scheduler.retention,
        ] {
            *schedule = DORMANT.into();
        }
        c.retention.events_days = events_days;
        if events_days == 0 {
            c.retention.event_keys_days = 0; // keys are kept at least as long as events
        }
        c.retention.job_runs_days = job_runs_days;
    })
    .await
}

/// `n` events of `corp` received `days_ago` days ago.
async fn events(pool: &PgPool, corp: &str, n: i32, days_ago: i32) {
    sqlx::query(
        "INSERT INTO dingsync.events
             (corp_id, dedup_key, source, event_type, received_at, raw, payload)
         SELECT $1, 'test:' || $3 || ':' || g, 'http_push', 'bpms_instance_change',
                now() - make_interval(days => $3), '{}', '{}'
         FROM generate_series(1, $2) g",
    )
    .bind(corp)
    .bind(n)
    .bind(days_ago)
    .execute(pool)
    .await
    .unwrap();
}

/// Old rows of every other table the job must leave alone.
async fn old_approval_rows(pool: &PgPool) {
    sqlx::raw_sql(&format!(
        "INSERT INTO dingsync.approvals (corp_id, process_instance_id, status, created_at, updated_at)
         VALUES ('{CORP_ID}', 'old-1', 'COMPLETED', now() - interval '3 years', now() - interval '3 years');
         INSERT INTO dingsync.approval_tasks (corp_id, task_id, process_instance_id, status, created_at, updated_at)
         VALUES ('{CORP_ID}', 1, 'old-1', 'COMPLETED', now() - interval '3 years', now() - interval '3 years');
         INSERT INTO dingsync.outbox (corp_id, idempotency_key, process_code, originator_user_id, form_values, created_at)
         VALUES ('{CORP_ID}', 'old', 'PROC-A', 'u1', '[{{\"name\": \"a\", \"value\": \"b\"}}]', now() - interval '3 years');"
    ))
    .execute(pool)
    .await
    .unwrap();
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn run_retention(app: &TestApp) -> Ran {
    let ctx = app.app.as_ref().unwrap().jobs.clone().unwrap();
    scheduler::run_job_now(&ctx, Job::Retention, "test", &CancellationToken::new())
        .await
        .unwrap()
}

/// 62 days ago is always in a month that ended more than 30 days ago; a fresh database has no
/// partition that old, so these rows are in the default partition and go in batches.
#[tokio::test]
async fn retention_deletes_only_events_older_than_the_limit_in_batches() {
    let app = spawn(30).await;
    let pool = &app.pool;
    events(pool, CORP_ID, BATCH as i32 + 2, 62).await;
    events(pool, CORP_ID, 3, 29).await;
    events(pool, OTHER_CORP, 4, 400).await; // another organisation's daemon prunes those
    old_approval_rows(pool).await;

    let Ran::Done {
        id,
        outcome,
        counts,
        error,
    } = run_retention(&app).await
    else {
        panic!("the retention job did not run");
    };
    assert_eq!((outcome, error), ("ok", None));
    assert_eq!(counts["deleted"], BATCH as u64 + 2);
    assert_eq!(counts["batches"], 2);
    assert_eq!(counts["partitions_dropped"], 0);

    let left =
        |corp: &str| format!("SELECT count(*) FROM dingsync.events WHERE corp_id = '{corp}'");
    assert_eq!(count(pool, &left(CORP_ID)).await, 3, "younger events stay");
    assert_eq!(count(pool, &left(OTHER_CORP)).await, 4);
    for table in ["approvals", "approval_tasks", "outbox"] {
        let sql = format!("SELECT count(*) FROM dingsync.{table}");
        assert_eq!(count(pool, &sql).await, 1, "{table} is never pruned");
    }
    let logged: serde_json::Value = sqlx::query_scalar(
        "SELECT counts FROM dingsync.job_runs WHERE id = $1 AND job = 'retention' AND outcome = 'ok'",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(logged["deleted"], BATCH + 2);
}

/// The partitions of dingsync.events, by name.
async fn partitions(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT inhrelid::regclass::text FROM pg_inherits
         WHERE inhparent = 'dingsync.events'::regclass ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Months whose every row is this organisation's are dropped whole; a month another organisation
/// shares loses only this organisation's rows; the month that straddles the cutoff, and the ones
/// after, stay; and the run makes the months ahead.
#[tokio::test]
async fn retention_drops_whole_past_months_and_keeps_other_organisations_rows() {
    let app = spawn(30).await;
    let pool = &app.pool;
    // Two old months, made as a database migrated back then would have them.
    for months_ago in [5, 4] {
        sqlx::query(
            "SELECT dingsync.create_events_partition(
                 (date_trunc('month', now() AT TIME ZONE 'UTC') - make_interval(months => $1))::date)",
        )
        .bind(months_ago)
        .execute(pool)
        .await
        .unwrap();
    }
    let five = partitions(pool).await.first().cloned().unwrap();
    // 5 months ago: ours alone; 4 months ago: ours and another organisation's.
    let at = |months: i32, corp: &str, n: i32| {
        sqlx::query(
            "INSERT INTO dingsync.events (corp_id, dedup_key, source, event_type, received_at, raw, payload)
             SELECT $1, 'old:' || $2 || ':' || g, 'http_push', 'bpms_instance_change',
                    (date_trunc('month', now() AT TIME ZONE 'UTC') - make_interval(months => $2))
                        AT TIME ZONE 'UTC' + interval '3 days',
                    '{}', '{}'
             FROM generate_series(1, $3) g",
        )
        .bind(corp.to_owned())
        .bind(months)
        .bind(n)
        .execute(pool)
    };
    at(5, CORP_ID, 7).await.unwrap();
    at(4, CORP_ID, 5).await.unwrap();
    at(4, OTHER_CORP, 2).await.unwrap();
    events(pool, CORP_ID, 3, 1).await;
    // The months ahead are there from start-up; drop the farthest to see the job make it again.
    let farthest = partitions(pool)
        .await
        .into_iter()
        .rfind(|p| p != "dingsync.events_default")
        .unwrap();
    sqlx::query(&format!("DROP TABLE {farthest}"))
        .execute(pool)
        .await
        .unwrap();

    let Ran::Done {
        outcome, counts, ..
    } = run_retention(&app).await
    else {
        panic!("the retention job did not run");
    };
    assert_eq!(outcome, "ok");
    assert_eq!(counts["partitions_dropped"], 1, "{counts:?}");
    assert_eq!(counts["deleted"], 7 + 5, "{counts:?}");
    assert_eq!(counts["partitions_created"], 1, "{counts:?}");
    let left = partitions(pool).await;
    assert!(!left.contains(&five), "{five} is dropped: {left:?}");
    assert!(
        left.contains(&farthest),
        "{farthest} is made again: {left:?}"
    );
    assert_eq!(
        left.len(),
        1 + 4 + 1,
        "the shared month, this month and three ahead, the default: {left:?}"
    );
    let by_corp: Vec<(String, i64)> =
        sqlx::query_as("SELECT corp_id, count(*) FROM dingsync.events GROUP BY 1 ORDER BY 1")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(
        by_corp,
        [(OTHER_CORP.to_owned(), 2), (CORP_ID.to_owned(), 3)],
        "the other organisation's old rows and this month's stay"
    );
}

#[tokio::test]
async fn retention_of_zero_days_keeps_every_event() {
    let app = spawn(0).await;
    events(&app.pool, CORP_ID, 5, 4000).await;
    let Ran::Done { counts, .. } = run_retention(&app).await else {
        panic!("the retention job did not run");
    };
    assert_eq!(counts["deleted"], 0);
    assert_eq!(
        count(&app.pool, "SELECT count(*) FROM dingsync.events").await,
        5
    );
}

/// `n` finished runs of `job` for `corp`, started `days_ago` days ago (one tick a second).
async fn job_runs(pool: &PgPool, corp: &str, job: &str, n: i32, days_ago: i32) {
    sqlx::query(
        "INSERT INTO dingsync.job_runs (corp_id, job, tick_at, replica, started_at, finished_at, outcome)
         SELECT $1, $2, date_trunc('second', now()) - make_interval(days => $4, secs => g),
                'old-replica', now() - make_interval(days => $4, secs => g),
                now() - make_interval(days => $4, secs => g), 'ok'
         FROM generate_series(1, $3) g",
    )
    .bind(corp)
    .bind(job)
    .bind(n)
    .bind(days_ago)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn retention_deletes_job_runs_older_than_their_limit_and_keeps_the_rest() {
    let app = spawn_keeping(180, 30).await;
    let pool = &app.pool;
    job_runs(pool, CORP_ID, "details", BATCH as i32 + 5, 31).await;
    job_runs(pool, CORP_ID, "sweep", 7, 29).await;
    job_runs(pool, OTHER_CORP, "details", 4, 400).await;
    let Ran::Done { counts, .. } = run_retention(&app).await else {
        panic!("the retention job did not run");
    };
    assert_eq!(counts["job_runs_deleted"], BATCH as u64 + 5);
    let left =
        |corp: &str| format!("SELECT count(*) FROM dingsync.job_runs WHERE corp_id = '{corp}'");
    // The 7 younger runs and this run of the retention job itself.
    assert_eq!(count(pool, &left(CORP_ID)).await, 8);
    assert_eq!(count(pool, &left(OTHER_CORP)).await, 4);

    let keep = spawn_keeping(180, 0).await;
    job_runs(&keep.pool, CORP_ID, "details", 3, 4000).await;
    let Ran::Done { counts, .. } = run_retention(&keep).await else {
        panic!("the retention job did not run");
    };
    assert_eq!(counts["job_runs_deleted"], 0, "0 days keeps every run");
}

/// A replay of an event whose raw row retention pruned: the same signed push, sent again. Its
/// key outlives the event (`retention.event_keys_days`), so it is answered `success` and neither
/// stored nor applied a second time.
#[tokio::test]
async fn a_replay_after_retention_pruned_its_event_is_acknowledged_but_not_stored_or_applied_again()
{
    let app = spawn(180).await;
    let pool = &app.pool;
    let event = common::instance_event("pid-replay", "start", None, 1_764_300_000_000, None);
    app.push_ok(&event).await;
    assert_eq!(app.counts().await, (1, 1, 0));
    // Its detail fetch done; an applied event would ask for another and touch the row.
    sqlx::query("UPDATE dingsync.approvals SET detail_wanted_at = NULL")
        .execute(pool)
        .await
        .unwrap();
    let updated_at = || async {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
            "SELECT updated_at FROM dingsync.approvals",
        )
        .fetch_one(pool)
        .await
        .unwrap()
    };
    let before = updated_at().await;
    for table in ["events", "event_keys"] {
        sqlx::query(&format!(
            "UPDATE dingsync.{table} SET received_at = now() - interval '200 days'"
        ))
        .execute(pool)
        .await
        .unwrap();
    }
    let Ran::Done { counts, .. } = run_retention(&app).await else {
        panic!("the retention job did not run");
    };
    assert_eq!((counts["deleted"], counts["event_keys_deleted"]), (1, 0));
    assert_eq!(
        count(pool, "SELECT count(*) FROM dingsync.event_keys").await,
        1
    );

    app.push_ok(&event).await;
    app.push_ok(&event).await;
    assert_eq!(app.counts().await, (0, 1, 0), "the replay was stored again");
    assert!(
        !app.approval("pid-replay").await.wanted,
        "the replay was applied"
    );
    assert_eq!(updated_at().await, before);

    // Past retention.event_keys_days the key goes too.
    sqlx::query("UPDATE dingsync.event_keys SET received_at = now() - interval '401 days'")
        .execute(pool)
        .await
        .unwrap();
    let Ran::Done { counts, .. } = run_retention(&app).await else {
        panic!("the retention job did not run");
    };
    assert_eq!(counts["event_keys_deleted"], 1);
    assert_eq!(
        count(pool, "SELECT count(*) FROM dingsync.event_keys").await,
        0
    );
}
