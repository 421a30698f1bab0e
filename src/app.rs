//! Wires the daemon together: database (created and migrated), group committer, HTTP server
//! (the listener and its connection limits are `server`'s), DingTalk client and outbox worker; and takes it down in order on shutdown (stop accepting,
//! finish in-flight callbacks, then the batches they are waiting for, then the outbox's creates
//! in flight).

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::Context;
use axum::{
    Router,
    extract::DefaultBodyLimit,
    http::StatusCode,
    routing::{get, post},
};
use dingsync_emulator::{Emulator, EmulatorConfig};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutLayer;

use crate::{
    actions,
    callback::{self, CallbackState, Callbacks},
    clock::Clock,
    config::{AppSettings, CallbackConfig, Config, Secret},
    console,
    crypto::{self, CallbackCrypto},
    demo,
    dingtalk::{
        self,
        quota::{self, Allowances},
        types::CallbackRegistration,
    },
    health,
    ingest::Ingest,
    jobs,
    ledger::Ledger,
    outbox, planner, scheduler, server,
    store::{self, corps::Served},
    stream,
};

/// CorpId the embedded emulator's organisation uses (and events without a corpId fall back to):
/// with `dingtalk.api_base = "emulator"`, `dingtalk.corp_id` must be empty.
pub const EMULATOR_CORP_ID: &str = "dingemulatorcorp0000";

/// AppKey of the embedded emulator's app (`dingtalk.app_key` must be empty with the emulator).
pub const EMULATOR_APP_KEY: &str = "dingemulatorappkey00";

/// A running daemon.
pub struct App {
    /// Where the HTTP server listens (useful with port 0).
    pub addr: SocketAddr,
    /// Where the admin console listens (`admin.listen`; `None`: no console).
    pub admin_addr: Option<SocketAddr>,
    pub pool: PgPool,
    /// The embedded DingTalk emulator (`dingtalk.api_base = "emulator"`).
    pub emulator: Option<Emulator>,
    /// The first app's DingTalk client (the only one without `[[apps]]`); `None` without
    /// credentials (then `serve` only serves callbacks). Every app's: [`App::orgs`].
    pub client: Option<dingtalk::Client>,
    /// The first app's jobs' context (with a DingTalk client), e.g. for `scheduler::run_job_now`.
    pub jobs: Option<jobs::Context>,
    /// Every app served, in the order configured.
    pub orgs: Vec<Organisation>,
    /// The allowance ledger (calls and deliveries counted).
    pub ledger: Ledger,
    schedulers: Vec<scheduler::Scheduler>,
    health: health::Health,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    /// Background loops (the outbox worker) that finish their work on shutdown.
    workers: Vec<JoinHandle<()>>,
}

/// One app as it runs here: its organisation's client (token, rate budget, allowance gate and
/// 90020 pause are the client's, hence the organisation's own) and jobs' context.
#[derive(Clone)]
pub struct Organisation {
    /// `apps[i].name` (`default` in the single-app form).
    pub name: String,
    pub corp_id: String,
    pub client: Option<dingtalk::Client>,
    pub jobs: Option<jobs::Context>,
}

