//! The admin console: server-rendered pages on a listener of its own (`[admin]`, never the
//! callback's port), for an operator's browser on a laptop or a phone. Owns the pages, the
//! sign-in, the CSRF token of its forms and the audit line of each change; reads the database
//! through `store::console` (and `store::outbox`/`actions` lists), the process's series through
//! `metrics`' page, readiness and the month's allowance through `health`'s cached reading, and
//! the month's usage through the `ledger`. It changes nothing but what `operate` offers (retry,
//! cancel), the command line's own transitions. It imports no flow.
//!
//! Cost: nothing runs until a page is asked for (no timers, no caches), so with nobody looking
//! the console is an idle listener; each page is a few bounded queries.
//!
//! - **Sign-in**: with `admin.token`, every request needs it, as the basic-auth password (user
//!   `admin.user`) or as `Authorization: Bearer`, compared in constant time (SHA-256 of both, so
//!   that not even the length leaks). Without one (loopback only, `config.rs` refuses the rest)
//!   the console is open to this machine.
//! - **CSRF**: a browser sends basic-auth credentials with any request to the origin, a forged
//!   cross-site form too; so every POST must carry this process's random token, which only a
//!   page of the console shows.
//! - **Confirmation**: a button leads to a page that says what will happen; only its form
//!   changes anything, and the change is logged (`console: ...`, who and what, no secret).

mod figures;
mod pages;

use std::sync::Arc;

use axum::{
    Form, Router,
    body::Body,
    extract::{Path, Query, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use base64::Engine as _;
use maud::Markup;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use subtle::ConstantTimeEq;

use crate::{
    config::{AdminConfig, SchedulerConfig},
    crypto,
    health::Health,
    ledger::Ledger,
    operate, store,
};

/// What the pages read, shared by every request.
pub struct Console {
    pub pool: PgPool,
    pub ledger: Ledger,
    pub health: Health,
    pub corp_id: String,
    /// This process, as `job_runs.replica` names it.
    pub replica: String,
    pub schedules: SchedulerConfig,
    user: String,
    /// SHA-256 of `admin.token`; `None`: no sign-in (loopback only).
    token: Option<[u8; 32]>,
    /// The forms' CSRF token: random per process.
    csrf: String,
}

impl Console {
    pub fn new(
        admin: &AdminConfig,
        pool: PgPool,
        ledger: Ledger,
        health: Health,
        corp_id: &str,
        replica: &str,
        schedules: SchedulerConfig,
    ) -> Console {
        Console {
            pool,
            ledger,
            health,
            corp_id: corp_id.to_string(),
            replica: replica.to_string(),
            schedules,
            user: admin.user.clone(),
            token: (!admin.token.is_empty()).then(|| digest(admin.token.expose().as_bytes())),
            csrf: crypto::random_nonce(32),
        }
    }
}

type Shared = Arc<Console>;

/// The console's routes (every one behind the sign-in).
pub fn router(console: Console) -> Router {
    let console = Arc::new(console);
    Router::new()
        .route("/", get(overview))
        .route("/outbox", get(outbox))
        .route("/outbox/{id}", get(outbox_row))
        .route("/outbox/{id}/{op}", get(confirm_outbox).post(change_outbox))
        .route("/actions/{id}", get(action_row))
        .route(
            "/actions/{id}/{op}",
            get(confirm_action).post(change_action),
        )
        .route("/quota", get(quota))
        .route("/reconcile", get(reconcile))
        .route("/approvals", get(approvals))
        .route("/approvals/{id}", get(approval))
        .route("/console.css", get(stylesheet))
        .layer(middleware::from_fn_with_state(console.clone(), sign_in))
        .with_state(console)
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Who made a request, for the audit line.
#[derive(Clone, Debug)]
struct Who(String);

/// The sign-in: refuses a request without the token (401 with a basic-auth challenge, so that a
/// browser asks for it).
async fn sign_in(State(console): State<Shared>, mut request: Request, next: Next) -> Response {
    let Some(expected) = console.token else {
        request
            .extensions_mut()
            .insert(Who("anyone on this machine (no admin.token)".into()));
        return next.run(request).await;
    };
    match presented(request.headers(), &console.user) {
        Some((who, token)) if bool::from(digest(token.as_bytes()).ct_eq(&expected)) => {
            request.extensions_mut().insert(Who(who));
            next.run(request).await
        }
        _ => {
            let mut response = (StatusCode::UNAUTHORIZED, "sign-in required").into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"dingsync console\", charset=\"UTF-8\""),
            );
            response
        }
    }
}

/// The credentials a request carries: (who, token). A basic-auth user other than `admin.user`
/// presents nothing.
fn presented(headers: &HeaderMap, user: &str) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(("bearer token".into(), token.trim().to_string()));
    }
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (name, password) = text.split_once(':')?;
    (name == user).then(|| (format!("user {name}"), password.to_string()))
}

