//! The emulator's own JSON API under `/_emulator/…`: act as people (start approvals, agree,
//! refuse, redirect, terminate), look inside (instances, open tasks, call counts, push log,
//! failed list, callback), and set faults. Not DingTalk: no token, no faults, plain HTTP status
//! codes. Every route is a thin wrapper over [`Handle`], which Rust callers use directly.
//!
//! Owns: routes and their JSON. Does not own: anything they do.

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::json;

use super::{
    faults::{Faults, InjectedError},
    handle::{Handle, StartInstance, TaskAction},
    model::{Person, Template},
    state::AdminError,
};

pub(crate) fn router(handle: Handle) -> Router {
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
        .route("/_emulator/calls", get(calls))
        .route("/_emulator/pushes", get(pushes))
        .route("/_emulator/failed", get(failed))
        .route("/_emulator/callback", get(callback))
        .route("/_emulator/templates", get(templates).post(add_template))
        .route("/_emulator/people", get(people).post(add_person))
        .with_state(handle)
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
