//! DingTalk's v1.0 family (docs/dingtalk.md §11) over the same state as the old one (`api`): the
//! token (`/v1.0/oauth2/accessToken`), create, get, list ids, forecast and the form schema, with
//! v1.0's shapes: camelCase JSON, the token in the `x-acs-dingtalk-access-token` header, UTC
//! `yyyy-MM-ddTHH:mmZ` times, `taskId` a number, and errors as HTTP 4xx/5xx with
//! `{"code", "message", "requestid"}` (§11.6).
//!
//! The routes sit behind `api`'s gate, so latency, 5xx, rate limits, injected errors, token
//! revocation, lost create answers and the monthly allowance apply here too; this file renders
//! them in v1.0's shape ([`failure`], [`over_allowance`]). Where DingTalk's documentation leaves a
//! v1.0 detail open the stricter reading is taken and said so.
//!
//! Owns: v1.0 request parsing, v1.0 answers and error codes. Does not own: the gate and the old
//! family (`api`), the approval rules, the views and the forecast (`model`), state (`state`).

use std::{collections::HashMap, sync::Arc, time::Instant};

use axum::{
    Router,
    body::Bytes,
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::Utc;
use serde_json::{Map, Value, json};

use super::{
    api::{
        self, Failure, LISTIDS_MAX_AGE_MS, LISTIDS_MAX_SIZE, LISTIDS_MAX_USERS,
        LISTIDS_MAX_WINDOW_MS, optional_int, optional_str, required_str,
    },
    faults::InjectedError,
    model::{
        ActionType, CcPosition, FormInput, InstanceStatus, MAX_APPROVERS, MAX_FORM_VALUES,
        NodeSpec, Rejection, SelectChoice, StartRequest, select_code,
    },
    quota::OVER_ALLOWANCE,
    state::{Shared, TOKEN_EXPIRES_IN, TokenProblem},
};

/// The token endpoint as the gate names it (not behind the token check, not metered). The gate
/// names a v1.0 API by method and path: `"POST v1.0/workflow/processInstances"` (create) and
/// `"GET v1.0/workflow/processInstances"` (get) are two APIs.
pub(crate) const TOKEN_ENDPOINT: &str = "POST v1.0/oauth2/accessToken";
/// Where v1.0 takes the token (docs/dingtalk.md §1.3).
pub(crate) const TOKEN_HEADER: &str = "x-acs-dingtalk-access-token";
/// `ccList` holds at most 50 users in v1.0 (docs/dingtalk.md §11.2).
const MAX_CC: usize = 50;

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1.0/oauth2/accessToken", post(access_token))
        .route(
            "/v1.0/workflow/processInstances",
            post(create).get(get_instance),
        )
        .route("/v1.0/workflow/processes/instanceIds/query", post(list_ids))
        .route("/v1.0/workflow/processes/forecast", post(forecast))
        .route("/v1.0/workflow/forms/schemas/processCodes", get(schema))
}

