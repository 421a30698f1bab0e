//! DingTalk's HTTP API as the daemon sees it: `gettoken` (docs/dingtalk.md §1.1), the old topapi approval
//! calls (§2.1, §2.3, §2.4) and callback management (§3), with DingTalk's exact shapes: errors
//! are HTTP 200 with a non-zero `errcode`; topapi wraps gateway errors in errcode 88 with a
//! `sub_code` (§1.3, §7). The v1.0 family's routes (`api_v1`, §11) share the gate, so every fault
//! knob, the token and the allowance apply to both, each in its family's shape.
//!
//! Every call passes the gate first (the `gate` middleware): it is counted, delayed, maybe
//! answered with a 502, a rate-limit or an injected error, its `access_token` is checked, and a
//! metered call is counted against the monthly allowance or refused with 90020 (`quota`).
//!
//! Owns: request parsing and validation, response shapes, the gate. Does not own: the approval
//! rules (`model`), state (`state`), pushes (`push`).

use std::{collections::HashMap, sync::Arc, time::Instant};

use axum::{
    Router,
    body::Bytes,
    extract::{Query, Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::Utc;
use rand::{Rng, distr::Alphanumeric};
use serde_json::{Map, Value, json};

use super::{
    api_v1,
    faults::{self, InjectedError},
    model::{
        ActionType, CcPosition, Ctx, FormInput, Instance, MAX_APPROVERS, NodeSpec, Rejection,
        StartRequest,
    },
    push,
    state::{Registration, Shared, TOKEN_EXPIRES_IN, TokenProblem},
};
use dingsync_crypto::CallbackCrypto;

/// How long a create whose response is "lost" holds the connection (real time): far longer than
/// any client waits; the emulator's shutdown ends it sooner.
const LOST_RESPONSE_HOLD: std::time::Duration = std::time::Duration::from_secs(300);
/// `listids` window and age limits (docs/dingtalk.md §2.4).
pub(crate) const LISTIDS_MAX_WINDOW_MS: i64 = 120 * 24 * 3600 * 1000;
pub(crate) const LISTIDS_MAX_AGE_MS: i64 = 365 * 24 * 3600 * 1000;
/// `listids` `size`: the doc says at most 20, the Java SDK comment 10 [UNCONFIRMED]; 20 is
/// accepted, more is an error, the stricter reading.
pub(crate) const LISTIDS_MAX_SIZE: i64 = 20;
/// `userid_list` holds at most 10 userids (docs/dingtalk.md §2.4).
pub(crate) const LISTIDS_MAX_USERS: usize = 10;
/// Largest request body the emulated API reads (DingTalk's limits are not documented; a create
/// with 150 values of 65535 characters is about 10 MiB).
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Callback tags per registration (docs/dingtalk.md §3).
const MAX_TAGS: usize = 20;

/// The DingTalk API routes, behind the gate.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/gettoken", get(gettoken))
        .route("/topapi/processinstance/create", post(create))
        .route("/topapi/processinstance/get", post(get_instance))
        .route("/topapi/processinstance/listids", post(listids))
        .route("/call_back/register_call_back", post(register))
        .route("/call_back/update_call_back", post(update))
        .route("/call_back/get_call_back", get(get_callback))
        .route("/call_back/delete_call_back", get(delete_callback))
        .route("/call_back/get_call_back_failed_result", get(failed_result))
        .merge(api_v1::routes())
        .route_layer(middleware::from_fn_with_state(shared.clone(), gate))
        .with_state(shared)
}

/// Which error style an endpoint has (docs/dingtalk.md §1.3, §7, §11.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    /// `topapi/...`: gateway errors wrapped in errcode 88 + `sub_code`; a `request_id`.
    Top,
    /// Classic oapi (`gettoken`, `call_back/...`): the code itself.
    Oapi,
    /// `v1.0/...`: HTTP 4xx/5xx with `{"code", "message", "requestid"}`.
    V1,
}

