//! What a decrypted DingTalk event means for our tables. Pure: turns the event JSON into an
//! [`Event`] (what to store) with the approval and task changes it implies, and owns the Rust
//! side of the forward-only status rule ([`status_wins`]) by which changes are folded. Applying
//! them to the database is `store`'s job (through `ingest`); the HTTP exchange is `callback`'s.
//!
//! Field names and meanings: `docs/dingtalk.md` §5 (payloads). Envelope fields (`corpId`,
//! `CorpId`, `EventTime`, `eventId`) are all optional.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Where an event came from (`dingsync.events.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    HttpPush,
    FailedList,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::HttpPush => "http_push",
            Source::FailedList => "failed_list",
        }
    }
}

/// The result of reading one decrypted message.
#[derive(Debug)]
pub enum Parsed {
    /// A URL check (`check_url`, `check_create_suite_url`): answer `success`, store nothing.
    Handshake,
    Event(Box<Event>),
}

/// The message is not an event we can store; nothing is written and the sender gets 400.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Malformed {
    #[error("message is not JSON: {0}")]
    NotJson(String),
    #[error("message is not a JSON object")]
    NotAnObject,
    #[error("message has no EventType")]
    NoEventType,
    #[error("{event_type} event has no {field}")]
    MissingField {
        event_type: String,
        field: &'static str,
    },
    #[error("message contains \\u0000, which PostgreSQL cannot store")]
    NulCharacter,
}

/// One event to store, and what it changes.
#[derive(Debug, Clone)]
pub struct Event {
    pub corp_id: String,
    pub dedup_key: String,
    pub source: Source,
    pub event_type: String,
    pub change_type: Option<String>,
    pub process_instance_id: Option<String>,
    pub task_id: Option<i64>,
    pub event_time: Option<DateTime<Utc>>,
    /// The decrypted message, byte for byte.
    pub raw: String,
    pub approval: Option<ApprovalChange>,
    pub task: Option<TaskChange>,
}

/// What an event says about an approval. `status: None` only marks the row (provenance and the
/// detail-fetch queue) without changing what it says.
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalChange {
    pub process_instance_id: String,
    pub status: Option<&'static str>,
    pub result: Option<&'static str>,
    pub process_code: Option<String>,
    pub title: Option<String>,
    pub business_id: Option<String>,
    pub originator_userid: Option<String>,
    pub url: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// What a `bpms_task_change` says about one approver task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskChange {
    pub task_id: i64,
    pub process_instance_id: String,
    pub activity_id: Option<String>,
    pub userid: Option<String>,
    pub status: &'static str,
    pub result: Option<&'static str>,
    pub remark: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// The forward-only rule: whether a status `new` replaces the stored (or earlier folded) `old`.
/// Mirrors `dingsync.status_wins` (migration V9), which the SQL writers use; a test checks the
/// two agree. `new` must rank higher (NEW < RUNNING/PAUSED < COMPLETED/TERMINATED/CANCELED), or
/// the same when `ties_win`: events pass false (the first terminal state seen wins), snapshots
/// true (DingTalk's truth takes a tie). `None` is no status: a change without one never wins,
/// and any status wins over none.
pub fn status_wins(new: Option<&str>, old: Option<&str>, ties_win: bool) -> bool {
    match (new, old) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(new), Some(old)) => match rank(new).cmp(&rank(old)) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Equal => ties_win,
            std::cmp::Ordering::Less => false,
        },
    }
}

/// Whether a status is final (the top rank): nothing moves it further, only a snapshot's tie.
pub fn is_terminal(status: &str) -> bool {
    rank(status) == TERMINAL
}

const TERMINAL: u8 = 2;

/// How far along a status is; `dingsync.status_rank`. A status dingsync does not know ranks as
/// terminal, as in SQL: it is never moved back to an open state by a late event.
fn rank(status: &str) -> u8 {
    match status {
        "NEW" => 0,
        "RUNNING" | "PAUSED" => 1,
        _ => TERMINAL,
    }
}

