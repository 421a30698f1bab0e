//! What a `processinstance/get` answer (docs/dingtalk.md §2.3) means for our tables: a pure translation of
//! [`ProcessInstance`] into a [`Snapshot`] with UTC times and the words the tables use. The
//! snapshot's types are in `crate::snapshot` (so that `store` needs nothing from `reconcile`);
//! applying it is `store::approvals::apply_snapshot`'s job.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::Value;

use crate::{
    dingtalk::types::ProcessInstance,
    snapshot::{Snapshot, SnapshotTask},
};

/// Why an answer cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unreadable {
    #[error("unknown status {0:?}")]
    Status(String),
    #[error("task id {0:?} is not a number")]
    TaskId(String),
    #[error("unknown task status {0:?}")]
    TaskStatus(String),
}

const STATUSES: [&str; 5] = ["NEW", "RUNNING", "COMPLETED", "TERMINATED", "CANCELED"];
const TASK_STATUSES: [&str; 6] = [
    "NEW",
    "RUNNING",
    "PAUSED",
    "CANCELED",
    "COMPLETED",
    "TERMINATED",
];
const TASK_RESULTS: [&str; 4] = ["AGREE", "REFUSE", "REDIRECTED", "NONE"];

impl Snapshot {
    pub fn from_instance(
        process_instance_id: &str,
        p: &ProcessInstance,
    ) -> Result<Snapshot, Unreadable> {
        if !STATUSES.contains(&p.status.as_str()) {
            return Err(Unreadable::Status(p.status.clone()));
        }
        let result = match (p.status.as_str(), p.result.as_deref()) {
            ("COMPLETED", Some(r @ ("agree" | "refuse"))) => Some(r.to_string()),
            _ => None,
        };
        let mut tasks = Vec::with_capacity(p.tasks.len());
        for t in &p.tasks {
            let task_id = t
                .taskid
                .trim()
                .parse()
                .map_err(|_| Unreadable::TaskId(t.taskid.clone()))?;
            if !TASK_STATUSES.contains(&t.task_status.as_str()) {
                return Err(Unreadable::TaskStatus(t.task_status.clone()));
            }
            let ended = crate::event::is_terminal(&t.task_status);
            let finished_at = t.finish_time.as_deref().and_then(beijing);
            tasks.push(SnapshotTask {
                task_id,
                activity_id: non_empty(&t.activity_id),
                userid: non_empty(&t.userid),
                status: t.task_status.clone(),
                result: if ended {
                    Some(
                        t.task_result
                            .as_deref()
                            .filter(|r| TASK_RESULTS.contains(r))
                            .unwrap_or("NONE")
                            .to_string(),
                    )
                } else {
                    None
                },
                remark: remark_of(&p.operation_records, t.userid.as_deref(), &t.finish_time),
                created_at: t.create_time.as_deref().and_then(beijing),
                finished_at,
            });
        }
        Ok(Snapshot {
            process_instance_id: process_instance_id.to_string(),
            status: p.status.clone(),
            result,
            title: non_empty(&p.title),
            business_id: non_empty(&p.business_id),
            originator_userid: non_empty(&p.originator_userid),
            originator_dept_id: non_empty(&p.originator_dept_id),
            created_at: p.create_time.as_deref().and_then(beijing),
            finished_at: p.finish_time.as_deref().and_then(beijing),
            form_values: Value::Array(p.form_component_values.clone()),
            operation_records: Value::Array(p.operation_records.clone()),
            tasks,
            whole_minutes: p.whole_minutes,
        })
    }
}

/// The remark of the operation record this approver made when the task finished.
fn remark_of(records: &[Value], userid: Option<&str>, finish: &Option<String>) -> Option<String> {
    let (userid, finish) = (userid?, finish.as_deref()?);
    records
        .iter()
        .filter(|r| r["userid"].as_str() == Some(userid) && r["date"].as_str() == Some(finish))
        .filter(|r| {
            r["operation_type"]
                .as_str()
                .is_some_and(|t| t.starts_with("EXECUTE_TASK") || t == "REDIRECT_TASK")
        })
        .find_map(|r| r["remark"].as_str().filter(|s| !s.is_empty()))
        .map(str::to_string)
}