impl Family {
    fn of(endpoint: &str) -> Family {
        if endpoint.starts_with("topapi/") {
            Family::Top
        } else if endpoint.starts_with("v1.0/") {
            Family::V1
        } else {
            Family::Oapi
        }
    }
}

/// Something DingTalk answers instead of doing what was asked.
pub(crate) enum Failure {
    Token(TokenProblem),
    Injected(InjectedError),
    Rejected(Rejection),
}

pub(crate) fn request_id() -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(13)
        .map(|c| char::from(c).to_ascii_lowercase())
        .collect()
}

/// HTTP 200 and DingTalk's JSON: errors are never HTTP errors here (docs/dingtalk.md §7).
fn ok_json(family: Family, mut body: Map<String, Value>) -> Response {
    if family == Family::Top {
        body.insert("request_id".into(), request_id().into());
    }
    (StatusCode::OK, axum::Json(Value::Object(body))).into_response()
}

fn success(family: Family, fields: Value) -> Response {
    let mut body = Map::new();
    body.insert("errcode".into(), 0.into());
    body.insert("errmsg".into(), "ok".into());
    if let Value::Object(fields) = fields {
        body.extend(fields);
    }
    ok_json(family, body)
}

/// A topapi gateway error: errcode 88 and the real reason in `sub_code` (docs/dingtalk.md §1.3).
fn top_wrapped(sub_code: &str, sub_msg: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("errcode".into(), 88.into());
    m.insert("sub_code".into(), sub_code.into());
    m.insert("sub_msg".into(), sub_msg.into());
    m.insert(
        "errmsg".into(),
        format!("ding talk error[subcode={sub_code},submsg={sub_msg}]").into(),
    );
    m
}

fn plain(errcode: i64, errmsg: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("errcode".into(), errcode.into());
    m.insert("errmsg".into(), errmsg.into());
    m
}

fn failure(family: Family, f: Failure) -> Response {
    if family == Family::V1 {
        return api_v1::failure(f);
    }
    const BAD_TOKEN: &str = "不合法的access_token";
    const RATE: &str = "接口调用过于频繁，请稍后重试";
    let body = match (family, f) {
        // An empty token: sub_code 40000 on topapi (probe log, docs/dingtalk.md §1.3).
        (Family::Top, Failure::Token(TokenProblem::Missing)) => {
            top_wrapped("40000", "缺少参数 access_token")
        }
        (Family::Top, Failure::Token(TokenProblem::Invalid))
        | (Family::Top, Failure::Injected(InjectedError::TokenInvalid)) => {
            top_wrapped("40014", BAD_TOKEN)
        }
        // Classic oapi endpoints answer 40014 directly (docs/dingtalk.md §1.3).
        (Family::Oapi, Failure::Token(_))
        | (Family::Oapi, Failure::Injected(InjectedError::TokenInvalid)) => plain(40014, BAD_TOKEN),
        (Family::Top, Failure::Injected(InjectedError::RateLimit)) => top_wrapped("90002", RATE),
        (Family::Oapi, Failure::Injected(InjectedError::RateLimit)) => plain(90002, RATE),
        // Gateway / remote timeout (docs/dingtalk.md §7, PEDIA retry.md).
        (_, Failure::Injected(InjectedError::GatewayTimeout)) => {
            let mut m = plain(15, "Remote service error");
            m.insert(
                "sub_code".into(),
                "isp.top-remote-connection-timeout".into(),
            );
            m.insert("sub_msg".into(), "远程服务调用超时".into());
            m
        }
        (_, Failure::Injected(InjectedError::Busy)) => plain(-1, "系统繁忙"),
        (
            _,
            Failure::Injected(InjectedError::Custom {
                errcode,
                sub_code,
                errmsg,
            }),
        ) => {
            let mut m = plain(errcode, &errmsg);
            if let Some(sub_code) = sub_code {
                m.insert("sub_code".into(), sub_code.into());
            }
            m
        }
        (_, Failure::Rejected(r)) => plain(r.errcode, &r.errmsg),
        (
            _,
            Failure::Injected(InjectedError::V1 {
                status,
                code,
                message,
            }),
        ) => plain(i64::from(status), &format!("{code}: {message}")),
        (Family::V1, _) => unreachable!("answered by api_v1::failure"),
    };
    ok_json(family, body)
}

