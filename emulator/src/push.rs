//! DingTalk's side of the HTTP callback exchange: the `check_url` handshake of register/update
//! and the push of every event to the registered URL, with DingTalk's retry ladder and its
//! failed-push list.
//!
//! A push (docs/dingtalk.md §4.7, §6): encrypt and sign the flat event JSON with the registered token and
//! AES key for the **CorpId** (register_call_back is enterprise-level, docs/dingtalk.md §4.5), POST it with
//! query `signature`, 13-digit ms `timestamp`, 8-char `nonce` and body `{"encrypt"}`, and accept
//! only HTTP 200 with a reply whose `msg_signature` verifies and whose `encrypt` opens to
//! `success` for the same token, key and CorpId, within 1500 ms. Anything else fails the attempt:
//! retry after 10 s, then after 30 s (× `time_scale`), then park the event in the failed list.
//! Every event is delivered by its own task, so deliveries of different events run concurrently
//! and may overtake each other (no ordering guarantee, docs/dingtalk.md §6).
//!
//! Every attempt counts against the monthly deliveries allowance (`quota`); past it the attempt
//! is not made and the event is dropped for good: no retry, nothing in the failed list.
//!
//! Owns: sealing, posting, checking replies, the retry ladder, push faults. Does not own: what
//! events say (`model`), the failed list's storage (`state`), the allowance's counters (`quota`).

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use chrono::Utc;
use rand::Rng;
use serde::Deserialize;

use super::{
    faults::probability,
    model::Event,
    state::{PushOutcome, PushRecord, Registration, Shared},
};
use dingsync_crypto::{self as crypto, CallbackCrypto};

/// DingTalk's answer deadline, real time whatever `time_scale` says (docs/dingtalk.md §4.7).
pub const DEADLINE: Duration = Duration::from_millis(1_500);
/// Retry ladder in DingTalk seconds: after the first failure 10 s, after the second 30 s (docs/dingtalk.md §6).
const RETRY_AFTER_SECS: [f64; 2] = [10.0, 30.0];
/// Default upper bound of the reorder delay.
const REORDER_MAX_DEFAULT_MS: u64 = 500;

/// The reply DingTalk requires, field names exact, every field a string (docs/dingtalk.md §4.7). Anything
/// that does not deserialize into this (a number `timeStamp`, a plain `success`) is a failure.
#[derive(Deserialize)]
struct Reply {
    msg_signature: String,
    #[serde(rename = "timeStamp")]
    time_stamp: String,
    nonce: String,
    encrypt: String,
}

/// Builds the client used for pushes and `check_url`.
pub(crate) fn http_client() -> anyhow::Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(reqwest::Client::builder()
        .timeout(DEADLINE)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

/// Encrypts `message` for `owner_key`, posts it to `url` and checks the reply. `Err` carries a
/// short reason (never secrets or payloads).
pub(crate) async fn post_sealed(
    http: &reqwest::Client,
    url: &str,
    crypto: &CallbackCrypto,
    owner_key: &str,
    message: &str,
) -> Result<(), String> {
    // 13-digit ms timestamp and 8-char nonce, as DingTalk sends in practice (docs/dingtalk.md §4.7).
    let timestamp = Utc::now().timestamp_millis().to_string();
    let nonce = crypto::random_nonce(8);
    let sealed = crypto.seal(message, owner_key, &timestamp, &nonce);
    let response = http
        .post(url)
        .query(&[
            ("signature", sealed.signature.as_str()),
            ("timestamp", timestamp.as_str()),
            ("nonce", nonce.as_str()),
        ])
        .json(&serde_json::json!({ "encrypt": sealed.encrypt }))
        .send()
        .await
        .map_err(|e| describe(&e))?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| describe(&e))?;
    if status != reqwest::StatusCode::OK {
        return Err(format!("HTTP {}", status.as_u16()));
    }
    let reply: Reply = serde_json::from_slice(&body).map_err(|_| {
        "reply is not {msg_signature, timeStamp, nonce, encrypt} strings".to_string()
    })?;
    let opened = crypto
        .open(
            &reply.time_stamp,
            &reply.nonce,
            &reply.encrypt,
            &reply.msg_signature,
            &[owner_key],
        )
        .map_err(|e| format!("reply does not open: {}", e.kind()))?;
    if opened.message != "success" {
        return Err("reply does not say success".into());
    }
    Ok(())
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        format!("no answer within {} ms", DEADLINE.as_millis())
    } else if e.is_connect() {
        "connection failed".into()
    } else {
        "request failed".into()
    }
}

