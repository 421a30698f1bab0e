//! The DingTalk client in the v1.0 family (`dingtalk.api_family = "v1"`) against the emulator
//! over real HTTP, with a real database for the shared token, budget and ledger: the same calls
//! and error classes as the old family (tests/dingtalk.rs), in v1.0's shapes, and what only v1.0
//! has (the status filter, the forecast, self-selected approvers, table rows in `details`).

mod common;

use std::time::Duration;

use common::{CORP_ID, TestDb, install_crypto_provider, test_config};
use dingsync::{
    config::{ApiFamily, Config, Secret},
    dingtalk::{
        Client, Error, Purpose,
        types::{CreateInstance, FormValue, ListIds, SelectActioner},
    },
    snapshot::Snapshot,
    store,
};
use dingsync_emulator::{
    Emulator, EmulatorConfig, InjectedError, SelectNode, TaskAction, Template,
};
use sqlx::PgPool;

const CREATE: &str = "POST v1.0/workflow/processInstances";
const GET: &str = "GET v1.0/workflow/processInstances";
const LIST: &str = "POST v1.0/workflow/processes/instanceIds/query";
const TOKEN: &str = "POST v1.0/oauth2/accessToken";

struct Setup {
    emulator: Emulator,
    config: Config,
    client: Client,
    pool: PgPool,
    _db: TestDb,
}

