//! The v1.0 family's wire (docs/dingtalk.md §11): how its answers are read into the client's
//! error classes, and its camelCase request and answer shapes translated from and into the
//! types the rest of dingsync uses (`types`), so that nothing outside `dingtalk` knows which
//! family answered. A v1.0 `get` becomes the same [`ProcessInstance`] the old `get` gives:
//! Beijing-time `yyyy-MM-dd HH:mm:ss` strings, snake_case keys in form values and operation
//! records, the task id as text (docs/dingtalk.md §11.3).
//!
//! Owns: the v1.0 shapes and the reading of v1.0 answers. Does not own: sending, retries, the
//! token (`mod.rs`, `token.rs`).

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{
    Classified, Error, quota,
    types::{CreateInstance, FormValue, IdPage, InstanceTask, ListIds, ProcessInstance},
};

/// Paths of the v1.0 calls dingsync makes (docs/dingtalk.md §11).
pub const TOKEN_PATH: &str = "/v1.0/oauth2/accessToken";
pub const CREATE_PATH: &str = "/v1.0/workflow/processInstances";
pub const GET_PATH: &str = "/v1.0/workflow/processInstances";
pub const LIST_IDS_PATH: &str = "/v1.0/workflow/processes/instanceIds/query";
pub const FORECAST_PATH: &str = "/v1.0/workflow/processes/forecast";
pub const SCHEMA_PATH: &str = "/v1.0/workflow/forms/schemas/processCodes";

/// The header that carries the access token (docs/dingtalk.md §1.3).
pub const TOKEN_HEADER: &str = "x-acs-dingtalk-access-token";

/// A v1.0 error body: `{"code", "message", "requestid"}` (docs/dingtalk.md §11.6).
#[derive(Debug, Deserialize)]
pub(super) struct ErrorBody {
    pub code: String,
    #[serde(default)]
    pub message: String,
}

/// Codes that mean "the token is refused": refresh once, retry once (docs/dingtalk.md §11.6).
/// `Unauthorized` is only listed generically; taken as a token refusal too.
const TOKEN_CODES: [&str; 3] = [
    "InvalidAuthentication",
    "AuthenticationFailed.MissingParameter",
    "Unauthorized",
];

/// 400 codes that are rate limits, not refusals of the request (docs/dingtalk.md §11.6).
const RATE_CODES: [&str; 3] = [
    "qps.exceed.limit",
    "oaplus.query.limit",
    "autoflowLikeTriggerRateLimited",
];

/// Reads a v1.0 answer by its HTTP status and body (docs/dingtalk.md §11.6):
/// - 2xx: the body is the result, except the gateway's flood-ban page (`punish`), a rate limit;
/// - 429, 403 `Forbidden.AccessDenied.Qp*` and the 400 rate codes: rate limits;
/// - `Forbidden.AccessDenied.ApiCountLimitForOrg` (whatever the status): the monthly allowance;
/// - `InvalidAuthentication`, `Unauthorized`, a missing header, or HTTP 401: the token;
/// - 5xx, `internalError`, or an answer that is not a v1.0 error body: the gateway or the server
///   failed, and a write may have been carried out (docs/dingtalk.md §11.6, "lost answers"),
///   except a 400 `internalError` that names a missing permission ([`refuses_permission`]);
/// - any other 4xx with a code: DingTalk refused the request.
pub(super) fn read_answer(status: u16, text: &str) -> Result<(), Classified> {
    let status_i = i64::from(status);
    if (200..300).contains(&status) {
        if let Ok(Value::Object(body)) = serde_json::from_str::<Value>(text)
            && body.contains_key("punish")
        {
            return Err(Classified::Rate(
                body.get("status").and_then(Value::as_i64).unwrap_or(0),
            ));
        }
        return Ok(());
    }
    if status == 429 {
        return Err(Classified::Rate(429));
    }
    let Ok(body) = serde_json::from_str::<ErrorBody>(text) else {
        if serde_json::from_str::<Value>(text).is_ok_and(|v| v.get("punish").is_some()) {
            return Err(Classified::Rate(status_i));
        }
        return Err(Classified::Gateway(format!("HTTP {status}")));
    };
    let code = body.code.as_str();
    if code == quota::V1_QUOTA_CODE {
        // Named with the old family's number too: operators and docs know it as 90020.
        return Err(Classified::Quota(format!(
            "{code} (90020): {}",
            body.message
        )));
    }
    if code.starts_with("Forbidden.AccessDenied.Qp") || RATE_CODES.contains(&code) {
        return Err(Classified::Rate(status_i));
    }
    if status == 401 || TOKEN_CODES.contains(&code) {
        return Err(Classified::Token(status_i));
    }
    if status == 400 && code == "internalError" && refuses_permission(&body.message) {
        return Err(Classified::Rejected(Error::Rejected {
            errcode: status_i,
            code: Some(body.code),
            errmsg: body.message,
        }));
    }
    if status >= 500 || code == "internalError" {
        return Err(Classified::Gateway(format!(
            "HTTP {status} {code}: {}",
            body.message
        )));
    }
    Err(Classified::Rejected(Error::Rejected {
        errcode: status_i,
        code: Some(body.code),
        errmsg: body.message,
    }))
}

