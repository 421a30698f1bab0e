//! One connection slot: open a connection (a fresh ticket each time), serve it, replace it
//! when it ends, for as long as the daemon runs.
//!
//! Serving a connection: frames are read one after another, but each `EVENT` is handled by a task
//! of its own (at most [`IN_FLIGHT`] per connection, then reading waits), so that the events of a
//! busy connection share the group commit instead of waiting for each other's commits. A task
//! answers after `ingest::submit` has returned: the ack of an event leaves only after the commit
//! that holds it, `LATER` when it could not be stored now. Acks and pings go out through one
//! writer task.
//!
//! A connection ends, and is replaced, when: the gateway closes it (`closed`), it fails
//! (`error`), nothing arrives for `stream.silence_limit_ms` although it was pinged after a third
//! of that (`silent`: a zombie socket), or the gateway says `disconnect`. After a `disconnect`
//! the replacement is opened at once and the old connection keeps answering its events in
//! flight until the gateway closes it, or until the replacement is up and nothing is in flight:
//! no gap. Other replacements wait a backoff with jitter (0.5 s doubling to 30 s), reset once a
//! connection has stayed up for the silence limit.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::{
    sync::{Semaphore, mpsc, oneshot},
    time::Instant,
};
use tokio_tungstenite::tungstenite::{Message, protocol::WebSocketConfig};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    DepsWithStatus as Deps, Status,
    frame::{self, Answer, Frame},
};
use crate::{
    crypto::Fingerprint,
    dingtalk::gateway,
    event::{Event, Parsed},
    ingest::IngestError,
    metrics, store,
};

/// Events of one connection handled at once; beyond it reading waits (the gateway's own window
/// then holds the rest back).
const IN_FLIGHT: usize = 256;
/// First wait before a replacement; doubled after each quick failure up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The WebSocket handshake must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest frame accepted from the gateway. An event is a few kilobytes (docs/dingtalk.md §5).
const MAX_FRAME: usize = 1024 * 1024;
/// How long a connection being closed waits for its events in flight.
const DRAIN: Duration = Duration::from_secs(10);
/// A connection told to `disconnect` is kept at most this long (the gateway closes it ~10 s later).
const DISCONNECT_KEEP: Duration = Duration::from_secs(60);

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Closed,
    Error,
    Silent,
    Shutdown,
}

impl Ended {
    fn cause(self) -> &'static str {
        match self {
            Ended::Closed => "closed",
            Ended::Error => "error",
            Ended::Silent => "silent",
            Ended::Shutdown => "shutdown",
        }
    }
}

