//! Template form schemas as DingTalk's v1.0 `GET /v1.0/workflow/forms/schemas/processCodes`
//! answers them (docs/dingtalk.md §2.5), and the route that serves them: the token in the
//! `x-acs-dingtalk-access-token` header, v1.0 error bodies `{"code", "message", "requestid"}`
//! with an HTTP status, one metered call.
//!
//! Where the docs are unconfirmed this takes the stricter reading: `options` are JSON text of
//! `{"value", "key"}` objects (what real answers were seen to carry), `gmtModified` an epoch-ms
//! string, a date range's label the JSON text of its two labels.
//!
//! Owns: the answer's shape and the route. Does not own: the templates (`model`), tokens,
//! faults and the allowance (`state`, `quota`), which the route consults as every call does.

use std::{collections::HashMap, sync::Arc, time::Instant};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
};
use chrono::Utc;
use serde_json::{Value, json};

use super::{
    model::{Control, Template},
    state::{Shared, TokenProblem},
};

/// The endpoint as the call log and the allowance name it (no leading slash).
pub(crate) const SCHEMA_ENDPOINT: &str = "v1.0/workflow/forms/schemas/processCodes";

/// The v1.0 routes of form schemas.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(&format!("/{SCHEMA_ENDPOINT}"), get(schema))
        .with_state(shared)
}

/// `result` of the schema answer for `template`.
pub fn schema_result(template: &Template, corp_id: &str) -> Value {
    // An epoch-ms string (the doc's example), moving with each published revision.
    let modified = (1_764_300_000_000_i64 + i64::from(template.revision) * 60_000).to_string();
    json!({
        "name": template.name,
        "processCode": template.process_code,
        "formCode": template.process_code,
        "formUuid": format!("FORM-{}", template.process_code.trim_start_matches("PROC-")),
        "appUuid": corp_id,
        "ownerIdType": "orgId",
        "status": "PUBLISHED",
        "engineType": 0,
        "procType": "inner",
        "icon": "common",
        "gmtCreate": "1764300000000",
        "gmtModified": modified,
        "schemaContent": {
            "title": template.name,
            "icon": "common",
            "items": template.controls.iter().map(|c| item(template, c)).collect::<Vec<_>>(),
        },
    })
}

fn item(template: &Template, control: &Control) -> Value {
    let mut props = json!({
        "id": template.control_id(control),
        "label": control.label,
        "required": control.required,
        "bizAlias": control.biz_alias.clone().unwrap_or_default(),
    });
    if !control.options.is_empty() {
        props["options"] = control
            .options
            .iter()
            .enumerate()
            .map(|(i, o)| {
                Value::String(json!({"value": o, "key": format!("option_{i}")}).to_string())
            })
            .collect();
    }
    if let Some(format) = &control.format {
        props["format"] = format.clone().into();
    }
    let mut answer = json!({"componentName": control.component_type, "props": props});
    if !control.children.is_empty() {
        answer["children"] = control.children.iter().map(|c| item(template, c)).collect();
    }
    answer
}

fn v1_error(status: StatusCode, code: &str, message: &str) -> Response {
    let requestid = format!("{:016X}", rand::random::<u64>());
    (
        status,
        [("content-type", "application/json;charset=utf-8")],
        Json(json!({"code": code, "message": message, "requestid": requestid})),
    )
        .into_response()
}

/// `GET /v1.0/workflow/forms/schemas/processCodes?processCode=`.
async fn schema(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let admission = shared.world().admit(SCHEMA_ENDPOINT, Instant::now());
    if !admission.latency.is_zero() {
        tokio::select! {
            () = shared.shutdown.cancelled() => {}
            () = tokio::time::sleep(admission.latency) => {}
        }
    }
    if admission.http_5xx {
        return (
            StatusCode::BAD_GATEWAY,
            "<html><body><h1>502 Bad Gateway</h1></body></html>",
        )
            .into_response();
    }
    if admission.rate_limited {
        return v1_error(
            StatusCode::FORBIDDEN,
            "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi",
            "调用频率超过限制",
        );
    }
    if admission.injected.is_some() {
        // The v1.0 family has no errcodes: any injected error is its server error.
        return v1_error(StatusCode::INTERNAL_SERVER_ERROR, "systemError", "系统错误");
    }
    let token = headers
        .get("x-acs-dingtalk-access-token")
        .and_then(|v| v.to_str().ok());
    match shared.world().check_token(token, Instant::now()) {
        Ok(()) => {}
        Err(TokenProblem::Missing) => {
            return v1_error(
                StatusCode::BAD_REQUEST,
                "AuthenticationFailed.MissingParameter",
                "缺少参数 x-acs-dingtalk-access-token",
            );
        }
        Err(TokenProblem::Invalid) => {
            return v1_error(
                StatusCode::BAD_REQUEST,
                "InvalidAuthentication",
                "不合法的access_token",
            );
        }
    }
    if let Err(refusal) = shared.world().quota.meter_call(SCHEMA_ENDPOINT, Utc::now()) {
        return v1_error(
            StatusCode::FORBIDDEN,
            "Forbidden.AccessDenied.ApiCountLimitForOrg",
            &refusal.errmsg,
        );
    }
    let Some(code) = query.get("processCode").filter(|c| !c.is_empty()) else {
        return v1_error(
            StatusCode::BAD_REQUEST,
            "invalidParameter",
            "processCode is required",
        );
    };
    let world = shared.world();
    match world.org.templates.get(code) {
        Some(template) => {
            Json(json!({"result": schema_result(template, &shared.config.corp_id)})).into_response()
        }
        None => v1_error(StatusCode::BAD_REQUEST, "formNotExist", "表单不存在"),
    }
}
