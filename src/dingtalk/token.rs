//! The access token, shared by every replica through `dingsync.access_tokens` (docs/dingtalk.md §1.1).
//! It comes from the configured family's token API (`gettoken`, or v1.0's
//! `/v1.0/oauth2/accessToken`, §1.2) and serves calls of both families (§11.1): one row per app,
//! whichever family fetched it.
//!
//! In a process, callers share a cached copy; when it must be fetched, one task fetches while the
//! others wait (a local mutex). Across processes one replica fetches while the others wait: it
//! claims a lease on the shared row in one statement, calls `gettoken` holding no connection and
//! no transaction, and stores the token (ending the lease) in another; the others poll the row
//! until the token appears or the lease expires, when one of them takes over (so a replica that
//! died mid-fetch delays the rest by one lease at most). A token is renewed when less than
//! [`RENEW_AHEAD`] of its life is left, so callers never hold one that is about to expire.
//! The app secret is only ever sent to DingTalk; it appears in no log or error.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::PgPool;
use tokio::{sync::Mutex, time::Instant};

use super::{Classified, Error, Purpose, classify, quota::Gate, v1};
use crate::{
    config::{ApiFamily, DingTalkConfig, Secret},
    ledger::Ledger,
    store,
};

/// Renew a token this long before DingTalk says it expires.
pub const RENEW_AHEAD: Duration = Duration::from_secs(10 * 60);

/// How much longer than the HTTP timeout a fetch lease lasts: time to store the token after
/// DingTalk's last possible answer, on a loaded machine. A lease only runs out when its replica
/// died or lost the database mid-fetch; then the others wait this much longer than they must.
const LEASE_MARGIN: Duration = Duration::from_secs(5);

/// First and longest pause between two looks at the shared row while another replica fetches.
/// gettoken usually answers within a few hundred milliseconds; each look is one key lookup.
const POLL_FIRST: Duration = Duration::from_millis(25);
const POLL_MAX: Duration = Duration::from_millis(200);

pub struct Tokens {
    pool: PgPool,
    http: reqwest::Client,
    /// The address of `family`'s token API.
    base: String,
    family: ApiFamily,
    corp_id: String,
    app_key: String,
    app_secret: Secret,
    /// How long a replica may fetch before another takes over: the HTTP timeout bounds the call.
    lease: Duration,
    cached: Mutex<Option<(String, DateTime<Utc>)>>,
    ledger: Ledger,
    gate: Arc<Gate>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    errmsg: String,
    access_token: Option<String>,
    expires_in: Option<i64>,
}

impl Tokens {
    pub(super) fn new(
        pool: PgPool,
        http: reqwest::Client,
        base: &str,
        config: &DingTalkConfig,
        ledger: Ledger,
        gate: Arc<Gate>,
    ) -> Tokens {
        Tokens {
            pool,
            http,
            base: base.to_string(),
            family: config.api_family,
            corp_id: config.corp_id.clone(),
            app_key: config.app_key.clone(),
            app_secret: config.app_secret.clone(),
            lease: Duration::from_millis(config.timeout_ms) + LEASE_MARGIN,
            cached: Mutex::new(None),
            ledger,
            gate,
        }
    }

    /// A token valid for at least [`RENEW_AHEAD`].
    pub async fn get(&self) -> Result<String, Error> {
        // Held while fetching: concurrent callers in this process wait for the one fetch.
        let mut cached = self.cached.lock().await;
        if let Some((token, expires_at)) = cached.as_ref()
            && fresh(*expires_at)
        {
            return Ok(token.clone());
        }
        match self.shared().await {
            Ok((token, expires_at)) => {
                *cached = Some((token.clone(), expires_at));
                Ok(token)
            }
            // Renewal failed but the token we hold still works for a while: use it, and try
            // again on the next call (a gettoken outage must not stop calls that can succeed).
            Err(e) => match cached.as_ref() {
                Some((token, expires_at)) if *expires_at > Utc::now() => {
                    tracing::warn!(error = %e, %expires_at, "renewing the DingTalk access token failed; using the current one until it expires");
                    Ok(token.clone())
                }
                _ => Err(e),
            },
        }
    }

