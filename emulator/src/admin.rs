//! The emulator's own JSON API under `/_emulator/…`: act as people (start approvals, agree,
//! refuse, redirect, terminate), look inside (instances, open tasks, call counts, push log,
//! failed list, callback), set faults, and read, roll over or change the monthly allowances. Not DingTalk: no DingTalk token, no faults, plain HTTP
//! status codes. Every route is a thin wrapper over [`Handle`], which Rust callers use directly.
//!
//! Every route needs `Authorization: Bearer <admin token>`: these routes start approvals and
//! push signed events into whatever database is behind the registered callback, so any local
//! process that can reach the port must not be able to use them. A request without the token, or
//! with a wrong one, gets 401 before any handler runs.
//!
//! Owns: routes, their JSON and the token check. Does not own: anything they do, or choosing the
//! token (`lib.rs`).

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{
    faults::{Faults, InjectedError},
    handle::{Handle, StartInstance, TaskAction},
    model::{Person, Template},
    quota::Allowances,
    state::AdminError,
};

pub(crate) fn router(handle: Handle, token: &str) -> Router {
    let token = AdminToken(Arc::new(Sha256::digest(token.as_bytes()).to_vec()));
    Router::new()
        .route(
            "/_emulator/instances",
            get(list_instances).post(start_instance),
        )
        .route("/_emulator/instances/{id}", get(get_instance))
        .route("/_emulator/instances/{id}/terminate", post(terminate))
        .route("/_emulator/tasks", get(open_tasks))
        .route("/_emulator/tasks/{taskid}/{action}", post(act))
        .route(
            "/_emulator/faults",
            get(get_faults).put(set_faults).delete(reset_faults),
        )
        .route("/_emulator/faults/reset", post(reset_faults))
        .route("/_emulator/faults/inject", post(inject))
        .route("/_emulator/token/revoke", post(revoke_token))
        .route("/_emulator/quota", get(quota).post(set_allowances))
        .route("/_emulator/quota/rollover", post(rollover))
        .route("/_emulator/calls", get(calls))
        .route("/_emulator/pushes", get(pushes))
        .route("/_emulator/failed", get(failed))
        .route("/_emulator/callback", get(callback))
        .route("/_emulator/templates", get(templates).post(add_template))
        .route(
            "/_emulator/templates/{process_code}/controls/{control_id}/rename",
            post(rename_control),
        )
        .route("/_emulator/people", get(people).post(add_person))
        .route("/_emulator/stream", get(stream_report))
        .route("/_emulator/stream/acks", get(stream_acks))
        .route("/_emulator/stream/delivery", post(set_delivery))
        .route("/_emulator/stream/{action}", post(stream_action))
        // route_layer: only matched admin routes are guarded; anything else falls through to
        // DingTalk's own "no such API" answer, as before.
        .route_layer(middleware::from_fn_with_state(token, require_token))
        .with_state(handle)
}

/// SHA-256 of the admin token. Comparing digests keeps the comparison constant-time whatever
/// the length of what a caller sends (a byte-wise comparison of the raw values would stop at the
/// first difference, or reveal the token's length).
#[derive(Clone)]
struct AdminToken(Arc<Vec<u8>>);

impl AdminToken {
    fn accepts(&self, headers: &HeaderMap) -> bool {
        let Some(presented) = bearer(headers) else {
            return false;
        };
        let digest = Sha256::digest(presented.as_bytes());
        bool::from(digest.as_slice().ct_eq(self.0.as_slice()))
    }
}

/// The credentials of `Authorization: Bearer <token>` (the scheme is case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
}

async fn require_token(State(token): State<AdminToken>, request: Request, next: Next) -> Response {
    if token.accepts(request.headers()) {
        return next.run(request).await;
    }
    // What was sent is not logged: it may be a near miss of the real token.
    tracing::warn!(path = %request.uri().path(), "emulator admin API: request without the right admin token refused");
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"dingsync-emulator\"")],
        Json(json!({
            "error": "the emulator's admin API needs Authorization: Bearer <admin token> (the token it printed at start-up, or the one it was configured with)"
        })),
    )
        .into_response()
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, body) = match &self {
            AdminError::NotFound(m) => (StatusCode::NOT_FOUND, json!({ "error": m })),
            AdminError::Conflict(m) => (StatusCode::CONFLICT, json!({ "error": m })),
            AdminError::Invalid(m) => (StatusCode::BAD_REQUEST, json!({ "error": m })),
            AdminError::Rejected(r) => (
                StatusCode::BAD_REQUEST,
                json!({ "error": r.errmsg, "errcode": r.errcode }),
            ),
        };
        (status, Json(body)).into_response()
    }
}

#[derive(Deserialize)]
struct InstanceFilter {
    status: Option<String>,
    process_code: Option<String>,
}

async fn list_instances(
    State(handle): State<Handle>,
    Query(filter): Query<InstanceFilter>,
) -> Response {
    let list: Vec<_> = handle
        .instances()
        .into_iter()
        .filter(|i| {
            filter
                .status
                .as_deref()
                .is_none_or(|s| s == i.status.as_str())
        })
        .filter(|i| {
            filter
                .process_code
                .as_deref()
                .is_none_or(|p| p == i.process_code)
        })
        .collect();
    Json(list).into_response()
}

async fn start_instance(
    State(handle): State<Handle>,
    Json(request): Json<StartInstance>,
) -> Result<Response, AdminError> {
    let instance = handle.start_instance(request)?;
    Ok((StatusCode::CREATED, Json(instance)).into_response())
}

