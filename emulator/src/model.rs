//! The emulated organisation and its approvals: people and departments, approval templates with
//! their forms, approval instances with their tasks and operation records, and the rules that move
//! an instance along (start, agree, refuse, redirect, terminate). Every change returns the events
//! DingTalk would push for it, already in the flat HTTP-push shape of docs/dingtalk.md §5.2/§5.3.
//!
//! Owns: validation of what a create carries (docs/dingtalk.md §2.1/§2.2), the approval flow, the
//! `processinstance/get` view (docs/dingtalk.md §2.3) and the event payloads. Pure: no I/O, no clock (the
//! caller passes `now`), randomness only through [`Ids`] (seeded). Does not own: HTTP, tokens,
//! pushes, faults.

use std::collections::BTreeMap;

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, Utc};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

/// Error codes the emulator answers with for business and parameter errors. DingTalk publishes
/// no table for the old approval API, so these are the documented or measured generic codes
/// (docs/dingtalk.md §7); the exact numbers for each case are [UNCONFIRMED]. A client must treat any
/// non-zero errcode it does not know as a permanent rejection, which is what these exercise.
pub mod errcode {
    /// Missing or invalid parameter (probe log, docs/dingtalk.md §7).
    pub const PARAM: i64 = 40035;
    /// Generic "not found": user, department, template, instance (measured by HSSDK, docs/dingtalk.md §7).
    pub const NOT_FOUND: i64 = 60121;
}

/// Most form values a create may carry: the doc says 200, the Java SDK checks 150 (docs/dingtalk.md §2.1);
/// the stricter one.
pub const MAX_FORM_VALUES: usize = 150;
/// Most approver nodes, approvers, cc users (docs/dingtalk.md §2.1).
pub const MAX_APPROVERS: usize = 20;
/// Longest form value (v1.0 limit, docs/dingtalk.md §2.6; assumed for the old API too).
pub const MAX_VALUE_CHARS: usize = 65_535;

/// DingTalk's answer to a request it will not carry out: `errcode` and `errmsg`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("errcode {errcode}: {errmsg}")]
pub struct Rejection {
    pub errcode: i64,
    pub errmsg: String,
}

impl Rejection {
    pub fn param(msg: impl Into<String>) -> Rejection {
        Rejection {
            errcode: errcode::PARAM,
            errmsg: msg.into(),
        }
    }

    pub fn not_found(msg: impl Into<String>) -> Rejection {
        Rejection {
            errcode: errcode::NOT_FOUND,
            errmsg: msg.into(),
        }
    }
}

/// Why a person's action (admin API) cannot be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActError {
    #[error("no task {0}")]
    NoTask(i64),
    #[error("no instance {0}")]
    NoInstance(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
}

/// Beijing time (UTC+8), the zone of every time string of the old API (docs/dingtalk.md §2.3).
pub fn beijing_offset() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).expect("UTC+8 is a valid offset")
}

/// `"yyyy-MM-dd HH:mm:ss"` in Beijing time.
pub fn beijing(t: DateTime<Utc>) -> String {
    t.with_timezone(&beijing_offset())
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// The v1.0 family's times: UTC, `yyyy-MM-ddTHH:mmZ`, without seconds (docs/dingtalk.md §11.3).
pub fn v1_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%MZ").to_string()
}

/// A person in the emulated organisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Person {
    pub userid: String,
    pub name: String,
    pub dept_ids: Vec<i64>,
}

/// An approval template: what its form holds and who approves when the create names nobody.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub process_code: String,
    pub name: String,
    pub controls: Vec<Control>,
    /// The template's configured flow: one approver per node, in sequence. Used when a create
    /// names no approvers (docs/dingtalk.md §2.1).
    #[serde(default)]
    pub default_approvers: Vec<String>,
    /// The OA console's "allow the submitter to revoke an in-progress form" (docs/dingtalk.md
    /// §12.3): without it a terminate through the API fails. Ticked unless said otherwise.
    #[serde(default = "ticked")]
    pub allow_revoke: bool,
    /// How often the form was published: 1 at first, one more per change (a renamed control).
    /// The schema answer's `gmtModified` is derived from it.
    #[serde(default = "first_revision")]
    pub revision: u32,
    /// Self-selected approver nodes ("发起人自选"), after `default_approvers` in the flow: the
    /// originator names their approvers in the create (v1.0 `targetSelectActioners`,
    /// docs/dingtalk.md §11.2), and the forecast lists them (§11.5).
    #[serde(default)]
    pub select_nodes: Vec<SelectNode>,
}

/// A self-selected approver node of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectNode {
    /// `actorKey` (the create's `actionerKey`), e.g. `manual_e203_14a3_895a_45ad`.
    pub actor_key: String,
    /// The node's name (`activityName`).
    pub name: String,
    /// Must the originator choose someone? DingTalk's default for such nodes.
    #[serde(default = "yes")]
    pub required: bool,
    /// May the originator choose several (each approves in turn)?
    #[serde(default)]
    pub allowed_multi: bool,
    /// Who may be chosen; empty: anyone in the organisation (`allStaff`).
    #[serde(default)]
    pub candidates: Vec<String>,
}

fn yes() -> bool {
    true
}

/// Who the originator chose for one self-selected node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectChoice {
    pub actor_key: String,
    pub user_ids: Vec<String>,
}

/// Prefixes of the emulator's refusals of self-selected approvers: v1.0's codes
/// (docs/dingtalk.md §11.2), which the v1.0 routes answer with.
pub mod select_code {
    pub const MISSING: &str = "targetSelectApproverMissing";
    pub const SCOPE: &str = "targetSelectApproverScopeError";
}

fn ticked() -> bool {
    true
}

fn first_revision() -> u32 {
    1
}

/// One form control. For `DDDateRangeField` the label is the JSON text of both labels, which is
/// what a create must send as `name` (docs/dingtalk.md §2.2, stricter reading).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    pub component_type: String,
    pub label: String,
    #[serde(default)]
    pub required: bool,
    /// Choices of `DDSelectField` / `DDMultiSelectField`.
    #[serde(default)]
    pub options: Vec<String>,
    /// The control's id (`props.id`, e.g. `TextField-K2AD4O5B`): kept when the label changes.
    /// Default: derived from the template's code and the label (see [`Template::control_id`]).
    #[serde(default)]
    pub id: Option<String>,
    /// `props.bizAlias`, the developer's name for the control; often empty.
    #[serde(default)]
    pub biz_alias: Option<String>,
    /// Dates: `yyyy-MM-dd` (a day) or `yyyy-MM-dd HH:mm` (a time); the values follow it.
    #[serde(default)]
    pub format: Option<String>,
    /// A table's columns (`TableField`).
    #[serde(default)]
    pub children: Vec<Control>,
}

impl Control {
    fn new(component_type: &str, label: &str, required: bool, options: &[&str]) -> Control {
        Control {
            component_type: component_type.into(),
            label: label.into(),
            required,
            options: options.iter().map(|o| (*o).to_string()).collect(),
            id: None,
            biz_alias: None,
            format: None,
            children: Vec::new(),
        }
    }

    fn alias(mut self, biz_alias: &str) -> Control {
        self.biz_alias = Some(biz_alias.into());
        self
    }

    fn format(mut self, format: &str) -> Control {
        self.format = Some(format.into());
        self
    }

    fn columns(mut self, children: Vec<Control>) -> Control {
        self.children = children;
        self
    }
}

impl Template {
    /// The id of `control`: its own, or one derived from the code and its label (stable as long
    /// as the label is; builtin templates fix theirs so that a rename keeps it).
    pub fn control_id(&self, control: &Control) -> String {
        control.id.clone().unwrap_or_else(|| {
            component_id(&self.process_code, &control.component_type, &control.label)
        })
    }