/// A v1.0 error: `status` and `{"code", "message", "requestid"}` (docs/dingtalk.md §11.6).
pub(crate) fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"code": code, "message": message, "requestid": api::request_id()});
    (
        status,
        [("content-type", "application/json;charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

fn ok(body: Value) -> Response {
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// Which v1.0 call a refusal answers: the codes differ (docs/dingtalk.md §11.2–§11.5).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Create,
    Get,
    List,
    Forecast,
    Schema,
}

/// v1.0's code for a refusal of the approval rules (`model`). The model words its refusals for
/// the old API; their kind is read from the words, and the self-selected approver refusals
/// carry v1.0's code as their prefix.
fn code_of(r: &Rejection, call: Call) -> &'static str {
    let m = r.errmsg.as_str();
    if m.starts_with(select_code::MISSING) {
        return select_code::MISSING;
    }
    if m.starts_with(select_code::SCOPE) {
        return select_code::SCOPE;
    }
    if m.starts_with("审批模板不存在") {
        return match call {
            Call::Schema => "aflowProcessCodeIsError",
            _ => "processCodeError",
        };
    }
    if m.starts_with("审批实例不存在") {
        return "processInstanceNotExist";
    }
    if m.starts_with("找不到该用户") {
        return "userNotExist";
    }
    if m.starts_with("表单") {
        return match call {
            Call::Forecast => "forecastError",
            _ => "formConverterError",
        };
    }
    "invalidParameter"
}

fn refused(r: Rejection, call: Call) -> Response {
    if r.errcode == OVER_ALLOWANCE {
        return over_allowance(&r);
    }
    error(StatusCode::BAD_REQUEST, code_of(&r, call), &r.errmsg)
}

/// Past the monthly allowance: HTTP 403 `Forbidden.AccessDenied.ApiCountLimitForOrg`
/// (docs/dingtalk.md §11.6; the status is not documented, 403 is what a real client checks).
pub(crate) fn over_allowance(refusal: &Rejection) -> Response {
    error(
        StatusCode::FORBIDDEN,
        "Forbidden.AccessDenied.ApiCountLimitForOrg",
        &refusal.errmsg,
    )
}

/// What the gate decided instead of the call, in v1.0's shape (docs/dingtalk.md §11.6).
pub(crate) fn failure(f: Failure) -> Response {
    const BAD_TOKEN: &str = "不合法的access_token";
    match f {
        Failure::Token(TokenProblem::Missing) => error(
            StatusCode::BAD_REQUEST,
            "AuthenticationFailed.MissingParameter",
            "缺少参数 x-acs-dingtalk-access-token",
        ),
        Failure::Token(TokenProblem::Invalid) | Failure::Injected(InjectedError::TokenInvalid) => {
            error(StatusCode::BAD_REQUEST, "InvalidAuthentication", BAD_TOKEN)
        }
        // Over this app's QPS for this API: 403, not 429 (docs/dingtalk.md §11.6).
        Failure::Injected(InjectedError::RateLimit) => error(
            StatusCode::FORBIDDEN,
            "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi",
            "接口调用过于频繁，请稍后重试",
        ),
        Failure::Injected(InjectedError::GatewayTimeout) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "operationTimeout",
            "远程服务调用超时",
        ),
        Failure::Injected(InjectedError::Busy) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "serviceBusy", "系统繁忙")
        }
        // An old-style errcode injected for a v1.0 call: 90020 is the allowance; any other is a
        // business refusal named by its sub_code (or the number).
        Failure::Injected(InjectedError::Custom {
            errcode,
            sub_code,
            errmsg,
        }) => {
            if errcode == OVER_ALLOWANCE {
                return over_allowance(&Rejection { errcode, errmsg });
            }
            let code = sub_code.unwrap_or_else(|| errcode.to_string());
            error(StatusCode::BAD_REQUEST, &code, &errmsg)
        }
        Failure::Injected(InjectedError::V1 {
            status,
            code,
            message,
        }) => error(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            &code,
            &message,
        ),
        Failure::Rejected(r) => refused(r, Call::Create),
    }
}

/// A JSON object body; anything else is `invalidParameter`.
fn object(body: &Bytes) -> Result<Map<String, Value>, Rejection> {
    api::body_object(body)
}

fn string_list(m: &Map<String, Value>, key: &str) -> Result<Vec<String>, Rejection> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().filter(|s| !s.is_empty()).map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| Rejection::param(format!("参数 {key} 须为字符串数组"))),
        Some(_) => Err(Rejection::param(format!("参数 {key} 须为字符串数组"))),
    }
}

/// `POST /v1.0/oauth2/accessToken` (docs/dingtalk.md §1.2): the same token as `gettoken` while
/// it is valid (one token serves both families, §11.1).
async fn access_token(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let m = match object(&body) {
        Ok(m) => m,
        Err(r) => return error(StatusCode::BAD_REQUEST, "invalidParameter", &r.errmsg),
    };
    let (Some(key), Some(secret)) = (
        m.get("appKey")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty()),
        m.get("appSecret")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty()),
    ) else {
        return error(
            StatusCode::BAD_REQUEST,
            "MissingParameter",
            "缺少参数 appKey 或 appSecret",
        );
    };
    if key != shared.config.app_key || secret != shared.config.app_secret {
        return error(
            StatusCode::BAD_REQUEST,
            "invalidClientIdOrSecret",
            "无效的clientId或者clientSecret",
        );
    }
    let ttl = shared.scaled(TOKEN_EXPIRES_IN as f64);
    let token = shared.world().issue_token(Instant::now(), ttl);
    ok(json!({"accessToken": token, "expireIn": TOKEN_EXPIRES_IN}))
}