fn rejected(family: Family, r: Rejection) -> Response {
    failure(family, Failure::Rejected(r))
}

/// Receives the whole request, then handles it on a task of its own: DingTalk finishes a request
/// it has received even when the caller hangs up, so a create whose caller timed out may still
/// take effect (docs/dingtalk.md §7: "after a timeout, look for the instance"). Without this, a dropped
/// connection would cancel the handler and make lost answers look harmless.
async fn gate(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let req = Request::from_parts(parts, axum::body::Body::from(body));
    tokio::spawn(admit(shared, req, next))
        .await
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Counts the call, applies the API faults, checks the access token.
async fn admit(shared: Arc<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path().trim_start_matches('/');
    let family = Family::of(path);
    // A v1.0 API is a method and a path: create and get share `v1.0/workflow/processInstances`
    // and are two APIs, each with its own count, rate window and injected errors.
    let endpoint = match family {
        Family::V1 => format!("{} {path}", req.method()),
        _ => path.to_string(),
    };
    let query: HashMap<String, String> = Query::try_from_uri(req.uri())
        .map(|Query(q)| q)
        .unwrap_or_default();
    let now = Instant::now();
    let admission = shared.world().admit(&endpoint, now);
    if !admission.latency.is_zero() {
        tokio::select! {
            () = shared.shutdown.cancelled() => {}
            () = tokio::time::sleep(admission.latency) => {}
        }
    }
    if admission.http_5xx {
        return (
            StatusCode::BAD_GATEWAY,
            [("content-type", "text/html")],
            "<html><body><h1>502 Bad Gateway</h1></body></html>",
        )
            .into_response();
    }
    if admission.rate_limited {
        return failure(family, Failure::Injected(InjectedError::RateLimit));
    }
    if let Some(injected) = admission.injected {
        // A rate-limit refusal, a gateway timeout and a refused token never reach the meter
        // (docs/dingtalk.md §7: refused for QPS or lost to the network, and a refused token
        // names no organisation). An error DingTalk itself answers with (busy, a business
        // error) does: counting it is the stricter reading. Past the allowance 90020 answers
        // instead, and the queued error is used up all the same.
        if matches!(
            injected,
            InjectedError::Busy | InjectedError::Custom { .. } | InjectedError::V1 { .. }
        ) && let Err(refusal) = shared.world().quota.meter_call(&endpoint, Utc::now())
        {
            return over_allowance(family, refusal);
        }
        return failure(family, Failure::Injected(injected));
    }
    if endpoint != "gettoken" && endpoint != api_v1::TOKEN_ENDPOINT {
        // Each family takes the token where it expects it only (docs/dingtalk.md §1.3): a v1.0
        // call with `?access_token=` is one without a token.
        let given = match family {
            Family::V1 => req
                .headers()
                .get(api_v1::TOKEN_HEADER)
                .and_then(|v| v.to_str().ok()),
            _ => query.get("access_token").map(String::as_str),
        };
        let checked = shared.world().check_token(given, Instant::now());
        if let Err(problem) = checked {
            return failure(family, Failure::Token(problem));
        }
    }
    let denied = |name: &str| {
        shared
            .world()
            .faults
            .denied_families
            .iter()
            .any(|f| f == name)
    };
    match family {
        Family::V1 if path.starts_with("v1.0/workflow/") && denied("v1") => {
            return api_v1::error(
                StatusCode::FORBIDDEN,
                "Forbidden.AccessDenied.AccessTokenPermissionDenied",
                "没有调用该接口的权限",
            );
        }
        Family::Top if path.starts_with("topapi/processinstance/") && denied("legacy") => {
            return ok_json(Family::Top, top_wrapped("60011", "没有调用该接口的权限"));
        }
        _ => {}
    }
    // Counted here, before the handler runs: a call past the allowance is not carried out (a
    // create refused with 90020 creates nothing), and one that is carried out counts even when
    // its answer is lost.
    if let Err(refusal) = shared.world().quota.meter_call(&endpoint, Utc::now()) {
        return over_allowance(family, refusal);
    }
    next.run(req).await
}

/// 90020, the monthly allowance used up (docs/dingtalk.md §7). On topapi DingTalk wraps
/// gateway-level errors in errcode 88 with a `sub_code`, but the shape of a 90020 there is not
/// documented [UNCONFIRMED]: this is the plain reading, `{"errcode":90020,"errmsg",
/// "request_id"}` on topapi and `{"errcode":90020,"errmsg"}` on classic paths.
fn over_allowance(family: Family, refusal: Rejection) -> Response {
    tracing::debug!(errmsg = %refusal.errmsg, "emulator: monthly calls allowance used up (90020)");
    if family == Family::V1 {
        return api_v1::over_allowance(&refusal);
    }
    rejected(family, refusal)
}

/// `GET /gettoken?appkey=&appsecret=` (docs/dingtalk.md §1.1).
async fn gettoken(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let (Some(key), Some(secret)) = (
        query.get("appkey").filter(|k| !k.is_empty()),
        query.get("appsecret").filter(|s| !s.is_empty()),
    ) else {
        // Missing parameter: 40035 (probe log, wording [UNCONFIRMED]).
        return rejected(
            Family::Oapi,
            Rejection::param("缺少参数 appkey 或 appsecret"),
        );
    };
    if *key != shared.config.app_key || *secret != shared.config.app_secret {
        return rejected(
            Family::Oapi,
            Rejection {
                errcode: 40096,
                errmsg: "不合法的appKey或appSecret".into(),
            },
        );
    }
    // Reported as 7200 s; expires after 7200 s × time_scale of real time.
    let ttl = shared.scaled(TOKEN_EXPIRES_IN as f64);
    let token = shared.world().issue_token(Instant::now(), ttl);
    success(
        Family::Oapi,
        json!({"access_token": token, "expires_in": TOKEN_EXPIRES_IN}),
    )
}

/// Parses a topapi JSON body; anything but a JSON object is a parameter error.
pub(crate) fn body_object(body: &Bytes) -> Result<Map<String, Value>, Rejection> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Rejection::param("请求体不是合法的 JSON 对象")),
    }
}