    /// Asks DingTalk for a token with the configured credentials, whatever is cached or stored
    /// (for `dingsync doctor`: a token shared in the database says nothing about whether the
    /// configured secret is still right). While a token is valid, DingTalk answers with the same
    /// one (docs/dingtalk.md §1.1), so this changes nothing for running replicas.
    pub async fn check_credentials(&self) -> Result<(), Error> {
        self.fetch().await.map(|_| ())
    }

    /// The token this process holds, if it is fresh, without I/O; `None` while it is being
    /// fetched or when there is none.
    pub fn cached(&self) -> Option<String> {
        self.cached
            .try_lock()
            .ok()?
            .as_ref()
            .filter(|(_, expires_at)| fresh(*expires_at))
            .map(|(token, _)| token.clone())
    }

    /// Until when the token this process holds is valid; `None` when it holds none or is fetching
    /// one right now. No I/O (for `/readyz`).
    pub fn cached_expiry(&self) -> Option<DateTime<Utc>> {
        self.cached
            .try_lock()
            .ok()?
            .as_ref()
            .map(|(_, expires_at)| *expires_at)
    }

    /// Until when the token shared in the database is valid, without calling DingTalk (for
    /// `/readyz`); `None` when there is none.
    pub async fn stored_expiry(&self) -> sqlx::Result<Option<DateTime<Utc>>> {
        store::tokens::expiry(&self.pool, &self.corp_id, &self.app_key).await
    }