/// What a 400 `internalError` says when DingTalk refuses for a missing permission rather than
/// failing: a terminate of an approval whose template does not let the submitter revoke a form
/// in progress (docs/dingtalk.md §12.3; the text names the missing permission, 权限, and older
/// texts the old family's errcode 820008). That refusal is an answer (nothing was carried out,
/// and sending again cannot change it), so it is a rejection, not a lost answer; any other
/// `internalError` stays "no answer".
fn refuses_permission(message: &str) -> bool {
    message.contains("权限") || message.contains("820008")
}

/// `POST /v1.0/oauth2/accessToken` answer (docs/dingtalk.md §1.2).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct TokenAnswer {
    pub access_token: Option<String>,
    pub expire_in: Option<i64>,
}

/// The body of `POST /v1.0/workflow/processInstances` for `r` (docs/dingtalk.md §11.2).
pub(super) fn create_body(r: &CreateInstance) -> Value {
    let mut body = Map::new();
    body.insert(
        "originatorUserId".into(),
        r.originator_user_id.clone().into(),
    );
    body.insert("processCode".into(), r.process_code.clone().into());
    body.insert("deptId".into(), r.dept_id.into());
    if let Some(agent) = r.agent_id {
        body.insert("microappAgentId".into(), agent.into());
    }
    // `approvers_v2` wins over `approvers` on the old API (docs/dingtalk.md §2.1): the same here.
    let approvers: Option<Vec<Value>> = match (&r.approvers_v2, &r.approvers) {
        (Some(nodes), _) => Some(
            nodes
                .iter()
                .map(|n| json!({"actionType": n.task_action_type, "userIds": n.user_ids}))
                .collect(),
        ),
        (None, Some(list)) => Some(
            split_users(list)
                .map(|u| json!({"actionType": "NONE", "userIds": [u]}))
                .collect(),
        ),
        (None, None) => None,
    };
    if let Some(approvers) = approvers {
        body.insert("approvers".into(), approvers.into());
    }
    if let Some(cc) = &r.cc_list {
        body.insert("ccList".into(), split_users(cc).collect::<Vec<_>>().into());
    }
    if let Some(position) = &r.cc_position {
        body.insert("ccPosition".into(), position.clone().into());
    }
    if !r.target_select_actioners.is_empty() {
        let chosen: Vec<Value> = r
            .target_select_actioners
            .iter()
            .map(|a| json!({"actionerKey": a.actioner_key, "actionerUserIds": a.user_ids}))
            .collect();
        body.insert("targetSelectActioners".into(), chosen.into());
    }
    body.insert(
        "formComponentValues".into(),
        form_values(&r.form_component_values).into(),
    );
    Value::Object(body)
}

/// Form values in v1.0's shape; a table carries its rows in `details`, one entry per row whose
/// own `details` are the row's cells, as well as the same rows as JSON text in `value`
/// (docs/dingtalk.md §11.2).
pub(super) fn form_values(values: &[FormValue]) -> Vec<Value> {
    values.iter().map(form_value).collect()
}

