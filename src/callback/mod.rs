//! `POST /dingtalk/callback/{app}` (and `POST /dingtalk/callback` while one app is served):
//! find the app's secrets → verify → decrypt → check the owner key → parse → check the event's
//! organisation is the app's (or, in the single-app form, served here) → store (group commit) → reply with the encrypted `success`. No
//! commit, no `success`: when anything fails DingTalk gets an error status and retries
//! (docs/dingtalk.md §4.7, §6).
//!
//! Owns the HTTP exchange only; what an event means (and what is refused as malformed) is
//! `event`, storing it is `ingest`, the organisations served are `store::corps`. How refusals
//! reach the log is `refusals`.

use std::{collections::HashMap, sync::Arc, time::Instant};

use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, Request, State},
    http::StatusCode,
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};

use crate::{
    crypto::{self, CallbackCrypto, Fingerprint},
    error::{AppError, Refused},
    event::{self, Parsed, Source},
    ingest::{Ingest, IngestError, Stored},
    ledger::Ledger,
    metrics,
    store::{self, corps::Served},
};

mod refusals;

/// The events dingsync subscribes to.
pub const TAGS: [&str; 2] = ["bpms_instance_change", "bpms_task_change"];

/// Every app's callback, by `apps[i].name`: the path names the app, and the app decides the
/// secrets a push must verify with and the organisation it is stored under.
pub struct Callbacks {
    apps: HashMap<String, Arc<CallbackState>>,
    /// What `POST /dingtalk/callback` (no name) serves: the one app, when there is one. With
    /// several, which organisation a push is for must come from its path, never from a guess.
    bare: Option<Arc<CallbackState>>,
}

impl Callbacks {
    pub fn new(apps: Vec<(String, CallbackState)>) -> Callbacks {
        let apps: HashMap<String, Arc<CallbackState>> = apps
            .into_iter()
            .map(|(name, state)| (name, Arc::new(state)))
            .collect();
        let bare = (apps.len() == 1)
            .then(|| apps.values().next().cloned())
            .flatten();
        Callbacks { apps, bare }
    }
}

/// `POST /dingtalk/callback/{app}`.
pub async fn handle_app(
    State(callbacks): State<Arc<Callbacks>>,
    Path(app): Path<String>,
    query: Query<PushQuery>,
    body: Bytes,
) -> Result<Response, AppError> {
    let state = callbacks.apps.get(&app).ok_or(AppError::UnknownApp)?;
    handle(State(state.clone()), query, body).await
}

/// `POST /dingtalk/callback`: the one app's.
pub async fn handle_bare(
    State(callbacks): State<Arc<Callbacks>>,
    query: Query<PushQuery>,
    body: Bytes,
) -> Result<Response, AppError> {
    let state = callbacks.bare.as_ref().ok_or(AppError::UnknownApp)?;
    handle(State(state.clone()), query, body).await
}

/// What the callback handler needs: one app's.
pub struct CallbackState {
    pub crypto: CallbackCrypto,
    pub owner_keys: Vec<String>,
    pub default_corp_id: String,
    /// The organisations whose events are stored here.
    pub corps: Served,
    pub ingest: Ingest,
    /// Counts every delivery against the deliveries allowance.
    pub ledger: Ledger,
}

/// Query of a push. Current docs say `signature`/`timestamp`, older ones `msg_signature`/`timeStamp`:
/// accept both (docs/dingtalk.md §4.7).
#[derive(Debug, Deserialize)]
pub struct PushQuery {
    signature: Option<String>,
    msg_signature: Option<String>,
    timestamp: Option<String>,
    #[serde(rename = "timeStamp")]
    time_stamp: Option<String>,
    nonce: Option<String>,
}

#[derive(Deserialize)]
struct PushBody {
    encrypt: String,
}

/// The reply DingTalk requires: these exact field names, all strings.
#[derive(Debug, Serialize, Deserialize)]
pub struct EncryptedReply {
    pub msg_signature: String,
    #[serde(rename = "timeStamp")]
    pub time_stamp: String,
    pub nonce: String,
    pub encrypt: String,
}

