//! The emulator's Stream gateway over real HTTP and WebSocket (docs/dingtalk.md §8): bad
//! credentials refused, tickets single-use and expiring, EVENT frames with string `data` and
//! string headers, redelivery of what is not acked or answered `LATER`, pings that want their
//! data back, each message to one connection, `disconnect` followed by a close, and the
//! deliveries allowance. The official Python SDK is checked in `stream_sdk.rs`.

use std::time::Duration;

use dingsync_emulator::{
    DEFAULT_APP_KEY, DEFAULT_APP_SECRET, Delivery, Emulator, EmulatorConfig, StartInstance,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn emulator(scale: f64, monthly_deliveries: u64) -> Emulator {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Emulator::start(
        EmulatorConfig {
            time_scale: scale,
            delivery: Delivery::Stream,
            monthly_deliveries,
            ..EmulatorConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap()
}

async fn open(emu: &Emulator, secret: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/v1.0/gateway/connections/open", emu.base_url()))
        .json(&json!({"clientId": DEFAULT_APP_KEY, "clientSecret": secret,
            "subscriptions": [{"type": "EVENT", "topic": "*"}], "ua": "test", "localIp": ""}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn url(answer: &Value) -> String {
    let ticket = answer["ticket"].as_str().unwrap();
    let mut url = reqwest::Url::parse(answer["endpoint"].as_str().unwrap()).unwrap();
    url.query_pairs_mut().append_pair("ticket", ticket);
    url.to_string()
}

async fn connect(emu: &Emulator) -> Ws {
    let (status, answer) = open(emu, DEFAULT_APP_SECRET).await;
    assert_eq!(status, 200, "{answer}");
    tokio_tungstenite::connect_async(url(&answer))
        .await
        .unwrap()
        .0
}

fn start(emu: &Emulator) {
    emu.state()
        .start_instance(StartInstance {
            process_code: "PROC-EMU-EXPENSE".into(),
            originator_userid: "emp1".into(),
            approvers: Some(vec!["manager1".into()]),
            ..StartInstance::default()
        })
        .unwrap();
}

/// The next frame of `type` (others are skipped), within 10 s.
async fn next(ws: &mut Ws, kind: &str) -> Value {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Text(text) => {
                    let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                    if frame["type"] == kind {
                        return frame;
                    }
                }
                _ => continue,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind} frame within 10 s"))
}

/// The next EVENT frame of `event_id`; others are acknowledged on the way.
async fn next_of(ws: &mut Ws, event_id: &Value) -> Value {
    loop {
        let frame = next(ws, "EVENT").await;
        if &frame["headers"]["eventId"] == event_id {
            return frame;
        }
        ack(ws, &frame, 200, r#"{"status":"SUCCESS"}"#).await;
    }
}

async fn ack(ws: &mut Ws, frame: &Value, code: i64, data: &str) {
    let ack = json!({"code": code, "headers": {"messageId": frame["headers"]["messageId"],
        "contentType": "application/json"}, "message": "OK", "data": data});
    ws.send(Message::text(ack.to_string())).await.unwrap();
}

#[tokio::test]
async fn bad_credentials_are_refused_as_the_v1_family_refuses_them() {
    let emu = emulator(1.0, 0).await;
    let (status, answer) = open(&emu, "wrong").await;
    assert_eq!(status, 400);
    assert_eq!(answer["code"], "invalidClientIdOrSecret");
    assert!(answer.get("ticket").is_none());
    assert_eq!(emu.state().stream_report().opens_refused, 1);
    emu.stop().await;
}

#[tokio::test]
async fn a_ticket_opens_one_connection_and_expires_after_90_scaled_seconds() {
    // 90 s × 0.002 = 180 ms.
    let emu = emulator(0.002, 0).await;
    let (_, answer) = open(&emu, DEFAULT_APP_SECRET).await;
    let first = tokio_tungstenite::connect_async(url(&answer)).await;
    assert!(first.is_ok());
    let again = tokio_tungstenite::connect_async(url(&answer)).await;
    assert!(again.is_err(), "a used ticket is refused");
    let (_, late) = open(&emu, DEFAULT_APP_SECRET).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tokio_tungstenite::connect_async(url(&late)).await.is_err(),
        "an expired ticket is refused"
    );
    assert_eq!(emu.state().stream_report().tickets_refused, 2);
    emu.stop().await;
}

#[tokio::test]
async fn event_frames_carry_string_data_and_headers_and_are_redelivered_until_consumed() {
    // Redelivery after 10 s × 0.01 = 100 ms, then 300 ms, 600 ms.
    let emu = emulator(0.01, 0).await;
    let mut ws = connect(&emu).await;
    start(&emu);
    let first = next(&mut ws, "EVENT").await;
    let headers = first["headers"].as_object().unwrap();
    assert!(headers.values().all(Value::is_string), "{headers:?}");
    for name in [
        "messageId",
        "eventType",
        "eventId",
        "eventBornTime",
        "eventCorpId",
        "time",
    ] {
        assert!(headers.contains_key(name), "{name}");
    }
    let data: Value = serde_json::from_str(first["data"].as_str().unwrap()).unwrap();
    assert!(data.get("processInstanceId").is_some() && data.get("EventType").is_none());
    // Not acked: delivered again, a new message of the same event.
    let again = next_of(&mut ws, &first["headers"]["eventId"]).await;
    assert_ne!(again["headers"]["messageId"], first["headers"]["messageId"]);
    ack(&mut ws, &again, 200, r#"{"status":"LATER"}"#).await;
    let third = next_of(&mut ws, &first["headers"]["eventId"]).await;
    ack(
        &mut ws,
        &third,
        200,
        r#"{"status":"SUCCESS","message":"success"}"#,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let report = emu.state().stream_report();
    let acks = emu.state().stream_acks();
    let of_first: Vec<_> = acks
        .iter()
        .filter(|a| first["headers"]["eventId"] == a.event_id.as_str())
        .collect();
    assert_eq!(of_first.iter().filter(|a| a.consumed).count(), 1);
    assert_eq!(of_first.iter().filter(|a| a.status == "LATER").count(), 1);
    assert_eq!((report.in_flight, report.waiting), (0, 0), "{report:?}");
    assert!(report.redeliveries >= 2, "{report:?}");
    emu.stop().await;
}

#[tokio::test]
async fn pings_want_their_data_back_compared_as_json() {
    // A ping every 30 s × 0.01 = 300 ms.
    let emu = emulator(0.01, 0).await;
    let mut ws = connect(&emu).await;
    let ping = next(&mut ws, "SYSTEM").await;
    assert_eq!(ping["headers"]["topic"], "ping");
    let data: Value = serde_json::from_str(ping["data"].as_str().unwrap()).unwrap();
    // Re-serialised with spaces, as the Python SDK does.
    let spaced = format!("{{\"opaque\": \"{}\"}}", data["opaque"].as_str().unwrap());
    ack(&mut ws, &ping, 200, &spaced).await;
    let wrong = next(&mut ws, "SYSTEM").await;
    ack(&mut ws, &wrong, 200, r#"{"opaque":"something else"}"#).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = emu.state().stream_report();
    assert_eq!((report.pings_answered, report.pings_answered_wrong), (1, 1));
    emu.stop().await;
}

#[tokio::test]
async fn each_message_goes_to_one_of_the_apps_connections() {
    let emu = emulator(1.0, 0).await;
    let mut a = connect(&emu).await;
    let mut b = connect(&emu).await;
    for _ in 0..10 {
        start(&emu);
    }
    // 10 instance starts and 10 task starts; every message acked where it arrived.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen.len() < 20 && tokio::time::Instant::now() < deadline {
        for ws in [&mut a, &mut b] {
            if let Ok(Some(Ok(Message::Text(text)))) =
                tokio::time::timeout(Duration::from_millis(50), ws.next()).await
            {
                let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                if frame["type"] == "EVENT" {
                    ack(ws, &frame, 200, r#"{"status":"SUCCESS"}"#).await;
                    seen.push(frame["headers"]["eventId"].as_str().unwrap().to_string());
                }
            }
        }
    }
    let distinct: std::collections::HashSet<&String> = seen.iter().collect();
    assert_eq!((seen.len(), distinct.len()), (20, 20));
    let connections: std::collections::HashSet<u64> = emu
        .state()
        .stream_acks()
        .iter()
        .map(|a| a.connection)
        .collect();
    assert_eq!(connections.len(), 2, "both connections got messages");
    emu.stop().await;
}

#[tokio::test]
async fn disconnect_stops_new_messages_and_closes_the_connection_ten_scaled_seconds_later() {
    // 10 s × 0.02 = 200 ms.
    let emu = emulator(0.02, 0).await;
    let mut ws = connect(&emu).await;
    assert_eq!(emu.state().stream_disconnect(None), 1);
    let frame = next(&mut ws, "SYSTEM").await;
    assert_eq!(frame["headers"]["topic"], "disconnect");
    start(&emu);
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let f: Value = serde_json::from_str(text.as_str()).unwrap();
                    assert_ne!(f["type"], "EVENT", "no new message after disconnect");
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "closed after the disconnect");
    // The events wait for a connection.
    assert!(emu.state().stream_report().waiting >= 1);
    emu.stop().await;
}

#[tokio::test]
async fn stream_deliveries_count_against_the_monthly_allowance() {
    let emu = emulator(1.0, 1).await;
    let mut ws = connect(&emu).await;
    start(&emu);
    let frame = next(&mut ws, "EVENT").await;
    ack(&mut ws, &frame, 200, r#"{"status":"SUCCESS"}"#).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = emu.state().stream_report();
    // An instance start and its first task's start: one fits the allowance.
    assert_eq!(
        (report.deliveries, report.over_allowance),
        (1, 1),
        "{report:?}"
    );
    emu.stop().await;
}
