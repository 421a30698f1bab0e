//! What an approval read back from DingTalk says about an action: carried out, not carried out,
//! or overtaken by someone who acted first (docs/dingtalk.md §12.6). Pure: the worker fetches,
//! this module judges.
//!
//! `refused`: DingTalk answered this very send with a refusal, so the action certainly did not
//! take effect by us; what the approval shows was done by someone else, even when it looks like
//! what we asked (the approver agreed in the app just before). Without it (a lost answer), an
//! approval that shows exactly the asked-for change counts as ours: the app's intent has come
//! true once, which is all exactly-once can promise when DingTalk keeps no request ids.
//!
//! Owns: the reading. Does not own: comments' counting (`store::actions::record_comment_found`:
//! it needs the database), fetching, recording.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::{
    snapshot::{Snapshot, SnapshotTask},
    store::actions::ActionRow,
};

/// What the read-back says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The action has taken effect.
    Done,
    /// It has not, and could still: send it.
    NotDone,
    /// Someone acted first; the action can no longer be carried out.
    Superseded(Overtaken),
}

/// Who acted first (when DingTalk says), how, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overtaken {
    pub by: Option<String>,
    pub how: String,
    pub at: Option<DateTime<Utc>>,
}

impl Overtaken {
    /// The sentence for `last_error`.
    pub fn describe(&self) -> String {
        let by = self
            .by
            .as_deref()
            .map(|b| format!(" by {b}"))
            .unwrap_or_default();
        let at = self
            .at
            .map(|t| format!(" at {}", t.format("%Y-%m-%d %H:%M:%S UTC")))
            .unwrap_or_default();
        format!("someone acted in DingTalk first: {}{by}{at}", self.how)
    }
}

/// Judges `row` (agree, refuse, redirect, terminate) against `snap`. Comments are judged by
/// [`comment_dates`] and the store; for them this only tells whether the approval still takes
/// comments.
pub fn judge(row: &ActionRow, snap: &Snapshot, refused: bool) -> Verdict {
    match row.action.as_str() {
        "agree" | "refuse" | "redirect" => judge_task(row, snap, refused),
        "terminate" => judge_terminate(row, snap, refused),
        _ => {
            if matches!(snap.status.as_str(), "TERMINATED" | "CANCELED") {
                Verdict::Superseded(ended(snap))
            } else {
                Verdict::NotDone
            }
        }
    }
}

fn judge_task(row: &ActionRow, snap: &Snapshot, refused: bool) -> Verdict {
    let Some(task) = row
        .task_id
        .and_then(|id| snap.tasks.iter().find(|t| t.task_id == id))
    else {
        // DingTalk does not list the task: sending is the only way to hear its reason.
        return if snap.status == "RUNNING" {
            Verdict::NotDone
        } else {
            Verdict::Superseded(ended(snap))
        };
    };
    if task.status == "RUNNING" || task.status == "NEW" || task.status == "PAUSED" {
        return if snap.status == "RUNNING" {
            Verdict::NotDone
        } else {
            Verdict::Superseded(ended(snap))
        };
    }
    let actor = row.actor_user_id.as_deref();
    let result = task.result.as_deref().unwrap_or("NONE");
    let ours = task.status == "COMPLETED"
        && task.userid.as_deref() == actor
        && match row.action.as_str() {
            "agree" => result == "AGREE",
            "refuse" => result == "REFUSE",
            // The old task REDIRECTED, and a task of the new approver opened at its end.
            _ => {
                result == "REDIRECTED"
                    && snap.tasks.iter().any(|t| {
                        t.userid.as_deref() == row.to_user_id.as_deref()
                            && t.task_id != task.task_id
                            && t.created_at
                                .zip(task.finished_at)
                                .is_none_or(|(c, f)| c >= f)
                    })
            }
        };
    if ours && !refused {
        return Verdict::Done;
    }
    Verdict::Superseded(task_end(task, snap))
}

