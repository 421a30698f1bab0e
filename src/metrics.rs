//! Metrics and health: every `dingsync_*` series (names, labels, buckets, registration), the
//! `GET /metrics` page (Prometheus/OpenMetrics text) and the `GET /readyz` probe.
//!
//! Counters and histograms live in one process-wide registry and are fed by one-line hooks in
//! the callback handler, the outbox worker, the DingTalk client, the rate budget and the
//! scheduler. Database-derived series (outbox rows by state, sync lag) are read at scrape time
//! with two indexed queries; when the database does not answer they are left out and
//! `dingsync_database_up` is 0, so the page itself never fails. Labels are bounded sets (event
//! type, outcome class, endpoint path, errcode, job): never instance, row or user ids. Nothing
//! here reads or prints a secret or token.
//!
//! The two scrape-time reads are kept here rather than in `store` (against the usual rule): they
//! exist only for this page, and keeping them beside their series keeps the branch's hooks in
//! shared files to a line or two.

use std::{
    sync::{Arc, LazyLock, OnceLock},
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
};
use chrono::{DateTime, Utc};
use prometheus_client::{
    encoding::{EncodeLabelSet, text},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use sqlx::PgPool;

use crate::{dingtalk, error::AppError, ingest::Stored, store};

/// How long a scrape waits for the database before it reports it down.
const DB_SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event_type: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    endpoint: String,
    errcode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    job: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

struct Metrics {
    registry: Registry,
    events: Family<EventLabels, Counter>,
    ack_seconds: Histogram,
    outbox_creates: Family<OutcomeLabel, Counter>,
    outbox_create_seconds: Histogram,
    dingtalk_calls: Family<CallLabels, Counter>,
    budget_wait_seconds: Histogram,
    job_runs: Family<JobLabels, Counter>,
    job_seconds: Histograms<JobLabel>,
}

/// 1 ms … ~16 s: a callback ack must stay under DingTalk's 1.5 s.
fn fast_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// 10 ms … ~1.5 h: outbox creates and job runs.
fn slow_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 20))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut m = Metrics {
        registry: Registry::default(),
        events: Family::default(),
        ack_seconds: fast_buckets(),
        outbox_creates: Family::default(),
        outbox_create_seconds: slow_buckets(),
        dingtalk_calls: Family::default(),
        budget_wait_seconds: fast_buckets(),
        job_runs: Family::default(),
        job_seconds: Family::new_with_constructor(slow_buckets),
    };
    m.registry.register(
        "dingsync_events_received",
        "Callback pushes by event type and outcome (stored, duplicate, answered, refused_*, unavailable, failed)",
        m.events.clone(),
    );
    m.registry.register(
        "dingsync_callback_ack_seconds",
        "Time from receiving a callback push to answering it",
        m.ack_seconds.clone(),
    );
    m.registry.register(
        "dingsync_outbox_creates",
        "Outbox creates sent to DingTalk by outcome (created, rejected, not_sent, no_response)",
        m.outbox_creates.clone(),
    );
    m.registry.register(
        "dingsync_outbox_create_seconds",
        "Time from an outbox row's INSERT until DingTalk created its approval",
        m.outbox_create_seconds.clone(),
    );
    m.registry.register(
        "dingsync_dingtalk_calls",
        "DingTalk API exchanges by endpoint and errcode (0 success, http_<status>, transport)",
        m.dingtalk_calls.clone(),
    );
    m.registry.register(
        "dingsync_rate_budget_wait_seconds",
        "Time a DingTalk call waited for a slot of the shared rate budget",
        m.budget_wait_seconds.clone(),
    );
    m.registry.register(
        "dingsync_job_runs",
        "Scheduled job runs by job and outcome (ok, failed, cancelled)",
        m.job_runs.clone(),
    );
    m.registry.register(
        "dingsync_job_duration_seconds",
        "Duration of scheduled job runs",
        m.job_seconds.clone(),
    );
    m
});

/// Event types DingTalk documents; anything else is counted as `other` to bound the label.
fn event_type_label(event_type: &str) -> &'static str {
    match event_type {
        "bpms_instance_change" => "bpms_instance_change",
        "bpms_task_change" => "bpms_task_change",
        "check_url" => "check_url",
        _ => "other",
    }
}

/// What the callback handler learned about a push it answered with `success`; read by
/// [`track_callback`] from the response.
#[derive(Clone, Copy)]
struct Acked {
    event_type: &'static str,
    outcome: &'static str,
}

