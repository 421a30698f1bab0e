//! Stream frames and acknowledgements (docs/dingtalk.md §8.2–§8.4), pure: reading a text frame,
//! turning an `EVENT` frame into the message `event::parse_at` reads, and writing an ack.
//!
//! An `EVENT` frame carries the event's fields as a JSON string in `data` and its envelope in
//! string headers (`eventType`, `eventId`, `eventCorpId`, `eventBornTime`, …). It is put back
//! together as the flat message an HTTP push of the same event carries (docs/dingtalk.md §5.2):
//! the data's fields plus `EventType` (from `eventType`) and `corpId` (from `eventCorpId`), as
//! the failed-list drain does with its items. So the event gets the same meaning, the same bounds
//! and **the same dedup key** as the push would have had: an event that arrives both ways (while
//! an organisation switches) is stored once. The header `eventId` is not put into the message:
//! HTTP pushes in the shape our notes and the emulator know carry none, so a key from it would
//! never meet the push's key; the frame itself, `eventId` included, is what `raw` keeps
//! (docs/dingtalk.md §8.5 explains the reading).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use crate::event::{self, Malformed, Parsed, Source};

/// One frame from the gateway.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Event {
        message_id: String,
        event_type: Option<String>,
        event_corp_id: Option<String>,
        data: String,
    },
    Ping {
        message_id: String,
        data: String,
    },
    Disconnect {
        message_id: String,
    },
    /// A `SYSTEM` topic we do not know.
    System {
        message_id: String,
    },
    /// A `CALLBACK` (bot messages, cards): not subscribed to.
    Callback {
        message_id: String,
    },
}

impl Frame {
    /// The metrics label of the frame's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Event { .. } => "event",
            Frame::Ping { .. } => "ping",
            Frame::Disconnect { .. } => "disconnect",
            Frame::System { .. } => "system",
            Frame::Callback { .. } => "callback",
        }
    }
}

/// A frame we cannot read; answered with a 400 when it names its message.
#[derive(Debug, PartialEq, Eq)]
pub struct BadFrame {
    pub message_id: Option<String>,
    pub why: String,
}

fn bad(message_id: Option<&str>, why: impl Into<String>) -> BadFrame {
    BadFrame {
        message_id: message_id.map(str::to_string),
        why: why.into(),
    }
}

/// Reads a text frame. Header values are strings (docs/dingtalk.md §8.2); a number where a
/// string belongs is read as its text rather than refused.
pub fn read(text: &str) -> Result<Frame, BadFrame> {
    let value: Value = serde_json::from_str(text).map_err(|_| bad(None, "frame is not JSON"))?;
    let headers = value["headers"].as_object();
    let header = |name: &str| -> Option<String> {
        match headers?.get(name)? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let message_id = header("messageId").ok_or_else(|| bad(None, "frame has no messageId"))?;
    let id = Some(message_id.as_str());
    if message_id.len() > event::MAX_ID_BYTES {
        return Err(bad(None, "messageId is too long"));
    }
    let data = match &value["data"] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        _ => return Err(bad(id, "data is not a JSON string")),
    };
    let topic = header("topic").unwrap_or_default();
    match value["type"].as_str() {
        Some("EVENT") => Ok(Frame::Event {
            message_id,
            event_type: header("eventType"),
            event_corp_id: header("eventCorpId"),
            data,
        }),
        Some("SYSTEM") if topic == "ping" => Ok(Frame::Ping { message_id, data }),
        Some("SYSTEM") if topic == "disconnect" => Ok(Frame::Disconnect { message_id }),
        Some("SYSTEM") => Ok(Frame::System { message_id }),
        Some("CALLBACK") => Ok(Frame::Callback { message_id }),
        _ => Err(bad(id, "frame type is not EVENT, SYSTEM or CALLBACK")),
    }
}

/// Why an `EVENT` frame's event cannot be stored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unreadable {
    #[error("frame has no eventType")]
    NoEventType,
    #[error("data is not a JSON object")]
    DataNotAnObject,
    #[error("data's EventType is not the frame's eventType")]
    EventTypesDisagree,
    #[error(transparent)]
    Malformed(#[from] Malformed),
}