/// An internal failure: logged once here, a generic page to the browser.
struct Failed(anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for Failed {
    fn from(e: E) -> Failed {
        Failed(e.into())
    }
}

impl IntoResponse for Failed {
    fn into_response(self) -> Response {
        tracing::warn!(error = %format!("{:#}", self.0), "console: a page failed");
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            pages::message(
                "Error 出错",
                "The page could not be read; the log says why.",
                None,
            ),
        )
            .into_response()
    }
}

type Page = Result<Markup, Failed>;

async fn overview(State(c): State<Shared>) -> Page {
    let pool = &c.pool;
    let minutes = store::console::events_per_minute(pool, &c.corp_id, 30).await?;
    let last = store::console::last_event(pool, &c.corp_id).await?;
    let replicas = store::console::replicas(pool, &c.corp_id, 24).await?;
    let latest = store::console::latest_runs(pool, &c.corp_id).await?;
    let outbox = store::console::states(pool, store::console::Queue::Outbox).await?;
    let actions = store::console::states(pool, store::console::Queue::Actions).await?;
    let not_ready = c.health.not_ready().await;
    let series = figures::Series::read();
    Ok(pages::overview(pages::Overview {
        not_ready,
        last_event: last,
        minutes,
        series,
        replicas,
        this_replica: &c.replica,
        latest,
        outbox,
        actions,
    }))
}

#[derive(Deserialize)]
struct StateFilter {
    state: Option<String>,
}

async fn outbox(State(c): State<Shared>, Query(filter): Query<StateFilter>) -> Page {
    let pool = &c.pool;
    let state = filter.state.filter(|s| !s.is_empty());
    let counts = store::console::states(pool, store::console::Queue::Outbox).await?;
    let action_counts = store::console::states(pool, store::console::Queue::Actions).await?;
    let mut attention = store::outbox::list(pool, Some("failed"), 50).await?;
    attention.extend(store::outbox::list(pool, Some("unknown"), 50).await?);
    let rows = store::outbox::list(pool, state.as_deref(), 100).await?;
    let mut action_attention = store::actions::list(pool, Some("failed"), 50).await?;
    action_attention.extend(store::actions::list(pool, Some("unknown"), 50).await?);
    let actions = store::actions::list(pool, state.as_deref(), 100).await?;
    Ok(pages::outbox(pages::Queues {
        state: state.as_deref(),
        counts,
        action_counts,
        attention,
        rows,
        action_attention,
        actions,
    }))
}

async fn outbox_row(State(c): State<Shared>, Path(id): Path<i64>) -> Result<Response, Failed> {
    let Some(row) = store::outbox::get(&c.pool, id).await? else {
        return Ok(not_found(&format!("No outbox row {id}.")));
    };
    let times = store::console::outbox_times(&c.pool, id).await?;
    let events = match &row.process_instance_id {
        Some(pid) => store::console::approval_events(&c.pool, &row.corp_id, pid, 200).await?,
        None => Vec::new(),
    };
    Ok(pages::outbox_row(&row, times.as_ref(), &events).into_response())
}

async fn action_row(State(c): State<Shared>, Path(id): Path<i64>) -> Result<Response, Failed> {
    let Some(row) = store::actions::get(&c.pool, id).await? else {
        return Ok(not_found(&format!("No action {id}.")));
    };
    Ok(pages::action_row(&row).into_response())
}

fn not_found(text: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        pages::message("Not found 未找到", text, Some(("/outbox", "Outbox"))),
    )
        .into_response()
}

/// A change an operator may ask for (`operate`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Retry,
    Cancel,
}

impl Op {
    fn parse(text: &str) -> Option<Op> {
        match text {
            "retry" => Some(Op::Retry),
            "cancel" => Some(Op::Cancel),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::Retry => "retry",
            Op::Cancel => "cancel",
        }
    }
}

/// Which queue a change is on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Outbox,
    Action,
}

impl Target {
    pub(crate) fn path(self) -> &'static str {
        match self {
            Target::Outbox => "outbox",
            Target::Action => "actions",
        }
    }
}

async fn confirm_outbox(
    State(c): State<Shared>,
    Path((id, op)): Path<(i64, String)>,
) -> Result<Response, Failed> {
    confirm(&c, Target::Outbox, id, &op).await
}

async fn confirm_action(
    State(c): State<Shared>,
    Path((id, op)): Path<(i64, String)>,
) -> Result<Response, Failed> {
    confirm(&c, Target::Action, id, &op).await
}

/// The confirmation page: what the change will do, and the one form that does it.
async fn confirm(c: &Console, target: Target, id: i64, op: &str) -> Result<Response, Failed> {
    let Some(op) = Op::parse(op) else {
        return Ok(not_found("No such change."));
    };
    let state = match target {
        Target::Outbox => store::outbox::get(&c.pool, id).await?.map(|r| r.state),
        Target::Action => store::actions::get(&c.pool, id).await?.map(|r| r.state),
    };
    let Some(state) = state else {
        return Ok(not_found(&format!("No row {id}.")));
    };
    Ok(pages::confirm(target, op, id, &state, &c.csrf).into_response())
}

