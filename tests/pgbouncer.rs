//! dingsync behind PgBouncer 1.18 in transaction pooling mode (`database.pooler = "transaction"`),
//! with fewer server connections than the daemon's pool so that clients really share them:
//! callbacks stored and acknowledged, outbox rows created exactly once by two replicas that poll
//! (no `database.direct_url`, so no LISTEN), LISTEN over `database.direct_url`, each scheduled
//! job on one replica at a time, and migrations that need a direct connection failing closed
//! without one. PgBouncer must be installed (`.ci/run` installs it); these tests never skip.

mod common;

use std::time::Duration;

use common::{pgbouncer::PgBouncer, *};
use dingsync::{
    app::App,
    config::{Config, Pooler, Secret},
    store,
};
use sqlx::PgPool;

/// Server connections PgBouncer opens per database: fewer than one daemon's pool (16).
const SERVER_CONNECTIONS: u32 = 4;

/// `config` through `bouncer`: the pool over PgBouncer, and `direct` (if any) straight to
/// PostgreSQL for migrations and LISTEN.
fn behind(config: &mut Config, bouncer: &PgBouncer, db: &TestDb, direct: bool) {
    config.database.url = Secret::new(bouncer.url(&db.name));
    config.database.pooler = Pooler::Transaction;
    config.database.direct_url = Secret::new(if direct {
        db.url.clone()
    } else {
        String::new()
    });
}

/// Short outbox timings (as tests/outbox.rs).
fn fast(c: &mut Config) {
    c.dingtalk.timeout_ms = 2_000;
    c.dingtalk.qps = 0;
    c.outbox.lease_ms = 4_000;
    c.outbox.lost_settle_ms = 100;
    c.outbox.backoff_base_ms = 50;
    c.outbox.backoff_max_ms = 200;
    c.outbox.poll_ms = 100;
}

/// A database migrated straight (what `dingsync migrate` against PostgreSQL does).
async fn migrated(db: &TestDb) {
    let pool = store::connect_and_migrate(&test_config(&db.url).database)
        .await
        .unwrap();
    pool.close().await;
}

async fn request_many(pool: &PgPool, prefix: &str, n: i32) {
    sqlx::query(
        "SELECT dingsync.request_approval($1 || '-' || i, 'PROC-EMU-EXPENSE', 'emp1',
            jsonb_build_array(jsonb_build_object('name', 'Reason', 'value', $1 || ' ' || i),
                              jsonb_build_object('name', 'Amount', 'value', i)))
         FROM generate_series(1, $2) AS i",
    )
    .bind(prefix)
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