async fn setup(adjust: impl FnOnce(&mut Config)) -> Setup {
    install_crypto_provider();
    let emulator = Emulator::start(
        EmulatorConfig {
            corp_id: CORP_ID.into(),
            time_scale: 0.01,
            ..EmulatorConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let db = TestDb::new();
    let mut config = test_config(&db.url);
    config.dingtalk.api_family = ApiFamily::V1;
    config.dingtalk.app_key = dingsync_emulator::DEFAULT_APP_KEY.into();
    config.dingtalk.app_secret = Secret::new(dingsync_emulator::DEFAULT_APP_SECRET);
    config.dingtalk.timeout_ms = 1_000;
    config.dingtalk.qps = 0;
    adjust(&mut config);
    let pool = store::connect_and_migrate(&config.database).await.unwrap();
    let client = Client::new(pool.clone(), &config.dingtalk, &emulator.base_url()).unwrap();
    Setup {
        emulator,
        config,
        client,
        pool,
        _db: db,
    }
}

impl Setup {
    /// A second client on the same database in `family`.
    fn client_in(&self, family: ApiFamily) -> Client {
        let mut config = self.config.dingtalk.clone();
        config.api_family = family;
        Client::new(self.pool.clone(), &config, &self.emulator.base_url()).unwrap()
    }
}

fn value(name: &str, value: &str) -> FormValue {
    FormValue {
        name: name.into(),
        value: value.into(),
        ..FormValue::default()
    }
}

fn expense() -> CreateInstance {
    CreateInstance {
        process_code: "PROC-EMU-EXPENSE".into(),
        originator_user_id: "emp1".into(),
        dept_id: 100,
        approvers: Some("manager1".into()),
        form_component_values: vec![value("Reason", "trip"), value("Amount", "100")],
        ..CreateInstance::default()
    }
}

/// A template with a fixed approver and a self-selected finance node (fin1 or emp3).
fn travel_template() -> Template {
    Template {
        allow_revoke: true,
        process_code: "PROC-EMU-TRAVEL".into(),
        name: "出差".into(),
        controls: vec![
            dingsync_emulator::Control {
                component_type: "TextField".into(),
                label: "Destination".into(),
                required: true,
                ..Default::default()
            },
            dingsync_emulator::Control {
                component_type: "TableField".into(),
                label: "Itinerary".into(),
                ..Default::default()
            },
        ],
        default_approvers: vec!["manager1".into()],
        revision: 1,
        select_nodes: vec![SelectNode {
            actor_key: "manual_emu_travel_finance".into(),
            name: "财务审批".into(),
            required: true,
            allowed_multi: false,
            candidates: vec!["fin1".into(), "emp3".into()],
        }],
    }
}

fn travel() -> CreateInstance {
    CreateInstance {
        process_code: "PROC-EMU-TRAVEL".into(),
        originator_user_id: "emp1".into(),
        dept_id: 100,
        form_component_values: vec![value("Destination", "北京")],
        ..CreateInstance::default()
    }
}

#[tokio::test]
async fn create_get_and_list_ids_round_trip_in_the_v1_family() {
    let s = setup(|_| {}).await;
    let id = s.client.create_instance(&expense()).await.unwrap();
    let instance = s.client.get_instance(&id, Purpose::Details).await.unwrap();
    assert_eq!(instance.status, "RUNNING");
    assert_eq!(instance.originator_userid.as_deref(), Some("emp1"));
    assert!(instance.tasks[0].taskid.parse::<i64>().is_ok());
    // Read into the old family's Beijing-time strings, to the minute v1.0 gives.
    let created = instance.create_time.as_deref().unwrap();
    assert_eq!(created.len(), 19, "{created}");
    assert!(created.ends_with(":00"), "{created}");
    let now = chrono::Utc::now().timestamp_millis();
    let page = s
        .client
        .list_instance_ids(
            &ListIds {
                process_code: "PROC-EMU-EXPENSE".into(),
                start_time: now - 3_600_000,
                end_time: Some(now + 1_000),
                size: 20,
                ..ListIds::default()
            },
            Purpose::Backfill,
        )
        .await
        .unwrap();
    assert_eq!(page.list, vec![id]);
    assert_eq!(page.next_cursor, None);
    let state = s.emulator.state();
    assert_eq!(state.calls(TOKEN), 1, "one token for all three calls");
    assert_eq!(state.calls("gettoken"), 0);
    assert_eq!(
        (state.calls(CREATE), state.calls(GET), state.calls(LIST)),
        (1, 1, 1)
    );
    assert_eq!(state.calls("topapi/processinstance/create"), 0);
    s.emulator.stop().await;
}

#[tokio::test]
async fn a_v1_get_reads_into_the_snapshot_the_old_get_gives() {
    let s = setup(|_| {}).await;
    let legacy = s.client_in(ApiFamily::Legacy);
    let id = s.client.create_instance(&expense()).await.unwrap();
    let task = s.emulator.state().instance(&id).unwrap().tasks[0].taskid;
    s.emulator
        .state()
        .agree(
            task,
            TaskAction {
                remark: Some("ok".into()),
                ..TaskAction::default()
            },
        )
        .unwrap();
    let v1 = Snapshot::from_instance(
        &id,
        &s.client.get_instance(&id, Purpose::Details).await.unwrap(),
    )
    .unwrap();
    let old = Snapshot::from_instance(
        &id,
        &legacy.get_instance(&id, Purpose::Details).await.unwrap(),
    )
    .unwrap();
    let minute = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.timestamp() / 60);
    assert_eq!(v1.status, old.status);
    assert_eq!(v1.result.as_deref(), Some("agree"));
    assert_eq!(v1.result, old.result);
    assert_eq!(v1.title, old.title);
    assert_eq!(v1.business_id, old.business_id);
    assert_eq!(v1.originator_userid, old.originator_userid);
    assert_eq!(v1.originator_dept_id, old.originator_dept_id);
    assert_eq!(minute(v1.created_at), minute(old.created_at));
    assert_eq!(minute(v1.finished_at), minute(old.finished_at));
    assert_eq!(v1.tasks.len(), old.tasks.len());
    for (a, b) in v1.tasks.iter().zip(&old.tasks) {
        assert_eq!(
            (
                a.task_id,
                &a.userid,
                &a.status,
                &a.result,
                &a.activity_id,
                &a.remark
            ),
            (
                b.task_id,
                &b.userid,
                &b.status,
                &b.result,
                &b.activity_id,
                &b.remark
            )
        );
    }
    // Form values and operation records keep the old family's keys.
    let keys = |v: &serde_json::Value| {
        let mut keys: Vec<String> = v.as_array().unwrap()[0]
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| {
                ![
                    "biz_alias",
                    "show_name",
                    "cc_userids",
                    "images",
                    "attachments",
                    "activity_id",
                ]
                .contains(&k.as_str())
            })
            .cloned()
            .collect();
        keys.sort();
        keys
    };
    assert_eq!(keys(&v1.form_values), keys(&old.form_values));
    assert_eq!(keys(&v1.operation_records), keys(&old.operation_records));
    s.emulator.stop().await;
}