    /// Gives every control (and table column) without an id the derived one.
    fn fix_ids(mut self) -> Template {
        let code = self.process_code.clone();
        for c in &mut self.controls {
            c.id.get_or_insert_with(|| component_id(&code, &c.component_type, &c.label));
            for child in &mut c.children {
                child.id.get_or_insert_with(|| {
                    component_id(&code, &child.component_type, &child.label)
                });
            }
        }
        self
    }
}

/// People, departments and templates.
#[derive(Debug, Clone)]
pub struct Org {
    pub name: String,
    pub people: BTreeMap<String, Person>,
    pub departments: BTreeMap<i64, String>,
    pub templates: BTreeMap<String, Template>,
}

/// The approver everyone falls back to (the brief's default flow).
pub const DEFAULT_APPROVER: &str = "manager1";

impl Org {
    /// A small fixed organisation: four departments, eight people, four templates.
    pub fn builtin() -> Org {
        let departments = [
            (1, "Acme"),
            (100, "研发部"),
            (200, "财务部"),
            (300, "人事部"),
        ]
        .into_iter()
        .map(|(id, name)| (id, name.to_string()))
        .collect();
        let people = [
            ("manager1", "王经理", &[100][..]),
            ("fin1", "李财务", &[200]),
            ("boss1", "赵总", &[1]),
            ("hr1", "周人事", &[300]),
            ("emp1", "张三", &[100]),
            ("emp2", "李四", &[100]),
            ("emp3", "王五", &[200]),
            ("emp4", "赵六", &[300, 100]),
        ]
        .into_iter()
        .map(|(userid, name, depts)| {
            (
                userid.to_string(),
                Person {
                    userid: userid.into(),
                    name: name.into(),
                    dept_ids: depts.to_vec(),
                },
            )
        })
        .collect();
        let templates = [
            Template {
                process_code: "PROC-EMU-EXPENSE".into(),
                name: "报销".into(),
                controls: vec![
                    Control::new("TextField", "Reason", true, &[]).alias("reason"),
                    Control::new("MoneyField", "Amount", true, &[]).alias("amount"),
                    Control::new("DDSelectField", "Type", false, &["差旅", "办公", "招待"])
                        .alias("expense_type"),
                    Control::new("DDDateField", "Date", false, &[])
                        .alias("expense_date")
                        .format("yyyy-MM-dd"),
                    Control::new("TextareaField", "Remark", false, &[]),
                    Control::new("DDPhotoField", "Receipts", false, &[]),
                    Control::new("DepartmentField", "CostCenter", false, &[]).alias("cost_center"),
                    Control::new("TableField", "Items", false, &[]).columns(vec![
                        Control::new("TextField", "Item", true, &[]),
                        Control::new("MoneyField", "Amount", true, &[]),
                        Control::new("DDDateField", "Date", false, &[]).format("yyyy-MM-dd"),
                    ]),
                ],
                default_approvers: vec![DEFAULT_APPROVER.into()],
                allow_revoke: true,
                revision: 1,
                select_nodes: Vec::new(),
            },
            Template {
                process_code: "PROC-EMU-LEAVE".into(),
                name: "请假".into(),
                controls: vec![
                    Control::new(
                        "DDSelectField",
                        "LeaveType",
                        true,
                        &["年假", "病假", "事假"],
                    ),
                    Control::new("DDDateRangeField", r#"["开始时间","结束时间"]"#, true, &[])
                        .format("yyyy-MM-dd"),
                    Control::new("TextareaField", "Reason", false, &[]),
                ],
                default_approvers: vec![DEFAULT_APPROVER.into()],
                allow_revoke: true,
                revision: 1,
                select_nodes: Vec::new(),
            },
            Template {
                process_code: "PROC-EMU-PURCHASE".into(),
                name: "采购".into(),
                controls: vec![
                    Control::new("TextField", "Item", true, &[]),
                    Control::new("NumberField", "Quantity", true, &[]),
                    Control::new("MoneyField", "Amount", true, &[]),
                    Control::new("DDMultiSelectField", "Tags", false, &["IT", "办公", "紧急"]),
                    Control::new("InnerContactField", "Receiver", false, &[]),
                    Control::new("TableField", "Details", false, &[]).columns(vec![
                        Control::new("TextField", "品名", false, &[]),
                        Control::new("NumberField", "数量", false, &[]),
                    ]),
                ],
                default_approvers: vec![DEFAULT_APPROVER.into()],
                allow_revoke: true,
                revision: 1,
                select_nodes: Vec::new(),
            },
            // Chinese labels and no bizAlias, as most templates made in DingTalk's console are;
            // every kind of control the form views type.
            Template {
                process_code: "PROC-EMU-TRIP".into(),
                name: "出差申请".into(),
                controls: vec![
                    Control::new("TextField", "出差事由", true, &[]),
                    Control::new("TextField", "目的地", false, &[]),
                    Control::new("DDDateRangeField", r#"["开始时间","结束时间"]"#, true, &[])
                        .format("yyyy-MM-dd"),
                    Control::new("DDDateField", "出发时间", false, &[]).format("yyyy-MM-dd HH:mm"),
                    Control::new(
                        "DDSelectField",
                        "交通工具",
                        false,
                        &["飞机", "火车", "汽车"],
                    ),
                    Control::new(
                        "DDMultiSelectField",
                        "费用类型",
                        false,
                        &["交通", "住宿", "餐饮"],
                    ),
                    Control::new("NumberField", "天数", false, &[]),
                    Control::new("MoneyField", "预计费用", false, &[]),
                    Control::new("InnerContactField", "同行人", false, &[]),
                    Control::new("DepartmentField", "所属部门", false, &[]),
                    Control::new("DDPhotoField", "图片", false, &[]),
                    Control::new("DDAttachment", "附件", false, &[]),
                    Control::new("StarRatingField", "紧急程度", false, &[]),
                    Control::new("AddressField", "住址", false, &[]),
                    Control::new("TextareaField", "备注", false, &[]),
                    Control::new("TableField", "行程明细", false, &[]).columns(vec![
                        Control::new("DDDateField", "日期", false, &[]).format("yyyy-MM-dd"),
                        Control::new("TextField", "城市", false, &[]),
                        Control::new("MoneyField", "费用", false, &[]),
                    ]),
                ],
                default_approvers: vec![DEFAULT_APPROVER.into()],
                allow_revoke: true,
                revision: 1,
                select_nodes: Vec::new(),
            },
        ]
        .into_iter()
        .map(|t| (t.process_code.clone(), t.fix_ids()))
        .collect();
        Org {
            name: "Acme".into(),
            people,
            departments,
            templates,
        }
    }

    pub fn person(&self, userid: &str) -> Result<&Person, Rejection> {
        self.people
            .get(userid)
            .ok_or_else(|| Rejection::not_found(format!("找不到该用户 userid={userid}")))
    }

    /// Adds or replaces a template after checking that it can be used.
    pub fn add_template(&mut self, template: Template) -> Result<(), Rejection> {
        if template.process_code.is_empty() || template.name.is_empty() {
            return Err(Rejection::param("process_code and name are required"));
        }
        for userid in &template.default_approvers {
            self.person(userid)?;
        }
        for control in template
            .controls
            .iter()
            .chain(template.controls.iter().flat_map(|c| &c.children))
        {
            if !KNOWN_COMPONENTS.contains(&control.component_type.as_str()) {
                return Err(Rejection::param(format!(
                    "unknown component_type {}",
                    control.component_type
                )));
            }
        }
        let template = template.fix_ids();
        self.templates
            .insert(template.process_code.clone(), template);
        Ok(())
    }

    /// Renames a control (or a table's column) of a template, as an administrator who edits the
    /// form in DingTalk's console and publishes it: the id stays, the revision goes up. Instances
    /// started before keep the old label in their values.
    pub fn rename_control(
        &mut self,
        process_code: &str,
        control_id: &str,
        label: &str,
    ) -> Result<(), Rejection> {
        if label.trim().is_empty() || label.chars().count() > 64 {
            return Err(Rejection::param("label must be 1 to 64 characters"));
        }
        let template = self.templates.get_mut(process_code).ok_or_else(|| {
            Rejection::not_found(format!("审批模板不存在 process_code={process_code}"))
        })?;
        let wanted = Some(control_id);
        let position = template
            .controls
            .iter()
            .enumerate()
            .find_map(|(i, c)| {
                if c.id.as_deref() == wanted {
                    return Some((i, None));
                }
                let j = c.children.iter().position(|x| x.id.as_deref() == wanted)?;
                Some((i, Some(j)))
            })
            .ok_or_else(|| Rejection::not_found(format!("表单组件不存在 id={control_id}")))?;
        let control = match position {
            (i, None) => &mut template.controls[i],
            (i, Some(j)) => &mut template.controls[i].children[j],
        };
        control.label = label.to_string();
        template.revision += 1;
        Ok(())
    }

    /// Adds or replaces a person; every department must exist.
    pub fn add_person(&mut self, person: Person) -> Result<(), Rejection> {
        if person.userid.is_empty() {
            return Err(Rejection::param("userid is required"));
        }
        for dept in &person.dept_ids {
            if !self.departments.contains_key(dept) {
                return Err(Rejection::not_found(format!("部门不存在 dept_id={dept}")));
            }
        }
        self.people.insert(person.userid.clone(), person);
        Ok(())
    }
}

const KNOWN_COMPONENTS: &[&str] = &[
    "TextField",
    "TextareaField",
    "NumberField",
    "MoneyField",
    "DDSelectField",
    "DDMultiSelectField",
    "DDDateField",
    "DDDateRangeField",
    "DDPhotoField",
    "DDAttachment",
    "TableField",
    "InnerContactField",
    "DepartmentField",
    "RelateField",
    "AddressField",
    "StarRatingField",
];

/// The emulator's source of ids, seeded: the same seed and the same sequence of operations give
/// the same ids.
#[derive(Debug)]
pub struct Ids {
    rng: StdRng,
    next_task: i64,
    next_business: u32,
}

impl Ids {
    pub fn new(seed: u64) -> Ids {
        let mut rng = StdRng::seed_from_u64(seed);
        // 11-digit task ids like DingTalk's `61920249919` (docs/dingtalk.md §5.3).
        let next_task = 60_000_000_000 + rng.random_range(0..9_000_000_000_i64);
        let next_business = rng.random_range(0..1_000);
        Ids {
            rng,
            next_task,
            next_business,
        }
    }

    /// An opaque id shaped like DingTalk's (`ad253df6-e175-47ae-9d88-cd7d6c2ee2d3`).
    pub fn instance_id(&mut self) -> String {
        let r = &mut self.rng;
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            r.random::<u32>(),
            r.random::<u16>(),
            r.random::<u16>(),
            r.random::<u16>(),
            r.random::<u64>() & 0xffff_ffff_ffff
        )
    }

    pub fn task_id(&mut self) -> i64 {
        let id = self.next_task;
        self.next_task += self.rng.random_range(1..=97);
        id
    }

    /// Approval serial number: Beijing `yyyyMMddHHmm` + 6 digits (docs/dingtalk.md §2.3 sample).
    pub fn business_id(&mut self, now: DateTime<Utc>) -> String {
        self.next_business = (self.next_business + 1) % 1_000_000;
        format!(
            "{}{:06}",
            now.with_timezone(&beijing_offset()).format("%Y%m%d%H%M"),
            self.next_business
        )
    }

    pub fn activity_id(&mut self) -> String {
        format!(
            "{:04x}_{:04x}",
            self.rng.random::<u16>(),
            self.rng.random::<u16>()
        )
    }

    /// A TOP-style request id (13 lower-case alphanumerics).
    pub fn request_id(&mut self) -> String {
        self.alnum(13).to_lowercase()
    }

    /// An access token: 32 hex characters.
    pub fn token(&mut self) -> String {
        format!(
            "{:016x}{:016x}",
            self.rng.random::<u64>(),
            self.rng.random::<u64>()
        )
    }

    fn alnum(&mut self, len: usize) -> String {
        (&mut self.rng)
            .sample_iter(rand::distr::Alphanumeric)
            .take(len)
            .map(char::from)
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InstanceStatus {
    New,
    Running,
    Completed,
    Terminated,
    Canceled,
}

impl InstanceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::New => "NEW",
            InstanceStatus::Running => "RUNNING",
            InstanceStatus::Completed => "COMPLETED",
            InstanceStatus::Terminated => "TERMINATED",
            InstanceStatus::Canceled => "CANCELED",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskStatus {
    New,
    Running,
    Paused,
    Canceled,
    Completed,
    Terminated,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::New => "NEW",
            TaskStatus::Running => "RUNNING",
            TaskStatus::Paused => "PAUSED",
            TaskStatus::Canceled => "CANCELED",
            TaskStatus::Completed => "COMPLETED",
            TaskStatus::Terminated => "TERMINATED",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskResult {
    Agree,
    Refuse,
    Redirected,
    None,
}

impl TaskResult {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskResult::Agree => "AGREE",
            TaskResult::Refuse => "REFUSE",
            TaskResult::Redirected => "REDIRECTED",
            TaskResult::None => "NONE",
        }
    }
}

/// How the approvers of one node decide (`task_action_type`, docs/dingtalk.md §2.1): `AND` everyone must
/// agree, `OR` the first answer decides, `NONE` a single approver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ActionType {
    And,
    Or,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    pub action: ActionType,
    pub user_ids: Vec<String>,
    pub activity_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CcPosition {
    Start,
    Finish,
    StartFinish,
}

/// A form value as `processinstance/get` reads it back.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FormEntry {
    pub id: String,
    pub name: String,
    pub value: String,
    pub ext_value: String,
    pub component_type: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Task {
    pub taskid: i64,
    pub userid: String,
    pub status: TaskStatus,
    pub result: TaskResult,
    pub activity_id: String,
    pub node: usize,
    pub create_time: DateTime<Utc>,
    pub finish_time: Option<DateTime<Utc>>,
    pub remark: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    pub userid: String,
    pub date: DateTime<Utc>,
    pub operation_type: &'static str,
    pub operation_result: &'static str,
    pub remark: Option<String>,
}

/// One approval instance, the emulator's full view of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Instance {
    pub process_instance_id: String,
    pub process_code: String,
    pub title: String,
    pub business_id: String,
    pub originator_userid: String,
    pub originator_dept_id: i64,
    pub originator_dept_name: String,
    pub status: InstanceStatus,
    /// `agree` / `refuse`; `None` while running and when terminated.
    pub result: Option<&'static str>,
    pub form_component_values: Vec<FormEntry>,
    pub create_time: DateTime<Utc>,
    pub finish_time: Option<DateTime<Utc>>,
    pub nodes: Vec<Node>,
    pub current_node: usize,
    pub cc_userids: Vec<String>,
    pub cc_position: CcPosition,
    pub tasks: Vec<Task>,
    pub operation_records: Vec<Record>,
    pub url: String,
}

/// One form value as a create sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FormInput {
    pub name: String,
    pub value: String,
    #[serde(default)]
    pub ext_value: Option<String>,
}