/// One `formComponentValues` item as the model's form input. A table's rows may come in
/// `details` (each row an entry whose own `details` are its cells, docs/dingtalk.md §11.2): then
/// they are the value, as the old API's JSON text of rows.
fn form_input(item: &Value) -> Result<FormInput, Rejection> {
    let Value::Object(item) = item else {
        return Err(Rejection::param(
            "formComponentValues 的元素须为 {name, value}",
        ));
    };
    let name = required_str(item, "name")?.to_string();
    let details = match item.get("details") {
        None | Some(Value::Null) => None,
        Some(Value::Array(rows)) if rows.is_empty() => None,
        Some(Value::Array(rows)) => {
            let mut table = Vec::with_capacity(rows.len());
            for row in rows {
                let cells = row
                    .get("details")
                    .and_then(Value::as_array)
                    .ok_or_else(|| {
                        Rejection::param(format!(
                            "表单值不合法 name={name} (details 的每行须有 details)"
                        ))
                    })?;
                let cells: Vec<Value> = cells
                    .iter()
                    .map(|cell| {
                        let cell = form_input(cell)?;
                        Ok(json!({"name": cell.name, "value": cell.value}))
                    })
                    .collect::<Result<_, Rejection>>()?;
                table.push(Value::Array(cells));
            }
            Some(Value::Array(table).to_string())
        }
        Some(_) => {
            return Err(Rejection::param(format!(
                "表单值不合法 name={name} (details 须为数组)"
            )));
        }
    };
    // `value` is required and a string (docs/dingtalk.md §11.2), rows in `details` or not.
    let value = match item.get("value") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => {
            return Err(Rejection::param(format!("表单项 {name} 缺少 value")));
        }
        Some(_) => {
            return Err(Rejection::param(format!(
                "表单项 {name} 的 value 必须是字符串"
            )));
        }
    };
    Ok(FormInput {
        name,
        value: details.unwrap_or(value),
        ext_value: optional_str(item, "extValue")?.map(str::to_string),
    })
}

fn form_inputs(m: &Map<String, Value>) -> Result<Vec<FormInput>, Rejection> {
    match m.get("formComponentValues") {
        Some(Value::Array(values)) if values.len() > MAX_FORM_VALUES => Err(Rejection::param(
            format!("formComponentValues 最多 {MAX_FORM_VALUES} 项"),
        )),
        Some(Value::Array(values)) => values.iter().map(form_input).collect(),
        None | Some(Value::Null) => Err(Rejection::param("缺少参数 formComponentValues")),
        Some(_) => Err(Rejection::param("formComponentValues 必须是数组")),
    }
}

/// The body of the v1.0 create (docs/dingtalk.md §11.2) as a [`StartRequest`].
fn parse_create(m: &Map<String, Value>) -> Result<StartRequest, Rejection> {
    let originator_userid = required_str(m, "originatorUserId")?.to_string();
    let process_code = required_str(m, "processCode")?.to_string();
    optional_int(m, "microappAgentId")?;
    let nodes = match m.get("approvers") {
        None | Some(Value::Null) => None,
        Some(Value::Array(nodes)) => {
            if nodes.len() > MAX_APPROVERS {
                return Err(Rejection::param(format!("审批节点最多 {MAX_APPROVERS} 个")));
            }
            let mut specs = Vec::with_capacity(nodes.len());
            for node in nodes {
                let action = match node.get("actionType").and_then(Value::as_str) {
                    Some("AND") => ActionType::And,
                    Some("OR") => ActionType::Or,
                    Some("NONE") | None => ActionType::None,
                    Some(other) => {
                        return Err(Rejection::param(format!(
                            "actionType 须为 AND、OR 或 NONE，不能是 {other}"
                        )));
                    }
                };
                let Some(Value::Object(node)) = Some(node) else {
                    return Err(Rejection::param("approvers 的元素须为对象"));
                };
                specs.push(NodeSpec {
                    task_action_type: action,
                    user_ids: string_list(node, "userIds")?,
                });
            }
            (!specs.is_empty()).then_some(specs)
        }
        Some(_) => return Err(Rejection::param("approvers 必须是数组")),
    };
    // Required when no approvers are given (docs/dingtalk.md §11.2); otherwise the root.
    let dept_id = match optional_int(m, "deptId")? {
        Some(id) => id,
        None if nodes.is_some() => -1,
        None => return Err(Rejection::param("缺少参数 deptId")),
    };
    let cc = string_list(m, "ccList")?;
    if cc.len() > MAX_CC {
        return Err(Rejection::param(format!("ccList 最多 {MAX_CC} 人")));
    }
    let cc_position = match optional_str(m, "ccPosition")? {
        None | Some("") => None,
        Some("START") => Some(CcPosition::Start),
        Some("FINISH") => Some(CcPosition::Finish),
        Some("START_FINISH") => Some(CcPosition::StartFinish),
        Some(_) => {
            return Err(Rejection::param(
                "ccPosition 须为 START、FINISH 或 START_FINISH",
            ));
        }
    };
    let select = match m.get("targetSelectActioners") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                let Value::Object(item) = item else {
                    return Err(Rejection::param("targetSelectActioners 的元素须为对象"));
                };
                Ok(SelectChoice {
                    actor_key: required_str(item, "actionerKey")?.to_string(),
                    user_ids: string_list(item, "actionerUserIds")?,
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(Rejection::param("targetSelectActioners 必须是数组")),
    };
    Ok(StartRequest {
        process_code,
        originator_userid,
        dept_id,
        nodes,
        select: Some(select),
        cc,
        cc_position,
        form: form_inputs(m)?,
    })
}

/// `POST /v1.0/workflow/processInstances` (docs/dingtalk.md §11.2): `{"instanceId"}`.
async fn create(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let request = match object(&body).and_then(|m| parse_create(&m)) {
        Ok(r) => r,
        Err(r) => return refused(r, Call::Create),
    };
    match api::start_instance(&shared, request).await {
        Ok(id) => ok(json!({ "instanceId": id })),
        Err(Ok(lost)) => lost,
        Err(Err(r)) => refused(r, Call::Create),
    }
}

/// `GET /v1.0/workflow/processInstances?processInstanceId=` (docs/dingtalk.md §11.3).
async fn get_instance(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(id) = query.get("processInstanceId").filter(|id| !id.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "processInstanceIdError",
            "缺少参数 processInstanceId",
        );
    };
    let view = shared.world().instances.get(id).map(|i| i.v1_view());
    match view {
        // `success` is documented as the string "true" (docs/dingtalk.md §11.3).
        Some(view) => ok(json!({"success": "true", "result": view})),
        None => refused(
            Rejection::not_found(format!("审批实例不存在 processInstanceId={id}")),
            Call::Get,
        ),
    }
}

