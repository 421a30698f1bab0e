//! A faithful local DingTalk, used by the tests, the benchmarks and the embedded default
//! (`dingtalk.api_base = "emulator"`). It behaves as the repository's `docs/dingtalk.md` says DingTalk behaves, not as the
//! daemon would like; where those notes mark something unconfirmed it takes the stricter reading
//! and says so where it does.
//!
//! What it serves (one axum server):
//! - DingTalk's old API (`api`): `gettoken`, `topapi/processinstance/{create,get,listids}`,
//!   `call_back/{register,update,get,delete}_call_back`, `call_back/get_call_back_failed_result`;
//! - the v1.0 family (`api_v1`): `/v1.0/oauth2/accessToken`, creating, reading and listing
//!   instances, the forecast, with v1.0's shapes, time formats and errors, on the same state;
//! - DingTalk's v1.0 actions on approvals (`actions`): execute, terminate, comments, redirect;
//! - form schemas of the templates (`forms`), as v1.0 answers them;
//! - encrypted pushes of every approval change to the registered URL, with DingTalk's retry
//!   ladder and failed-push list (`push`);
//! - an admin API under `/_emulator/…` to act as people, look inside and set faults (`admin`),
//!   behind a bearer token ([`Emulator::admin_token`]), also available from Rust through
//!   [`Handle`];
//! - optionally simulated people who keep approvals moving (`people`);
//! - DingTalk's monthly allowances, enforced on metered calls and on pushes (`quota`);
//! - Stream mode: `v1.0/gateway/connections/open` and the gateway's tickets and connections
//!   (`gateway`, the data), a WebSocket gateway on a port of its own delivering the events over
//!   it instead of HTTP push when [`EmulatorConfig::delivery`] says so (`stream`, the wire).
//!
//! Files: `model` (organisation, templates, instances, approval rules, event payloads), `state`
//! (memory, tokens, failed list, call log), `handle` ([`Handle`]: acting on it from Rust),
//! `faults` (knobs), `quota` (monthly allowances), `api`, `api_v1`, `actions`, `forms`, `push`,
//! `gateway`, `stream`, `admin`, `people`. This file owns configuration, start and stop, and
//! choosing the admin API's token.

mod actions;
mod admin;
mod api;
mod api_v1;
mod faults;
mod forms;
mod gateway;
mod handle;
mod model;
mod people;
mod push;
mod quota;
mod state;
mod stream;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::AtomicUsize},
    time::Duration,
};

use anyhow::{Context, ensure};
use axum::Router;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use actions::{COMMENTS, EXECUTE, REDIRECT, TERMINATE, TOO_SOON};
pub use faults::{Faults, InjectedError, Injection, PushFaults, StreamFaults};
pub use forms::schema_result;
pub use handle::{Handle, OpenTask, StartInstance, TaskAction};
pub use model::{
    ActionType, CcPosition, Control, DEFAULT_APPROVER, FormEntry, FormInput, Instance,
    InstanceStatus, NodeSpec, Person, Record, Rejection, SelectNode, Task, TaskResult, TaskStatus,
    Template, errcode,
};
pub use push::DEADLINE as PUSH_DEADLINE;
pub use quota::{Allowances, CallsUsage, DeliveriesUsage, OVER_ALLOWANCE, QuotaReport, is_metered};
pub use state::{AdminError, FAILED_PAGE, PushOutcome, PushRecord, Registration, TOKEN_EXPIRES_IN};
pub use stream::{AckHook, AckRecord, Delivery, StreamReport, WINDOW as STREAM_WINDOW};

/// CorpId of the emulated organisation by default (same as `dingsync::app::EMULATOR_CORP_ID`).
pub const DEFAULT_CORP_ID: &str = "dingemulatorcorp0000";
/// AppKey `gettoken` accepts by default.
pub const DEFAULT_APP_KEY: &str = "dingemulatorappkey00";
/// AppSecret `gettoken` accepts by default (not a secret: the emulator is local).
pub const DEFAULT_APP_SECRET: &str = "emulator-app-secret";

/// How the emulator runs. `Debug` hides the app secret.
#[derive(Clone)]
pub struct EmulatorConfig {
    /// The organisation's CorpId: in pushes (`corpId`) and the owner key of every push and
    /// `check_url`, since the callback is registered with `register_call_back` (docs/dingtalk.md §4.5).
    pub corp_id: String,
    /// Credentials `gettoken` accepts; anything else gets 40096.
    pub app_key: String,
    pub app_secret: String,
    /// 1.0 = DingTalk's timings. Smaller is faster: the retry ladder (10 s, 30 s), the failed
    /// list's 3–5 minute delay and one-week retention, and token expiry (7200 s) are multiplied
    /// by it. The 1500 ms push deadline is not.
    pub time_scale: f64,
    /// Seed of every random choice (ids, tokens, fault decisions, simulated people).
    pub seed: u64,
    /// `Some(pace)`: simulated people start an approval or act on a task every `pace`.
    pub people: Option<Duration>,
    /// Keep every event handed to delivery and every failed-list item handed out, for tests
    /// that prove nothing was lost ([`Handle::events_pushed`], [`Handle::failed_handed_out`]).
    /// Memory grows with every event, so it is off in `serve` and `dingsync emulator`.
    pub keep_events: bool,
    /// Bearer token of the admin API (`/_emulator/…`). `None`: a random one for this run, read
    /// with [`Emulator::admin_token`]. Not derived from `seed`: a seed is for repeating a run,
    /// and a token anyone could repeat would guard nothing.
    pub admin_token: Option<String>,
    /// Metered API calls the organisation may make a month (docs/dingtalk.md §7; the standard
    /// edition allows 5 000); past it every metered call gets errcode 90020. 0 = no limit.
    pub monthly_calls: u64,
    /// Event deliveries (HTTP push attempts) the organisation may receive a month (the standard
    /// edition allows 3 000); past it events are dropped for good. 0 = no limit.
    pub monthly_deliveries: u64,
    /// How events are delivered: HTTP push (the default) or Stream, as the console's event
    /// subscription chooses (docs/dingtalk.md §8).
    pub delivery: Delivery,
}

