//! The emulator's memory: the organisation and its instances, the access token, the registered
//! callback, the failed-push list, the call log and the fault knobs, all behind one mutex (never
//! held across an `.await`). [`Handle`](crate::Handle) (`handle`) is the Rust face of it.
//!
//! Owns: token issue/renewal/expiry (docs/dingtalk.md §1.1), the failed list's read-once semantics
//! (docs/dingtalk.md §3), `listids` filtering and paging (docs/dingtalk.md §2.4), call counting and rate limiting.
//! Does not own: HTTP shapes (`api`), delivering pushes (`push`), the approval rules (`model`),
//! the rules of the monthly allowances (`quota`; their counters live here), acting on it from
//! Rust (`handle`). It uses only `model`, `faults` and `quota`, so that `push` and `handle` can
//! build on it without a cycle.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Mutex, MutexGuard, atomic::AtomicUsize},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{
    EmulatorConfig,
    faults::{Faults, InjectedError, probability},
    model::{ActError, Action, Ctx, Event, Ids, Instance, InstanceStatus, Org, Rejection},
    quota::Quota,
};

/// `expires_in` DingTalk reports for an access token, in seconds (docs/dingtalk.md §1.1).
pub const TOKEN_EXPIRES_IN: u64 = 7_200;
/// Calls per endpoint whose arrival times are kept (for rate checks in tests).
const CALL_TIMES_KEPT: usize = 100_000;
/// Push records kept for inspection.
const PUSH_LOG_KEPT: usize = 10_000;
/// Most items one `get_call_back_failed_result` returns (docs/dingtalk.md §3).
pub const FAILED_PAGE: usize = 200;
/// Failed pushes are readable 3–5 minutes after the last retry failed (docs/dingtalk.md §6, 2026 doc).
const FAILED_VISIBLE_AFTER_SECS: std::ops::RangeInclusive<f64> = 180.0..=300.0;
/// Failed pushes are kept one week (docs/dingtalk.md §6, older doc).
const FAILED_KEPT_SECS: f64 = 7.0 * 24.0 * 3600.0;

/// What [`Handle`] and every part of the emulator share.
pub(crate) struct Shared {
    pub config: EmulatorConfig,
    pub world: Mutex<World>,
    /// Client for pushes and `check_url`: DingTalk's 1500 ms deadline (docs/dingtalk.md §4.7), no proxy,
    /// no redirects.
    pub push_http: reqwest::Client,
    pub shutdown: CancellationToken,
    pub in_flight: AtomicUsize,
    /// The Stream gateway (`stream`): its own lock, never taken while `world` is held.
    pub stream: super::gateway::Gateway,
}

impl Shared {
    pub fn world(&self) -> MutexGuard<'_, World> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `secs` of DingTalk time as real time, by `time_scale`.
    pub fn scaled(&self, secs: f64) -> Duration {
        Duration::from_secs_f64((secs * self.config.time_scale).max(0.0))
    }
}

/// The registered callback (docs/dingtalk.md §3). `Debug` hides the secrets.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct Registration {
    pub call_back_tag: Vec<String>,
    #[serde(skip)]
    pub token: String,
    #[serde(skip)]
    pub aes_key: String,
    pub url: String,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("call_back_tag", &self.call_back_tag)
            .field("token", &"***")
            .field("aes_key", &"***")
            .field("url", &self.url)
            .finish()
    }
}

/// One entry of the push log: an attempt and its outcome, or what happened to an event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PushRecord {
    /// Which push (an event, or one copy of a duplicated event).
    pub push_id: u64,
    pub tag: &'static str,
    /// The event's `type` (`start`, `finish`, …).
    pub kind: String,
    pub process_instance_id: String,
    /// 0 for the first attempt, 1 and 2 for the retries; `None` for records about the event.
    pub attempt: Option<u32>,
    /// Wall-clock time of the record, epoch ms.
    pub at_ms: i64,
    /// Monotonic time of the record, for measuring the retry ladder.
    #[serde(skip)]
    pub at: Instant,
    pub outcome: PushOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum PushOutcome {
    /// The receiver answered with a valid encrypted `success` in time.
    Delivered,
    /// Non-200, timeout, connection error, or a reply that does not verify.
    Failed { reason: String },
    /// Fault `drop_rate`: the request never left.
    Dropped,
    /// Fault `lose_reply_rate`: the receiver answered, DingTalk never saw it.
    ReplyLost,
    /// After the last retry failed: in the failed list.
    Parked,
    /// Fault `drop_forever_rate`: DingTalk lost the event.
    LostForever,
    /// No callback registered for this tag when the event happened: nothing to push.
    NotSubscribed,
    /// The monthly deliveries allowance was used up: the event is dropped for good, before
    /// the attempt this would have been (docs/dingtalk.md §7).
    OverAllowance,
}

