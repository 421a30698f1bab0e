//! Actions on approvals from SQL (`dingsync.actions`): each carried out in DingTalk exactly once,
//! against the emulator over real HTTP and a fresh PostgreSQL database per test.

mod common;

use std::time::Duration;

use common::*;
use dingsync::{cli::actions as manage, config::Config};
use dingsync_emulator::{Handle, InjectedError, Instance, TaskAction};
use serde_json::json;
use sqlx::PgPool;

/// Short timings so that retries, leases and read-backs happen within a test's seconds.
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

/// An approval created through the outbox, with its first task known to dingsync (from the
/// pushed events): (process_instance_id, task_id). `approvers`: the flow's nodes, or the
/// template's (manager1) when None.
async fn approval(app: &TestApp, key: &str, approvers: Option<serde_json::Value>) -> (String, i64) {
    let id: i64 = sqlx::query_scalar(
        "SELECT dingsync.request_approval($1, 'PROC-EMU-EXPENSE', 'emp1',
            '[{\"name\": \"Reason\", \"value\": \"trip\"}, {\"name\": \"Amount\", \"value\": 100}]',
            approvers => $2)",
    )
    .bind(key)
    .bind(approvers)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    eventually(
        Duration::from_secs(15),
        "the approval and its task",
        || async {
            sqlx::query_as(
                "SELECT o.process_instance_id, t.task_id FROM dingsync.outbox o
             JOIN dingsync.approval_tasks t ON t.process_instance_id = o.process_instance_id
             WHERE o.id = $1 AND t.status = 'RUNNING' ORDER BY t.task_id LIMIT 1",
            )
            .bind(id)
            .fetch_optional(&app.pool)
            .await
            .unwrap()
        },
    )
    .await
}

/// `dingsync.request_action` with named arguments as an app writes it.
async fn act(pool: &PgPool, key: &str, action: &str, pid: &str, extra: &str) -> i64 {
    let sql = format!("SELECT dingsync.request_action($1, $2, $3{extra})");
    sqlx::query_scalar(&sql)
        .bind(key)
        .bind(action)
        .bind(pid)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("request_action {action}: {e}"))
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    state: String,
    attempts: i32,
    last_error: Option<String>,
    superseded_by: Option<String>,
    superseded_how: Option<String>,
}

async fn row(pool: &PgPool, id: i64) -> Row {
    sqlx::query_as(
        "SELECT state, attempts, last_error, superseded_by, superseded_how FROM dingsync.actions WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn wait_for_state(pool: &PgPool, id: i64, state: &str) -> Row {
    eventually(
        Duration::from_secs(15),
        &format!("action {id} {state}"),
        || async {
            let r = row(pool, id).await;
            (r.state == state).then_some(r)
        },
    )
    .await
}

async fn approval_status(pool: &PgPool, pid: &str) -> (String, Option<String>) {
    sqlx::query_as("SELECT status, result FROM dingsync.approvals WHERE process_instance_id = $1")
        .bind(pid)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn wait_for_approval(pool: &PgPool, pid: &str, status: &str) -> Option<String> {
    eventually(
        Duration::from_secs(15),
        &format!("approval {pid} {status}"),
        || async {
            let (s, r) = approval_status(pool, pid).await;
            (s == status).then_some(r)
        },
    )
    .await
}

fn instance(emu: &Handle, pid: &str) -> Instance {
    emu.instance(pid).expect("the emulator has the instance")
}

/// Operation records of `kind` in the emulator's instance.
fn records(emu: &Handle, pid: &str, kind: &str) -> usize {
    instance(emu, pid)
        .operation_records
        .iter()
        .filter(|r| r.operation_type == kind)
        .count()
}

#[tokio::test]
async fn an_agree_from_sql_completes_the_task_in_dingtalk_and_the_approval_follows() {
    let app = daemon(|_| {}).await;
    let emu = emulator(&app);
    let (pid, task) = approval(&app, "expense-1", None).await;
    let id = act(
        &app.pool,
        "erp-agree-1",
        "agree",
        &pid,
        &format!(", task_id => {task}, remark => 'ok from the ERP'"),
    )
    .await;
    let done = wait_for_state(&app.pool, id, "done").await;
    assert_eq!((done.attempts, done.last_error), (1, None));
    let inst = instance(&emu, &pid);
    let t = inst.tasks.iter().find(|t| t.taskid == task).unwrap();
    assert_eq!(
        (t.status.as_str(), t.result.as_str(), t.remark.as_deref()),
        ("COMPLETED", "AGREE", Some("ok from the ERP"))
    );
    assert_eq!(emu.calls(dingsync_emulator::EXECUTE), 1);
    // The pushed events carry the approval and its task along, as for any change.
    assert_eq!(
        wait_for_approval(&app.pool, &pid, "COMPLETED").await,
        Some("agree".into())
    );
    let task_row = app.task(task).await;
    assert_eq!(
        (task_row.status.as_str(), task_row.result.as_deref()),
        ("COMPLETED", Some("AGREE"))
    );
    // The same key again is the same action: nothing new is sent.
    let again = act(
        &app.pool,
        "erp-agree-1",
        "agree",
        &pid,
        &format!(", task_id => {task}, remark => 'ok from the ERP'"),
    )
    .await;
    assert_eq!(again, id);
    app.stop().await;
}
