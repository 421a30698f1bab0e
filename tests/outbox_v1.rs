//! What only the v1.0 family gives the outbox: self-selected approvers (`select_approvers`,
//! migration V19) and the forecast pre-check (`outbox.forecast_check`), end to end from SQL
//! through the daemon to the embedded emulator.

mod common;

use std::time::Duration;

use common::*;
use dingsync::config::{ApiFamily, Config};
use dingsync_emulator::{Control, Handle, InjectedError, SelectNode, Template};
use sqlx::PgPool;

const SELECT_KEY: &str = "manual_emu_travel_finance";

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

/// A daemon on the embedded emulator in `family`, whose organisation has a travel template with
/// a required self-selected finance node (fin1 or emp3).
async fn daemon(family: ApiFamily, adjust: impl FnOnce(&mut Config)) -> (TestApp, Handle) {
    let app = TestApp::spawn_with(|c| {
        embedded_emulator(c);
        fast(c);
        c.dingtalk.api_family = family;
        adjust(c);
    })
    .await;
    let emu = app
        .app
        .as_ref()
        .unwrap()
        .emulator
        .as_ref()
        .unwrap()
        .state()
        .clone();
    emu.add_template(Template {
        allow_revoke: true,
        process_code: "PROC-EMU-TRAVEL".into(),
        name: "出差".into(),
        controls: vec![Control {
            component_type: "TextField".into(),
            label: "Destination".into(),
            required: true,
            ..Default::default()
        }],
        default_approvers: vec!["manager1".into()],
        revision: 1,
        select_nodes: vec![SelectNode {
            actor_key: SELECT_KEY.into(),
            name: "财务审批".into(),
            required: true,
            allowed_multi: false,
            candidates: vec!["fin1".into(), "emp3".into()],
        }],
    })
    .unwrap();
    (app, emu)
}

async fn request_travel(pool: &PgPool, key: &str, select: Option<&str>) -> i64 {
    sqlx::query_scalar(
        "SELECT dingsync.request_approval($1, 'PROC-EMU-TRAVEL', 'emp1',
            '[{\"name\": \"Destination\", \"value\": \"北京\"}]', select_approvers => $2::jsonb)",
    )
    .bind(key)
    .bind(select)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn wait_done(pool: &PgPool, id: i64) -> (String, i32, Option<String>, Option<String>) {
    eventually(Duration::from_secs(15), "the row done", || async {
        let row: (String, i32, Option<String>, Option<String>) = sqlx::query_as(
            "SELECT state, attempts, process_instance_id, last_error FROM dingsync.outbox WHERE id = $1",
        )
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
        matches!(row.0.as_str(), "created" | "failed").then_some(row)
    })
    .await
}