impl PushOutcome {
    pub fn is_failed_attempt(&self) -> bool {
        matches!(
            self,
            PushOutcome::Failed { .. } | PushOutcome::Dropped | PushOutcome::ReplyLost
        )
    }
}

pub(crate) struct IssuedToken {
    pub value: String,
    pub expires_at: Instant,
}

pub(crate) struct FailedItem {
    pub visible_at: Instant,
    pub expires_at: Instant,
    pub item: Value,
}

#[derive(Default)]
pub(crate) struct CallLog {
    pub count: usize,
    pub times: VecDeque<Instant>,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenProblem {
    Missing,
    Invalid,
}

/// What the gate decided for one API call.
pub(crate) struct Admission {
    pub latency: Duration,
    pub http_5xx: bool,
    pub rate_limited: bool,
    pub injected: Option<InjectedError>,
}

pub(crate) struct World {
    pub org: Org,
    pub ids: Ids,
    /// Fault decisions get their own stream, so turning a fault on does not change the ids.
    pub fault_rng: StdRng,
    pub people_rng: StdRng,
    pub instances: HashMap<String, Instance>,
    /// Instance ids in creation order.
    pub order: Vec<String>,
    pub task_index: HashMap<i64, String>,
    pub token: Option<IssuedToken>,
    pub callback: Option<Registration>,
    pub failed: VecDeque<FailedItem>,
    pub calls: BTreeMap<String, CallLog>,
    pub faults: Faults,
    pub push_log: VecDeque<PushRecord>,
    pub push_seq: u64,
    /// With `keep_events`: every event handed to delivery, in order (the flat push JSON).
    pub events_pushed: Vec<Value>,
    /// With `keep_events`: every failed-list item handed out, with when (wall clock, to compare
    /// with times in the receiver's database).
    pub failed_handed_out: Vec<(DateTime<Utc>, Value)>,
    /// This month's metered calls and deliveries against the allowances.
    pub quota: Quota,
}

impl World {
    pub fn new(seed: u64) -> World {
        World {
            org: Org::builtin(),
            ids: Ids::new(seed),
            fault_rng: StdRng::seed_from_u64(seed ^ 0x5eed_fa17_0000_0001),
            people_rng: StdRng::seed_from_u64(seed ^ 0x5eed_9e09_1e00_0002),
            instances: HashMap::new(),
            order: Vec::new(),
            task_index: HashMap::new(),
            token: None,
            callback: None,
            failed: VecDeque::new(),
            calls: BTreeMap::new(),
            faults: Faults::default(),
            push_log: VecDeque::new(),
            push_seq: 0,
            events_pushed: Vec::new(),
            failed_handed_out: Vec::new(),
            quota: Quota::new(0, 0, Utc::now()),
        }
    }

    /// Records a call and takes the fault decisions for it, in the order a gateway would:
    /// 5xx, rate limit, injected error.
    pub fn admit(&mut self, endpoint: &str, now: Instant) -> Admission {
        let log = self.calls.entry(endpoint.to_string()).or_default();
        log.count += 1;
        log.times.push_back(now);
        if log.times.len() > CALL_TIMES_KEPT {
            log.times.pop_front();
        }
        let rate_limited = self.faults.qps_limit(endpoint).is_some_and(|limit| {
            let window_start = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
            let recent = log.times.iter().rev().take_while(|t| **t > window_start);
            recent.count() > limit as usize
        });
        let http_5xx = self
            .fault_rng
            .random_bool(probability(self.faults.http_5xx_rate));
        let injected = if http_5xx || rate_limited {
            None
        } else {
            self.faults.take_injection(endpoint)
        };
        Admission {
            latency: Duration::from_millis(self.faults.latency_ms),
            http_5xx,
            rate_limited,
            injected,
        }
    }

    pub fn check_token(&self, given: Option<&str>, now: Instant) -> Result<(), TokenProblem> {
        let given = given
            .filter(|t| !t.is_empty())
            .ok_or(TokenProblem::Missing)?;
        match &self.token {
            Some(t) if t.value == given && now < t.expires_at => Ok(()),
            // Unknown, revoked or expired: DingTalk answers all three as "不合法的access_token"
            // (docs/dingtalk.md §1.3).
            _ => Err(TokenProblem::Invalid),
        }
    }

