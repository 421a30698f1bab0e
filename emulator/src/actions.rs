//! DingTalk's v1.0 actions on approvals (docs/dingtalk.md §12): execute a task (agree or
//! refuse), terminate an instance, add a comment, redirect a task. Each checks what DingTalk
//! checks and answers its documented error codes (HTTP 4xx/5xx with `{"code", "message",
//! "requestid"}`), and carries the action out through the same rules (`model`) and the same push
//! machinery (`push`) as a person acting in the app, so it produces the same events and
//! operation records.
//!
//! Which code DingTalk answers for a task already handled, a wrong actioner or a finished
//! instance is not documented (docs/dingtalk.md §12.2); the emulator answers the most likely
//! ones: `aflowProcessInstCanNotBeExecuted` (task not RUNNING), `aflowProcessInstStatusException`
//! (instance not RUNNING), `needAuth` (not the task's approver). Every one of them is a
//! permanent refusal to a client: the stricter reading, since a client that took one for "maybe
//! done" would hide a doubled action.
//!
//! The fault `lose_response` makes a call take effect and then never answer (docs/dingtalk.md
//! §12.6: a write whose answer is lost).
//!
//! Owns: these four endpoints, their validation, codes and answers. Does not own: the approval
//! rules (`model`), pushes (`push`), the gate in front of them (`api`: the token header, faults,
//! the allowance, rendered in v1.0's shapes by `api_v1`).

use std::{collections::HashMap, sync::Arc};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use chrono::Utc;
use serde_json::{Map, Value, json};

use super::{
    api::LOST_RESPONSE_HOLD,
    model::{ActError, Action, Ctx, Event, InstanceStatus, TaskStatus},
    push,
    state::{Shared, World},
};

/// The four APIs as the gate names them (method and path): for call counts, injected errors and
/// the `lose_response` fault.
pub const EXECUTE: &str = "POST v1.0/workflow/processInstances/execute";
pub const TERMINATE: &str = "POST v1.0/workflow/processInstances/terminate";
pub const COMMENTS: &str = "POST v1.0/workflow/processInstances/comments";
pub const REDIRECT: &str = "POST v1.0/workflow/tasks/redirect";

/// Longest remark of an execute or terminate, and comment text (docs/dingtalk.md §12).
const MAX_REMARK: usize = 1024;
/// Longest remark of a redirect.
const MAX_REDIRECT_REMARK: usize = 256;
/// No terminate within this many DingTalk seconds of the submission (docs/dingtalk.md §12.3).
const TERMINATE_GUARD_SECS: f64 = 15.0;
/// The message DingTalk gives for a terminate within those 15 s (docs/dingtalk.md §12.3).
pub const TOO_SOON: &str = "提交审批后 15 秒内不允许撤销";

/// The action routes; `api` puts them behind its gate with the rest of the v1.0 family.
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1.0/workflow/processInstances/execute", post(execute))
        .route("/v1.0/workflow/processInstances/terminate", post(terminate))
        .route("/v1.0/workflow/processInstances/comments", post(comments))
        .route("/v1.0/workflow/tasks/redirect", post(redirect))
}

/// A v1.0 error answer: the HTTP status and `{"code", "message", "requestid"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct V1Error {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl V1Error {
    fn bad(code: &'static str, message: impl Into<String>) -> V1Error {
        V1Error {
            status: 400,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for V1Error {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let body = json!({
            "code": self.code,
            "message": self.message,
            "requestid": request_id(),
        });
        (status, axum::Json(body)).into_response()
    }
}

fn request_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    format!(
        "{:08X}-{:04X}-{:04X}-{:04X}-{:012X}",
        rng.random::<u32>(),
        rng.random::<u16>(),
        rng.random::<u16>(),
        rng.random::<u16>(),
        rng.random::<u64>() & 0xffff_ffff_ffff
    )
}

fn object(body: &Bytes) -> Result<Map<String, Value>, V1Error> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(V1Error::bad(
            "invalidParameter",
            "请求体不是合法的 JSON 对象",
        )),
    }
}