/// Runs slot `slot` until `shutdown`.
pub(super) async fn run_slot(deps: Arc<Deps>, slot: usize, shutdown: CancellationToken) {
    let mut backoff = BACKOFF_BASE;
    // Connections told to disconnect, still finishing their events.
    let draining = TaskTracker::new();
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        metrics::stream_connections("connecting", 1);
        let opened = open(&deps).await;
        metrics::stream_connections("connecting", -1);
        let ws = match opened {
            Ok(ws) => ws,
            Err(cause) => {
                metrics::stream_reconnect(cause);
                if !pause(&shutdown, jittered(backoff)).await {
                    break;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let up_at = Instant::now();
        deps.status.connection_up();
        metrics::stream_connections("up", 1);
        tracing::info!(slot, "Stream connection up");
        let (told, disconnect) = oneshot::channel();
        let replaced = Arc::new(AtomicBool::new(false));
        let mut serving = tokio::spawn(serve(
            deps.clone(),
            ws,
            told,
            replaced.clone(),
            shutdown.clone(),
        ));
        let ended = tokio::select! {
            ended = &mut serving => Some(ended.unwrap_or(Ended::Error)),
            Ok(()) = disconnect => None,
        };
        match ended {
            Some(ended) => {
                deps.status.connection_down();
                metrics::stream_connections("up", -1);
                if ended == Ended::Shutdown {
                    break;
                }
                tracing::info!(
                    slot,
                    cause = ended.cause(),
                    "Stream connection ended; replacing it"
                );
                metrics::stream_reconnect(ended.cause());
                if up_at.elapsed() >= deps.silence {
                    backoff = BACKOFF_BASE;
                }
                if !pause(&shutdown, jittered(backoff)).await {
                    break;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            None => {
                // The gateway asked for a new connection: open it now; the old one keeps
                // answering what it holds until the gateway closes it (no gap).
                tracing::info!(slot, "Stream disconnect: opening the replacement first");
                metrics::stream_reconnect("disconnect");
                metrics::stream_connections("up", -1);
                metrics::stream_connections("draining", 1);
                let status = deps.status.clone();
                draining.spawn(async move {
                    let _ = tokio::time::timeout(DISCONNECT_KEEP, serving).await;
                    status.connection_down();
                    metrics::stream_connections("draining", -1);
                });
                // Told once the replacement is up (or the slot stops): then an idle old
                // connection closes.
                let replaced_when_up = replaced;
                let status = deps.status.clone();
                let stop = shutdown.clone();
                draining.spawn(async move {
                    status.wait_for_another_up(&stop).await;
                    replaced_when_up.store(true, Ordering::Release);
                });
                backoff = BACKOFF_BASE;
            }
        }
    }
    draining.close();
    draining.wait().await;
}

/// Sleeps `wait` unless shutdown comes first; false then.
async fn pause(shutdown: &CancellationToken, wait: Duration) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(wait) => true,
    }
}

/// Between half and all of `base`: replicas and slots that failed together retry apart.
fn jittered(base: Duration) -> Duration {
    base.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// What [`probe`] found: the gateway's endpoint and the first frame's kind, if one came.
#[derive(Debug)]
pub struct Probed {
    pub endpoint: String,
    pub first_frame: Option<&'static str>,
}

/// Opens one connection with `gateway` and waits up to `wait` for a first frame (`dingsync
/// doctor`). `Err` says why not, and whether DingTalk refused the app's credentials.
pub async fn probe(gateway: &gateway::Gateway, wait: Duration) -> Result<Probed, (bool, String)> {
    let ticket = gateway
        .open()
        .await
        .map_err(|e| (gateway::is_bad_credentials(&e), e.to_string()))?;
    let url = ticket.connect_url().map_err(|e| (false, e.to_string()))?;
    let connect = tokio_tungstenite::connect_async(url.as_str());
    let (mut ws, _) = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => return Err((false, format!("WebSocket connect failed: {}", describe(&e)))),
        Err(_) => return Err((false, "WebSocket connect timed out".into())),
    };
    // A frame that arrives is not acknowledged: the gateway redelivers it to `serve`.
    let first_frame = match tokio::time::timeout(wait, ws.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => frame::read(text.as_str()).ok().map(|f| f.kind()),
        _ => None,
    };
    let _ = ws.close(None).await;
    Ok(Probed {
        endpoint: ticket.endpoint,
        first_frame,
    })
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A ticket, then the WebSocket. `Err` is the metrics cause.
async fn open(deps: &Deps) -> Result<Ws, &'static str> {
    let ticket = match deps.gateway.open().await {
        Ok(ticket) => ticket,
        Err(e) => {
            if gateway::is_bad_credentials(&e) {
                tracing::error!(error = %e, "DingTalk refused to open a Stream connection: dingtalk.app_key / app_secret are not this app's AppKey and AppSecret (developer console -> app -> credentials), or Stream mode is not available to the app");
            } else {
                tracing::warn!(error = %e, "could not open a Stream connection");
            }
            deps.status
                .failed(format!("opening a connection failed: {e}"));
            return Err("open_failed");
        }
    };
    let url = match ticket.connect_url() {
        Ok(url) => url,
        Err(e) => {
            tracing::warn!(error = %e, "unusable Stream endpoint");
            deps.status.failed(format!("unusable endpoint: {e}"));
            return Err("open_failed");
        }
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME));
    let connect = tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), false);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => {
            // Never the URL: it carries the ticket.
            let why = describe(&e);
            tracing::warn!(endpoint = %ticket.endpoint, reason = %why, "Stream WebSocket connect failed");
            deps.status
                .failed(format!("WebSocket connect failed: {why}"));
            Err("connect_failed")
        }
        Err(_) => {
            tracing::warn!(endpoint = %ticket.endpoint, "Stream WebSocket connect timed out");
            deps.status.failed("WebSocket connect timed out".into());
            Err("connect_failed")
        }
    }
}