pub(crate) fn required_str<'a>(m: &'a Map<String, Value>, key: &str) -> Result<&'a str, Rejection> {
    match m.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        None | Some(Value::Null) => Err(Rejection::param(format!("缺少参数 {key}"))),
        Some(Value::String(_)) => Err(Rejection::param(format!("缺少参数 {key}"))),
        Some(_) => Err(Rejection::param(format!("参数 {key} 必须是字符串"))),
    }
}

pub(crate) fn optional_str<'a>(
    m: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, Rejection> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Rejection::param(format!("参数 {key} 必须是字符串"))),
    }
}

/// A JSON integer (`dept_id` is a Number, docs/dingtalk.md §2.1). A string is refused: the stricter reading.
pub(crate) fn optional_int(m: &Map<String, Value>, key: &str) -> Result<Option<i64>, Rejection> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| Rejection::param(format!("参数 {key} 必须是整数"))),
    }
}

fn user_list(text: &str, key: &str) -> Result<Vec<String>, Rejection> {
    let users: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect();
    if users.len() > MAX_APPROVERS {
        return Err(Rejection::param(format!("{key} 最多 {MAX_APPROVERS} 人")));
    }
    Ok(users)
}

/// The body of `topapi/processinstance/create` (docs/dingtalk.md §2.1) as a [`StartRequest`].
fn parse_create(m: &Map<String, Value>) -> Result<StartRequest, Rejection> {
    let process_code = required_str(m, "process_code")?.to_string();
    let originator_userid = required_str(m, "originator_user_id")?.to_string();
    let dept_id =
        optional_int(m, "dept_id")?.ok_or_else(|| Rejection::param("缺少参数 dept_id"))?;
    optional_int(m, "agent_id")?;

    let nodes = match m.get("approvers_v2") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            serde_json::from_value::<Vec<NodeSpec>>(v.clone()).map_err(|_| {
                Rejection::param(
                    "approvers_v2 须为 [{\"task_action_type\":\"AND|OR|NONE\",\"user_ids\":[..]}]",
                )
            })?,
        ),
    };
    // approvers_v2 wins over approvers (docs/dingtalk.md §2.1).
    let nodes = match (nodes, optional_str(m, "approvers")?) {
        (Some(nodes), _) => Some(nodes),
        (None, Some(text)) if !text.trim().is_empty() => Some(
            user_list(text, "approvers")?
                .into_iter()
                .map(|u| NodeSpec {
                    task_action_type: ActionType::None,
                    user_ids: vec![u],
                })
                .collect(),
        ),
        (None, _) => None,
    };
    let cc = match optional_str(m, "cc_list")? {
        Some(text) => user_list(text, "cc_list")?,
        None => Vec::new(),
    };
    let cc_position = match optional_str(m, "cc_position")? {
        None | Some("") => None,
        Some("START") => Some(CcPosition::Start),
        Some("FINISH") => Some(CcPosition::Finish),
        Some("START_FINISH") => Some(CcPosition::StartFinish),
        Some(_) => {
            return Err(Rejection::param(
                "cc_position 须为 START、FINISH 或 START_FINISH",
            ));
        }
    };

    // Values are always strings (docs/dingtalk.md §2.2): a number or an object is refused.
    let values = match m.get("form_component_values") {
        Some(Value::Array(values)) => values,
        None | Some(Value::Null) => {
            return Err(Rejection::param("缺少参数 form_component_values"));
        }
        Some(_) => return Err(Rejection::param("form_component_values 必须是数组")),
    };
    let mut form = Vec::with_capacity(values.len());
    for v in values {
        let Value::Object(item) = v else {
            return Err(Rejection::param(
                "form_component_values 的元素须为 {name, value}",
            ));
        };
        let name = required_str(item, "name")?.to_string();
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
        let ext_value = optional_str(item, "ext_value")?.map(str::to_string);
        form.push(FormInput {
            name,
            value,
            ext_value,
        });
    }
    Ok(StartRequest {
        process_code,
        originator_userid,
        dept_id,
        nodes,
        select: None,
        cc,
        cc_position,
        form,
    })
}