/// A required non-empty string; `code` names what is missing (each endpoint has its own codes).
fn text<'a>(m: &'a Map<String, Value>, key: &str, code: &'static str) -> Result<&'a str, V1Error> {
    match m.get(key) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            Err(V1Error::bad(code, format!("{key} 不能为空")))
        }
        Some(_) => Err(V1Error::bad(
            "invalidParameter",
            format!("{key} 必须是字符串"),
        )),
    }
}

fn optional_text<'a>(
    m: &'a Map<String, Value>,
    key: &str,
    max: usize,
    code: &'static str,
) -> Result<Option<&'a str>, V1Error> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.chars().count() <= max => Ok(Some(s)),
        Some(Value::String(_)) => Err(V1Error::bad(code, format!("{key} 最多 {max} 个字符"))),
        Some(_) => Err(V1Error::bad(code, format!("{key} 必须是字符串"))),
    }
}

/// `taskId` is a JSON number (Long, docs/dingtalk.md §12.1); a string is refused (stricter).
fn task_id(m: &Map<String, Value>, missing: &'static str) -> Result<i64, V1Error> {
    match m.get("taskId") {
        None | Some(Value::Null) => Err(V1Error::bad(missing, "taskId 不能为空")),
        Some(v) => v
            .as_i64()
            .ok_or_else(|| V1Error::bad("invalidParameter", "taskId 必须是整数")),
    }
}

fn user_exists(world: &World, userid: &str, code: &'static str) -> Result<(), V1Error> {
    world
        .org
        .person(userid)
        .map(drop)
        .map_err(|_| V1Error::bad(code, format!("用户不存在 userId={userid}")))
}

/// Carries out what `act` decides under the world's lock, pushes its events, then answers `ok`
/// (or, with `lose_response`, never answers).
async fn carry_out(
    shared: Arc<Shared>,
    endpoint: &str,
    ok: Value,
    act: impl FnOnce(&mut World, &str) -> Result<Vec<Event>, V1Error>,
) -> Response {
    let (events, lose) = {
        let mut world = shared.world();
        let events = match act(&mut world, &shared.config.corp_id) {
            Ok(events) => events,
            Err(e) => return e.into_response(),
        };
        (events, world.faults.take_lost_response(endpoint))
    };
    push::dispatch(&shared, events);
    if lose {
        tracing::debug!(endpoint, "emulator: fault: action answer lost");
        tokio::select! {
            () = shared.shutdown.cancelled() => {}
            () = tokio::time::sleep(LOST_RESPONSE_HOLD) => {}
        }
        return StatusCode::GATEWAY_TIMEOUT.into_response();
    }
    (StatusCode::OK, axum::Json(ok)).into_response()
}

