//! DingTalk's Stream mode (docs/dingtalk.md §8): `POST /v1.0/gateway/connections/open` hands out a
//! WebSocket endpoint and a single-use ticket; the app's connections receive `EVENT` frames (the
//! event's fields as a JSON **string** in `data`, the envelope in string-valued headers), `SYSTEM`
//! pings and `disconnect`s, and answer every message with an ack naming its `messageId`.
//!
//! What it reproduces, and the readings it takes where the notes are unconfirmed:
//! - bad `clientId`/`clientSecret` are refused as the v1.0 family refuses them (HTTP 400,
//!   `invalidClientIdOrSecret`; what the gateway itself answers is [UNCONFIRMED]);
//! - a ticket is good for one connection and expires 90 s (× `time_scale`) after it was issued;
//!   a WebSocket upgrade with an unknown, used or expired ticket is refused with HTTP 401;
//! - each message goes to one of the app's connections that subscribed to `EVENT`, chosen at
//!   random; at most [`WINDOW`] messages wait for an ack on one connection (flow control is not
//!   documented [UNCONFIRMED]; it bounds the emulator's memory and lets a benchmark push "as fast as
//!   acks allow"), the others wait for room;
//! - a message not acknowledged within the redelivery step, or answered `LATER` (or with a code
//!   other than 200), is delivered again after 10 s, 30 s, 60 s, 120 s (× `time_scale`; the
//!   third-party schedule) with a new `messageId` and the same `eventId`; after the last step it is
//!   given up (how many attempts DingTalk makes is [UNCONFIRMED]: fewer is the stricter reading
//!   for a client, whose reconciliation must then find what was lost);
//! - an ack with code 200 consumes the message unless its `data` says `"status": "LATER"`: the
//!   official Python SDK answers events with the event's own data, not a status object;
//! - `ping` every 30 s (× `time_scale`), whose ack must carry the same `{"opaque"}` (compared as
//!   JSON: the Python SDK re-serialises it with spaces);
//! - `disconnect`: no new messages on that connection, closed 10 s (× `time_scale`) later;
//! - every delivery attempt counts against the monthly deliveries allowance (`quota`), as HTTP
//!   pushes do; past it the event is dropped for good.
//!
//! Faults (`faults::StreamFaults` and the actions of [`crate::Handle`]): drop a connection
//! abruptly (TCP closed, no close frame), send `disconnect`, go silent without closing (nothing
//! sent, nothing read, pings unanswered), duplicate and reorder frames, hand out expired tickets.
//!
//! Owns: tickets, connections, the messages in flight and their redelivery, the ack log. Does
//! not own: what events say (`model`), the allowance's counters (`quota`), HTTP push (`push`).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use chrono::Utc;
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use subtle::ConstantTimeEq;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};
use tokio_tungstenite::tungstenite::{
    Message as WsMessage,
    handshake::server::{ErrorResponse, Request, Response as WsResponse},
};

pub use super::gateway::{AckHook, AckRecord, Delivery, StreamReport};
use super::gateway::{Conn, GatewayState, Message, Out, Pending};
use super::{faults::probability, model::Event, state::Shared};

/// A ticket's life in DingTalk seconds (docs/dingtalk.md §8.1).
const TICKET_SECS: f64 = 90.0;
/// Redelivery steps in DingTalk seconds (docs/dingtalk.md §8.3, third-party schedule).
const REDELIVER_AFTER_SECS: [f64; 4] = [10.0, 30.0, 60.0, 120.0];
/// Between two pings of one connection, DingTalk seconds (the interval is not documented).
const PING_EVERY_SECS: f64 = 30.0;
/// From `disconnect` to the close, DingTalk seconds (docs/dingtalk.md §8.4).
const CLOSE_AFTER_DISCONNECT_SECS: f64 = 10.0;
/// Messages waiting for an ack on one connection at most.
pub const WINDOW: usize = 32;
/// Default upper bound of the reorder delay.
const REORDER_MAX_DEFAULT_MS: u64 = 500;
/// How often due redeliveries and closes are looked for.
const TICK: Duration = Duration::from_millis(10);
/// The largest frame a client may send (acks are small).
const MAX_CLIENT_FRAME: usize = 64 * 1024;