#[tokio::test]
async fn a_v1_rejection_is_permanent_and_carries_dingtalks_code() {
    let s = setup(|_| {}).await;
    let mut bad = expense();
    bad.process_code = "PROC-DOES-NOT-EXIST".into();
    let err = s.client.create_instance(&bad).await.unwrap_err();
    assert_eq!(err.v1_code(), Some("processCodeError"), "{err:?}");
    assert!(
        matches!(err, Error::Rejected { errcode: 400, .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("processCodeError") && text.contains("PROC-DOES-NOT-EXIST"),
        "{text}"
    );
    assert_eq!(s.emulator.state().calls(CREATE), 1, "not retried");
    let missing = s
        .client
        .get_instance("no-such-instance", Purpose::Details)
        .await
        .unwrap_err();
    assert_eq!(missing.v1_code(), Some("processInstanceNotExist"));
    s.emulator.stop().await;
}

#[tokio::test]
async fn a_revoked_token_is_refreshed_once_through_the_v1_token_api() {
    let s = setup(|_| {}).await;
    let id = s.client.create_instance(&expense()).await.unwrap();
    s.emulator.state().revoke_token();
    s.client.get_instance(&id, Purpose::Details).await.unwrap();
    assert_eq!(s.emulator.state().calls(TOKEN), 2);
    s.emulator
        .state()
        .inject(GET, InjectedError::TokenInvalid, 5);
    assert!(matches!(
        s.client.get_instance(&id, Purpose::Details).await,
        Err(Error::InvalidToken { .. })
    ));
    s.emulator.stop().await;
}

#[tokio::test]
async fn v1_rate_limits_back_off_and_retry_within_the_attempt_bound() {
    let s = setup(|c| c.dingtalk.max_attempts = 2).await;
    let id = s.client.create_instance(&expense()).await.unwrap();
    s.emulator.state().inject(GET, InjectedError::RateLimit, 1);
    let started = std::time::Instant::now();
    s.client.get_instance(&id, Purpose::Details).await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1), "backed off");
    s.emulator.state().inject(GET, InjectedError::RateLimit, 5);
    assert!(matches!(
        s.client.get_instance(&id, Purpose::Details).await,
        Err(Error::RateLimited { errcode: 403 })
    ));
    // A rate-limited create is retried: it was refused before DingTalk processed it.
    s.emulator.state().reset_faults();
    s.emulator
        .state()
        .inject(CREATE, InjectedError::RateLimit, 1);
    s.client.create_instance(&expense()).await.unwrap();
    assert_eq!(s.emulator.state().instances().len(), 2);
    s.emulator.stop().await;
}

#[tokio::test]
async fn v1_server_errors_are_retried_for_reads_but_end_a_create_with_no_response() {
    let s = setup(|_| {}).await;
    let id = s.client.create_instance(&expense()).await.unwrap();
    s.emulator.state().inject(GET, InjectedError::Busy, 1);
    s.client.get_instance(&id, Purpose::Details).await.unwrap();
    s.emulator.state().update_faults(|f| f.http_5xx_rate = 1.0);
    assert!(matches!(
        s.client.get_instance(&id, Purpose::Details).await,
        Err(Error::Transient(_))
    ));
    s.emulator.state().reset_faults();
    s.emulator.state().inject(
        CREATE,
        InjectedError::V1 {
            status: 500,
            code: "systemError".into(),
            message: "系统错误".into(),
        },
        1,
    );
    assert!(matches!(
        s.client.create_instance(&expense()).await,
        Err(Error::NoResponse(_))
    ));
    s.emulator.stop().await;
}

#[tokio::test]
async fn a_v1_create_whose_answer_is_lost_reports_no_response_and_exists_once() {
    let s = setup(|_| {}).await;
    s.emulator
        .state()
        .update_faults(|f| f.lose_create_response = 1);
    assert!(matches!(
        s.client.create_instance(&expense()).await,
        Err(Error::NoResponse(_))
    ));
    assert_eq!(s.emulator.state().instances().len(), 1, "created, once");
    assert_eq!(s.emulator.state().calls(CREATE), 1, "not retried");
    s.emulator.stop().await;
}

