//! The monthly allowances (docs/dingtalk.md §7) against the emulator over real HTTP and a fresh
//! PostgreSQL database per test: DingTalk's 90020 pauses every client of the organisation and
//! keeps outbox rows pending until `quota resume`; dingsync's own share stops metered calls
//! before they are sent; the ledger, `dingsync quota` and `/metrics` show the month.

mod common;

use std::time::{Duration, Instant};

use chrono::{NaiveDate, TimeZone, Utc};
use common::*;
use dingsync::{
    app::{App, EMULATOR_CORP_ID},
    cli::{doctor, quota},
    config::Config,
    dingtalk::{self, Client, Purpose, quota::Allowances},
    store::{self, outbox::PAUSED, usage::Delta},
};
use dingsync_emulator::{Emulator, Handle, InjectedError};
use sqlx::PgPool;

const LIMIT_MESSAGE: &str = "您的企业本月api调用量已超过限制,调用量:5001次,额度:5000次,请登录开发者后台-资源管理-查看用量明细";

fn quota_exceeded() -> InjectedError {
    InjectedError::Custom {
        errcode: 90020,
        sub_code: None,
        errmsg: LIMIT_MESSAGE.into(),
    }
}

/// Short timings so that retries and claims happen within a test's seconds.
fn fast(c: &mut Config) {
    c.dingtalk.timeout_ms = 500;
    c.dingtalk.max_attempts = 1;
    c.dingtalk.qps = 0;
    c.outbox.lease_ms = 1_000;
    c.outbox.lost_settle_ms = 100;
    c.outbox.backoff_base_ms = 50;
    c.outbox.backoff_max_ms = 200;
    c.outbox.poll_ms = 100;
    c.emulator.people_pace_ms = 0;
    c.emulator.time_scale = 0.01;
}

async fn standalone_emulator() -> Emulator {
    common::standalone_emulator(1).await
}

/// A configuration against the standalone emulator `emu`.
fn against(emu: &Emulator, db: &TestDb) -> Config {
    let mut config = config_against(emu, db);
    fast(&mut config);
    config
}

async fn request_expense(pool: &PgPool, key: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT dingsync.request_approval($1, 'PROC-EMU-EXPENSE', 'emp1',
            jsonb_build_array(jsonb_build_object('name', 'Reason', 'value', $1::text),
                              jsonb_build_object('name', 'Amount', 'value', 100)))",
    )
    .bind(key)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    state: String,
    attempts: i32,
    last_error: Option<String>,
    due_in_s: f64,
}

