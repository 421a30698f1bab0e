//! The outbox: approval requests inserted as rows become DingTalk approvals exactly once, against
//! the emulator over real HTTP and a fresh PostgreSQL database per test.

mod common;

use std::time::Duration;

use common::*;
use dingsync::{
    app::App,
    cli::outbox as manage,
    config::Config,
    dingtalk,
    outbox::request,
    store::{self, outbox as outbox_store},
};
use dingsync_emulator::{Emulator, EmulatorConfig, Handle, InjectedError, Instance, TaskAction};
use serde_json::json;
use sqlx::PgPool;

/// Short timings so that retries, leases and searches happen within a test's seconds.
fn fast(c: &mut Config) {
    c.dingtalk.timeout_ms = 300;
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

/// A daemon with the embedded emulator (nobody in it acts unless the test does).
async fn daemon(adjust: impl FnOnce(&mut Config)) -> TestApp {
    TestApp::spawn_with(|c| {
        embedded_emulator(c);
        fast(c);
        adjust(c);
    })
    .await
}

fn emulator(app: &TestApp) -> Handle {
    app.app
        .as_ref()
        .unwrap()
        .emulator
        .as_ref()
        .expect("embedded emulator")
        .state()
        .clone()
}

/// An expense request whose reason makes it recognisable.
async fn request_expense(pool: &PgPool, key: &str, reason: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT dingsync.request_approval($1, 'PROC-EMU-EXPENSE', 'emp1',
            jsonb_build_array(jsonb_build_object('name', 'Reason', 'value', $2::text),
                              jsonb_build_object('name', 'Amount', 'value', 100)))",
    )
    .bind(key)
    .bind(reason)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    state: String,
    attempts: i32,
    process_instance_id: Option<String>,
    last_error: Option<String>,
}

