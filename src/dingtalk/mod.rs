//! DingTalk API client for both API families (the old oapi/topapi one, docs/dingtalk.md §1–§3, and
//! v1.0, §11): typed requests and responses, one shared access token (`token`), one shared request
//! budget (`budget`), and errors classified so that callers can act on them. Every outbound
//! feature talks to DingTalk through [`Client`].
//!
//! `dingtalk.api_family` picks the family of create, get and list ids; callers see the same
//! types and errors whichever it is (`v1` translates). Calls only v1.0 has (forecast, form
//! schemas, task actions) go through [`Client::v1`], whatever the family: one token serves both
//! (docs/dingtalk.md §11.1).
//!
//! Retries happen here, within bounds: an invalid token is refreshed once and the call retried
//! once; a rate-limit answer backs off (≥ 1 s, with jitter) and retries; a transient failure
//! (timeout, 5xx, connection error, gateway errcode) is retried with jitter — but only for calls
//! that are safe to repeat. `processinstance/create` is not (DingTalk has no idempotency key):
//! when it may have reached DingTalk without an answer the caller gets [`Error::NoResponse`].
//!
//! Before each metered attempt the allowance gate (`quota`) is asked; DingTalk's 90020 (v1.0:
//! `Forbidden.AccessDenied.ApiCountLimitForOrg`) pauses metered calls for the month and ends the
//! call with [`Error::QuotaExhausted`], never retried.
//!
//! Both families share one path ([`Client::send`]): the gate, the token, the budget, the ledger
//! and the retries are the same; only how a request is put on the wire and how its answer is
//! read differ ([`Wire`]).

pub mod actions;
mod budget;
pub mod gateway;
pub mod listing;
pub mod quota;
mod token;
pub mod types;
pub mod v1;

use std::{sync::Arc, time::Duration};

use rand::Rng;
use reqwest::Method;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use sqlx::PgPool;

pub use crate::ledger::Purpose;
pub use budget::{Budget, Priority};
pub use token::Tokens;
use types::*;

pub use crate::config::ApiFamily;
use crate::{clock::Clock, config::DingTalkConfig, ledger::Ledger};

/// What went wrong with a DingTalk call, by what the caller should do about it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// DingTalk refused the request for a business reason (bad parameter, unknown template,
    /// callback already registered…): permanent, do not retry. The old family gives a numeric
    /// `errcode` and no `code`; v1.0 gives its string `code` (`processCodeError`…) and the HTTP
    /// status as `errcode` (docs/dingtalk.md §11.6).
    #[error("DingTalk rejected the request: {}", rejection_text(*errcode, code.as_deref(), errmsg))]
    Rejected {
        errcode: i64,
        code: Option<String>,
        errmsg: String,
    },
    /// The access token was refused even after one refresh.
    #[error("DingTalk refused the access token (errcode {errcode}) after a refresh")]
    InvalidToken { errcode: i64 },
    /// Rate limited, still after backing off.
    #[error("DingTalk rate limit (errcode {errcode}) still hit after backing off")]
    RateLimited { errcode: i64 },
    /// Timeout, 5xx, connection failure or gateway error, still after the retries allowed.
    #[error("DingTalk unavailable: {0}")]
    Transient(String),
    /// A call that is not safe to repeat may have reached DingTalk, but no answer came. Whether it
    /// took effect is unknown: look before retrying.
    #[error("no answer from DingTalk; the request may have been processed: {0}")]
    NoResponse(String),
    /// DingTalk answered something we cannot read.
    #[error("unexpected answer from DingTalk: {0}")]
    Protocol(String),
    /// The organisation's monthly API allowance is used up (DingTalk answered 90020 this Beijing
    /// month, or dingsync's share `dingtalk.monthly_calls` is used): metered calls are paused
    /// until `until`, the start of the next Beijing month on the ledger's clock, unless lifted
    /// sooner (`dingsync quota resume`, a new `dingtalk.monthly_calls`). Nothing was sent.
    #[error(
        "DingTalk's monthly API allowance is used up ({reason}); metered calls resume at {until} or when the pause is lifted"
    )]
    QuotaExhausted {
        until: chrono::DateTime<chrono::Utc>,
        reason: String,
    },
}