/// Marks a `success` reply with the event's type and whether it was new.
pub fn acked(mut response: Response, event_type: &str, stored: Option<Stored>) -> Response {
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

/// Why a push was refused, marked on the error reply (see `AppError::into_response`).
#[derive(Clone, Copy)]
pub struct Refused(&'static str);

pub fn refused(e: &AppError) -> Refused {
    Refused(match e {
        AppError::BadRequest(_) | AppError::Malformed(_) => "refused_malformed",
        AppError::BadSignature => "refused_signature",
        AppError::Undecryptable(crate::crypto::Error::ReceiverIdMismatch { .. }) => {
            "refused_owner_key"
        }
        AppError::Undecryptable(_) => "refused_decrypt",
        AppError::Unavailable => "unavailable",
        AppError::Internal => "failed",
    })
}

/// Middleware on `POST /dingtalk/callback`: counts each push by type and outcome and times the
/// answer.
pub async fn track_callback(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    let labels = match (
        response.extensions().get::<Acked>(),
        response.extensions().get::<Refused>(),
    ) {
        (Some(acked), _) => EventLabels {
            event_type: acked.event_type,
            outcome: acked.outcome,
        },
        (None, Some(Refused(outcome))) => EventLabels {
            event_type: "unknown",
            outcome,
        },
        // Refused before the handler ran (body over the limit, bad query).
        (None, None) if response.status() == StatusCode::PAYLOAD_TOO_LARGE => EventLabels {
            event_type: "unknown",
            outcome: "refused_too_large",
        },
        (None, None) => EventLabels {
            event_type: "unknown",
            outcome: "refused_malformed",
        },
    };
    METRICS.events.get_or_create(&labels).inc();
    METRICS.ack_seconds.observe(started.elapsed().as_secs_f64());
    response
}

/// One outbox create came back: `created` observes the row's INSERT-to-created latency.
pub fn outbox_create<E>(
    sent: &Result<Result<String, dingtalk::Error>, E>,
    inserted_at: DateTime<Utc>,
) {
    let outcome = match sent {
        Ok(Ok(_)) => {
            let age = (Utc::now() - inserted_at)
                .to_std()
                .unwrap_or(Duration::ZERO);
            METRICS.outbox_create_seconds.observe(age.as_secs_f64());
            "created"
        }
        Ok(Err(dingtalk::Error::Rejected { .. })) => "rejected",
        Ok(Err(
            dingtalk::Error::Transient(_)
            | dingtalk::Error::RateLimited { .. }
            | dingtalk::Error::InvalidToken { .. },
        )) => "not_sent",
        Ok(Err(dingtalk::Error::NoResponse(_) | dingtalk::Error::Protocol(_))) | Err(_) => {
            "no_response"
        }
    };
    METRICS
        .outbox_creates
        .get_or_create(&OutcomeLabel { outcome })
        .inc();
}

/// One HTTP exchange with DingTalk at `endpoint` (a fixed API path). `answer` is `None` when no
/// HTTP answer was read (transport failure); otherwise the status and body, whose `errcode` is
/// the label (`http_<status>` when the status is not 2xx or the body carries none).
pub fn dingtalk_call(endpoint: &str, answer: Option<(u16, &str)>) {
    #[derive(serde::Deserialize)]
    struct Errcode {
        errcode: Option<i64>,
    }
    let errcode = match answer {
        None => "transport".to_string(),
        Some((status, body)) if (200..300).contains(&status) => {
            match serde_json::from_str::<Errcode>(body) {
                Ok(Errcode {
                    errcode: Some(code),
                }) => code.to_string(),
                _ => format!("http_{status}"),
            }
        }
        Some((status, _)) => format!("http_{status}"),
    };
    METRICS
        .dingtalk_calls
        .get_or_create(&CallLabels {
            endpoint: endpoint.to_string(),
            errcode,
        })
        .inc();
}

/// A call got its rate-budget slot after `waited`.
pub fn budget_waited(waited: Duration) {
    METRICS.budget_wait_seconds.observe(waited.as_secs_f64());
}

/// A scheduled job run ended with `outcome` after `took`.
pub fn job_run(job: &'static str, outcome: &'static str, took: Duration) {
    METRICS
        .job_runs
        .get_or_create(&JobLabels { job, outcome })
        .inc();
    METRICS
        .job_seconds
        .get_or_create(&JobLabel { job })
        .observe(took.as_secs_f64());
}

/// What `/readyz` checks besides the database: the DingTalk client, once `App::start` has made
/// it (when `expected`, i.e. there are credentials or the embedded emulator).
#[derive(Clone)]
pub struct Health {
    pool: PgPool,
    expects_client: bool,
    client: Arc<OnceLock<dingtalk::Client>>,
}

impl Health {
    pub fn new(pool: PgPool, expects_client: bool) -> Health {
        Health {
            pool,
            expects_client,
            client: Arc::new(OnceLock::new()),
        }
    }

    /// The DingTalk client is up: `/readyz` now also requires it to hold a valid token.
    pub fn client_started(&self, client: &dingtalk::Client) {
        let _ = self.client.set(client.clone());
    }
}

/// `GET /metrics`, `GET /readyz`.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/readyz", get(readyz))
        .with_state(health)
}

async fn metrics_page(State(health): State<Health>) -> Response {
    let mut page = String::new();
    // Writing to a String cannot fail.
    let _ = text::encode_registry(&mut page, &METRICS.registry);
    let mut scraped = Registry::default();
    let database_up = Gauge::<i64>::default();
    match tokio::time::timeout(DB_SCRAPE_TIMEOUT, read_database(&health.pool)).await {
        Ok(Ok((by_state, lag))) => {
            database_up.set(1);
            let rows = Family::<StateLabel, Gauge>::default();
            for (state, count) in by_state {
                rows.get_or_create(&StateLabel { state }).set(count);
            }
            scraped.register(
                "dingsync_outbox_rows",
                "Outbox rows still in progress by state (read at scrape time; finished rows are counted by dingsync_outbox_creates)",
                rows,
            );
            let sync_lag = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
            sync_lag.set(lag);
            scraped.register(
                "dingsync_sync_lag_seconds",
                "Age of the oldest approval change not yet fetched from DingTalk (0 when none)",
                sync_lag,
            );
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics: database series left out"),
        Err(_) => tracing::debug!("metrics: database too slow; its series left out"),
    }
    scraped.register(
        "dingsync_database_up",
        "1 when the database answered this scrape",
        database_up,
    );
    let _ = text::encode_registry(&mut page, &scraped);
    let _ = text::encode_eof(&mut page);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        page,
    )
        .into_response()
}

/// Outbox rows in progress by state (the due index covers exactly these states) and the age of
/// the oldest unfetched change (`detail_wanted_at` is indexed where not null).
async fn read_database(pool: &PgPool) -> sqlx::Result<(Vec<(&'static str, i64)>, f64)> {
    let counted: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state, count(*) FROM dingsync.outbox
         WHERE state IN ('pending', 'sending', 'unknown') GROUP BY state",
    )
    .fetch_all(pool)
    .await?;
    let by_state = ["pending", "sending", "unknown"]
        .into_iter()
        .map(|state| {
            let n = counted.iter().find(|(s, _)| s == state).map_or(0, |c| c.1);
            (state, n)
        })
        .collect();
    let lag: f64 = sqlx::query_scalar(
        "SELECT coalesce(extract(epoch FROM now() - min(detail_wanted_at))::float8, 0)
         FROM dingsync.approvals WHERE detail_wanted_at IS NOT NULL",
    )
    .fetch_one(pool)
    .await?;
    Ok((by_state, lag.max(0.0)))
}

/// Ready when the database answers, the newest embedded migration is applied, and (with a
/// DingTalk client) a valid access token is held: this process's cached one, else the one shared
/// in `dingsync.access_tokens`. Never calls DingTalk; the client keeps the token fresh.
async fn readyz(State(health): State<Health>) -> (StatusCode, String) {
    match not_ready(&health).await {
        None => (StatusCode::OK, "ready".into()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")),
    }
}

async fn not_ready(health: &Health) -> Option<String> {
    let db_error = |e: sqlx::Error| {
        let kind = if store::is_unavailable(&e) {
            "connection"
        } else {
            "query failed"
        };
        format!("database unreachable ({kind})")
    };
    let newest = store::newest_migration();
    match store::migration_applied(&health.pool, newest).await {
        Ok(true) => {}
        Ok(false) => return Some(format!("database migration V{newest} not applied")),
        Err(e) => return Some(db_error(e)),
    }
    if !health.expects_client {
        return None;
    }
    let Some(client) = health.client.get() else {
        return Some("DingTalk client not started yet".into());
    };
    let now = Utc::now();
    if client.tokens().cached_expiry().is_some_and(|at| at > now) {
        return None;
    }
    match client.tokens().stored_expiry().await {
        Ok(Some(expires_at)) if expires_at > now => None,
        Ok(_) => Some("no valid DingTalk access token".into()),
        Err(e) => Some(db_error(e)),
    }
}
