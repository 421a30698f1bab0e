//! The probes and the page an operator's tooling reads: `GET /readyz` (is this replica ready to
//! take callbacks) and `GET /metrics` (every series of `metrics`, plus the outbox and sync-lag
//! series read from the database through `store::scrape`, and the organisation's month against
//! its allowances, read from the `ledger` with its forecast). Owns the handlers, what "ready" means
//! and how often the database is read for them; the series themselves are `metrics`'.
//!
//! Both are answered from one reading of the database at most [`READING_MAX_AGE`] old: the first
//! probe after that takes a new reading while the others wait for it (never a second reading at
//! once), so however many probes arrive, unauthenticated as they are, the database answers at
//! most about one set of these queries a second and the callbacks' connections stay free. What
//! this process holds in memory (the DingTalk client, its token) is checked at every probe.
//!
//! When the database does not answer a scrape within [`DB_SCRAPE_TIMEOUT`], its series are left
//! out and `dingsync_database_up` is 0, so the page itself never fails. Nothing here reads or
//! prints a secret or token.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::{sync::Mutex, time::Instant};

use crate::{
    clock,
    dingtalk::{self, quota::Allowances},
    ledger::Ledger,
    metrics, store,
};

/// How long a scrape waits for the database before it reports it down.
const DB_SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// The oldest reading a probe is answered from.
pub const READING_MAX_AGE: Duration = Duration::from_secs(1);

/// What `/readyz` checks besides the database: the DingTalk client, once `App::start` has made
/// it (when `expected`, i.e. there are credentials or the embedded emulator); and the latest
/// reading of the database.
#[derive(Clone)]
pub struct Health {
    pool: PgPool,
    expects_client: bool,
    /// Every app's client (one per organisation), in the order configured.
    clients: Arc<OnceLock<Vec<dingtalk::Client>>>,
    /// Held while a reading is taken, so that probes arriving meanwhile wait for it.
    latest: Arc<Mutex<Option<Arc<Reading>>>>,
    readings: Arc<AtomicU64>,
    /// Each organisation's month in the ledger, for the allowance series: one per app, with the
    /// allowances in force (a reload changes them).
    ledger: Ledger,
    organisations: Arc<Vec<(String, std::sync::Mutex<Allowances>)>>,
    /// With Stream mode: why it is not ready (no connection up for too long), asked at every
    /// probe. A closure, so that `health` does not import the flow it reports on.
    stream: Arc<OnceLock<StreamCheck>>,
}

/// Why Stream mode is not ready, or `None` (`stream::Status::not_ready`).
pub type StreamCheck = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Until when one client's shared token is valid (`None`: none stored), or the kind of failure.
type StoredToken = Result<Option<DateTime<Utc>>, &'static str>;

/// What the database said, once, for every probe of the next [`READING_MAX_AGE`]. A failed
/// query is kept as the kind of failure `/readyz` reports (`connection`, `query failed`).
struct Reading {
    taken: Instant,
    /// Whether the newest embedded migration is applied.
    migration: Result<bool, &'static str>,
    /// Until when each client's access token shared in the database is valid (in the order of
    /// the clients); `None` when there was no DingTalk client to ask yet.
    stored_token: Option<Vec<StoredToken>>,
    /// The series `/metrics` reads from the database; `None` when it did not answer them.
    scraped: Option<metrics::Scraped>,
}

impl Health {
    pub fn new(
        pool: PgPool,
        expects_client: bool,
        ledger: Ledger,
        organisations: Vec<(String, Allowances)>,
    ) -> Health {
        Health {
            pool,
            expects_client,
            clients: Arc::new(OnceLock::new()),
            latest: Arc::new(Mutex::new(None)),
            readings: Arc::new(AtomicU64::new(0)),
            ledger,
            organisations: Arc::new(
                organisations
                    .into_iter()
                    .map(|(corp_id, a)| (corp_id, std::sync::Mutex::new(a)))
                    .collect(),
            ),
            stream: Arc::new(OnceLock::new()),
        }
    }

