//! Does the database mirror DingTalk? Compares `dingsync.approvals` and `dingsync.approval_tasks`
//! with the emulator's instances, field by field (times to the second: DingTalk's detail API
//! reports "yyyy-MM-dd HH:mm" / ms values that round differently; to the minute in a v1 run,
//! whose detail API gives no seconds, docs/dingtalk.md §11.3).

use std::collections::HashMap;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use dingsync_emulator::Instance;
use sqlx::PgPool;

type ApprovalRow = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<serde_json::Value>,
    Option<String>,
);
type TaskRow = (
    i64,
    String,
    Option<String>,
    Option<String>,
    Option<DateTime<Utc>>,
    Option<String>,
);

#[derive(sqlx::FromRow)]
struct StoredApproval {
    process_instance_id: String,
    status: String,
    result: Option<String>,
    title: Option<String>,
    business_id: Option<String>,
    originator_userid: Option<String>,
    originator_dept_id: Option<String>,
    created_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    form_values: Option<serde_json::Value>,
    process_code: Option<String>,
}

/// A task row with its instance id, as selected.
type StoredTask = (
    String,
    i64,
    String,
    Option<String>,
    Option<String>,
    Option<DateTime<Utc>>,
    Option<String>,
);

fn second(t: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    let precision = match super::api_family() {
        dingsync::config::ApiFamily::Legacy => TimeDelta::seconds(1),
        dingsync::config::ApiFamily::V1 => TimeDelta::minutes(1),
    };
    t.map(|t| t.duration_trunc(precision).unwrap())
}

/// What the approval row of `i` must hold.
fn approval_of(i: &Instance) -> ApprovalRow {
    (
        i.status.as_str().into(),
        i.result.map(str::to_string),
        Some(i.title.clone()),
        Some(i.business_id.clone()),
        Some(i.originator_userid.clone()),
        Some(i.originator_dept_id.to_string()),
        second(Some(i.create_time)),
        second(i.finish_time),
        Some(serde_json::to_value(&i.form_component_values).unwrap()),
        Some(i.process_code.clone()),
    )
}

/// What the task rows of `i` must hold, by task id.
fn tasks_of(i: &Instance) -> Vec<TaskRow> {
    let mut tasks: Vec<TaskRow> = i
        .tasks
        .iter()
        .map(|t| {
            let ended = t.finish_time.is_some();
            (
                t.taskid,
                t.status.as_str().into(),
                ended.then(|| t.result.as_str().into()),
                Some(t.userid.clone()),
                second(t.finish_time),
                t.remark.clone(),
            )
        })
        .collect();
    tasks.sort_by_key(|t| t.0);
    tasks
}

/// The first few instances whose rows differ from the emulator, described; empty when the
/// database mirrors every one of `instances`.
pub async fn differences(pool: &PgPool, corp_id: &str, instances: &[Instance]) -> Vec<String> {
    let approvals: Vec<StoredApproval> = sqlx::query_as(
        "SELECT process_instance_id, status, result, title, business_id, originator_userid,
                originator_dept_id, created_at, finished_at, form_values, process_code
         FROM dingsync.approvals WHERE corp_id = $1",
    )
    .bind(corp_id)
    .fetch_all(pool)
    .await
    .unwrap();
    let approvals: HashMap<String, ApprovalRow> = approvals
        .into_iter()
        .map(|a| {
            let row = (
                a.status,
                a.result,
                a.title,
                a.business_id,
                a.originator_userid,
                a.originator_dept_id,
                second(a.created_at),
                second(a.finished_at),
                a.form_values,
                a.process_code,
            );
            (a.process_instance_id, row)
        })
        .collect();
    let mut tasks: HashMap<String, Vec<TaskRow>> = HashMap::new();
    let rows: Vec<StoredTask> = sqlx::query_as(
        "SELECT process_instance_id, task_id, status, result, userid, finished_at, remark
             FROM dingsync.approval_tasks WHERE corp_id = $1 ORDER BY task_id",
    )
    .bind(corp_id)
    .fetch_all(pool)
    .await
    .unwrap();
    for (pid, id, status, result, userid, finished, remark) in rows {
        let row = (id, status, result, userid, second(finished), remark);
        tasks.entry(pid).or_default().push(row);
    }
    let mut found = Vec::new();
    for i in instances {
        let id = &i.process_instance_id;
        match approvals.get(id) {
            None => found.push(format!("approval {id} is missing")),
            Some(got) if *got != approval_of(i) => found.push(format!(
                "approval {id}: database {got:?}, DingTalk {:?}",
                approval_of(i)
            )),
            Some(_) => {
                let got = tasks.remove(id).unwrap_or_default();
                let want = tasks_of(i);
                if got != want {
                    found.push(format!(
                        "tasks of {id}: database {got:?}, DingTalk {want:?}"
                    ));
                }
            }
        }
        if found.len() >= 5 {
            break;
        }
    }
    found
}

/// Asserts that every one of `instances` has an approval row equal to it, with all its tasks.
pub async fn assert_rows_equal_the_emulator(pool: &PgPool, corp_id: &str, instances: &[Instance]) {
    let found = differences(pool, corp_id, instances).await;
    assert!(found.is_empty(), "{}", found.join("\n"));
}