/// `POST /topapi/processinstance/create` (docs/dingtalk.md §2.1).
async fn create(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let request = match body_object(&body).and_then(|m| parse_create(&m)) {
        Ok(r) => r,
        Err(r) => return rejected(Family::Top, r),
    };
    match start_instance(&shared, request).await {
        Ok(id) => success(Family::Top, json!({ "process_instance_id": id })),
        Err(Ok(lost)) => lost,
        Err(Err(r)) => rejected(Family::Top, r),
    }
}

/// Starts the instance a create asked for, in either family, and pushes its events. `Ok`: its
/// id, to answer with; `Err(Ok(_))`: the answer is lost (the `lose_create_response` knobs): the
/// instance exists, and this is what the held connection ends with; `Err(Err(_))`: refused.
pub(crate) async fn start_instance(
    shared: &Arc<Shared>,
    request: StartRequest,
) -> Result<String, Result<Response, Rejection>> {
    let (id, events, lose_response) = {
        let mut world = shared.world();
        let world = &mut *world;
        let mut ctx = Ctx {
            org: &world.org,
            ids: &mut world.ids,
            corp_id: &shared.config.corp_id,
            now: Utc::now(),
        };
        let (instance, events) = match Instance::start(&mut ctx, request) {
            Ok(started) => started,
            Err(r) => return Err(Err(r)),
        };
        let id = instance.process_instance_id.clone();
        world.insert_instance(instance);
        let lose = if world.faults.lose_create_response > 0 {
            world.faults.lose_create_response -= 1;
            true
        } else {
            let p = faults::probability(world.faults.lose_create_response_rate);
            p > 0.0 && world.fault_rng.random_bool(p)
        };
        (id, events, lose)
    };
    tracing::debug!(process_instance_id = %id, "emulator: approval created through the API");
    push::dispatch(shared, events);
    if lose_response {
        // Committed, but the answer never comes (docs/dingtalk.md §9, item 3): hold the
        // connection until the client gives up or the emulator stops.
        tracing::debug!(process_instance_id = %id, "emulator: fault: create response lost");
        tokio::select! {
            () = shared.shutdown.cancelled() => {}
            () = tokio::time::sleep(LOST_RESPONSE_HOLD) => {}
        }
        return Err(Ok(StatusCode::GATEWAY_TIMEOUT.into_response()));
    }
    Ok(id)
}