/// The gateway's HTTP route (`connections/open`), on the emulator's API server.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1.0/gateway/connections/open", post(open))
        .with_state(shared)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OpenRequest {
    #[serde(default)]
    client_id: String,
    #[serde(default)]
    client_secret: String,
    #[serde(default)]
    subscriptions: Vec<Subscription>,
}

#[derive(Deserialize)]
struct Subscription {
    #[serde(rename = "type")]
    kind: String,
    topic: String,
}

fn v1_error(status: StatusCode, code: &str, message: &str) -> Response {
    let requestid = format!("{:016x}", rand::random::<u64>());
    (
        status,
        Json(json!({"code": code, "message": message, "requestid": requestid})),
    )
        .into_response()
}

/// `POST /v1.0/gateway/connections/open` (docs/dingtalk.md §8.1). Not metered (`quota`), but
/// counted in the call log like every API.
async fn open(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    shared
        .world()
        .admit("v1.0/gateway/connections/open", Instant::now());
    let gateway = &shared.stream;
    let Ok(request) = serde_json::from_slice::<OpenRequest>(&body) else {
        return v1_error(
            StatusCode::BAD_REQUEST,
            "MissingParameter",
            "body is not {clientId, clientSecret, subscriptions}",
        );
    };
    let config = &shared.config;
    let key_ok: bool = request
        .client_id
        .as_bytes()
        .ct_eq(config.app_key.as_bytes())
        .into();
    let secret_ok: bool = request
        .client_secret
        .as_bytes()
        .ct_eq(config.app_secret.as_bytes())
        .into();
    if !(key_ok && secret_ok) {
        gateway.state().report.opens_refused += 1;
        return v1_error(
            StatusCode::BAD_REQUEST,
            "invalidClientIdOrSecret",
            "无效的clientId或者clientSecret",
        );
    }
    let events = request
        .subscriptions
        .iter()
        .any(|s| s.kind == "EVENT" && s.topic == "*");
    let Some(addr) = gateway.addr.get() else {
        return v1_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "gateway not listening",
        );
    };
    let ticket = format!(
        "{}-{}",
        gateway.random_hex(16),
        if events { "e" } else { "n" }
    );
    let expired = {
        let mut world = shared.world();
        let faults = &mut world.faults.stream;
        if faults.expire_tickets > 0 {
            faults.expire_tickets -= 1;
            true
        } else {
            false
        }
    };
    let expires_at = if expired {
        Instant::now()
    } else {
        Instant::now() + shared.scaled(TICKET_SECS)
    };
    {
        let mut state = gateway.state();
        let now = Instant::now();
        state.tickets.retain(|_, at| *at > now);
        state.tickets.insert(ticket.clone(), expires_at);
        state.report.tickets_issued += 1;
    }
    Json(json!({"endpoint": format!("ws://{addr}/connect"), "ticket": ticket})).into_response()
}

/// Binds the gateway's WebSocket listener beside the API server and runs it, with the
/// redelivery clock, until the emulator stops.
pub(crate) async fn start(shared: Arc<Shared>, ip: std::net::IpAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
    let addr = listener.local_addr()?;
    let _ = shared.stream.addr.set(addr);
    let accept = shared.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = accept.shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            if let Ok((tcp, _)) = accepted {
                tokio::spawn(serve_connection(accept.clone(), tcp));
            }
        }
    });
    tokio::spawn(clock(shared));
    Ok(())
}

/// Every [`TICK`]: redelivers what is due, closes what was told to `disconnect`, sends waiting
/// messages where there is room.
async fn clock(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        {
            let mut state = shared.stream.state();
            let state = &mut *state;
            let due: Vec<String> = state
                .pending
                .iter()
                .filter(|(_, p)| p.due <= now)
                .map(|(id, _)| id.clone())
                .collect();
            for id in due {
                let p = state.pending.remove(&id).expect("listed");
                if let Some(conn) = state.conns.get_mut(&p.conn) {
                    conn.unacked = conn.unacked.saturating_sub(1);
                }
                retry(state, p.message);
            }
            let (ready, kept): (Vec<_>, Vec<_>) =
                state.later.drain(..).partition(|(at, _)| *at <= now);
            state.later = kept;
            state.waiting.extend(ready.into_iter().map(|(_, m)| m));
            for conn in state.conns.values_mut() {
                if conn.close_at.is_some_and(|at| at <= now) {
                    conn.close_at = None;
                    let _ = conn.tx.send(Out::Close);
                }
            }
        }
        pump(&shared);
    }
}