impl std::fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("corp_id", &self.corp_id)
            .field("app_key", &self.app_key)
            .field("app_secret", &"***")
            .field("time_scale", &self.time_scale)
            .field("seed", &self.seed)
            .field("people", &self.people)
            .field("keep_events", &self.keep_events)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "***"))
            .field("monthly_calls", &self.monthly_calls)
            .field("monthly_deliveries", &self.monthly_deliveries)
            .field("delivery", &self.delivery)
            .finish()
    }
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            corp_id: DEFAULT_CORP_ID.into(),
            app_key: DEFAULT_APP_KEY.into(),
            app_secret: DEFAULT_APP_SECRET.into(),
            time_scale: 1.0,
            seed: 1,
            people: None,
            keep_events: false,
            admin_token: None,
            monthly_calls: 0,
            monthly_deliveries: 0,
            delivery: Delivery::Http,
        }
    }
}

/// A running emulator.
pub struct Emulator {
    /// Where it listens (the real port when started on port 0).
    pub addr: SocketAddr,
    handle: Handle,
    admin_token: String,
    /// `None` once stopped.
    server: Option<JoinHandle<std::io::Result<()>>>,
    people: Option<JoinHandle<()>>,
}

/// Dropping a running emulator (a panicking test, a forgotten `stop`) stops it too, without
/// waiting: the server closes and pending pushes end.
impl Drop for Emulator {
    fn drop(&mut self) {
        self.handle.shared.shutdown.cancel();
    }
}

impl Emulator {
    /// Binds `listen` (port 0 picks a free port) and serves in the background.
    pub async fn start(config: EmulatorConfig, listen: SocketAddr) -> anyhow::Result<Emulator> {
        ensure!(
            config.time_scale.is_finite() && config.time_scale > 0.0,
            "emulator time_scale must be a positive number (got {})",
            config.time_scale
        );
        ensure!(!config.corp_id.is_empty(), "emulator corp_id is empty");
        ensure!(
            !config.app_key.is_empty() && !config.app_secret.is_empty(),
            "emulator app_key and app_secret must not be empty"
        );
        let admin_token = match &config.admin_token {
            Some(token) => {
                ensure!(
                    !token.trim().is_empty(),
                    "emulator admin_token is empty (leave it unset for a random one)"
                );
                token.clone()
            }
            None => random_admin_token(),
        };
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the DingTalk emulator to {listen}"))?;
        let addr = listener.local_addr()?;
        let mut world = state::World::new(config.seed);
        world.quota = quota::Quota::new(
            config.monthly_calls,
            config.monthly_deliveries,
            chrono::Utc::now(),
        );
        let shared = Arc::new(state::Shared {
            world: Mutex::new(world),
            push_http: push::http_client().context("building the emulator's push client")?,
            shutdown: CancellationToken::new(),
            in_flight: AtomicUsize::new(0),
            stream: gateway::Gateway::new(config.delivery, config.seed),
            config,
        });
        stream::start(shared.clone(), addr.ip())
            .await
            .context("binding the emulator's Stream gateway")?;
        let handle = Handle {
            shared: shared.clone(),
        };
        let router: Router = api::router(shared.clone())
            .merge(stream::router(shared.clone()))
            .merge(admin::router(handle.clone(), &admin_token))
            .fallback(api::fallback);
        let stop = shared.shutdown.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        });
        let people = shared
            .config
            .people
            .map(|pace| tokio::spawn(people::run(handle.clone(), pace)));
        tracing::info!(%addr, corp_id = %shared.config.corp_id, time_scale = shared.config.time_scale, "DingTalk emulator listening");
        Ok(Emulator {
            addr,
            handle,
            admin_token,
            server: Some(server),
            people,
        })
    }

    /// `http://ADDR`, the base URL a DingTalk client is pointed at.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bearer token its admin API (`/_emulator/…`) requires: the configured one, or the
    /// random one of this run.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// How to call the admin API, token included, for a one-time start-up line:
    /// `curl -H 'Authorization: Bearer …' http://ADDR/_emulator/instances`.
    pub fn admin_usage(&self) -> String {
        format!(
            "curl -H 'Authorization: Bearer {}' {}/_emulator/instances",
            self.admin_token,
            self.base_url()
        )
    }

    /// The emulator's insides: act as people, count calls, set faults.
    pub fn state(&self) -> &Handle {
        &self.handle
    }

    /// Stops serving, pending pushes and simulated people; waits for the server to close.
    pub async fn stop(mut self) {
        self.handle.shared.shutdown.cancel();
        if let Some(people) = self.people.take() {
            let _ = people.await;
        }
        let Some(server) = self.server.take() else {
            return;
        };
        match tokio::time::timeout(Duration::from_secs(10), server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "DingTalk emulator server stopped with an error")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "DingTalk emulator server task failed"),
            Err(_) => tracing::warn!("DingTalk emulator did not stop within 10 s"),
        }
    }
}

/// 32 hex characters (128 bits) from the operating system's generator, through the thread-local
/// CSPRNG.
fn random_admin_token() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}