/// An approver node as a create names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub task_action_type: ActionType,
    pub user_ids: Vec<String>,
}

/// Everything needed to start an instance, already parsed from the request.
#[derive(Debug, Clone, Default)]
pub struct StartRequest {
    pub process_code: String,
    pub originator_userid: String,
    pub dept_id: i64,
    /// `None` = the template's flow.
    pub nodes: Option<Vec<NodeSpec>>,
    /// The originator's choices for the template's self-selected nodes; `None`: the request came
    /// through the old API, which cannot carry them (docs/dingtalk.md §2.1).
    pub select: Option<Vec<SelectChoice>>,
    pub cc: Vec<String>,
    pub cc_position: Option<CcPosition>,
    pub form: Vec<FormInput>,
}

/// An event DingTalk pushes: the callback tag it belongs to and the flat HTTP-push JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub tag: &'static str,
    pub payload: Map<String, Value>,
    pub event_time_ms: i64,
}

pub const TAG_INSTANCE: &str = "bpms_instance_change";
pub const TAG_TASK: &str = "bpms_task_change";

/// What every change needs besides the instance: the organisation, the id source, the corp id
/// events carry, and the time of the change.
pub struct Ctx<'a> {
    pub org: &'a Org,
    pub ids: &'a mut Ids,
    pub corp_id: &'a str,
    pub now: DateTime<Utc>,
}

