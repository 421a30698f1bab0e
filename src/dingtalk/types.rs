//! Requests and responses of the oapi/topapi calls, with DingTalk's field names (docs/dingtalk.md §2–§3).
//! They are also what callers hand the v1.0 family (`v1` turns them into its camelCase shapes,
//! docs/dingtalk.md §11): fields only v1.0 can send are `#[serde(skip)]` here, so the old
//! family's JSON stays exactly what it was.

use serde::{Deserialize, Serialize};

/// `topapi/processinstance/create` body (docs/dingtalk.md §2.1).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CreateInstance {
    pub process_code: String,
    pub originator_user_id: String,
    pub dept_id: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<i64>,
    /// Comma-separated userids, approving in sequence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approvers: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approvers_v2: Option<Vec<ApproverNode>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cc_list: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cc_position: Option<String>,
    pub form_component_values: Vec<FormValue>,
    /// Approvers chosen for the template's self-selected approver nodes (v1.0
    /// `targetSelectActioners`, docs/dingtalk.md §11.2); the old API cannot send them.
    #[serde(skip)]
    pub target_select_actioners: Vec<SelectActioner>,
}

/// The approvers picked for one self-selected approver node: its `actionerKey` (the forecast's
/// `workflowActor.actorKey`, docs/dingtalk.md §11.5) and the userids.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SelectActioner {
    pub actioner_key: String,
    pub user_ids: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApproverNode {
    pub task_action_type: String,
    pub user_ids: Vec<String>,
}

/// One form value: `value` is always a string (docs/dingtalk.md §2.2).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FormValue {
    pub name: String,
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ext_value: Option<String>,
    /// A table's rows, each a list of cells, for v1.0's `details` (docs/dingtalk.md §11.2);
    /// empty for any other control. `value` holds the same rows as JSON text, which is all the
    /// old API takes.
    #[serde(skip)]
    pub details: Vec<Vec<FormValue>>,
}

#[derive(Debug, Deserialize)]
pub(super) struct CreateInstanceResponse {
    pub process_instance_id: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct GetInstanceResponse {
    pub process_instance: ProcessInstance,
}

/// `processinstance/get` → `process_instance` (docs/dingtalk.md §2.3). Times are Beijing-time strings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcessInstance {
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub create_time: Option<String>,
    #[serde(default)]
    pub finish_time: Option<String>,
    #[serde(default)]
    pub originator_userid: Option<String>,
    #[serde(default)]
    pub originator_dept_id: Option<String>,
    pub status: String,
    #[serde(default)]
    pub result: Option<String>,
    #[serde(default)]
    pub business_id: Option<String>,
    #[serde(default)]
    pub form_component_values: Vec<serde_json::Value>,
    #[serde(default)]
    pub operation_records: Vec<serde_json::Value>,
    #[serde(default)]
    pub tasks: Vec<InstanceTask>,
    /// Its times are given to the minute, not the second (a v1.0 answer, docs/dingtalk.md
    /// §11.3): a stored time within that minute is the finer one and is kept.
    #[serde(skip)]
    pub whole_minutes: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceTask {
    /// A string here, a number in events (docs/dingtalk.md §2.3).
    pub taskid: String,
    #[serde(default)]
    pub userid: Option<String>,
    pub task_status: String,
    #[serde(default)]
    pub task_result: Option<String>,
    #[serde(default)]
    pub create_time: Option<String>,
    #[serde(default)]
    pub finish_time: Option<String>,
    #[serde(default)]
    pub activity_id: Option<String>,
}

/// `processinstance/listids` body (docs/dingtalk.md §2.4): times in epoch ms, `size` ≤ 20.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ListIds {
    pub process_code: String,
    pub start_time: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_time: Option<i64>,
    pub size: u32,
    pub cursor: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub userid_list: Option<String>,
    /// Only instances in these statuses (`RUNNING`, `TERMINATED`, `COMPLETED`): v1.0 only
    /// (`statuses`, docs/dingtalk.md §11.4); empty lists every status.
    #[serde(skip)]
    pub statuses: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ListIdsResponse {
    pub result: IdPage,
}

/// One page of instance ids; `next_cursor` absent on the last page.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct IdPage {
    #[serde(default)]
    pub list: Vec<String>,
    #[serde(default)]
    pub next_cursor: Option<u64>,
}

/// Body of register/update, and the answer of get_call_back (docs/dingtalk.md §3).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct CallbackRegistration {
    pub call_back_tag: Vec<String>,
    pub token: String,
    pub aes_key: String,
    pub url: String,
}

impl std::fmt::Debug for CallbackRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackRegistration")
            .field("call_back_tag", &self.call_back_tag)
            .field("token", &"***")
            .field("aes_key", &"***")
            .field("url", &self.url)
            .finish()
    }
}

/// `get_call_back_failed_result`: the raw answer, so it can be committed as received.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct FailedPage {
    #[serde(default)]
    pub has_more: bool,
    #[serde(default)]
    pub failed_list: Vec<serde_json::Value>,
}