/// The `check_url` handshake (docs/dingtalk.md §3, §5.1): an encrypted `{"EventType":"check_url"}` to the
/// URL being registered, with the token and key being registered; it must answer `success`.
pub(crate) async fn check_url(shared: &Shared, registration: &Registration) -> Result<(), String> {
    let crypto = CallbackCrypto::new(&registration.token, &registration.aes_key)
        .map_err(|e| e.to_string())?;
    post_sealed(
        &shared.push_http,
        &registration.url,
        &crypto,
        &shared.config.corp_id,
        r#"{"EventType":"check_url"}"#,
    )
    .await
}

/// One delivery: an event, or one copy of a duplicated event.
struct Push {
    id: u64,
    event: Event,
    kind: String,
    process_instance_id: String,
}

/// Counts a delivery as in flight for as long as it lives.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: &Arc<Shared>) -> InFlight {
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Starts the deliveries of `events` in the background (in order; they may still arrive in any
/// order). Push faults that concern the event as a whole are decided here.
pub(crate) fn dispatch(shared: &Arc<Shared>, events: Vec<Event>) {
    if shared.shutdown.is_cancelled() {
        return;
    }
    // The console's choice (docs/dingtalk.md §8): over Stream instead, or both while switching.
    let delivery = shared.stream.delivery();
    if delivery.uses_stream() {
        super::stream::dispatch(shared, events.clone());
    }
    if !delivery.uses_http() {
        return;
    }
    for event in events {
        let mut deliveries = Vec::new();
        {
            let mut world = shared.world();
            let world = &mut *world;
            world.push_seq += 1;
            let id = world.push_seq;
            let kind = event.payload["type"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let pid = event.payload["processInstanceId"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let record = |push_id, outcome| PushRecord {
                push_id,
                tag: event.tag,
                kind: kind.clone(),
                process_instance_id: pid.clone(),
                attempt: None,
                at_ms: Utc::now().timestamp_millis(),
                at: Instant::now(),
                outcome,
            };
            // Subscriptions are checked when the event happens: nothing registered for this tag,
            // nothing to push and nothing for the failed list.
            let subscribed = world
                .callback
                .as_ref()
                .is_some_and(|r| r.call_back_tag.iter().any(|t| t == event.tag));
            if !subscribed {
                world.log_push(record(id, PushOutcome::NotSubscribed));
                continue;
            }
            let faults = world.faults.push.clone();
            let rng = &mut world.fault_rng;
            if rng.random_bool(probability(faults.drop_forever_rate)) {
                world.log_push(record(id, PushOutcome::LostForever));
                continue;
            }
            // The allowance is already used up: not even a first attempt is made. (It is checked
            // again before every attempt, where it may run out halfway down the ladder.)
            if world.quota.deliveries_exhausted(Utc::now()) {
                world.quota.count_undelivered(Utc::now());
                world.log_push(record(id, PushOutcome::OverAllowance));
                continue;
            }
            if shared.config.keep_events {
                world
                    .events_pushed
                    .push(serde_json::Value::Object(event.payload.clone()));
            }
            let rng = &mut world.fault_rng;
            let copies = if rng.random_bool(probability(faults.duplicate_rate)) {
                2
            } else {
                1
            };
            for copy in 0..copies {
                let delay = if rng.random_bool(probability(faults.reorder_rate)) {
                    let max = match faults.reorder_max_ms {
                        0 => REORDER_MAX_DEFAULT_MS,
                        n => n,
                    };
                    Duration::from_millis(rng.random_range(1..=max))
                } else {
                    Duration::ZERO
                };
                let push_id = if copy == 0 {
                    id
                } else {
                    world.push_seq += 1;
                    world.push_seq
                };
                deliveries.push((
                    Push {
                        id: push_id,
                        event: event.clone(),
                        kind: kind.clone(),
                        process_instance_id: pid.clone(),
                    },
                    delay,
                ));
            }
        }
        for (push, delay) in deliveries {
            let guard = InFlight::new(shared);
            tokio::spawn(deliver(shared.clone(), push, delay, guard));
        }
    }
}

/// Sleeps unless the emulator stops first; false when it stopped.
async fn pause(shared: &Shared, wait: Duration) -> bool {
    if wait.is_zero() {
        return !shared.shutdown.is_cancelled();
    }
    tokio::select! {
        () = shared.shutdown.cancelled() => false,
        () = tokio::time::sleep(wait) => true,
    }
}

async fn deliver(shared: Arc<Shared>, push: Push, first_delay: Duration, _guard: InFlight) {
    let mut wait = first_delay;
    for attempt in 0..=RETRY_AFTER_SECS.len() {
        if !pause(&shared, wait).await {
            return;
        }
        let outcome = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            outcome = attempt_once(&shared, &push) => outcome,
        };
        if outcome == PushOutcome::OverAllowance {
            let mut world = shared.world();
            world.quota.count_undelivered(Utc::now());
            world.log_push(PushRecord {
                push_id: push.id,
                tag: push.event.tag,
                kind: push.kind.clone(),
                process_instance_id: push.process_instance_id.clone(),
                attempt: None,
                at_ms: Utc::now().timestamp_millis(),
                at: Instant::now(),
                outcome,
            });
            tracing::debug!(
                push_id = push.id,
                attempt,
                "emulator: monthly deliveries allowance used up; event dropped"
            );
            return;
        }
        let delivered = outcome == PushOutcome::Delivered;
        if let PushOutcome::Failed { reason } = &outcome {
            tracing::debug!(push_id = push.id, attempt, reason = %reason, "emulator: push failed");
        }
        shared.world().log_push(PushRecord {
            push_id: push.id,
            tag: push.event.tag,
            kind: push.kind.clone(),
            process_instance_id: push.process_instance_id.clone(),
            attempt: Some(attempt as u32),
            at_ms: Utc::now().timestamp_millis(),
            at: Instant::now(),
            outcome,
        });
        if delivered {
            return;
        }
        if let Some(secs) = RETRY_AFTER_SECS.get(attempt) {
            wait = shared.scaled(*secs);
        }
    }
    let mut world = shared.world();
    world.park(
        &push.event,
        &shared.config.corp_id,
        Instant::now(),
        shared.config.time_scale,
    );
    world.log_push(PushRecord {
        push_id: push.id,
        tag: push.event.tag,
        kind: push.kind.clone(),
        process_instance_id: push.process_instance_id.clone(),
        attempt: None,
        at_ms: Utc::now().timestamp_millis(),
        at: Instant::now(),
        outcome: PushOutcome::Parked,
    });
    tracing::info!(
        push_id = push.id,
        tag = push.event.tag,
        "emulator: push failed three times; parked in the failed list"
    );
}

async fn attempt_once(shared: &Shared, push: &Push) -> PushOutcome {
    let (registration, dropped, reply_lost, allowed) = {
        let mut world = shared.world();
        let world = &mut *world;
        let faults = &world.faults.push;
        let dropped = world.fault_rng.random_bool(probability(faults.drop_rate));
        let reply_lost = world
            .fault_rng
            .random_bool(probability(faults.lose_reply_rate));
        // Every attempt DingTalk makes is a delivery, a lost one included; without a
        // registration no request is made, so nothing is counted. Whether DingTalk counts per
        // event or per attempt is not documented [UNCONFIRMED]: per attempt uses the allowance
        // up sooner, the stricter reading.
        let allowed =
            world.callback.is_none() || world.quota.take_delivery(push.event.tag, Utc::now());
        (world.callback.clone(), dropped, reply_lost, allowed)
    };
    if !allowed {
        return PushOutcome::OverAllowance;
    }
    // Each attempt goes to the registration of that moment (an update moves later retries).
    let Some(registration) = registration else {
        return PushOutcome::Failed {
            reason: "no callback registered".into(),
        };
    };
    if dropped {
        return PushOutcome::Dropped;
    }
    let crypto = match CallbackCrypto::new(&registration.token, &registration.aes_key) {
        Ok(c) => c,
        Err(e) => {
            return PushOutcome::Failed {
                reason: e.to_string(),
            };
        }
    };
    let message = serde_json::Value::Object(push.event.payload.clone()).to_string();
    match post_sealed(
        &shared.push_http,
        &registration.url,
        &crypto,
        &shared.config.corp_id,
        &message,
    )
    .await
    {
        Ok(()) if reply_lost => PushOutcome::ReplyLost,
        Ok(()) => PushOutcome::Delivered,
        Err(reason) => PushOutcome::Failed { reason },
    }
}