/// A message that was not consumed: delivered again (as a new attempt) when redelivery allows.
fn retry(state: &mut GatewayState, mut message: Message) {
    message.attempt += 1;
    if message.attempt as usize > REDELIVER_AFTER_SECS.len() {
        give_up(state, &message);
        return;
    }
    state.report.redeliveries += 1;
    state.waiting.push_back(message);
}

fn give_up(state: &mut GatewayState, message: &Message) {
    state.report.given_up += 1;
    tracing::info!(event_id = %message.event_id, "emulator stream: message never consumed; given up");
    let mut flat: Map<String, Value> = serde_json::from_str(&message.data).unwrap_or_default();
    flat.insert("EventType".into(), message.event_type.clone().into());
    flat.insert("corpId".into(), message.corp_id.clone().into());
    state.given_up.push(Value::Object(flat));
}

/// Hands the app's events to its Stream connections (in order; duplicates and reorders by the
/// stream faults).
pub(crate) fn dispatch(shared: &Arc<Shared>, events: Vec<Event>) {
    if shared.shutdown.is_cancelled() {
        return;
    }
    let (duplicate, reorder, reorder_max) = {
        let world = shared.world();
        let f = &world.faults.stream;
        (f.duplicate_rate, f.reorder_rate, f.reorder_max_ms)
    };
    for event in events {
        let mut data = event.payload.clone();
        data.remove("EventType");
        let corp_id = data
            .remove("corpId")
            .and_then(|c| c.as_str().map(str::to_string))
            .unwrap_or_else(|| shared.config.corp_id.clone());
        if shared.config.keep_events && shared.stream.delivery() == Delivery::Stream {
            shared
                .world()
                .events_pushed
                .push(Value::Object(event.payload.clone()));
        }
        let message = Message {
            event_id: shared.stream.random_hex(16),
            event_type: event.tag.to_string(),
            data: Value::Object(data).to_string(),
            born_ms: event.event_time_ms,
            corp_id,
            attempt: 0,
        };
        publish(shared, message, duplicate, reorder, reorder_max);
    }
}

/// Delivers arbitrary events (flat HTTP-push JSON with an `EventType`) over Stream, as if
/// DingTalk had them: for tests and benchmarks.
pub(crate) fn publish_flat(shared: &Arc<Shared>, events: Vec<Map<String, Value>>) {
    for mut flat in events {
        let event_type = flat
            .remove("EventType")
            .and_then(|t| t.as_str().map(str::to_string))
            .unwrap_or_default();
        let corp_id = flat
            .remove("corpId")
            .and_then(|c| c.as_str().map(str::to_string))
            .unwrap_or_else(|| shared.config.corp_id.clone());
        let message = Message {
            event_id: shared.stream.random_hex(16),
            event_type,
            data: Value::Object(flat).to_string(),
            born_ms: Utc::now().timestamp_millis(),
            corp_id,
            attempt: 0,
        };
        publish(shared, message, 0.0, 0.0, 0);
    }
}

fn publish(shared: &Arc<Shared>, message: Message, duplicate: f64, reorder: f64, max_ms: u64) {
    let (copies, delay) = {
        let mut rng = shared.stream.rng.lock().unwrap_or_else(|e| e.into_inner());
        let copies = if rng.random_bool(probability(duplicate)) {
            2
        } else {
            1
        };
        let delay = rng.random_bool(probability(reorder)).then(|| {
            let max = if max_ms == 0 {
                REORDER_MAX_DEFAULT_MS
            } else {
                max_ms
            };
            Duration::from_millis(rng.random_range(1..=max))
        });
        (copies, delay)
    };
    for _ in 0..copies {
        let mut state = shared.stream.state();
        match delay {
            Some(d) => state.later.push((Instant::now() + d, message.clone())),
            None => state.waiting.push_back(message.clone()),
        }
    }
    pump(shared);
}