#[tokio::test]
async fn wrong_credentials_on_the_v1_token_api_are_a_clear_rejection_without_the_secret() {
    let s = setup(|c| c.dingtalk.app_secret = Secret::new("wrong-secret-value")).await;
    let err = s
        .client
        .get_instance("x", Purpose::Details)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert_eq!(err.v1_code(), Some("invalidClientIdOrSecret"), "{text}");
    assert!(
        text.contains("dingtalk.app_secret") && !text.contains("wrong-secret-value"),
        "{text}"
    );
    assert_eq!(s.emulator.state().calls(GET), 0, "no call without a token");
    s.emulator.stop().await;
}

#[tokio::test]
async fn the_v1_allowance_answer_pauses_metered_calls_for_the_month() {
    let s = setup(|_| {}).await;
    s.emulator.state().inject(
        CREATE,
        InjectedError::V1 {
            status: 403,
            code: "Forbidden.AccessDenied.ApiCountLimitForOrg".into(),
            message: "api count limit".into(),
        },
        1,
    );
    match s.client.create_instance(&expense()).await {
        Err(Error::QuotaExhausted { reason, .. }) => {
            assert!(reason.contains("ApiCountLimitForOrg"), "{reason}")
        }
        other => panic!("expected the pause, got {other:?}"),
    }
    let pause = store::usage::pause(&s.pool, CORP_ID).await.unwrap();
    assert!(pause.is_some(), "the pause is shared with every replica");
    // Paused: nothing more reaches DingTalk, and the token API stays unmetered.
    assert!(matches!(
        s.client.get_instance("x", Purpose::Details).await,
        Err(Error::QuotaExhausted { .. })
    ));
    assert_eq!(s.emulator.state().calls(GET), 0);
    s.emulator.stop().await;
}

#[tokio::test]
async fn the_emulators_allowance_answers_v1_calls_with_the_403_and_pauses_the_client() {
    let s = setup(|_| {}).await;
    s.emulator
        .state()
        .set_allowances(dingsync_emulator::Allowances {
            monthly_calls: Some(1),
            monthly_deliveries: None,
        });
    s.client.create_instance(&expense()).await.unwrap();
    assert!(matches!(
        s.client.create_instance(&expense()).await,
        Err(Error::QuotaExhausted { .. })
    ));
    assert_eq!(s.emulator.state().instances().len(), 1);
    s.emulator.stop().await;
}

#[tokio::test]
async fn one_token_serves_both_families() {
    let s = setup(|_| {}).await;
    let legacy = s.client_in(ApiFamily::Legacy);
    let id = legacy.create_instance(&expense()).await.unwrap();
    // The v1 client finds the token the old family fetched in the shared row.
    s.client.get_instance(&id, Purpose::Details).await.unwrap();
    assert_eq!(s.emulator.state().calls("gettoken"), 1);
    assert_eq!(s.emulator.state().calls(TOKEN), 0);
    s.emulator.stop().await;
}

#[tokio::test]
async fn listing_by_status_finds_only_finished_instances_and_needs_v1() {
    let s = setup(|_| {}).await;
    let open = s.client.create_instance(&expense()).await.unwrap();
    let done = s.client.create_instance(&expense()).await.unwrap();
    let task = s.emulator.state().instance(&done).unwrap().tasks[0].taskid;
    s.emulator
        .state()
        .refuse(task, TaskAction::default())
        .unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let mut listing = s
        .client
        .list_ids(
            "PROC-EMU-EXPENSE",
            (now - 3_600_000, now + 1_000),
            None,
            Purpose::Backfill,
        )
        .with_statuses(&["COMPLETED", "TERMINATED"]);
    let mut ids = Vec::new();
    while let Some(page) = listing.next_page().await.unwrap() {
        ids.extend(page);
    }
    assert_eq!(ids, vec![done]);
    assert_ne!(ids, vec![open]);
    assert!(s.client.filters_by_status());
    // The old family has no such filter: refused before anything is sent.
    let legacy = s.client_in(ApiFamily::Legacy);
    assert!(!legacy.filters_by_status());
    let mut old = legacy
        .list_ids(
            "PROC-EMU-EXPENSE",
            (now - 3_600_000, now + 1_000),
            None,
            Purpose::Backfill,
        )
        .with_statuses(&["COMPLETED"]);
    assert!(matches!(old.next_page().await, Err(Error::Rejected { .. })));
    assert_eq!(
        s.emulator.state().calls("topapi/processinstance/listids"),
        0
    );
    s.emulator.stop().await;
}

