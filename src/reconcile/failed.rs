//! The `failed` job: drains `call_back/get_call_back_failed_result` (docs/dingtalk.md §3), the list of
//! pushes DingTalk gave up on. The list is read-once (no cursor: what it returns is gone, docs/dingtalk.md
//! §3 [UNCONFIRMED: inferred], we take that stricter reading), so:
//! - only the job's leader calls it (the scheduler's advisory lock), and never twice at once;
//! - the database is checked before each call, so a known-down database loses nothing;
//! - each answer's items are stored in `dingsync.events` (source `failed_list`, the item as
//!   DingTalk sent it in `raw`) in the same single statement that applies them: the raw items
//!   are never applied without being stored. If applying them fails, they are stored alone (and
//!   the detail fetch and sweep still bring the approvals to DingTalk's state);
//! - it loops while `has_more`.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::{
    event::{self, Event, Parsed, Source},
    jobs::{Context, Counts},
    store::{
        self,
        batch::{Expect, store_events},
    },
};

pub async fn drain(ctx: &Context, shutdown: &CancellationToken) -> anyhow::Result<Counts> {
    let mut counts = Counts::new();
    loop {
        store::ping(ctx.pool()).await?;
        let page = ctx.client().failed_callbacks().await?;
        *counts.entry("calls").or_default() += 1;
        let events: Vec<Event> = page
            .failed_list
            .iter()
            .map(|item| to_event(item, ctx.corp_id()))
            .collect();
        let refs: Vec<&Event> = events.iter().collect();
        let new = match store_events(ctx.pool(), &refs, Expect::Any).await {
            Ok(new) => new,
            Err(e) => {
                tracing::error!(error = %e, items = events.len(), "applying failed-list items failed; storing them unapplied");
                let bare: Vec<Event> = events
                    .iter()
                    .cloned()
                    .map(|mut e| {
                        e.approval = None;
                        e.task = None;
                        e
                    })
                    .collect();
                let refs: Vec<&Event> = bare.iter().collect();
                store_events(ctx.pool(), &refs, Expect::Any).await?
            }
        };
        *counts.entry("items").or_default() += events.len() as u64;
        *counts.entry("new").or_default() += new.count(events.len()) as u64;
        if !page.has_more || shutdown.is_cancelled() {
            return Ok(counts);
        }
    }
}

/// One failed-list item as an event. The item nests the push's fields under its tag
/// (`{"call_back_tag", "event_time", "<tag>": {"corpid", "bpmsCallBackData": {..}}}`); put back
/// together as the flat push (`EventType`, `corpId` + the data), it gets the same meaning and
/// the same dedup key as the push would have had, so a push that did arrive is not stored twice.
/// `raw` keeps the item as DingTalk sent it. An item of another shape is stored raw, unapplied.
pub fn to_event(item: &Value, default_corp_id: &str) -> Event {
    let raw = item.to_string();
    let tag = item["call_back_tag"].as_str().unwrap_or("unknown");
    let inner = &item[tag];
    let corp_id = inner["corpid"]
        .as_str()
        .filter(|c| !c.is_empty())
        .unwrap_or(default_corp_id);
    let event_time = item["event_time"]
        .as_i64()
        .and_then(chrono::DateTime::from_timestamp_millis);
    if let Some(data) = inner["bpmsCallBackData"].as_object() {
        let mut flat: Map<String, Value> = data.clone();
        flat.insert("EventType".into(), tag.into());
        flat.insert("corpId".into(), corp_id.into());
        let text = Value::Object(flat).to_string();
        if let Ok(Parsed::Event(mut e)) = event::parse(&text, Source::FailedList, default_corp_id) {
            e.raw = raw;
            e.event_time = e.event_time.or(event_time);
            return *e;
        }
    }
    let mut hash = Sha256::new();
    hash.update(raw.as_bytes());
    Event {
        corp_id: corp_id.to_string(),
        dedup_key: format!("sha256:{}", hex::encode(hash.finalize())),
        source: Source::FailedList,
        event_type: tag.to_string(),
        change_type: None,
        process_instance_id: None,
        task_id: None,
        event_time,
        raw,
        approval: None,
        task: None,
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
    fn an_item_of_another_shape_is_kept_raw_without_changes() {
        let item = json!({"call_back_tag": "user_add_org", "event_time": 1,
            "user_add_org": {"corpid": "dingc", "userid": ["u1"]}});
        let e = to_event(&item, "dingdefault");
        assert_eq!(e.event_type, "user_add_org");
        assert!(e.approval.is_none() && e.task.is_none());
        assert!(e.dedup_key.starts_with("sha256:"));
    }
}