impl App {
    /// Prepares the database and starts serving. Returns once the listener is bound.
    ///
    /// Each app gets its own callback path, client, outbox and actions workers, Stream
    /// connections (when its `stream.enabled`) and scheduler: one organisation's backlog or
    /// pause holds up only its own loops, never another's (each claims only its organisation's
    /// rows, within its own `outbox.concurrency`, and each job runs per organisation under its
    /// own guard and day's allowance).
    pub async fn start(mut config: Config) -> anyhow::Result<App> {
        config.validate().context("invalid configuration")?;
        server::check_open_files(&config)?;
        resolve_emulator_defaults(&mut config);
        let mut apps = config.apps().context("invalid configuration")?;
        for app in &mut apps {
            seal_unused_callback(app);
        }
        let mut cryptos = Vec::new();
        for app in &apps {
            let crypto =
                CallbackCrypto::new(app.callback.token.expose(), app.callback.aes_key.expose())
                    .with_context(|| format!("the callback aes_key of app {}", app.name))?;
            cryptos.push(crypto);
        }
        let pool = store::connect_and_migrate(&config.database).await?;
        for app in &apps {
            store::outbox::register_corp(&pool, app.corp_id())
                .await
                .with_context(|| {
                    format!("recording app {}'s corp_id in dingsync.corps", app.name)
                })?;
        }
        warn_of_rows_nobody_here_sends(&pool, &apps).await;
        let ledger = Ledger::new(pool.clone(), planning_clock(&config));
        for app in &apps {
            let corp_id = app.corp_id();
            // Before this process runs any job: the run log still shows when the last one ran.
            planner::note_start(&pool, ledger.clock(), corp_id)
                .await
                .context("reading dingsync.job_runs for the planner")?;
            // A pause of an earlier month, or taken under another monthly_calls, is over.
            let lifted = quota::lift_stale_pause(
                &pool,
                corp_id,
                ledger.clock().now(),
                app.dingtalk.monthly_calls,
            )
            .await
            .context("reading dingsync.quota_pause")?;
            if lifted {
                resume_outbox(&pool, corp_id).await;
            }
        }
        let listener = server::bind(config.listen_addr())
            .with_context(|| format!("binding server.listen {}", config.server.listen))?;
        let addr = listener.local_addr()?;
        let admin_listener = match config.admin.listen_addr() {
            Some(at) => Some(
                server::bind(at)
                    .with_context(|| format!("binding admin.listen {}", config.admin.listen))?,
            ),
            None => None,
        };
        let admin_addr = match &admin_listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        let replica = scheduler::replica_name();

        let shutdown = CancellationToken::new();
        // Ingest stops only after the server has drained, so in-flight callbacks still commit.
        let ingest_stop = CancellationToken::new();
        let (ingest, ingest_task) =
            Ingest::start(pool.clone(), &config.ingest, ingest_stop.clone());
        // Stream connections, like callbacks in flight, finish before the ingest stops.
        let streams = tokio_util::task::TaskTracker::new();
        let mut states = Vec::new();
        for (app, crypto) in apps.iter().zip(cryptos) {
            states.push((
                app.name.clone(),
                CallbackState {
                    crypto,
                    owner_keys: app.callback.owner_key.clone(),
                    default_corp_id: app.corp_id().to_string(),
                    corps: served(&pool, app).await?,
                    ingest: ingest.clone(),
                    ledger: ledger.clone(),
                },
            ));
        }
        let callbacks = Arc::new(Callbacks::new(states));
        // `/readyz` checks every app's token, the allowance series show every organisation.
        let first = &apps[0];
        let health = health::Health::new(
            pool.clone(),
            config.uses_emulator() || apps.iter().any(AppSettings::has_credentials),
            ledger.clone(),
            apps.iter()
                .map(|a| {
                    (
                        a.corp_id().to_string(),
                        Allowances::from_config(&a.dingtalk),
                    )
                })
                .collect(),
        );
        let router = router(callbacks, health.clone(), &config);
        let server_stop = shutdown.clone();
        let limits = server::Limits::new(&config.server);
        let streams_done = streams.clone();
        let task = tokio::spawn(async move {
            server::serve(listener, router, limits, server_stop).await;
            streams_done.close();
            streams_done.wait().await;
            ingest_stop.cancel();
            ingest_task.await.ok();
            Ok(())
        });
        for app in &apps {
            tracing::info!(%addr, app = %app.name, corp_id = %app.corp_id(), "dingsync listening; callbacks at POST /dingtalk/callback/{}", app.name);
        }
        let mut workers = Vec::new();
        if let (Some(listener), Some(at)) = (admin_listener, admin_addr) {
            let console = console::Console::new(
                &config.admin,
                pool.clone(),
                ledger.clone(),
                health.clone(),
                apps[0].corp_id(),
                &replica,
                config.scheduler.clone(),
            );
            let router = console::router(console)
                .layer(DefaultBodyLimit::max(16 * 1024))
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    config.request_timeout(),
                ));
            workers.push(tokio::spawn(server::serve(
                listener,
                router,
                server::Limits::admin(&config.server),
                shutdown.clone(),
            )));
            let signed = if config.admin.token.is_empty() {
                "open to this machine: no admin.token"
            } else {
                "sign-in with admin.token"
            };
            tracing::info!(admin = %at, "admin console at http://{at}/ ({signed})");
        }

        // `stop` flushes once more after everything has stopped.
        let ledger_task = tokio::spawn(ledger.clone().run_flusher(shutdown.clone()));
        let mut emulator = None;
        let mut clients = Vec::new();
        for app in &apps {
            match dingtalk_client(&config, app, &pool, &ledger).await {
                Ok((emu, client)) => {
                    emulator = emulator.or(emu);
                    clients.push(client);
                }
                Err(e) => {
                    // The server is already running: take it down before reporting.
                    shutdown.cancel();
                    let _ = task.await;
                    if let Some(emulator) = emulator {
                        emulator.stop().await;
                    }
                    pool.close().await;
                    return Err(e);
                }
            }
        }
        workers.push(ledger_task);
        let mut orgs = Vec::new();
        let mut stream_statuses = Vec::new();
        // LISTEN for the outbox and actions workers of every app: one direct pool behind a
        // transaction pooler (database.direct_url), else this pool; none means polling.
        let listen = store::Listen::new(&config.database, &pool)?;
        if config.outbox.enabled
            && config.database.pooler == crate::config::Pooler::Transaction
            && config.database.direct_url.is_empty()
        {
            tracing::info!(
                "database.pooler is \"transaction\" without database.direct_url: the outbox and actions poll every outbox.poll_ms instead of LISTEN"
            );
        }
        for (app, client) in apps.iter().zip(&clients) {
            let corp_id = app.corp_id().to_string();
            if let Some(client) = client {
                tokio::spawn(keep_token_fresh(client.clone(), shutdown.clone()));
                if config.outbox.enabled {
                    let worker = outbox::Worker::new(
                        pool.clone(),
                        listen.clone(),
                        client.clone(),
                        corp_id.clone(),
                        config.outbox.clone(),
                    );
                    workers.push(tokio::spawn(worker.run(shutdown.clone())));
                    // Actions on approvals: the same switch and timings as the outbox's creates.
                    let actions = actions::Worker::new(
                        pool.clone(),
                        listen.clone(),
                        client.clone(),
                        corp_id.clone(),
                        config.outbox.clone(),
                    );
                    workers.push(tokio::spawn(actions.run(shutdown.clone())));
                }
            } else if config.outbox.enabled {
                tracing::warn!(app = %app.name, "no DingTalk client: dingsync.outbox rows of this organisation are not sent by this replica");
            }
            if let Some(client) = client.as_ref().filter(|_| app.stream.enabled) {
                // The client's v1.0 address: the embedded emulator's, or the app's openapi_base.
                let openapi_base = client.v1_base().to_string();
                let deps = stream::Deps {
                    gateway: dingtalk::gateway::Gateway::new(client, &app.dingtalk, &openapi_base),
                    ingest: ingest.clone(),
                    corps: served(&pool, app).await?,
                    ledger: ledger.clone(),
                    corp_id: corp_id.clone(),
                    silence: Duration::from_millis(app.stream.silence_limit_ms),
                };
                let running = stream::Stream::start(&app.stream, deps, &streams, shutdown.clone());
                stream_statuses.push((app.name.clone(), running.status()));
                tracing::info!(
                    app = %app.name,
                    connections = app.stream.connections,
                    "Stream mode on: receiving events over outbound connections to {openapi_base}"
                );
            }
            let jobs = client.as_ref().map(|client| {
                let ctx = jobs::Context::new(
                    pool.clone(),
                    client.clone(),
                    &corp_id,
                    &config.reconcile,
                    &config.retention,
                )
                .with_forms(&config.forms);
                if app.registered {
                    ctx.own_organisation_only()
                } else {
                    ctx
                }
            });
            orgs.push(Organisation {
                name: app.name.clone(),
                corp_id,
                client: client.clone(),
                jobs,
            });
        }
        let started: Vec<dingtalk::Client> = orgs.iter().filter_map(|o| o.client.clone()).collect();
        if !started.is_empty() {
            health.clients_started(started);
        }
        if !stream_statuses.is_empty() {
            let several = apps.len() > 1;
            health.watch_stream(Arc::new(move || {
                stream_statuses.iter().find_map(|(name, status)| {
                    let why = status.not_ready()?;
                    Some(if several {
                        format!("app {name}: {why}")
                    } else {
                        why
                    })
                })
            }));
        }
        let mut app = App {
            addr,
            admin_addr,
            pool,
            shutdown,
            task,
            workers,
            emulator,
            client: orgs[0].client.clone(),
            jobs: orgs[0].jobs.clone(),
            orgs,
            ledger,
            schedulers: Vec::new(),
            health,
        };
        let http_delivery = config.emulator.delivery != "stream";
        if config.uses_emulator() && !http_delivery && !first.stream.enabled {
            tracing::warn!(
                "emulator.delivery = \"stream\" but stream.enabled = false: no events will arrive (set DINGSYNC_STREAM_ENABLED=true)"
            );
        }
        if let (Some(emulator), Some(client), true) = (&app.emulator, &app.client, http_delivery) {
            let url = format!("http://{addr}/dingtalk/callback");
            if let Err(e) = register_with_emulator(client, &first.callback, &url).await {
                // Not left running behind the error: server, token job, emulator, pool.
                if let Err(stopped) = app.stop().await {
                    tracing::warn!(error = %format!("{stopped:#}"), "stopping after a failed start");
                }
                return Err(e);
            }
            tracing::info!(
                emulator = %emulator.base_url(),
                callback = %url,
                "embedded DingTalk emulator running; callback registered with it (dingtalk.api_base = \"emulator\")"
            );
            // With simulated people, a simulated business app asks for approvals too.
            if config.emulator.people_pace_ms > 0 {
                let pace = Duration::from_millis(config.emulator.people_pace_ms);
                let demo = demo::run(app.pool.clone(), pace, app.shutdown.clone());
                app.workers.push(tokio::spawn(demo));
            }
        }
        let contexts: Vec<jobs::Context> = app.orgs.iter().filter_map(|o| o.jobs.clone()).collect();
        for ctx in contexts {
            match scheduler::start(ctx, &config.scheduler, &replica, app.shutdown.clone()).await {
                Ok(running) => app.schedulers.push(running),
                Err(e) => {
                    if let Err(stopped) = app.stop().await {
                        tracing::warn!(error = %format!("{stopped:#}"), "stopping after a failed start");
                    }
                    return Err(e);
                }
            }
        }
        Ok(app)
    }

    /// Database readings `/readyz` and `/metrics` have made so far: at most about one a second,
    /// however many probes arrive (tests and benchmarks count them).
    pub fn health_readings(&self) -> u64 {
        self.health.readings()
    }

    /// Applies new monthly allowances (`dingtalk.monthly_calls`, `monthly_deliveries`: the keys a
    /// SIGHUP re-reads) to the first app's client gate and `/metrics`; a pause taken under another
    /// `monthly_calls` is lifted and the outbox rows waiting for it fall due. Whether one was.
    pub async fn reload_allowances(&self, allowances: Allowances) -> anyhow::Result<bool> {
        let name = self.orgs[0].name.clone();
        self.reload_app_allowances(&name, allowances).await
    }

    /// [`App::reload_allowances`] for the app `name` (its organisation's gate, pause and
    /// allowance series only).
    pub async fn reload_app_allowances(
        &self,
        name: &str,
        allowances: Allowances,
    ) -> anyhow::Result<bool> {
        let Some(org) = self.orgs.iter().find(|o| o.name == name) else {
            anyhow::bail!("no app named {name} runs here");
        };
        self.health.set_allowances(&org.corp_id, allowances);
        let lifted = match &org.client {
            Some(client) => client.quota().set_allowances(allowances).await,
            None => {
                let now = self.ledger.clock().now();
                quota::lift_stale_pause(&self.pool, &org.corp_id, now, allowances.calls).await
            }
        }
        .context("lifting the allowance pause")?;
        if lifted {
            resume_outbox(&self.pool, &org.corp_id).await;
        }
        Ok(lifted)
    }

    /// Stops accepting, lets in-flight requests and their commits finish, and waits for that.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        for scheduler in self.schedulers {
            scheduler.stop().await;
        }
        self.task.await.context("server task")??;
        for worker in self.workers {
            worker.await.context("worker task")?;
        }
        if let Some(emulator) = self.emulator {
            emulator.stop().await;
        }
        if let Err(e) = self.ledger.flush().await {
            tracing::warn!(error = %e, "could not write the last counts of the allowance ledger");
        }
        self.pool.close().await;
        Ok(())
    }
}