/// Sends waiting messages to connections with room, each to one chosen at random.
fn pump(shared: &Arc<Shared>) {
    loop {
        let mut state = shared.stream.state();
        if state.waiting.is_empty() {
            return;
        }
        let open: Vec<u64> = state
            .conns
            .iter()
            .filter(|(_, c)| c.accepting && c.events && c.unacked < WINDOW)
            .map(|(id, _)| *id)
            .collect();
        if open.is_empty() {
            return;
        }
        let conn_id = {
            let mut rng = shared.stream.rng.lock().unwrap_or_else(|e| e.into_inner());
            open[rng.random_range(0..open.len())]
        };
        let message = state.waiting.pop_front().expect("not empty");
        // Every attempt is a delivery DingTalk counts (as for HTTP push, the stricter reading).
        let allowed = shared
            .world()
            .quota
            .take_delivery(&message.event_type, Utc::now());
        if !allowed {
            shared.world().quota.count_undelivered(Utc::now());
            state.report.over_allowance += 1;
            continue;
        }
        state.next_message += 1;
        let message_id = format!("{}{:08x}", shared.stream.random_hex(8), state.next_message);
        let frame = json!({
            "specVersion": "1.0",
            "type": "EVENT",
            "headers": {
                "appId": shared.config.app_key,
                "connectionId": conn_id.to_string(),
                "contentType": "application/json",
                "messageId": message_id,
                "time": Utc::now().timestamp_millis().to_string(),
                "topic": "*",
                "eventType": message.event_type,
                "eventId": message.event_id,
                "eventBornTime": message.born_ms.to_string(),
                "eventCorpId": message.corp_id,
                "eventUnifiedAppId": shared.config.app_key,
            },
            "data": message.data,
        })
        .to_string();
        let step =
            REDELIVER_AFTER_SECS[(message.attempt as usize).min(REDELIVER_AFTER_SECS.len() - 1)];
        let due = Instant::now() + shared.scaled(step);
        let conn = state.conns.get_mut(&conn_id).expect("listed");
        conn.unacked += 1;
        let _ = conn.tx.send(Out::Frame(frame));
        state.report.deliveries += 1;
        state.pending.insert(
            message_id,
            Pending {
                message,
                conn: conn_id,
                due,
                sent_at: Instant::now(),
            },
        );
    }
}