#[tokio::test]
async fn the_id_paginator_follows_v1_next_tokens_to_the_last_page() {
    let s = setup(|_| {}).await;
    for _ in 0..23 {
        s.client.create_instance(&expense()).await.unwrap();
    }
    let now = chrono::Utc::now().timestamp_millis();
    let mut listing = s.client.list_ids(
        "PROC-EMU-EXPENSE",
        (now - 3_600_000, now + 1_000),
        Some("emp1"),
        Purpose::Backfill,
    );
    let mut pages = Vec::new();
    while let Some(page) = listing.next_page().await.unwrap() {
        pages.push(page.len());
    }
    assert_eq!(pages, vec![20, 3]);
    assert!(listing.finished() && !listing.capped());
    s.emulator.stop().await;
}

#[tokio::test]
async fn the_forecast_names_the_self_selected_nodes_and_a_create_fills_them() {
    let s = setup(|_| {}).await;
    s.emulator.state().add_template(travel_template()).unwrap();
    let forecast = s.client.forecast(&travel(), Purpose::Outbox).await.unwrap();
    assert!(forecast.success);
    assert_eq!(forecast.select_nodes.len(), 1);
    let node = &forecast.select_nodes[0];
    assert_eq!(node.actor_key, "manual_emu_travel_finance");
    assert!(node.required);
    assert_eq!(node.candidates, ["fin1", "emp3"]);
    // Without the node's approvers DingTalk refuses the create.
    let err = s.client.create_instance(&travel()).await.unwrap_err();
    assert_eq!(
        err.v1_code(),
        Some("targetSelectApproverMissing"),
        "{err:?}"
    );
    let mut out_of_range = travel();
    out_of_range.target_select_actioners = vec![SelectActioner {
        actioner_key: node.actor_key.clone(),
        user_ids: vec!["emp2".into()],
    }];
    let err = s.client.create_instance(&out_of_range).await.unwrap_err();
    assert_eq!(err.v1_code(), Some("targetSelectApproverScopeError"));
    // With them, the route is the fixed approver and then the one chosen.
    let mut chosen = travel();
    chosen.target_select_actioners = vec![SelectActioner {
        actioner_key: node.actor_key.clone(),
        user_ids: vec!["fin1".into()],
    }];
    let id = s.client.create_instance(&chosen).await.unwrap();
    let instance = s.emulator.state().instance(&id).unwrap();
    let route: Vec<&str> = instance
        .nodes
        .iter()
        .map(|n| n.user_ids[0].as_str())
        .collect();
    assert_eq!(route, ["manager1", "fin1"]);
    // The old family cannot name them: refused here, unsent.
    let legacy = s.client_in(ApiFamily::Legacy);
    assert!(matches!(
        legacy.create_instance(&chosen).await,
        Err(Error::Rejected { errcode: 0, .. })
    ));
    assert_eq!(s.emulator.state().calls("topapi/processinstance/create"), 0);
    s.emulator.stop().await;
}

#[tokio::test]
async fn a_forecast_of_a_bad_request_is_refused_with_dingtalks_reason() {
    let s = setup(|_| {}).await;
    let mut bad = expense();
    bad.form_component_values.retain(|v| v.name != "Reason");
    let err = s.client.forecast(&bad, Purpose::Outbox).await.unwrap_err();
    assert_eq!(err.v1_code(), Some("forecastError"), "{err:?}");
    assert!(err.to_string().contains("Reason"), "{err}");
    assert!(
        s.emulator.state().instances().is_empty(),
        "a forecast creates nothing"
    );
    s.emulator.stop().await;
}