async fn wait_all_created(pool: &PgPool, within: Duration) {
    eventually(within, "every outbox row created", || async {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM dingsync.outbox WHERE state <> 'created'")
                .fetch_one(pool)
                .await
                .unwrap();
        (left == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_through_pgbouncer_are_stored_once_applied_and_acknowledged() {
    let bouncer = PgBouncer::start(SERVER_CONNECTIONS);
    let db = TestDb::new();
    let (url, direct) = (bouncer.url(&db.name), db.url.clone());
    let app = TestApp::spawn_on(db, move |c| {
        c.database.url = Secret::new(url);
        c.database.pooler = Pooler::Transaction;
        c.database.direct_url = Secret::new(direct);
    })
    .await;
    // 60 approvals, each pushed twice (a redelivery), from 20 senders at once.
    let pushes: Vec<String> = (0..60)
        .map(|i| {
            instance_event(
                &format!("pid-pgb-{i}"),
                "start",
                None,
                1_764_300_000_000,
                None,
            )
        })
        .collect();
    let sends = pushes
        .iter()
        .chain(pushes.iter())
        .map(|event| app.push_ok(event));
    futures::future::join_all(sends).await;
    assert_eq!(
        app.counts().await,
        (60, 60, 0),
        "each event once, each approval once"
    );
    let keys: i64 = app.count("event_keys").await;
    assert_eq!(keys, 60);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_polling_replicas_behind_pgbouncer_create_every_outbox_row_exactly_once() {
    let bouncer = PgBouncer::start(SERVER_CONNECTIONS);
    let emu = standalone_emulator(21).await;
    let db = TestDb::new();
    migrated(&db).await;
    let replica = || {
        let mut config = config_against(&emu, &db);
        fast(&mut config);
        // No direct URL: no LISTEN, the workers poll every outbox.poll_ms.
        behind(&mut config, &bouncer, &db, false);
        config
    };
    let first = App::start(replica()).await.unwrap();
    let second = App::start(replica()).await.unwrap();
    let pool = PgPool::connect(&db.url).await.unwrap();
    request_many(&pool, "pgb", 100).await;
    wait_all_created(&pool, Duration::from_secs(60)).await;
    let state = emu.state();
    assert_eq!(state.instances().len(), 100);
    assert_eq!(state.calls(api::create()), 100);
    let (distinct, attempts): (i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT process_instance_id), sum(attempts) FROM dingsync.outbox",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((distinct, attempts), (100, 100));
    first.stop().await.unwrap();
    second.stop().await.unwrap();
    pool.close().await;
    emu.stop().await;
}

/// With `database.direct_url` the outbox LISTENs straight to PostgreSQL: with polling an hour
/// apart, a row is still sent within seconds of its insert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_pgbouncer_the_outbox_listens_over_the_direct_url() {
    let bouncer = PgBouncer::start(SERVER_CONNECTIONS);
    let emu = standalone_emulator(22).await;
    let db = TestDb::new();
    let mut config = config_against(&emu, &db);
    fast(&mut config);
    config.outbox.poll_ms = 3_600_000;
    behind(&mut config, &bouncer, &db, true);
    // The direct URL also migrates the fresh database.
    let app = App::start(config).await.unwrap();
    let pool = PgPool::connect(&db.url).await.unwrap();
    // The worker's first claim (at start) found nothing; only a notification wakes it now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    request_many(&pool, "listen", 3).await;
    wait_all_created(&pool, Duration::from_secs(10)).await;
    assert_eq!(emu.state().calls(api::create()), 3);
    app.stop().await.unwrap();
    pool.close().await;
    emu.stop().await;
}

/// Two replicas behind PgBouncer with every job due every second: each tick runs on one replica,
/// two runs of one job never overlap (the job's lease, `dingsync.job_leases`), and no run fails
/// (a lease pins no server connection: four are enough for both replicas' ten jobs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_behind_pgbouncer_run_each_job_on_one_replica_at_a_time() {
    let bouncer = PgBouncer::start(SERVER_CONNECTIONS);
    let emu = standalone_emulator(23).await;
    let db = TestDb::new();
    migrated(&db).await;
    let replica = || {
        let mut config = config_against(&emu, &db);
        fast(&mut config);
        config.outbox.enabled = false;
        config.dingtalk.monthly_calls = 0; // no monthly pacing: every tick runs
        config.reconcile.process_codes = vec!["PROC-EMU-EXPENSE".into()];
        config.reconcile.detail_quiet_ms = 0;
        config.reconcile.backfill_days = 1;
        for schedule in [
            &mut config.scheduler.details,
            &mut config.scheduler.sweep,
            &mut config.scheduler.backfill,
            &mut config.scheduler.failed,
            &mut config.scheduler.retention,
        ] {
            *schedule = "* * * * * *".into(); // every second
        }
        behind(&mut config, &bouncer, &db, false);
        config
    };
    let a = App::start(replica()).await.unwrap();
    let b = App::start(replica()).await.unwrap();
    let pool = PgPool::connect(&db.url).await.unwrap();
    eventually(
        Duration::from_secs(40),
        "four runs of every job finished ok",
        || {
            let pool = pool.clone();
            async move {
                let fewest: Option<i64> = sqlx::query_scalar(
                    "SELECT min(n) FROM (SELECT job, count(*) AS n FROM dingsync.job_runs
                 WHERE outcome = 'ok'
                   AND job IN ('details', 'sweep', 'backfill', 'failed', 'retention')
                 GROUP BY job) x HAVING count(*) = 5",
                )
                .fetch_optional(&pool)
                .await
                .unwrap()
                .flatten();
                fewest.filter(|n| *n >= 4)
            }
        },
    )
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    let runs: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT job, outcome, count(*) FROM dingsync.job_runs GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    println!("runs: {runs:?}");
    let twice: Vec<(String, chrono::DateTime<chrono::Utc>, i64)> = sqlx::query_as(
        "SELECT job, tick_at, count(*) FROM dingsync.job_runs GROUP BY 1, 2 HAVING count(*) > 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(twice.is_empty(), "ticks run twice: {twice:?}");
    let overlapping: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT r.job, r.id, s.id FROM dingsync.job_runs r
         JOIN dingsync.job_runs s ON s.job = r.job AND s.id > r.id
          AND s.started_at < coalesce(r.finished_at, 'infinity')
          AND r.started_at < coalesce(s.finished_at, 'infinity')",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        overlapping.is_empty(),
        "runs of one job overlapped: {overlapping:?}"
    );
    let failed: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT job, error FROM dingsync.job_runs WHERE outcome = 'failed'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        failed.is_empty(),
        "runs failed behind PgBouncer: {failed:?}"
    );
    let replicas: i64 = sqlx::query_scalar("SELECT count(DISTINCT replica) FROM dingsync.job_runs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(replicas >= 1);
    pool.close().await;
    emu.stop().await;
}

/// Migrating takes a session-level lock: through a transaction pooler with no direct URL, a
/// daemon on a schema that needs migrating refuses to start and says which keys to set; on a
/// current schema it starts.
#[tokio::test]
async fn behind_pgbouncer_without_a_direct_url_a_schema_to_migrate_fails_closed_naming_the_keys() {
    let bouncer = PgBouncer::start(SERVER_CONNECTIONS);
    let db = TestDb::new();
    // The database exists, empty (a DBA made it).
    store::connect(&test_config(&db.url).database)
        .await
        .unwrap()
        .close()
        .await;
    let mut config = test_config(&db.url);
    behind(&mut config, &bouncer, &db, false);
    let err = store::connect_and_migrate(&config.database)
        .await
        .expect_err("a fresh database needs migrating");
    let message = format!("{err:#}");
    assert!(
        message.contains("database.direct_url") && message.contains("database.pooler"),
        "{message}"
    );
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'dingsync'")
            .fetch_one(&PgPool::connect(&db.url).await.unwrap())
            .await
            .unwrap();
    assert_eq!(tables, 0, "nothing was applied");

    migrated(&db).await;
    let pool = store::connect_and_migrate(&config.database).await.unwrap();
    store::ping(&pool).await.unwrap();
    pool.close().await;
}