fn describe(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Http(response) => format!(
            "HTTP {} at the upgrade (ticket refused?)",
            response.status()
        ),
        E::Io(e) => format!("I/O: {}", e.kind()),
        E::Tls(_) => "TLS handshake failed".into(),
        other => other.to_string(),
    }
}

/// What the writer sends.
enum Out {
    Text(String),
    Ping,
}

/// Serves one connection until it ends. `disconnect` is fired when the gateway says so; the
/// connection then goes on until it closes, or until `replaced` and nothing is in flight.
async fn serve(
    deps: Arc<Deps>,
    ws: Ws,
    disconnect: oneshot::Sender<()>,
    replaced: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> Ended {
    let (mut sink, mut stream) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(IN_FLIGHT * 2);
    let writer = tokio::spawn(async move {
        while let Some(out) = out_rx.recv().await {
            let message = match out {
                Out::Text(text) => Message::text(text),
                Out::Ping => Message::Ping(Vec::new().into()),
            };
            if sink.send(message).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let handlers = TaskTracker::new();
    let mut disconnect = Some(disconnect);
    let mut heard = Instant::now();
    let mut pinged = false;
    let ping_after = deps.silence / 3;
    let ended = loop {
        if disconnect.is_none()
            && replaced.load(Ordering::Acquire)
            && permits.available_permits() == IN_FLIGHT
        {
            break Ended::Closed;
        }
        let wake = if pinged {
            heard + deps.silence
        } else {
            heard + ping_after
        };
        let next = tokio::select! {
            () = shutdown.cancelled() => break Ended::Shutdown,
            () = tokio::time::sleep_until(wake) => {
                if pinged {
                    tracing::warn!(silent_ms = deps.silence.as_millis() as u64, "Stream connection silent past stream.silence_limit_ms; presumed dead");
                    break Ended::Silent;
                }
                pinged = true;
                if out_tx.send(Out::Ping).await.is_err() {
                    break Ended::Error;
                }
                continue;
            }
            // After a disconnect the loop also wakes to see whether it may close.
            () = tokio::time::sleep(Duration::from_millis(100)), if disconnect.is_none() => continue,
            next = stream.next() => next,
        };
        heard = Instant::now();
        pinged = false;
        let text = match next {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | None => break Ended::Closed,
            Some(Err(e)) => {
                tracing::debug!(reason = %describe(&e), "Stream connection failed");
                break Ended::Error;
            }
            // Pings are answered by the library; pongs and binary frames only show it is alive.
            Some(Ok(_)) => continue,
        };
        let arrived = std::time::Instant::now();
        let frame = match frame::read(text.as_str()) {
            Ok(frame) => frame,
            Err(bad) => {
                metrics::stream_frame("malformed");
                tracing::warn!(message_id = ?bad.message_id, reason = %bad.why, "unreadable Stream frame");
                if let Some(id) = bad.message_id {
                    let ack = frame::ack(&id, Answer::BadRequest);
                    metrics::stream_ack(Answer::BadRequest.label(), arrived.elapsed());
                    let _ = out_tx.send(Out::Text(ack)).await;
                }
                continue;
            }
        };
        metrics::stream_frame(frame.kind());
        match frame {
            Frame::Ping { message_id, data } => {
                let ack = frame::ack(&message_id, Answer::Pong(&data));
                let _ = out_tx.send(Out::Text(ack)).await;
            }
            Frame::Disconnect { .. } => {
                // No answer is expected (docs/dingtalk.md §8.4).
                if let Some(told) = disconnect.take() {
                    let _ = told.send(());
                }
            }
            Frame::System { message_id } => {
                tracing::debug!(%message_id, "unknown Stream system topic acknowledged");
                let _ = out_tx
                    .send(Out::Text(frame::ack(&message_id, Answer::Success)))
                    .await;
            }
            Frame::Callback { message_id } => {
                let _ = out_tx
                    .send(Out::Text(frame::ack(&message_id, Answer::NotFound)))
                    .await;
                metrics::stream_ack(Answer::NotFound.label(), arrived.elapsed());
            }
            Frame::Event {
                message_id,
                event_type,
                event_corp_id,
                data,
            } => {
                let permit = permits.clone().acquire_owned().await.expect("never closed");
                let (deps, out) = (deps.clone(), out_tx.clone());
                handlers.spawn(async move {
                    let answer = handle_event(
                        &deps,
                        text.as_str(),
                        event_type.as_deref(),
                        event_corp_id.as_deref(),
                        &data,
                    )
                    .await;
                    let ack = frame::ack(&message_id, answer);
                    let _ = out.send(Out::Text(ack)).await;
                    metrics::stream_ack(answer.label(), arrived.elapsed());
                    drop(permit);
                });
            }
        }
    };
    // What was taken is finished (committed and acknowledged, or answered LATER) before the
    // connection closes; the gateway redelivers whatever gets no ack.
    handlers.close();
    if tokio::time::timeout(DRAIN, handlers.wait()).await.is_err() {
        tracing::warn!("Stream events still in flight after 10 s; the gateway redelivers them");
    }
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    ended
}

/// One `EVENT`: read, checked against the organisations served, stored; the answer for its ack.
async fn handle_event(
    deps: &Deps,
    frame_text: &str,
    event_type: Option<&str>,
    event_corp_id: Option<&str>,
    data: &str,
) -> Answer<'static> {
    let now = chrono::Utc::now();
    let parsed = frame::event(
        frame_text,
        event_type,
        event_corp_id,
        data,
        &deps.corp_id,
        now,
    );
    let event = match parsed {
        Ok(Parsed::Handshake) => return Answer::Success,
        Ok(Parsed::Event(event)) => *event,
        Err(unreadable) => {
            tracing::warn!(event_type = ?event_type, reason = %unreadable, "Stream event refused as unreadable");
            deps.ledger
                .delivery(&deps.corp_id, event_type.unwrap_or("unknown"), false);
            return Answer::BadRequest;
        }
    };
    // An event naming an organisation not served here is kept raw under the app's own, never
    // written into the other's rows (as the failed-list drain does): the connection is the
    // app's, and an answer other than SUCCESS would only have it delivered again.
    let event = match deps.corps.serves(&event.corp_id).await {
        Ok(true) => event,
        Ok(false) => {
            let corp = Fingerprint::of(event.corp_id.as_bytes());
            tracing::warn!(%corp, "Stream event names an organisation not served here: stored raw under ours, not applied");
            Event {
                corp_id: deps.corp_id.clone(),
                ..event.raw_only()
            }
        }
        Err(e) if store::is_unavailable(&e) => return Answer::Later,
        Err(e) => {
            tracing::error!(error = %e, "reading dingsync.corps failed");
            return Answer::Error;
        }
    };
    let (corp_id, event_type) = (event.corp_id.clone(), event.event_type.clone());
    let submitted = deps.ingest.submit(event).await;
    deps.ledger
        .delivery(&corp_id, &event_type, submitted.is_ok());
    match submitted {
        Ok(_) => Answer::Success,
        // The database is down (the ingest's fast refusal answers at once) or we are stopping.
        Err(IngestError::Unavailable | IngestError::ShuttingDown) => Answer::Later,
        Err(IngestError::Failed) => Answer::Error,
    }
}

impl Status {
    /// Waits until more connections are up than the one being replaced.
    async fn wait_for_another_up(&self, stop: &CancellationToken) {
        // The old one still counts as up until it is dropped: "another" is two of this slot's.
        let start = self.up();
        loop {
            if self.up() > start || stop.is_cancelled() {
                return;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}