/// reqwest's TLS needs a process-wide crypto provider; installing it twice is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The pause is lifted: outbox rows waiting for the allowance fall due once every replica's gate
/// has seen it.
async fn resume_outbox(pool: &PgPool, corp_id: &str) {
    match store::outbox::resume_paused(pool, corp_id, quota::PAUSE_RECHECK).await {
        Ok(0) => {}
        Ok(rows) => tracing::info!(
            rows,
            "outbox rows waiting for the monthly allowance are due again"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "could not make the outbox rows waiting for the allowance due; they are tried within 10 minutes anyway")
        }
    }
    match store::actions::resume_paused(pool, corp_id, quota::PAUSE_RECHECK).await {
        Ok(0) => {}
        Ok(rows) => tracing::info!(
            rows,
            "actions waiting for the monthly allowance are due again"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "could not make the actions waiting for the allowance due; they are tried within 10 minutes anyway")
        }
    }
}

/// `dingsync serve`: run until SIGINT or SIGTERM; on SIGHUP re-read `path` and apply the monthly
/// allowances (the other keys need a restart).
pub async fn run(config: Config, path: &Path) -> anyhow::Result<()> {
    let bound = Duration::from_millis(config.server.shutdown_timeout_ms);
    let generated_admin_token = config.emulator.admin_token.is_empty();
    // Before anything serves: a SIGHUP with no handler installed ends the process (its default
    // action), and `/metrics` answering says nothing about whether the handler is there yet.
    let mut hup = hangup_signal();
    let app = App::start(config).await?;
    if let Some(emulator) = &app.emulator
        && generated_admin_token
    {
        // Once, on stdout rather than in the log: the one secret ever shown, by design (it was
        // made for this run, and without it nobody can use the admin API).
        println!(
            "embedded DingTalk emulator: admin API token for this run: {}",
            emulator.admin_usage()
        );
    }
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            () = hangup(&mut hup) => reload(&app, path).await,
        }
    }
    tracing::info!(
        bound_ms = bound.as_millis() as u64,
        "shutting down: finishing callbacks in flight, giving back outbox claims, stopping jobs"
    );
    match tokio::time::timeout(bound, app.stop()).await {
        Ok(stopped) => stopped,
        // Nothing acknowledged depends on what is left: DingTalk retries callbacks it got no
        // `success` for, and outbox rows still claimed are taken over when their lease ends.
        Err(_) => {
            tracing::warn!("server.shutdown_timeout_ms reached; exiting with work still running");
            Ok(())
        }
    }
}