#[derive(Deserialize)]
struct ChangeForm {
    csrf: String,
}

async fn change_outbox(
    State(c): State<Shared>,
    who: axum::Extension<Who>,
    Path((id, op)): Path<(i64, String)>,
    Form(form): Form<ChangeForm>,
) -> Result<Response, Failed> {
    change(&c, &who.0, Target::Outbox, id, &op, &form).await
}

async fn change_action(
    State(c): State<Shared>,
    who: axum::Extension<Who>,
    Path((id, op)): Path<(i64, String)>,
    Form(form): Form<ChangeForm>,
) -> Result<Response, Failed> {
    change(&c, &who.0, Target::Action, id, &op, &form).await
}

/// Carries out a confirmed change with `operate` and logs who asked for what and how it ended.
async fn change(
    c: &Console,
    who: &Who,
    target: Target,
    id: i64,
    op: &str,
    form: &ChangeForm,
) -> Result<Response, Failed> {
    if !bool::from(form.csrf.as_bytes().ct_eq(c.csrf.as_bytes())) {
        tracing::warn!(who = %who.0, "console: a change without this page's form token was refused");
        return Ok((
            StatusCode::FORBIDDEN,
            pages::message(
                "Refused 已拒绝",
                "This form did not come from the console (its token is missing or stale): reload the page and try again.",
                Some(("/outbox", "Outbox")),
            ),
        )
            .into_response());
    }
    let Some(op) = Op::parse(op) else {
        return Ok(not_found("No such change."));
    };
    let outcome = match (target, op) {
        (Target::Outbox, Op::Retry) => operate::outbox_retry(&c.pool, id).await?,
        (Target::Outbox, Op::Cancel) => operate::outbox_cancel(&c.pool, id).await?,
        (Target::Action, Op::Retry) => operate::action_retry(&c.pool, id).await?,
        (Target::Action, Op::Cancel) => operate::action_cancel(&c.pool, id).await?,
    };
    let what = format!("{} {} {id}", target.path(), op.name());
    match &outcome {
        Ok(said) => tracing::info!(who = %who.0, change = %what, "console: {what} done: {said}"),
        Err(why) => {
            tracing::info!(who = %who.0, change = %what, "console: {what} refused: {why}")
        }
    }
    let back = format!("/{}/{id}", target.path());
    let (status, page) = match outcome {
        Ok(said) => (
            StatusCode::OK,
            pages::message("Done 完成", &said, Some((&back, "Back to the row"))),
        ),
        Err(why) => (
            StatusCode::CONFLICT,
            pages::message("Not changed 未更改", &why, Some((&back, "Back to the row"))),
        ),
    };
    Ok((status, page).into_response())
}

async fn quota(State(c): State<Shared>) -> Page {
    let now = c.ledger.clock().now();
    let usage = c.ledger.month(&c.corp_id, now).await?;
    let allowance = c.health.allowance(&c.corp_id).await;
    let pause = store::usage::pause(&c.pool, &c.corp_id).await?;
    Ok(pages::quota(&c.corp_id, now, &usage, allowance, pause))
}

async fn reconcile(State(c): State<Shared>) -> Page {
    let latest = store::console::latest_runs(&c.pool, &c.corp_id).await?;
    let recent = store::console::recent_runs(&c.pool, &c.corp_id, 30).await?;
    let (waiting, awaiting) = store::console::awaiting_details(&c.pool, &c.corp_id, 50).await?;
    Ok(pages::reconcile(
        &c.schedules,
        &latest,
        &recent,
        waiting,
        &awaiting,
    ))
}

#[derive(Deserialize)]
struct Search {
    q: Option<String>,
}

async fn approvals(State(c): State<Shared>, Query(search): Query<Search>) -> Page {
    let term = search.q.unwrap_or_default();
    let term = term.trim();
    let found = store::console::search_approvals(&c.pool, term, 100).await?;
    Ok(pages::approvals(term, &found))
}

async fn approval(State(c): State<Shared>, Path(id): Path<String>) -> Result<Response, Failed> {
    let Some(row) = store::console::approval(&c.pool, &id).await? else {
        return Ok(not_found(&format!("No approval {id}.")));
    };
    let tasks = store::console::approval_tasks(&c.pool, &row.corp_id, &id).await?;
    let events = store::console::approval_events(&c.pool, &row.corp_id, &id, 500).await?;
    Ok(pages::approval(&row, &tasks, &events).into_response())
}

async fn stylesheet() -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/css; charset=utf-8")
        .header(header::CACHE_CONTROL, "max-age=3600")
        .body(Body::from(pages::STYLESHEET))
        .expect("static response")
}