/// The ticket of an upgrade request's query (`?ticket=<url-encoded>`).
fn ticket_of(request: &Request) -> Option<String> {
    let query = request.uri().query()?;
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name == "ticket").then(|| percent_decode(value))
    })
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match bytes[i] {
            b'%' if i + 2 < bytes.len() => hex(bytes[i + 1]).zip(hex(bytes[i + 2])),
            _ => None,
        };
        match (decoded, bytes[i]) {
            (Some((hi, lo)), _) => {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One WebSocket connection: the ticket checked at the upgrade, then frames out (messages,
/// pings) and acks in, until it closes or a fault ends it.
async fn serve_connection(shared: Arc<Shared>, tcp: TcpStream) {
    let gateway = &shared.stream;
    let mut events = false;
    // The signature is tungstenite's (its error type is a whole HTTP response).
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, response: WsResponse| -> Result<WsResponse, ErrorResponse> {
        let ticket = ticket_of(request);
        let mut state = gateway.state();
        let valid = ticket
            .as_ref()
            .and_then(|t| state.tickets.remove(t))
            .is_some_and(|expires_at| Instant::now() < expires_at);
        if !valid {
            state.report.tickets_refused += 1;
            let mut refused = ErrorResponse::new(Some("invalid or expired ticket".into()));
            *refused.status_mut() = StatusCode::UNAUTHORIZED;
            return Err(refused);
        }
        events = ticket.is_some_and(|t| t.ends_with("-e"));
        Ok(response)
    };
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_CLIENT_FRAME))
        .max_frame_size(Some(MAX_CLIENT_FRAME));
    let upgrade = tokio_tungstenite::accept_hdr_async_with_config(tcp, check, Some(config));
    let ws = match tokio::time::timeout(Duration::from_secs(10), upgrade).await {
        Ok(Ok(ws)) => ws,
        _ => return,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = {
        let mut state = gateway.state();
        state.next_conn += 1;
        let id = state.next_conn;
        state.conns.insert(
            id,
            Conn {
                tx,
                accepting: true,
                events,
                unacked: 0,
                close_at: None,
            },
        );
        state.report.connections_opened += 1;
        id
    };
    tracing::debug!(connection = id, "emulator stream: connection open");
    pump(&shared);
    let (mut sink, mut stream) = ws.split();
    let mut ping = tokio::time::interval(shared.scaled(PING_EVERY_SECS).max(TICK));
    ping.tick().await;
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => {
                let _ = sink.close().await;
                break;
            }
            out = rx.recv() => match out {
                Some(Out::Frame(text)) => {
                    if sink.send(WsMessage::text(text)).await.is_err() {
                        break;
                    }
                }
                Some(Out::Close) => {
                    let _ = sink.close().await;
                    break;
                }
                // Dropping the socket closes TCP without a WebSocket close frame.
                Some(Out::Drop) | None => break,
                Some(Out::Silence) => {
                    silent(&shared, id, &mut rx).await;
                    break;
                }
            },
            _ = ping.tick() => {
                let message_id = format!("ping-{}", gateway.random_hex(8));
                let data = json!({"opaque": gateway.random_hex(16)});
                let frame = json!({
                    "specVersion": "1.0",
                    "type": "SYSTEM",
                    "headers": {"contentType": "application/json", "messageId": message_id,
                        "time": Utc::now().timestamp_millis().to_string(), "topic": "ping"},
                    "data": data.to_string(),
                }).to_string();
                {
                    let mut state = gateway.state();
                    state.pings.insert(message_id, data);
                    state.report.pings_sent += 1;
                }
                if sink.send(WsMessage::text(frame)).await.is_err() {
                    break;
                }
            }
            frame = stream.next() => match frame {
                Some(Ok(WsMessage::Text(text))) => on_ack(&shared, id, text.as_str()).await,
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
                // Pings are answered by the library on the next read or write.
                Some(Ok(_)) => {}
            },
        }
    }
    gateway.state().conns.remove(&id);
    tracing::debug!(connection = id, "emulator stream: connection closed");
    // Its messages in flight stay pending: redelivered when their step is up.
}

/// The silent fault: the connection stays open, but nothing is sent or read (so WebSocket pings
/// go unanswered too). Messages still go to it and are lost there, as on a socket that died
/// without closing, until the gateway's own keep-alive gives up on it: after one ping interval
/// it gets no new messages and its TCP connection is dropped (how soon DingTalk notices a dead
/// client is not documented).
async fn silent(shared: &Shared, id: u64, rx: &mut mpsc::UnboundedReceiver<Out>) {
    let noticed = tokio::time::sleep(shared.scaled(PING_EVERY_SECS));
    tokio::pin!(noticed);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = &mut noticed => {
                if let Some(conn) = shared.stream.state().conns.get_mut(&id) {
                    conn.accepting = false;
                }
                return;
            }
            out = rx.recv() => match out {
                Some(Out::Drop) | Some(Out::Close) | None => return,
                Some(_) => {}
            },
        }
    }
}

