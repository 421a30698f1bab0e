//! The probes and the page an operator's tooling reads: `GET /readyz` (is this replica ready to
//! take callbacks) and `GET /metrics` (every series of `metrics`, plus the outbox and sync-lag
//! series read from the database at scrape time through `store::scrape`). Owns the handlers and
//! what "ready" means; the series themselves are `metrics`'.
//!
//! When the database does not answer a scrape within [`DB_SCRAPE_TIMEOUT`], its series are left
//! out and `dingsync_database_up` is 0, so the page itself never fails. Nothing here reads or
//! prints a secret or token.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use chrono::Utc;
use sqlx::PgPool;

use crate::{dingtalk, metrics, store};

/// How long a scrape waits for the database before it reports it down.
const DB_SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

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
    let scraped = match tokio::time::timeout(DB_SCRAPE_TIMEOUT, read_database(&health.pool)).await {
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
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::encode(scraped),
    )
        .into_response()
}

async fn read_database(pool: &PgPool) -> sqlx::Result<metrics::Scraped> {
    Ok(metrics::Scraped {
        outbox_rows: store::scrape::outbox_in_progress(pool).await?,
        sync_lag_seconds: store::scrape::sync_lag_seconds(pool).await?,
    })
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