/// The action of a person on a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Agree,
    Refuse,
    Redirect { to: String },
}

impl Instance {
    /// Validates a create and starts the instance: RUNNING, first node's tasks open. Returns the
    /// instance and its events (instance `start`, then a task `start` per open task).
    pub fn start(
        ctx: &mut Ctx<'_>,
        req: StartRequest,
    ) -> Result<(Instance, Vec<Event>), Rejection> {
        let (org, corp_id, now) = (ctx.org, ctx.corp_id, ctx.now);
        let ids = &mut *ctx.ids;
        let template = org.templates.get(&req.process_code).ok_or_else(|| {
            Rejection::not_found(format!("审批模板不存在 process_code={}", req.process_code))
        })?;
        let originator = org.person(&req.originator_userid)?;
        let dept_name = match req.dept_id {
            -1 => org.name.clone(),
            id if originator.dept_ids.contains(&id) => org
                .departments
                .get(&id)
                .cloned()
                .unwrap_or_else(|| org.name.clone()),
            id if org.departments.contains_key(&id) => {
                return Err(Rejection::param(format!("发起人不在部门 dept_id={id} 中")));
            }
            id => return Err(Rejection::not_found(format!("部门不存在 dept_id={id}"))),
        };
        let form = validate_form(org, template, &req.form)?;

        let explicit = req.nodes.is_some();
        let specs = match req.nodes {
            Some(nodes) => nodes,
            None => {
                let mut specs: Vec<NodeSpec> = template
                    .default_approvers
                    .iter()
                    .map(|u| NodeSpec {
                        task_action_type: ActionType::None,
                        user_ids: vec![u.clone()],
                    })
                    .collect();
                specs.extend(select_specs(org, template, req.select.as_deref())?);
                specs
            }
        };
        let specs = if specs.is_empty() {
            vec![NodeSpec {
                task_action_type: ActionType::None,
                user_ids: vec![DEFAULT_APPROVER.into()],
            }]
        } else {
            specs
        };
        if specs.len() > MAX_APPROVERS {
            return Err(Rejection::param(format!("审批节点最多 {MAX_APPROVERS} 个")));
        }
        for spec in &specs {
            if spec.user_ids.is_empty() || spec.user_ids.len() > MAX_APPROVERS {
                return Err(Rejection::param("审批节点的 user_ids 须为 1-20 个"));
            }
            // `NONE` is a single-approver node (docs/dingtalk.md §2.1); stricter reading: more is an error.
            if spec.task_action_type == ActionType::None && spec.user_ids.len() != 1 {
                return Err(Rejection::param(
                    "task_action_type NONE 的节点只能有一个审批人",
                ));
            }
            for u in &spec.user_ids {
                org.person(u)?;
            }
        }
        // cc_list is only effective together with approvers (docs/dingtalk.md §2.1): ignored otherwise.
        let cc = if explicit { req.cc } else { Vec::new() };
        if cc.len() > MAX_APPROVERS {
            return Err(Rejection::param("cc_list 最多 20 人"));
        }
        for u in &cc {
            org.person(u)?;
        }

        let nodes: Vec<Node> = specs
            .into_iter()
            .map(|s| Node {
                action: s.task_action_type,
                user_ids: s.user_ids,
                activity_id: ids.activity_id(),
            })
            .collect();
        let id = ids.instance_id();
        let mut instance = Instance {
            url: format!(
                "https://aflow.dingtalk.com/dingtalk/mobile/homepage.htm?corpid={corp_id}&dd_share=false&showmenu=true&back=native&procInstId={id}&swfrom=isv&dinghash=approval#approval"
            ),
            process_instance_id: id,
            process_code: template.process_code.clone(),
            title: format!("{}提交的{}", originator.name, template.name),
            business_id: ids.business_id(now),
            originator_userid: originator.userid.clone(),
            originator_dept_id: req.dept_id,
            originator_dept_name: dept_name,
            status: InstanceStatus::Running,
            result: None,
            form_component_values: form,
            create_time: now,
            finish_time: None,
            nodes,
            current_node: 0,
            cc_position: req.cc_position.unwrap_or(CcPosition::Start),
            cc_userids: cc,
            tasks: Vec::new(),
            operation_records: Vec::new(),
        };
        instance.record(
            &req.originator_userid,
            now,
            "START_PROCESS_INSTANCE",
            "NONE",
            None,
        );
        if !instance.cc_userids.is_empty()
            && matches!(
                instance.cc_position,
                CcPosition::Start | CcPosition::StartFinish
            )
        {
            instance.record(&req.originator_userid, now, "PROCESS_CC", "NONE", None);
        }
        let mut events = vec![instance.instance_event(corp_id, "start", now)];
        instance.open_node(0, ids, corp_id, now, &mut events);
        Ok((instance, events))
    }

    /// A person acts on one of this instance's open tasks.
    pub fn act(
        &mut self,
        taskid: i64,
        action: Action,
        remark: Option<String>,
        ctx: &mut Ctx<'_>,
    ) -> Result<Vec<Event>, ActError> {
        let (org, corp_id, now) = (ctx.org, ctx.corp_id, ctx.now);
        let ids = &mut *ctx.ids;
        let index = self
            .tasks
            .iter()
            .position(|t| t.taskid == taskid)
            .ok_or(ActError::NoTask(taskid))?;
        if self.tasks[index].status != TaskStatus::Running {
            return Err(ActError::Conflict(format!(
                "task {taskid} is {}, not RUNNING",
                self.tasks[index].status.as_str()
            )));
        }
        if let Action::Redirect { to } = &action {
            org.person(to)
                .map_err(|e| ActError::Invalid(e.errmsg.clone()))?;
            if *to == self.tasks[index].userid {
                return Err(ActError::Invalid(
                    "cannot redirect a task to its own approver".into(),
                ));
            }
        }
        let mut events = Vec::new();
        let userid = self.tasks[index].userid.clone();
        let (result, record_type, record_result, event_result) = match &action {
            Action::Agree => (TaskResult::Agree, "EXECUTE_TASK_NORMAL", "AGREE", "agree"),
            Action::Refuse => (
                TaskResult::Refuse,
                "EXECUTE_TASK_NORMAL",
                "REFUSE",
                "refuse",
            ),
            Action::Redirect { .. } => {
                (TaskResult::Redirected, "REDIRECT_TASK", "NONE", "redirect")
            }
        };
        {
            let task = &mut self.tasks[index];
            task.status = TaskStatus::Completed;
            task.result = result;
            task.finish_time = Some(now);
            task.remark = remark.clone();
        }
        self.record(&userid, now, record_type, record_result, remark);
        events.push(self.task_event(corp_id, index, "finish", Some(event_result)));

        match action {
            Action::Redirect { to } => {
                let node = self.tasks[index].node;
                self.open_task(node, &to, ids, corp_id, now, &mut events);
            }
            Action::Refuse => {
                self.cancel_open_tasks(corp_id, now, &mut events);
                self.finish(Some("refuse"), InstanceStatus::Completed, now);
                events.push(self.instance_event(corp_id, "finish", now));
            }
            Action::Agree => {
                let node = self.tasks[index].node;
                let decided = match self.nodes[node].action {
                    ActionType::And => !self
                        .tasks
                        .iter()
                        .any(|t| t.node == node && t.status == TaskStatus::Running),
                    ActionType::Or | ActionType::None => true,
                };
                if decided {
                    // In an OR node the others' tasks are no longer needed (docs/dingtalk.md §5.3 `cancel`).
                    self.cancel_open_tasks(corp_id, now, &mut events);
                    if node + 1 < self.nodes.len() {
                        self.current_node = node + 1;
                        self.open_node(node + 1, ids, corp_id, now, &mut events);
                    } else {
                        self.finish(Some("agree"), InstanceStatus::Completed, now);
                        events.push(self.instance_event(corp_id, "finish", now));
                    }
                }
            }
        }
        Ok(events)
    }

