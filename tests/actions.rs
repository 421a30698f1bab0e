//! Actions on approvals from SQL (`dingsync.actions`): each carried out in DingTalk exactly once,
//! against the emulator over real HTTP and a fresh PostgreSQL database per test.

mod common;

use std::time::Duration;

use common::*;
use dingsync::{
    cli::actions as manage,
    config::{ApiFamily, Config},
};
use dingsync_emulator::{Handle, InjectedError, Instance, TaskAction};
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

/// Waits until DingTalk lets `pid` be terminated: its 15 s after the submission are over (0.15 s
/// at the tests' time scale).
async fn past_terminate_guard(emu: &Handle, pid: &str) {
    eventually(
        Duration::from_secs(5),
        "15 s (scaled) after the submission",
        || async {
            let age = chrono::Utc::now() - instance(emu, pid).create_time;
            (age > chrono::TimeDelta::milliseconds(300)).then_some(())
        },
    )
    .await;
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

#[tokio::test]
async fn refuse_redirect_terminate_and_comment_each_take_effect_once() {
    let app = daemon(|_| {}).await;
    let emu = emulator(&app);

    // refuse: the approval ends COMPLETED/refuse.
    let (pid, task) = approval(&app, "expense-refuse", None).await;
    let id = act(
        &app.pool,
        "erp-refuse",
        "refuse",
        &pid,
        &format!(", task_id => {task}"),
    )
    .await;
    wait_for_state(&app.pool, id, "done").await;
    assert_eq!(
        wait_for_approval(&app.pool, &pid, "COMPLETED").await,
        Some("refuse".into())
    );

    // redirect: the task goes to boss1, who then holds a running task of the approval.
    let (pid, task) = approval(&app, "expense-redirect", None).await;
    let id = act(
        &app.pool,
        "erp-redirect",
        "redirect",
        &pid,
        &format!(", task_id => {task}, to_user_id => 'boss1', remark => 'on leave'"),
    )
    .await;
    wait_for_state(&app.pool, id, "done").await;
    let inst = instance(&emu, &pid);
    assert_eq!(inst.tasks[0].result.as_str(), "REDIRECTED");
    assert_eq!(
        inst.tasks
            .iter()
            .filter(|t| t.userid == "boss1" && t.status.as_str() == "RUNNING")
            .count(),
        1
    );
    assert_eq!(records(&emu, &pid, "REDIRECT_TASK"), 1);
    let new_task = inst
        .tasks
        .iter()
        .find(|t| t.userid == "boss1")
        .unwrap()
        .taskid;
    eventually(
        Duration::from_secs(15),
        "the new task in dingsync",
        || async {
            sqlx::query_scalar::<_, String>(
            "SELECT userid FROM dingsync.approval_tasks WHERE task_id = $1 AND status = 'RUNNING'",
        )
        .bind(new_task)
        .fetch_optional(&app.pool)
        .await
        .unwrap()
        },
    )
    .await;

    // terminate by the originator, and a comment: on two approvals. The first terminate comes
    // too soon after the submission: DingTalk refuses it, dingsync waits the 15 s out.
    let (pid, _) = approval(&app, "expense-terminate", None).await;
    let id = act(
        &app.pool,
        "erp-terminate",
        "terminate",
        &pid,
        ", actor_user_id => 'emp1', remark => 'order cancelled'",
    )
    .await;
    wait_for_state(&app.pool, id, "done").await;
    assert_eq!(wait_for_approval(&app.pool, &pid, "TERMINATED").await, None);
    assert_eq!(records(&emu, &pid, "TERMINATE_PROCESS_INSTANCE"), 1);

    let (pid, _) = approval(&app, "expense-system", None).await;
    past_terminate_guard(&emu, &pid).await;
    let id = act(
        &app.pool,
        "erp-system",
        "terminate",
        &pid,
        ", as_system => true",
    )
    .await;
    wait_for_state(&app.pool, id, "done").await;
    wait_for_approval(&app.pool, &pid, "TERMINATED").await;

    let (pid, _) = approval(&app, "expense-comment", None).await;
    let id = act(
        &app.pool,
        "erp-comment",
        "comment",
        &pid,
        ", actor_user_id => 'fin1', remark => 'paid on 2026-12-01'",
    )
    .await;
    wait_for_state(&app.pool, id, "done").await;
    let comments: Vec<_> = instance(&emu, &pid)
        .operation_records
        .into_iter()
        .filter(|r| r.operation_type == "ADD_REMARK")
        .collect();
    assert_eq!(comments.len(), 1);
    assert_eq!(
        (comments[0].userid.as_str(), comments[0].remark.as_deref()),
        ("fin1", Some("paid on 2026-12-01"))
    );
    for endpoint in [
        dingsync_emulator::EXECUTE,
        dingsync_emulator::REDIRECT,
        dingsync_emulator::COMMENTS,
    ] {
        assert_eq!(emu.calls(endpoint), 1, "{endpoint}");
    }
    // The early one twice (refused, then carried out), the system's once.
    assert_eq!(emu.calls(dingsync_emulator::TERMINATE), 3);
    // Every call was metered as an action: six sends, and for the early terminate the read-back
    // of its refusal, the read-back before its retry and the retry.
    eventually(
        Duration::from_secs(5),
        "the ledger's action calls",
        || async {
            let n: Option<i64> = sqlx::query_scalar(
                "SELECT sum(count)::bigint FROM dingsync.usage WHERE purpose = 'action'",
            )
            .fetch_one(&app.pool)
            .await
            .unwrap();
            (n == Some(8)).then_some(())
        },
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_lost_answer_on_every_action_kind_is_read_back_and_takes_effect_exactly_once() {
    lost_answers(ApiFamily::Legacy).await;
}

#[tokio::test]
async fn with_the_v1_family_a_lost_answer_on_every_action_kind_takes_effect_exactly_once() {
    lost_answers(ApiFamily::V1).await;
}

/// Every action kind with its answer lost, the approvals created and read back in `family`.
async fn lost_answers(family: ApiFamily) {
    let app = daemon(|c| c.dingtalk.api_family = family).await;
    let emu = emulator(&app);
    emu.update_faults(|f| {
        for endpoint in [
            dingsync_emulator::EXECUTE,
            dingsync_emulator::TERMINATE,
            dingsync_emulator::COMMENTS,
            dingsync_emulator::REDIRECT,
        ] {
            // Two of each: agree and refuse share the execute endpoint.
            f.lose_response.insert(endpoint.to_string(), 2);
        }
    });
    let cases = [
        ("agree", "EXECUTE_TASK_NORMAL"),
        ("refuse", "EXECUTE_TASK_NORMAL"),
        ("redirect", "REDIRECT_TASK"),
        ("terminate", "TERMINATE_PROCESS_INSTANCE"),
        ("comment", "ADD_REMARK"),
    ];
    let mut rows = Vec::new();
    for (action, record) in cases {
        let (pid, task) = approval(&app, &format!("expense-lost-{action}"), None).await;
        if action == "terminate" {
            past_terminate_guard(&emu, &pid).await;
        }
        let extra = match action {
            "agree" | "refuse" => format!(", task_id => {task}"),
            "redirect" => format!(", task_id => {task}, to_user_id => 'boss1'"),
            "terminate" => ", actor_user_id => 'emp1'".to_string(),
            _ => ", actor_user_id => 'fin1', remark => 'seen'".to_string(),
        };
        let id = act(&app.pool, &format!("lost-{action}"), action, &pid, &extra).await;
        rows.push((id, pid, action, record));
    }
    for (id, pid, action, record) in &rows {
        let done = wait_for_state(&app.pool, *id, "done").await;
        assert_eq!(done.attempts, 1, "{action}: sent once, never resent");
        assert_eq!(records(&emu, pid, record), 1, "{action}: one effect");
    }
    // One send each (agree and refuse: two on execute), and a read-back of each.
    assert_eq!(emu.calls(dingsync_emulator::EXECUTE), 2);
    for endpoint in [
        dingsync_emulator::TERMINATE,
        dingsync_emulator::COMMENTS,
        dingsync_emulator::REDIRECT,
    ] {
        assert_eq!(emu.calls(endpoint), 1, "{endpoint}");
    }
    let snapshots: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dingsync.approvals WHERE snapshot_source = 'action'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(snapshots >= 1, "the read-backs' snapshots are stored");
    app.stop().await;
}

#[tokio::test]
async fn two_equal_comments_after_lost_answers_are_two_comments_not_one_and_not_four() {
    let app = daemon(|_| {}).await;
    let emu = emulator(&app);
    let (pid, _) = approval(&app, "expense-twice", None).await;
    emu.update_faults(|f| {
        f.lose_response
            .insert(dingsync_emulator::COMMENTS.to_string(), 2);
    });
    let extra = ", actor_user_id => 'fin1', remark => 'paid'";
    let a = act(&app.pool, "comment-a", "comment", &pid, extra).await;
    let b = act(&app.pool, "comment-b", "comment", &pid, extra).await;
    wait_for_state(&app.pool, a, "done").await;
    wait_for_state(&app.pool, b, "done").await;
    assert_eq!(records(&emu, &pid, "ADD_REMARK"), 2);
    assert_eq!(emu.calls(dingsync_emulator::COMMENTS), 2);
    app.stop().await;
}

#[tokio::test]
async fn a_task_already_acted_on_in_dingtalk_ends_superseded_naming_who_not_failed_and_not_doubled()
{
    let app = daemon(|c| {
        c.dingtalk.timeout_ms = 3_000;
        c.outbox.lease_ms = 6_000;
    })
    .await;
    let emu = emulator(&app);
    let (pid, task) = approval(&app, "expense-race", None).await;
    // The execute waits at DingTalk's gateway while the approver agrees in the app.
    emu.update_faults(|f| f.latency_ms = 500);
    let id = act(
        &app.pool,
        "erp-refuse-late",
        "refuse",
        &pid,
        &format!(", task_id => {task}"),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the execute at DingTalk",
        || async { (emu.calls(dingsync_emulator::EXECUTE) == 1).then_some(()) },
    )
    .await;
    emu.agree(
        task,
        TaskAction {
            remark: Some("in the app".into()),
            ..TaskAction::default()
        },
    )
    .unwrap();
    let r = wait_for_state(&app.pool, id, "superseded").await;
    assert_eq!(
        (r.superseded_by.as_deref(), r.superseded_how.as_deref()),
        (Some("manager1"), Some("AGREE"))
    );
    assert!(
        r.last_error.unwrap().contains("acted in DingTalk first"),
        "the reason says so"
    );
    emu.reset_faults();
    // One decision only: the app's agree; the approval completed agreed.
    assert_eq!(records(&emu, &pid, "EXECUTE_TASK_NORMAL"), 1);
    assert_eq!(
        wait_for_approval(&app.pool, &pid, "COMPLETED").await,
        Some("agree".into())
    );
    app.stop().await;
}

#[tokio::test]
async fn a_terminated_approval_refuses_further_actions_cleanly() {
    let app = daemon(|_| {}).await;
    let emu = emulator(&app);
    let (pid, task) = approval(&app, "expense-withdrawn", None).await;

    // Terminated in DingTalk after the action was asked for: superseded, naming the withdrawal.
    emu.inject(dingsync_emulator::EXECUTE, InjectedError::RateLimit, 1);
    let id = act(
        &app.pool,
        "erp-agree-late",
        "agree",
        &pid,
        &format!(", task_id => {task}"),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the first send rate limited",
        || async {
            let r = row(&app.pool, id).await;
            (r.state == "pending" && r.attempts == 1).then_some(())
        },
    )
    .await;
    emu.terminate(&pid, None, Some("withdrawn".into())).unwrap();
    let r = wait_for_state(&app.pool, id, "superseded").await;
    assert_eq!(
        (r.superseded_by.as_deref(), r.superseded_how.as_deref()),
        (Some("emp1"), Some("TERMINATED"))
    );
    assert_eq!(records(&emu, &pid, "EXECUTE_TASK_NORMAL"), 0);

    // Known terminated to dingsync: the insert itself is refused, naming the state.
    wait_for_approval(&app.pool, &pid, "TERMINATED").await;
    for (action, extra) in [
        ("terminate", ", actor_user_id => 'emp1'".to_string()),
        (
            "comment",
            ", actor_user_id => 'fin1', remark => 'x'".to_string(),
        ),
    ] {
        let sql =
            format!("SELECT dingsync.request_action('after-{action}', '{action}', $1{extra})");
        let err = sqlx::query_scalar::<_, i64>(&sql)
            .bind(&pid)
            .fetch_one(&app.pool)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("TERMINATED"), "{action}: {err}");
    }
    let err = sqlx::query_scalar::<_, i64>(
        "SELECT dingsync.request_action('after-agree', 'agree', $1, task_id => $2)",
    )
    .bind(&pid)
    .bind(task)
    .fetch_one(&app.pool)
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(&format!("task_id {task} is already CANCELED")),
        "{err}"
    );
    // The same key as the superseded action still returns its row.
    assert_eq!(
        act(
            &app.pool,
            "erp-agree-late",
            "agree",
            &pid,
            &format!(", task_id => {task}")
        )
        .await,
        id
    );
    app.stop().await;
}

#[tokio::test]
async fn rate_limits_and_a_revoked_token_are_retried_after_a_read_back_and_act_once() {
    let app = daemon(|_| {}).await;
    let emu = emulator(&app);
    let (pid, task) = approval(&app, "expense-limited", None).await;
    emu.inject(dingsync_emulator::EXECUTE, InjectedError::RateLimit, 1);
    let id = act(
        &app.pool,
        "erp-limited",
        "agree",
        &pid,
        &format!(", task_id => {task}"),
    )
    .await;
    let r = wait_for_state(&app.pool, id, "done").await;
    assert_eq!(r.attempts, 2);
    assert_eq!(emu.calls(dingsync_emulator::EXECUTE), 2);
    assert_eq!(records(&emu, &pid, "EXECUTE_TASK_NORMAL"), 1);

    // A revoked token: refreshed once inside the client, the action sent once more, done.
    let (pid, task) = approval(&app, "expense-token", None).await;
    emu.revoke_token();
    let id = act(
        &app.pool,
        "erp-token",
        "agree",
        &pid,
        &format!(", task_id => {task}"),
    )
    .await;
    let r = wait_for_state(&app.pool, id, "done").await;
    assert_eq!(r.attempts, 1);
    assert_eq!(records(&emu, &pid, "EXECUTE_TASK_NORMAL"), 1);
    app.stop().await;
}

#[tokio::test]
async fn the_monthly_allowance_keeps_an_action_pending_uncounted_and_resume_carries_it_out() {
    let app = daemon(|_| {}).await;
    let emu = emulator(&app);
    let (pid, task) = approval(&app, "expense-paused", None).await;
    emu.inject(
        dingsync_emulator::EXECUTE,
        InjectedError::Custom {
            errcode: 90020,
            sub_code: None,
            errmsg: "您的企业本月api调用量已超过限制".into(),
        },
        1,
    );
    let id = act(
        &app.pool,
        "erp-paused",
        "agree",
        &pid,
        &format!(", task_id => {task}"),
    )
    .await;
    let paused = eventually(Duration::from_secs(15), "the action paused", || async {
        let r = row(&app.pool, id).await;
        (r.state == "pending" && r.last_error.is_some()).then_some(r)
    })
    .await;
    assert_eq!(paused.attempts, 0, "a paused action is no attempt");
    let why = paused.last_error.unwrap();
    assert!(
        why.starts_with(dingsync::store::outbox::PAUSED) && why.contains("ApiCountLimitForOrg"),
        "{why}"
    );
    let said = dingsync::cli::quota::resume(
        &app.pool,
        CORP_ID_OF_EMULATOR,
        dingsync::dingtalk::quota::Allowances::from_config(
            &dingsync::config::Config::default().dingtalk,
        ),
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    assert!(said.contains("1 actions"), "{said}");
    let r = wait_for_state(&app.pool, id, "done").await;
    assert_eq!(r.attempts, 1);
    assert_eq!(records(&emu, &pid, "EXECUTE_TASK_NORMAL"), 1);
    app.stop().await;
}

/// The embedded emulator's organisation.
const CORP_ID_OF_EMULATOR: &str = dingsync::app::EMULATOR_CORP_ID;

#[tokio::test]
async fn a_refusal_of_dingtalk_fails_the_action_with_its_reason_and_retry_carries_it_out_later() {
    let app = daemon(|_| {}).await;
    let emu = emulator(&app);
    let (pid, task) = approval(&app, "expense-newcomer", None).await;
    // A new colleague DingTalk does not know yet.
    let id = act(
        &app.pool,
        "erp-to-newcomer",
        "redirect",
        &pid,
        &format!(", task_id => {task}, to_user_id => 'newcomer1'"),
    )
    .await;
    let failed = wait_for_state(&app.pool, id, "failed").await;
    let why = failed.last_error.unwrap();
    assert!(
        why.contains("param.illegal") && why.contains("toUserId"),
        "{why}"
    );
    let listed = manage::list(&app.pool, Some("failed"), 10).await.unwrap();
    assert!(
        listed.contains("erp-to-newcomer") && listed.contains("(1 rows)"),
        "{listed}"
    );
    assert!(manage::cancel(&app.pool, id).await.is_ok());
    emu.add_person(dingsync_emulator::Person {
        userid: "newcomer1".into(),
        name: "新人".into(),
        dept_ids: vec![100],
    })
    .unwrap();
    let said = manage::retry(&app.pool, id).await.unwrap();
    assert!(said.contains("pending again"), "{said}");
    wait_for_state(&app.pool, id, "done").await;
    assert_eq!(records(&emu, &pid, "REDIRECT_TASK"), 1);
    let err = manage::retry(&app.pool, id).await.unwrap_err().to_string();
    assert!(err.contains("is done"), "{err}");
    app.stop().await;
}

#[tokio::test]
async fn a_terminate_the_template_does_not_allow_fails_with_dingtalks_reason_after_one_send() {
    let app = daemon(|_| {}).await;
    let emu = emulator(&app);
    let (pid, _task) = approval(&app, "expense-locked", None).await;
    // The administrator has not ticked "allow revoking a form in progress" for this template.
    let mut template = emu
        .templates()
        .into_iter()
        .find(|t| t.process_code == "PROC-EMU-EXPENSE")
        .unwrap();
    template.allow_revoke = false;
    emu.add_template(template).unwrap();
    past_terminate_guard(&emu, &pid).await;
    let id = act(
        &app.pool,
        "erp-withdraw-locked",
        "terminate",
        &pid,
        ", actor_user_id => 'emp1'",
    )
    .await;
    let failed = wait_for_state(&app.pool, id, "failed").await;
    let why = failed.last_error.unwrap();
    assert!(
        why.contains("internalError") && why.contains("权限"),
        "{why}"
    );
    // A refusal, not a lost answer: sent once, never again after a read-back.
    assert_eq!(failed.attempts, 1);
    assert_eq!(emu.calls(dingsync_emulator::TERMINATE), 1);
    assert_eq!(instance(&emu, &pid).status.as_str(), "RUNNING");
    app.stop().await;
}

#[tokio::test]
async fn a_malformed_or_impossible_action_is_refused_by_the_insert_naming_the_field() {
    let app = daemon(|_| {}).await;
    let (pid, task) = approval(&app, "expense-checks", None).await;
    let cases = [
        ("'agree', $1", "task_id is required"),
        ("'approve', $1", "action must be agree"),
        (
            "'agree', 'no-such-instance', task_id => 1",
            "not known to dingsync",
        ),
        ("'agree', $1, task_id => 42", "task_id 42 is not known"),
        (
            "'agree', $1, task_id => $2, actor_user_id => 'emp2'",
            "not the approver",
        ),
        ("'terminate', $1", "actor_user_id is required for terminate"),
        (
            "'terminate', $1, actor_user_id => 'emp2'",
            "not the originator",
        ),
        (
            "'comment', $1, actor_user_id => 'fin1'",
            "remark is required for comment",
        ),
        (
            "'comment', $1, remark => 'x'",
            "actor_user_id is required for comment",
        ),
        ("'redirect', $1, task_id => $2", "to_user_id is required"),
        (
            "'redirect', $1, task_id => $2, to_user_id => 'manager1'",
            "already the approver",
        ),
        (
            "'agree', $1, task_id => $2, remark => repeat('x', 1025)",
            "at most 1024",
        ),
        (
            "'comment', $1, as_system => true, remark => 'x'",
            "as_system is only for terminate",
        ),
    ];
    for (i, (args, expected)) in cases.into_iter().enumerate() {
        let sql = format!("SELECT dingsync.request_action('bad-{i}', {args})");
        let err = sqlx::query_scalar::<_, i64>(&sql)
            .bind(&pid)
            .bind(task)
            .fetch_one(&app.pool)
            .await
            .expect_err(args)
            .to_string();
        assert!(err.contains(expected), "{args}: {err}");
    }
    // The same key for another action is refused, not silently answered with the old row.
    act(
        &app.pool,
        "once",
        "comment",
        &pid,
        ", actor_user_id => 'fin1', remark => 'a'",
    )
    .await;
    let err = sqlx::query_scalar::<_, i64>(
        "SELECT dingsync.request_action('once', 'comment', $1, actor_user_id => 'fin1', remark => 'b')",
    )
    .bind(&pid)
    .fetch_one(&app.pool)
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("already used for a different action"), "{err}");
    app.stop().await;
}

#[tokio::test]
async fn an_app_listening_on_dingsync_action_done_hears_the_row_id_and_reports_show_the_actions() {
    let app = daemon(|_| {}).await;
    let (pid, task) = approval(&app, "expense-listen", None).await;
    let mut listener = sqlx::postgres::PgListener::connect(&app.db.url)
        .await
        .unwrap();
    listener.listen("dingsync_action_done").await.unwrap();
    let id = act(
        &app.pool,
        "erp-listen",
        "agree",
        &pid,
        &format!(", task_id => {task}"),
    )
    .await;
    let heard = tokio::time::timeout(Duration::from_secs(15), listener.recv())
        .await
        .expect("a notification within 15 s")
        .unwrap();
    assert_eq!(heard.payload(), id.to_string());
    let (state, rows): (String, i64) = sqlx::query_as(
        "SELECT state, row_count FROM dingsync.report_actions WHERE action = 'agree'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), rows), ("done", 1));
    app.stop().await;
}

/// The client alone against a standalone emulator: DingTalk's codes for each action.
async fn client_and_emulator() -> (
    dingsync_emulator::Emulator,
    dingsync::dingtalk::Client,
    TestDb,
) {
    let emu = standalone_emulator(7).await;
    let db = TestDb::new();
    let mut config = config_against(&emu, &db);
    config.dingtalk.qps = 0;
    config.dingtalk.max_attempts = 1;
    let pool = dingsync::store::connect_and_migrate(&config.database)
        .await
        .unwrap();
    let client = dingsync::dingtalk::Client::new(pool, &config.dingtalk, &emu.base_url()).unwrap();
    (emu, client, db)
}

fn code(e: dingsync::dingtalk::Error) -> String {
    e.v1_code()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{e}"))
}

#[tokio::test]
async fn the_emulator_answers_each_action_with_dingtalks_codes_and_acts_like_the_app() {
    use dingsync::dingtalk::actions::ActionRequest;
    let (emu, client, _db) = client_and_emulator().await;
    let state = emu.state();
    let inst = state
        .start_instance(dingsync_emulator::StartInstance {
            process_code: "PROC-EMU-EXPENSE".into(),
            originator_userid: "emp1".into(),
            approvers: Some(vec!["manager1".into(), "fin1".into()]),
            ..Default::default()
        })
        .unwrap();
    let pid = inst.process_instance_id.clone();
    let task = inst.tasks[0].taskid;
    let execute = |user: &str, agree: bool| ActionRequest::Execute {
        process_instance_id: pid.clone(),
        task_id: task,
        actioner_user_id: user.into(),
        agree,
        remark: None,
    };
    // Not the approver; then the approver; then the same task again.
    assert_eq!(
        code(client.act(&execute("emp2", true)).await.unwrap_err()),
        "needAuth"
    );
    client.act(&execute("manager1", true)).await.unwrap();
    assert_eq!(
        code(client.act(&execute("manager1", false)).await.unwrap_err()),
        "aflowProcessInstCanNotBeExecuted"
    );
    let after = state.instance(&pid).unwrap();
    assert_eq!(after.tasks.len(), 2, "the next node opened for fin1");
    let next = after.tasks[1].taskid;

    // Redirect: only the current handler, only a running task; the answer has no `success`.
    let redirect = |from: &str, task_id: i64| ActionRequest::Redirect {
        task_id,
        operate_user_id: from.into(),
        to_user_id: "boss1".into(),
        remark: None,
    };
    assert_eq!(
        code(client.act(&redirect("manager1", next)).await.unwrap_err()),
        "param.illegal.operator"
    );
    assert_eq!(
        code(client.act(&redirect("manager1", task)).await.unwrap_err()),
        "task.status.error"
    );
    client.act(&redirect("fin1", next)).await.unwrap();

    // Comments append; terminate only by the originator, once.
    let comment = ActionRequest::Comment {
        process_instance_id: pid.clone(),
        comment_user_id: "hr1".into(),
        text: "noted".into(),
    };
    client.act(&comment).await.unwrap();
    client.act(&comment).await.unwrap();
    let terminate = |user: Option<&str>| ActionRequest::Terminate {
        process_instance_id: pid.clone(),
        operating_user_id: user.map(str::to_string),
        remark: None,
    };
    assert_eq!(
        code(client.act(&terminate(Some("emp2"))).await.unwrap_err()),
        "needAuth"
    );
    past_terminate_guard(state, &pid).await;
    client.act(&terminate(Some("emp1"))).await.unwrap();
    assert_eq!(
        code(client.act(&terminate(None)).await.unwrap_err()),
        "aflowProcessInstStatusException"
    );
    assert_eq!(
        code(client.act(&comment).await.unwrap_err()),
        "aflowProcessInstCanNotBeExecuted"
    );
    let done = state.instance(&pid).unwrap();
    let kinds: Vec<&str> = done
        .operation_records
        .iter()
        .map(|r| r.operation_type)
        .collect();
    assert_eq!(
        kinds,
        [
            "START_PROCESS_INSTANCE",
            "EXECUTE_TASK_NORMAL",
            "REDIRECT_TASK",
            "ADD_REMARK",
            "ADD_REMARK",
            "TERMINATE_PROCESS_INSTANCE"
        ]
    );
    assert_eq!(done.status.as_str(), "TERMINATED");

    // A fresh approval cannot be withdrawn within 15 s (scaled) of its submission.
    let fresh = state
        .start_instance(dingsync_emulator::StartInstance {
            process_code: "PROC-EMU-EXPENSE".into(),
            originator_userid: "emp1".into(),
            ..Default::default()
        })
        .unwrap();
    let early = client
        .act(&ActionRequest::Terminate {
            process_instance_id: fresh.process_instance_id,
            operating_user_id: None,
            remark: None,
        })
        .await
        .unwrap_err();
    assert!(
        early.to_string().contains(dingsync_emulator::TOO_SOON),
        "{early}"
    );
    emu.stop().await;
}