/// Starts the embedded emulator when configured, and the client when there are credentials.
async fn dingtalk_client(
    config: &Config,
    app: &AppSettings,
    pool: &PgPool,
    ledger: &Ledger,
) -> anyhow::Result<(Option<Emulator>, Option<dingtalk::Client>)> {
    install_crypto_provider();
    if config.uses_emulator() {
        let settings = &config.emulator;
        let emulator = Emulator::start(
            EmulatorConfig {
                corp_id: app.dingtalk.corp_id.clone(),
                app_key: app.dingtalk.app_key.clone(),
                app_secret: app.dingtalk.app_secret.expose().to_string(),
                time_scale: settings.time_scale,
                seed: settings.effective_seed(),
                people: (settings.people_pace_ms > 0)
                    .then(|| Duration::from_millis(settings.people_pace_ms)),
                keep_events: false,
                admin_token: (!settings.admin_token.is_empty())
                    .then(|| settings.admin_token.expose().to_string()),
                monthly_calls: settings.monthly_calls,
                monthly_deliveries: settings.monthly_deliveries,
                delivery: if settings.delivery == "stream" {
                    dingsync_emulator::Delivery::Stream
                } else {
                    dingsync_emulator::Delivery::Http
                },
            },
            "127.0.0.1:0".parse().expect("literal address"),
        )
        .await
        .context("starting the embedded DingTalk emulator")?;
        let client = dingtalk::Client::with_ledger(
            pool.clone(),
            &app.dingtalk,
            &emulator.base_url(),
            ledger.clone(),
        )?;
        return Ok((Some(emulator), Some(client)));
    }
    if !app.has_credentials() {
        tracing::warn!(
            app = %app.name,
            "no dingtalk.app_key/app_secret: serving callbacks only (no DingTalk API calls)"
        );
        return Ok((None, None));
    }
    let client = dingtalk::Client::with_ledger(
        pool.clone(),
        &app.dingtalk,
        &app.dingtalk.api_base,
        ledger.clone(),
    )?;
    Ok((None, Some(client)))
}

