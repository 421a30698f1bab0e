//! [`Handle`], the emulator seen from Rust: what tests, the admin API and the simulated people use
//! to act as people, look inside, set faults and read or change the monthly allowances. An action changes the memory (`state`) under its
//! lock, then hands the events it caused to delivery (`push`), as `api` does for a create.
//!
//! Owns: the admin actions and their request types, sample form values. Does not own: the memory
//! and its rules (`state`, `model`), delivering pushes (`push`), HTTP (`admin`).

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use rand::{Rng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    faults::{Faults, InjectedError, Injection},
    model::{
        self, Action, Control, Ctx, FormInput, Instance, NodeSpec, Org, Person, Rejection,
        StartRequest, Task, TaskStatus, Template,
    },
    push,
    quota::{Allowances, QuotaReport},
    state::{AdminError, Change, PushRecord, Registration, Shared},
};

/// A person starts an approval (admin API `POST /_emulator/instances`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartInstance {
    pub process_code: String,
    pub originator_userid: String,
    /// Default: the originator's first department.
    #[serde(default)]
    pub dept_id: Option<i64>,
    /// Approvers in sequence, one per node. Default: the template's flow.
    #[serde(default)]
    pub approvers: Option<Vec<String>>,
    /// Nodes as in `approvers_v2` (docs/dingtalk.md §2.1); wins over `approvers`.
    #[serde(default)]
    pub approvers_v2: Option<Vec<NodeSpec>>,
    #[serde(default)]
    pub cc_list: Option<Vec<String>>,
    /// Default: sample values for the template's controls.
    #[serde(default)]
    pub form_values: Option<Vec<FormInput>>,
    /// Backdate the instance (epoch ms), e.g. to exercise `listids` windows. Default: now.
    #[serde(default)]
    pub create_time_ms: Option<i64>,
}

/// A person's action on a task (admin API `POST /_emulator/tasks/{taskid}/{action}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskAction {
    /// Who acts; must be the task's approver when given.
    #[serde(default)]
    pub userid: Option<String>,
    #[serde(default)]
    pub remark: Option<String>,
    /// Redirect only: the new approver.
    #[serde(default)]
    pub to: Option<String>,
}

/// An open task and the instance it belongs to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpenTask {
    pub process_instance_id: String,
    pub process_code: String,
    #[serde(flatten)]
    pub task: Task,
}

/// The emulator seen from Rust: cheap to clone; every method locks briefly and never across I/O.
#[derive(Clone)]
pub struct Handle {
    pub(crate) shared: Arc<Shared>,
}

impl Handle {
    /// The CorpId: the owner key of every push and `check_url` (register_call_back, docs/dingtalk.md §4.5).
    pub fn corp_id(&self) -> &str {
        &self.shared.config.corp_id
    }

    /// Calls of one endpoint so far; `endpoint` is the path without the leading slash
    /// (`"gettoken"`, `"topapi/processinstance/create"`, `"call_back/register_call_back"`).
    pub fn calls(&self, endpoint: &str) -> usize {
        self.shared
            .world()
            .calls
            .get(endpoint)
            .map_or(0, |c| c.count)
    }

    /// Calls per endpoint so far.
    pub fn all_calls(&self) -> BTreeMap<String, usize> {
        self.shared
            .world()
            .calls
            .iter()
            .map(|(k, v)| (k.clone(), v.count))
            .collect()
    }