/// An ack (or anything else the client sent as text).
async fn on_ack(shared: &Arc<Shared>, connection: u64, text: &str) {
    let gateway = &shared.stream;
    let Ok(ack) = serde_json::from_str::<Value>(text) else {
        gateway.state().report.unreadable_frames += 1;
        return;
    };
    let message_id = ack["headers"]["messageId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let code = ack["code"].as_i64().unwrap_or(0);
    let data: Option<Value> = ack["data"]
        .as_str()
        .and_then(|d| serde_json::from_str(d).ok());
    let status = data
        .as_ref()
        .and_then(|d| d["status"].as_str())
        .unwrap_or_default()
        .to_string();
    let (record, hook) = {
        let mut state = gateway.state();
        if let Some(expected) = state.pings.remove(&message_id) {
            if code == 200 && data.as_ref() == Some(&expected) {
                state.report.pings_answered += 1;
            } else {
                state.report.pings_answered_wrong += 1;
            }
            return;
        }
        let Some(pending) = state.pending.get(&message_id) else {
            state.report.stray_acks += 1;
            return;
        };
        let consumed = code == 200 && status != "LATER";
        let record = AckRecord {
            message_id: message_id.clone(),
            event_id: pending.message.event_id.clone(),
            event_type: pending.message.event_type.clone(),
            connection,
            code,
            status,
            attempt: pending.message.attempt,
            consumed,
            after_us: pending.sent_at.elapsed().as_micros() as u64,
        };
        (record, state.ack_hook.clone())
    };
    if let Some(hook) = hook {
        let (done, wait) = oneshot::channel();
        if hook.send((record.clone(), done)).is_ok() {
            let _ = wait.await;
        }
    }
    {
        let mut state = gateway.state();
        let state = &mut *state;
        let Some(pending) = state.pending.remove(&message_id) else {
            return;
        };
        if let Some(conn) = state.conns.get_mut(&pending.conn) {
            conn.unacked = conn.unacked.saturating_sub(1);
        }
        if !record.consumed {
            let step = REDELIVER_AFTER_SECS
                [(pending.message.attempt as usize).min(REDELIVER_AFTER_SECS.len() - 1)];
            let at = Instant::now() + shared.scaled(step);
            let mut message = pending.message;
            message.attempt += 1;
            if message.attempt as usize > REDELIVER_AFTER_SECS.len() {
                give_up(state, &message);
            } else {
                state.report.redeliveries += 1;
                state.later.push((at, message));
            }
        }
        state.acks.push(record);
    }
    pump(shared);
}

/// Sends `disconnect` on the chosen connections (`None`: all): no new messages there, closed
/// 10 s (× `time_scale`) later. How many were told.
pub(crate) fn disconnect(shared: &Shared, connection: Option<u64>) -> usize {
    let gateway = &shared.stream;
    let close_at = Instant::now() + shared.scaled(CLOSE_AFTER_DISCONNECT_SECS);
    let mut state = gateway.state();
    let mut told = 0;
    for (id, conn) in state.conns.iter_mut() {
        if connection.is_some_and(|c| c != *id) || !conn.accepting {
            continue;
        }
        conn.accepting = false;
        conn.close_at = Some(close_at);
        let frame = json!({
            "specVersion": "1.0",
            "type": "SYSTEM",
            "headers": {"contentType": "application/json", "messageId": format!("disconnect-{id}"),
                "time": Utc::now().timestamp_millis().to_string(), "topic": "disconnect"},
            "data": json!({"reason": "the gateway is restarting"}).to_string(),
        })
        .to_string();
        if conn.tx.send(Out::Frame(frame)).is_ok() {
            told += 1;
        }
    }
    told
}

/// Closes the chosen connections' TCP without a close frame.
pub(crate) fn drop_connections(shared: &Shared, connection: Option<u64>) -> usize {
    shared.stream.tell(connection, || Out::Drop)
}

/// Makes the chosen connections go silent (open, but nothing sent or read).
pub(crate) fn silence(shared: &Shared, connection: Option<u64>) -> usize {
    shared.stream.tell(connection, || Out::Silence)
}

/// Sends `text` as it is on one open connection (malformed frames, unknown types).
pub(crate) fn send_raw(shared: &Shared, text: String) -> bool {
    let state = shared.stream.state();
    state
        .conns
        .values()
        .find(|c| c.accepting)
        .is_some_and(|c| c.tx.send(Out::Frame(text)).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_is_read_from_the_url_encoded_query() {
        let request = Request::builder()
            .uri("/connect?x=1&ticket=ab%2Bc%3D-e")
            .body(())
            .unwrap();
        assert_eq!(ticket_of(&request).as_deref(), Some("ab+c=-e"));
        let none = Request::builder().uri("/connect").body(()).unwrap();
        assert_eq!(ticket_of(&none), None);
    }
}