/// `POST /v1.0/workflow/processes/instanceIds/query` (docs/dingtalk.md §11.4): the old
/// `listids` with `nextToken`/`maxResults`, `userIds` as an array and a `statuses` filter.
async fn list_ids(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let page = object(&body).and_then(|m| {
        let process_code = required_str(&m, "processCode")?.to_string();
        let start =
            optional_int(&m, "startTime")?.ok_or_else(|| Rejection::param("缺少参数 startTime"))?;
        let now = Utc::now().timestamp_millis();
        let end = optional_int(&m, "endTime")?.unwrap_or(now);
        let size = optional_int(&m, "maxResults")?.unwrap_or(LISTIDS_MAX_SIZE);
        let cursor = optional_int(&m, "nextToken")?.unwrap_or(0);
        let users = string_list(&m, "userIds")?;
        let statuses = string_list(&m, "statuses")?
            .iter()
            .map(|s| match s.as_str() {
                "NEW" => Ok(InstanceStatus::New),
                "RUNNING" => Ok(InstanceStatus::Running),
                "COMPLETED" => Ok(InstanceStatus::Completed),
                "TERMINATED" => Ok(InstanceStatus::Terminated),
                "CANCELED" => Ok(InstanceStatus::Canceled),
                other => Err(Rejection::param(format!("statuses 不支持 {other}"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !(1..=LISTIDS_MAX_SIZE).contains(&size) {
            return Err(Rejection::param(format!(
                "maxResults 须在 1 到 {LISTIDS_MAX_SIZE} 之间"
            )));
        }
        if cursor < 0 {
            return Err(Rejection::param("nextToken 不能为负数"));
        }
        if users.len() > LISTIDS_MAX_USERS {
            return Err(Rejection::param(format!(
                "userIds 最多 {LISTIDS_MAX_USERS} 人"
            )));
        }
        if end < start {
            return Err(Rejection::param("endTime 不能早于 startTime"));
        }
        if end - start > LISTIDS_MAX_WINDOW_MS {
            return Err(Rejection::param("查询时间跨度不能超过 120 天"));
        }
        if start < now - LISTIDS_MAX_AGE_MS {
            return Err(Rejection::param("startTime 不能早于 365 天前"));
        }
        Ok(shared.world().list_ids(
            &process_code,
            start,
            end,
            &users,
            &statuses,
            cursor as u64,
            size as u64,
        ))
    });
    match page {
        Ok((list, next)) => {
            let mut result = json!({ "list": list });
            // A string, absent on the last page (docs/dingtalk.md §11.4).
            if let Some(next) = next {
                result["nextToken"] = next.to_string().into();
            }
            ok(json!({"success": true, "result": result}))
        }
        Err(r) => refused(r, Call::List),
    }
}

/// `POST /v1.0/workflow/processes/forecast` (docs/dingtalk.md §11.5): the route a create would
/// take, from the template's flow; nothing is created.
async fn forecast(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let answer = object(&body).and_then(|m| {
        let process_code = required_str(&m, "processCode")?.to_string();
        let userid = required_str(&m, "userId")?.to_string();
        // An Integer (i32), required (docs/dingtalk.md §11.5).
        let dept =
            optional_int(&m, "deptId")?.ok_or_else(|| Rejection::param("缺少参数 deptId"))?;
        if i32::try_from(dept).is_err() {
            return Err(Rejection::param("deptId 超出范围"));
        }
        let form = form_inputs(&m)?;
        let mut world = shared.world();
        let world = &mut *world;
        world
            .org
            .forecast(&process_code, &userid, &form, &mut world.ids)
    });
    match answer {
        Ok(result) => ok(json!({ "result": result })),
        Err(r) => refused(r, Call::Forecast),
    }
}

/// `GET /v1.0/workflow/forms/schemas/processCodes?processCode=` (docs/dingtalk.md §2.5): the
/// template's controls as schema items (`forms::schema_result`: select options as JSON-encoded
/// `{"value","key"}` object strings, the form real answers were seen in, [UNCONFIRMED] which
/// the server sends).
async fn schema(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(code) = query.get("processCode").filter(|c| !c.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalidParameter",
            "缺少参数 processCode",
        );
    };
    let template = shared.world().org.templates.get(code).cloned();
    let Some(template) = template else {
        return refused(
            Rejection::not_found(format!("审批模板不存在 process_code={code}")),
            Call::Schema,
        );
    };
    ok(json!({"result": crate::forms::schema_result(&template, &shared.config.corp_id)}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<StartRequest, Rejection> {
        parse_create(v.as_object().unwrap())
    }

    #[test]
    fn a_v1_create_needs_its_required_fields_and_takes_table_rows_in_details() {
        let ok = json!({"originatorUserId": "emp1", "processCode": "P", "deptId": -1,
            "formComponentValues": [{"name": "a", "value": "1"}]});
        assert!(parse(ok.clone()).is_ok());
        for field in ["originatorUserId", "processCode", "formComponentValues"] {
            let mut missing = ok.clone();
            missing.as_object_mut().unwrap().remove(field);
            assert!(parse(missing).unwrap_err().errmsg.contains(field));
        }
        let mut no_dept = ok.clone();
        no_dept.as_object_mut().unwrap().remove("deptId");
        assert!(parse(no_dept.clone()).is_err(), "deptId without approvers");
        no_dept["approvers"] = json!([{"actionType": "NONE", "userIds": ["manager1"]}]);
        assert_eq!(parse(no_dept).unwrap().dept_id, -1);
        let table = parse(json!({"originatorUserId": "emp1", "processCode": "P", "deptId": 1,
            "formComponentValues": [{"name": "Details", "value": "", "componentType": "TableField",
                "details": [{"name": "Details", "value": "", "details": [{"name": "Item", "value": "pen"}]}]}]}))
        .unwrap();
        assert_eq!(table.form[0].value, r#"[[{"name":"Item","value":"pen"}]]"#);
        let mut number = ok;
        number["formComponentValues"][0]["value"] = json!(1);
        assert!(parse(number).is_err());
    }

    #[test]
    fn refusals_get_v1_codes() {
        let r = |m: &str| Rejection::param(m);
        assert_eq!(
            code_of(&r("审批模板不存在 process_code=X"), Call::Create),
            "processCodeError"
        );
        assert_eq!(
            code_of(&r("表单必填项未填写 name=Reason"), Call::Create),
            "formConverterError"
        );
        assert_eq!(
            code_of(&r("表单必填项未填写 name=Reason"), Call::Forecast),
            "forecastError"
        );
        assert_eq!(
            code_of(&r("targetSelectApproverMissing: x"), Call::Create),
            "targetSelectApproverMissing"
        );
        assert_eq!(code_of(&r("anything"), Call::List), "invalidParameter");
    }
}