fn rejection_text(errcode: i64, code: Option<&str>, errmsg: &str) -> String {
    match code {
        None => format!("errcode {errcode}: {errmsg}"),
        Some(code) => format!("errcode {code} (HTTP {errcode}): {errmsg}"),
    }
}

impl Error {
    /// The v1.0 family's error code of a rejection (`aflowProcessInstStatusException`…).
    pub fn v1_code(&self) -> Option<&str> {
        match self {
            Error::Rejected { code, .. } => code.as_deref(),
            _ => None,
        }
    }
}

/// How a request goes on the wire and how its answer is read (docs/dingtalk.md §1.3, §11.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// `dingtalk.api_base`, `?access_token=`, HTTP 200 with `errcode`.
    Legacy,
    /// The v1.0 address, the `x-acs-dingtalk-access-token` header, HTTP-status errors.
    V1,
}

/// DingTalk's client; cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: String,
    /// Where v1.0 calls go (`DingTalkConfig::v1_base`).
    v1_base: String,
    family: ApiFamily,
    pool: PgPool,
    tokens: Tokens,
    budget: Budget,
    gate: Arc<quota::Gate>,
    ledger: Ledger,
    corp_id: String,
    max_attempts: u32,
}

/// How a failed attempt may be repeated.
enum Outcome<T> {
    Done(T),
    /// Rejected before DingTalk processed anything: safe to retry any call.
    RetryToken(i64),
    RetryRate(i64),
    /// May or may not have been processed.
    Uncertain(String),
    /// Certainly not processed (connection refused).
    NotSent(String),
    /// The monthly allowance is used up (90020): pause, do not retry.
    Quota(String),
    /// Permanent: give up now.
    Fail(Error),
}

impl Client {
    /// `base` is `dingtalk.api_base` (or the embedded emulator's URL). Counts its calls in a ledger
    /// of its own, on real time (commands and tests; `serve` shares one: [`Client::with_ledger`]).
    pub fn new(pool: PgPool, config: &DingTalkConfig, base: &str) -> anyhow::Result<Client> {
        let ledger = Ledger::new(pool.clone(), Clock::real());
        Client::with_ledger(pool, config, base, ledger)
    }