impl ApprovalChange {
    /// Folds a later change of the same approval into this one, by the rule the SQL upsert
    /// applies to the stored row: the status (with its result and finish time) moves only to a
    /// higher rank ([`status_wins`], a tie keeps the first); descriptive fields keep the first
    /// value known.
    pub fn merge(&mut self, later: &ApprovalChange) {
        if status_wins(later.status, self.status, false) {
            self.status = later.status;
            self.result = later.result;
            self.finished_at = later.finished_at.or(self.finished_at);
        }
        fill(&mut self.process_code, &later.process_code);
        fill(&mut self.title, &later.title);
        fill(&mut self.business_id, &later.business_id);
        fill(&mut self.originator_userid, &later.originator_userid);
        fill(&mut self.url, &later.url);
        self.created_at = self.created_at.or(later.created_at);
    }
}

impl TaskChange {
    /// Folds a later change of the same task into this one (same rule as `approval_tasks`).
    pub fn merge(&mut self, later: &TaskChange) {
        if status_wins(Some(later.status), Some(self.status), false) {
            self.status = later.status;
            self.result = later.result;
            self.remark = later.remark.clone().or(self.remark.take());
            self.finished_at = later.finished_at.or(self.finished_at);
        } else {
            fill(&mut self.remark, &later.remark);
        }
        fill(&mut self.activity_id, &later.activity_id);
        fill(&mut self.userid, &later.userid);
        self.created_at = self.created_at.or(later.created_at);
    }
}

fn fill(field: &mut Option<String>, later: &Option<String>) {
    if field.is_none() {
        field.clone_from(later);
    }
}

/// Reads a decrypted message. `default_corp_id` is used when the payload names no organisation.
pub fn parse(raw: &str, source: Source, default_corp_id: &str) -> Result<Parsed, Malformed> {
    if raw.contains("\\u0000") {
        return Err(Malformed::NulCharacter);
    }
    let value: Value = serde_json::from_str(raw).map_err(|e| Malformed::NotJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(Malformed::NotAnObject);
    };
    let event_type = text(&obj, "EventType").ok_or(Malformed::NoEventType)?;
    if event_type == "check_url" || event_type == "check_create_suite_url" {
        return Ok(Parsed::Handshake);
    }
    let corp_id = ["corpId", "CorpId", "corpid"]
        .iter()
        .find_map(|k| text(&obj, k))
        .unwrap_or(default_corp_id)
        .to_string();
    let dedup_key = match obj.get("eventId").and_then(scalar_text) {
        Some(id) if !id.is_empty() => format!("event:{id}"),
        // No id: the content is the identity. serde_json's map is ordered by key, so
        // re-serializing gives the same text for the same content however it was laid out.
        _ => format!(
            "sha256:{}",
            hex::encode(Sha256::digest(
                serde_json::to_vec(&obj).expect("a JSON map serializes"),
            ))
        ),
    };
    let missing = |field| Malformed::MissingField {
        event_type: event_type.to_string(),
        field,
    };
    let change_type = text(&obj, "type").map(str::to_string);
    let process_instance_id = text(&obj, "processInstanceId").map(str::to_string);
    let created_at = millis(&obj, "createTime");
    let finished_at = millis(&obj, "finishTime");
    let event_time = millis(&obj, "EventTime").or(finished_at).or(created_at);
    let mut event = Event {
        corp_id,
        dedup_key,
        source,
        event_type: event_type.to_string(),
        change_type: change_type.clone(),
        process_instance_id: process_instance_id.clone(),
        task_id: obj.get("taskId").and_then(integer),
        event_time,
        raw: raw.to_string(),
        approval: None,
        task: None,
    };
    let approval = |status, result| ApprovalChange {
        process_instance_id: process_instance_id.clone().unwrap_or_default(),
        status,
        result,
        process_code: owned(&obj, "processCode"),
        title: owned(&obj, "title"),
        business_id: owned(&obj, "businessId"),
        originator_userid: None,
        url: None,
        created_at: None,
        finished_at: None,
    };
    match event_type {
        "bpms_instance_change" => {
            process_instance_id
                .as_ref()
                .ok_or_else(|| missing("processInstanceId"))?;
            let kind = change_type.as_deref().ok_or_else(|| missing("type"))?;
            let (status, result) = match kind {
                "start" => (Some("RUNNING"), None),
                "finish" => (Some("COMPLETED"), instance_result(text(&obj, "result"))),
                "terminate" => (Some("TERMINATED"), None),
                // `delete` and anything new: keep the event, let the detail fetch decide.
                _ => (None, None),
            };
            event.approval = Some(ApprovalChange {
                originator_userid: owned(&obj, "staffId"),
                url: owned(&obj, "url"),
                created_at,
                finished_at: if status.is_some_and(|s| s != "RUNNING") {
                    finished_at
                } else {
                    None
                },
                ..approval(status, result)
            });
        }
        "bpms_task_change" => {
            let pid = process_instance_id
                .clone()
                .ok_or_else(|| missing("processInstanceId"))?;
            let kind = change_type.as_deref().ok_or_else(|| missing("type"))?;
            // A task exists, so the approval is at least RUNNING; `staffId` here is the
            // approver, not the originator.
            event.approval = Some(approval(Some("RUNNING"), None));
            let task = |status, result, finished_at| -> Result<TaskChange, Malformed> {
                Ok(TaskChange {
                    task_id: event.task_id.ok_or_else(|| missing("taskId"))?,
                    process_instance_id: pid.clone(),
                    activity_id: owned(&obj, "activityId"),
                    userid: owned(&obj, "staffId"),
                    status,
                    result,
                    remark: owned(&obj, "remark"),
                    created_at,
                    finished_at,
                })
            };
            event.task = match kind {
                "start" => Some(task("RUNNING", None, None)?),
                "finish" => Some(task(
                    "COMPLETED",
                    Some(task_result(text(&obj, "result"))),
                    finished_at,
                )?),
                "cancel" => Some(task("CANCELED", Some("NONE"), finished_at)?),
                // `comment` adds a remark without changing the task; new kinds likewise.
                _ => None,
            };
        }
        _ => {
            if let Some(pid) = &process_instance_id {
                event.approval = Some(ApprovalChange {
                    process_instance_id: pid.clone(),
                    status: None,
                    result: None,
                    process_code: None,
                    title: None,
                    business_id: None,
                    originator_userid: None,
                    url: None,
                    created_at: None,
                    finished_at: None,
                });
            }
        }
    }
    Ok(Parsed::Event(Box::new(event)))
}