async fn get_instance(
    State(handle): State<Handle>,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    let instance = handle
        .instance(&id)
        .ok_or_else(|| AdminError::NotFound(format!("no instance {id}")))?;
    Ok(Json(instance).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TerminateBody {
    #[serde(default)]
    userid: Option<String>,
    #[serde(default)]
    remark: Option<String>,
}

async fn terminate(
    State(handle): State<Handle>,
    Path(id): Path<String>,
    body: Option<Json<TerminateBody>>,
) -> Result<Response, AdminError> {
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let instance = handle.terminate(&id, body.userid, body.remark)?;
    Ok(Json(instance).into_response())
}

async fn open_tasks(State(handle): State<Handle>) -> Response {
    Json(handle.open_tasks()).into_response()
}

async fn act(
    State(handle): State<Handle>,
    Path((taskid, action)): Path<(i64, String)>,
    body: Option<Json<TaskAction>>,
) -> Result<Response, AdminError> {
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let instance = match action.as_str() {
        "agree" => handle.agree(taskid, body)?,
        "refuse" => handle.refuse(taskid, body)?,
        "redirect" => handle.redirect(taskid, body)?,
        other => {
            return Err(AdminError::NotFound(format!(
                "no action {other}; use agree, refuse or redirect"
            )));
        }
    };
    Ok(Json(instance).into_response())
}

async fn get_faults(State(handle): State<Handle>) -> Response {
    Json(handle.faults()).into_response()
}

async fn set_faults(State(handle): State<Handle>, Json(faults): Json<Faults>) -> Response {
    handle.set_faults(faults);
    Json(handle.faults()).into_response()
}

async fn reset_faults(State(handle): State<Handle>) -> Response {
    handle.reset_faults();
    Json(handle.faults()).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectBody {
    endpoint: String,
    error: InjectedError,
    #[serde(default = "one")]
    count: u32,
}

fn one() -> u32 {
    1
}

async fn inject(State(handle): State<Handle>, Json(body): Json<InjectBody>) -> Response {
    handle.inject(&body.endpoint, body.error, body.count);
    Json(handle.faults()).into_response()
}

async fn revoke_token(State(handle): State<Handle>) -> StatusCode {
    handle.revoke_token();
    StatusCode::NO_CONTENT
}

async fn quota(State(handle): State<Handle>) -> Response {
    Json(handle.quota()).into_response()
}

/// `{"monthly_calls"?, "monthly_deliveries"?}`: the organisation upgraded (or downgraded).
async fn set_allowances(
    State(handle): State<Handle>,
    Json(allowances): Json<Allowances>,
) -> Response {
    Json(handle.set_allowances(allowances)).into_response()
}

/// A new month; the answer is the report of the month just ended.
async fn rollover(State(handle): State<Handle>) -> Response {
    Json(handle.rollover()).into_response()
}

async fn calls(State(handle): State<Handle>) -> Response {
    Json(handle.all_calls()).into_response()
}

async fn pushes(State(handle): State<Handle>) -> Response {
    Json(json!({
        "in_flight": handle.pushes_in_flight(),
        "log": handle.push_log(),
    }))
    .into_response()
}

async fn failed(State(handle): State<Handle>) -> Response {
    Json(json!({ "pending": handle.failed_pending() })).into_response()
}

/// The registration without its secrets.
async fn callback(State(handle): State<Handle>) -> Response {
    match handle.callback() {
        Some(r) => {
            Json(json!({ "registered": true, "url": r.url, "call_back_tag": r.call_back_tag }))
                .into_response()
        }
        None => Json(json!({ "registered": false })).into_response(),
    }
}

async fn templates(State(handle): State<Handle>) -> Response {
    Json(handle.templates()).into_response()
}

async fn add_template(
    State(handle): State<Handle>,
    Json(template): Json<Template>,
) -> Result<StatusCode, AdminError> {
    handle
        .add_template(template)
        .map_err(AdminError::Rejected)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /_emulator/templates/{process_code}/controls/{control_id}/rename`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Rename {
    label: String,
}

async fn rename_control(
    State(handle): State<Handle>,
    Path((process_code, control_id)): Path<(String, String)>,
    Json(rename): Json<Rename>,
) -> Result<StatusCode, AdminError> {
    handle
        .rename_control(&process_code, &control_id, &rename.label)
        .map_err(AdminError::Rejected)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn people(State(handle): State<Handle>) -> Response {
    Json(handle.people()).into_response()
}

async fn add_person(
    State(handle): State<Handle>,
    Json(person): Json<Person>,
) -> Result<StatusCode, AdminError> {
    handle.add_person(person).map_err(AdminError::Rejected)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn stream_report(State(handle): State<Handle>) -> Response {
    Json(handle.stream_report()).into_response()
}

async fn stream_acks(State(handle): State<Handle>) -> Response {
    Json(handle.stream_acks()).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveryBody {
    delivery: crate::Delivery,
}

async fn set_delivery(State(handle): State<Handle>, Json(body): Json<DeliveryBody>) -> Response {
    handle.set_delivery(body.delivery);
    Json(json!({ "delivery": body.delivery })).into_response()
}

/// `{"connection": id}` names one connection; an empty body, all of them.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConnectionBody {
    #[serde(default)]
    connection: Option<u64>,
}

/// `POST /_emulator/stream/{drop|disconnect|silence}`.
async fn stream_action(
    State(handle): State<Handle>,
    Path(action): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let body: ConnectionBody = if body.is_empty() {
        ConnectionBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({ "error": e.to_string() })),
                )
                    .into_response();
            }
        }
    };
    let told = match action.as_str() {
        "drop" => handle.stream_drop(body.connection),
        "disconnect" => handle.stream_disconnect(body.connection),
        "silence" => handle.stream_silence(body.connection),
        other => {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({ "error": format!("no stream action {other}: drop, disconnect, silence") })),
            )
                .into_response();
        }
    };
    Json(json!({ "connections": told })).into_response()
}