    /// A client whose calls are counted in `ledger`.
    pub fn with_ledger(
        pool: PgPool,
        config: &DingTalkConfig,
        base: &str,
        ledger: Ledger,
    ) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            // Never follow a redirect: the URL carries the access token or the app secret in its
            // query, which a redirect would hand to wherever it points (and reqwest logs it).
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        let v1_base = config.v1_base(base);
        let base = base.trim_end_matches('/').to_string();
        let gate = Arc::new(quota::Gate::new(
            pool.clone(),
            ledger.clone(),
            &config.corp_id,
            quota::Allowances::from_config(config),
        ));
        let tokens = Tokens::new(
            pool.clone(),
            http.clone(),
            match config.api_family {
                ApiFamily::Legacy => &base,
                ApiFamily::V1 => &v1_base,
            },
            config,
            ledger.clone(),
            gate.clone(),
        );
        let budget = Budget::new(pool.clone(), config);
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base,
                v1_base,
                family: config.api_family,
                pool,
                tokens,
                budget,
                gate,
                ledger,
                corp_id: config.corp_id.clone(),
                max_attempts: config.max_attempts,
            }),
        })
    }

    /// Where v1.0 calls and the Stream gateway go (`DingTalkConfig::v1_base`).
    pub fn v1_base(&self) -> &str {
        &self.inner.v1_base
    }

    /// The family that creates, reads and lists (`dingtalk.api_family`).
    pub fn family(&self) -> ApiFamily {
        self.inner.family
    }

    /// The pool this client shares its token, budget and ledger through.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    pub fn tokens(&self) -> &Tokens {
        &self.inner.tokens
    }

    /// The allowance gate: the allowances in force, the pause, which paths are metered.
    pub fn quota(&self) -> &quota::Gate {
        &self.inner.gate
    }

    /// The ledger this client counts its calls in.
    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    /// The organisation this client's app belongs to.
    pub fn corp_id(&self) -> &str {
        &self.inner.corp_id
    }

    /// Creates an approval: `topapi/processinstance/create` (docs/dingtalk.md §2.1) or v1.0
    /// `POST /v1.0/workflow/processInstances` (§11.2). Not idempotent: never repeated after it
    /// may have reached DingTalk. Self-selected approvers need the v1.0 family: with the old
    /// one such a request is refused here, unsent.
    pub async fn create_instance(&self, request: &CreateInstance) -> Result<String, Error> {
        match self.inner.family {
            ApiFamily::Legacy => {
                if !request.target_select_actioners.is_empty() {
                    return Err(Error::Rejected {
                        errcode: 0,
                        code: None,
                        errmsg: "self-selected approvers (targetSelectActioners) need dingtalk.api_family = \"v1\"; nothing was sent".into(),
                    });
                }
                let r: CreateInstanceResponse = self
                    .call(
                        Purpose::Outbox,
                        Method::POST,
                        "/topapi/processinstance/create",
                        Some(request),
                        false,
                    )
                    .await?;
                Ok(r.process_instance_id)
            }
            ApiFamily::V1 => {
                let body = v1::create_body(request);
                let r: v1::CreateAnswer = self
                    .v1(
                        Purpose::Outbox,
                        Method::POST,
                        v1::CREATE_PATH,
                        &[],
                        Some(&body),
                        false,
                    )
                    .await?;
                Ok(r.instance_id)
            }
        }
    }

    /// Reads one approval: `topapi/processinstance/get` (docs/dingtalk.md §2.3) or v1.0
    /// `GET /v1.0/workflow/processInstances` (§11.3), read into the old family's shape.
    pub async fn get_instance(
        &self,
        process_instance_id: &str,
        purpose: Purpose,
    ) -> Result<ProcessInstance, Error> {
        match self.inner.family {
            ApiFamily::Legacy => {
                let body = serde_json::json!({ "process_instance_id": process_instance_id });
                let r: GetInstanceResponse = self
                    .call(
                        purpose,
                        Method::POST,
                        "/topapi/processinstance/get",
                        Some(&body),
                        true,
                    )
                    .await?;
                Ok(r.process_instance)
            }
            ApiFamily::V1 => {
                let r: v1::GetAnswer = self
                    .v1::<(), _>(
                        purpose,
                        Method::GET,
                        v1::GET_PATH,
                        &[("processInstanceId", process_instance_id)],
                        None,
                        true,
                    )
                    .await?;
                Ok(r.result.into_legacy())
            }
        }
    }

    /// One page of instance ids: `topapi/processinstance/listids` (docs/dingtalk.md §2.4) or
    /// v1.0 `processes/instanceIds/query` (§11.4). A status filter (`request.statuses`) exists
    /// only in v1.0: with the old family such a request is refused here, unsent (see
    /// [`Client::filters_by_status`]).
    pub async fn list_instance_ids(
        &self,
        request: &ListIds,
        purpose: Purpose,
    ) -> Result<IdPage, Error> {
        match self.inner.family {
            ApiFamily::Legacy => {
                if !request.statuses.is_empty() {
                    return Err(Error::Rejected {
                        errcode: 0,
                        code: None,
                        errmsg:
                            "listing by status needs dingtalk.api_family = \"v1\"; nothing was sent"
                                .into(),
                    });
                }
                let r: ListIdsResponse = self
                    .call(
                        purpose,
                        Method::POST,
                        "/topapi/processinstance/listids",
                        Some(request),
                        true,
                    )
                    .await?;
                Ok(r.result)
            }
            ApiFamily::V1 => {
                let body = v1::list_ids_body(request);
                let r: v1::ListIdsAnswer = self
                    .v1(
                        purpose,
                        Method::POST,
                        v1::LIST_IDS_PATH,
                        &[],
                        Some(&body),
                        true,
                    )
                    .await?;
                r.result.into_page()
            }
        }
    }

    /// Whether listings can be filtered by status (v1.0 only, docs/dingtalk.md §11.4).
    pub fn filters_by_status(&self) -> bool {
        self.inner.family == ApiFamily::V1
    }

    /// v1.0 `POST /v1.0/workflow/processes/forecast` (docs/dingtalk.md §11.5): the route DingTalk
    /// would give the create `request`, without creating anything. v1.0 only, whatever
    /// `dingtalk.api_family` says; metered; changes nothing, so it is repeated like a read.
    pub async fn forecast(
        &self,
        request: &CreateInstance,
        purpose: Purpose,
    ) -> Result<v1::Forecast, Error> {
        let body = v1::forecast_body(request);
        let r: v1::ForecastAnswer = self
            .v1(
                purpose,
                Method::POST,
                v1::FORECAST_PATH,
                &[],
                Some(&body),
                true,
            )
            .await?;
        Ok(r.into_forecast())
    }

    /// v1.0 `GET /v1.0/workflow/forms/schemas/processCodes?processCode=` (docs/dingtalk.md §2.5,
    /// §11.7): the template's form schema, `result` as DingTalk sent it. v1.0 only; metered.
    pub async fn form_schema(&self, process_code: &str, purpose: Purpose) -> Result<Value, Error> {
        #[derive(serde::Deserialize)]
        struct Answer {
            result: Value,
        }
        let r: Answer = self
            .v1::<(), _>(
                purpose,
                Method::GET,
                v1::SCHEMA_PATH,
                &[("processCode", process_code)],
                None,
                true,
            )
            .await?;
        Ok(r.result)
    }

    /// One v1.0 call (docs/dingtalk.md §11.1): `method` `path` (from `/v1.0/`) on the v1.0
    /// address, with `query` parameters and, when given, `body` as JSON; the 2xx body read as `T`
    /// (`serde_json::Value` for any). The token goes in the `x-acs-dingtalk-access-token` header.
    /// It passes the same gate, budget and ledger as every call, and its errors are the same
    /// [`Error`] classes; a rejection carries v1.0's code ([`Error::v1_code`]).
    ///
    /// `idempotent`: whether the call may be repeated after it may have reached DingTalk without
    /// an answer (a read). A write that is not (every v1.0 workflow write, docs/dingtalk.md
    /// §11.6) ends with [`Error::NoResponse`] instead: the caller looks before it retries.
    ///
    /// New v1.0 calls are thin methods over this one, e.g.
    /// `self.v1(Purpose::Outbox, Method::POST, "/v1.0/workflow/processInstances/comments", &[], Some(&body), false)`.
    pub async fn v1<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        purpose: Purpose,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&B>,
        idempotent: bool,
    ) -> Result<T, Error> {
        self.send(purpose, Wire::V1, method, path, query, body, idempotent)
            .await
    }

    /// `call_back/register_call_back` (docs/dingtalk.md §3). DingTalk first sends `check_url` to the URL.
    pub async fn register_callback(&self, request: &CallbackRegistration) -> Result<(), Error> {
        let _: Value = self
            .call(
                Purpose::Callback,
                Method::POST,
                "/call_back/register_call_back",
                Some(request),
                true,
            )
            .await?;
        Ok(())
    }

    /// `call_back/update_call_back`.
    pub async fn update_callback(&self, request: &CallbackRegistration) -> Result<(), Error> {
        let _: Value = self
            .call(
                Purpose::Callback,
                Method::POST,
                "/call_back/update_call_back",
                Some(request),
                true,
            )
            .await?;
        Ok(())
    }

    /// `call_back/get_call_back` (`purpose`: `Callback`, or `Doctor` for its check).
    pub async fn get_callback(&self, purpose: Purpose) -> Result<CallbackRegistration, Error> {
        self.call::<(), _>(purpose, Method::GET, "/call_back/get_call_back", None, true)
            .await
    }

    /// `call_back/delete_call_back`.
    pub async fn delete_callback(&self) -> Result<(), Error> {
        let _: Value = self
            .call::<(), _>(
                Purpose::Callback,
                Method::GET,
                "/call_back/delete_call_back",
                None,
                true,
            )
            .await?;
        Ok(())
    }

    /// `call_back/get_call_back_failed_result`: read-once (what it returns is gone from DingTalk),
    /// so it is never retried after it may have been answered. Returns the raw answer, to be
    /// committed before it is applied.
    pub async fn failed_callbacks(&self) -> Result<FailedPage, Error> {
        self.call::<(), _>(
            Purpose::Failed,
            Method::GET,
            "/call_back/get_call_back_failed_result",
            None,
            false,
        )
        .await
    }

    /// One call of the old family (`?access_token=`, errcode answers).
    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        purpose: Purpose,
        method: Method,
        path: &str,
        body: Option<&B>,
        idempotent: bool,
    ) -> Result<T, Error> {
        self.send(purpose, Wire::Legacy, method, path, &[], body, idempotent)
            .await
    }

    /// The one path of every call, either family: gate, token, budget, attempt, ledger, retries.
    #[allow(clippy::too_many_arguments)]
    async fn send<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        purpose: Purpose,
        wire: Wire,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&B>,
        idempotent: bool,
    ) -> Result<T, Error> {
        let inner = &self.inner;
        let mut refreshed = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            // Every attempt of a metered call is one DingTalk may count: each asks the gate.
            inner.gate.check(path).await?;
            // Token first: a token fetch must not hold back calls that already have their slot
            // (they would leave together once it arrives and bunch up at DingTalk).
            let token = match inner.tokens.get().await {
                Ok(token) => token,
                // Nothing was sent yet, so any call may wait and try again.
                Err(Error::RateLimited { .. }) if attempt < inner.max_attempts => {
                    sleep_with_jitter(Duration::from_secs(1) * attempt).await;
                    continue;
                }
                Err(Error::Transient(why)) if attempt < inner.max_attempts => {
                    tracing::debug!(path, reason = %why, "no access token; retrying");
                    sleep_with_jitter(Duration::from_millis(200) * attempt).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            inner
                .budget
                .acquire(priority(purpose))
                .await
                .map_err(|e| Error::Transient(format!("rate budget: {e}")))?;
            // The wait for a slot can take seconds (outbox work books up to 5 s ahead, live work
            // up to a minute), and meanwhile another call may have found the token refused and
            // replaced it: send the token held now, not the one held before the wait, or the
            // call is refused for a token this process already knows is dead (and a second
            // refusal after the one refresh allowed fails the call).
            let token = inner.tokens.cached().unwrap_or(token);
            let outcome = self.attempt(wire, &method, path, query, &token, body).await;
            // Counted as DingTalk counts (docs/dingtalk.md §7): not a call that never left, nor
            // one refused for the rate limit or for its token (refused at the gateway, before
            // the API ran); every other attempt, answered or not (one lost on the way back may
            // have been counted: the stricter reading).
            if !matches!(
                outcome,
                Outcome::NotSent(_) | Outcome::RetryRate(_) | Outcome::RetryToken(_)
            ) {
                inner
                    .ledger
                    .call(&inner.corp_id, path, purpose, inner.gate.is_metered(path));
            }
            let last = attempt >= inner.max_attempts;
            match outcome {
                Outcome::Done(v) => return Ok(v),
                Outcome::Fail(e) => return Err(e),
                Outcome::Quota(reason) => return Err(inner.gate.exhausted(path, &reason).await),
                Outcome::RetryToken(errcode) => {
                    inner.tokens.invalidate(&token).await;
                    if refreshed {
                        return Err(Error::InvalidToken { errcode });
                    }
                    refreshed = true;
                    attempt -= 1; // a refresh is not one of the retries
                }
                Outcome::RetryRate(errcode) => {
                    // One second: DingTalk counts calls per second (docs/dingtalk.md §7).
                    if let Err(e) = inner.budget.throttled(Duration::from_secs(1)).await {
                        tracing::warn!(error = %e, "could not pause the shared rate budget");
                    }
                    if last {
                        return Err(Error::RateLimited { errcode });
                    }
                    tracing::debug!(path, errcode, "DingTalk rate limit; backing off");
                    sleep_with_jitter(Duration::from_secs(1) * attempt).await;
                }
                Outcome::NotSent(why) => {
                    if last {
                        return Err(Error::Transient(why));
                    }
                    sleep_with_jitter(Duration::from_millis(200) * attempt).await;
                }
                Outcome::Uncertain(why) => {
                    if !idempotent {
                        return Err(Error::NoResponse(why));
                    }
                    if last {
                        return Err(Error::Transient(why));
                    }
                    tracing::debug!(path, reason = %why, "DingTalk call failed; retrying");
                    sleep_with_jitter(Duration::from_millis(200) * attempt).await;
                }
            }
        }
    }

    /// One HTTP exchange, classified.
    async fn attempt<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        wire: Wire,
        method: &Method,
        path: &str,
        query: &[(&str, &str)],
        token: &str,
        body: Option<&B>,
    ) -> Outcome<T> {
        let http = &self.inner.http;
        let mut request = match wire {
            Wire::Legacy => http
                .request(method.clone(), format!("{}{path}", self.inner.base))
                .query(&[("access_token", token)]),
            Wire::V1 => http
                .request(method.clone(), format!("{}{path}", self.inner.v1_base))
                .header(v1::TOKEN_HEADER, token),
        };
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let sent = request.send().await;
        if sent.is_err() {
            count_call(path, None);
        }
        let response = match sent {
            Ok(r) => r,
            // Never print the URL: it carries the access token.
            Err(e) if e.is_connect() => return Outcome::NotSent(e.without_url().to_string()),
            Err(e) => return Outcome::Uncertain(e.without_url().to_string()),
        };
        let status = response.status();
        let text = response.text().await;
        count_call(
            path,
            text.as_ref().ok().map(|t| (status.as_u16(), t.as_str())),
        );
        let text = match text {
            Ok(t) => t,
            Err(e) => return Outcome::Uncertain(e.without_url().to_string()),
        };
        let read = match wire {
            Wire::Legacy => read_answer(status.as_u16(), &text),
            Wire::V1 => v1::read_answer(status.as_u16(), &text),
        };
        match read {
            Ok(()) => match serde_json::from_str(&text) {
                Ok(v) => Outcome::Done(v),
                Err(e) => Outcome::Uncertain(format!("unreadable answer: {e}")),
            },
            Err(Classified::Token(code)) => Outcome::RetryToken(code),
            Err(Classified::Rate(code)) => Outcome::RetryRate(code),
            Err(Classified::Gateway(why)) => Outcome::Uncertain(why),
            Err(Classified::Quota(why)) => Outcome::Quota(why),
            Err(Classified::Rejected(e)) => Outcome::Fail(e),
        }
    }
}