#[tokio::test]
async fn a_row_with_select_approvers_is_created_with_them_in_the_v1_family() {
    let (app, emu) = daemon(ApiFamily::V1, |_| {}).await;
    let select = format!(r#"{{"{SELECT_KEY}": ["emp3"]}}"#);
    let id = request_travel(&app.pool, "travel-1", Some(&select)).await;
    let (state, _, instance, error) = wait_done(&app.pool, id).await;
    assert_eq!(state, "created", "{error:?}");
    let instance = emu.instance(&instance.unwrap()).unwrap();
    let route: Vec<&str> = instance
        .nodes
        .iter()
        .map(|n| n.user_ids[0].as_str())
        .collect();
    assert_eq!(route, ["manager1", "emp3"]);
    assert_eq!(emu.calls("POST v1.0/workflow/processInstances"), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_row_with_select_approvers_fails_unsent_in_the_legacy_family_naming_the_key() {
    let (app, emu) = daemon(ApiFamily::Legacy, |_| {}).await;
    let select = format!(r#"{{"{SELECT_KEY}": ["emp3"]}}"#);
    let id = request_travel(&app.pool, "travel-1", Some(&select)).await;
    let (state, attempts, _, error) = wait_done(&app.pool, id).await;
    assert_eq!((state.as_str(), attempts), ("failed", 1));
    assert!(error.unwrap().contains("dingtalk.api_family"));
    assert_eq!(
        emu.calls("topapi/processinstance/create"),
        0,
        "nothing sent"
    );
    assert!(emu.instances().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn without_its_self_selected_approvers_dingtalk_refuses_the_create_and_the_row_fails() {
    let (app, emu) = daemon(ApiFamily::V1, |_| {}).await;
    let id = request_travel(&app.pool, "travel-1", None).await;
    let (state, _, _, error) = wait_done(&app.pool, id).await;
    assert_eq!(state, "failed");
    assert!(
        error
            .as_deref()
            .unwrap()
            .contains("targetSelectApproverMissing"),
        "{error:?}"
    );
    assert_eq!(emu.calls("POST v1.0/workflow/processInstances"), 1);
    app.stop().await;
}

#[tokio::test]
async fn the_forecast_check_fails_a_row_missing_a_self_selected_approver_before_any_create() {
    let (app, emu) = daemon(ApiFamily::V1, |c| c.outbox.forecast_check = true).await;
    let id = request_travel(&app.pool, "travel-1", None).await;
    let (state, _, _, error) = wait_done(&app.pool, id).await;
    assert_eq!(state, "failed");
    let error = error.unwrap();
    assert!(
        error.contains("forecast")
            && error.contains(SELECT_KEY)
            && error.contains("select_approvers"),
        "{error}"
    );
    assert_eq!(emu.calls("POST v1.0/workflow/processes/forecast"), 1);
    assert_eq!(
        emu.calls("POST v1.0/workflow/processInstances"),
        0,
        "no create sent"
    );

    // A request DingTalk's forecast refuses fails with DingTalk's code, also before any create.
    let bad: i64 = sqlx::query_scalar(
        "SELECT dingsync.request_approval('expense-bad', 'PROC-EMU-EXPENSE', 'emp1',
            '[{\"name\": \"Amount\", \"value\": 1}]')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let (state, _, _, error) = wait_done(&app.pool, bad).await;
    assert_eq!(state, "failed");
    assert!(error.unwrap().contains("forecastError"));
    assert_eq!(emu.calls("POST v1.0/workflow/processInstances"), 0);

    // With the approvers named, the forecast passes and the create follows.
    let select = format!(r#"{{"{SELECT_KEY}": ["fin1"]}}"#);
    let ok = request_travel(&app.pool, "travel-2", Some(&select)).await;
    let (state, _, _, error) = wait_done(&app.pool, ok).await;
    assert_eq!(state, "created", "{error:?}");
    assert_eq!(emu.calls("POST v1.0/workflow/processInstances"), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_forecast_that_fails_transiently_never_fails_a_row() {
    let (app, emu) = daemon(ApiFamily::V1, |c| c.outbox.forecast_check = true).await;
    emu.inject(
        "POST v1.0/workflow/processes/forecast",
        InjectedError::Busy,
        5,
    );
    let select = format!(r#"{{"{SELECT_KEY}": ["fin1"]}}"#);
    let id = request_travel(&app.pool, "travel-1", Some(&select)).await;
    let (state, attempts, _, error) = wait_done(&app.pool, id).await;
    assert_eq!((state.as_str(), attempts), ("created", 1), "{error:?}");
    app.stop().await;
}

#[tokio::test]
async fn malformed_select_approvers_are_refused_by_the_insert_naming_the_field() {
    let (app, _emu) = daemon(ApiFamily::V1, |_| {}).await;
    for (select, approvers, expected) in [
        (
            r#"["fin1"]"#,
            None,
            "select_approvers must be NULL or a JSON object",
        ),
        (
            r#"{"k": []}"#,
            None,
            "select_approvers.k must hold 1 to 20 userids",
        ),
        (
            r#"{"k": "fin1"}"#,
            None,
            "select_approvers.k must be a JSON array",
        ),
        (
            r#"{"k": ["fin1"]}"#,
            Some(r#"["manager1"]"#),
            "select_approvers needs approvers NULL",
        ),
    ] {
        let err = sqlx::query(
            "SELECT dingsync.request_approval('bad', 'PROC-EMU-TRAVEL', 'emp1',
                '[{\"name\": \"Destination\", \"value\": \"北京\"}]',
                approvers => $2::jsonb, select_approvers => $1::jsonb)",
        )
        .bind(select)
        .bind(approvers)
        .execute(&app.pool)
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains(expected), "{select}: {text}");
    }
    // The same key with other select_approvers is another request.
    request_travel(&app.pool, "same", Some(r#"{"k": ["fin1"]}"#)).await;
    let err = sqlx::query(
        "SELECT dingsync.request_approval('same', 'PROC-EMU-TRAVEL', 'emp1',
            '[{\"name\": \"Destination\", \"value\": \"北京\"}]', select_approvers => '{\"k\": [\"emp3\"]}')",
    )
    .execute(&app.pool)
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("already used for a different request")
    );
    app.stop().await;
}