    /// Stream mode is on: `/readyz` also fails while `check` says why.
    pub fn watch_stream(&self, check: StreamCheck) {
        let _ = self.stream.set(check);
    }

    /// The allowances `/metrics` compares `corp_id`'s month with (a configuration reload).
    pub fn set_allowances(&self, corp_id: &str, allowances: Allowances) {
        for (corp, current) in self.organisations.iter() {
            if corp == corp_id {
                *current.lock().unwrap() = allowances;
            }
        }
    }

    /// The DingTalk clients are up (one per app): `/readyz` now also requires each to hold a
    /// valid token.
    pub fn clients_started(&self, clients: Vec<dingtalk::Client>) {
        let _ = self.clients.set(clients);
    }

    /// Readings of the database taken so far.
    pub fn readings(&self) -> u64 {
        self.readings.load(Ordering::Relaxed)
    }

    /// The latest reading when it is recent enough, else a new one (taken by this probe alone:
    /// the others wait on the lock and then find it).
    async fn reading(&self) -> Arc<Reading> {
        let mut latest = self.latest.lock().await;
        let clients = self.clients.get().map(Vec::as_slice);
        if let Some(reading) = latest.as_ref()
            && reading.taken.elapsed() < READING_MAX_AGE
            // A reading from before the clients started lacks the stored tokens.
            && (clients.is_none() || reading.stored_token.is_some())
        {
            return reading.clone();
        }
        let reading = Arc::new(self.read(clients).await);
        *latest = Some(reading.clone());
        reading
    }

    async fn read(&self, clients: Option<&[dingtalk::Client]>) -> Reading {
        self.readings.fetch_add(1, Ordering::Relaxed);
        let taken = Instant::now();
        let kind = |e: sqlx::Error| {
            if store::is_unavailable(&e) {
                "connection"
            } else {
                "query failed"
            }
        };
        let migration = store::migration_applied(&self.pool, store::newest_migration())
            .await
            .map_err(kind);
        // Unreachable: the other queries would only wait out the same timeouts.
        if migration == Err("connection") {
            return Reading {
                taken,
                migration,
                stored_token: clients.map(|c| c.iter().map(|_| Err("connection")).collect()),
                scraped: None,
            };
        }
        let stored_token = match clients {
            Some(clients) => {
                let mut expiries = Vec::with_capacity(clients.len());
                for client in clients {
                    expiries.push(client.tokens().stored_expiry().await.map_err(kind));
                }
                Some(expiries)
            }
            None => None,
        };
        let scraped = match tokio::time::timeout(DB_SCRAPE_TIMEOUT, self.read_database()).await {
            Ok(Ok(scraped)) => Some(scraped),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "metrics: database series left out");
                None
            }
            Err(_) => {
                tracing::debug!("metrics: database too slow; its series left out");
                None
            }
        };
        Reading {
            taken,
            migration,
            stored_token,
            scraped,
        }
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
    let reading = health.reading().await;
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::encode(reading.scraped.clone(), health.token_valid_for(&reading)),
    )
        .into_response()
}

impl Health {
    /// How long the access token held stays valid (this process's cached one, else the one
    /// shared in the database): `/readyz`'s rule, as a number. With several apps, the one whose
    /// token runs out first: the series is there to show a renewal failing, and one app's
    /// failing renewal must not hide behind another's fresh token. `None` without a DingTalk
    /// client.
    fn token_valid_for(&self, reading: &Reading) -> Option<std::time::Duration> {
        if !self.expects_client {
            return None;
        }
        let now = Utc::now();
        let Some(clients) = self.clients.get() else {
            return Some(std::time::Duration::ZERO);
        };
        let stored = reading.stored_token.as_deref().unwrap_or_default();
        clients
            .iter()
            .enumerate()
            .map(|(i, client)| {
                let cached = client.tokens().cached_expiry();
                let stored = stored
                    .get(i)
                    .and_then(|s| s.as_ref().ok().copied().flatten());
                cached
                    .max(stored)
                    .and_then(|at| (at - now).to_std().ok())
                    .unwrap_or_default()
            })
            .min()
    }