    /// `gettoken`: the same token while it is valid, its validity extended; a new one otherwise
    /// (docs/dingtalk.md §1.1).
    pub fn issue_token(&mut self, now: Instant, ttl: Duration) -> String {
        match &mut self.token {
            Some(t) if now < t.expires_at => {
                t.expires_at = now + ttl;
                t.value.clone()
            }
            _ => {
                let value = self.ids.token();
                self.token = Some(IssuedToken {
                    value: value.clone(),
                    expires_at: now + ttl,
                });
                value
            }
        }
    }

    pub fn insert_instance(&mut self, instance: Instance) {
        for t in &instance.tasks {
            self.task_index
                .insert(t.taskid, instance.process_instance_id.clone());
        }
        self.order.push(instance.process_instance_id.clone());
        self.instances
            .insert(instance.process_instance_id.clone(), instance);
    }

    /// `listids` (docs/dingtalk.md §2.4): instances of `process_code` created in `[start, end]` (ms),
    /// optionally only by `userids`, ordered by create time, `size` from `cursor`. The second
    /// value is the next cursor, `None` on the last page. At most `MAX_REACHABLE` ids per query.
    /// `statuses` (v1.0 only, docs/dingtalk.md §11.4): only instances in one of them; empty: all.
    #[allow(clippy::too_many_arguments)]
    pub fn list_ids(
        &self,
        process_code: &str,
        start_ms: i64,
        end_ms: i64,
        userids: &[String],
        statuses: &[InstanceStatus],
        cursor: u64,
        size: u64,
    ) -> (Vec<String>, Option<u64>) {
        const MAX_REACHABLE: u64 = 10_000;
        let mut matching: Vec<&Instance> = self
            .order
            .iter()
            .filter_map(|id| self.instances.get(id))
            .filter(|i| i.process_code == process_code)
            .filter(|i| {
                let t = i.create_time.timestamp_millis();
                start_ms <= t && t <= end_ms
            })
            .filter(|i| userids.is_empty() || userids.contains(&i.originator_userid))
            .filter(|i| statuses.is_empty() || statuses.contains(&i.status))
            .collect();
        // Stable: instances created in the same millisecond keep their creation order.
        matching.sort_by_key(|i| i.create_time);
        let reachable = (matching.len() as u64).min(MAX_REACHABLE);
        let from = cursor.min(reachable);
        let to = (cursor.saturating_add(size)).min(reachable);
        let page = matching[from as usize..to as usize]
            .iter()
            .map(|i| i.process_instance_id.clone())
            .collect();
        let next = (to < reachable).then_some(to);
        (page, next)
    }

    /// Puts an event whose retries all failed into the failed list (docs/dingtalk.md §3, §6).
    pub fn park(&mut self, event: &Event, corp_id: &str, now: Instant, shared_scale: f64) {
        let delay = self.fault_rng.random_range(FAILED_VISIBLE_AFTER_SECS) * shared_scale;
        let visible_at = now + Duration::from_secs_f64(delay.max(0.0));
        let expires_at = visible_at + Duration::from_secs_f64(FAILED_KEPT_SECS * shared_scale);
        let mut data = event.payload.clone();
        data.remove("EventType");
        data.remove("corpId");
        let item = json!({
            "call_back_tag": event.tag,
            "event_time": event.event_time_ms,
            event.tag: { "corpid": corp_id, "bpmsCallBackData": Value::Object(data) },
        });
        self.failed.push_back(FailedItem {
            visible_at,
            expires_at,
            item,
        });
    }

    /// `get_call_back_failed_result`: up to 200 readable items, removed as they are returned
    /// (there is no cursor, so the list is read-once; docs/dingtalk.md §3 [UNCONFIRMED: inferred]).
    pub fn take_failed(&mut self, now: Instant) -> (Vec<Value>, bool) {
        self.failed.retain(|f| now < f.expires_at);
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.failed.len());
        let mut has_more = false;
        for f in self.failed.drain(..) {
            if f.visible_at <= now {
                if taken.len() < FAILED_PAGE {
                    taken.push(f.item);
                    continue;
                }
                has_more = true;
            }
            kept.push_back(f);
        }
        self.failed = kept;
        (taken, has_more)
    }

    pub fn log_push(&mut self, record: PushRecord) {
        self.push_log.push_back(record);
        if self.push_log.len() > PUSH_LOG_KEPT {
            self.push_log.pop_front();
        }
    }