fn judge_terminate(row: &ActionRow, snap: &Snapshot, refused: bool) -> Verdict {
    match snap.status.as_str() {
        "RUNNING" | "NEW" => Verdict::NotDone,
        "TERMINATED" if !refused => {
            let (by, _) = record(snap, "TERMINATE_PROCESS_INSTANCE");
            // As the system: whoever the record names, it is withdrawn as asked. By a person:
            // their withdrawal (or one whose record names nobody).
            if row.as_system || by.is_none() || by.as_deref() == row.actor_user_id.as_deref() {
                Verdict::Done
            } else {
                Verdict::Superseded(ended(snap))
            }
        }
        _ => Verdict::Superseded(ended(snap)),
    }
}

/// How a task that is no longer open ended: by its approver (AGREE, REFUSE, REDIRECTED), or
/// cancelled by the flow: by another approver of its node deciding, or the approval ending.
fn task_end(task: &SnapshotTask, snap: &Snapshot) -> Overtaken {
    if task.status == "COMPLETED" {
        return Overtaken {
            by: task.userid.clone(),
            how: task.result.clone().unwrap_or_else(|| "NONE".into()),
            at: task.finished_at,
        };
    }
    if snap.status != "RUNNING" {
        return ended(snap);
    }
    // Cancelled while the approval runs on: another approver of the same node decided.
    let decider = snap.tasks.iter().find(|t| {
        t.task_id != task.task_id
            && t.status == "COMPLETED"
            && t.activity_id.is_some()
            && t.activity_id == task.activity_id
    });
    match decider {
        Some(d) => Overtaken {
            by: d.userid.clone(),
            how: d.result.clone().unwrap_or_else(|| "NONE".into()),
            at: d.finished_at,
        },
        None => Overtaken {
            by: None,
            how: task.status.clone(),
            at: task.finished_at,
        },
    }
}

/// How the approval ended: TERMINATED by whom the record names, COMPLETED with its result and
/// the approver who decided last, or CANCELED.
fn ended(snap: &Snapshot) -> Overtaken {
    match snap.status.as_str() {
        "TERMINATED" => {
            let (by, at) = record(snap, "TERMINATE_PROCESS_INSTANCE");
            Overtaken {
                by,
                how: "TERMINATED".into(),
                at: at.or(snap.finished_at),
            }
        }
        "COMPLETED" => {
            let (by, at) = record(snap, "EXECUTE_TASK_NORMAL");
            Overtaken {
                by,
                how: format!("COMPLETED/{}", snap.result.as_deref().unwrap_or("?")),
                at: at.or(snap.finished_at),
            }
        }
        other => Overtaken {
            by: None,
            how: other.to_string(),
            at: snap.finished_at,
        },
    }
}

/// The userid and date of the last operation record of `kind`.
fn record(snap: &Snapshot, kind: &str) -> (Option<String>, Option<DateTime<Utc>>) {
    let records = snap.operation_records.as_array().map(Vec::as_slice);
    records
        .unwrap_or_default()
        .iter()
        .rev()
        .find(|r| r["operation_type"].as_str() == Some(kind))
        .map(|r| {
            (
                r["userid"]
                    .as_str()
                    .filter(|u| !u.is_empty())
                    .map(str::to_string),
                r["date"].as_str().and_then(crate::clock::parse_beijing),
            )
        })
        .unwrap_or_default()
}