/// `POST /topapi/processinstance/get` (docs/dingtalk.md §2.3).
async fn get_instance(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let id = match body_object(&body)
        .and_then(|m| required_str(&m, "process_instance_id").map(str::to_string))
    {
        Ok(id) => id,
        Err(r) => return rejected(Family::Top, r),
    };
    let view = shared.world().instances.get(&id).map(Instance::get_view);
    match view {
        Some(view) => success(Family::Top, json!({ "process_instance": view })),
        None => rejected(
            Family::Top,
            Rejection::not_found(format!("审批实例不存在 process_instance_id={id}")),
        ),
    }
}

/// `POST /topapi/processinstance/listids` (docs/dingtalk.md §2.4).
async fn listids(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let page = body_object(&body).and_then(|m| {
        let process_code = required_str(&m, "process_code")?.to_string();
        let start = optional_int(&m, "start_time")?
            .ok_or_else(|| Rejection::param("缺少参数 start_time"))?;
        let now = Utc::now().timestamp_millis();
        let end = optional_int(&m, "end_time")?.unwrap_or(now);
        let size = optional_int(&m, "size")?.unwrap_or(10);
        let cursor = optional_int(&m, "cursor")?.unwrap_or(0);
        let users = match optional_str(&m, "userid_list")? {
            Some(text) => user_list(text, "userid_list")?,
            None => Vec::new(),
        };
        if !(1..=LISTIDS_MAX_SIZE).contains(&size) {
            return Err(Rejection::param(format!(
                "size 须在 1 到 {LISTIDS_MAX_SIZE} 之间"
            )));
        }
        if cursor < 0 {
            return Err(Rejection::param("cursor 不能为负数"));
        }
        if users.len() > LISTIDS_MAX_USERS {
            return Err(Rejection::param(format!(
                "userid_list 最多 {LISTIDS_MAX_USERS} 人"
            )));
        }
        if end < start {
            return Err(Rejection::param("end_time 不能早于 start_time"));
        }
        if end - start > LISTIDS_MAX_WINDOW_MS {
            return Err(Rejection::param("查询时间跨度不能超过 120 天"));
        }
        if start < now - LISTIDS_MAX_AGE_MS {
            return Err(Rejection::param("start_time 不能早于 365 天前"));
        }
        Ok(shared.world().list_ids(
            &process_code,
            start,
            end,
            &users,
            &[],
            cursor as u64,
            size as u64,
        ))
    });
    match page {
        Ok((list, next)) => {
            let mut result = json!({ "list": list });
            // Absent on the last page (docs/dingtalk.md §2.4).
            if let Some(next) = next {
                result["next_cursor"] = next.into();
            }
            success(Family::Top, json!({ "result": result }))
        }
        Err(r) => rejected(Family::Top, r),
    }
}