/// The event of an `EVENT` frame (`frame_text` is the whole frame, kept as `raw`). The
/// organisation is the frame's `eventCorpId`, else the one the data names, else the app's
/// (`default_corp_id`); a data that names another than the header is refused.
pub fn event(
    frame_text: &str,
    event_type: Option<&str>,
    event_corp_id: Option<&str>,
    data: &str,
    default_corp_id: &str,
    now: DateTime<Utc>,
) -> Result<Parsed, Unreadable> {
    let event_type = event_type.ok_or(Unreadable::NoEventType)?;
    let mut flat: Map<String, Value> = match serde_json::from_str(data) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(Unreadable::DataNotAnObject),
        Err(e) => return Err(Malformed::NotJson(e.to_string()).into()),
    };
    if flat
        .get("EventType")
        .is_some_and(|t| t.as_str() != Some(event_type))
    {
        return Err(Unreadable::EventTypesDisagree);
    }
    let named = ["corpId", "CorpId", "corpid"]
        .iter()
        .find_map(|k| {
            flat.get(*k)
                .and_then(Value::as_str)
                .filter(|c| !c.is_empty())
        })
        .map(str::to_string);
    let corp = match (event_corp_id, named) {
        (Some(header), Some(named)) if header != named => {
            return Err(Malformed::CorpIdsDisagree.into());
        }
        (Some(header), _) => header.to_string(),
        (None, Some(named)) => named,
        (None, None) => default_corp_id.to_string(),
    };
    flat.insert("EventType".into(), event_type.into());
    flat.insert("corpId".into(), corp.into());
    // The frame is what `raw` keeps: it must be storable as text and jsonb too.
    let frame: Value =
        serde_json::from_str(frame_text).map_err(|e| Malformed::NotJson(e.to_string()))?;
    if event::has_nul(&frame) {
        return Err(Malformed::NulCharacter.into());
    }
    if !event::numbers_fit_jsonb(frame_text) {
        return Err(Malformed::NumberOutOfRange.into());
    }
    let message = Value::Object(flat).to_string();
    let mut parsed = event::parse_at(&message, Source::Stream, default_corp_id, now)?;
    if let Parsed::Event(e) = &mut parsed {
        e.raw = frame_text.to_string();
    }
    Ok(parsed)
}

/// What an acknowledgement says (docs/dingtalk.md §8.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer<'a> {
    /// Stored (committed) or a duplicate: consumed.
    Success,
    /// Not stored now (database down, shutting down): deliver it again later.
    Later,
    /// A ping's answer: its own `data`.
    Pong(&'a str),
    /// A frame we cannot read.
    BadRequest,
    /// A topic we do not handle.
    NotFound,
    /// Storing failed for another reason: deliver again later.
    Error,
}

impl Answer<'_> {
    /// The metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Answer::Success | Answer::Pong(_) => "success",
            Answer::Later => "later",
            Answer::BadRequest => "bad_request",
            Answer::NotFound => "not_found",
            Answer::Error => "error",
        }
    }
}