/// The rate-budget priority of a call made for `purpose`: live sync queues for slots far ahead,
/// outbox creates a little, background work only takes a slot that is free now.
pub fn priority(purpose: Purpose) -> Priority {
    match purpose {
        Purpose::Outbox | Purpose::Search | Purpose::Action => Priority::Outbox,
        Purpose::Details
        | Purpose::Failed
        | Purpose::Callback
        | Purpose::Doctor
        | Purpose::Token
        | Purpose::Stream => Priority::Live,
        Purpose::Gap
        | Purpose::Sweep
        | Purpose::Poll
        | Purpose::Backfill
        | Purpose::Drift
        | Purpose::Forms => Priority::Bulk,
    }
}

#[derive(Debug)]
enum Classified {
    Token(i64),
    Rate(i64),
    Gateway(String),
    /// The monthly allowance is used up; DingTalk's code and message.
    Quota(String),
    Rejected(Error),
}

/// Reads an answer by its HTTP status and body: 429 is a rate limit; any other non-2xx status is
/// the gateway speaking, except the v1.0 family's errors (HTTP 4xx with `{"code", "message"}`,
/// docs/dingtalk.md §7), whose quota and rate codes are read as such; a 2xx body is read by
/// [`classify`].
fn read_answer(status: u16, text: &str) -> Result<(), Classified> {
    if status == 429 {
        return Err(Classified::Rate(429));
    }
    if !(200..300).contains(&status) {
        #[derive(serde::Deserialize)]
        struct V1Error {
            code: String,
            #[serde(default)]
            message: String,
        }
        if let Ok(e) = serde_json::from_str::<V1Error>(text) {
            if e.code == quota::V1_QUOTA_CODE {
                return Err(Classified::Quota(format!("{}: {}", e.code, e.message)));
            }
            // QpsLimitForApi, QpsLimitForAppkeyAndApi, Qpm...: rate limits answered with 403.
            if e.code.starts_with("Forbidden.AccessDenied.Qp") {
                return Err(Classified::Rate(i64::from(status)));
            }
        }
        return Err(Classified::Gateway(format!("HTTP {status}")));
    }
    classify(text)
}