/// The dates of the comments (`ADD_REMARK` records) by the row's author with the row's text.
pub fn comment_dates(row: &ActionRow, snap: &Snapshot) -> Vec<Option<DateTime<Utc>>> {
    let records: &[Value] = snap.operation_records.as_array().map_or(&[], Vec::as_slice);
    records
        .iter()
        .filter(|r| {
            r["operation_type"].as_str() == Some("ADD_REMARK")
                && r["userid"].as_str() == row.actor_user_id.as_deref()
                && r["remark"].as_str() == row.remark.as_deref()
        })
        .map(|r| r["date"].as_str().and_then(crate::clock::parse_beijing))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn row(action: &str) -> ActionRow {
        ActionRow {
            corp_id: "c".into(),
            id: 1,
            idempotency_key: "k".into(),
            action: action.into(),
            process_instance_id: "p".into(),
            task_id: Some(10),
            actor_user_id: Some("manager1".into()),
            as_system: false,
            to_user_id: (action == "redirect").then(|| "boss1".into()),
            remark: None,
            state: "unknown".into(),
            attempts: 1,
            next_attempt_at: Utc::now(),
            sent_at: None,
            last_error: None,
            superseded_by: None,
            superseded_how: None,
            created_at: Utc::now(),
        }
    }

    fn task(id: i64, user: &str, status: &str, result: Option<&str>) -> SnapshotTask {
        SnapshotTask {
            task_id: id,
            activity_id: Some("node1".into()),
            userid: Some(user.into()),
            status: status.into(),
            result: result.map(str::to_string),
            remark: None,
            created_at: None,
            finished_at: None,
        }
    }

    fn snap(status: &str, tasks: Vec<SnapshotTask>) -> Snapshot {
        Snapshot {
            process_instance_id: "p".into(),
            status: status.into(),
            result: (status == "COMPLETED").then(|| "agree".into()),
            title: None,
            business_id: None,
            originator_userid: Some("emp1".into()),
            originator_dept_id: None,
            created_at: None,
            finished_at: None,
            form_values: json!([]),
            whole_minutes: false,
            operation_records: json!([
                {"userid": "emp1", "date": "2026-12-01 10:00:00", "operation_type": "TERMINATE_PROCESS_INSTANCE"}
            ]),
            tasks,
        }
    }

    #[test]
    fn an_agree_whose_task_is_agreed_by_its_approver_is_done_unless_our_send_was_refused() {
        let s = snap(
            "COMPLETED",
            vec![task(10, "manager1", "COMPLETED", Some("AGREE"))],
        );
        assert_eq!(judge(&row("agree"), &s, false), Verdict::Done);
        let Verdict::Superseded(o) = judge(&row("agree"), &s, true) else {
            panic!()
        };
        assert_eq!(
            (o.by.as_deref(), o.how.as_str()),
            (Some("manager1"), "AGREE")
        );
        // A refuse finds the task agreed: overtaken.
        assert!(matches!(
            judge(&row("refuse"), &s, false),
            Verdict::Superseded(_)
        ));
    }

    #[test]
    fn an_open_task_is_not_done_and_a_sibling_decision_supersedes() {
        let open = snap("RUNNING", vec![task(10, "manager1", "RUNNING", None)]);
        assert_eq!(judge(&row("agree"), &open, false), Verdict::NotDone);
        let sibling = snap(
            "RUNNING",
            vec![
                task(10, "manager1", "CANCELED", Some("NONE")),
                task(11, "boss1", "COMPLETED", Some("AGREE")),
            ],
        );
        let Verdict::Superseded(o) = judge(&row("agree"), &sibling, false) else {
            panic!()
        };
        assert_eq!((o.by.as_deref(), o.how.as_str()), (Some("boss1"), "AGREE"));
    }

    #[test]
    fn a_redirect_is_done_when_the_new_approver_has_the_task() {
        let s = snap(
            "RUNNING",
            vec![
                task(10, "manager1", "COMPLETED", Some("REDIRECTED")),
                task(12, "boss1", "RUNNING", None),
            ],
        );
        assert_eq!(judge(&row("redirect"), &s, false), Verdict::Done);
        let elsewhere = snap(
            "RUNNING",
            vec![
                task(10, "manager1", "COMPLETED", Some("REDIRECTED")),
                task(12, "hr1", "RUNNING", None),
            ],
        );
        assert!(matches!(
            judge(&row("redirect"), &elsewhere, false),
            Verdict::Superseded(_)
        ));
    }

    #[test]
    fn a_terminate_is_done_by_its_own_record_and_superseded_by_another() {
        let mut r = row("terminate");
        r.task_id = None;
        r.actor_user_id = Some("emp1".into());
        assert_eq!(judge(&r, &snap("TERMINATED", vec![]), false), Verdict::Done);
        r.actor_user_id = Some("emp2".into());
        let Verdict::Superseded(o) = judge(&r, &snap("TERMINATED", vec![]), false) else {
            panic!()
        };
        assert_eq!(
            (o.by.as_deref(), o.how.as_str()),
            (Some("emp1"), "TERMINATED")
        );
        assert!(matches!(
            judge(&r, &snap("COMPLETED", vec![]), false),
            Verdict::Superseded(_)
        ));
        assert_eq!(judge(&r, &snap("RUNNING", vec![]), false), Verdict::NotDone);
    }
}