    async fn read_database(&self) -> sqlx::Result<metrics::Scraped> {
        let pool = &self.pool;
        Ok(metrics::Scraped {
            outbox_rows: store::scrape::outbox_in_progress(pool).await?,
            sync_lag_seconds: store::scrape::sync_lag_seconds(pool).await?,
            allowances: {
                let mut readings = Vec::with_capacity(self.organisations.len());
                for (corp_id, allowances) in self.organisations.iter() {
                    let allowances = *allowances.lock().unwrap();
                    readings.push(self.read_allowance(corp_id, allowances).await?);
                }
                readings
            },
        })
    }

    /// An organisation's month against its allowances, on the ledger's clock.
    async fn read_allowance(
        &self,
        corp_id: &str,
        allowances: Allowances,
    ) -> sqlx::Result<metrics::AllowanceReading> {
        let now = self.ledger.clock().now();
        let usage = self.ledger.month(corp_id, now).await?;
        let forecast = usage.forecast(now, allowances.calls, allowances.deliveries);
        let month = clock::month(now);
        let calls = i64::try_from(allowances.calls).unwrap_or(i64::MAX);
        // The gate's rule (`dingtalk::quota`): DingTalk's pause of this month under this setting,
        // or dingsync's share used.
        let paused = store::usage::pause(&self.pool, corp_id)
            .await?
            .is_some_and(|p| p.month == month && p.allowance == calls)
            || (calls > 0 && forecast.calls.so_far >= calls);
        let kind = |o: crate::ledger::Outlook| metrics::Allowance {
            used: o.so_far,
            limit: o.allowance,
            forecast: o.at_month_end,
        };
        Ok(metrics::AllowanceReading {
            corp_id: corp_id.to_string(),
            calls: kind(forecast.calls),
            deliveries: kind(forecast.deliveries),
            paused,
        })
    }
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

impl Health {
    /// Why this replica is not ready, as `/readyz` says it (`None`: ready).
    pub async fn not_ready(&self) -> Option<String> {
        not_ready(self).await
    }

    /// `corp_id`'s month against its allowances, from the latest reading (`None` when the
    /// database did not answer it, or no app here serves that organisation).
    pub async fn allowance(&self, corp_id: &str) -> Option<metrics::AllowanceReading> {
        let reading = self.reading().await;
        reading
            .scraped
            .as_ref()
            .and_then(|s| s.allowances.iter().find(|a| a.corp_id == corp_id).cloned())
    }
}

async fn not_ready(health: &Health) -> Option<String> {
    let db_error = |kind: &str| format!("database unreachable ({kind})");
    let reading = health.reading().await;
    match reading.migration {
        Ok(true) => {}
        Ok(false) => {
            let newest = store::newest_migration();
            return Some(format!("database migration V{newest} not applied"));
        }
        Err(kind) => return Some(db_error(kind)),
    }
    if let Some(why) = health.stream.get().and_then(|check| check()) {
        return Some(why);
    }
    if !health.expects_client {
        return None;
    }
    let Some(clients) = health.clients.get() else {
        return Some("DingTalk client not started yet".into());
    };
    let now = Utc::now();
    let several = clients.len() > 1;
    for (i, client) in clients.iter().enumerate() {
        if client.tokens().cached_expiry().is_some_and(|at| at > now) {
            continue;
        }
        let stored = reading.stored_token.as_ref().and_then(|t| t.get(i));
        let why = match stored {
            Some(Ok(Some(expires_at))) if *expires_at > now => continue,
            Some(Err(kind)) => db_error(kind),
            _ => "no valid DingTalk access token".into(),
        };
        // The organisation, not the app's name: `health` knows clients, not the registry.
        return Some(if several {
            format!("{why} (organisation {})", client.corp_id())
        } else {
            why
        });
    }
    None
}