/// Reads `errcode` / `sub_code` of a topapi/oapi answer (HTTP 200 with errcode ≠ 0 on error;
/// docs/dingtalk.md §1.3, §7).
fn classify(text: &str) -> Result<(), Classified> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Classified::Gateway(format!("answer is not JSON ({e})")))?;
    // Every oapi/topapi answer carries errcode; one without it is not DingTalk's API speaking
    // (e.g. the gateway's flood-ban page `{"status":1111,"wait":5,"punish":"deny"}`, docs/dingtalk.md §7),
    // so it must not be read as success.
    let Some(errcode) = value.get("errcode").and_then(Value::as_i64) else {
        if value.get("punish").is_some() {
            return Err(Classified::Rate(
                value.get("status").and_then(Value::as_i64).unwrap_or(0),
            ));
        }
        return Err(Classified::Gateway("answer without errcode".into()));
    };
    if errcode == 0 {
        return Ok(());
    }
    let sub_code = value.get("sub_code").and_then(|v| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    });
    let errmsg = value
        .get("errmsg")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    match (errcode, sub_code.as_deref()) {
        (40014 | 42001 | 40001 | 33001, _) | (88, Some("40014" | "42001" | "40000")) => {
            Err(Classified::Token(errcode))
        }
        (90002 | 90019, _) | (88, Some("90002" | "90019")) => Err(Classified::Rate(errcode)),
        // The organisation's monthly allowance is used up: not a refusal of this request but of
        // every metered call until the month ends (docs/dingtalk.md §7).
        (90020, _) | (88, Some("90020")) => {
            Err(Classified::Quota(format!("errcode 90020: {errmsg}")))
        }
        // -1: system busy; 15: gateway/remote timeout; 88 without a sub_code: gateway timeout
        // (docs/dingtalk.md §7).
        (-1 | 15, _) | (88, None | Some("")) => {
            Err(Classified::Gateway(format!("errcode {errcode}: {errmsg}")))
        }
        _ => Err(Classified::Rejected(Error::Rejected {
            errcode,
            code: None,
            errmsg,
        })),
    }
}