    /// DingTalk refused `token`: forget it here and in the database (unless another replica has
    /// already replaced it), so the next [`Tokens::get`] fetches a new one.
    pub async fn invalidate(&self, token: &str) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|(t, _)| t == token) {
            *cached = None;
        }
        let cleared = store::tokens::clear(&self.pool, &self.corp_id, &self.app_key, token).await;
        if let Err(e) = cleared {
            tracing::warn!(error = %e, "could not drop the refused access token");
        }
    }

    /// The token in the database if fresh, else one fetched by exactly one replica at a time.
    /// Holds a pool connection only for each short statement, never while DingTalk answers.
    async fn shared(&self) -> Result<(String, DateTime<Utc>), Error> {
        let db = |e: sqlx::Error| Error::Transient(format!("database: {e}"));
        // Long enough to wait out a dead replica's lease and then fetch ourselves.
        let deadline = Instant::now() + 2 * self.lease;
        let mut pause = POLL_FIRST;
        loop {
            let shared = store::tokens::read(&self.pool, &self.corp_id, &self.app_key)
                .await
                .map_err(db)?;
            let leased = shared.as_ref().is_some_and(|s| s.fetch_leased);
            if let Some((token, expires_at)) = shared.and_then(store::tokens::Shared::token) {
                // While another replica renews it, a token that still works is used, not waited
                // on; the next call looks again.
                if fresh(expires_at) || (leased && expires_at > Utc::now()) {
                    return Ok((token, expires_at));
                }
            }
            if !leased {
                let stale_at = Utc::now() + chrono::Duration::from_std(RENEW_AHEAD).expect("small");
                let claimed = store::tokens::claim_fetch(
                    &self.pool,
                    &self.corp_id,
                    &self.app_key,
                    stale_at,
                    self.lease,
                )
                .await
                .map_err(db)?;
                if let Some(lease_end) = claimed {
                    return self.fetch_and_share(lease_end).await;
                }
                // Another replica claimed the fetch or stored a token since we looked: it is
                // fetching (or done), so wait as for any lease held.
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Transient(format!(
                    "another replica is fetching the DingTalk access token and none appeared within {:?}",
                    2 * self.lease
                )));
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    /// With the fetch lease ending at `lease_end` held: asks DingTalk, then shares the token (or
    /// gives the lease back when the fetch failed, so that the next replica need not wait for it).
    async fn fetch_and_share(
        &self,
        lease_end: DateTime<Utc>,
    ) -> Result<(String, DateTime<Utc>), Error> {
        let (token, expires_at) = match self.fetch().await {
            Ok(fetched) => fetched,
            Err(e) => {
                let released =
                    store::tokens::release(&self.pool, &self.corp_id, &self.app_key, lease_end)
                        .await;
                if let Err(db) = released {
                    tracing::warn!(error = %db, "could not give back the access token lease; it expires by itself");
                }
                return Err(e);
            }
        };
        let saved =
            store::tokens::save(&self.pool, &self.corp_id, &self.app_key, &token, expires_at).await;
        match saved {
            Ok(()) => {
                tracing::info!(app_key = %self.app_key, %expires_at, "fetched a DingTalk access token");
            }
            // The token is valid whether or not the others can see it: use it. They fetch their
            // own when the lease expires (DingTalk answers with the same token, docs/dingtalk.md §1.1).
            Err(e) => {
                tracing::warn!(app_key = %self.app_key, error = %e, "fetched a DingTalk access token but could not share it");
            }
        }
        Ok((token, expires_at))
    }

    /// `GET /gettoken` (docs/dingtalk.md §1.1). Not retried here ([`super::Client`] retries a call whose
    /// token fetch failed transiently); an answer with a business errcode (bad credentials) is
    /// final. Busy, gateway and rate-limit answers are not: they say nothing about the credentials.
    async fn fetch(&self) -> Result<(String, DateTime<Utc>), Error> {
        if self.family == ApiFamily::V1 {
            return self.fetch_v1().await;
        }
        // Unmetered, so it passes, unless DingTalk has answered it with 90020 before.
        self.gate.check("/gettoken").await?;
        let started = Utc::now();
        let response = self
            .http
            .get(format!("{}/gettoken", self.base))
            .query(&[
                ("appkey", self.app_key.as_str()),
                ("appsecret", self.app_secret.expose()),
            ])
            .send()
            .await
            .inspect_err(|_| super::count_call("/gettoken", None))
            // without_url: the URL carries the app secret.
            .map_err(|e| Error::Transient(format!("gettoken: {}", e.without_url())))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .inspect_err(|_| super::count_call("/gettoken", None))
            .map_err(|e| Error::Transient(format!("gettoken: {}", e.without_url())))?;
        super::count_call("/gettoken", Some((status.as_u16(), &text)));
        // Not metered (docs/dingtalk.md §7), but counted: the ledger shows every call.
        self.ledger.call(
            &self.corp_id,
            "/gettoken",
            Purpose::Token,
            self.gate.is_metered("/gettoken"),
        );
        if status.as_u16() == 429 {
            return Err(Error::RateLimited { errcode: 429 });
        }
        if !status.is_success() {
            return Err(Error::Transient(format!("gettoken answered HTTP {status}")));
        }
        match classify(&text) {
            Ok(()) => {}
            Err(Classified::Rate(errcode)) => return Err(Error::RateLimited { errcode }),
            Err(Classified::Gateway(why)) => {
                return Err(Error::Transient(format!("gettoken: {why}")));
            }
            Err(Classified::Quota(why)) => {
                return Err(self.gate.exhausted("/gettoken", &why).await);
            }
            Err(Classified::Token(errcode))
            | Err(Classified::Rejected(Error::Rejected { errcode, .. })) => {
                let errmsg = serde_json::from_str::<TokenAnswer>(&text)
                    .map(|a| a.errmsg)
                    .unwrap_or_default();
                return Err(Error::Rejected {
                    errcode,
                    code: None,
                    errmsg: format!(
                        "gettoken: {errmsg} (check dingtalk.app_key and dingtalk.app_secret)"
                    ),
                });
            }
            Err(Classified::Rejected(e)) => return Err(e),
        }
        let answer: TokenAnswer = serde_json::from_str(&text)
            .map_err(|e| Error::Protocol(format!("gettoken answer: {e}")))?;
        let (Some(token), Some(expires_in)) = (answer.access_token, answer.expires_in) else {
            return Err(Error::Protocol(
                "gettoken answered without access_token/expires_in".into(),
            ));
        };
        // Checked: an absurd expires_in must not panic the daemon.
        let expires_at = chrono::TimeDelta::try_seconds(expires_in)
            .filter(|_| expires_in > 0)
            .and_then(|d| started.checked_add_signed(d))
            .ok_or_else(|| Error::Protocol(format!("gettoken answered expires_in {expires_in}")))?;
        Ok((token, expires_at))
    }
}

impl Tokens {
    /// `POST /v1.0/oauth2/accessToken` (docs/dingtalk.md §1.2), with the same rules as
    /// `gettoken`: not retried here, a business refusal (`invalidClientIdOrSecret`) is final,
    /// rate-limit, busy and gateway answers are not.
    async fn fetch_v1(&self) -> Result<(String, DateTime<Utc>), Error> {
        let path = v1::TOKEN_PATH;
        self.gate.check(path).await?;
        let started = Utc::now();
        let body = serde_json::json!({
            "appKey": self.app_key,
            "appSecret": self.app_secret.expose(),
        });
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .inspect_err(|_| super::count_call(path, None))
            .map_err(|e| Error::Transient(format!("accessToken: {}", e.without_url())))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .inspect_err(|_| super::count_call(path, None))
            .map_err(|e| Error::Transient(format!("accessToken: {}", e.without_url())))?;
        super::count_call(path, Some((status.as_u16(), &text)));
        // Not metered (docs/dingtalk.md §7), but counted: the ledger shows every call.
        self.ledger.call(
            &self.corp_id,
            path,
            Purpose::Token,
            self.gate.is_metered(path),
        );
        match v1::read_answer(status.as_u16(), &text) {
            Ok(()) => {}
            Err(Classified::Rate(errcode)) => return Err(Error::RateLimited { errcode }),
            Err(Classified::Gateway(why)) => {
                return Err(Error::Transient(format!("accessToken: {why}")));
            }
            Err(Classified::Quota(why)) => return Err(self.gate.exhausted(path, &why).await),
            // A token refusal here can only be about the credentials.
            Err(Classified::Token(errcode)) => {
                return Err(Error::Rejected {
                    errcode,
                    code: None,
                    errmsg: "accessToken refused (check dingtalk.app_key and dingtalk.app_secret)"
                        .into(),
                });
            }
            Err(Classified::Rejected(Error::Rejected {
                errcode,
                code,
                errmsg,
            })) => {
                return Err(Error::Rejected {
                    errcode,
                    code,
                    errmsg: format!(
                        "accessToken: {errmsg} (check dingtalk.app_key and dingtalk.app_secret)"
                    ),
                });
            }
            Err(Classified::Rejected(e)) => return Err(e),
        }
        let answer: v1::TokenAnswer = serde_json::from_str(&text)
            .map_err(|e| Error::Protocol(format!("accessToken answer: {e}")))?;
        let (Some(token), Some(expires_in)) = (answer.access_token, answer.expire_in) else {
            return Err(Error::Protocol(
                "accessToken answered without accessToken/expireIn".into(),
            ));
        };
        let expires_at = chrono::TimeDelta::try_seconds(expires_in)
            .filter(|_| expires_in > 0)
            .and_then(|d| started.checked_add_signed(d))
            .ok_or_else(|| {
                Error::Protocol(format!("accessToken answered expireIn {expires_in}"))
            })?;
        Ok((token, expires_at))
    }
}

fn fresh(expires_at: DateTime<Utc>) -> bool {
    expires_at - chrono::Duration::from_std(RENEW_AHEAD).expect("small") > Utc::now()
}