#[tokio::test]
async fn table_rows_travel_in_details_and_read_back_as_rows() {
    let s = setup(|_| {}).await;
    s.emulator.state().add_template(travel_template()).unwrap();
    let mut request = travel();
    request.target_select_actioners = vec![SelectActioner {
        actioner_key: "manual_emu_travel_finance".into(),
        user_ids: vec!["emp3".into()],
    }];
    let rows = vec![
        vec![value("Day", "1"), value("City", "北京")],
        vec![value("Day", "2"), value("City", "上海")],
    ];
    request.form_component_values.push(FormValue {
        name: "Itinerary".into(),
        // What the old family would send; v1.0 reads the rows from `details`.
        value: String::new(),
        details: rows,
        ..FormValue::default()
    });
    let id = s.client.create_instance(&request).await.unwrap();
    let instance = s.client.get_instance(&id, Purpose::Details).await.unwrap();
    let table = instance
        .form_component_values
        .iter()
        .find(|v| v["name"] == "Itinerary")
        .unwrap();
    assert_eq!(table["component_type"], "TableField");
    let read: serde_json::Value = serde_json::from_str(table["value"].as_str().unwrap()).unwrap();
    assert_eq!(read.as_array().unwrap().len(), 2);
    assert_eq!(read[1]["rowValue"][1]["value"], "上海");
    s.emulator.stop().await;
}

#[tokio::test]
async fn the_form_schema_lists_the_templates_controls() {
    let s = setup(|_| {}).await;
    let schema = s
        .client
        .form_schema("PROC-EMU-EXPENSE", Purpose::Doctor)
        .await
        .unwrap();
    let items = schema["schemaContent"]["items"].as_array().unwrap();
    assert_eq!(items[0]["componentName"], "TextField");
    assert_eq!(items[0]["props"]["label"], "Reason");
    let err = s
        .client
        .form_schema("PROC-NOPE", Purpose::Doctor)
        .await
        .unwrap_err();
    assert!(err.v1_code().is_some(), "{err:?}");
    s.emulator.stop().await;
}

#[tokio::test]
async fn every_v1_attempt_is_counted_in_the_ledger_and_the_token_call_is_unmetered() {
    let s = setup(|_| {}).await;
    s.emulator.state().inject(GET, InjectedError::Busy, 1);
    let id = s.client.create_instance(&expense()).await.unwrap();
    s.client.get_instance(&id, Purpose::Details).await.unwrap();
    s.client.ledger().flush().await.unwrap();
    let rows: Vec<(String, i64, bool)> = sqlx::query_as(
        "SELECT api, sum(count)::int8, metered FROM dingsync.usage WHERE kind = 'call'
         GROUP BY api, metered ORDER BY api",
    )
    .fetch_all(&s.pool)
    .await
    .unwrap();
    assert!(
        rows.contains(&("v1.0/oauth2/accessToken".into(), 1, false)),
        "{rows:?}"
    );
    assert!(
        rows.contains(&("v1.0/workflow/processInstances".into(), 3, true)),
        "create, and the get twice (a busy answer counts): {rows:?}"
    );
    s.emulator.stop().await;
}

/// A stand-in for DingTalk's v1.0 token API that answers with fixed JSON.
async fn fixed_token(answer: serde_json::Value) -> String {
    use axum::{Json, Router, routing::post};
    let router = Router::new().route(
        "/v1.0/oauth2/accessToken",
        post(move || async move { Json(answer) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn an_absurd_or_missing_expire_in_from_the_v1_token_api_is_an_error_not_a_panic() {
    let s = setup(|_| {}).await;
    for answer in [
        serde_json::json!({"accessToken": "t0", "expireIn": i64::MAX}),
        serde_json::json!({"accessToken": "t0", "expireIn": 0}),
        serde_json::json!({"accessToken": "t0"}),
    ] {
        let base = fixed_token(answer.clone()).await;
        let client = Client::new(s.pool.clone(), &s.config.dingtalk, &base).unwrap();
        let err = client.tokens().get().await.unwrap_err();
        assert!(matches!(err, Error::Protocol(_)), "{answer}: {err:?}");
    }
    s.emulator.stop().await;
}
