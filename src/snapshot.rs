//! DingTalk's full state of one approval (`processinstance/get`) in the words and UTC times our
//! tables use: plain data, written by `reconcile::snapshot` (which reads DingTalk's answer) and
//! applied by `store::approvals::apply_snapshot`. A leaf module, like `event`, so that `store`
//! needs nothing from `reconcile`. Owns no logic: reading the API's types and the rule for
//! applying a snapshot live with those two.

use chrono::{DateTime, Utc};
use serde_json::Value;

/// DingTalk's full state of one approval, as of `requested_at`.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub process_instance_id: String,
    pub status: String,
    /// `agree`/`refuse` for COMPLETED; `None` otherwise (the table's CHECK allows no other).
    pub result: Option<String>,
    pub title: Option<String>,
    pub business_id: Option<String>,
    pub originator_userid: Option<String>,
    pub originator_dept_id: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub form_values: Value,
    pub operation_records: Value,
    pub tasks: Vec<SnapshotTask>,
    /// Times given to the minute (a v1.0 `get`, docs/dingtalk.md §11.3): a stored time in the
    /// same minute is finer and kept, as a stored time in the same second is for the old `get`.
    pub whole_minutes: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotTask {
    pub task_id: i64,
    pub activity_id: Option<String>,
    pub userid: Option<String>,
    pub status: String,
    /// AGREE/REFUSE/REDIRECTED/NONE once the task has ended; `None` while pending, as events
    /// leave it, so that events and snapshots agree.
    pub result: Option<String>,
    /// The approver's comment: from the operation record of this approver at the task's finish
    /// time (processinstance/get's tasks carry no remark); `None` keeps what an event said.
    pub remark: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}