/// The clock pacing decisions read: real time, except with the embedded emulator running faster
/// than DingTalk (`emulator.time_scale` < 1), where dingsync's days pass as fast as the
/// emulator's, so that a month can be tried in minutes. Never for a real organisation.
fn planning_clock(config: &Config) -> Clock {
    let scale = config.emulator.time_scale;
    if config.uses_emulator() && scale < 1.0 {
        Clock::scaled(scale)
    } else {
        Clock::real()
    }
}

/// Registers our callback URL with the emulator (updating a registration left from before).
async fn register_with_emulator(
    client: &dingtalk::Client,
    secrets: &CallbackConfig,
    url: &str,
) -> anyhow::Result<()> {
    let registration = CallbackRegistration {
        call_back_tag: callback::TAGS.iter().map(|t| t.to_string()).collect(),
        token: secrets.token.expose().to_string(),
        aes_key: secrets.aes_key.expose().to_string(),
        url: url.to_string(),
    };
    match client.register_callback(&registration).await {
        Err(dingtalk::Error::Rejected { errcode: 71006, .. }) => {
            client.update_callback(&registration).await
        }
        other => other,
    }
    .context("registering the callback with the embedded emulator")
}

/// The scheduled token refresh: renews the shared token ahead of expiry, so API calls never wait
/// for a `gettoken`. (With several replicas, one fetches; the others find its token.)
async fn keep_token_fresh(client: dingtalk::Client, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = client.tokens().get().await {
            tracing::warn!(error = %e, "could not refresh the DingTalk access token");
        }
    }
}

