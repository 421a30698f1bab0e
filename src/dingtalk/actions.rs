//! The v1.0 actions on approvals (docs/dingtalk.md §12): agree or refuse a task, terminate an
//! instance, comment on it, redirect a task. Each is one [`Client::v1`] call, so it is gated,
//! budgeted and counted like every other. None is idempotent (§12.6): a call that may have
//! reached DingTalk without an answer ends with [`Error::NoResponse`], never repeated here.
//!
//! Owns: the requests' shapes and reading their answers. Does not own: deciding what to send or
//! what an answer means for the row (`actions`).

use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Client, Error, Purpose};

pub const EXECUTE_PATH: &str = "/v1.0/workflow/processInstances/execute";
pub const TERMINATE_PATH: &str = "/v1.0/workflow/processInstances/terminate";
pub const COMMENTS_PATH: &str = "/v1.0/workflow/processInstances/comments";
pub const REDIRECT_PATH: &str = "/v1.0/workflow/tasks/redirect";

/// One action, as DingTalk takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionRequest {
    /// `processInstances/execute` (§12.2): `agree` or `refuse` the task as its approver.
    Execute {
        process_instance_id: String,
        task_id: i64,
        actioner_user_id: String,
        agree: bool,
        remark: Option<String>,
    },
    /// `processInstances/terminate` (§12.3): by `operating_user_id` (the originator), or as the
    /// system when it is `None` (`isSystem`, always sent: its absence has an error code).
    Terminate {
        process_instance_id: String,
        operating_user_id: Option<String>,
        remark: Option<String>,
    },
    /// `processInstances/comments` (§12.4).
    Comment {
        process_instance_id: String,
        comment_user_id: String,
        text: String,
    },
    /// `tasks/redirect` (§12.5): from its handler `operate_user_id` to `to_user_id`.
    Redirect {
        task_id: i64,
        operate_user_id: String,
        to_user_id: String,
        remark: Option<String>,
    },
}

impl ActionRequest {
    fn path_and_body(&self) -> (&'static str, Value) {
        match self {
            ActionRequest::Execute {
                process_instance_id,
                task_id,
                actioner_user_id,
                agree,
                remark,
            } => {
                let mut body = json!({
                    "processInstanceId": process_instance_id,
                    "taskId": task_id,
                    "actionerUserId": actioner_user_id,
                    "result": if *agree { "agree" } else { "refuse" },
                });
                if let Some(remark) = remark {
                    body["remark"] = remark.clone().into();
                }
                (EXECUTE_PATH, body)
            }
            ActionRequest::Terminate {
                process_instance_id,
                operating_user_id,
                remark,
            } => {
                let mut body = json!({
                    "processInstanceId": process_instance_id,
                    "isSystem": operating_user_id.is_none(),
                });
                if let Some(user) = operating_user_id {
                    body["operatingUserId"] = user.clone().into();
                }
                if let Some(remark) = remark {
                    body["remark"] = remark.clone().into();
                }
                (TERMINATE_PATH, body)
            }
            ActionRequest::Comment {
                process_instance_id,
                comment_user_id,
                text,
            } => (
                COMMENTS_PATH,
                json!({
                    "processInstanceId": process_instance_id,
                    "text": text,
                    "commentUserId": comment_user_id,
                }),
            ),
            ActionRequest::Redirect {
                task_id,
                operate_user_id,
                to_user_id,
                remark,
            } => {
                let mut body = json!({
                    "taskId": task_id,
                    "toUserId": to_user_id,
                    "operateUserId": operate_user_id,
                });
                if let Some(remark) = remark {
                    body["remark"] = remark.clone().into();
                }
                (REDIRECT_PATH, body)
            }
        }
    }
}

/// `{"result": true, "success": true}`; redirect answers `{"result": true}` only (§12.5).
#[derive(Debug, Deserialize)]
struct Answer {
    #[serde(default)]
    success: Option<bool>,
}

impl Client {
    /// Sends `request` once (no retry after it may have reached DingTalk). Done is HTTP 200
    /// without `success: false`: what `result` says after a refuse is not documented, so it is
    /// not read (§12.2). An answer with `success: false` is not a refusal DingTalk explained:
    /// it is taken as "unknown" ([`Error::Protocol`]), for the caller to read the approval back.
    pub async fn act(&self, request: &ActionRequest) -> Result<(), Error> {
        let (path, body) = request.path_and_body();
        let answer: Answer = self
            .v1(Purpose::Action, Method::POST, path, &[], Some(&body), false)
            .await?;
        if answer.success == Some(false) {
            return Err(Error::Protocol(format!(
                "{path} answered HTTP 200 with success false"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_system_terminate_sends_is_system_and_no_operator() {
        let (path, body) = ActionRequest::Terminate {
            process_instance_id: "p".into(),
            operating_user_id: None,
            remark: Some("cancelled".into()),
        }
        .path_and_body();
        assert_eq!(path, TERMINATE_PATH);
        assert_eq!(
            body,
            json!({"processInstanceId": "p", "isSystem": true, "remark": "cancelled"})
        );
        let (_, body) = ActionRequest::Execute {
            process_instance_id: "p".into(),
            task_id: 61_920_249_919,
            actioner_user_id: "u".into(),
            agree: false,
            remark: None,
        }
        .path_and_body();
        assert_eq!(body["taskId"], json!(61_920_249_919_i64));
        assert_eq!(body["result"], "refuse");
    }
}