/// Body of register/update (docs/dingtalk.md §3), validated: tags, token, AES key, URL.
fn parse_registration(body: &Bytes) -> Result<Registration, Rejection> {
    let m = body_object(body)?;
    let tags: Vec<String> = match m.get("call_back_tag") {
        Some(Value::Array(tags)) => tags
            .iter()
            .map(|t| t.as_str().filter(|t| !t.is_empty()).map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| Rejection::param("call_back_tag 须为字符串数组"))?,
        None | Some(Value::Null) => return Err(Rejection::param("缺少参数 call_back_tag")),
        Some(_) => return Err(Rejection::param("call_back_tag 须为字符串数组")),
    };
    if tags.is_empty() || tags.len() > MAX_TAGS {
        return Err(Rejection::param(format!(
            "call_back_tag 须有 1 到 {MAX_TAGS} 项"
        )));
    }
    let token = required_str(&m, "token")?.to_string();
    // The console allows 3–32 alphanumerics, the register API ≥6 and <64 characters (docs/dingtalk.md §3,
    // third-party summary): we require what satisfies both, 6–32 alphanumerics.
    if !(6..=32).contains(&token.len()) || !token.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(Rejection::param("token 须为 6 到 32 位字母或数字"));
    }
    let aes_key = required_str(&m, "aes_key")?.to_string();
    if CallbackCrypto::new(&token, &aes_key).is_err() {
        return Err(Rejection::param("aes_key 须为 43 位字母或数字"));
    }
    let url = required_str(&m, "url")?.to_string();
    let parsed = reqwest::Url::parse(&url).map_err(|_| Rejection::param("url 不合法"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(Rejection::param("url 须为 http 或 https 地址"));
    }
    Ok(Registration {
        call_back_tag: tags,
        token,
        aes_key,
        url,
    })
}

fn callback_exists() -> Rejection {
    Rejection {
        errcode: 71006,
        errmsg: "回调地址已经存在".into(),
    }
}

fn callback_missing() -> Rejection {
    Rejection {
        errcode: 71007,
        errmsg: "回调地址不存在".into(),
    }
}

/// What register and update do after their own checks: the `check_url` handshake, which must be
/// answered with the encrypted `success` (docs/dingtalk.md §3), else 71009.
async fn handshake(shared: &Shared, registration: &Registration) -> Result<(), Rejection> {
    push::check_url(shared, registration).await.map_err(|reason| {
        tracing::info!(url = %registration.url, reason = %reason, "emulator: check_url failed; callback refused (71009)");
        Rejection {
            errcode: 71009,
            errmsg: "返回文本非success".into(),
        }
    })
}

/// `POST /call_back/register_call_back` (docs/dingtalk.md §3): 71006 when one exists, 71009 when the URL
/// does not answer the check.
async fn register(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let registration = match parse_registration(&body) {
        Ok(r) => r,
        Err(r) => return rejected(Family::Oapi, r),
    };
    if shared.world().callback.is_some() {
        return rejected(Family::Oapi, callback_exists());
    }
    if let Err(r) = handshake(&shared, &registration).await {
        return rejected(Family::Oapi, r);
    }
    {
        let mut world = shared.world();
        if world.callback.is_some() {
            return rejected(Family::Oapi, callback_exists());
        }
        world.callback = Some(registration.clone());
    }
    tracing::info!(url = %registration.url, tags = ?registration.call_back_tag, "emulator: callback registered");
    success(Family::Oapi, json!({}))
}

/// `POST /call_back/update_call_back` (docs/dingtalk.md §3): re-validates the URL; 71007 when none exists.
async fn update(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let registration = match parse_registration(&body) {
        Ok(r) => r,
        Err(r) => return rejected(Family::Oapi, r),
    };
    if shared.world().callback.is_none() {
        return rejected(Family::Oapi, callback_missing());
    }
    if let Err(r) = handshake(&shared, &registration).await {
        return rejected(Family::Oapi, r);
    }
    {
        let mut world = shared.world();
        if world.callback.is_none() {
            return rejected(Family::Oapi, callback_missing());
        }
        world.callback = Some(registration.clone());
    }
    tracing::info!(url = %registration.url, tags = ?registration.call_back_tag, "emulator: callback updated");
    success(Family::Oapi, json!({}))
}