    /// Arrival times of the calls of one endpoint (the last 100 000).
    pub fn call_times(&self, endpoint: &str) -> Vec<Instant> {
        self.shared
            .world()
            .calls
            .get(endpoint)
            .map(|c| c.times.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The most calls of `endpoint` that arrived within any `window` (e.g. one second): for
    /// "the rate was never exceeded".
    pub fn max_calls_within(&self, endpoint: &str, window: Duration) -> usize {
        let times = self.call_times(endpoint);
        let mut best = 0;
        let mut from = 0;
        for to in 0..times.len() {
            while times[to].duration_since(times[from]) >= window {
                from += 1;
            }
            best = best.max(to - from + 1);
        }
        best
    }

    pub fn faults(&self) -> Faults {
        self.shared.world().faults.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.shared.world().faults = faults;
    }

    pub fn update_faults(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut self.shared.world().faults);
    }

    /// Back to a healthy DingTalk (queued injections included).
    pub fn reset_faults(&self) {
        self.set_faults(Faults::default());
    }

    /// The next `count` calls of `endpoint` (or `"*"`) are answered with `error`.
    pub fn inject(&self, endpoint: &str, error: InjectedError, count: u32) {
        self.shared.world().faults.inject.push(Injection {
            endpoint: endpoint.into(),
            error,
            remaining: count,
        });
    }

    /// This month's metered calls and deliveries against the allowances (docs/dingtalk.md §7).
    pub fn quota(&self) -> QuotaReport {
        self.shared.world().quota.report(Utc::now())
    }

    /// Starts a new month now: every counter back to zero, the allowances kept. Returns the
    /// month just ended.
    pub fn rollover(&self) -> QuotaReport {
        self.shared.world().quota.rollover(Utc::now())
    }

    /// Changes the allowances at once, as when the organisation upgrades (0 = no limit; a field
    /// left `None` is kept). This month's counters stay; returns the month with the new
    /// allowances.
    pub fn set_allowances(&self, allowances: Allowances) -> QuotaReport {
        self.shared
            .world()
            .quota
            .set_allowances(allowances, Utc::now())
    }

    /// Revokes the current access token now: the next call with it gets 88/40014 (topapi) or
    /// 40014 (oapi), and `gettoken` issues a new one.
    pub fn revoke_token(&self) {
        self.shared.world().token = None;
    }

    /// The currently valid access token, if any.
    pub fn current_token(&self) -> Option<String> {
        let world = self.shared.world();
        world
            .token
            .as_ref()
            .filter(|t| Instant::now() < t.expires_at)
            .map(|t| t.value.clone())
    }

    /// A person starts an approval; its events are pushed like any other.
    pub fn start_instance(&self, request: StartInstance) -> Result<Instance, AdminError> {
        let (instance, events) = {
            let mut world = self.shared.world();
            let world = &mut *world;
            let originator = world
                .org
                .person(&request.originator_userid)
                .map_err(AdminError::Rejected)?
                .clone();
            let template = world
                .org
                .templates
                .get(&request.process_code)
                .cloned()
                .ok_or_else(|| {
                    AdminError::Rejected(Rejection::not_found(format!(
                        "审批模板不存在 process_code={}",
                        request.process_code
                    )))
                })?;
            let now = match request.create_time_ms {
                Some(ms) => DateTime::from_timestamp_millis(ms)
                    .ok_or_else(|| AdminError::Invalid("create_time_ms out of range".into()))?,
                None => Utc::now(),
            };
            let form = match request.form_values {
                Some(values) => values,
                None => sample_form(&template, &world.org, &mut world.people_rng, now),
            };
            let nodes = request.approvers_v2.or_else(|| {
                request.approvers.map(|users| {
                    users
                        .into_iter()
                        .map(|u| NodeSpec {
                            task_action_type: model::ActionType::None,
                            user_ids: vec![u],
                        })
                        .collect()
                })
            });
            // People in the emulator pick the first candidate of each self-selected node (or
            // the default approver when anyone may be picked).
            let select = template
                .select_nodes
                .iter()
                .map(|n| model::SelectChoice {
                    actor_key: n.actor_key.clone(),
                    user_ids: vec![
                        n.candidates
                            .first()
                            .cloned()
                            .unwrap_or_else(|| model::DEFAULT_APPROVER.to_string()),
                    ],
                })
                .collect();
            let start = StartRequest {
                select: Some(select),
                process_code: request.process_code,
                originator_userid: request.originator_userid,
                dept_id: request
                    .dept_id
                    .or_else(|| originator.dept_ids.first().copied())
                    .unwrap_or(-1),
                nodes,
                cc: request.cc_list.unwrap_or_default(),
                cc_position: None,
                form,
            };
            let mut ctx = Ctx {
                org: &world.org,
                ids: &mut world.ids,
                corp_id: &self.shared.config.corp_id,
                now,
            };
            let (instance, events) =
                Instance::start(&mut ctx, start).map_err(AdminError::Rejected)?;
            world.insert_instance(instance.clone());
            (instance, events)
        };
        tracing::debug!(process_instance_id = %instance.process_instance_id, "emulator: approval started");
        push::dispatch(&self.shared, events);
        Ok(instance)
    }

    /// The task's approver agrees.
    pub fn agree(&self, taskid: i64, act: TaskAction) -> Result<Instance, AdminError> {
        self.change(Change::Task {
            taskid,
            action: Action::Agree,
            userid: act.userid,
            remark: act.remark,
        })
    }

    /// The task's approver refuses: the instance ends COMPLETED + refuse.
    pub fn refuse(&self, taskid: i64, act: TaskAction) -> Result<Instance, AdminError> {
        self.change(Change::Task {
            taskid,
            action: Action::Refuse,
            userid: act.userid,
            remark: act.remark,
        })
    }

    /// The task's approver hands the task over to `act.to`.
    pub fn redirect(&self, taskid: i64, act: TaskAction) -> Result<Instance, AdminError> {
        let to = act
            .to
            .ok_or_else(|| AdminError::Invalid("redirect needs \"to\"".into()))?;
        self.change(Change::Task {
            taskid,
            action: Action::Redirect { to },
            userid: act.userid,
            remark: act.remark,
        })
    }

    /// Withdraws a running instance (by its originator unless `userid` says otherwise).
    pub fn terminate(
        &self,
        process_instance_id: &str,
        userid: Option<String>,
        remark: Option<String>,
    ) -> Result<Instance, AdminError> {
        self.change(Change::Terminate {
            id: process_instance_id.into(),
            userid,
            remark,
        })
    }

    /// `userid` comments on an approval (an `ADD_REMARK` record), as in the app.
    pub fn comment(
        &self,
        process_instance_id: &str,
        userid: &str,
        text: &str,
    ) -> Result<Instance, AdminError> {
        self.change(Change::Comment {
            id: process_instance_id.into(),
            userid: userid.into(),
            text: text.into(),
        })
    }

    fn change(&self, change: Change) -> Result<Instance, AdminError> {
        let (instance, events) = self
            .shared
            .world()
            .apply(&self.shared.config.corp_id, change)?;
        push::dispatch(&self.shared, events);
        Ok(instance)
    }

    pub fn instance(&self, process_instance_id: &str) -> Option<Instance> {
        self.shared
            .world()
            .instances
            .get(process_instance_id)
            .cloned()
    }

    /// Every instance, in creation order.
    pub fn instances(&self) -> Vec<Instance> {
        let world = self.shared.world();
        world
            .order
            .iter()
            .filter_map(|id| world.instances.get(id).cloned())
            .collect()
    }

    /// Tasks waiting for their approver, oldest instance first.
    pub fn open_tasks(&self) -> Vec<OpenTask> {
        let world = self.shared.world();
        world
            .order
            .iter()
            .filter_map(|id| world.instances.get(id))
            .flat_map(|i| {
                i.tasks
                    .iter()
                    .filter(|t| t.status == TaskStatus::Running)
                    .map(|t| OpenTask {
                        process_instance_id: i.process_instance_id.clone(),
                        process_code: i.process_code.clone(),
                        task: t.clone(),
                    })
            })
            .collect()
    }

    /// The registered callback (secrets are in the struct but never in its `Debug`).
    pub fn callback(&self) -> Option<Registration> {
        self.shared.world().callback.clone()
    }

    /// Every push attempt and event outcome so far (the last 10 000).
    pub fn push_log(&self) -> Vec<PushRecord> {
        self.shared.world().push_log.iter().cloned().collect()
    }

    /// Every event DingTalk set out to deliver (subscribed, not lost forever, the deliveries
    /// allowance not used up when it happened), each once however many copies or attempts it
    /// took, as the flat JSON it pushes. Empty unless the emulator was started with
    /// `keep_events`.
    pub fn events_pushed(&self) -> Vec<Value> {
        self.shared.world().events_pushed.clone()
    }

    /// Every item `get_call_back_failed_result` handed out, with when. The list is read-once
    /// (docs/dingtalk.md §3), so an item a caller did not store before it died is gone from DingTalk.
    /// Empty unless the emulator was started with `keep_events`.
    pub fn failed_handed_out(&self) -> Vec<(DateTime<Utc>, Value)> {
        self.shared.world().failed_handed_out.clone()
    }

    /// Deliveries still running (waiting for a retry or an answer).
    pub fn pushes_in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Items in the failed list, readable or not yet.
    pub fn failed_pending(&self) -> usize {
        self.shared.world().failed.len()
    }

    /// How events are delivered now (`EmulatorConfig::delivery`, changeable as in the console).
    pub fn delivery(&self) -> crate::Delivery {
        self.shared.stream.delivery()
    }

    /// Switches how later events are delivered (messages already in flight keep their way).
    pub fn set_delivery(&self, delivery: crate::Delivery) {
        self.shared.stream.set_delivery(delivery);
    }

    /// Stream mode: every ack received for an `EVENT` message so far.
    pub fn stream_acks(&self) -> Vec<crate::AckRecord> {
        self.shared.stream.acks()
    }

    /// Stream mode: the events given up after their last redelivery (DingTalk lost them), as the
    /// flat JSON an HTTP push of them would carry.
    pub fn stream_given_up(&self) -> Vec<Value> {
        self.shared.stream.given_up()
    }

    /// Stream mode: tickets, connections, deliveries, pings and acks so far.
    pub fn stream_report(&self) -> crate::StreamReport {
        self.shared.stream.report()
    }

    /// Stream mode: each ack is sent to `hook` before the gateway acts on it, and the gateway
    /// waits for the reply (a test checks what is true at the moment of the ack). `None` removes it.
    pub fn set_stream_ack_hook(&self, hook: Option<crate::AckHook>) {
        self.shared.stream.set_ack_hook(hook);
    }

    /// Stream fault: closes the connection (`None`: every connection) abruptly, without a close
    /// frame. How many were open.
    pub fn stream_drop(&self, connection: Option<u64>) -> usize {
        super::stream::drop_connections(&self.shared, connection)
    }

    /// Stream: sends `disconnect` (the connection is closed 10 s × `time_scale` later).
    pub fn stream_disconnect(&self, connection: Option<u64>) -> usize {
        super::stream::disconnect(&self.shared, connection)
    }

    /// Stream fault: the connection stays open but goes silent (nothing sent or read).
    pub fn stream_silence(&self, connection: Option<u64>) -> usize {
        super::stream::silence(&self.shared, connection)
    }

    /// Stream: delivers these flat events (HTTP-push JSON with `EventType`) as DingTalk would.
    pub fn stream_publish(&self, events: Vec<serde_json::Map<String, Value>>) {
        super::stream::publish_flat(&self.shared, events);
    }

    /// Stream: sends `text` as a frame on one open connection, as it is (malformed frames).
    pub fn stream_send_raw(&self, text: &str) -> bool {
        super::stream::send_raw(&self.shared, text.to_string())
    }

    /// Waits until no delivery is running, up to `within`. True when idle.
    pub async fn settle(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.pushes_in_flight() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    pub fn templates(&self) -> Vec<Template> {
        self.shared
            .world()
            .org
            .templates
            .values()
            .cloned()
            .collect()
    }

    /// Adds (or replaces) an approval template, e.g. one a test's client uses.
    pub fn add_template(&self, template: Template) -> Result<(), Rejection> {
        self.shared.world().org.add_template(template)
    }

    /// Renames control `control_id` of a template (a table's column too), as an administrator
    /// publishing an edited form: the id stays, the template's revision goes up.
    pub fn rename_control(
        &self,
        process_code: &str,
        control_id: &str,
        label: &str,
    ) -> Result<(), Rejection> {
        self.shared
            .world()
            .org
            .rename_control(process_code, control_id, label)
    }

    pub fn people(&self) -> Vec<Person> {
        self.shared.world().org.people.values().cloned().collect()
    }

    /// Adds (or replaces) a person.
    pub fn add_person(&self, person: Person) -> Result<(), Rejection> {
        self.shared.world().org.add_person(person)
    }
}

/// A plausible value of one control, as a person would fill it in DingTalk.
fn sample_value(
    c: &Control,
    org: &Org,
    rng: &mut StdRng,
    day: chrono::NaiveDate,
    people: &[&String],
) -> String {
    let date = |d: chrono::NaiveDate| d.format("%Y-%m-%d").to_string();
    let with_time = c.format.as_deref().is_some_and(|f| f.contains("HH"));
    match c.component_type.as_str() {
        "NumberField" => rng.random_range(1..=10).to_string(),
        "StarRatingField" => rng.random_range(1..=5).to_string(),
        "MoneyField" => format!(
            "{}.{:02}",
            rng.random_range(10..5000),
            rng.random_range(0..100)
        ),
        "DDSelectField" if !c.options.is_empty() => {
            c.options[rng.random_range(0..c.options.len())].clone()
        }
        "DDMultiSelectField" if !c.options.is_empty() => {
            let mut chosen: Vec<&String> =
                c.options.iter().filter(|_| rng.random_bool(0.5)).collect();
            if chosen.is_empty() {
                chosen.push(&c.options[0]);
            }
            json!(chosen).to_string()
        }
        "DDDateField" if with_time => format!(
            "{} {:02}:{:02}",
            date(day),
            rng.random_range(8..19),
            [0, 15, 30, 45][rng.random_range(0..4)]
        ),
        "DDDateField" => date(day - chrono::Days::new(rng.random_range(0..10))),
        "DDDateRangeField" => {
            let end = day + chrono::Days::new(rng.random_range(0..5));
            json!([date(day), date(end)]).to_string()
        }
        "DDPhotoField" => json!(["https://static.example.com/receipt.jpg"]).to_string(),
        "DDAttachment" => json!([{
            "spaceId": "163500000", "fileName": "发票.pdf", "fileSize": "20480",
            "fileType": "pdf", "fileId": format!("{}", rng.random_range(10_000_000..99_999_999)),
        }])
        .to_string(),
        "InnerContactField" if !people.is_empty() => {
            json!([people[rng.random_range(0..people.len())]]).to_string()
        }
        "DepartmentField" => {
            let depts: Vec<&i64> = org.departments.keys().collect();
            depts[rng.random_range(0..depts.len())].to_string()
        }
        "AddressField" => "浙江省,杭州市,西湖区".into(),
        "TableField" if !c.children.is_empty() => {
            let rows: Vec<Value> = (0..rng.random_range(1..=3))
                .map(|_| {
                    Value::Array(
                        c.children
                            .iter()
                            .map(|cell| {
                                json!({"name": cell.label, "value": sample_value(cell, org, rng, day, people)})
                            })
                            .collect(),
                    )
                })
                .collect();
            Value::Array(rows).to_string()
        }
        "TableField" => {
            json!([[{"name": "品名", "value": "笔记本"}, {"name": "数量", "value": "2"}]])
                .to_string()
        }
        "TextareaField" => "详见附件".to_string(),
        _ => ["出差北京", "客户拜访", "办公用品", "团队活动"][rng.random_range(0..4)].to_string(),
    }
}

/// Plausible values for a template's controls: every required one and about half of the others.
pub(crate) fn sample_form(
    template: &Template,
    org: &Org,
    rng: &mut StdRng,
    now: DateTime<Utc>,
) -> Vec<FormInput> {
    let day = now.with_timezone(&model::beijing_offset()).date_naive();
    let people: Vec<&String> = org.people.keys().collect();
    template
        .controls
        .iter()
        .filter_map(|c| {
            if !c.required && !rng.random_bool(0.5) {
                return None;
            }
            let value = sample_value(c, org, rng, day, &people);
            Some(FormInput {
                name: c.label.clone(),
                value,
                ext_value: None,
            })
        })
        .collect()
}