/// The acknowledgement of `message_id`.
pub fn ack(message_id: &str, answer: Answer<'_>) -> String {
    let status =
        |status: &str, message: &str| json!({"status": status, "message": message}).to_string();
    let (code, message, data) = match answer {
        Answer::Success => (200, "OK", status("SUCCESS", "success")),
        Answer::Later => (
            200,
            "OK",
            status("LATER", "not stored yet; deliver again later"),
        ),
        Answer::Pong(data) => (200, "OK", data.to_string()),
        Answer::BadRequest => (400, "bad request", status("SUCCESS", "unreadable message")),
        Answer::NotFound => (404, "unknown topic", status("SUCCESS", "not subscribed")),
        Answer::Error => (500, "internal error", status("LATER", "storing failed")),
    };
    json!({
        "code": code,
        "headers": {"contentType": "application/json", "messageId": message_id},
        "message": message,
        "data": data,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(headers: Value, data: &str) -> String {
        json!({"specVersion": "1.0", "type": "EVENT", "headers": headers, "data": data}).to_string()
    }

    fn parse(text: &str) -> Parsed {
        let Frame::Event {
            event_type,
            event_corp_id,
            data,
            ..
        } = read(text).unwrap()
        else {
            panic!("not an event")
        };
        event(
            text,
            event_type.as_deref(),
            event_corp_id.as_deref(),
            &data,
            "dingapp",
            Utc::now(),
        )
        .unwrap()
    }

    #[test]
    fn a_stream_event_has_the_meaning_and_dedup_key_of_the_same_http_push() {
        let push = json!({"EventType": "bpms_instance_change", "corpId": "dingc",
            "processInstanceId": "p1", "type": "finish", "result": "agree",
            "createTime": 1606126000000i64, "finishTime": 1606126433000i64});
        let data = json!({"processInstanceId": "p1", "type": "finish", "result": "agree",
            "createTime": 1606126000000i64, "finishTime": 1606126433000i64});
        let text = frame(
            json!({"messageId": "m1", "eventType": "bpms_instance_change", "eventId": "e1",
                "eventCorpId": "dingc", "eventBornTime": "1606126433000"}),
            &data.to_string(),
        );
        let Parsed::Event(streamed) = parse(&text) else {
            panic!()
        };
        let Parsed::Event(pushed) =
            event::parse(&push.to_string(), Source::HttpPush, "dingapp").unwrap()
        else {
            panic!()
        };
        assert_eq!(streamed.dedup_key, pushed.dedup_key);
        assert_eq!(streamed.corp_id, "dingc");
        assert_eq!(streamed.source, Source::Stream);
        assert_eq!(streamed.approval, pushed.approval);
        assert_eq!(streamed.raw, text);
        // A redelivery (new messageId, same event) has the same key.
        let again = text.replace("\"m1\"", "\"m2\"");
        let Parsed::Event(redelivered) = parse(&again) else {
            panic!()
        };
        assert_eq!(redelivered.dedup_key, streamed.dedup_key);
    }

    #[test]
    fn an_event_without_an_organisation_is_the_apps_and_one_naming_two_is_refused() {
        let text = frame(
            json!({"messageId": "m1", "eventType": "bpms_task_change"}),
            r#"{"processInstanceId":"p","type":"start","taskId":1}"#,
        );
        let Parsed::Event(e) = parse(&text) else {
            panic!()
        };
        assert_eq!(e.corp_id, "dingapp");
        let Frame::Event { data, .. } = read(&text).unwrap() else {
            panic!()
        };
        let two = event(
            &text,
            Some("bpms_task_change"),
            Some("dingother"),
            &data.replace("{", r#"{"corpId":"dingc","#),
            "dingapp",
            Utc::now(),
        );
        assert_eq!(
            two.unwrap_err(),
            Unreadable::Malformed(Malformed::CorpIdsDisagree)
        );
    }

    #[test]
    fn frames_are_read_by_type_and_topic_and_bad_ones_name_their_message() {
        let ping = r#"{"type":"SYSTEM","headers":{"messageId":"p1","topic":"ping"},"data":"{\"opaque\":\"x\"}"}"#;
        assert_eq!(
            read(ping).unwrap(),
            Frame::Ping {
                message_id: "p1".into(),
                data: r#"{"opaque":"x"}"#.into()
            }
        );
        let disconnect =
            r#"{"type":"SYSTEM","headers":{"messageId":"d","topic":"disconnect"},"data":"{}"}"#;
        assert_eq!(read(disconnect).unwrap().kind(), "disconnect");
        assert_eq!(read("not json").unwrap_err().message_id, None);
        let odd = r#"{"type":"OTHER","headers":{"messageId":"o1"}}"#;
        assert_eq!(read(odd).unwrap_err().message_id.as_deref(), Some("o1"));
        let object_data = r#"{"type":"EVENT","headers":{"messageId":"o2"},"data":{}}"#;
        assert_eq!(
            read(object_data).unwrap_err().message_id.as_deref(),
            Some("o2")
        );
    }

    #[test]
    fn acks_echo_the_message_id_and_a_pong_its_data() {
        let a: Value = serde_json::from_str(&ack("m1", Answer::Success)).unwrap();
        assert_eq!(a["code"], 200);
        assert_eq!(a["headers"]["messageId"], "m1");
        let data: Value = serde_json::from_str(a["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["status"], "SUCCESS");
        let later: Value = serde_json::from_str(&ack("m2", Answer::Later)).unwrap();
        assert!(later["data"].as_str().unwrap().contains("LATER"));
        let pong: Value =
            serde_json::from_str(&ack("p", Answer::Pong(r#"{"opaque":"x"}"#))).unwrap();
        assert_eq!(pong["data"], r#"{"opaque":"x"}"#);
    }
}