async fn row(pool: &PgPool, id: i64) -> Row {
    sqlx::query_as(
        "SELECT state, attempts, last_error,
                extract(epoch FROM next_attempt_at - now())::float8 AS due_in_s
         FROM dingsync.outbox WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

fn expense() -> dingtalk::types::CreateInstance {
    use dingtalk::types::{CreateInstance, FormValue};
    CreateInstance {
        process_code: "PROC-EMU-EXPENSE".into(),
        originator_user_id: "emp1".into(),
        dept_id: 100,
        agent_id: None,
        approvers: Some("manager1".into()),
        approvers_v2: None,
        cc_list: None,
        cc_position: None,
        form_component_values: vec![
            FormValue {
                name: "Reason".into(),
                value: "quota".into(),
                ext_value: None,
                ..FormValue::default()
            },
            FormValue {
                name: "Amount".into(),
                value: "1".into(),
                ext_value: None,
                ..FormValue::default()
            },
        ],
        ..CreateInstance::default()
    }
}

fn assert_paused<T: std::fmt::Debug>(result: Result<T, dingtalk::Error>, reason: &str) {
    match result {
        Err(dingtalk::Error::QuotaExhausted { until, reason: why }) => {
            assert!(why.contains(reason), "{why}");
            assert!(until > Utc::now(), "resumes in the future: {until}");
            assert_eq!(until, dingsync::dingtalk::quota::resumes_at(Utc::now()));
        }
        other => panic!("expected QuotaExhausted, got {other:?}"),
    }
}

#[tokio::test]
async fn a_90020_answer_pauses_every_client_of_the_organisation_keeps_the_row_pending_and_resume_creates_it()
 {
    let emu = standalone_emulator().await;
    let db = TestDb::new();
    let config = against(&emu, &db);
    let app = App::start(config.clone()).await.unwrap();
    let pool = PgPool::connect(&db.url).await.unwrap();
    emu.state().inject(api::create(), quota_exceeded(), 1);
    let id = request_expense(&pool, "paused-1").await;

    // The create met 90020: pending again, the attempt not counted, a clear reason.
    let paused = eventually(Duration::from_secs(15), "the row paused", || async {
        let r = row(&pool, id).await;
        (r.state == "pending" && r.last_error.is_some()).then_some(r)
    })
    .await;
    let why = paused.last_error.unwrap();
    assert_eq!(paused.attempts, 0, "a paused create is no attempt");
    assert!(
        why.starts_with(PAUSED) && why.contains("90020") && why.contains("quota resume"),
        "{why}"
    );
    // Due again by the recheck interval at the latest.
    assert!(
        paused.due_in_s > 60.0 && paused.due_in_s <= 600.0,
        "{}",
        paused.due_in_s
    );
    let pause = store::usage::pause(&pool, CORP_ID).await.unwrap().unwrap();
    assert_eq!(pause.allowance, 5_000);
    assert!(pause.reason.contains(LIMIT_MESSAGE), "{}", pause.reason);

    // Another client of the organisation (another replica) sends no metered call either, while
    // gettoken still goes through.
    let other = Client::new(pool.clone(), &config.dingtalk, &emu.base_url()).unwrap();
    assert_paused(
        other.get_instance("some-instance", Purpose::Details).await,
        "90020",
    );
    assert_paused(other.create_instance(&expense()).await, "90020");
    other.tokens().check_credentials().await.unwrap();
    let state: &Handle = emu.state();
    assert_eq!(state.calls(api::get()), 0);
    assert_eq!(state.calls(api::create()), 1);
    assert!(state.instances().is_empty());

    // The operator lifts the pause: the row is created, once.
    let said = quota::resume(
        &pool,
        CORP_ID,
        Allowances::from_config(&config.dingtalk),
        Utc::now(),
    )
    .await
    .unwrap();
    assert!(
        said.contains("pause lifted") && said.contains("1 outbox rows"),
        "{said}"
    );
    eventually(Duration::from_secs(20), "the row created", || async {
        (row(&pool, id).await.state == "created").then_some(())
    })
    .await;
    assert_eq!(state.instances().len(), 1);
    assert_eq!(state.calls(api::create()), 2);
    assert!(store::usage::pause(&pool, CORP_ID).await.unwrap().is_none());
    let r = row(&pool, id).await;
    assert_eq!(r.attempts, 1);
    app.stop().await.unwrap();
    pool.close().await;
    emu.stop().await;
}

#[tokio::test]
async fn reaching_monthly_calls_stops_metered_calls_locally_without_sending_them_while_gettoken_still_works()
 {
    let emu = standalone_emulator().await;
    let db = TestDb::new();
    let mut config = against(&emu, &db);
    config.dingtalk.monthly_calls = 5;
    let pool = store::connect_and_migrate(&config.database).await.unwrap();
    let client = Client::new(pool.clone(), &config.dingtalk, &emu.base_url()).unwrap();
    let id = client.create_instance(&expense()).await.unwrap();
    for _ in 0..4 {
        client.get_instance(&id, Purpose::Details).await.unwrap();
    }
    let state = emu.state();
    assert_eq!(state.calls(api::get()), 4);
    assert_paused(
        client.get_instance(&id, Purpose::Details).await,
        "dingtalk.monthly_calls = 5",
    );
    assert_paused(client.create_instance(&expense()).await, "monthly_calls");
    assert_eq!(state.calls(api::get()), 4, "refused before it was sent");
    assert_eq!(state.calls(api::create()), 1);
    // gettoken is not metered: it still goes to DingTalk.
    let tokens_before = state.calls(api::token());
    client.tokens().check_credentials().await.unwrap();
    assert_eq!(state.calls(api::token()), tokens_before + 1);
    // Nothing was stored as a pause (the share is dingsync's own), yet another replica reads the
    // shared ledger and stops too.
    assert!(store::usage::pause(&pool, CORP_ID).await.unwrap().is_none());
    client.ledger().flush().await.unwrap();
    let other = Client::new(pool.clone(), &config.dingtalk, &emu.base_url()).unwrap();
    assert_paused(
        other.get_instance(&id, Purpose::Sweep).await,
        "monthly_calls",
    );
    assert_eq!(state.calls(api::get()), 4);
    // A higher share (a reload) lets calls through again.
    other
        .quota()
        .set_allowances(Allowances {
            calls: 200_000,
            deliveries: 50_000,
        })
        .await
        .unwrap();
    other.get_instance(&id, Purpose::Sweep).await.unwrap();
    assert_eq!(state.calls(api::get()), 5);
    pool.close().await;
    emu.stop().await;
}

#[tokio::test]
async fn a_90020_answer_to_gettoken_makes_it_metered_from_then_on() {
    let emu = standalone_emulator().await;
    let db = TestDb::new();
    let config = against(&emu, &db);
    let pool = store::connect_and_migrate(&config.database).await.unwrap();
    let client = Client::new(pool.clone(), &config.dingtalk, &emu.base_url()).unwrap();
    assert!(
        !client
            .quota()
            .is_metered(&format!("/{}", api::ledger_path(api::token())))
    );
    emu.state().inject(api::token(), quota_exceeded(), 1);
    let token_path = format!("/{}", api::ledger_path(api::token()));
    assert_paused(
        client.tokens().check_credentials().await,
        api::ledger_path(api::token()),
    );
    assert!(client.quota().is_metered(&token_path));
    // Paused, and gettoken is metered now: not sent again.
    assert_paused(client.tokens().check_credentials().await, "90020");
    assert_eq!(emu.state().calls(api::token()), 1);
    pool.close().await;
    emu.stop().await;
}

#[tokio::test]
async fn a_pause_from_an_earlier_month_or_another_allowance_is_lifted_at_start_up_and_on_reload() {
    install_crypto_provider();
    let db = TestDb::new();
    let config = test_config(&db.url);
    let pool = store::connect_and_migrate(&config.database).await.unwrap();
    let this_month = dingsync::clock::month(Utc::now());
    let earlier = this_month - chrono::TimeDelta::days(1);
    store::usage::set_pause(&pool, CORP_ID, earlier, 5_000, "errcode 90020: last month")
        .await
        .unwrap();
    let app = App::start(config.clone()).await.unwrap();
    assert!(store::usage::pause(&pool, CORP_ID).await.unwrap().is_none());
    app.stop().await.unwrap();

    // This month's, under the allowance configured now: kept.
    store::usage::set_pause(&pool, CORP_ID, this_month, 5_000, "errcode 90020: now")
        .await
        .unwrap();
    let app = App::start(config.clone()).await.unwrap();
    assert!(store::usage::pause(&pool, CORP_ID).await.unwrap().is_some());
    // The same setting reloaded keeps it; a new one (an upgraded edition) lifts it.
    let same = Allowances::from_config(&config.dingtalk);
    assert!(!app.reload_allowances(same).await.unwrap());
    assert!(store::usage::pause(&pool, CORP_ID).await.unwrap().is_some());
    let upgraded = Allowances {
        calls: 200_000,
        deliveries: 50_000,
    };
    assert!(app.reload_allowances(upgraded).await.unwrap());
    assert!(store::usage::pause(&pool, CORP_ID).await.unwrap().is_none());
    app.stop().await.unwrap();

    // Taken under another monthly_calls than configured at start-up: lifted.
    store::usage::set_pause(&pool, CORP_ID, this_month, 200_000, "errcode 90020: paid")
        .await
        .unwrap();
    let app = App::start(config).await.unwrap();
    assert!(store::usage::pause(&pool, CORP_ID).await.unwrap().is_none());
    app.stop().await.unwrap();
    pool.close().await;
}

#[tokio::test]
async fn negative_and_too_small_monthly_calls_are_refused_at_start_up_naming_the_key() {
    let db = TestDb::new();
    for (value, expect) in [
        (
            "-1",
            "dingtalk.monthly_calls: is -1: must be 0 (unmetered) or a positive number of calls per month",
        ),
        (
            "4",
            "dingtalk.monthly_calls: is 4, too few for one approval",
        ),
    ] {
        let mut command = dingsync_command(&["serve"]);
        command
            .env("DINGSYNC_DATABASE_URL", &db.url)
            .env(
                "DINGSYNC_SERVER_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .env("DINGSYNC_DINGTALK_MONTHLY_CALLS", value);
        let out = run_to_end(command);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{value}: {stderr}");
        assert!(stderr.contains(expect), "{value}: {stderr}");
    }
    let mut command = dingsync_command(&["serve"]);
    command
        .env("DINGSYNC_DATABASE_URL", &db.url)
        .env("DINGSYNC_DINGTALK_MONTHLY_DELIVERIES", "-3");
    let out = run_to_end(command);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("dingtalk.monthly_deliveries: is -3: must be 0 (unmetered) or a positive number of deliveries per month"),
        "{stderr}"
    );
    // And through App::start, which validates on its own.
    let mut config = test_config(&db.url);
    config.dingtalk.monthly_calls = 2;
    let err = match App::start(config).await {
        Ok(_) => panic!("a monthly_calls of 2 was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("dingtalk.monthly_calls") && err.contains("at least 5"),
        "{err}"
    );
}

/// A daemon with the embedded emulator (nobody in it acts unless the test does).
async fn emulator_daemon() -> TestApp {
    TestApp::spawn_with(|c| {
        embedded_emulator(c);
        fast(c);
        c.scheduler.details = "* * * * * *".into();
    })
    .await
}

/// The count of (kind, api, purpose) in the daemon's ledger this month.
async fn counted(app: &App, kind: &str, api: &str, purpose: &str) -> i64 {
    let usage = app.ledger.this_month(EMULATOR_CORP_ID).await.unwrap();
    usage
        .by_api_and_purpose()
        .get(&(kind.to_string(), api.to_string(), purpose.to_string()))
        .copied()
        .unwrap_or(0)
}

#[tokio::test]
async fn the_ledger_counts_calls_by_api_and_purpose_and_deliveries_and_dingsync_quota_shows_them() {
    let t = emulator_daemon().await;
    let app = t.app.as_ref().unwrap();
    let id = request_expense(&t.pool, "ledger-1").await;
    eventually(Duration::from_secs(15), "the row created", || async {
        (row(&t.pool, id).await.state == "created").then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(20),
        "the create, its push and its detail fetch counted",
        || async {
            let create = counted(app, "call", api::ledger_path(api::create()), "outbox").await;
            let push = counted(app, "delivery", "bpms_instance_change", "push").await;
            let get = counted(app, "call", api::ledger_path(api::get()), "details").await;
            (create == 1 && push >= 1 && get >= 1).then_some(())
        },
    )
    .await;
    assert!(counted(app, "call", api::ledger_path(api::token()), "token").await >= 1);
    assert!(counted(app, "call", "call_back/register_call_back", "callback").await >= 1);
    let usage = app.ledger.this_month(EMULATOR_CORP_ID).await.unwrap();
    // gettoken is counted but not metered.
    assert!(
        usage
            .rows
            .iter()
            .filter(|r| r.api == api::ledger_path(api::token()))
            .all(|r| !r.metered)
    );
    assert_eq!(
        usage.metered_calls(),
        usage.sum(|r| r.kind == "call" && r.api != api::ledger_path(api::token()))
    );
    // `dingsync quota`, on the daemon's (faster) clock.
    app.ledger.flush().await.unwrap();
    let now = app.ledger.clock().now();
    let allowances = Allowances {
        calls: 5_000,
        deliveries: 3_000,
    };
    let printed = quota::report(&t.pool, EMULATOR_CORP_ID, allowances, now)
        .await
        .unwrap();
    for needle in [
        "kind",
        "purpose",
        api::ledger_path(api::create()),
        "outbox",
        api::ledger_path(api::token()),
        "bpms_instance_change",
        "push",
        "metered calls: ",
        " of 5000 (",
        "deliveries: ",
        " of 3000 (",
        "forecast ",
        "lasts the month at this pace",
        "not paused",
    ] {
        assert!(printed.contains(needle), "{needle:?} missing in\n{printed}");
    }
    t.stop().await;
}

#[tokio::test]
async fn the_quota_report_and_doctor_show_the_totals_the_pause_and_the_day_an_allowance_runs_out() {
    let db = TestDb::new();
    let pool = store::connect_and_migrate(&test_config(&db.url).database)
        .await
        .unwrap();
    let day = |d: u32| NaiveDate::from_ymd_opt(2026, 11, d).unwrap();
    let at = Utc.with_ymd_and_hms(2026, 11, 10, 4, 0, 0).unwrap();
    let delta =
        |d: u32, kind: &'static str, api: &str, purpose: &'static str, metered, count| Delta {
            corp_id: CORP_ID.into(),
            day: day(d),
            kind,
            api: api.into(),
            purpose,
            metered,
            count,
            last_at: at,
        };
    let mut deltas: Vec<Delta> = (1..=9)
        .map(|d| {
            delta(
                d,
                "call",
                "topapi/processinstance/get",
                "details",
                true,
                100,
            )
        })
        .collect();
    deltas.push(delta(
        10,
        "call",
        "topapi/processinstance/get",
        "details",
        true,
        50,
    ));
    deltas.push(delta(10, "call", "gettoken", "token", false, 7));
    deltas.push(delta(10, "delivery", "bpms_task_change", "push", true, 40));
    store::usage::add(&pool, &deltas).await.unwrap();
    let allowances = Allowances {
        calls: 2_000,
        deliveries: 0,
    };
    let printed = quota::report(&pool, CORP_ID, allowances, at).await.unwrap();
    for needle in [
        "Beijing month 2026-11 (day 10 of 30, 20.5 days left)",
        "topapi/processinstance/get",
        "950",
        "metered calls: 950 of 2000 (48%), 1050 left; pace 100.0 a day; forecast 3000 by the month's end; runs out on 2026-11-21 at this pace",
        "deliveries: 40 (dingtalk.monthly_deliveries = 0: unmetered)",
        "not paused",
    ] {
        assert!(printed.contains(needle), "{needle:?} missing in\n{printed}");
    }
    assert!(
        printed
            .lines()
            .any(|l| l.contains("gettoken") && l.contains(" no ") && l.ends_with('7')),
        "{printed}"
    );
    // doctor warns: at this pace the 2000 calls run out on the 21st.
    let mut config = test_config(&db.url);
    config.dingtalk.monthly_calls = 2_000;
    config.dingtalk.monthly_deliveries = 0;
    let finding = doctor::allowance(&config, Some(&pool), at).await;
    assert_eq!(finding.status, doctor::Status::Warn, "{finding}");
    assert!(
        finding
            .finding
            .contains("metered calls would reach 3000 of 2000, running out on 2026-11-21"),
        "{finding}"
    );
    config.dingtalk.monthly_calls = 5_000;
    let finding = doctor::allowance(&config, Some(&pool), at).await;
    assert_eq!(finding.status, doctor::Status::Ok, "{finding}");
    store::usage::set_pause(
        &pool,
        CORP_ID,
        day(1),
        2_000,
        "DingTalk answered topapi/processinstance/get with errcode 90020: used up",
    )
    .await
    .unwrap();
    let printed = quota::report(&pool, CORP_ID, allowances, at).await.unwrap();
    assert!(
        printed.contains("paused since ") && printed.contains("errcode 90020: used up"),
        "{printed}"
    );
    config.dingtalk.monthly_calls = 2_000;
    let finding = doctor::allowance(&config, Some(&pool), at).await;
    assert!(
        finding.status == doctor::Status::Warn
            && finding.finding.starts_with("metered calls paused since"),
        "{finding}"
    );
    pool.close().await;
}

#[tokio::test]
async fn metrics_show_the_allowance_series_of_the_organisation() {
    let t = emulator_daemon().await;
    let page = |t: &TestApp| {
        let (http, url) = (t.http.clone(), format!("{}/metrics", t.base_url));
        async move { http.get(url).send().await.unwrap().text().await.unwrap() }
    };
    let sample = |page: &str, series: &str| -> Option<f64> {
        page.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    };
    let labels = |kind: &str| format!("{{corp_id=\"{EMULATOR_CORP_ID}\",kind=\"{kind}\"}}");
    // The daemon registered its callback with the emulator: at least one metered call.
    let text = eventually(
        Duration::from_secs(10),
        "a metered call in /metrics",
        || async {
            let text = page(&t).await;
            let used = sample(&text, &format!("dingsync_allowance_used{}", labels("call")))?;
            (used >= 1.0).then_some(text)
        },
    )
    .await;
    assert_eq!(
        sample(
            &text,
            &format!("dingsync_allowance_limit{}", labels("call"))
        ),
        Some(5_000.0)
    );
    assert_eq!(
        sample(
            &text,
            &format!("dingsync_allowance_limit{}", labels("delivery"))
        ),
        Some(3_000.0)
    );
    let used = sample(&text, &format!("dingsync_allowance_used{}", labels("call"))).unwrap();
    let remaining = sample(
        &text,
        &format!("dingsync_allowance_remaining{}", labels("call")),
    )
    .unwrap();
    assert_eq!(used + remaining, 5_000.0);
    assert!(
        sample(
            &text,
            &format!("dingsync_allowance_forecast{}", labels("call"))
        )
        .unwrap()
            >= used
    );
    assert!(
        sample(
            &text,
            &format!("dingsync_allowance_forecast{}", labels("delivery"))
        )
        .is_some()
    );
    assert_eq!(
        sample(
            &text,
            &format!("dingsync_allowance_paused{{corp_id=\"{EMULATOR_CORP_ID}\"}}")
        ),
        Some(0.0)
    );
    for help in [
        "# HELP dingsync_allowance_used ",
        "# HELP dingsync_allowance_limit ",
        "# HELP dingsync_allowance_remaining ",
        "# HELP dingsync_allowance_forecast ",
        "# HELP dingsync_allowance_paused ",
    ] {
        assert!(text.contains(help), "{help}");
    }
    // A pause shows within a reading.
    let month = dingsync::clock::month(t.app.as_ref().unwrap().ledger.clock().now());
    store::usage::set_pause(&t.pool, EMULATOR_CORP_ID, month, 5_000, "errcode 90020: x")
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "the pause in /metrics", || async {
        let text = page(&t).await;
        let paused = sample(
            &text,
            &format!("dingsync_allowance_paused{{corp_id=\"{EMULATOR_CORP_ID}\"}}"),
        )?;
        (paused == 1.0).then_some(())
    })
    .await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_beyond_dingtalks_allowance_stay_pending_and_are_all_created_once_the_month_rolls_over()
 {
    // A month passes in about 13 s of real time (one day in 0.43 s), on the daemon's planning
    // clock and the emulator's timings alike; DingTalk's own allowance (the emulator's) is far
    // below what the run needs, and dingsync is told nothing of it (its share is unmetered), so
    // only DingTalk's 90020 stops it.
    const SCALE: f64 = 0.000_005;
    let app = TestApp::spawn_with(|c| {
        embedded_emulator(c);
        fast(c);
        c.emulator.time_scale = SCALE;
        c.emulator.monthly_calls = 6;
        c.dingtalk.monthly_calls = 0;
        c.outbox.concurrency = 1;
    })
    .await;
    let daemon = app.app.as_ref().unwrap();
    let emu = daemon.emulator.as_ref().unwrap().state().clone();
    let clock = daemon.ledger.clock();
    let mut ids = Vec::new();
    for k in 0..10 {
        ids.push(request_expense(&app.pool, &format!("rollover-{k}")).await);
    }
    let states = |pool: PgPool| async move {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT state, count(*) FROM dingsync.outbox GROUP BY state ORDER BY state",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    // DingTalk refuses once its month's calls are used; the rows wait, saying why.
    let deadline = Instant::now() + Duration::from_secs(30);
    while emu.quota().calls.refused == 0 {
        assert!(Instant::now() < deadline, "DingTalk never refused a call");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The refused call may still be on its way back to its worker (or be a detail fetch, and
    // the rows meet the pause at their next claim): look until a row says why, briefly.
    eventually(Duration::from_secs(5), "a waiting row says why", || async {
        let waiting: Vec<Row> = futures_rows(&app.pool, &ids).await;
        assert!(
            waiting.iter().all(|r| r.state != "failed"),
            "no row fails for the quota: {waiting:?}"
        );
        waiting
            .iter()
            .any(|r| {
                r.state == "pending"
                    && r.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("allowance"))
            })
            .then_some(())
    })
    .await;
    // Each time the daemon's month is about to turn, DingTalk's does too (a real DingTalk and
    // dingsync share the calendar; here the emulator is told).
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut rollovers = 0;
    loop {
        let created = states(app.pool.clone())
            .await
            .iter()
            .find(|(s, _)| s == "created")
            .map_or(0, |(_, n)| *n);
        if created == ids.len() as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all created after {rollovers} rollovers: {:?}",
            states(app.pool.clone()).await
        );
        let (_, month_end) = dingsync::clock::month_span(clock.now());
        let left = (month_end - clock.now()).to_std().unwrap_or_default();
        let real = clock.real_duration(left);
        // A virtual hour before the turn.
        tokio::time::sleep(real.saturating_sub(clock.real_duration(Duration::from_secs(3600))))
            .await;
        emu.rollover();
        rollovers += 1;
        tokio::time::sleep(clock.real_duration(Duration::from_secs(7200))).await;
    }
    let rows = futures_rows(&app.pool, &ids).await;
    assert!(rows.iter().all(|r| r.state == "created"), "{rows:?}");
    assert!(rollovers >= 1, "the run needed more than one month");
    let instances = emu.instances();
    assert_eq!(
        instances.len(),
        ids.len(),
        "one approval per row, no duplicate"
    );
}

async fn futures_rows(pool: &PgPool, ids: &[i64]) -> Vec<Row> {
    let mut rows = Vec::new();
    for id in ids {
        rows.push(row(pool, *id).await);
    }
    rows
}
