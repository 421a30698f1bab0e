//! Reconciliation against the emulator over real HTTP and a real PostgreSQL: lost, duplicated and
//! reordered pushes converge to DingTalk's state; a daemon that missed everything recovers from
//! the failed list and one reconciliation pass; two replicas run each job once per tick; an
//! interrupted backfill resumes; a burst of events is one detail fetch, and an approval is
//! fetched for its details once; what backfill finds is counted as drift repaired.

mod common;

use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use common::*;
use dingsync::{
    app::App,
    callback::TAGS,
    config::{Config, Secret},
    dingtalk::types::CallbackRegistration,
    jobs::{Context, Counts},
    reconcile,
    scheduler::{self, Job, Ran},
};
use dingsync_emulator::{
    DEFAULT_APP_KEY, DEFAULT_APP_SECRET, Emulator, EmulatorConfig, Faults, PushFaults,
    StartInstance, TaskAction,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const CODES: [&str; 2] = ["PROC-EMU-EXPENSE", "PROC-EMU-LEAVE"];
/// A schedule that does not fire during a test (1 January, midnight): jobs run by `run_now`.
const DORMANT: &str = "0 0 0 1 1 *";

async fn emulator() -> Emulator {
    install_crypto_provider();
    Emulator::start(
        EmulatorConfig {
            corp_id: CORP_ID.into(),
            time_scale: 0.01,
            seed: 11,
            ..EmulatorConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap()
}

/// A daemon configuration for `emu`'s organisation with dormant schedules and an immediate sweep.
fn configure(c: &mut Config, emu: &Emulator) {
    c.dingtalk.api_base = emu.base_url();
    c.dingtalk.app_key = DEFAULT_APP_KEY.into();
    c.dingtalk.app_secret = Secret::new(DEFAULT_APP_SECRET);
    c.dingtalk.qps = 0;
    c.dingtalk.timeout_ms = 3_000;
    c.scheduler.details = DORMANT.into();
    c.scheduler.sweep = DORMANT.into();
    c.scheduler.backfill = DORMANT.into();
    c.scheduler.failed = DORMANT.into();
    c.reconcile.process_codes = CODES.iter().map(|c| c.to_string()).collect();
    c.reconcile.detail_quiet_ms = 0;
    // The jobs are run by hand here: no monthly pacing.
    c.dingtalk.monthly_calls = 0;
    c.reconcile.backfill_days = 1;
}

async fn register(app: &App, config_token: &str, config_key: &str) {
    app.client
        .as_ref()
        .unwrap()
        .register_callback(&CallbackRegistration {
            call_back_tag: TAGS.iter().map(|t| t.to_string()).collect(),
            token: config_token.into(),
            aes_key: config_key.into(),
            url: format!("http://{}/dingtalk/callback", app.addr),
        })
        .await
        .expect("callback registered");
}

fn ctx(app: &TestApp) -> Context {
    app.app.as_ref().unwrap().jobs.clone().unwrap()
}

/// Drains the failed-push list now (the scheduled job drains only when the planner says so).
async fn drain_now(ctx: &Context) -> Counts {
    reconcile::failed::drain(ctx, &CancellationToken::new())
        .await
        .unwrap()
}

/// One reconciliation pass over every open approval (what the planner runs after a month of
/// polling; the scheduled sweep re-checks an approval only a few times over its life).
async fn recheck_open(ctx: &Context) -> Counts {
    reconcile::background::recheck_open(ctx, &CancellationToken::new())
        .await
        .unwrap()
}

async fn run_now(ctx: &Context, job: Job) -> Counts {
    match scheduler::run_job_now(ctx, job, "test", &CancellationToken::new())
        .await
        .unwrap()
    {
        Ran::Done {
            outcome: "ok",
            counts,
            ..
        } => counts,
        other => panic!("{} did not run ok: {other:?}", job.name()),
    }
}

fn start(code: &str, originator: &str, approvers: &[&str]) -> StartInstance {
    StartInstance {
        process_code: code.into(),
        originator_userid: originator.into(),
        approvers: Some(approvers.iter().map(|a| a.to_string()).collect()),
        ..StartInstance::default()
    }
}

/// job, tick_at, replica, outcome, error
type RunRow = (String, DateTime<Utc>, String, String, Option<String>);

/// Moves approvals along as people would: each open task is agreed, refused, or its approval
/// withdrawn, by its index; some approvals stay open.
fn act_on_open_tasks(emu: &Emulator, round: usize) {
    let state = emu.state();
    for (n, open) in state.open_tasks().into_iter().enumerate() {
        let taskid = open.task.taskid;
        let remark = Some(format!("round {round} #{n}"));
        let _ = match (n + round) % 7 {
            0..=2 => state.agree(
                taskid,
                TaskAction {
                    remark,
                    ..TaskAction::default()
                },
            ),
            3 => state.refuse(
                taskid,
                TaskAction {
                    remark,
                    ..TaskAction::default()
                },
            ),
            4 => state
                .terminate(&open.process_instance_id, None, None)
                .map(|_| state.instance(&open.process_instance_id).unwrap()),
            _ => continue, // left open this round
        };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_approvals_with_lost_duplicated_and_reordered_pushes_converge_to_dingtalk() {
    let emu = emulator().await;
    let app = TestApp::spawn_with(|c| configure(c, &emu)).await;
    register(app.app.as_ref().unwrap(), app.token(), app.crypto_key()).await;
    let state = emu.state();
    state.set_faults(Faults {
        push: PushFaults {
            drop_forever_rate: 0.3,
            duplicate_rate: 0.1,
            reorder_rate: 0.2,
            reorder_max_ms: 200,
            ..PushFaults::default()
        },
        ..Faults::default()
    });
    for n in 0..500 {
        let originator = ["emp1", "emp2", "emp3", "emp4"][n % 4];
        state
            .start_instance(start(CODES[n % 2], originator, &["manager1", "fin1"]))
            .unwrap();
    }
    for round in 0..3 {
        act_on_open_tasks(&emu, round);
    }
    assert!(
        state.settle(Duration::from_secs(30)).await,
        "pushes still in flight"
    );
    let instances = state.instances();
    assert!(instances.iter().any(|i| i.status.as_str() == "RUNNING"));
    assert!(instances.iter().any(|i| i.status.as_str() == "TERMINATED"));

    let ctx = ctx(&app);
    drain_now(&ctx).await;
    let backfilled = run_now(&ctx, Job::Backfill).await;
    assert!(
        backfilled["fetched"] > 0,
        "every event of some approval was lost: {backfilled:?}"
    );
    run_now(&ctx, Job::Details).await;
    recheck_open(&ctx).await;

    let codes: Vec<String> = CODES.iter().map(|c| c.to_string()).collect();
    let drift = dingsync::cli::drift::run(&ctx, &codes, Utc::now() - TimeDelta::hours(1))
        .await
        .unwrap();
    assert!(drift.is_clean(), "{drift}");
    assert_eq!(drift.listed, 500);
    mirror::assert_rows_equal_the_emulator(&app.pool, CORP_ID, &instances).await;
    app.stop().await;
    emu.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_down_for_the_whole_retry_ladder_ends_correct_from_the_failed_list_and_sweep() {
    let emu = emulator().await;
    let db = TestDb::new();
    let mut config = test_config(&db.url);
    configure(&mut config, &emu);
    config.reconcile.process_codes = Vec::new(); // no backfill: the failed list must do it
    let first = App::start(config.clone()).await.unwrap();
    register(
        &first,
        config.callback.token.expose(),
        config.callback.aes_key.expose(),
    )
    .await;
    first.stop().await.unwrap();

    let state = emu.state();
    for n in 0..20 {
        state
            .start_instance(start(CODES[n % 2], "emp1", &["manager1", "fin1"]))
            .unwrap();
    }
    act_on_open_tasks(&emu, 0);
    assert!(state.settle(Duration::from_secs(10)).await);
    assert!(state.failed_pending() > 0);

    let app = TestApp::spawn_on(db, |c| {
        *c = config.clone();
        c.server.listen = "127.0.0.1:0".into();
    })
    .await;
    let ctx = ctx(&app);
    // Failed pushes become readable 3-5 DingTalk minutes after the last retry.
    eventually(Duration::from_secs(15), "the failed list drained", || {
        let ctx = ctx.clone();
        let state = state.clone();
        async move {
            drain_now(&ctx).await;
            (state.failed_pending() == 0).then_some(())
        }
    })
    .await;
    let from_list: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dingsync.events WHERE source = 'failed_list'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(from_list >= 20, "{from_list} events from the failed list");
    run_now(&ctx, Job::Details).await;
    recheck_open(&ctx).await;
    mirror::assert_rows_equal_the_emulator(&app.pool, CORP_ID, &state.instances()).await;
    app.stop().await;
    emu.stop().await;
}

/// The failed list is read-once: a page is gone from DingTalk once read. One approval's events
/// carry a createTime of -8e15 ms (outside PostgreSQL's timestamptz): `event` refuses them and
/// they are kept raw. Another approval's row cannot be written (a trigger stands for any
/// statement that fails on one item): its page is stored item by item and its items are kept
/// raw. Every other item of the list is stored with its effects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_list_page_with_poison_items_stores_the_other_items_with_their_effects() {
    let emu = emulator().await;
    let db = TestDb::new();
    let mut config = test_config(&db.url);
    configure(&mut config, &emu);
    let first = App::start(config.clone()).await.unwrap();
    register(
        &first,
        config.callback.token.expose(),
        config.callback.aes_key.expose(),
    )
    .await;
    first.stop().await.unwrap();

    // Every push fails (the daemon is down): the events end in the failed list.
    let state = emu.state();
    let poison = state
        .start_instance(StartInstance {
            create_time_ms: Some(-8_000_000_000_000_000),
            ..start(CODES[0], "emp1", &["manager1"])
        })
        .unwrap()
        .process_instance_id;
    let broken = state
        .start_instance(start(CODES[1], "emp3", &["manager1"]))
        .unwrap()
        .process_instance_id;
    for n in 0..12 {
        state
            .start_instance(start(CODES[n % 2], "emp2", &["manager1", "fin1"]))
            .unwrap();
    }
    act_on_open_tasks(&emu, 0);
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION public.refuse_broken() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.process_instance_id = '{broken}' THEN RAISE EXCEPTION 'broken row'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_broken BEFORE INSERT ON dingsync.approvals
             FOR EACH ROW EXECUTE FUNCTION public.refuse_broken();"
    ))
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    assert!(state.settle(Duration::from_secs(10)).await);
    assert!(state.failed_pending() > 0);

    let app = TestApp::spawn_on(db, |c| {
        *c = config.clone();
        c.server.listen = "127.0.0.1:0".into();
    })
    .await;
    let ctx = ctx(&app);
    let totals = std::sync::Arc::new(std::sync::Mutex::new(Counts::new()));
    eventually(Duration::from_secs(15), "the failed list drained", || {
        let (ctx, state, totals) = (ctx.clone(), state.clone(), totals.clone());
        async move {
            let counts = drain_now(&ctx).await;
            let mut totals = totals.lock().unwrap();
            for (key, n) in counts {
                *totals.entry(key).or_default() += n;
            }
            (state.failed_pending() == 0).then_some(())
        }
    })
    .await;
    let totals = totals.lock().unwrap().clone();
    assert!(totals["refused"] >= 1, "{totals:?}");
    assert!(totals["unapplied"] >= 1, "{totals:?}");
    assert_eq!(totals["unstored"], 0, "{totals:?}");
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dingsync.events WHERE source = 'failed_list'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(stored as u64, totals["items"], "every item read is stored");
    let poison_kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dingsync.events
         WHERE process_instance_id IS NULL AND strpos(raw, $1) > 0",
    )
    .bind(&poison)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(poison_kept >= 1, "the poison items are kept raw");
    for instance in state.instances() {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT status FROM dingsync.approvals WHERE process_instance_id = $1")
                .bind(&instance.process_instance_id)
                .fetch_optional(&app.pool)
                .await
                .unwrap();
        if instance.process_instance_id == poison || instance.process_instance_id == broken {
            assert_eq!(row, None, "a poison item was applied");
        } else {
            let status = row.expect("an approval of the failed list is applied").0;
            assert_eq!(
                status,
                instance.status.as_str(),
                "{}",
                instance.process_instance_id
            );
        }
    }
    app.stop().await;
    emu.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_run_each_job_once_per_tick_and_a_failing_run_does_not_stop_the_next() {
    let emu = emulator().await;
    // The first failed-list call fails: that run is recorded failed, the next ticks run on.
    emu.state().inject(
        "call_back/get_call_back_failed_result",
        dingsync_emulator::InjectedError::Custom {
            errcode: 40035,
            sub_code: None,
            errmsg: "不合法的参数".into(),
        },
        1,
    );
    let db = TestDb::new();
    let mut config = test_config(&db.url);
    configure(&mut config, &emu);
    for schedule in [
        &mut config.scheduler.details,
        &mut config.scheduler.sweep,
        &mut config.scheduler.backfill,
        &mut config.scheduler.failed,
    ] {
        *schedule = "* * * * * *".into(); // every second
    }
    let a = App::start(config.clone()).await.unwrap();
    let b = App::start(config.clone()).await.unwrap();
    let pool = a.pool.clone();
    eventually(
        Duration::from_secs(20),
        "four finished ticks of every job",
        || {
            let pool = pool.clone();
            async move {
                let fewest: Option<i64> = sqlx::query_scalar(
                    "SELECT min(n) FROM (SELECT job, count(*) AS n FROM dingsync.job_runs
                     WHERE outcome <> 'running' GROUP BY job) x HAVING count(*) = 4",
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
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let runs: Vec<RunRow> = sqlx::query_as(
        "SELECT job, tick_at, replica, outcome, error FROM dingsync.job_runs ORDER BY job, tick_at",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut ticks = std::collections::HashSet::new();
    for (job, tick, ..) in &runs {
        assert!(
            ticks.insert((job.clone(), *tick)),
            "{job} ran twice at {tick}"
        );
        assert_eq!(
            *tick,
            tick.duration_trunc(TimeDelta::seconds(1)).unwrap(),
            "a tick is a cron second"
        );
    }
    let failed: Vec<_> = runs.iter().filter(|r| r.3 == "failed").collect();
    assert_eq!(failed.len(), 1, "{runs:?}");
    assert_eq!(failed[0].0, "failed");
    assert!(failed[0].4.as_deref().unwrap().contains("40035"));
    assert!(
        runs.iter()
            .any(|r| r.0 == "failed" && r.3 == "ok" && r.1 > failed[0].1),
        "no run after the failing one: {runs:?}"
    );
    let replicas: std::collections::HashSet<_> = runs.iter().map(|r| &r.2).collect();
    assert!(replicas.len() <= 2);
    pool.close().await;
    emu.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_backfill_resumes_from_its_cursor_without_listing_finished_windows() {
    let emu = emulator().await;
    let state = emu.state();
    let now = Utc::now();
    for day in 1..=10i64 {
        for n in 0..5i64 {
            let mut request = start(CODES[0], "emp2", &["manager1"]);
            request.create_time_ms =
                Some((now - TimeDelta::days(day) + TimeDelta::minutes(n * 7)).timestamp_millis());
            state.start_instance(request).unwrap();
        }
    }
    let app = TestApp::spawn_with(|c| {
        configure(c, &emu);
        c.reconcile.backfill_window_days = 1;
        c.reconcile.backfill_overlap_s = 600;
    })
    .await;
    let ctx = ctx(&app);
    let since = now - TimeDelta::days(11);
    let listids = || state.calls(api::list_ids());

    let dry = reconcile::backfill::run(&ctx, CODES[0], since, true, &CancellationToken::new())
        .await
        .unwrap();
    // Overlapping windows may list an instance twice; it is counted missing once.
    assert_eq!((dry.missing, dry.fetched), (50, 0), "{dry:?}");
    assert_eq!(app.count("approvals").await, 0, "a dry run writes nothing");
    assert_eq!(app.count("sync_state").await, 0, "a dry run writes nothing");
    let full_run = listids();
    assert_eq!(full_run as u64, dry.pages);

    // Slow DingTalk down so that the run can be killed midway.
    state.update_faults(|f| f.latency_ms = 40);
    let before = listids();
    let killed = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            reconcile::backfill::run(&ctx, CODES[0], since, false, &CancellationToken::new()).await
        })
    };
    eventually(Duration::from_secs(20), "four windows listed", || async {
        (listids() - before >= 4).then_some(())
    })
    .await;
    killed.abort();
    let _ = killed.await;
    let first_part = listids() - before;
    assert!(first_part < full_run, "the run was not interrupted");
    state.update_faults(|f| f.latency_ms = 0);

    let before = listids();
    let resumed = reconcile::backfill::run(&ctx, CODES[0], since, false, &CancellationToken::new())
        .await
        .unwrap();
    let second_part = listids() - before;
    assert!(resumed.resumed);
    assert!(
        first_part + second_part <= full_run + 1,
        "{first_part} + {second_part} listids calls for a {full_run}-page backfill"
    );
    mirror::assert_rows_equal_the_emulator(&app.pool, CORP_ID, &state.instances()).await;
    app.stop().await;
    emu.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_100_events_for_one_instance_is_one_detail_fetch() {
    let emu = emulator().await;
    let app = TestApp::spawn_with(|c| {
        configure(c, &emu);
        c.scheduler.details = "* * * * * *".into();
        c.reconcile.detail_quiet_ms = 1_500;
    })
    .await;
    let instance = emu
        .state()
        .start_instance(start(CODES[0], "emp1", &["manager1"]))
        .unwrap();
    let pid = instance.process_instance_id.clone();
    let created = instance.create_time.timestamp_millis();
    let pusher = app.pusher();
    let pushes: Vec<_> = (0..100)
        .map(|n| {
            let pusher = pusher.clone();
            let mut event: serde_json::Value =
                serde_json::from_str(&task_event(&pid, 7_000 + n, "start", None, created, None))
                    .unwrap();
            event["eventId"] = json!(format!("burst-{n}"));
            tokio::spawn(async move { pusher.send(&event.to_string()).await.unwrap().status() })
        })
        .collect();
    for push in pushes {
        assert_eq!(push.await.unwrap(), 200);
    }
    assert_eq!(app.count("events").await, 100);
    let synced_by: i64 = eventually(Duration::from_secs(15), "the detail fetch", || async {
        sqlx::query_scalar(
            "SELECT r.id FROM dingsync.approvals a JOIN dingsync.job_runs r
               ON r.job = 'details' AND r.finished_at >= a.detail_synced_at
             WHERE a.process_instance_id = $1 AND a.detail_wanted_at IS NULL ORDER BY r.id LIMIT 1",
        )
        .bind(&pid)
        .fetch_optional(&app.pool)
        .await
        .unwrap()
    })
    .await;
    // Two more finished ticks: nothing left to fetch.
    eventually(Duration::from_secs(10), "two more details runs", || async {
        let later: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM dingsync.job_runs WHERE job = 'details' AND id > $1 AND outcome = 'ok'",
        )
        .bind(synced_by)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        (later >= 2).then_some(())
    })
    .await;
    assert_eq!(emu.state().calls(api::get()), 1);
    app.stop().await;
    emu.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_arriving_during_the_detail_fetch_is_applied_without_a_second_fetch() {
    let emu = emulator().await;
    let app = TestApp::spawn_with(|c| configure(c, &emu)).await;
    let instance = emu
        .state()
        .start_instance(start(CODES[0], "emp1", &["manager1"]))
        .unwrap();
    let pid = instance.process_instance_id.clone();
    let created = instance.create_time.timestamp_millis();
    app.push_ok(&instance_event(&pid, "start", None, created, None))
        .await;
    emu.state().update_faults(|f| f.latency_ms = 500);
    let ctx = ctx(&app);
    let fetch = {
        let ctx = ctx.clone();
        tokio::spawn(async move { run_now(&ctx, Job::Details).await })
    };
    eventually(
        Duration::from_secs(5),
        "the fetch reaching DingTalk",
        || async { (emu.state().calls(api::get()) == 1).then_some(()) },
    )
    .await;
    app.push_ok(&task_event(&pid, 9_001, "start", None, created, None))
        .await;
    fetch.await.unwrap();
    // Details once: the snapshot brought the form; the mid-fetch event brought its own task.
    assert!(!app.approval(&pid).await.wanted);
    assert_eq!(app.task(9_001).await.status, "RUNNING");
    emu.state().update_faults(|f| f.latency_ms = 0);
    app.push_ok(&task_event(
        &pid,
        9_001,
        "finish",
        Some("agree"),
        created,
        Some(created + 1),
    ))
    .await;
    assert!(
        !app.approval(&pid).await.wanted,
        "a later event asks for no fetch"
    );
    run_now(&ctx, Job::Details).await;
    assert_eq!(emu.state().calls(api::get()), 1);
    assert_eq!(app.task(9_001).await.status, "COMPLETED");
    app.stop().await;
    emu.stop().await;
}

/// `dingsync` itself, configured through the environment for `emu` and the database at `url`.
fn command(emu: &Emulator, url: &str, args: &[&str]) -> std::process::Output {
    dingsync_command(args)
        .env("DINGSYNC_DATABASE_URL", url)
        .env("DINGSYNC_DINGTALK_API_BASE", emu.base_url())
        .env("DINGSYNC_DINGTALK_APP_KEY", DEFAULT_APP_KEY)
        .env("DINGSYNC_DINGTALK_APP_SECRET", DEFAULT_APP_SECRET)
        .env("DINGSYNC_DINGTALK_CORP_ID", CORP_ID)
        .env("DINGSYNC_DINGTALK_QPS", "0")
        .env("DINGSYNC_CALLBACK_TOKEN", "tok123")
        .env(
            "DINGSYNC_CALLBACK_AES_KEY",
            dingsync::crypto::random_aes_key(),
        )
        .env("DINGSYNC_CALLBACK_OWNER_KEY", CORP_ID)
        .env("DINGSYNC_RECONCILE_PROCESS_CODES", CODES.join(","))
        .env("DINGSYNC_LOG_FILTER", "warn")
        .output()
        .expect("dingsync runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_reports_missing_approvals_and_exits_non_zero_until_a_backfill_repairs_them() {
    let emu = emulator().await;
    for n in 0..3 {
        emu.state()
            .start_instance(start(CODES[n % 2], "emp1", &["manager1"]))
            .unwrap();
    }
    let db = TestDb::new();
    let url = db.url.clone();
    let drift = command(&emu, &url, &["drift", "--since", "1d"]);
    let out = String::from_utf8_lossy(&drift.stdout);
    assert_eq!(drift.status.code(), Some(1), "{out}");
    assert_eq!(out.matches("missing ").count(), 3, "{out}");

    let too_old = command(
        &emu,
        &url,
        &[
            "backfill",
            "--process-code",
            CODES[0],
            "--since",
            "2020-01-01",
        ],
    );
    let err = String::from_utf8_lossy(&too_old.stderr);
    assert!(!too_old.status.success());
    assert!(err.contains("365 days"), "{err}");
    assert_eq!(
        emu.state().calls(api::list_ids()),
        2,
        "drift listed both codes once"
    );

    let since = (Utc::now() - TimeDelta::days(1)).to_rfc3339();
    for code in CODES {
        let backfill = command(
            &emu,
            &url,
            &["backfill", "--process-code", code, "--since", &since],
        );
        assert!(
            backfill.status.success(),
            "{}",
            String::from_utf8_lossy(&backfill.stderr)
        );
    }
    let drift = command(&emu, &url, &["drift", "--since", "1d"]);
    let out = String::from_utf8_lossy(&drift.stdout);
    assert_eq!(drift.status.code(), Some(0), "{out}");
    assert!(
        out.contains("3 listed, 0 missing, 0 extra, 0 disagreeing"),
        "{out}"
    );
    emu.stop().await;
}

#[tokio::test]
async fn a_snapshot_corrects_a_terminal_state_but_never_an_older_one_a_newer_and_keeps_outbox_id() {
    use dingsync::{
        snapshot::Snapshot,
        store::approvals::{Applied, SnapshotSource, apply_snapshot},
    };
    let db = TestDb::new();
    let config = test_config(&db.url);
    let pool = dingsync::store::connect_and_migrate(&config.database)
        .await
        .unwrap();
    // Events said TERMINATED first (first terminal wins); the row was created by the outbox.
    sqlx::query(
        "INSERT INTO dingsync.approvals (corp_id, process_instance_id, status, outbox_id, created_at)
         VALUES ($1, 'p1', 'TERMINATED', 42, '2026-11-28 10:00:00.123+00')",
    )
    .bind(CORP_ID)
    .execute(&pool)
    .await
    .unwrap();
    let snapshot = |status: &str, result: Option<&str>| Snapshot {
        process_instance_id: "p1".into(),
        status: status.into(),
        result: result.map(str::to_string),
        title: Some("t".into()),
        business_id: None,
        originator_userid: Some("emp1".into()),
        originator_dept_id: Some("100".into()),
        created_at: Some("2026-11-28T10:00:00Z".parse().unwrap()),
        finished_at: (status != "RUNNING").then(|| "2026-11-28T11:00:00Z".parse().unwrap()),
        form_values: json!([{"name": "Reason", "value": "trip"}]),
        operation_records: json!([]),
        tasks: Vec::new(),
        whole_minutes: false,
    };
    let at = |s: &str| -> DateTime<Utc> { s.parse().unwrap() };
    let mut conn = pool.acquire().await.unwrap();
    let mut apply = async |snap: Snapshot, requested: &str| {
        apply_snapshot(
            &mut conn,
            CORP_ID,
            &snap,
            at(requested),
            SnapshotSource::Sweep,
            None,
        )
        .await
        .unwrap()
    };
    let row = async || -> (String, Option<String>, Option<i64>, DateTime<Utc>) {
        sqlx::query_as(
            "SELECT status, result, outbox_id, created_at FROM dingsync.approvals WHERE process_instance_id = 'p1'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };

    let applied = apply(snapshot("COMPLETED", Some("agree")), "2026-11-28T12:00:00Z").await;
    assert_eq!(applied, Applied::Yes { changed: true });
    let (status, result, outbox_id, created_at) = row().await;
    assert_eq!(
        (status.as_str(), result.as_deref(), outbox_id),
        ("COMPLETED", Some("agree"), Some(42))
    );
    assert_eq!(
        created_at,
        at("2026-11-28T10:00:00.123Z"),
        "the event's milliseconds are kept within the snapshot's second"
    );

    let older = apply(snapshot("TERMINATED", None), "2026-11-28T11:30:00Z").await;
    assert_eq!(older, Applied::Stale);
    assert_eq!(row().await.0, "COMPLETED");

    let newer_but_behind = apply(snapshot("RUNNING", None), "2026-11-28T13:00:00Z").await;
    assert_eq!(newer_but_behind, Applied::Yes { changed: false });
    let (status, result, outbox_id, _) = row().await;
    assert_eq!(
        (status.as_str(), result.as_deref(), outbox_id),
        ("COMPLETED", Some("agree"), Some(42)),
        "a status never drops a rank"
    );
    drop(conn);
    pool.close().await;
}

/// The sum of the `/metrics` samples of `app` whose name and labels start with `prefix`.
async fn counted(app: &TestApp, prefix: &str) -> f64 {
    let page = app
        .http
        .get(format!("{}/metrics", app.base_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    page.lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test]
async fn approvals_backfill_found_count_as_drift_repaired_and_a_recheck_that_agrees_does_not() {
    let emu = emulator().await;
    // No callback registered: DingTalk's approvals reach the database only through backfill.
    for code in CODES {
        emu.state()
            .start_instance(start(code, "emp1", &["manager1"]))
            .unwrap();
    }
    let app = TestApp::spawn_with(|c| configure(c, &emu)).await;
    let ctx = ctx(&app);
    // The registry is the test process's: other tests add to it, so these are lower bounds.
    let drift = r#"dingsync_reconcile_fetches_total{source="backfill",outcome="changed"}"#;
    let agreed = r#"dingsync_reconcile_fetches_total{source="sweep",outcome="unchanged"}"#;
    let (drift_before, agreed_before) = (counted(&app, drift).await, counted(&app, agreed).await);

    run_now(&ctx, Job::Backfill).await;
    assert!(
        counted(&app, drift).await - drift_before >= 2.0,
        "both approvals backfill stored count as drift repaired"
    );
    recheck_open(&ctx).await;
    assert!(
        counted(&app, agreed).await - agreed_before >= 2.0,
        "a re-check that finds the same state counts as unchanged"
    );
    app.stop().await;
    emu.stop().await;
}