fn router(callbacks: Arc<Callbacks>, health: health::Health, config: &Config) -> Router {
    let callback = Router::new()
        .route("/dingtalk/callback", post(callback::handle_bare))
        .route("/dingtalk/callback/{app}", post(callback::handle_app))
        .layer(axum::middleware::from_fn(callback::track))
        .with_state(callbacks);
    callback
        .route("/healthz", get(|| async { "ok" }))
        .merge(health::router(health))
        .layer(DefaultBodyLimit::max(config.server.body_limit_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.request_timeout(),
        ))
}

/// With the embedded emulator the organisation, callback secrets and app credentials are the
/// emulator's own, generated for this run (the daemon registers them with its own emulator).
/// Validation has refused any of them configured (they would be a real organisation's); they are
/// overwritten all the same, so that no configured secret can reach the emulator even on a path
/// that skipped validation. Against a real DingTalk validation has required them.
fn resolve_emulator_defaults(config: &mut Config) {
    if !config.uses_emulator() {
        return;
    }
    config.dingtalk.corp_id = EMULATOR_CORP_ID.into();
    config.dingtalk.app_key = EMULATOR_APP_KEY.into();
    config.dingtalk.app_secret = Secret::new(crypto::random_nonce(40));
    config.callback.token = Secret::new(crypto::random_nonce(32));
    config.callback.aes_key = Secret::new(crypto::random_aes_key());
    config.callback.owner_key = vec![EMULATOR_CORP_ID.into()];
    config.callback.public_url = String::new();
    tracing::info!(
        corp_id = %config.dingtalk.corp_id,
        "dingtalk.api_base = \"emulator\": the emulator's organisation, callback token, AES key and app credentials generated for this run"
    );
}