fn form_value(v: &FormValue) -> Value {
    let mut item = Map::new();
    item.insert("name".into(), v.name.clone().into());
    item.insert("value".into(), v.value.clone().into());
    if let Some(ext) = &v.ext_value {
        item.insert("extValue".into(), ext.clone().into());
    }
    if !v.details.is_empty() {
        let rows: Vec<Value> = v
            .details
            .iter()
            .map(|cells| {
                json!({
                    "name": v.name,
                    "value": "",
                    "details": cells.iter().map(form_value).collect::<Vec<_>>(),
                })
            })
            .collect();
        item.insert("componentType".into(), "TableField".into());
        item.insert("details".into(), rows.into());
    }
    Value::Object(item)
}

fn split_users(list: &str) -> impl Iterator<Item = String> + '_ {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct CreateAnswer {
    pub instance_id: String,
}

/// `GET /v1.0/workflow/processInstances` answer: `{"success": "true", "result": {...}}`.
#[derive(Debug, Deserialize)]
pub(super) struct GetAnswer {
    pub result: Instance,
}

/// `result` of a v1.0 get (docs/dingtalk.md §11.3), as far as dingsync reads it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Instance {
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    create_time: Option<String>,
    #[serde(default)]
    finish_time: Option<String>,
    #[serde(default)]
    originator_user_id: Option<String>,
    #[serde(default)]
    originator_dept_id: Option<Value>,
    status: String,
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    business_id: Option<String>,
    #[serde(default)]
    form_component_values: Vec<Value>,
    #[serde(default)]
    operation_records: Vec<Value>,
    #[serde(default)]
    tasks: Vec<Task>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Task {
    /// A number (Long) in this family (docs/dingtalk.md §11.3); a string is taken too.
    task_id: Value,
    #[serde(default)]
    user_id: Option<String>,
    status: String,
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    create_time: Option<String>,
    #[serde(default)]
    finish_time: Option<String>,
    #[serde(default)]
    activity_id: Option<String>,
}

impl Instance {
    /// The same instance as the old family's `get` reads it (docs/dingtalk.md §11.3).
    pub(super) fn into_legacy(self) -> ProcessInstance {
        ProcessInstance {
            title: self.title,
            create_time: self.create_time.map(|t| beijing_text(&t)),
            finish_time: self.finish_time.map(|t| beijing_text(&t)),
            originator_userid: self.originator_user_id,
            originator_dept_id: self.originator_dept_id.map(|v| match v {
                Value::String(s) => s,
                other => other.to_string(),
            }),
            status: self.status,
            result: self.result,
            business_id: self.business_id,
            form_component_values: self
                .form_component_values
                .into_iter()
                .map(legacy_form_value)
                .collect(),
            operation_records: self
                .operation_records
                .into_iter()
                .map(legacy_record)
                .collect(),
            tasks: self
                .tasks
                .into_iter()
                .map(|t| InstanceTask {
                    taskid: match t.task_id {
                        Value::String(s) => s,
                        other => other.to_string(),
                    },
                    userid: t.user_id,
                    task_status: t.status,
                    task_result: t.result,
                    create_time: t.create_time.map(|x| beijing_text(&x)),
                    finish_time: t.finish_time.map(|x| beijing_text(&x)),
                    activity_id: t.activity_id,
                })
                .collect(),
            whole_minutes: true,
        }
    }
}

/// Renames `from` to `to` in `m` when present.
fn rename(m: &mut Map<String, Value>, from: &str, to: &str) {
    if let Some(v) = m.remove(from) {
        m.insert(to.into(), v);
    }
}

/// A v1.0 form value with the old API's keys (`componentType` → `component_type`, `extValue`
/// → `ext_value`) and without the keys the old API has no counterpart for (`bizAlias`): stored
/// snapshots have one shape whichever family read them, and the outbox's lost-answer
/// comparison reads `component_type`.
fn legacy_form_value(v: Value) -> Value {
    let Value::Object(mut m) = v else { return v };
    rename(&mut m, "componentType", "component_type");
    rename(&mut m, "extValue", "ext_value");
    m.remove("bizAlias");
    Value::Object(m)
}