async fn sleep_with_jitter(base: Duration) {
    let jitter = rand::rng().random_range(0.0..0.5);
    tokio::time::sleep(base.mul_f64(1.0 + jitter)).await;
}

/// Counts one HTTP exchange with DingTalk at `endpoint`. `answer` is `None` when no HTTP answer
/// was read (transport failure); otherwise the status and body, whose `errcode` is the label
/// (`http_<status>` when the status is not 2xx or the body carries none).
pub(crate) fn count_call(endpoint: &str, answer: Option<(u16, &str)>) {
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
        // A v1.0 error names its code (docs/dingtalk.md §11.6): `http_403_<code>`. Codes are
        // DingTalk's short fixed names, so the label set stays small.
        Some((status, body)) => match serde_json::from_str::<v1::ErrorBody>(body) {
            Ok(e) if e.code.len() <= 64 => format!("http_{status}_{}", e.code),
            _ => format!("http_{status}"),
        },
    };
    crate::metrics::dingtalk_call(endpoint, errcode);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errcode_90020_is_a_quota_pause_not_a_rejection() {
        let msg = "您的企业本月api调用量已超过限制,调用量:5001次,额度:5000次,请登录开发者后台-资源管理-查看用量明细";
        let text = serde_json::json!({"errcode": 90020, "errmsg": msg}).to_string();
        match read_answer(200, &text) {
            Err(Classified::Quota(why)) => assert!(why.contains("90020") && why.contains(msg)),
            other => panic!("{other:?}"),
        }
        let wrapped = r#"{"errcode":88,"sub_code":"90020","errmsg":"x"}"#;
        assert!(matches!(
            read_answer(200, wrapped),
            Err(Classified::Quota(_))
        ));
        // 90018 stays a rejection.
        let other = r#"{"errcode":90018,"errmsg":"x"}"#;
        assert!(matches!(
            read_answer(200, other),
            Err(Classified::Rejected(Error::Rejected { errcode: 90018, .. }))
        ));
    }

    #[test]
    fn the_v1_families_quota_and_rate_codes_are_read_from_a_403() {
        let body = r#"{"code":"Forbidden.AccessDenied.ApiCountLimitForOrg","message":"api count limit","requestid":"r1"}"#;
        match read_answer(403, body) {
            Err(Classified::Quota(why)) => {
                assert!(why.starts_with("Forbidden.AccessDenied.ApiCountLimitForOrg"))
            }
            other => panic!("{other:?}"),
        }
        let rate = r#"{"code":"Forbidden.AccessDenied.QpsLimitForApi","message":"qps"}"#;
        assert!(matches!(read_answer(403, rate), Err(Classified::Rate(403))));
        assert!(matches!(
            read_answer(403, "<html>forbidden</html>"),
            Err(Classified::Gateway(_))
        ));
        assert!(matches!(read_answer(429, ""), Err(Classified::Rate(429))));
        assert!(read_answer(200, r#"{"errcode":0}"#).is_ok());
    }
}