fn non_empty(v: &Option<String>) -> Option<String> {
    v.as_deref().filter(|s| !s.is_empty()).map(str::to_string)
}

/// The old API's times: `"yyyy-MM-dd HH:mm:ss"` in Beijing time, UTC+8 all year (China has no
/// daylight saving), docs/dingtalk.md §2.3. Anything else reads as unknown rather than as a wrong time.
pub fn beijing(text: &str) -> Option<DateTime<Utc>> {
    let local = NaiveDateTime::parse_from_str(text.trim(), "%Y-%m-%d %H:%M:%S").ok()?;
    Some((local - chrono::Duration::hours(8)).and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dingtalk::types::InstanceTask;

    fn instance(status: &str, result: Option<&str>) -> ProcessInstance {
        ProcessInstance {
            title: Some("张三提交的报销".into()),
            create_time: Some("2022-06-19 07:30:12".into()),
            finish_time: Some("2022-06-19 09:01:00".into()),
            originator_userid: Some("manager1".into()),
            originator_dept_id: Some("-1".into()),
            status: status.into(),
            result: result.map(str::to_string),
            business_id: Some("202206190730000123".into()),
            form_component_values: vec![serde_json::json!({"name": "Reason", "value": "trip"})],
            operation_records: vec![serde_json::json!({
                "userid": "u2", "date": "2022-06-19 09:01:00",
                "operation_type": "EXECUTE_TASK_NORMAL", "operation_result": "AGREE", "remark": "ok"})],
            tasks: vec![InstanceTask {
                taskid: "61920249919".into(),
                userid: Some("u2".into()),
                task_status: "COMPLETED".into(),
                task_result: Some("AGREE".into()),
                create_time: Some("2022-06-19 07:30:12".into()),
                finish_time: Some("2022-06-19 09:01:00".into()),
                activity_id: Some("xxxx-xxxx".into()),
            }],
            whole_minutes: false,
        }
    }

    #[test]
    fn beijing_time_strings_become_utc() {
        assert_eq!(
            beijing("2022-06-19 07:30:12").unwrap().to_rfc3339(),
            "2022-06-18T23:30:12+00:00"
        );
        assert_eq!(beijing("2022-06-19T07:30Z"), None);
    }

    #[test]
    fn a_completed_instance_reads_with_utc_times_task_words_and_the_approvers_remark() {
        let s = Snapshot::from_instance("pid", &instance("COMPLETED", Some("agree"))).unwrap();
        assert_eq!(s.status, "COMPLETED");
        assert_eq!(s.result.as_deref(), Some("agree"));
        assert_eq!(
            s.finished_at.unwrap().to_rfc3339(),
            "2022-06-19T01:01:00+00:00"
        );
        let t = &s.tasks[0];
        assert_eq!(t.task_id, 61920249919);
        assert_eq!(t.result.as_deref(), Some("AGREE"));
        assert_eq!(t.remark.as_deref(), Some("ok"));
    }

    #[test]
    fn a_terminated_instance_has_no_result_and_pending_tasks_have_none_yet() {
        let mut p = instance("TERMINATED", Some(""));
        p.tasks[0].task_status = "RUNNING".into();
        p.tasks[0].task_result = Some("NONE".into());
        p.tasks[0].finish_time = None;
        let s = Snapshot::from_instance("pid", &p).unwrap();
        assert_eq!(s.result, None);
        assert_eq!(s.tasks[0].result, None);
        assert_eq!(s.tasks[0].remark, None);
    }

    #[test]
    fn unknown_statuses_and_task_ids_are_refused() {
        assert_eq!(
            Snapshot::from_instance("pid", &instance("DONE", None)),
            Err(Unreadable::Status("DONE".into()))
        );
        let mut p = instance("RUNNING", None);
        p.tasks[0].taskid = "abc".into();
        assert_eq!(
            Snapshot::from_instance("pid", &p),
            Err(Unreadable::TaskId("abc".into()))
        );
    }
}