/// `POST /v1.0/workflow/processInstances/execute` (docs/dingtalk.md §12.2).
async fn execute(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let parsed = object(&body).and_then(|m| {
        let pid = text(&m, "processInstanceId", "invalidInstanceId")?.to_string();
        let task = task_id(&m, "invalidInstanceExecuteTaskId")?;
        let actioner =
            text(&m, "actionerUserId", "invalidInstanceExecuteActionerUserId")?.to_string();
        let action = match m.get("result").and_then(Value::as_str) {
            Some("agree") => Action::Agree,
            Some("refuse") => Action::Refuse,
            _ => {
                return Err(V1Error::bad(
                    "invalidInstanceExecuteResult",
                    "result 须为 agree 或 refuse",
                ));
            }
        };
        let remark =
            optional_text(&m, "remark", MAX_REMARK, "invalidParameter")?.map(str::to_string);
        Ok((pid, task, actioner, action, remark))
    });
    let (pid, task, actioner, action, remark) = match parsed {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let ok = json!({"result": true, "success": true});
    carry_out(shared, EXECUTE, ok, move |world, corp_id| {
        user_exists(world, &actioner, "userNotExist")?;
        let World {
            org,
            ids,
            instances,
            task_index,
            ..
        } = world;
        let instance = instances.get_mut(&pid).ok_or_else(|| {
            V1Error::bad("aflowProcessInstNotExist", format!("审批实例不存在 {pid}"))
        })?;
        let open = instance
            .tasks
            .iter()
            .find(|t| t.taskid == task)
            .ok_or_else(|| {
                V1Error::bad("invalidParameter", format!("任务 {task} 不属于该审批实例"))
            })?;
        if instance.status != InstanceStatus::Running {
            return Err(V1Error::bad(
                "aflowProcessInstStatusException",
                "审批单状态异常",
            ));
        }
        if open.status != TaskStatus::Running {
            return Err(V1Error::bad(
                "aflowProcessInstCanNotBeExecuted",
                "审批状态异常，无法执行",
            ));
        }
        if open.userid != actioner {
            return Err(V1Error::bad("needAuth", "没有同意拒绝审批的权限"));
        }
        let mut ctx = Ctx {
            org,
            ids,
            corp_id,
            now: Utc::now(),
        };
        let events = instance
            .act(task, action, remark, &mut ctx)
            .map_err(internal)?;
        index_tasks(task_index, instance);
        Ok(events)
    })
    .await
}

/// `POST /v1.0/workflow/processInstances/terminate` (docs/dingtalk.md §12.3).
async fn terminate(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let parsed = object(&body).and_then(|m| {
        let pid = text(&m, "processInstanceId", "invalidInstanceId")?.to_string();
        // Documented as optional, but its absence has an error code of its own: required.
        let is_system = match m.get("isSystem") {
            Some(Value::Bool(b)) => *b,
            None | Some(Value::Null) => {
                return Err(V1Error::bad(
                    "invalidInstanceTerminateIsSystem",
                    "isSystem 不能为空",
                ));
            }
            Some(_) => return Err(V1Error::bad("invalidParameter", "isSystem 必须是布尔值")),
        };
        let operator = if is_system {
            None
        } else {
            Some(
                text(
                    &m,
                    "operatingUserId",
                    "invalidInstanceTerminateOperatingUserId",
                )?
                .to_string(),
            )
        };
        let remark =
            optional_text(&m, "remark", MAX_REMARK, "invalidParameter")?.map(str::to_string);
        Ok((pid, operator, remark))
    });
    let (pid, operator, remark) = match parsed {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let guard = shared.scaled(TERMINATE_GUARD_SECS);
    let ok = json!({"result": true, "success": true});
    carry_out(shared, TERMINATE, ok, move |world, corp_id| {
        if let Some(operator) = &operator {
            user_exists(world, operator, "userNotExist")?;
        }
        let World { org, instances, .. } = world;
        let instance = instances.get_mut(&pid).ok_or_else(|| {
            V1Error::bad("aflowProcessInstNotExist", format!("审批实例不存在 {pid}"))
        })?;
        if instance.status != InstanceStatus::Running {
            return Err(V1Error::bad(
                "aflowProcessInstStatusException",
                "审批单已结束",
            ));
        }
        // Who may withdraw before when: the operator is checked first.
        let userid = match operator {
            Some(operator) if operator != instance.originator_userid => {
                return Err(V1Error::bad("needAuth", "只有发起人可以撤销审批"));
            }
            Some(operator) => operator,
            // Who the record names for the system is not documented [UNCONFIRMED]: the
            // originator, as the approval is withdrawn in their name.
            None => instance.originator_userid.clone(),
        };
        let now = Utc::now();
        let age = (now - instance.create_time).to_std().unwrap_or_default();
        if age < guard {
            return Err(V1Error::bad("aflowProcessInstStatusException", TOO_SOON));
        }
        let allowed = org
            .templates
            .get(&instance.process_code)
            .is_none_or(|t| t.allow_revoke);
        if !allowed {
            // The documented answer (docs/dingtalk.md §12.3): HTTP 400 internalError with a text
            // about the missing task permission. DingTalk's exact words are not documented; this
            // text names the permission (权限), which is what a client can go by.
            return Err(V1Error::bad(
                "internalError",
                "没有撤销审批的任务权限：模板未开启允许撤销审批中的单据",
            ));
        }
        instance
            .terminate(&userid, remark, corp_id, now)
            .map_err(internal)
    })
    .await
}

/// `POST /v1.0/workflow/processInstances/comments` (docs/dingtalk.md §12.4).
async fn comments(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let parsed = object(&body).and_then(|m| {
        let pid = text(&m, "processInstanceId", "invalidInstanceId")?.to_string();
        let comment = text(&m, "text", "invalidInstanceCommentText")?;
        if comment.chars().count() > MAX_REMARK {
            return Err(V1Error::bad(
                "invalidParameter",
                format!("text 最多 {MAX_REMARK} 个字符"),
            ));
        }
        let user = text(&m, "commentUserId", "invalidInstanceCommentUserId")?.to_string();
        Ok((pid, comment.to_string(), user))
    });
    let (pid, comment, user) = match parsed {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let ok = json!({"result": true, "success": true});
    carry_out(shared, COMMENTS, ok, move |world, corp_id| {
        user_exists(world, &user, "userNotExist")?;
        let instance = world.instances.get_mut(&pid).ok_or_else(|| {
            V1Error::bad("aflowProcessInstNotExist", format!("审批实例不存在 {pid}"))
        })?;
        instance
            .comment(&user, &comment, corp_id, Utc::now())
            .map_err(|e| match e {
                ActError::Conflict(m) => V1Error::bad("aflowProcessInstCanNotBeExecuted", m),
                other => internal(other),
            })
    })
    .await
}

/// `POST /v1.0/workflow/tasks/redirect` (docs/dingtalk.md §12.5): dotted error codes, and an
/// answer of `{"result": true}` only.
async fn redirect(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let parsed = object(&body).and_then(|m| {
        let task = task_id(&m, "param.blank")?;
        let to = text(&m, "toUserId", "param.blank")?.to_string();
        let operator = text(&m, "operateUserId", "param.blank")?.to_string();
        let remark =
            optional_text(&m, "remark", MAX_REDIRECT_REMARK, "param.illegal")?.map(str::to_string);
        optional_text(&m, "actionName", 128, "param.illegal")?;
        Ok((task, to, operator, remark))
    });
    let (task, to, operator, remark) = match parsed {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    carry_out(
        shared,
        REDIRECT,
        json!({"result": true}),
        move |world, corp_id| {
            if world.org.person(&to).is_err() {
                return Err(V1Error::bad("param.illegal", "illegal parameter toUserId"));
            }
            let pid = world
                .task_index
                .get(&task)
                .cloned()
                .ok_or_else(|| V1Error::bad("param.illegal", "illegal parameter taskId"))?;
            let World {
                org,
                ids,
                instances,
                task_index,
                ..
            } = world;
            let instance = instances
                .get_mut(&pid)
                .ok_or_else(|| V1Error::bad("param.illegal", "illegal parameter taskId"))?;
            if instance.status != InstanceStatus::Running {
                return Err(V1Error::bad("instance.status.error", "实例状态不是运行中"));
            }
            let open = instance
                .tasks
                .iter()
                .find(|t| t.taskid == task)
                .ok_or_else(|| V1Error::bad("param.illegal", "illegal parameter taskId"))?;
            if open.status != TaskStatus::Running {
                return Err(V1Error::bad("task.status.error", "任务状态不是运行中"));
            }
            if open.userid != operator {
                return Err(V1Error::bad(
                    "param.illegal.operator",
                    "operateUserId 不是任务当前处理人",
                ));
            }
            if open.userid == to {
                return Err(V1Error::bad("param.illegal", "illegal parameter toUserId"));
            }
            let mut ctx = Ctx {
                org,
                ids,
                corp_id,
                now: Utc::now(),
            };
            let events = instance
                .act(task, Action::Redirect { to }, remark, &mut ctx)
                .map_err(|e| V1Error {
                    status: 500,
                    code: "system.error",
                    message: e.to_string(),
                })?;
            index_tasks(task_index, instance);
            Ok(events)
        },
    )
    .await
}

fn index_tasks(index: &mut HashMap<i64, String>, instance: &super::model::Instance) {
    for t in &instance.tasks {
        index
            .entry(t.taskid)
            .or_insert_with(|| instance.process_instance_id.clone());
    }
}

/// A rule the checks above should have caught: DingTalk's 500 `systemError`.
fn internal(e: ActError) -> V1Error {
    V1Error {
        status: 500,
        code: "systemError",
        message: e.to_string(),
    }
}