async fn row(pool: &PgPool, id: i64) -> Row {
    sqlx::query_as(
        "SELECT state, attempts, process_instance_id, last_error FROM dingsync.outbox WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn wait_for_state(pool: &PgPool, id: i64, state: &str) -> Row {
    eventually(
        Duration::from_secs(15),
        &format!("outbox row {id} {state}"),
        || async {
            let r = row(pool, id).await;
            (r.state == state).then_some(r)
        },
    )
    .await
}

/// The emulator's instances whose Reason is `reason`.
fn instances_with_reason(emu: &Handle, reason: &str) -> Vec<Instance> {
    emu.instances()
        .into_iter()
        .filter(|i| {
            i.form_component_values
                .iter()
                .any(|v| v.name == "Reason" && v.value == reason)
        })
        .collect()
}

/// Requests `n` expense approvals keyed `<prefix>-1..n` (reason "<prefix> i"), in one statement.
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

/// Waits until every outbox row is `created`.
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

#[tokio::test]
async fn an_outbox_row_becomes_one_approval_that_follows_dingtalk_to_completed() {
    let app = daemon(|_| {}).await;
    let emu = emulator(&app);
    let id = request_expense(&app.pool, "expense-4711", "trip to Hangzhou").await;

    let created = wait_for_state(&app.pool, id, "created").await;
    let pid = created.process_instance_id.unwrap();
    assert_eq!(created.attempts, 1);
    assert_eq!(created.last_error, None);
    let made = instances_with_reason(&emu, "trip to Hangzhou");
    assert_eq!(made.len(), 1);
    assert_eq!(made[0].process_instance_id, pid);
    assert_eq!(made[0].originator_userid, "emp1");
    let outbox_id: Option<i64> = sqlx::query_scalar(
        "SELECT outbox_id FROM dingsync.approvals WHERE process_instance_id = $1",
    )
    .bind(&pid)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(outbox_id, Some(id));

    // The approval moves on in DingTalk; its pushes carry the row to COMPLETED/agree.
    let task = emu.open_tasks()[0].task.taskid;
    emu.agree(task, TaskAction::default()).unwrap();
    let status: (String, Option<String>, Option<i64>) = eventually(
        Duration::from_secs(15),
        "the approval COMPLETED/agree",
        || async {
            sqlx::query_as(
                "SELECT status, result, outbox_id FROM dingsync.approvals WHERE process_instance_id = $1",
            )
            .bind(&pid)
            .fetch_optional(&app.pool)
            .await
            .unwrap()
            .filter(|s: &(String, Option<String>, Option<i64>)| s.0 == "COMPLETED")
        },
    )
    .await;
    assert_eq!(status, ("COMPLETED".into(), Some("agree".into()), Some(id)));
    assert_eq!(emu.calls(api::create()), 1);
    app.stop().await;
}

#[tokio::test]
async fn the_same_idempotency_key_twice_returns_the_same_row_and_creates_one_approval() {
    let app = daemon(|_| {}).await;
    let emu = emulator(&app);
    let first = request_expense(&app.pool, "expense-1", "printer paper").await;
    let again = request_expense(&app.pool, "expense-1", "printer paper").await;
    assert_eq!(first, again);
    // A plain INSERT with the same key changes nothing either.
    let inserted = sqlx::query(
        "INSERT INTO dingsync.outbox (idempotency_key, process_code, originator_user_id, form_values)
         VALUES ('expense-1', 'PROC-EMU-EXPENSE', 'emp1', '[{\"name\":\"Reason\",\"value\":\"printer paper\"}]')
         ON CONFLICT (corp_id, idempotency_key) DO NOTHING",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    assert_eq!(inserted.rows_affected(), 0);
    // The same key for a different request is a bug in the app: say so.
    let err = sqlx::query_scalar::<_, i64>(
        "SELECT dingsync.request_approval('expense-1', 'PROC-EMU-EXPENSE', 'emp1',
            '[{\"name\":\"Reason\",\"value\":\"ink\"},{\"name\":\"Amount\",\"value\":\"5\"}]')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("idempotency_key \"expense-1\" was already used for a different request"),
        "{err}"
    );

    wait_for_state(&app.pool, first, "created").await;
    assert_eq!(app.count("outbox").await, 1);
    assert_eq!(instances_with_reason(&emu, "printer paper").len(), 1);
    assert_eq!(emu.calls(api::create()), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_request_dingtalk_rejects_fails_at_once_with_its_errcode_and_message() {
    let app = daemon(|_| {}).await;
    let emu = emulator(&app);
    // Valid in shape, but DingTalk knows no such template.
    let id: i64 = sqlx::query_scalar(
        "SELECT dingsync.request_approval('bad-1', 'PROC-DOES-NOT-EXIST', 'emp1',
            '[{\"name\":\"Reason\",\"value\":\"x\"}]')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let failed = wait_for_state(&app.pool, id, "failed").await;
    assert_eq!(failed.attempts, 1, "a business rejection is not retried");
    let error = failed.last_error.unwrap();
    assert!(error.contains("errcode"), "{error}");
    assert!(error.contains("PROC-DOES-NOT-EXIST"), "{error}");
    assert_eq!(emu.calls(api::create()), 1);
    assert!(emu.instances().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn transient_errors_are_retried_with_backoff_until_the_create_succeeds() {
    let app = daemon(|_| {}).await;
    let emu = emulator(&app);
    // Refused before processing: certainly not created, so simply sent again.
    emu.inject(api::create(), InjectedError::RateLimit, 2);
    let id = request_expense(&app.pool, "retry-1", "after two rate limits").await;
    let created = wait_for_state(&app.pool, id, "created").await;
    assert_eq!(created.attempts, 3);
    assert_eq!(
        instances_with_reason(&emu, "after two rate limits").len(),
        1
    );
    assert_eq!(emu.calls(api::create()), 3);
    app.stop().await;
}

#[tokio::test]
async fn transient_errors_give_up_as_failed_after_max_attempts() {
    let app = daemon(|c| c.outbox.max_attempts = 3).await;
    let emu = emulator(&app);
    emu.inject(api::create(), InjectedError::RateLimit, 10);
    let id = request_expense(&app.pool, "retry-2", "never through").await;
    let failed = wait_for_state(&app.pool, id, "failed").await;
    assert_eq!(failed.attempts, 3);
    assert!(
        failed
            .last_error
            .as_deref()
            .unwrap()
            .starts_with("gave up after 3 attempts"),
        "{failed:?}"
    );
    assert!(emu.instances().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_lost_create_response_is_searched_for_and_adopted_never_sent_twice() {
    let app = daemon(|_| {}).await;
    let emu = emulator(&app);
    emu.update_faults(|f| f.lose_create_response = 1);
    let id = request_expense(&app.pool, "lost-1", "answer lost").await;
    let created = wait_for_state(&app.pool, id, "created").await;
    let made = instances_with_reason(&emu, "answer lost");
    assert_eq!(made.len(), 1, "exactly one instance");
    assert_eq!(
        created.process_instance_id.as_deref(),
        Some(made[0].process_instance_id.as_str())
    );
    assert_eq!(created.attempts, 1, "adopted, not sent again");
    assert_eq!(emu.calls(api::create()), 1);
    assert!(emu.calls(api::list_ids()) >= 1);
    app.stop().await;
}

#[tokio::test]
async fn a_create_dingtalk_finishes_after_the_client_gave_up_is_found_by_the_search() {
    // DingTalk answers in 500 ms, the client waits 300 ms: the instance appears after the
    // worker has given up on the answer, and before it searches (settle 1 s).
    let app = daemon(|c| {
        c.outbox.lost_settle_ms = 1_000;
        c.outbox.lease_ms = 2_000;
    })
    .await;
    let emu = emulator(&app);
    emu.update_faults(|f| f.latency_ms = 500);
    let id = request_expense(&app.pool, "slow-1", "slow answer").await;
    wait_for_state(&app.pool, id, "unknown").await;
    // DingTalk is quick again by the time the worker searches.
    emu.reset_faults();
    let created = wait_for_state(&app.pool, id, "created").await;
    let made = instances_with_reason(&emu, "slow answer");
    assert_eq!(made.len(), 1);
    assert_eq!(
        created.process_instance_id.as_deref(),
        Some(made[0].process_instance_id.as_str())
    );
    assert_eq!(created.attempts, 1);
    app.stop().await;
}

#[tokio::test]
async fn an_unanswered_create_that_dingtalk_never_made_is_sent_again_once_certainly_absent() {
    let app = daemon(|_| {}).await;
    let emu = emulator(&app);
    // "System busy": DingTalk may or may not have processed it, so the worker must look first.
    emu.inject(api::create(), InjectedError::Busy, 1);
    let id = request_expense(&app.pool, "busy-1", "busy first").await;
    let created = wait_for_state(&app.pool, id, "created").await;
    assert_eq!(
        created.attempts, 2,
        "sent again after the search found nothing"
    );
    assert!(emu.calls(api::list_ids()) >= 1);
    assert_eq!(instances_with_reason(&emu, "busy first").len(), 1);
    assert_eq!(
        search_calls(&app).await,
        (1, 0),
        "one listing, nothing to fetch"
    );
    app.stop().await;
}

/// Calls the daemon made for its lost-answer searches (purpose `search` in its ledger), by API.
async fn search_calls(app: &TestApp) -> (i64, i64) {
    let usage = app
        .app
        .as_ref()
        .unwrap()
        .ledger
        .this_month(&app.owner_key)
        .await
        .unwrap();
    let of = |api: &str| usage.sum(|r| r.kind == "call" && r.purpose == "search" && r.api == api);
    (
        of(api::ledger_path(api::list_ids())),
        of(api::ledger_path(api::get())),
    )
}

/// Requests `n` approvals that are all the same request (reason `reason`), keyed `<key>-1..n`.
async fn request_identical(pool: &PgPool, key: &str, reason: &str, n: i32) -> Vec<i64> {
    let mut ids = Vec::new();
    for i in 1..=n {
        ids.push(request_expense(pool, &format!("{key}-{i}"), reason).await);
    }
    ids
}

#[tokio::test]
async fn several_lost_answers_to_identical_requests_are_each_adopted_once_in_at_most_three_calls_each()
 {
    let app = daemon(|_| {}).await;
    let emu = emulator(&app);
    // Three of the same request created normally first: listed by the search, owned, not fetched.
    let answered = request_identical(&app.pool, "same-ok", "the same request", 3).await;
    for id in &answered {
        wait_for_state(&app.pool, *id, "created").await;
    }
    let lost = 5;
    emu.update_faults(|f| f.lose_create_response = lost);
    let ids = request_identical(&app.pool, "same-lost", "the same request", lost as i32).await;
    let mut adopted = Vec::new();
    for id in &ids {
        let created = wait_for_state(&app.pool, *id, "created").await;
        assert_eq!(created.attempts, 1, "row {id} adopted, not sent again");
        adopted.push(created.process_instance_id.unwrap());
    }
    let made = instances_with_reason(&emu, "the same request");
    assert_eq!(made.len(), 8, "one instance per row, no duplicate");
    assert_eq!(emu.calls(api::create()), 8);
    let (distinct, rows): (i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT process_instance_id), count(*) FROM dingsync.outbox
         WHERE state = 'created'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((distinct, rows), (8, 8), "every row its own instance");
    // Oldest instance to oldest row: the lost rows hold the five newest instances, in order.
    let newest: Vec<String> = made[3..]
        .iter()
        .map(|i| i.process_instance_id.clone())
        .collect();
    assert_eq!(adopted, newest);
    let (listids, gets) = search_calls(&app).await;
    println!("search calls for {lost} lost answers: {listids} listids, {gets} get");
    assert!(listids >= 1);
    assert_eq!(
        emu.calls(api::list_ids()) as i64,
        listids,
        "only the search lists"
    );
    assert!(
        listids + gets <= 3 * i64::from(lost),
        "{listids} listids + {gets} get for {lost} lost answers"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_search_that_fetches_an_instance_leaves_its_snapshot_so_the_details_job_does_not_fetch_it()
 {
    let app = daemon(|c| {
        // The events of the new instance arrive well before the search asks DingTalk.
        c.outbox.lost_settle_ms = 500;
        // The details job would run only once a year: whatever is left for it stays queued.
        c.scheduler.details = "0 0 0 1 1 *".into();
    })
    .await;
    let emu = emulator(&app);
    emu.update_faults(|f| f.lose_create_response = 1);
    let id = request_expense(&app.pool, "lost-snap", "snapshot kept").await;
    let created = wait_for_state(&app.pool, id, "created").await;
    let pid = created.process_instance_id.unwrap();
    let (source, form_values, wanted): (Option<String>, Option<serde_json::Value>, Option<String>) =
        eventually(
            Duration::from_secs(10),
            "the search's snapshot applied",
            || async {
                let row: (Option<String>, Option<serde_json::Value>, Option<String>) =
                    sqlx::query_as(
                        "SELECT snapshot_source, form_values, detail_wanted_at::text
                 FROM dingsync.approvals WHERE process_instance_id = $1",
                    )
                    .bind(&pid)
                    .fetch_one(&app.pool)
                    .await
                    .unwrap();
                row.0.is_some().then_some(row)
            },
        )
        .await;
    assert_eq!(source.as_deref(), Some("search"));
    assert!(
        form_values.unwrap().to_string().contains("snapshot kept"),
        "the instance's form values are stored"
    );
    assert_eq!(wanted, None, "no detail fetch is wanted any more");
    let queue = store::approvals::wanted_page(&app.pool, &app.owner_key, 0, 0, None, 10)
        .await
        .unwrap();
    assert!(
        queue.is_empty(),
        "the details job has nothing to fetch: {queue:?}"
    );
    let (listids, gets) = search_calls(&app).await;
    assert_eq!((listids, gets), (1, 1));
    app.stop().await;
}

/// A standalone emulator (so that several daemons can share it).
async fn standalone_emulator() -> Emulator {
    common::standalone_emulator(11).await
}

fn against(emu: &Emulator, db: &TestDb) -> Config {
    let mut config = config_against(emu, db);
    fast(&mut config);
    config
}

#[tokio::test]
async fn two_workers_on_one_table_create_every_row_exactly_once() {
    let emu = standalone_emulator().await;
    let db = TestDb::new();
    let first = App::start(against(&emu, &db)).await.unwrap();
    let second = App::start(against(&emu, &db)).await.unwrap();
    let pool = PgPool::connect(&db.url).await.unwrap();
    request_many(&pool, "bulk", 200).await;
    wait_all_created(&pool, Duration::from_secs(30)).await;
    let state = emu.state();
    assert_eq!(state.instances().len(), 200);
    assert_eq!(state.calls(api::create()), 200);
    let (distinct, attempts): (i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT process_instance_id), sum(attempts) FROM dingsync.outbox",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((distinct, attempts), (200, 200));
    first.stop().await.unwrap();
    second.stop().await.unwrap();
    pool.close().await;
    emu.stop().await;
}

/// Plays a worker that claimed `id` (lease 300 ms) and then died: after sending the create
/// when `sent`, before it when not.
async fn die_while_sending(pool: &PgPool, emu: &Emulator, id: i64, sent: bool) {
    let claims = outbox_store::claim(
        pool,
        CORP_ID,
        10,
        Duration::from_millis(300),
        Duration::from_millis(100),
    )
    .await
    .unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].row.id, id);
    if sent {
        let request = request::create_request(&claims[0].row).unwrap();
        let mut config = test_config("postgres://unused");
        config.dingtalk.app_key = EmulatorConfig::default().app_key;
        config.dingtalk.app_secret =
            dingsync::config::Secret::new(EmulatorConfig::default().app_secret);
        config.dingtalk.qps = 0;
        let client =
            dingtalk::Client::new(pool.clone(), &config.dingtalk, &emu.base_url()).unwrap();
        client.create_instance(&request).await.unwrap();
    }
}

#[tokio::test]
async fn a_worker_killed_while_sending_is_rescued_without_a_second_instance() {
    for sent in [true, false] {
        let emu = standalone_emulator().await;
        let db = TestDb::new();
        let pool = store::connect_and_migrate(&test_config(&db.url).database)
            .await
            .unwrap();
        outbox_store::register_corp(&pool, CORP_ID).await.unwrap();
        let id = request_expense(&pool, "killed-1", "worker died").await;
        die_while_sending(&pool, &emu, id, sent).await;
        assert_eq!(row(&pool, id).await.state, "sending");

        let app = App::start(against(&emu, &db)).await.unwrap();
        let created = wait_for_state(&pool, id, "created").await;
        let made: Vec<Instance> = emu.state().instances();
        assert_eq!(made.len(), 1, "sent = {sent}: exactly one instance");
        assert_eq!(
            created.process_instance_id.as_deref(),
            Some(made[0].process_instance_id.as_str())
        );
        // Adopted when the dead worker had sent it; sent (once more) when it had not.
        assert_eq!(created.attempts, if sent { 1 } else { 2 }, "sent = {sent}");
        assert_eq!(emu.state().calls(api::create()), 1, "sent = {sent}");
        app.stop().await.unwrap();
        pool.close().await;
        emu.stop().await;
    }
}

/// A database migrated by the production code, serving CORP_ID, with no daemon running.
async fn migrated() -> (TestDb, PgPool) {
    let db = TestDb::new();
    let pool = store::connect_and_migrate(&test_config(&db.url).database)
        .await
        .unwrap();
    outbox_store::register_corp(&pool, CORP_ID).await.unwrap();
    (db, pool)
}

async fn refusal(pool: &PgPool, form: serde_json::Value, extra: &str) -> String {
    let sql = format!("SELECT dingsync.request_approval('k', 'PROC-1', 'emp1', $1{extra})");
    let err = sqlx::query_scalar::<_, i64>(&sql)
        .bind(form)
        .fetch_one(pool)
        .await
        .expect_err("refused");
    match &err {
        sqlx::Error::Database(db) => {
            assert_eq!(db.code().as_deref(), Some("23514"), "{err}");
            db.message().to_string()
        }
        other => panic!("not a database error: {other}"),
    }
}

#[tokio::test]
async fn invalid_form_values_are_refused_with_a_message_naming_the_item() {
    let (_db, pool) = migrated().await;
    let ok = json!({"name": "Reason", "value": "x"});
    let cases = [
        (
            json!({"name": "Reason"}),
            "",
            "form_values must be a JSON array",
        ),
        (json!([]), "", "form_values is empty"),
        (json!([ok, "text"]), "", "form_values[1] must be an object"),
        (
            json!([{"name": "Reason"}]),
            "",
            "form_values[0].value is missing",
        ),
        (
            json!([{"value": "x"}]),
            "",
            "form_values[0].name is missing",
        ),
        (
            json!([{"name": "", "value": "x"}]),
            "",
            "form_values[0].name is empty",
        ),
        (
            json!([ok, {"name": "Reason", "value": "y"}]),
            "",
            "form_values[1].name \"Reason\" appears twice",
        ),
        (
            json!([{"name": "A", "value": {"x": 1}}]),
            "",
            "form_values[0].value must be text, a number or a JSON array, not object",
        ),
        (json!([{"name": "A", "value": true}]), "", "not boolean"),
        (
            json!([{"name": "A", "value": "x", "label": "y"}]),
            "",
            "unknown key \"label\"",
        ),
        (json!([{"name": "A", "value": ["a", 1]}]), "", "mixes"),
        (
            json!([{"name": "A", "value": [1, 2]}]),
            "",
            "array of numbers",
        ),
        (
            json!([{"name": "Details", "value": [[{"name": "Item"}]]}]),
            "",
            "form_values[0].value is a table",
        ),
        (
            json!([{"name": ["开始时间"], "value": ["2026-01-01", "2026-01-02"]}]),
            "",
            "pair of its labels",
        ),
        (
            json!([{"name": ["开始时间", "结束时间"], "value": ["2026-01-01"]}]),
            "",
            "is a date range: value must be [\"start\", \"end\"]",
        ),
        (
            json!([{"name": "A", "value": "x", "ext_value": 1}]),
            "",
            "ext_value must be text",
        ),
        (json!([ok]), ", approvers => '[]'", "approvers must be NULL"),
        (
            json!([ok]),
            ", approvers => '[{\"action\": \"NONE\", \"user_ids\": [\"a\", \"b\"]}]'",
            "single-approver node",
        ),
        (
            json!([ok]),
            ", approvers => '[{\"action\": \"ALL\", \"user_ids\": [\"a\"]}]'",
            "approvers[0].action must be",
        ),
        (
            json!([ok]),
            ", cc_list => '{u1}'",
            "cc_list needs approvers",
        ),
        (
            json!([ok]),
            ", approvers => '[\"u1\"]', cc_position => 'LATER'",
            "cc_position must be",
        ),
    ];
    for (form, extra, expected) in cases {
        let message = refusal(&pool, form.clone(), extra).await;
        assert!(
            message.contains(expected),
            "{form} {extra}: expected {expected:?} in {message:?}"
        );
        assert!(message.starts_with("dingsync.outbox: "), "{message}");
    }
    let long = "x".repeat(65_536);
    let message = refusal(&pool, json!([{"name": "A", "value": long}]), "").await;
    assert!(message.contains("longer than 65535"), "{message}");
    let many: Vec<_> = (0..151)
        .map(|i| json!({"name": format!("F{i}"), "value": "x"}))
        .collect();
    let message = refusal(&pool, json!(many), "").await;
    assert!(message.contains("at most 150"), "{message}");
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM dingsync.outbox")
            .fetch_one(&pool)
            .await
            .unwrap(),
        0,
        "nothing refused was stored"
    );

    // Every encoding of docs/dingtalk.md §2.2 is accepted.
    let id: i64 = sqlx::query_scalar(
        "SELECT dingsync.request_approval('all-shapes', 'PROC-1', 'emp1', $1,
            approvers => '[\"manager1\", {\"action\": \"OR\", \"user_ids\": [\"fin1\", \"boss1\"]}]',
            cc_list => '{hr1}', cc_position => 'FINISH')",
    )
    .bind(json!([
        {"name": "Reason", "value": "trip"},
        {"name": "Amount", "value": 12.5},
        {"name": "Date", "value": "2026-11-28 08:00"},
        {"name": ["开始时间", "结束时间"], "value": ["2026-11-28", "2026-11-30"]},
        {"name": "Receipts", "value": ["https://example.com/1.jpg"]},
        {"name": "Files", "value": [{"spaceId": "1", "fileName": "a.pdf", "fileSize": "10", "fileType": "pdf", "fileId": "f1"}]},
        {"name": "Details", "value": [[{"name": "Item", "value": "pen"}, {"name": "Qty", "value": 2}]]},
        {"name": "Department", "value": "100,200"},
        {"name": "Type", "value": "差旅", "ext_value": "{}"}
    ]))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(id > 0);
    pool.close().await;
}

#[tokio::test]
async fn corp_id_defaults_to_the_only_organisation_served_and_is_required_otherwise() {
    let db = TestDb::new();
    let pool = store::connect_and_migrate(&test_config(&db.url).database)
        .await
        .unwrap();
    let insert = || async {
        sqlx::query_scalar::<_, String>(
            "INSERT INTO dingsync.outbox (idempotency_key, process_code, originator_user_id, form_values)
             VALUES (gen_random_uuid()::text, 'PROC-1', 'emp1', '[{\"name\":\"A\",\"value\":\"x\"}]')
             RETURNING corp_id",
        )
        .fetch_one(&pool)
        .await
    };
    let none = insert().await.unwrap_err().to_string();
    assert!(
        none.contains("no dingsync has started against this database yet"),
        "{none}"
    );
    outbox_store::register_corp(&pool, CORP_ID).await.unwrap();
    assert_eq!(insert().await.unwrap(), CORP_ID);
    outbox_store::register_corp(&pool, "dingothercorp")
        .await
        .unwrap();
    let two = insert().await.unwrap_err().to_string();
    assert!(
        two.contains("serves several organisations (dingothercorp, dingtestcorp00000001)"),
        "{two}"
    );
    let explicit: i64 = sqlx::query_scalar(
        "SELECT dingsync.request_approval('k', 'PROC-1', 'emp1', '[{\"name\":\"A\",\"value\":\"x\"}]', corp_id => 'dingothercorp')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(explicit > 0);
    pool.close().await;
}

#[tokio::test]
async fn operator_commands_retry_and_cancel_only_what_cannot_double_an_approval() {
    let (_db, pool) = migrated().await;
    let failed = request_expense(&pool, "op-1", "to fail").await;
    let pending = request_expense(&pool, "op-2", "to cancel").await;
    let unknown = request_expense(&pool, "op-3", "in doubt").await;
    sqlx::query("UPDATE dingsync.outbox SET state = 'failed', attempts = 8, last_error = 'errcode 1: no', done_at = now() WHERE id = $1")
        .bind(failed)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE dingsync.outbox SET state = 'unknown', attempts = 1 WHERE id = $1")
        .bind(unknown)
        .execute(&pool)
        .await
        .unwrap();

    let listed = manage::list(&pool, Some("failed"), 10).await.unwrap();
    assert!(
        listed.contains("op-1") && !listed.contains("op-2"),
        "{listed}"
    );
    assert!(listed.ends_with("(1 rows)"), "{listed}");
    assert!(manage::list(&pool, Some("done"), 10).await.is_err());

    manage::retry(&pool, failed).await.unwrap();
    let retried = row(&pool, failed).await;
    assert_eq!((retried.state.as_str(), retried.attempts), ("pending", 0));
    let refused = manage::retry(&pool, unknown).await.unwrap_err().to_string();
    assert!(
        refused.contains("could create a second approval"),
        "{refused}"
    );
    let refused = manage::retry(&pool, pending).await.unwrap_err().to_string();
    assert!(refused.contains("only failed or cancelled"), "{refused}");

    manage::cancel(&pool, pending).await.unwrap();
    assert_eq!(row(&pool, pending).await.state, "cancelled");
    let refused = manage::cancel(&pool, unknown)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("may already have reached DingTalk"),
        "{refused}"
    );
    assert_eq!(row(&pool, unknown).await.state, "unknown");
    assert!(manage::cancel(&pool, 999_999).await.is_err());
    pool.close().await;
}

#[tokio::test]
async fn a_stopped_daemon_leaves_no_row_sending_and_the_next_one_finishes_the_rest_once() {
    let emu = standalone_emulator().await;
    emu.state().update_faults(|f| f.latency_ms = 100);
    let db = TestDb::new();
    let mut config = against(&emu, &db);
    config.outbox.concurrency = 2;
    let first = App::start(config.clone()).await.unwrap();
    let pool = PgPool::connect(&db.url).await.unwrap();
    request_many(&pool, "stop", 30).await;
    eventually(Duration::from_secs(10), "a few rows created", || async {
        let created: i64 =
            sqlx::query_scalar("SELECT count(*) FROM dingsync.outbox WHERE state = 'created'")
                .fetch_one(&pool)
                .await
                .unwrap();
        (created >= 4).then_some(())
    })
    .await;
    first.stop().await.unwrap();
    let states: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM dingsync.outbox GROUP BY 1 ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        states.iter().all(|(s, _)| s == "created" || s == "pending"),
        "after a stop every row is created or pending: {states:?}"
    );
    // Rows given back unsent do not count an attempt.
    let pending_attempts: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(attempts), 0) FROM dingsync.outbox WHERE state = 'pending'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(pending_attempts, 0);

    emu.state().reset_faults();
    let second = App::start(config).await.unwrap();
    wait_all_created(&pool, Duration::from_secs(15)).await;
    assert_eq!(emu.state().instances().len(), 30);
    assert_eq!(emu.state().calls(api::create()), 30);
    second.stop().await.unwrap();
    pool.close().await;
    emu.stop().await;
}

#[tokio::test]
async fn the_embedded_default_with_simulated_people_fills_the_outbox_and_the_approvals() {
    let app = daemon(|c| c.emulator.people_pace_ms = 40).await;
    eventually(
        Duration::from_secs(20),
        "demo outbox rows created and approvals decided",
        || async {
            let (created, decided): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM dingsync.outbox WHERE state = 'created'),
                        (SELECT count(*) FROM dingsync.approvals WHERE status <> 'RUNNING')",
            )
            .fetch_one(&app.pool)
            .await
            .unwrap();
            (created >= 2 && decided >= 1).then_some(())
        },
    )
    .await;
    app.stop().await;
}