/// A v1.0 operation record with the old API's keys and time (`userId` → `userid`, `type` →
/// `operation_type`, `result` → `operation_result`, `date` in Beijing time), without the keys
/// the old record has no counterpart for (`showName`, `activityId`, `ccUserIds`, `images`);
/// `remark` and `attachments` are kept.
fn legacy_record(v: Value) -> Value {
    let Value::Object(mut m) = v else { return v };
    rename(&mut m, "userId", "userid");
    rename(&mut m, "type", "operation_type");
    rename(&mut m, "result", "operation_result");
    for extra in ["showName", "activityId", "ccUserIds", "images"] {
        m.remove(extra);
    }
    if let Some(Value::String(date)) = m.get("date") {
        let date = beijing_text(date);
        m.insert("date".into(), date.into());
    }
    Value::Object(m)
}

/// A v1.0 time, UTC `yyyy-MM-ddTHH:mmZ` (docs/dingtalk.md §11.3; seconds and RFC 3339 offsets
/// are taken too), as the old family's Beijing-time `yyyy-MM-dd HH:mm:ss`. Text that is no
/// such time is kept as it is, and reads as an unknown time later.
pub fn beijing_text(text: &str) -> String {
    match utc(text) {
        Some(t) => (t + chrono::Duration::hours(8))
            .format("%Y-%m-%d %H:%M:%S")
            .to_string(),
        None => text.to_string(),
    }
}