fn instance_result(result: Option<&str>) -> Option<&'static str> {
    match result {
        Some("agree") => Some("agree"),
        Some("refuse") => Some("refuse"),
        _ => None,
    }
}

/// Events say `agree`/`refuse`/`redirect`/`audit`; the tables use processinstance/get's
/// `task_result` words so that events and API snapshots agree.
fn task_result(result: Option<&str>) -> &'static str {
    match result {
        Some("agree") => "AGREE",
        Some("refuse") => "REFUSE",
        Some("redirect") => "REDIRECTED",
        _ => "NONE",
    }
}

fn text<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    obj.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn owned(obj: &Map<String, Value>, key: &str) -> Option<String> {
    text(obj, key).map(str::to_string)
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// DingTalk sends ids and times as numbers, sometimes as numeric strings.
fn integer(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Epoch milliseconds (DingTalk's event times) as a UTC time.
fn millis(obj: &Map<String, Value>, key: &str) -> Option<DateTime<Utc>> {
    obj.get(key)
        .and_then(integer)
        .and_then(DateTime::from_timestamp_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(raw: &str) -> Event {
        match parse(raw, Source::HttpPush, "dingdefault").unwrap() {
            Parsed::Event(e) => *e,
            Parsed::Handshake => panic!("handshake"),
        }
    }

    #[test]
    fn instance_finish_becomes_completed_with_result_and_times() {
        let e = event(
            r#"{"EventType":"bpms_instance_change","processInstanceId":"p1","corpId":"dingc","createTime":1492064496000,"finishTime":1492064508000,"title":"t","type":"finish","result":"agree","staffId":"u1","url":"https://x","processCode":"PROC-1","businessId":"b1"}"#,
        );
        assert_eq!(e.corp_id, "dingc");
        let a = e.approval.unwrap();
        assert_eq!((a.status, a.result), (Some("COMPLETED"), Some("agree")));
        assert_eq!(a.originator_userid.as_deref(), Some("u1"));
        assert_eq!(
            a.created_at.unwrap().to_rfc3339(),
            "2017-04-13T06:21:36+00:00"
        );
        assert_eq!(
            a.finished_at.unwrap().to_rfc3339(),
            "2017-04-13T06:21:48+00:00"
        );
        assert!(e.dedup_key.starts_with("sha256:"));
    }

    #[test]
    fn same_content_in_another_key_order_has_the_same_dedup_key() {
        let a = event(r#"{"EventType":"x","a":1,"b":"2"}"#);
        let b = event(r#"{ "b":"2", "a":1, "EventType":"x" }"#);
        assert_eq!(a.dedup_key, b.dedup_key);
        assert_ne!(
            a.dedup_key,
            event(r#"{"EventType":"x","a":2,"b":"2"}"#).dedup_key
        );
    }

    #[test]
    fn event_id_is_the_dedup_key_when_present() {
        let e = event(
            r#"{"EventType":"bpms_task_change","eventId":"abc","processInstanceId":"p","type":"start","taskId":"12"}"#,
        );
        assert_eq!(e.dedup_key, "event:abc");
        assert_eq!(e.corp_id, "dingdefault");
        assert_eq!(e.task.unwrap().task_id, 12);
    }

    #[test]
    fn task_events_map_to_get_api_words_and_imply_a_running_approval() {
        let e = event(
            r#"{"EventType":"bpms_task_change","processInstanceId":"p","type":"finish","result":"redirect","taskId":5,"staffId":"boss","finishTime":1000}"#,
        );
        let t = e.task.unwrap();
        assert_eq!((t.status, t.result), ("COMPLETED", Some("REDIRECTED")));
        assert_eq!(t.userid.as_deref(), Some("boss"));
        let a = e.approval.unwrap();
        assert_eq!(a.status, Some("RUNNING"));
        assert_eq!(a.originator_userid, None);
    }

    #[test]
    fn merging_keeps_the_furthest_status_whatever_the_order() {
        let raw = [
            r#"{"EventType":"bpms_instance_change","processInstanceId":"p","type":"start","createTime":1000,"title":"t","staffId":"u"}"#,
            r#"{"EventType":"bpms_task_change","processInstanceId":"p","type":"start","taskId":1,"createTime":2000}"#,
            r#"{"EventType":"bpms_instance_change","processInstanceId":"p","type":"finish","result":"refuse","createTime":1000,"finishTime":9000}"#,
        ];
        let changes: Vec<ApprovalChange> = raw.iter().map(|r| event(r).approval.unwrap()).collect();
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]] {
            let mut merged = changes[order[0]].clone();
            merged.merge(&changes[order[1]]);
            merged.merge(&changes[order[2]]);
            assert_eq!(
                (merged.status, merged.result),
                (Some("COMPLETED"), Some("refuse")),
                "{order:?}"
            );
            assert_eq!(merged.finished_at.unwrap().timestamp_millis(), 9000);
            assert_eq!(merged.created_at.unwrap().timestamp_millis(), 1000);
            assert_eq!(
                (merged.title.as_deref(), merged.originator_userid.as_deref()),
                (Some("t"), Some("u"))
            );
        }
    }

    #[test]
    fn merging_a_task_finish_with_its_start_in_either_order_ends_finished() {
        let start = event(r#"{"EventType":"bpms_task_change","processInstanceId":"p","type":"start","taskId":1,"createTime":5,"staffId":"a"}"#).task.unwrap();
        let finish = event(r#"{"EventType":"bpms_task_change","processInstanceId":"p","type":"finish","result":"agree","remark":"ok","taskId":1,"createTime":5,"finishTime":7}"#).task.unwrap();
        for (first, second) in [(&start, &finish), (&finish, &start)] {
            let mut merged = first.clone();
            merged.merge(second);
            assert_eq!(
                (merged.status, merged.result, merged.remark.as_deref()),
                ("COMPLETED", Some("AGREE"), Some("ok"))
            );
            assert_eq!(merged.userid.as_deref(), Some("a"));
        }
    }

    #[test]
    fn a_status_wins_only_by_moving_forward_and_a_tie_only_when_ties_win() {
        for ties_win in [false, true] {
            assert!(status_wins(Some("RUNNING"), Some("NEW"), ties_win));
            assert!(status_wins(Some("COMPLETED"), Some("PAUSED"), ties_win));
            assert!(!status_wins(Some("RUNNING"), Some("TERMINATED"), ties_win));
            assert!(!status_wins(Some("NEW"), Some("RUNNING"), ties_win));
            assert_eq!(
                status_wins(Some("TERMINATED"), Some("COMPLETED"), ties_win),
                ties_win
            );
            assert_eq!(
                status_wins(Some("PAUSED"), Some("RUNNING"), ties_win),
                ties_win
            );
        }
    }

    #[test]
    fn no_status_never_wins_and_any_status_wins_over_none() {
        for ties_win in [false, true] {
            assert!(!status_wins(None, Some("NEW"), ties_win));
            assert!(!status_wins(None, None, ties_win));
            assert!(status_wins(Some("NEW"), None, ties_win));
            assert!(status_wins(Some("SOMETHING_NEW"), None, ties_win));
        }
    }

    #[test]
    fn an_unknown_status_ranks_as_terminal() {
        assert!(is_terminal("SOMETHING_NEW"));
        assert!(is_terminal("CANCELED") && is_terminal("COMPLETED") && is_terminal("TERMINATED"));
        assert!(!is_terminal("NEW") && !is_terminal("RUNNING") && !is_terminal("PAUSED"));
        assert!(!status_wins(Some("RUNNING"), Some("SOMETHING_NEW"), true));
    }

    #[test]
    fn merging_approval_changes_keeps_the_first_terminal_state() {
        let e = |raw| event(raw).approval.unwrap();
        let finish = e(
            r#"{"EventType":"bpms_instance_change","processInstanceId":"p","type":"finish","result":"agree","finishTime":9000}"#,
        );
        let terminate = e(
            r#"{"EventType":"bpms_instance_change","processInstanceId":"p","type":"terminate","finishTime":8000}"#,
        );
        let mut merged = finish.clone();
        merged.merge(&terminate);
        assert_eq!(
            (merged.status, merged.result),
            (Some("COMPLETED"), Some("agree"))
        );
        let mut merged = terminate.clone();
        merged.merge(&finish);
        assert_eq!((merged.status, merged.result), (Some("TERMINATED"), None));
        assert_eq!(merged.finished_at.unwrap().timestamp_millis(), 8000);
    }

    #[test]
    fn a_change_without_status_marks_but_never_moves_a_merged_approval() {
        let start =
            event(r#"{"EventType":"bpms_instance_change","processInstanceId":"p","type":"start"}"#)
                .approval
                .unwrap();
        let delete = event(
            r#"{"EventType":"bpms_instance_change","processInstanceId":"p","type":"delete"}"#,
        )
        .approval
        .unwrap();
        assert_eq!(delete.status, None);
        let mut merged = start.clone();
        merged.merge(&delete);
        assert_eq!(merged.status, Some("RUNNING"));
        let mut merged = delete.clone();
        merged.merge(&start);
        assert_eq!(merged.status, Some("RUNNING"));
    }

    #[test]
    fn check_url_is_a_handshake() {
        assert!(matches!(
            parse(r#"{"EventType":"check_url"}"#, Source::HttpPush, "d"),
            Ok(Parsed::Handshake)
        ));
    }

    #[test]
    fn unknown_event_types_are_events_without_changes() {
        let e = event(r#"{"EventType":"user_add_org","UserId":["u"],"CorpId":"dingx"}"#);
        assert_eq!(e.corp_id, "dingx");
        assert!(e.approval.is_none() && e.task.is_none());
    }

    #[test]
    fn malformed_messages_are_refused_with_a_reason() {
        let p = |raw| parse(raw, Source::HttpPush, "d").unwrap_err();
        assert!(matches!(p("{not json"), Malformed::NotJson(_)));
        assert_eq!(p("[1]"), Malformed::NotAnObject);
        assert_eq!(p(r#"{"a":1}"#), Malformed::NoEventType);
        assert_eq!(
            p(r#"{"EventType":"bpms_instance_change","type":"start"}"#),
            Malformed::MissingField {
                event_type: "bpms_instance_change".into(),
                field: "processInstanceId"
            }
        );
        assert_eq!(
            p(r#"{"EventType":"bpms_task_change","processInstanceId":"p","type":"start"}"#),
            Malformed::MissingField {
                event_type: "bpms_task_change".into(),
                field: "taskId"
            }
        );
        assert_eq!(
            p(r#"{"EventType":"x","a":"\u0000"}"#),
            Malformed::NulCharacter
        );
    }
}
