//! The `failed` job: drains `call_back/get_call_back_failed_result` (docs/dingtalk.md §3), the list of
//! pushes DingTalk gave up on. Each call is metered (docs/dingtalk.md §7), so the job ticks often
//! but calls only when the planner says a drain is due ([`planned`]: a sign of missed pushes six
//! minutes ago, items found by the last drain, or the floor `reconcile.failed_floor_h`);
//! [`drain`] drains at once (tests, operators). The list is read-once (no cursor: what it returns is gone, docs/dingtalk.md
//! §3 [UNCONFIRMED: inferred], we take that stricter reading), so:
//! - only the job's leader calls it (the scheduler's advisory lock), and never twice at once;
//! - the database is checked before each call, so a known-down database loses nothing;
//! - each answer's items are stored in `dingsync.events` (source `failed_list`, the item as
//!   DingTalk sent it in `raw`) in the same single statement that applies them: the raw items
//!   are never applied without being stored;
//! - an item that cannot be applied is kept all the same, raw-only (`Event::raw_only`: the
//!   record, no approval or task change; the detail fetch and sweep still bring the approvals to
//!   DingTalk's state): an item `event` refuses (an id too long, a time out of range: the rules
//!   of the push), counted `refused`; an item naming an organisation not served here
//!   (`store::corps`), counted `foreign` and kept under this job's organisation, never written
//!   into the other's rows;
//! - when the page's statement fails, each item is stored on its own, an item that still fails
//!   is stored raw-only (`unapplied`), and one that cannot be stored at all is logged with its
//!   dedup key and counted (`unstored`): one poison item never costs the other 199. If the
//!   database goes away in the middle of a page, the run fails and logs the dedup keys of the
//!   items it had read but not stored;
//! - it loops while `has_more`.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    event::{self, Event, MAX_ID_BYTES, Malformed, Parsed, Source},
    jobs::{Context, Counts},
    planner,
    store::{
        self,
        batch::{Expect, store_events},
        corps::Served,
    },
};

/// The scheduled job: drains when the planner says it is due and the day's background allowance
/// is not spent; otherwise only records what it noticed (counts `due` 0).
pub async fn planned(ctx: &Context, shutdown: &CancellationToken) -> anyhow::Result<Counts> {
    let pool = ctx.pool();
    let corp = ctx.corp_id();
    let ledger = ctx.client().ledger();
    let (mut state, external) = match planner::drain_state(pool, ledger, corp).await {
        Ok(read) => read,
        Err(e) => {
            planner::note_database_trouble();
            return Err(e);
        }
    };
    let now = ledger.clock().now();
    let floor = planner::failed_floor(ctx.config());
    let mut counts = Counts::new();
    let Some(why) = planner::drain_due(&state, external.as_ref(), now, floor) else {
        planner::save_drain_state(pool, corp, &state).await?;
        counts.insert("due", 0);
        return Ok(counts);
    };
    let plan = planner::plan(ledger, corp, ctx.allowances()).await?;
    if plan.left_today() == 0 {
        planner::save_drain_state(pool, corp, &state).await?;
        counts.insert("budget", 1);
        return Ok(counts);
    }
    tracing::debug!(reason = %why, "draining the failed-push list");
    let drained = drain(ctx, shutdown).await;
    state.last_drain_at = Some(now);
    match &drained {
        Ok(c) => state.last_found = c.get("items").copied().unwrap_or(0),
        // Tried again a sign's wait later, not at every tick.
        Err(_) => state.last_found = 1,
    }
    if let Err(e) = &drained
        && e.downcast_ref::<sqlx::Error>().is_some()
    {
        planner::note_database_trouble();
    }
    planner::save_drain_state(pool, corp, &state).await?;
    let mut counts = drained?;
    counts.insert("due", 1);
    Ok(counts)
}