fn utc(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Some(bare) = text.strip_suffix('Z') {
        for format in [
            "%Y-%m-%dT%H:%M",
            "%Y-%m-%dT%H:%M:%S",
            "%Y-%m-%dT%H:%M:%S%.f",
        ] {
            if let Ok(t) = NaiveDateTime::parse_from_str(bare, format) {
                return Some(t.and_utc());
            }
        }
    }
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The body of `POST /v1.0/workflow/processes/instanceIds/query` for `r` (docs/dingtalk.md
/// §11.4): the old cursor is v1.0's `nextToken`.
pub(super) fn list_ids_body(r: &ListIds) -> Value {
    let mut body = json!({
        "processCode": r.process_code,
        "startTime": r.start_time,
        "nextToken": r.cursor,
        "maxResults": r.size,
    });
    if let Some(end) = r.end_time {
        body["endTime"] = end.into();
    }
    if let Some(users) = &r.userid_list {
        body["userIds"] = split_users(users).collect::<Vec<_>>().into();
    }
    if !r.statuses.is_empty() {
        body["statuses"] = r.statuses.clone().into();
    }
    body
}

#[derive(Debug, Deserialize)]
pub(super) struct ListIdsAnswer {
    pub result: ListIdsResult,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ListIdsResult {
    #[serde(default)]
    list: Vec<String>,
    /// Documented as a string (`"20"`); a number is taken too. Absent on the last page.
    #[serde(default)]
    next_token: Option<Value>,
}

impl ListIdsResult {
    /// As the old family's page. A `nextToken` that is no whole number ends the listing rather
    /// than being guessed at.
    pub(super) fn into_page(self) -> Result<IdPage, Error> {
        let next_cursor = match self.next_token {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(s.trim().parse().map_err(|_| {
                Error::Protocol(format!("instanceIds/query answered nextToken {s:?}"))
            })?),
            Some(Value::Number(n)) => Some(n.as_u64().ok_or_else(|| {
                Error::Protocol(format!("instanceIds/query answered nextToken {n}"))
            })?),
            Some(other) => {
                return Err(Error::Protocol(format!(
                    "instanceIds/query answered nextToken {other}"
                )));
            }
        };
        Ok(IdPage {
            list: self.list,
            next_cursor,
        })
    }
}

/// What the forecast (docs/dingtalk.md §11.5) says about a create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forecast {
    /// `isForecastSuccess`: DingTalk could work out the route.
    pub success: bool,
    /// The route's self-selected approver nodes: a create must name approvers for each one.
    pub select_nodes: Vec<SelectNode>,
    /// The whole `result`, as DingTalk sent it.
    pub raw: Value,
}

/// One `target_select` rule of a forecast.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectNode {
    /// `workflowActor.actorKey`: the create's `actionerKey`.
    pub actor_key: String,
    pub activity_name: String,
    pub required: bool,
    pub allowed_multi: bool,
    /// Who may be chosen, when the range is a list of people (`actorSelectionRange.approvals`).
    pub candidates: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ForecastAnswer {
    pub result: Value,
}

impl ForecastAnswer {
    pub(super) fn into_forecast(self) -> Forecast {
        let r = &self.result;
        let select_nodes = r["workflowActivityRules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|rule| {
                rule["activityType"].as_str() == Some("target_select")
                    || rule["isTargetSelect"].as_bool() == Some(true)
            })
            .map(|rule| {
                let actor = &rule["workflowActor"];
                SelectNode {
                    actor_key: actor["actorKey"].as_str().unwrap_or("").to_string(),
                    activity_name: rule["activityName"].as_str().unwrap_or("").to_string(),
                    required: actor["required"].as_bool().unwrap_or(false),
                    allowed_multi: actor["allowedMulti"].as_bool().unwrap_or(false),
                    candidates: actor["actorSelectionRange"]["approvals"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a["workNo"].as_str().map(str::to_string))
                        .collect(),
                }
            })
            .collect();
        Forecast {
            success: r["isForecastSuccess"].as_bool().unwrap_or(false),
            select_nodes,
            raw: self.result,
        }
    }
}

/// The body of `POST /v1.0/workflow/processes/forecast` for the create `r` (docs/dingtalk.md
/// §11.5): the same originator, department and form values.
pub(super) fn forecast_body(r: &CreateInstance) -> Value {
    json!({
        "processCode": r.process_code,
        // An Integer (i32) here, a Long in the create: a department id beyond i32 is sent as
        // it is, and DingTalk refuses it with its own reason.
        "deptId": r.dept_id,
        "userId": r.originator_user_id,
        "formComponentValues": form_values(&r.form_component_values),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dingtalk::types::{ApproverNode, SelectActioner};

    #[test]
    fn v1_times_become_the_old_familys_beijing_strings() {
        assert_eq!(beijing_text("2022-08-31T11:52Z"), "2022-08-31 19:52:00");
        assert_eq!(beijing_text("2022-08-31T20:52:07Z"), "2022-09-01 04:52:07");
        assert_eq!(beijing_text("not a time"), "not a time");
    }

    #[test]
    fn a_v1_get_reads_as_the_old_familys_instance() {
        let answer: GetAnswer = serde_json::from_value(json!({"success": "true", "result": {
            "title": "t", "createTime": "2022-06-18T23:30Z", "status": "COMPLETED", "result": "agree",
            "originatorUserId": "emp1", "originatorDeptId": "100",
            "formComponentValues": [{"name": "Reason", "value": "x", "componentType": "TextField", "extValue": ""}],
            "operationRecords": [{"userId": "manager1", "date": "2022-06-19T01:01Z", "type": "EXECUTE_TASK_NORMAL", "result": "AGREE", "remark": "ok"}],
            "tasks": [{"taskId": 101783623179_i64, "userId": "manager1", "status": "COMPLETED", "result": "AGREE",
                       "createTime": "2022-06-18T23:30Z", "finishTime": "2022-06-19T01:01Z", "activityId": "a1"}]
        }}))
        .unwrap();
        let p = answer.result.into_legacy();
        assert_eq!(p.originator_userid.as_deref(), Some("emp1"));
        assert_eq!(p.tasks[0].taskid, "101783623179");
        assert_eq!(
            p.tasks[0].finish_time.as_deref(),
            Some("2022-06-19 09:01:00")
        );
        assert_eq!(p.form_component_values[0]["component_type"], "TextField");
        assert_eq!(p.operation_records[0]["userid"], "manager1");
        assert_eq!(
            p.operation_records[0]["operation_type"],
            "EXECUTE_TASK_NORMAL"
        );
        assert_eq!(p.operation_records[0]["date"], "2022-06-19 09:01:00");
    }

    #[test]
    fn a_create_carries_approver_nodes_self_selected_approvers_and_table_rows() {
        let request = CreateInstance {
            process_code: "P".into(),
            originator_user_id: "emp1".into(),
            dept_id: -1,
            approvers_v2: Some(vec![ApproverNode {
                task_action_type: "OR".into(),
                user_ids: vec!["a".into(), "b".into()],
            }]),
            cc_list: Some("c1,c2".into()),
            target_select_actioners: vec![SelectActioner {
                actioner_key: "manual_1".into(),
                user_ids: vec!["fin1".into()],
            }],
            form_component_values: vec![FormValue {
                name: "Details".into(),
                value: r#"[[{"name":"Item","value":"pen"}]]"#.into(),
                details: vec![vec![FormValue {
                    name: "Item".into(),
                    value: "pen".into(),
                    ..FormValue::default()
                }]],
                ..FormValue::default()
            }],
            ..CreateInstance::default()
        };
        let body = create_body(&request);
        assert_eq!(body["approvers"][0]["actionType"], "OR");
        assert_eq!(body["ccList"], json!(["c1", "c2"]));
        assert_eq!(
            body["targetSelectActioners"],
            json!([{"actionerKey": "manual_1", "actionerUserIds": ["fin1"]}])
        );
        let table = &body["formComponentValues"][0];
        assert_eq!(table["componentType"], "TableField");
        assert_eq!(table["details"][0]["details"][0]["value"], "pen");
        // The old family's JSON is unchanged by the v1.0-only fields.
        let legacy = serde_json::to_value(&request).unwrap();
        assert!(legacy.get("target_select_actioners").is_none());
        assert!(legacy["form_component_values"][0].get("details").is_none());
    }

    #[test]
    fn v1_errors_read_into_the_clients_classes() {
        let body = |code: &str| format!(r#"{{"code":"{code}","message":"m","requestid":"r"}}"#);
        assert!(matches!(
            read_answer(403, &body(quota::V1_QUOTA_CODE)),
            Err(Classified::Quota(_))
        ));
        assert!(matches!(
            read_answer(403, &body("Forbidden.AccessDenied.QpsLimitForAppkeyAndApi")),
            Err(Classified::Rate(403))
        ));
        assert!(matches!(
            read_answer(400, &body("InvalidAuthentication")),
            Err(Classified::Token(400))
        ));
        assert!(matches!(
            read_answer(401, &body("Whatever")),
            Err(Classified::Token(401))
        ));
        assert!(matches!(
            read_answer(500, &body("systemError")),
            Err(Classified::Gateway(_))
        ));
        assert!(matches!(
            read_answer(502, "<html>bad gateway</html>"),
            Err(Classified::Gateway(_))
        ));
        // internalError: a server failure, unless it names a missing permission (§12.3).
        assert!(matches!(
            read_answer(400, &body("internalError")),
            Err(Classified::Gateway(_))
        ));
        let revoke =
            r#"{"code":"internalError","message":"没有撤销审批的任务权限","requestid":"r"}"#;
        assert!(matches!(
            read_answer(400, revoke),
            Err(Classified::Rejected(Error::Rejected { errcode: 400, .. }))
        ));
        assert!(matches!(
            read_answer(500, revoke),
            Err(Classified::Gateway(_))
        ));
        match read_answer(400, &body("processCodeError")) {
            Err(Classified::Rejected(Error::Rejected {
                errcode: 400,
                code: Some(code),
                ..
            })) => assert_eq!(code, "processCodeError"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            read_answer(200, r#"{"status":1111,"wait":5,"punish":"deny"}"#),
            Err(Classified::Rate(1111))
        ));
        assert!(read_answer(200, r#"{"instanceId":"x"}"#).is_ok());
    }

    #[test]
    fn next_token_may_be_text_or_a_number_and_is_absent_on_the_last_page() {
        let page = |v: Value| {
            serde_json::from_value::<ListIdsAnswer>(v)
                .unwrap()
                .result
                .into_page()
        };
        assert_eq!(
            page(json!({"result": {"list": ["a"], "nextToken": "20"}}))
                .unwrap()
                .next_cursor,
            Some(20)
        );
        assert_eq!(
            page(json!({"result": {"list": ["a"], "nextToken": 40}}))
                .unwrap()
                .next_cursor,
            Some(40)
        );
        assert_eq!(
            page(json!({"result": {"list": []}})).unwrap().next_cursor,
            None
        );
        assert!(page(json!({"result": {"list": [], "nextToken": "abc"}})).is_err());
    }
}