/// `GET /call_back/get_call_back` (docs/dingtalk.md §3).
async fn get_callback(State(shared): State<Arc<Shared>>) -> Response {
    let registration = shared.world().callback.clone();
    match registration {
        Some(r) => success(
            Family::Oapi,
            json!({"call_back_tag": r.call_back_tag, "token": r.token, "aes_key": r.aes_key, "url": r.url}),
        ),
        None => rejected(Family::Oapi, callback_missing()),
    }
}

/// `GET /call_back/delete_call_back` (docs/dingtalk.md §3).
async fn delete_callback(State(shared): State<Arc<Shared>>) -> Response {
    let removed = shared.world().callback.take();
    match removed {
        Some(r) => {
            tracing::info!(url = %r.url, "emulator: callback deleted");
            success(Family::Oapi, json!({}))
        }
        None => rejected(Family::Oapi, callback_missing()),
    }
}

/// `GET /call_back/get_call_back_failed_result` (docs/dingtalk.md §3): ≤200 items, read-once, `has_more`.
async fn failed_result(State(shared): State<Arc<Shared>>) -> Response {
    let (list, has_more) = {
        let mut world = shared.world();
        let now = Instant::now();
        let (list, has_more) = world.take_failed(now);
        if shared.config.keep_events {
            let at = chrono::Utc::now();
            let handed_out = list.iter().map(|item| (at, item.clone()));
            world.failed_handed_out.extend(handed_out);
        }
        (list, has_more)
    };
    success(
        Family::Oapi,
        json!({"has_more": has_more, "failed_list": list}),
    )
}

/// Unknown paths: topapi answers errcode 22 "Invalid method" (probe, docs/dingtalk.md §7); others 404.
pub(crate) async fn fallback(req: Request) -> Response {
    let path = req.uri().path().trim_start_matches('/');
    if path.starts_with("topapi/") {
        let api = format!(
            "dingtalk.oapi.{}",
            path.trim_start_matches("topapi/").replace('/', ".")
        );
        let mut m = plain(
            22,
            &format!("Invalid method[submsg=不合法ApiName，ApiName = {api}]"),
        );
        m.insert(
            "sub_msg".into(),
            format!("不合法ApiName，ApiName = {api}").into(),
        );
        return ok_json(Family::Top, m);
    }
    (StatusCode::NOT_FOUND, "not found").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::errcode;

    fn parse(v: Value) -> Result<StartRequest, Rejection> {
        parse_create(v.as_object().unwrap())
    }

    #[test]
    fn a_create_needs_its_required_fields_and_string_values() {
        let ok = json!({"process_code": "P", "originator_user_id": "u", "dept_id": -1,
            "form_component_values": [{"name": "a", "value": "1"}]});
        assert!(parse(ok.clone()).is_ok());
        for field in [
            "process_code",
            "originator_user_id",
            "dept_id",
            "form_component_values",
        ] {
            let mut missing = ok.clone();
            missing.as_object_mut().unwrap().remove(field);
            let err = parse(missing).unwrap_err();
            assert_eq!(err.errcode, errcode::PARAM);
            assert!(err.errmsg.contains(field), "{err}");
        }
        let mut number = ok.clone();
        number["form_component_values"][0]["value"] = json!(1);
        assert!(parse(number).unwrap_err().errmsg.contains("字符串"));
        let mut dept_text = ok;
        dept_text["dept_id"] = json!("-1");
        assert!(parse(dept_text).is_err());
    }

    #[test]
    fn approvers_v2_wins_over_approvers() {
        let r = parse(json!({"process_code": "P", "originator_user_id": "u", "dept_id": 1,
            "approvers": "a,b", "approvers_v2": [{"task_action_type": "OR", "user_ids": ["c", "d"]}],
            "form_component_values": []}))
        .unwrap();
        let nodes = r.nodes.unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].task_action_type, ActionType::Or);
        let r = parse(
            json!({"process_code": "P", "originator_user_id": "u", "dept_id": 1,
            "approvers": "a, b", "form_component_values": []}),
        )
        .unwrap();
        assert_eq!(r.nodes.unwrap().len(), 2);
    }
}