/// Drains the list now, page by page while DingTalk says there is more.
pub async fn drain(ctx: &Context, shutdown: &CancellationToken) -> anyhow::Result<Counts> {
    let mut counts = Counts::new();
    let corps = if ctx.serves_own_organisation_only() {
        Served::only(ctx.pool().clone(), ctx.corp_id())
    } else {
        Served::load(ctx.pool().clone(), ctx.corp_id()).await?
    };
    loop {
        store::ping(ctx.pool()).await?;
        let page = match ctx.client().failed_callbacks().await {
            Ok(page) => page,
            // Nothing was read (the list is still DingTalk's): end quietly until the allowance
            // is back.
            Err(crate::dingtalk::Error::QuotaExhausted { .. }) => {
                *counts.entry("paused").or_default() += 1;
                return Ok(counts);
            }
            Err(e) => return Err(e.into()),
        };
        *counts.entry("calls").or_default() += 1;
        let now = Utc::now();
        let mut events = Vec::with_capacity(page.failed_list.len());
        for item in &page.failed_list {
            let (event, refused) = read_item(item, ctx.corp_id(), now);
            if let Some(reason) = refused {
                tracing::warn!(dedup_key = %event.dedup_key, %reason, "failed-list item refused: stored raw, not applied");
                *counts.entry("refused").or_default() += 1;
            }
            // The page is already gone from DingTalk: a database error here keeps the item
            // (raw, under our organisation) rather than losing the page.
            let served = corps.serves(&event.corp_id).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "reading dingsync.corps failed; keeping the item raw");
                false
            });
            if served {
                events.push(event);
            } else {
                tracing::warn!(dedup_key = %event.dedup_key, "failed-list item names an organisation not served here: stored raw under ours, not applied");
                *counts.entry("foreign").or_default() += 1;
                events.push(Event {
                    corp_id: ctx.corp_id().to_string(),
                    ..event.raw_only()
                });
            }
        }
        let stored = store_page(ctx.pool(), &events).await?;
        *counts.entry("items").or_default() += events.len() as u64;
        *counts.entry("new").or_default() += stored.new;
        *counts.entry("unapplied").or_default() += stored.unapplied;
        *counts.entry("unstored").or_default() += stored.unstored;
        if !page.has_more || shutdown.is_cancelled() {
            return Ok(counts);
        }
    }
}

/// What became of a page's items.
#[derive(Debug, Default)]
struct PageStored {
    /// Stored for the first time (applied or raw-only).
    new: u64,
    /// Stored raw-only because storing them with their changes failed.
    unapplied: u64,
    /// Not stored at all (logged with their dedup keys).
    unstored: u64,
}

/// Stores a page in one statement; when that fails (for another reason than the database
/// going away), item by item, each falling back to raw-only, then to a log line.
async fn store_page(pool: &PgPool, events: &[Event]) -> anyhow::Result<PageStored> {
    let refs: Vec<&Event> = events.iter().collect();
    let e = match store_events(pool, &refs, Expect::Any).await {
        Ok(new) => {
            return Ok(PageStored {
                new: new.count(events.len()) as u64,
                ..PageStored::default()
            });
        }
        Err(e) => e,
    };
    if is_gone(&e) {
        log_lost(events);
        return Err(anyhow::Error::new(e).context("storing a failed-list page"));
    }
    tracing::warn!(error = %e, items = events.len(), "storing a failed-list page failed; storing its items one by one");
    let mut stored = PageStored::default();
    for (i, event) in events.iter().enumerate() {
        let e = match store_events(pool, &[event], Expect::Any).await {
            Ok(new) => {
                stored.new += new.count(1) as u64;
                continue;
            }
            Err(e) if is_gone(&e) => e,
            Err(e) => {
                tracing::warn!(error = %e, dedup_key = %event.dedup_key, "failed-list item not applied; storing it raw");
                match store_events(pool, &[&event.raw_only()], Expect::Any).await {
                    Ok(new) => {
                        stored.new += new.count(1) as u64;
                        stored.unapplied += 1;
                        continue;
                    }
                    Err(e) if is_gone(&e) => e,
                    Err(e) => {
                        tracing::error!(error = %e, dedup_key = %event.dedup_key, "failed-list item could not be stored, not even raw: it is lost (DingTalk's list is read-once)");
                        stored.unstored += 1;
                        continue;
                    }
                }
            }
        };
        log_lost(&events[i..]);
        return Err(anyhow::Error::new(e).context("storing a failed-list item"));
    }
    Ok(stored)
}