    pub fn apply(
        &mut self,
        corp_id: &str,
        change: Change,
    ) -> Result<(Instance, Vec<Event>), AdminError> {
        let now = Utc::now();
        let id = match &change {
            Change::Task { taskid, .. } => self
                .task_index
                .get(taskid)
                .cloned()
                .ok_or(AdminError::NotFound(format!("no task {taskid}")))?,
            Change::Terminate { id, .. } | Change::Comment { id, .. } => id.clone(),
        };
        let World {
            org,
            ids,
            instances,
            task_index,
            ..
        } = self;
        let instance = instances
            .get_mut(&id)
            .ok_or_else(|| AdminError::NotFound(format!("no instance {id}")))?;
        let events = match change {
            Change::Task {
                taskid,
                action,
                userid,
                remark,
            } => {
                let task = instance
                    .tasks
                    .iter()
                    .find(|t| t.taskid == taskid)
                    .ok_or(AdminError::NotFound(format!("no task {taskid}")))?;
                if let Some(userid) = userid.filter(|u| *u != task.userid) {
                    return Err(AdminError::Invalid(format!(
                        "task {taskid} belongs to {}, not {userid}",
                        task.userid
                    )));
                }
                let mut ctx = Ctx {
                    org,
                    ids,
                    corp_id,
                    now,
                };
                instance.act(taskid, action, remark, &mut ctx)?
            }
            Change::Terminate { userid, remark, .. } => {
                let userid = userid.unwrap_or_else(|| instance.originator_userid.clone());
                org.person(&userid)
                    .map_err(|e| AdminError::Invalid(e.errmsg))?;
                instance.terminate(&userid, remark, corp_id, now)?
            }
            Change::Comment { userid, text, .. } => {
                org.person(&userid)
                    .map_err(|e| AdminError::Invalid(e.errmsg))?;
                instance.comment(&userid, &text, corp_id, now)?
            }
        };
        for t in &instance.tasks {
            task_index
                .entry(t.taskid)
                .or_insert_with(|| instance.process_instance_id.clone());
        }
        Ok((instance.clone(), events))
    }
}

/// What an admin action changes, for [`World::apply`].
pub(crate) enum Change {
    Task {
        taskid: i64,
        action: Action,
        userid: Option<String>,
        remark: Option<String>,
    },
    Terminate {
        id: String,
        userid: Option<String>,
        remark: Option<String>,
    },
    Comment {
        id: String,
        userid: String,
        text: String,
    },
}

/// Why an admin action was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    NotFound(String),
    /// The task or instance is not open.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// DingTalk's own validation refused it (the same as a create through the API would get).
    #[error("{0}")]
    Rejected(Rejection),
}

impl From<ActError> for AdminError {
    fn from(e: ActError) -> AdminError {
        match e {
            ActError::NoTask(_) | ActError::NoInstance(_) => AdminError::NotFound(e.to_string()),
            ActError::Conflict(m) => AdminError::Conflict(m),
            ActError::Invalid(m) => AdminError::Invalid(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model;

    #[test]
    fn failed_list_is_read_once_in_pages_of_200() {
        let mut world = World::new(1);
        let now = Instant::now();
        let event = Event {
            tag: model::TAG_INSTANCE,
            payload: serde_json::from_value(
                json!({"EventType": "bpms_instance_change", "corpId": "c", "type": "start"}),
            )
            .unwrap(),
            event_time_ms: 1,
        };
        for _ in 0..201 {
            world.park(&event, "c", now, 1e-6);
        }
        // Readable after 180–300 s × 1e-6, kept one week × 1e-6 (0.6 s).
        assert_eq!(world.take_failed(now).0.len(), 0);
        let now = now + Duration::from_millis(10);
        let (page, more) = world.take_failed(now);
        assert_eq!((page.len(), more), (200, true));
        assert_eq!(page[0]["bpms_instance_change"]["corpid"], "c");
        assert!(
            page[0]["bpms_instance_change"]["bpmsCallBackData"]
                .get("EventType")
                .is_none()
        );
        let (page, more) = world.take_failed(now);
        assert_eq!((page.len(), more), (1, false));
        assert_eq!(world.take_failed(now).0.len(), 0);
    }

    #[test]
    fn a_token_is_renewed_while_valid_and_replaced_after_expiry() {
        let mut world = World::new(1);
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let a = world.issue_token(t0, ttl);
        let b = world.issue_token(t0 + Duration::from_secs(9), ttl);
        assert_eq!(a, b);
        // Renewed at 9 s, so still valid at 18 s.
        assert!(
            world
                .check_token(Some(&a), t0 + Duration::from_secs(18))
                .is_ok()
        );
        assert_eq!(
            world.check_token(Some(&a), t0 + Duration::from_secs(20)),
            Err(TokenProblem::Invalid)
        );
        let c = world.issue_token(t0 + Duration::from_secs(20), ttl);
        assert_ne!(a, c);
        assert_eq!(world.check_token(None, t0), Err(TokenProblem::Missing));
    }
}