    /// The originator (or an admin) withdraws the instance: TERMINATED, open tasks CANCELED.
    pub fn terminate(
        &mut self,
        userid: &str,
        remark: Option<String>,
        corp_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<Event>, ActError> {
        if self.status != InstanceStatus::Running {
            return Err(ActError::Conflict(format!(
                "instance {} is {}, not RUNNING",
                self.process_instance_id,
                self.status.as_str()
            )));
        }
        let mut events = Vec::new();
        self.cancel_open_tasks(corp_id, now, &mut events);
        self.record(userid, now, "TERMINATE_PROCESS_INSTANCE", "NONE", remark);
        self.finish(None, InstanceStatus::Terminated, now);
        events.push(self.instance_event(corp_id, "terminate", now));
        Ok(events)
    }

    /// Someone adds a comment (an `ADD_REMARK` operation record, docs/dingtalk.md §12.4). Each
    /// call appends one: a repeated comment is a second comment. Taken on running and completed
    /// approvals, refused on withdrawn or cancelled ones [UNCONFIRMED: DingTalk does not say
    /// which states refuse; comments after completion are what apps need, e.g. "paid"]. If the
    /// commenter holds an open task of the approval, a `bpms_task_change` of type `comment`
    /// carries the text (docs/dingtalk.md §5.3 lists the type; when DingTalk sends it is
    /// [UNCONFIRMED]); otherwise nothing is pushed.
    pub fn comment(
        &mut self,
        userid: &str,
        text: &str,
        corp_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<Event>, ActError> {
        if matches!(
            self.status,
            InstanceStatus::Terminated | InstanceStatus::Canceled
        ) {
            return Err(ActError::Conflict(format!(
                "instance {} is {}: no comments",
                self.process_instance_id,
                self.status.as_str()
            )));
        }
        self.record(userid, now, "ADD_REMARK", "NONE", Some(text.to_string()));
        let mut events = Vec::new();
        if let Some(index) = self
            .tasks
            .iter()
            .position(|t| t.userid == userid && t.status == TaskStatus::Running)
        {
            let mut event = self.task_event(corp_id, index, "comment", None);
            event.payload.insert("remark".into(), text.into());
            event.event_time_ms = now.timestamp_millis();
            events.push(event);
        }
        Ok(events)
    }

    pub fn is_open(&self) -> bool {
        self.status == InstanceStatus::Running
    }

    fn finish(&mut self, result: Option<&'static str>, status: InstanceStatus, now: DateTime<Utc>) {
        self.status = status;
        self.result = result;
        self.finish_time = Some(now);
        if status == InstanceStatus::Completed
            && !self.cc_userids.is_empty()
            && matches!(
                self.cc_position,
                CcPosition::Finish | CcPosition::StartFinish
            )
        {
            let originator = self.originator_userid.clone();
            self.record(&originator, now, "PROCESS_CC", "NONE", None);
        }
    }

    fn open_node(
        &mut self,
        node: usize,
        ids: &mut Ids,
        corp_id: &str,
        now: DateTime<Utc>,
        events: &mut Vec<Event>,
    ) {
        for userid in self.nodes[node].user_ids.clone() {
            self.open_task(node, &userid, ids, corp_id, now, events);
        }
    }

    fn open_task(
        &mut self,
        node: usize,
        userid: &str,
        ids: &mut Ids,
        corp_id: &str,
        now: DateTime<Utc>,
        events: &mut Vec<Event>,
    ) {
        self.tasks.push(Task {
            taskid: ids.task_id(),
            userid: userid.into(),
            status: TaskStatus::Running,
            result: TaskResult::None,
            activity_id: self.nodes[node].activity_id.clone(),
            node,
            create_time: now,
            finish_time: None,
            remark: None,
        });
        events.push(self.task_event(corp_id, self.tasks.len() - 1, "start", None));
    }

    fn cancel_open_tasks(&mut self, corp_id: &str, now: DateTime<Utc>, events: &mut Vec<Event>) {
        for index in 0..self.tasks.len() {
            if self.tasks[index].status == TaskStatus::Running {
                let task = &mut self.tasks[index];
                task.status = TaskStatus::Canceled;
                task.result = TaskResult::None;
                task.finish_time = Some(now);
                events.push(self.task_event(corp_id, index, "cancel", None));
            }
        }
    }

    fn record(
        &mut self,
        userid: &str,
        date: DateTime<Utc>,
        operation_type: &'static str,
        operation_result: &'static str,
        remark: Option<String>,
    ) {
        self.operation_records.push(Record {
            userid: userid.into(),
            date,
            operation_type,
            operation_result,
            remark,
        });
    }

    /// `bpms_instance_change` in the legacy flat HTTP-push shape (docs/dingtalk.md §5.2): ms times,
    /// lower-case `corpId`, no `eventId`.
    fn instance_event(&self, corp_id: &str, kind: &str, now: DateTime<Utc>) -> Event {
        let mut p = Map::new();
        p.insert("EventType".into(), TAG_INSTANCE.into());
        p.insert(
            "processInstanceId".into(),
            self.process_instance_id.clone().into(),
        );
        p.insert("corpId".into(), corp_id.into());
        p.insert(
            "createTime".into(),
            self.create_time.timestamp_millis().into(),
        );
        if let Some(finish) = self.finish_time.filter(|_| kind != "start") {
            p.insert("finishTime".into(), finish.timestamp_millis().into());
        }
        p.insert("title".into(), self.title.clone().into());
        p.insert("type".into(), kind.into());
        if kind == "finish"
            && let Some(result) = self.result
        {
            p.insert("result".into(), result.into());
        }
        p.insert("staffId".into(), self.originator_userid.clone().into());
        p.insert("url".into(), self.url.clone().into());
        p.insert("processCode".into(), self.process_code.clone().into());
        p.insert("bizCategoryId".into(), "".into());
        p.insert("businessId".into(), self.business_id.clone().into());
        Event {
            tag: TAG_INSTANCE,
            payload: p,
            event_time_ms: now.timestamp_millis(),
        }
    }

    /// `bpms_task_change` (docs/dingtalk.md §5.3): `taskId` a number, `staffId` the approver. `activityId`
    /// is left out: it is not in the 2026 field table [UNCONFIRMED], so a client must not need it.
    fn task_event(&self, corp_id: &str, index: usize, kind: &str, result: Option<&str>) -> Event {
        let task = &self.tasks[index];
        let mut p = Map::new();
        p.insert("EventType".into(), TAG_TASK.into());
        p.insert(
            "processInstanceId".into(),
            self.process_instance_id.clone().into(),
        );
        p.insert("corpId".into(), corp_id.into());
        p.insert(
            "createTime".into(),
            task.create_time.timestamp_millis().into(),
        );
        if let Some(finish) = task.finish_time {
            p.insert("finishTime".into(), finish.timestamp_millis().into());
        }
        p.insert("title".into(), self.title.clone().into());
        p.insert("type".into(), kind.into());
        if let Some(result) = result {
            p.insert("result".into(), result.into());
        }
        if let Some(remark) = task.remark.as_ref().filter(|_| kind == "finish") {
            p.insert("remark".into(), remark.clone().into());
        }
        p.insert("staffId".into(), task.userid.clone().into());
        p.insert("taskId".into(), task.taskid.into());
        p.insert("processCode".into(), self.process_code.clone().into());
        p.insert("bizCategoryId".into(), "".into());
        p.insert("businessId".into(), self.business_id.clone().into());
        Event {
            tag: TAG_TASK,
            payload: p,
            event_time_ms: task
                .finish_time
                .unwrap_or(task.create_time)
                .timestamp_millis(),
        }
    }

    /// `process_instance` of `topapi/processinstance/get`, exactly as docs/dingtalk.md §2.3 shows it:
    /// Beijing-time strings, `originator_dept_id` and `taskid` as strings, `finish_time` absent
    /// while open, `result` empty while running or when terminated.
    pub fn get_view(&self) -> Value {
        let mut approvers: Vec<&str> = Vec::new();
        for node in &self.nodes {
            for u in &node.user_ids {
                if !approvers.contains(&u.as_str()) {
                    approvers.push(u);
                }
            }
        }
        for t in &self.tasks {
            if !approvers.contains(&t.userid.as_str()) {
                approvers.push(&t.userid);
            }
        }
        let mut v = json!({
            "title": self.title,
            "create_time": beijing(self.create_time),
            "originator_userid": self.originator_userid,
            "originator_dept_id": self.originator_dept_id.to_string(),
            "originator_dept_name": self.originator_dept_name,
            "status": self.status.as_str(),
            "result": self.result.unwrap_or(""),
            "business_id": self.business_id,
            "biz_action": "NONE",
            "approver_userids": approvers,
            "cc_userids": self.cc_userids,
            "attached_process_instance_ids": [],
            "main_process_instance_id": "",
            "form_component_values": self.form_component_values,
            "operation_records": self.operation_records.iter().map(|r| {
                let mut rec = json!({
                    "userid": r.userid,
                    "date": beijing(r.date),
                    "operation_type": r.operation_type,
                    "operation_result": r.operation_result,
                });
                if let Some(remark) = &r.remark {
                    rec["remark"] = remark.clone().into();
                }
                rec
            }).collect::<Vec<_>>(),
            "tasks": self.tasks.iter().map(|t| {
                let mut task = json!({
                    "userid": t.userid,
                    "task_status": t.status.as_str(),
                    "task_result": t.result.as_str(),
                    "create_time": beijing(t.create_time),
                    "taskid": t.taskid.to_string(),
                    "activity_id": t.activity_id,
                    "url": format!("{}&taskId={}", self.url, t.taskid),
                });
                if let Some(f) = t.finish_time {
                    task["finish_time"] = beijing(f).into();
                }
                task
            }).collect::<Vec<_>>(),
        });
        if let Some(f) = self.finish_time {
            v["finish_time"] = beijing(f).into();
        }
        v
    }
}

/// The nodes the originator's choices make of `template`'s self-selected nodes, one approver per
/// node in the order chosen (ONE_BY_ONE). `choices` is `None` for the old API, which cannot name
/// them: a template with a required self-selected node is then refused (docs/dingtalk.md §2.1
/// says such templates need v1.0; how the old API answers is [UNCONFIRMED], refusing is the
/// stricter reading).
fn select_specs(
    org: &Org,
    template: &Template,
    choices: Option<&[SelectChoice]>,
) -> Result<Vec<NodeSpec>, Rejection> {
    let Some(choices) = choices else {
        if let Some(node) = template.select_nodes.iter().find(|n| n.required) {
            return Err(Rejection::param(format!(
                "模板含发起人自选审批节点 {}，须通过 v1.0 接口的 targetSelectActioners 指定审批人",
                node.name
            )));
        }
        return Ok(Vec::new());
    };
    if let Some(unknown) = choices.iter().find(|c| {
        !template
            .select_nodes
            .iter()
            .any(|n| n.actor_key == c.actor_key)
    }) {
        return Err(Rejection::param(format!(
            "targetSelectActioners 中的 actionerKey 不存在 actionerKey={}",
            unknown.actor_key
        )));
    }
    let mut specs = Vec::new();
    for node in &template.select_nodes {
        let chosen: Vec<&String> = choices
            .iter()
            .filter(|c| c.actor_key == node.actor_key)
            .flat_map(|c| &c.user_ids)
            .collect();
        if chosen.is_empty() {
            if node.required {
                return Err(Rejection::param(format!(
                    "{}: 自选审批人节点 {} 未指定审批人 actionerKey={}",
                    select_code::MISSING,
                    node.name,
                    node.actor_key
                )));
            }
            continue;
        }
        if chosen.len() > 1 && !node.allowed_multi {
            return Err(Rejection::param(format!(
                "{}: 自选审批人节点 {} 只能选择一人",
                select_code::SCOPE,
                node.name
            )));
        }
        for userid in chosen {
            org.person(userid)?;
            if !node.candidates.is_empty() && !node.candidates.contains(userid) {
                return Err(Rejection::param(format!(
                    "{}: {userid} 不在自选审批人节点 {} 的可选范围内",
                    select_code::SCOPE,
                    node.name
                )));
            }
            specs.push(NodeSpec {
                task_action_type: ActionType::None,
                user_ids: vec![userid.clone()],
            });
        }
    }
    Ok(specs)
}

impl Instance {
    /// `result` of the v1.0 get (docs/dingtalk.md §11.3): the fields of [`Instance::get_view`] in
    /// camelCase, UTC `yyyy-MM-ddTHH:mmZ` times, `taskId` a number, `originatorDeptId` text.
    pub fn v1_view(&self) -> Value {
        let legacy = self.get_view();
        let approvers = legacy["approver_userids"].clone();
        let mut v = json!({
            "title": self.title,
            "createTime": v1_time(self.create_time),
            "originatorUserId": self.originator_userid,
            "originatorDeptId": self.originator_dept_id.to_string(),
            "originatorDeptName": self.originator_dept_name,
            "status": self.status.as_str(),
            "result": self.result.unwrap_or(""),
            "businessId": self.business_id,
            "bizAction": "NONE",
            "bizData": "",
            "approverUserIds": approvers,
            "ccUserIds": self.cc_userids,
            "attachedProcessInstanceIds": [],
            "mainProcessInstanceId": "",
            "formComponentValues": self.form_component_values.iter().map(|f| json!({
                "id": f.id,
                "name": f.name,
                "value": f.value,
                "extValue": f.ext_value,
                "componentType": f.component_type,
                "bizAlias": "",
            })).collect::<Vec<_>>(),
            "operationRecords": self.operation_records.iter().map(|r| {
                let mut rec = json!({
                    "userId": r.userid,
                    "date": v1_time(r.date),
                    "type": r.operation_type,
                    "result": r.operation_result,
                    "showName": "",
                    "ccUserIds": [],
                    "images": [],
                    "attachments": [],
                });
                if let Some(remark) = &r.remark {
                    rec["remark"] = remark.clone().into();
                }
                rec
            }).collect::<Vec<_>>(),
            "tasks": self.tasks.iter().map(|t| {
                let mut task = json!({
                    "taskId": t.taskid,
                    "userId": t.userid,
                    "status": t.status.as_str(),
                    "result": t.result.as_str(),
                    "createTime": v1_time(t.create_time),
                    "activityId": t.activity_id,
                    "processInstanceId": self.process_instance_id,
                    "pcUrl": format!("{}&taskId={}", self.url, t.taskid),
                    "mobileUrl": format!("{}&taskId={}", self.url, t.taskid),
                    "taskGroupName": "",
                });
                if let Some(f) = t.finish_time {
                    task["finishTime"] = v1_time(f).into();
                }
                task
            }).collect::<Vec<_>>(),
        });
        if let Some(f) = self.finish_time {
            v["finishTime"] = v1_time(f).into();
        }
        v
    }
}

impl Org {
    /// v1.0 `processes/forecast` (docs/dingtalk.md §11.5): the route a create of `process_code`
    /// by `userid` with `form` would take, from the template's flow (fixed approvers, then its
    /// self-selected nodes), after the same checks a create makes of the form. `ids` makes the
    /// activity ids; the answer is `result`.
    pub fn forecast(
        &self,
        process_code: &str,
        userid: &str,
        form: &[FormInput],
        ids: &mut Ids,
    ) -> Result<Value, Rejection> {
        let template = self.templates.get(process_code).ok_or_else(|| {
            Rejection::not_found(format!("审批模板不存在 process_code={process_code}"))
        })?;
        self.person(userid)?;
        validate_form(self, template, form)?;
        let mut rules = Vec::new();
        for approver in &template.default_approvers {
            let person = self.person(approver)?;
            rules.push(json!({
                "activityId": ids.activity_id(),
                "activityName": "审批人",
                "activityType": "target_approval",
                "isTargetSelect": false,
                "workflowActor": {
                    "actorKey": format!("approver_{approver}"),
                    "actorType": "approver",
                    "actorSelectionType": "approvals",
                    "actorSelectionRange": {"approvals": [{"workNo": approver, "userName": person.name}], "labels": []},
                    "allowedMulti": false,
                    "approvalType": "MANUAL",
                    "approvalMethod": "ONE_BY_ONE",
                    "actorActivateType": "ALL",
                    "required": true,
                },
                "activityActioners": [{"userId": approver, "name": person.name, "avatar": ""}],
            }));
        }
        for node in &template.select_nodes {
            let range: Vec<Value> = node
                .candidates
                .iter()
                .filter_map(|u| self.people.get(u))
                .map(|p| json!({"workNo": p.userid, "userName": p.name}))
                .collect();
            rules.push(json!({
                "activityId": ids.activity_id(),
                "activityName": node.name,
                "activityType": "target_select",
                "isTargetSelect": true,
                "workflowActor": {
                    "actorKey": node.actor_key,
                    "actorType": "approver",
                    "actorSelectionType": if node.candidates.is_empty() { "allStaff" } else { "approvals" },
                    "actorSelectionRange": {"approvals": range, "labels": []},
                    "allowedMulti": node.allowed_multi,
                    "approvalType": "MANUAL",
                    "approvalMethod": "ONE_BY_ONE",
                    "actorActivateType": "ALL",
                    "required": node.required,
                },
                "activityActioners": [],
            }));
        }
        Ok(json!({
            "isForecastSuccess": true,
            "processCode": process_code,
            "userId": userid,
            "processId": 0,
            "isStaticWorkflow": template.select_nodes.is_empty(),
            "workflowActivityRules": rules,
            "workflowForecastNodes": [],
        }))
    }
}

/// Checks the form values of a create against the template (docs/dingtalk.md §2.1/§2.2) and turns them
/// into what `processinstance/get` reads back (docs/dingtalk.md §2.3 "Read-back form values").
fn validate_form(
    org: &Org,
    template: &Template,
    values: &[FormInput],
) -> Result<Vec<FormEntry>, Rejection> {
    if values.len() > MAX_FORM_VALUES {
        return Err(Rejection::param(format!(
            "form_component_values 最多 {MAX_FORM_VALUES} 项"
        )));
    }
    let mut entries = Vec::with_capacity(values.len());
    for (i, input) in values.iter().enumerate() {
        if values[..i].iter().any(|v| v.name == input.name) {
            return Err(Rejection::param(format!(
                "表单组件重复 name={}",
                input.name
            )));
        }
        let control = template
            .controls
            .iter()
            .find(|c| c.label == input.name)
            .ok_or_else(|| Rejection::param(format!("表单组件不存在 name={}", input.name)))?;
        if input.value.chars().count() > MAX_VALUE_CHARS {
            return Err(Rejection::param(format!("表单值过长 name={}", input.name)));
        }
        entries.push(read_back(org, template, control, input)?);
    }
    for control in template.controls.iter().filter(|c| c.required) {
        let filled = values
            .iter()
            .any(|v| v.name == control.label && !v.value.trim().is_empty());
        if !filled {
            return Err(Rejection::param(format!(
                "表单必填项未填写 name={}",
                control.label
            )));
        }
    }
    Ok(entries)
}

fn read_back(
    org: &Org,
    template: &Template,
    control: &Control,
    input: &FormInput,
) -> Result<FormEntry, Rejection> {
    let bad = |why: &str| Rejection::param(format!("表单值不合法 name={} ({why})", control.label));
    let value = input.value.as_str();
    let mut ext_value = input.ext_value.clone().unwrap_or_default();
    let mut read = value.to_string();
    let empty = value.trim().is_empty();
    match control.component_type.as_str() {
        "NumberField" | "MoneyField" | "StarRatingField" if !empty => {
            value
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite())
                .ok_or_else(|| bad("not a number"))?;
        }
        "DDSelectField" if !empty => {
            let key = control
                .options
                .iter()
                .position(|o| o == value)
                .ok_or_else(|| bad("not one of the options"))?;
            ext_value = json!({"label": value, "key": format!("option_{key}")}).to_string();
        }
        "DDMultiSelectField" if !empty => {
            let chosen = string_array(value).ok_or_else(|| bad("not a JSON array of strings"))?;
            if chosen.iter().any(|c| !control.options.contains(c)) {
                return Err(bad("not one of the options"));
            }
        }
        "DDDateField" if !empty && !is_date(value) => {
            return Err(bad("not yyyy-MM-dd or yyyy-MM-dd HH:mm"));
        }
        "DDDateRangeField" if !empty => {
            let range = string_array(value).ok_or_else(|| bad("not a JSON array"))?;
            if range.len() != 2 || !range.iter().all(|d| is_date(d)) || range[0] > range[1] {
                return Err(bad("not [start, end] dates"));
            }
        }
        "DDPhotoField" | "RelateField" if !empty => {
            string_array(value).ok_or_else(|| bad("not a JSON array of strings"))?;
        }
        "InnerContactField" if !empty => {
            let userids = string_array(value).ok_or_else(|| bad("not a JSON array of userids"))?;
            let mut names = Vec::new();
            let mut ext = Vec::new();
            for u in &userids {
                let p = org.person(u)?;
                names.push(p.name.clone());
                ext.push(json!({"emplId": p.userid, "name": p.name}));
            }
            read = names.join(",");
            ext_value = Value::Array(ext).to_string();
        }
        "TableField" if !empty => {
            let rows: Vec<Vec<FormInput>> =
                serde_json::from_str(value).map_err(|_| bad("not rows of {name, value}"))?;
            let mut read_rows = Vec::with_capacity(rows.len());
            for (n, row) in rows.iter().enumerate() {
                let mut cells = Vec::with_capacity(row.len());
                for cell in row {
                    // A table without declared columns takes any cell as text (older fixtures).
                    let column = control.children.iter().find(|c| c.label == cell.name);
                    if column.is_none() && !control.children.is_empty() {
                        return Err(bad(&format!("no column {}", cell.name)));
                    }
                    let (component, key) = match column {
                        Some(c) => (c.component_type.clone(), template.control_id(c)),
                        None => (
                            "TextField".to_string(),
                            component_id(&template.process_code, "TextField", &cell.name),
                        ),
                    };
                    cells.push(json!({
                        "componentType": component,
                        "label": cell.name,
                        "value": cell.value,
                        "key": key,
                        "extendValue": "",
                    }));
                }
                read_rows
                    .push(json!({"rowValue": cells, "rowNumber": format!("TableField_row{n}")}));
            }
            read = Value::Array(read_rows).to_string();
        }
        // An empty multi-line text reads back as the literal "null" (docs/dingtalk.md §2.3).
        "TextareaField" if empty => read = "null".into(),
        _ => {}
    }
    Ok(FormEntry {
        id: template.control_id(control),
        name: control.label.clone(),
        value: read,
        ext_value,
        component_type: control.component_type.clone(),
    })
}

/// A stable control id like DingTalk's `TextField-K2AD4O5B`.
pub(crate) fn component_id(process_code: &str, component_type: &str, label: &str) -> String {
    let digest = Sha256::digest(format!("{process_code}/{label}").as_bytes());
    format!("{component_type}-{}", hex::encode_upper(&digest[..4]))
}

fn string_array(text: &str) -> Option<Vec<String>> {
    serde_json::from_str(text).ok()
}

fn is_date(text: &str) -> bool {
    NaiveDate::parse_from_str(text, "%Y-%m-%d").is_ok()
        || NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CORP: &str = "dingemulatorcorp0000";

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_764_300_000_123).unwrap()
    }

    fn ctx<'a>(org: &'a Org, ids: &'a mut Ids) -> Ctx<'a> {
        Ctx {
            org,
            ids,
            corp_id: CORP,
            now: now(),
        }
    }

    fn expense(nodes: Option<Vec<NodeSpec>>) -> StartRequest {
        StartRequest {
            process_code: "PROC-EMU-EXPENSE".into(),
            originator_userid: "emp1".into(),
            dept_id: 100,
            nodes,
            form: vec![
                FormInput {
                    name: "Reason".into(),
                    value: "trip".into(),
                    ext_value: None,
                },
                FormInput {
                    name: "Amount".into(),
                    value: "100".into(),
                    ext_value: None,
                },
                FormInput {
                    name: "Type".into(),
                    value: "差旅".into(),
                    ext_value: None,
                },
            ],
            ..StartRequest::default()
        }
    }

    fn kinds(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| format!("{}:{}", e.tag, e.payload["type"].as_str().unwrap()))
            .collect()
    }

    #[test]
    fn beijing_time_is_utc_plus_eight_without_millis() {
        assert_eq!(beijing(now()), "2025-11-28 11:20:00");
    }

    #[test]
    fn start_then_agree_completes_with_the_events_in_order() {
        let org = Org::builtin();
        let mut ids = Ids::new(7);
        let (mut inst, events) = Instance::start(&mut ctx(&org, &mut ids), expense(None)).unwrap();
        assert_eq!(
            kinds(&events),
            ["bpms_instance_change:start", "bpms_task_change:start"]
        );
        assert_eq!(inst.tasks[0].userid, DEFAULT_APPROVER);
        let task = inst.tasks[0].taskid;
        let events = inst
            .act(
                task,
                Action::Agree,
                Some("ok".into()),
                &mut ctx(&org, &mut ids),
            )
            .unwrap();
        assert_eq!(
            kinds(&events),
            ["bpms_task_change:finish", "bpms_instance_change:finish"]
        );
        assert_eq!(events[1].payload["result"], "agree");
        assert!(events[0].payload["taskId"].is_i64());
        assert_eq!(inst.status, InstanceStatus::Completed);
        let view = inst.get_view();
        assert_eq!(view["result"], "agree");
        assert_eq!(view["tasks"][0]["taskid"], task.to_string());
        assert_eq!(
            view["form_component_values"][2]["ext_value"],
            r#"{"key":"option_0","label":"差旅"}"#
        );
    }

    #[test]
    fn refuse_in_an_or_node_cancels_the_other_tasks_and_finishes_refused() {
        let org = Org::builtin();
        let mut ids = Ids::new(7);
        let nodes = vec![
            NodeSpec {
                task_action_type: ActionType::Or,
                user_ids: vec!["manager1".into(), "boss1".into()],
            },
            NodeSpec {
                task_action_type: ActionType::None,
                user_ids: vec!["fin1".into()],
            },
        ];
        let (mut inst, events) =
            Instance::start(&mut ctx(&org, &mut ids), expense(Some(nodes))).unwrap();
        assert_eq!(events.len(), 3);
        let first = inst.tasks[0].taskid;
        let events = inst
            .act(first, Action::Refuse, None, &mut ctx(&org, &mut ids))
            .unwrap();
        assert_eq!(
            kinds(&events),
            [
                "bpms_task_change:finish",
                "bpms_task_change:cancel",
                "bpms_instance_change:finish"
            ]
        );
        assert_eq!(inst.result, Some("refuse"));
        assert_eq!(inst.tasks[1].status, TaskStatus::Canceled);
    }

    #[test]
    fn and_node_waits_for_everyone_and_redirect_hands_the_task_over() {
        let org = Org::builtin();
        let mut ids = Ids::new(7);
        let nodes = vec![NodeSpec {
            task_action_type: ActionType::And,
            user_ids: vec!["manager1".into(), "boss1".into()],
        }];
        let (mut inst, _) =
            Instance::start(&mut ctx(&org, &mut ids), expense(Some(nodes))).unwrap();
        let (a, b) = (inst.tasks[0].taskid, inst.tasks[1].taskid);
        let events = inst
            .act(a, Action::Agree, None, &mut ctx(&org, &mut ids))
            .unwrap();
        assert_eq!(kinds(&events), ["bpms_task_change:finish"]);
        let events = inst
            .act(
                b,
                Action::Redirect { to: "hr1".into() },
                None,
                &mut ctx(&org, &mut ids),
            )
            .unwrap();
        assert_eq!(
            kinds(&events),
            ["bpms_task_change:finish", "bpms_task_change:start"]
        );
        assert_eq!(events[0].payload["result"], "redirect");
        assert!(inst.is_open());
        let c = inst.tasks[2].taskid;
        inst.act(c, Action::Agree, None, &mut ctx(&org, &mut ids))
            .unwrap();
        assert_eq!(inst.status, InstanceStatus::Completed);
        assert_eq!(inst.result, Some("agree"));
    }

    #[test]
    fn terminate_cancels_open_tasks_and_leaves_the_result_empty() {
        let org = Org::builtin();
        let mut ids = Ids::new(7);
        let (mut inst, _) = Instance::start(&mut ctx(&org, &mut ids), expense(None)).unwrap();
        let events = inst.terminate("emp1", None, CORP, now()).unwrap();
        assert_eq!(
            kinds(&events),
            ["bpms_task_change:cancel", "bpms_instance_change:terminate"]
        );
        assert!(events[1].payload.contains_key("finishTime"));
        assert!(!events[1].payload.contains_key("result"));
        assert_eq!(inst.get_view()["result"], "");
        assert_eq!(inst.get_view()["status"], "TERMINATED");
    }

    #[test]
    fn creates_that_dingtalk_would_refuse_are_refused() {
        let org = Org::builtin();
        let mut ids = Ids::new(7);
        let mut unknown = expense(None);
        unknown.process_code = "PROC-NOPE".into();
        assert_eq!(
            Instance::start(&mut ctx(&org, &mut ids), unknown)
                .unwrap_err()
                .errcode,
            errcode::NOT_FOUND
        );
        let mut missing = expense(None);
        missing.form.remove(0);
        assert!(
            Instance::start(&mut ctx(&org, &mut ids), missing)
                .unwrap_err()
                .errmsg
                .contains("Reason")
        );
        let mut bad_option = expense(None);
        bad_option.form[2].value = "火箭".into();
        assert!(Instance::start(&mut ctx(&org, &mut ids), bad_option).is_err());
        let mut bad_dept = expense(None);
        bad_dept.dept_id = 200;
        assert!(Instance::start(&mut ctx(&org, &mut ids), bad_dept).is_err());
        let mut root = expense(None);
        root.dept_id = -1;
        let (inst, _) = Instance::start(&mut ctx(&org, &mut ids), root).unwrap();
        assert_eq!(inst.get_view()["originator_dept_id"], "-1");
    }

    #[test]
    fn the_same_seed_gives_the_same_ids() {
        let (mut a, mut b) = (Ids::new(42), Ids::new(42));
        assert_eq!(a.instance_id(), b.instance_id());
        assert_eq!(a.task_id(), b.task_id());
        assert_eq!(a.token(), b.token());
        assert_ne!(Ids::new(43).instance_id(), Ids::new(42).instance_id());
    }
}