/// Whether the database went away (as opposed to a statement that fails for this data). A
/// deadlock or serialization failure is worth the retry item by item.
fn is_gone(e: &sqlx::Error) -> bool {
    store::is_unavailable(e) && !(store::is_code(e, "40001") || store::is_code(e, "40P01"))
}

/// Items read from the read-once list that are not stored: the log is all that is left of them.
fn log_lost(events: &[Event]) {
    let keys: Vec<&str> = events.iter().map(|e| e.dedup_key.as_str()).collect();
    tracing::error!(items = keys.len(), dedup_keys = ?keys, "database unavailable: failed-list items read from DingTalk were not stored and are lost");
}

/// One failed-list item as an event; see [`read_item`].
pub fn to_event(item: &Value, default_corp_id: &str) -> Event {
    read_item(item, default_corp_id, Utc::now()).0
}

/// One failed-list item as an event, with why `event` refused it (then the event is raw-only).
/// The item nests the push's fields under its tag (`{"call_back_tag", "event_time", "<tag>":
/// {"corpid", "bpmsCallBackData": {..}}}`); put back together as the flat push (`EventType`,
/// `corpId` + the data), it gets the same meaning, the same bounds and the same dedup key as the
/// push would have had, so a push that did arrive is not stored twice. `raw` keeps the item as
/// DingTalk sent it (a NUL, which PostgreSQL cannot store, replaced by U+FFFD). An item of
/// another shape, or one `event` refuses, is kept raw, unapplied.
pub fn read_item(
    item: &Value,
    default_corp_id: &str,
    now: DateTime<Utc>,
) -> (Event, Option<Malformed>) {
    let raw = storable_text(item);
    let tag = item["call_back_tag"].as_str().unwrap_or("unknown");
    let inner = &item[tag];
    let named_corp = inner["corpid"].as_str().filter(|c| !c.is_empty());
    let mut refused = None;
    if let Some(data) = inner["bpmsCallBackData"].as_object() {
        let mut flat: Map<String, Value> = data.clone();
        flat.insert("EventType".into(), tag.into());
        flat.insert(
            "corpId".into(),
            named_corp.unwrap_or(default_corp_id).into(),
        );
        let text = Value::Object(flat).to_string();
        match event::parse_at(&text, Source::FailedList, default_corp_id, now) {
            Ok(Parsed::Event(mut e)) => {
                e.raw = raw;
                e.event_time = e.event_time.or_else(|| item_time(item, now));
                return (*e, None);
            }
            Ok(Parsed::Handshake) => {}
            Err(malformed) => refused = Some(malformed),
        }
    }
    let bounded = |s: &str| (!s.is_empty() && s.len() <= MAX_ID_BYTES).then(|| s.to_string());
    let event = Event {
        corp_id: named_corp
            .and_then(bounded)
            .unwrap_or_else(|| default_corp_id.to_string()),
        dedup_key: format!("sha256:{}", hex::encode(Sha256::digest(raw.as_bytes()))),
        source: Source::FailedList,
        event_type: bounded(tag).unwrap_or_else(|| "unknown".into()),
        change_type: None,
        process_instance_id: None,
        task_id: None,
        event_time: item_time(item, now),
        raw,
        approval: None,
        task: None,
    };
    (event, refused)
}

/// The item's `event_time`, when it is a plausible one (the push's rule, `event::plausible_time`).
fn item_time(item: &Value, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    item["event_time"]
        .as_i64()
        .and_then(|ms| event::plausible_time(ms, now))
}

/// The item as JSON text PostgreSQL can store: as DingTalk sent it, except that a NUL (which
/// neither text nor jsonb can hold) becomes U+FFFD. Read-once: altered is better than lost.
fn storable_text(item: &Value) -> String {
    if !event::has_nul(item) {
        return item.to_string();
    }
    let mut clean = item.clone();
    replace_nul(&mut clean);
    clean.to_string()
}