/// With Stream mode alone a real organisation configures no callback secrets (validation allows
/// it). The HTTP callback still listens, sealed with secrets made for this run and known to
/// nobody, so that it refuses every push instead of needing a second code path.
fn seal_unused_callback(app: &mut AppSettings) {
    if app.callback.token.is_empty() && app.callback.aes_key.is_empty() {
        app.callback.token = Secret::new(crypto::random_nonce(32));
        app.callback.aes_key = Secret::new(crypto::random_aes_key());
        tracing::info!(
            app = %app.name,
            "no callback token / aes_key: HTTP pushes are refused; events arrive over Stream only"
        );
    }
}

/// Outbox rows of an organisation no app here serves wait for a deployment that does: said once
/// at start-up, naming the organisation, so that a row left out of the configuration is not
/// silently pending (the insert refused only organisations never registered in `dingsync.corps`).
async fn warn_of_rows_nobody_here_sends(pool: &PgPool, apps: &[AppSettings]) {
    let served: Vec<String> = apps.iter().map(|a| a.corp_id().to_string()).collect();
    match store::outbox::open_rows_elsewhere(pool, &served).await {
        Ok(open) => {
            for (corp_id, rows) in open {
                tracing::warn!(%corp_id, rows, "outbox rows of an organisation no app of this deployment serves: another deployment must send them, or remove the organisation from dingsync.corps and cancel them");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not look for outbox rows of other organisations")
        }
    }
}

/// How an app's events are checked for their organisation: an `[[apps]]` entry's are its
/// organisation's only; the single-app form keeps serving every organisation in
/// `dingsync.corps` (`store::corps`).
async fn served(pool: &PgPool, app: &AppSettings) -> anyhow::Result<Served> {
    if app.registered {
        return Ok(Served::only(pool.clone(), app.corp_id()));
    }
    Served::load(pool.clone(), app.corp_id())
        .await
        .context("reading dingsync.corps")
}

/// SIGHUP re-reads the configuration file: what `reload` applies (each app's monthly
/// allowances, by name; an app added or removed needs a restart).
async fn reload(app: &App, path: &Path) {
    let apps = match Config::load(path).and_then(|config| config.apps()) {
        Ok(apps) => apps,
        Err(e) => {
            tracing::warn!(error = %e, "configuration reload (SIGHUP) failed; keeping the current settings");
            return;
        }
    };
    for settings in apps {
        if !app.orgs.iter().any(|o| o.name == settings.name) {
            tracing::warn!(app = %settings.name, "configuration reload (SIGHUP): a new app starts only with a restart");
            continue;
        }
        let allowances = Allowances::from_config(&settings.dingtalk);
        match app.reload_app_allowances(&settings.name, allowances).await {
            Ok(lifted) => tracing::info!(
                app = %settings.name,
                monthly_calls = allowances.calls,
                monthly_deliveries = allowances.deliveries,
                pause_lifted = lifted,
                "configuration reloaded (SIGHUP): monthly_calls and monthly_deliveries applied; other keys take effect at the next restart"
            ),
            Err(e) => {
                tracing::warn!(app = %settings.name, error = %format!("{e:#}"), "configuration reload (SIGHUP): the new allowances could not be applied")
            }
        }
    }
}

/// The process's SIGHUP stream (`None` where there is none). Installed once, before waiting, so
/// that a SIGHUP no longer ends the process (its default action) and none is missed between two
/// waits.
#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

fn hangup_signal() -> Hangup {
    #[cfg(unix)]
    {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The next SIGHUP (never, without a stream).
async fn hangup(signal: &mut Hangup) {
    #[cfg(unix)]
    if let Some(signal) = signal {
        signal.recv().await;
        return;
    }
    let _ = signal;
    std::future::pending::<()>().await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