pub async fn handle(
    State(state): State<Arc<CallbackState>>,
    Query(query): Query<PushQuery>,
    body: Bytes,
) -> Result<Response, AppError> {
    let signature = query
        .signature
        .or(query.msg_signature)
        .ok_or(AppError::BadRequest("missing query parameter signature"))?;
    let timestamp = query
        .timestamp
        .or(query.time_stamp)
        .ok_or(AppError::BadRequest("missing query parameter timestamp"))?;
    let nonce = query
        .nonce
        .ok_or(AppError::BadRequest("missing query parameter nonce"))?;
    let body: PushBody = serde_json::from_slice(&body)
        .map_err(|_| AppError::BadRequest("body is not {\"encrypt\": \"...\"}"))?;

    // Refusals are logged (and counted) by `track`, from the error's reply.
    let accepted: Vec<&str> = state.owner_keys.iter().map(String::as_str).collect();
    let opened = state
        .crypto
        .open(&timestamp, &nonce, &body.encrypt, &signature, &accepted)?;

    match event::parse(&opened.message, Source::HttpPush, &state.default_corp_id) {
        Err(malformed) => Err(AppError::Malformed(malformed)),
        Ok(Parsed::Handshake) => {
            tracing::info!("answered DingTalk's URL check");
            Ok(acked(
                success(&state.crypto, &opened.receiver_id),
                "check_url",
                None,
            ))
        }
        Ok(Parsed::Event(event)) => {
            // A signed event for an organisation not served here is refused, not stored under
            // it: DingTalk retries it and then parks it in the failed list, whose drain keeps it
            // raw under our own organisation (`reconcile::failed`). Nothing is lost, nothing is
            // written into another organisation's rows, and the refusal shows in metrics and log.
            match state.corps.serves(&event.corp_id).await {
                Ok(true) => {}
                Ok(false) => {
                    let corp = Fingerprint::of(event.corp_id.as_bytes());
                    return Err(AppError::CorpNotServed(corp));
                }
                Err(e) if store::is_unavailable(&e) => return Err(AppError::Unavailable),
                Err(e) => {
                    tracing::error!(error = %e, "reading dingsync.corps failed");
                    return Err(AppError::Internal);
                }
            }
            let (event_type, pid) = (event.event_type.clone(), event.process_instance_id.clone());
            let corp_id = event.corp_id.clone();
            let submitted = state.ingest.submit(*event).await;
            state
                .ledger
                .delivery(&corp_id, &event_type, submitted.is_ok());
            match submitted {
                Ok(stored) => {
                    tracing::debug!(event_type, process_instance_id = ?pid, ?stored, "event committed");
                    Ok(acked(
                        success(&state.crypto, &opened.receiver_id),
                        &event_type,
                        Some(stored),
                    ))
                }
                Err(IngestError::Unavailable | IngestError::ShuttingDown) => {
                    Err(AppError::Unavailable)
                }
                Err(IngestError::Failed) => Err(AppError::Internal),
            }
        }
    }
}

/// The encrypted `success`, sealed for the owner key the push came with.
fn success(crypto: &CallbackCrypto, receiver_id: &str) -> Response {
    let time_stamp = chrono::Utc::now().timestamp_millis().to_string();
    let nonce = crypto::random_nonce(16);
    let sealed = crypto.seal("success", receiver_id, &time_stamp, &nonce);
    let reply = EncryptedReply {
        msg_signature: sealed.signature,
        time_stamp,
        nonce,
        encrypt: sealed.encrypt,
    };
    (StatusCode::OK, Json(reply)).into_response()
}

/// Event types DingTalk documents; anything else is counted as `other` to bound the label.
fn event_type_label(event_type: &str) -> &'static str {
    match event_type {
        "bpms_instance_change" => "bpms_instance_change",
        "bpms_task_change" => "bpms_task_change",
        "check_url" => "check_url",
        _ => "other",
    }
}

/// What the handler learned about a push it answered with `success`; read by [`track`] from the
/// response.
#[derive(Clone, Copy)]
struct Acked {
    event_type: &'static str,
    outcome: &'static str,
}

/// Marks a `success` reply with the event's type and whether it was new.
fn acked(mut response: Response, event_type: &str, stored: Option<Stored>) -> Response {
    let outcome = match stored {
        Some(Stored::New) => "stored",
        Some(Stored::Duplicate) => "duplicate",
        None => "answered",
    };
    response.extensions_mut().insert(Acked {
        event_type: event_type_label(event_type),
        outcome,
    });
    response
}

/// Middleware on `POST /dingtalk/callback`: counts each push by type and outcome, times the
/// answer, and hands refusals to the log's summaries (`refusals`).
pub async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    let (event_type, outcome) = match (
        response.extensions().get::<Acked>(),
        response.extensions().get::<Refused>(),
    ) {
        (Some(acked), _) => (acked.event_type, acked.outcome),
        (None, Some(refused)) => {
            // 503 and 500 are no refusals of the input: they are logged where they happen.
            if refused.outcome.starts_with("refused_") {
                refusals::record(refused.outcome, &refused.reason);
            }
            ("unknown", refused.outcome)
        }
        // Refused before the handler ran (body over the limit, bad query).
        (None, None) if response.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            refusals::record("refused_too_large", "body over server.body_limit_bytes");
            ("unknown", "refused_too_large")
        }
        (None, None) => {
            refusals::record(
                "refused_malformed",
                "request not understood before decrypting",
            );
            ("unknown", "refused_malformed")
        }
    };
    metrics::callback_answered(event_type, outcome, started.elapsed());
    response
}
