//! What a decrypted DingTalk event means for our tables. Pure: turns the event JSON into an
//! [`Event`] (what to store) with the approval and task changes it implies, and owns the Rust
//! side of the forward-only status rule ([`status_wins`]) by which changes are folded. Applying
//! them to the database is `store`'s job (through `ingest`); the HTTP exchange is `callback`'s.
//! It also refuses, naming the field, what the tables cannot hold ([`parse_at`]): both the push
//! and the failed-list drain read events here, so both get the same bounds.
//!
//! Field names and meanings: `docs/dingtalk.md` §5 (payloads). Envelope fields (`corpId`,
//! `CorpId`, `EventTime`, `eventId`) are all optional.

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Where an event came from (`dingsync.events.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    HttpPush,
    FailedList,
    /// Stream mode (`stream`).
    Stream,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::HttpPush => "http_push",
            Source::FailedList => "failed_list",
            Source::Stream => "stream",
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

/// Longest id dingsync stores, in bytes: `processInstanceId`, `eventId`, the corp id,
/// `EventType`, `type`, `processCode`, `businessId`, userids, `activityId`. DingTalk's are 20 to
/// 70 bytes; every one of them is indexed or sent as a NOTIFY payload, whose limits (a third of a
/// page per index row, 8000 bytes per payload) a longer one could break.
pub const MAX_ID_BYTES: usize = 256;
/// Longest free text dingsync stores in a column, in bytes: `title`, `url`, `remark`. Far above
/// DingTalk's form limits, and a quarter of the largest accepted push body.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;
/// Longest number in a message, in characters (see [`numbers_fit_jsonb`]).
const MAX_NUMBER_CHARS: usize = 64;
/// 2000-01-01T00:00:00Z in epoch milliseconds: no event time is older ([`plausible_time`]).
const EARLIEST_MS: i64 = 946_684_800_000;
/// How far ahead of our clock an event time may be ([`plausible_time`]).
const MAX_AHEAD: TimeDelta = TimeDelta::days(1);

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
    #[error("a string contains \\u0000 (NUL), which PostgreSQL cannot store")]
    NulCharacter,
    /// An id or a text over its bound ([`MAX_ID_BYTES`], [`MAX_TEXT_BYTES`]).
    #[error("{field} is longer than {limit} bytes")]
    TooLong { field: &'static str, limit: usize },
    /// A time that is not a [`plausible_time`].
    #[error("{field} is not a time between 2000-01-01 and a day from now")]
    TimeOutOfRange { field: &'static str },
    /// A number jsonb cannot hold ([`numbers_fit_jsonb`]).
    #[error("a number is longer than 64 characters or has an exponent beyond 999")]
    NumberOutOfRange,
    /// `corpId`, `CorpId` and `corpid` name different organisations.
    #[error("corpId, CorpId and corpid name different organisations")]
    CorpIdsDisagree,
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

impl Event {
    /// The event kept as a record only, with nothing read from its content: the message, its
    /// organisation, identity, source and type. What the failed-list drain stores of an item it
    /// cannot apply (`reconcile::failed`): every column that a malformed value could break is
    /// left empty, and no approval or task changes.
    pub fn raw_only(&self) -> Event {
        Event {
            corp_id: self.corp_id.clone(),
            dedup_key: self.dedup_key.clone(),
            source: self.source,
            event_type: self.event_type.clone(),
            change_type: None,
            process_instance_id: None,
            task_id: None,
            event_time: None,
            raw: self.raw.clone(),
            approval: None,
            task: None,
        }
    }
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
/// Times are checked against the clock now: [`parse_at`].
pub fn parse(raw: &str, source: Source, default_corp_id: &str) -> Result<Parsed, Malformed> {
    parse_at(raw, source, default_corp_id, Utc::now())
}

/// [`parse`] with the current time given, so that the time bounds are testable.
///
/// Everything that would make the batch statement fail is refused here, with the field it is
/// about: a refused event gets a 4xx (the sender sees why) where a failed statement would give
/// 500 for ever (docs/dingtalk.md §6: DingTalk retries, then parks it in the failed list, which
/// applies the same rules). What is refused: ids longer than [`MAX_ID_BYTES`] (index rows and
/// the NOTIFY payload are bounded), free text longer than [`MAX_TEXT_BYTES`], times outside
/// [`plausible_time`], a NUL in any string or key (PostgreSQL's text and jsonb cannot hold one),
/// and numbers that jsonb cannot hold ([`numbers_fit_jsonb`]).
pub fn parse_at(
    raw: &str,
    source: Source,
    default_corp_id: &str,
    now: DateTime<Utc>,
) -> Result<Parsed, Malformed> {
    let value: Value = serde_json::from_str(raw).map_err(|e| Malformed::NotJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(Malformed::NotAnObject);
    };
    let event_type = id(&obj, "EventType")?.ok_or(Malformed::NoEventType)?;
    if event_type == "check_url" || event_type == "check_create_suite_url" {
        return Ok(Parsed::Handshake);
    }
    // After unescaping: the text `"\\u0000"` (a backslash, then `u0000`) is no NUL and is
    // stored as it came; only a real NUL is refused.
    if obj.iter().any(|(k, v)| k.contains('\0') || has_nul(v)) {
        return Err(Malformed::NulCharacter);
    }
    if !numbers_fit_jsonb(raw) {
        return Err(Malformed::NumberOutOfRange);
    }
    // A payload may name its organisation in several envelope fields (docs/dingtalk.md §5); if
    // they disagree, which one the event belongs to is anybody's guess.
    let mut corp: Option<&str> = None;
    for key in ["corpId", "CorpId", "corpid"] {
        if let Some(named) = id(&obj, key)? {
            match corp {
                Some(seen) if seen != named => return Err(Malformed::CorpIdsDisagree),
                _ => corp = Some(named),
            }
        }
    }
    let corp_id = corp.unwrap_or(default_corp_id).to_string();
    let dedup_key = match obj.get("eventId").and_then(scalar_text) {
        Some(id) if id.len() > MAX_ID_BYTES => {
            return Err(Malformed::TooLong {
                field: "eventId",
                limit: MAX_ID_BYTES,
            });
        }
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
    let change_type = owned_id(&obj, "type")?;
    let process_instance_id = owned_id(&obj, "processInstanceId")?;
    let created_at = time(&obj, "createTime", now)?;
    let finished_at = time(&obj, "finishTime", now)?;
    let event_time = time(&obj, "EventTime", now)?.or(finished_at).or(created_at);
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
    match event_type {
        "bpms_instance_change" | "bpms_task_change" => {
            let pid = process_instance_id.ok_or_else(|| missing("processInstanceId"))?;
            let kind = change_type.as_deref().ok_or_else(|| missing("type"))?;
            let approval = ApprovalChange {
                process_instance_id: pid.clone(),
                status: None,
                result: None,
                process_code: owned_id(&obj, "processCode")?,
                title: free_text(&obj, "title")?,
                business_id: owned_id(&obj, "businessId")?,
                originator_userid: None,
                url: None,
                created_at: None,
                finished_at: None,
            };
            // `staffId` is the originator in instance events, the approver in task events.
            let staff_id = owned_id(&obj, "staffId")?;
            if event_type == "bpms_instance_change" {
                let (status, result) = match kind {
                    "start" => (Some("RUNNING"), None),
                    "finish" => (Some("COMPLETED"), instance_result(text(&obj, "result"))),
                    "terminate" => (Some("TERMINATED"), None),
                    // `delete` and anything new: keep the event, let the detail fetch decide.
                    _ => (None, None),
                };
                event.approval = Some(ApprovalChange {
                    status,
                    result,
                    originator_userid: staff_id,
                    url: free_text(&obj, "url")?,
                    created_at,
                    finished_at: if status.is_some_and(|s| s != "RUNNING") {
                        finished_at
                    } else {
                        None
                    },
                    ..approval
                });
            } else {
                // A task exists, so the approval is at least RUNNING.
                event.approval = Some(ApprovalChange {
                    status: Some("RUNNING"),
                    ..approval
                });
                let (activity_id, remark) =
                    (owned_id(&obj, "activityId")?, free_text(&obj, "remark")?);
                let task = |status, result, finished_at| -> Result<TaskChange, Malformed> {
                    Ok(TaskChange {
                        task_id: event.task_id.ok_or_else(|| missing("taskId"))?,
                        process_instance_id: pid.clone(),
                        activity_id: activity_id.clone(),
                        userid: staff_id.clone(),
                        status,
                        result,
                        remark: remark.clone(),
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

/// A non-empty string member of at most `limit` bytes.
fn bounded<'a>(
    obj: &'a Map<String, Value>,
    key: &'static str,
    limit: usize,
) -> Result<Option<&'a str>, Malformed> {
    match text(obj, key) {
        Some(s) if s.len() > limit => Err(Malformed::TooLong { field: key, limit }),
        other => Ok(other),
    }
}

/// An id member (at most [`MAX_ID_BYTES`]).
fn id<'a>(obj: &'a Map<String, Value>, key: &'static str) -> Result<Option<&'a str>, Malformed> {
    bounded(obj, key, MAX_ID_BYTES)
}

fn owned_id(obj: &Map<String, Value>, key: &'static str) -> Result<Option<String>, Malformed> {
    Ok(id(obj, key)?.map(str::to_string))
}

/// A free-text member (at most [`MAX_TEXT_BYTES`]).
fn free_text(obj: &Map<String, Value>, key: &'static str) -> Result<Option<String>, Malformed> {
    Ok(bounded(obj, key, MAX_TEXT_BYTES)?.map(str::to_string))
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// DingTalk sends ids and times as numbers, sometimes as numeric strings. A number written with
/// a fraction or an exponent (`-8e15`) counts when it is a whole number.
fn integer(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e18)
                .map(|f| f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// An epoch-milliseconds member (DingTalk's event times) as a time, refused when it is not a
/// [`plausible_time`]. A member that is no number at all is ignored, as before the bounds.
fn time(
    obj: &Map<String, Value>,
    key: &'static str,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, Malformed> {
    match obj.get(key).and_then(integer) {
        None => Ok(None),
        Some(ms) => plausible_time(ms, now)
            .map(Some)
            .ok_or(Malformed::TimeOutOfRange { field: key }),
    }
}

/// Epoch milliseconds as a time, when it is one an event can carry: from 2000-01-01 to a day
/// after `now`. Far inside PostgreSQL's timestamptz range (4713 BC to 294276 AD), whose bounds
/// a time such as `-8e15` ms would break; and nothing DingTalk (founded 2014) sends is older or
/// more than clock skew ahead. A time in seconds instead of milliseconds lands in 1970 and is
/// refused rather than stored wrong.
pub fn plausible_time(ms: i64, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let t = DateTime::from_timestamp_millis(ms)?;
    (ms >= EARLIEST_MS && t <= now + MAX_AHEAD).then_some(t)
}

/// Whether a string anywhere in `v` (keys included) holds a NUL, which PostgreSQL's text and
/// jsonb cannot store.
pub fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(members) => members.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// Whether every number in the JSON text `raw` (well-formed: serde_json has read it) fits
/// PostgreSQL's numeric, which jsonb stores numbers as. serde_json reads `1e-99999` as 0.0, while
/// `raw::jsonb` fails with "value overflows numeric format"; so a number of more than
/// [`MAX_NUMBER_CHARS`] characters or with an exponent of more than three digits is refused
/// (1e-999 and 64 digits are far inside numeric's range, and far beyond any DingTalk field). One
/// pass over the bytes, no allocation: numbers are what is outside strings and starts with a
/// digit or a minus sign.
pub fn numbers_fit_jsonb(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    let (mut in_string, mut escaped) = (false, false);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        i += 1;
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if b == b'-' || b.is_ascii_digit() {
            let start = i - 1;
            while i < bytes.len()
                && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
            {
                i += 1;
            }
            let number = &raw[start..i];
            if number.len() > MAX_NUMBER_CHARS {
                return false;
            }
            if let Some(e) = number.find(['e', 'E']) {
                let digits = number[e + 1..]
                    .trim_start_matches(['+', '-'])
                    .trim_start_matches('0');
                if digits.len() > 3 {
                    return false;
                }
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2025-11-28T03:20:00Z: event times in the tests are offsets from it.
    const T0: i64 = 1_764_300_000_000;

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
            r#"{"EventType":"bpms_task_change","processInstanceId":"p","type":"finish","result":"redirect","taskId":5,"staffId":"boss","finishTime":1764300001000}"#,
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
            r#"{"EventType":"bpms_instance_change","processInstanceId":"p","type":"start","createTime":1764300001000,"title":"t","staffId":"u"}"#,
            r#"{"EventType":"bpms_task_change","processInstanceId":"p","type":"start","taskId":1,"createTime":1764300002000}"#,
            r#"{"EventType":"bpms_instance_change","processInstanceId":"p","type":"finish","result":"refuse","createTime":1764300001000,"finishTime":1764300009000}"#,
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
            assert_eq!(merged.finished_at.unwrap().timestamp_millis(), T0 + 9000);
            assert_eq!(merged.created_at.unwrap().timestamp_millis(), T0 + 1000);
            assert_eq!(
                (merged.title.as_deref(), merged.originator_userid.as_deref()),
                (Some("t"), Some("u"))
            );
        }
    }

    #[test]
    fn merging_a_task_finish_with_its_start_in_either_order_ends_finished() {
        let start = event(r#"{"EventType":"bpms_task_change","processInstanceId":"p","type":"start","taskId":1,"createTime":1764300000005,"staffId":"a"}"#).task.unwrap();
        let finish = event(r#"{"EventType":"bpms_task_change","processInstanceId":"p","type":"finish","result":"agree","remark":"ok","taskId":1,"createTime":1764300000005,"finishTime":1764300000007}"#).task.unwrap();
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
            r#"{"EventType":"bpms_instance_change","processInstanceId":"p","type":"finish","result":"agree","finishTime":1764300009000}"#,
        );
        let terminate = e(
            r#"{"EventType":"bpms_instance_change","processInstanceId":"p","type":"terminate","finishTime":1764300008000}"#,
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
        assert_eq!(merged.finished_at.unwrap().timestamp_millis(), T0 + 8000);
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

    fn parse_now(raw: &str, now: DateTime<Utc>) -> Result<Event, Malformed> {
        match parse_at(raw, Source::HttpPush, "dingdefault", now)? {
            Parsed::Event(e) => Ok(*e),
            Parsed::Handshake => panic!("handshake"),
        }
    }

    /// A task finish with every field dingsync reads, `field` set to `value`.
    fn task_finish_with(field: &str, value: Value) -> String {
        let mut v = serde_json::json!({"EventType": "bpms_task_change", "processInstanceId": "p",
            "corpId": "dingc", "eventId": "e1", "type": "finish", "result": "agree", "taskId": 5,
            "staffId": "boss", "activityId": "a1", "processCode": "PROC-1", "businessId": "b1",
            "title": "t", "remark": "ok", "createTime": T0, "finishTime": T0 + 1});
        v[field] = value;
        v.to_string()
    }

    #[test]
    fn ids_longer_than_256_bytes_are_refused_naming_the_field() {
        let now = DateTime::from_timestamp_millis(T0).unwrap();
        for field in [
            "processInstanceId",
            "eventId",
            "corpId",
            "type",
            "processCode",
            "businessId",
            "staffId",
            "activityId",
        ] {
            let at_limit = task_finish_with(field, "x".repeat(MAX_ID_BYTES).into());
            assert!(parse_now(&at_limit, now).is_ok(), "{field} at the limit");
            let over = task_finish_with(field, "x".repeat(MAX_ID_BYTES + 1).into());
            let err = parse_now(&over, now).unwrap_err();
            assert_eq!(
                err,
                Malformed::TooLong {
                    field,
                    limit: MAX_ID_BYTES
                }
            );
            assert_eq!(err.to_string(), format!("{field} is longer than 256 bytes"));
        }
        // Bytes, not characters: 86 three-byte characters are 258 bytes.
        let wide = task_finish_with("processInstanceId", "审".repeat(86).into());
        assert!(matches!(
            parse_now(&wide, now),
            Err(Malformed::TooLong { .. })
        ));
        let long_type = format!(r#"{{"EventType":"{}"}}"#, "x".repeat(300));
        assert_eq!(
            parse_now(&long_type, now).unwrap_err(),
            Malformed::TooLong {
                field: "EventType",
                limit: MAX_ID_BYTES
            }
        );
        // A numeric eventId is bounded the same way.
        let numeric = r#"{"EventType":"x","eventId":1234567890123}"#;
        assert_eq!(
            parse_now(numeric, now).unwrap().dedup_key,
            "event:1234567890123"
        );
    }

    #[test]
    fn free_text_longer_than_16_kib_is_refused_naming_the_field() {
        let now = DateTime::from_timestamp_millis(T0).unwrap();
        for field in ["title", "remark"] {
            let fits = task_finish_with(field, "字".repeat(MAX_TEXT_BYTES / 3).into());
            assert!(parse_now(&fits, now).is_ok(), "{field}");
            let over = task_finish_with(field, "x".repeat(MAX_TEXT_BYTES + 1).into());
            assert_eq!(
                parse_now(&over, now).unwrap_err(),
                Malformed::TooLong {
                    field,
                    limit: MAX_TEXT_BYTES
                }
            );
        }
        let url = format!(
            r#"{{"EventType":"bpms_instance_change","processInstanceId":"p","type":"start","url":"{}"}}"#,
            "u".repeat(MAX_TEXT_BYTES + 1)
        );
        assert!(matches!(
            parse_now(&url, now),
            Err(Malformed::TooLong { field: "url", .. })
        ));
    }

    #[test]
    fn times_before_2000_or_more_than_a_day_ahead_are_refused_naming_the_field() {
        let now = DateTime::from_timestamp_millis(T0).unwrap();
        let day = 86_400_000;
        for (field, ms) in [
            ("createTime", Value::from(-8_000_000_000_000_000_i64)),
            ("createTime", Value::from(-8e15)),
            ("finishTime", Value::from(9_000_000_000_000_000_i64)),
            ("finishTime", Value::from(T0 + day + 1)),
            ("createTime", Value::from(EARLIEST_MS - 1)),
            // Seconds where milliseconds belong: January 1970.
            ("createTime", Value::from(T0 / 1000)),
            ("EventTime", Value::from(i64::MAX)),
            ("EventTime", Value::from(i64::MIN.to_string())),
        ] {
            let raw = task_finish_with(field, ms.clone());
            let err = parse_now(&raw, now).unwrap_err();
            assert_eq!(err, Malformed::TimeOutOfRange { field }, "{field} = {ms}");
            assert!(err.to_string().starts_with(field));
        }
        for ms in [EARLIEST_MS, T0 + day - 1, T0 - 10 * 365 * day] {
            let e = parse_now(&task_finish_with("finishTime", ms.into()), now).unwrap();
            assert_eq!(e.event_time.unwrap().timestamp_millis(), ms);
        }
        // As before: a time that is not a number is ignored, not refused.
        let e = parse_now(&task_finish_with("EventTime", "soon".into()), now).unwrap();
        assert_eq!(e.event_time.unwrap().timestamp_millis(), T0 + 1);
        assert_eq!(plausible_time(T0 + 2 * day, now), None);
        assert_eq!(plausible_time(i64::MIN, now), None);
    }

    #[test]
    fn an_escaped_backslash_before_u0000_is_stored_and_a_real_nul_anywhere_is_refused() {
        // JSON text "\\u0000": a backslash, then the letters u0000. No NUL.
        let raw = r#"{"EventType":"bpms_instance_change","processInstanceId":"p","type":"start","title":"C:\\u0000"}"#;
        let e = event(raw);
        assert_eq!(e.raw, raw);
        assert_eq!(e.approval.unwrap().title.as_deref(), Some("C:\\u0000"));
        let p = |raw| parse(raw, Source::HttpPush, "d").unwrap_err();
        for raw in [
            r#"{"EventType":"x","title":"a\u0000b"}"#,
            r#"{"EventType":"x","deep":[{"a":["\u0000"]}]}"#,
            r#"{"EventType":"x","k\u0000":1}"#,
            r#"{"EventType":"x","a":"\\\u0000"}"#,
        ] {
            assert_eq!(p(raw), Malformed::NulCharacter, "{raw}");
        }
    }

    #[test]
    fn numbers_that_jsonb_cannot_hold_are_refused() {
        let p = |raw: &str| parse(raw, Source::HttpPush, "d");
        for raw in [
            r#"{"EventType":"x","a":1e-99999}"#,
            r#"{"EventType":"x","a":[1,2,-1E-00001000]}"#,
            &format!(r#"{{"EventType":"x","a":0.{}1}}"#, "0".repeat(70)),
        ] {
            assert_eq!(p(raw).unwrap_err(), Malformed::NumberOutOfRange, "{raw}");
        }
        for raw in [
            r#"{"EventType":"x","a":1e-999,"b":-0.5,"c":true,"d":false,"e":null}"#,
            r#"{"EventType":"x","a":"1e-99999 in a string","b":"\"1e-99999\""}"#,
            r#"{"EventType":"x","a":1e000000000000000000010}"#,
        ] {
            assert!(p(raw).is_ok(), "{raw}");
        }
        assert!(numbers_fit_jsonb(r#"{"s":"\\","n":12}"#));
        assert!(!numbers_fit_jsonb(r#"{"s":"\\","n":1e12345}"#));
    }

    #[test]
    fn corp_fields_that_disagree_are_refused_and_agreeing_ones_name_the_corp() {
        let p = |raw| parse(raw, Source::HttpPush, "dingdefault");
        assert_eq!(
            p(r#"{"EventType":"x","corpId":"dinga","CorpId":"dingb"}"#).unwrap_err(),
            Malformed::CorpIdsDisagree
        );
        let Ok(Parsed::Event(e)) =
            p(r#"{"EventType":"x","corpId":"","CorpId":"dinga","corpid":"dinga"}"#)
        else {
            panic!("not an event")
        };
        assert_eq!(e.corp_id, "dinga");
    }

    #[test]
    fn raw_only_keeps_the_record_and_drops_the_meaning() {
        let e = event(&task_finish_with("taskId", 7.into()));
        assert!(e.approval.is_some() && e.task.is_some());
        let kept = e.raw_only();
        assert_eq!(
            (
                &kept.corp_id,
                &kept.dedup_key,
                kept.source,
                &kept.event_type,
                &kept.raw
            ),
            (&e.corp_id, &e.dedup_key, e.source, &e.event_type, &e.raw)
        );
        assert!(kept.approval.is_none() && kept.task.is_none());
        assert!(kept.process_instance_id.is_none() && kept.event_time.is_none());
        assert!(kept.change_type.is_none() && kept.task_id.is_none());
    }
}