fn replace_nul(v: &mut Value) {
    match v {
        Value::String(s) => *s = s.replace('\0', "\u{FFFD}"),
        Value::Array(items) => items.iter_mut().for_each(replace_nul),
        Value::Object(members) => {
            let entries = std::mem::take(members);
            for (k, mut v) in entries {
                replace_nul(&mut v);
                members.insert(k.replace('\0', "\u{FFFD}"), v);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_failed_item_means_what_its_push_means_with_the_same_dedup_key() {
        let push = json!({"EventType": "bpms_instance_change", "corpId": "dingc",
            "processInstanceId": "p1", "type": "finish", "result": "agree",
            "createTime": 1606126000000i64, "finishTime": 1606126433000i64, "processCode": "PROC-1"});
        let item = json!({"call_back_tag": "bpms_instance_change", "event_time": 1606126433000i64,
            "bpms_instance_change": {"corpid": "dingc", "bpmsCallBackData": {
                "processInstanceId": "p1", "type": "finish", "result": "agree",
                "createTime": 1606126000000i64, "finishTime": 1606126433000i64, "processCode": "PROC-1"}}});
        let from_list = to_event(&item, "dingdefault");
        let Parsed::Event(pushed) =
            event::parse(&push.to_string(), Source::HttpPush, "dingdefault").unwrap()
        else {
            panic!("not an event")
        };
        assert_eq!(from_list.dedup_key, pushed.dedup_key);
        assert_eq!(from_list.source, Source::FailedList);
        assert_eq!(from_list.corp_id, "dingc");
        assert_eq!(from_list.approval.unwrap().status, Some("COMPLETED"));
        assert_eq!(from_list.raw, item.to_string());
    }

    #[test]
    fn an_item_the_push_rules_refuse_is_kept_raw_without_changes_and_says_why() {
        let now = Utc::now();
        let item = json!({"call_back_tag": "bpms_instance_change", "event_time": -8_000_000_000_000_000i64,
            "bpms_instance_change": {"corpid": "dingc", "bpmsCallBackData": {
                "processInstanceId": "p1", "type": "start", "createTime": -8_000_000_000_000_000i64}}});
        let (e, refused) = read_item(&item, "dingdefault", now);
        assert_eq!(
            refused,
            Some(Malformed::TimeOutOfRange {
                field: "createTime"
            })
        );
        assert!(e.approval.is_none() && e.task.is_none() && e.process_instance_id.is_none());
        assert_eq!((e.corp_id.as_str(), e.event_time), ("dingc", None));
        assert_eq!(e.raw, item.to_string());

        let long = "x".repeat(9_000);
        let item = json!({"call_back_tag": "bpms_task_change", "event_time": 1606126433000i64,
            "bpms_task_change": {"corpid": long, "bpmsCallBackData": {
                "processInstanceId": long, "type": "start", "taskId": 1}}});
        let (e, refused) = read_item(&item, "dingdefault", now);
        assert!(matches!(refused, Some(Malformed::TooLong { .. })));
        assert_eq!(e.corp_id, "dingdefault", "an unbounded corp id is not kept");
        assert_eq!(e.event_time.unwrap().timestamp_millis(), 1606126433000);
    }

    #[test]
    fn an_item_with_a_nul_is_kept_with_the_nul_replaced() {
        let item = json!({"call_back_tag": "bpms_instance_change", "event_time": 1606126433000i64,
            "bpms_instance_change": {"corpid": "dingc", "bpmsCallBackData": {
                "processInstanceId": "p1", "type": "start", "title": "a\u{0}b"}}});
        let (e, refused) = read_item(&item, "dingdefault", Utc::now());
        assert_eq!(refused, Some(Malformed::NulCharacter));
        assert!(!e.raw.contains("\\u0000") && e.raw.contains("a\u{FFFD}b"));
        assert!(e.approval.is_none());
    }

    #[test]
    fn an_item_of_another_shape_is_kept_raw_without_changes() {
        let item = json!({"call_back_tag": "user_add_org", "event_time": 1,
            "user_add_org": {"corpid": "dingc", "userid": ["u1"]}});
        let e = to_event(&item, "dingdefault");
        assert_eq!(e.event_type, "user_add_org");
        assert!(e.approval.is_none() && e.task.is_none());
        assert!(e.dedup_key.starts_with("sha256:"));
    }
}
