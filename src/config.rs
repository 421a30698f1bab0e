//! Configuration: `config.toml`, then `DINGSYNC_<SECTION>_<KEY>` environment overrides, validated
//! once at start-up. Everything else receives `&Config` (or a part of it: one app's
//! [`AppSettings`], see `apps`) and never reads the environment itself.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::Path, str::FromStr, time::Duration};

use croner::{Cron, parser::CronParser};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnectOptions;

use crate::crypto::CallbackCrypto;

mod apps;
pub use apps::{AppEntry, AppSettings, AppStream, DEFAULT_APP};

/// The value of `dingtalk.api_base` that selects the in-process emulator.
pub const EMULATOR: &str = "emulator";
/// DingTalk's address, for the messages that tell an operator what to set.
const DINGTALK_API: &str = "https://oapi.dingtalk.com";
/// The v1.0 family's address (docs/dingtalk.md §8.1: the Stream gateway).
/// Prefix of environment overrides: `DINGSYNC_DATABASE_URL` sets `[database] url`.
const ENV_PREFIX: &str = "DINGSYNC_";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub server: ServerConfig,
    pub callback: CallbackConfig,
    pub dingtalk: DingTalkConfig,
    pub ingest: IngestConfig,
    pub outbox: OutboxConfig,
    pub emulator: EmulatorSettings,
    pub stream: StreamConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub scheduler: SchedulerConfig,
    pub reconcile: ReconcileConfig,
    pub retention: RetentionConfig,
    pub forms: FormsConfig,
    /// Several apps (one per organisation) in one deployment (`config/apps.rs`); empty: the
    /// single-app form, `[dingtalk]` and `[callback]`, is the one app.
    pub apps: Vec<AppEntry>,
}

/// When each reconcile job runs: cron strings with six fields, seconds first
/// (`sec min hour day-of-month month day-of-week`), in UTC (tokio-cron-scheduler).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    pub details: String,
    pub sweep: String,
    pub backfill: String,
    pub failed: String,
    pub retention: String,
    pub forms: String,
}

/// How long dingsync keeps what it may prune (the `retention` job).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Days of raw `dingsync.events` to keep, by received_at; 0 keeps them forever. Removed by
    /// whole UTC months (`retention`), so kept up to about a month longer.
    pub events_days: u32,
    /// Days of the events' dedup keys (`dingsync.event_keys`) to keep, by received_at; 0 keeps
    /// them forever. At least `events_days`: while a key is kept, a replay of its event (the same
    /// signed push, or a redelivery) is answered `success` without being stored or applied again.
    pub event_keys_days: u32,
    /// Days of the scheduler's run log `dingsync.job_runs` to keep, by started_at; 0 keeps it
    /// forever. A job every few seconds writes tens of thousands of rows a day.
    pub job_runs_days: u32,
}

/// The typed form views (`[forms]`, `src/forms/`, the `forms` job in `src/reconcile/forms.rs`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FormsConfig {
    /// Fetch template schemas and keep the views of schema `dingsync_forms`.
    pub enabled: bool,
    /// A template with approvals created since its schema was last fetched is fetched again after
    /// this many hours (0: only when an approval shows a control the schema lacks).
    pub check_h: u64,
    /// View names by process code: `{ "PROC-..." = "expense" }`.
    pub names: BTreeMap<String, String>,
    /// Column names by control: `{ "PROC-...:TextField-K2AD4O5B" = "reason" }`.
    pub columns: BTreeMap<String, String>,
    /// Expression indexes on form columns, as `view.column`, built without blocking writes.
    pub indexes: Vec<String>,
}

/// How the reconcile jobs work (`src/reconcile/`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    #[serde(deserialize_with = "string_or_list")]
    pub process_codes: Vec<String>,
    pub detail_quiet_ms: u64,
    pub detail_max_wait_ms: u64,
    pub batch_size: u32,
    pub concurrency: u32,
    /// Times the sweep re-checks one open approval over its life (while pushes are healthy).
    pub sweep_checks: u32,
    /// Age (planner's clock) of an open approval at its first sweep check; the k-th comes at
    /// this × 4^k.
    pub sweep_first_check_h: u64,
    /// An open approval without a RUNNING task whose last event is this old (planner's clock)
    /// is missing an event: the gap check fetches it.
    pub gap_after_s: u64,
    /// Gap checks of one approval at most.
    pub gap_checks: u32,
    /// The failed-push list is drained at least this often (planner's clock), signs or not.
    /// Fractions allowed (tests run it in seconds); every drain is a background call.
    pub failed_floor_h: f64,
    /// Approvals created through the outbox this long ago without any event: pushes missing.
    pub push_silence_s: u64,
    pub backfill_days: u32,
    pub backfill_window_days: u32,
    pub backfill_overlap_s: u64,
}

/// The DingTalk emulator: embedded in `serve` when `dingtalk.api_base = "emulator"`, or
/// standalone with `dingsync emulator`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmulatorSettings {
    pub listen: String,
    pub people_pace_ms: u64,
    pub time_scale: f64,
    pub seed: u64,
    /// Bearer token of the emulator's admin API; empty: a random one per run, printed once.
    pub admin_token: Secret,
    /// Metered DingTalk API calls the emulated organisation may make a month; 0 = no limit.
    pub monthly_calls: u64,
    /// Event deliveries (push attempts) it may receive a month; 0 = no limit.
    pub monthly_deliveries: u64,
    /// How the emulator delivers events: `http` (push to the callback) or `stream` (over the
    /// app's Stream connections), as DingTalk's console chooses.
    pub delivery: String,
}

/// Stream mode (`src/stream/`): events over outbound WebSocket connections to DingTalk's
/// gateway instead of (or beside) HTTP push (docs/dingtalk.md §8).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    pub enabled: bool,
    /// Connections this replica holds.
    pub connections: usize,
    /// A connection that receives nothing (no frame, no pong) for this long is presumed dead
    /// and replaced; it is pinged after a third of it. Also how long `/readyz` tolerates no
    /// connection up.
    pub silence_limit_ms: u64,
}

/// The admin console (`src/console/`): its own listener, never the callback's port.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Where the console listens; empty: no console.
    pub listen: String,
    /// What a browser sends as the basic-auth password, or a script as `Authorization: Bearer`.
    /// Empty: no sign-in, allowed only on a loopback address. Best set from the environment
    /// (`DINGSYNC_ADMIN_TOKEN`) rather than written in the file.
    pub token: Secret,
    /// The basic-auth user name the browser sends with the token.
    pub user: String,
}

impl AdminConfig {
    /// The console's address, when it is on.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        (!self.listen.is_empty()).then(|| self.listen.parse().expect("validated at load"))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: Secret,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
    /// What `url` points at: PostgreSQL itself, or a pooler in transaction mode (`store::connect`
    /// then prepares no named statements and sends no startup options).
    pub pooler: Pooler,
    /// A URL straight to PostgreSQL (not through the pooler), for what needs a session of its
    /// own: migrations (a session-level lock) and LISTEN. Empty: `url` is used for them, which
    /// behind a transaction pooler means `serve` refuses to migrate and polls instead of LISTEN.
    pub direct_url: Secret,
}

/// `database.pooler`: whether `database.url` reaches PostgreSQL through a connection pooler that
/// hands out server connections per transaction (PgBouncer's `pool_mode = transaction`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooler {
    /// Straight to PostgreSQL, or a pooler in session mode: a connection is a session.
    #[default]
    None,
    /// A pooler in transaction mode: only a transaction is a session.
    Transaction,
}

impl DatabaseConfig {
    /// The URL for what needs a session of its own (`direct_url`, else `url`), and whether it is
    /// one (not a transaction pooler's).
    pub fn session_url(&self) -> (&Secret, bool) {
        if !self.direct_url.is_empty() {
            (&self.direct_url, true)
        } else {
            (&self.url, self.pooler == Pooler::None)
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub body_limit_bytes: usize,
    pub request_timeout_ms: u64,
    pub shutdown_timeout_ms: u64,
    /// A request's whole header must have arrived this long after the connection opened (or,
    /// on a kept-alive connection, after the request's first byte).
    pub header_timeout_ms: u64,
    /// A kept-alive connection that receives nothing for this long after a response is closed.
    pub idle_timeout_ms: u64,
    /// Connections served at once; beyond it the longest-waiting idle one is closed to make room.
    pub max_connections: usize,
    /// Connections beyond `max_connections` that serve only `/healthz`, `/readyz`, `/metrics`.
    pub probe_connections: usize,
    /// Largest request header (start line included), and the read buffer of a connection.
    pub max_header_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbackConfig {
    pub token: Secret,
    pub aes_key: Secret,
    pub public_url: String,
    /// Accepted owner keys (CorpId, AppKey or SuiteKey). A string or a list in the file; a
    /// comma-separated list in the environment.
    #[serde(deserialize_with = "string_or_list")]
    pub owner_key: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DingTalkConfig {
    pub api_base: String,
    /// Address of DingTalk's `api.dingtalk.com` APIs: the v1.0 family and the Stream gateway's
    /// `connections/open`; empty: `https://api.dingtalk.com` when `api_base` is DingTalk's old
    /// address, else `api_base` itself (the emulator serves both families). [`Self::v1_base`].
    pub openapi_base: String,
    pub app_key: String,
    pub app_secret: Secret,
    pub corp_id: String,
    pub timeout_ms: u64,
    pub qps: u32,
    pub max_attempts: u32,
    /// dingsync's share of the organisation's metered API calls a Beijing month
    /// (docs/dingtalk.md §7); 0: unmetered (a paid edition). Past it metered calls pause.
    pub monthly_calls: u64,
    /// dingsync's share of the organisation's event deliveries a month; 0: unmetered. Shown,
    /// forecast, and used up it means pushes are missing (`planner`); never refused by dingsync.
    pub monthly_deliveries: u64,
    /// Which API family creates, reads and lists approvals (docs/dingtalk.md §11). Calls only
    /// the v1.0 family has (forecast, actions, form schemas) use it whatever this says.
    pub api_family: ApiFamily,
}

/// DingTalk's two API families (docs/dingtalk.md §11).
///
/// The default is `legacy`: a deployment that upgrades without touching its configuration keeps
/// making exactly the calls its app has permissions for today. An app created for the old API
/// may hold none of the v1.0 scopes (`Workflow.Instance.Read`/`Write`), and with `v1` every
/// create and read of such an app would be refused (a refused create fails its row). DingTalk
/// recommends v1.0 for new apps, and only v1.0 can create with self-selected approvers or run
/// the forecast: new deployments set `v1` (config.toml says so), and `dingsync doctor` shows
/// which family the app's permissions allow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiFamily {
    /// `oapi.dingtalk.com`: `gettoken`, `topapi/processinstance/*`.
    #[default]
    Legacy,
    /// `api.dingtalk.com`: `/v1.0/oauth2/accessToken`, `/v1.0/workflow/*`.
    V1,
}

impl ApiFamily {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiFamily::Legacy => "legacy",
            ApiFamily::V1 => "v1",
        }
    }
}

/// The v1.0 family's address at DingTalk (docs/dingtalk.md §11).
pub const DINGTALK_API_V1: &str = "https://api.dingtalk.com";

impl DingTalkConfig {
    /// Where v1.0 calls go when the old family is at `base` (`api_base`, or the embedded
    /// emulator's URL): `openapi_base` when set; DingTalk's v1.0 address when `base` is
    /// DingTalk's old one; otherwise `base`, which then serves both families (the emulator, a
    /// test's proxy).
    pub fn v1_base(&self, base: &str) -> String {
        if !self.openapi_base.is_empty() {
            return self.openapi_base.trim_end_matches('/').to_string();
        }
        let base = base.trim_end_matches('/');
        if base == DINGTALK_API {
            DINGTALK_API_V1.to_string()
        } else {
            base.to_string()
        }
    }
}

/// The smallest nonzero `dingtalk.monthly_calls`: what one outbox row can cost in a month. Its
/// create (1), the detail fetch its first event brings (1), and, when the create's answer is lost,
/// the search for it (docs/dingtalk.md §2.1, §2.3: one `listids` page and one `get` per candidate,
/// up to 3 calls for an originator with one fresh instance). A smaller share would stop dingsync
/// in the middle of the first approval it handles.
pub const MIN_MONTHLY_CALLS: u64 = 5;

/// The `[dingtalk]` keys that count calls or deliveries a month, checked for a sign before the
/// file is read into unsigned fields (whose own message would not say what the key means).
const MONTHLY_KEYS: [&str; 2] = ["monthly_calls", "monthly_deliveries"];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub max_batch: usize,
    pub committers: usize,
}

/// The outbox worker (`dingsync.outbox` → `processinstance/create`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    pub enabled: bool,
    pub concurrency: usize,
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub lease_ms: u64,
    pub lost_settle_ms: u64,
    pub poll_ms: u64,
    /// Ask DingTalk's forecast (v1.0 `processes/forecast`, docs/dingtalk.md §11.5) before each
    /// create: a row whose route DingTalk refuses fails at once with DingTalk's reason, without
    /// a create. One extra metered call per row; off by default.
    pub forecast_check: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub filter: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database: DatabaseConfig {
                url: Secret::new("postgres://postgres@127.0.0.1:5432/dingsync"),
                max_connections: 16,
                acquire_timeout_ms: 2_000,
                pooler: Pooler::None,
                direct_url: Secret::new(""),
            },
            server: ServerConfig {
                listen: "127.0.0.1:8080".into(),
                body_limit_bytes: 64 * 1024,
                request_timeout_ms: 10_000,
                shutdown_timeout_ms: 30_000,
                header_timeout_ms: 5_000,
                idle_timeout_ms: 30_000,
                max_connections: 512,
                probe_connections: 8,
                max_header_bytes: 16 * 1024,
            },
            callback: CallbackConfig {
                token: Secret::default(),
                aes_key: Secret::default(),
                public_url: String::new(),
                owner_key: Vec::new(),
            },
            dingtalk: DingTalkConfig {
                // No default: the emulator runs only when a configuration asks for it by name
                // (the shipped config.toml does), never because a key was left out.
                api_base: String::new(),
                openapi_base: String::new(),
                app_key: String::new(),
                app_secret: Secret::default(),
                corp_id: String::new(),
                timeout_ms: 10_000,
                qps: 20,
                max_attempts: 3,
                // DingTalk's standard (free) edition: 5 000 calls and 3 000 deliveries a month.
                monthly_calls: 5_000,
                monthly_deliveries: 3_000,
                api_family: ApiFamily::Legacy,
            },
            ingest: IngestConfig {
                max_batch: 256,
                committers: 1,
            },
            outbox: OutboxConfig {
                enabled: true,
                concurrency: 16,
                max_attempts: 8,
                backoff_base_ms: 1_000,
                backoff_max_ms: 300_000,
                lease_ms: 60_000,
                lost_settle_ms: 10_000,
                poll_ms: 1_000,
                forecast_check: false,
            },
            emulator: EmulatorSettings {
                listen: "127.0.0.1:9090".into(),
                people_pace_ms: 2_000,
                time_scale: 1.0,
                seed: 0,
                admin_token: Secret::default(),
                monthly_calls: 0,
                monthly_deliveries: 0,
                delivery: "http".into(),
            },
            stream: StreamConfig {
                enabled: false,
                connections: 1,
                silence_limit_ms: 30_000,
            },
            admin: AdminConfig {
                listen: "127.0.0.1:8081".into(),
                token: Secret::default(),
                user: "admin".into(),
            },
            log: LogConfig {
                format: LogFormat::Text,
                filter: "info".into(),
            },
            scheduler: SchedulerConfig {
                details: "*/5 * * * * *".into(),
                sweep: "0 * * * * *".into(),
                backfill: "0 17 19 * * *".into(),
                failed: "30 * * * * *".into(),
                retention: "0 30 19 * * *".into(),
                forms: "20 * * * * *".into(),
            },
            reconcile: ReconcileConfig {
                process_codes: Vec::new(),
                detail_quiet_ms: 1_000,
                detail_max_wait_ms: 30_000,
                batch_size: 100,
                concurrency: 4,
                sweep_checks: 2,
                sweep_first_check_h: 48,
                gap_after_s: 600,
                gap_checks: 2,
                failed_floor_h: 6.0,
                push_silence_s: 900,
                backfill_days: 30,
                backfill_window_days: 30,
                backfill_overlap_s: 3_600,
            },
            retention: RetentionConfig {
                events_days: 180,
                event_keys_days: 400,
                job_runs_days: 30,
            },
            forms: FormsConfig {
                enabled: true,
                check_h: 24,
                names: BTreeMap::new(),
                columns: BTreeMap::new(),
                indexes: Vec::new(),
            },
            apps: Vec::new(),
        }
    }
}

macro_rules! default_from_config {
    ($($ty:ident => $field:ident),*) => {$(
        impl Default for $ty {
            fn default() -> Self {
                Config::default().$field
            }
        }
    )*};
}
default_from_config!(
    DatabaseConfig => database,
    ServerConfig => server,
    CallbackConfig => callback,
    DingTalkConfig => dingtalk,
    IngestConfig => ingest,
    OutboxConfig => outbox,
    EmulatorSettings => emulator,
    AdminConfig => admin,
    StreamConfig => stream,
    LogConfig => log,
    SchedulerConfig => scheduler,
    ReconcileConfig => reconcile,
    RetentionConfig => retention,
    FormsConfig => forms
);

/// A configuration mistake, naming the key and the rule it breaks.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

impl EmulatorSettings {
    /// The seed to run with: `emulator.seed`, or a random one when it is 0. The emulator keeps its
    /// state in memory, so a restarted embedded emulator with a fixed seed would hand out the same
    /// instance ids again, next to rows already in the database.
    pub fn effective_seed(&self) -> u64 {
        if self.seed == 0 {
            rand::random::<u64>().max(1)
        } else {
            self.seed
        }
    }
}

impl Config {
    /// Reads `path` (a missing file is an error: say which file), applies `DINGSYNC_*`
    /// overrides from the process environment and validates the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_sources(&text, &path.display().to_string(), std::env::vars())
    }

    /// The pure part of [`Config::load`]: file text plus environment pairs.
    pub fn from_sources(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let parse_err = |e: &dyn fmt::Display| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        };
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| parse_err(&e))?;
        refuse_replaced_keys(&table)?;
        apply_env(&mut table, env)?;
        check_monthly_signs(&table)?;
        apps::check_monthly_signs(&table)?;
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| parse_err(&e))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every rule a running daemon depends on, so that mistakes surface at start-up.
    pub fn validate(&self) -> Result<(), ConfigError> {
        PgConnectOptions::from_str(self.database.url.expose())
            .map_err(|e| invalid("database.url", format!("not a PostgreSQL URL: {e}")))?;
        if !self.database.direct_url.is_empty() {
            PgConnectOptions::from_str(self.database.direct_url.expose()).map_err(|e| {
                invalid("database.direct_url", format!("not a PostgreSQL URL: {e}"))
            })?;
        }
        if self.database.max_connections < 2 {
            return Err(invalid("database.max_connections", "must be at least 2"));
        }
        if self.database.acquire_timeout_ms == 0 {
            return Err(invalid(
                "database.acquire_timeout_ms",
                "must be more than 0",
            ));
        }
        SocketAddr::from_str(&self.server.listen).map_err(|e| {
            invalid(
                "server.listen",
                format!("must be an address like 0.0.0.0:8080 ({e})"),
            )
        })?;
        if self.server.body_limit_bytes < 1024 {
            return Err(invalid("server.body_limit_bytes", "must be at least 1024"));
        }
        if self.server.request_timeout_ms == 0 {
            return Err(invalid("server.request_timeout_ms", "must be more than 0"));
        }
        if self.server.shutdown_timeout_ms < self.server.request_timeout_ms {
            return Err(invalid(
                "server.shutdown_timeout_ms",
                "must be at least server.request_timeout_ms (callbacks in flight finish first)",
            ));
        }
        self.validate_connections()?;
        if self.dingtalk.timeout_ms == 0 {
            return Err(invalid("dingtalk.timeout_ms", "must be more than 0"));
        }
        if self.dingtalk.max_attempts == 0 {
            return Err(invalid("dingtalk.max_attempts", "must be at least 1"));
        }
        let calls = self.dingtalk.monthly_calls;
        // The forecast pre-check is one more metered call per row.
        let least = MIN_MONTHLY_CALLS + u64::from(self.outbox.forecast_check);
        if calls != 0 && calls < least {
            let forecast = if self.outbox.forecast_check {
                ", and outbox.forecast_check one more"
            } else {
                ""
            };
            return Err(invalid(
                "dingtalk.monthly_calls",
                format!(
                    "is {calls}, too few for one approval (a create, its detail fetch and a search for a lost answer take up to {MIN_MONTHLY_CALLS} calls{forecast}): set at least {least}, or 0 for an unmetered (paid) edition"
                ),
            ));
        }
        if !(self.emulator.time_scale > 0.0 && self.emulator.time_scale <= 1.0) {
            return Err(invalid(
                "emulator.time_scale",
                "must be more than 0 and at most 1",
            ));
        }
        SocketAddr::from_str(&self.emulator.listen).map_err(|e| {
            invalid(
                "emulator.listen",
                format!("must be an address like 127.0.0.1:9090 ({e})"),
            )
        })?;
        let admin_token = self.emulator.admin_token.expose();
        // It travels in an Authorization header; shorter ones are guessable.
        let admin_token_ok = (16..=256).contains(&admin_token.len())
            && admin_token.bytes().all(|b| b.is_ascii_graphic());
        if !admin_token.is_empty() && !admin_token_ok {
            return Err(invalid(
                "emulator.admin_token",
                "must be 16 to 256 visible ASCII characters without spaces (or empty: a random one per run)",
            ));
        }
        let url = &self.callback.public_url;
        if !(url.is_empty() || url.starts_with("https://") || url.starts_with("http://")) {
            return Err(invalid(
                "callback.public_url",
                "must be an http(s) URL ending in /dingtalk/callback",
            ));
        }
        if self.ingest.max_batch == 0 {
            return Err(invalid("ingest.max_batch", "must be at least 1"));
        }
        if self.ingest.committers == 0
            || self.ingest.committers >= self.database.max_connections as usize
        {
            return Err(invalid(
                "ingest.committers",
                "must be at least 1 and less than database.max_connections",
            ));
        }
        self.validate_outbox()?;
        self.validate_stream()?;
        self.validate_admin()?;
        if self.apps.is_empty() {
            self.validate_single_app()?;
        } else {
            self.validate_apps()?;
        }
        self.validate_reconcile()?;
        self.validate_forms()?;
        let r = &self.retention;
        // Keys pruned before their events would let a replay of a pruned key's event be refused
        // by the event row alone, and after that row is gone be stored again.
        let keys_outlive_events =
            r.event_keys_days == 0 || (r.events_days != 0 && r.event_keys_days >= r.events_days);
        if !keys_outlive_events {
            return Err(invalid(
                "retention.event_keys_days",
                "must be at least retention.events_days (or 0, forever; and 0 when events_days is 0)",
            ));
        }
        if self.log.filter.trim().is_empty() {
            return Err(invalid(
                "log.filter",
                "must not be empty (e.g. \"info\" or \"dingsync=debug,info\")",
            ));
        }
        Ok(())
    }

    /// `[dingtalk]` and `[callback]` as the one app (no `[[apps]]`).
    fn validate_single_app(&self) -> Result<(), ConfigError> {
        self.validate_api_base()?;
        self.validate_openapi_base()?;
        let emulator = self.uses_emulator();
        // With the embedded emulator empty callback secrets are generated at start-up; against a
        // real DingTalk they must be the ones registered there.
        let token = self.callback.token.expose();
        // Stream alone needs no callback secrets: then the HTTP callback refuses every push
        // (`app` seals it with secrets nobody knows).
        let stream_only = self.stream.enabled
            && token.is_empty()
            && self.callback.aes_key.is_empty()
            && self.callback.owner_key.is_empty();
        let secrets_optional = emulator || stream_only;
        let token_ok = !token.is_empty()
            && token.len() <= 64
            && token.bytes().all(|b| b.is_ascii_alphanumeric());
        if (!token.is_empty() || !secrets_optional) && !token_ok {
            return Err(invalid(
                "callback.token",
                "must be 1 to 64 characters of A-Z, a-z, 0-9 (DingTalk's console takes 3 to 32; 32 is safest)",
            ));
        }
        let aes_key = self.callback.aes_key.expose();
        if !aes_key.is_empty() || !secrets_optional {
            CallbackCrypto::new("x", aes_key)
                .map_err(|e| invalid("callback.aes_key", e.to_string()))?;
        }
        if self.callback.owner_key.iter().any(|k| k.trim().is_empty()) {
            return Err(invalid("callback.owner_key", "contains an empty entry"));
        }
        if !emulator {
            if self.callback.owner_key.is_empty() && !stream_only {
                return Err(invalid(
                    "callback.owner_key",
                    "required: the CorpId (ding...) for a callback registered with register_call_back, the AppKey for a console event subscription; list both while unsure",
                ));
            }
            if self.dingtalk.corp_id.is_empty() {
                return Err(invalid(
                    "dingtalk.corp_id",
                    "required: your organisation's CorpId (ding...)",
                ));
            }
        }
        Ok(())
    }

    /// `dingtalk.api_base` must be stated, and the embedded emulator never runs with a real
    /// organisation's keys: it would register that organisation's callback secrets with a
    /// stand-in, hand out its CorpId, and let simulated people and the demo app write approvals
    /// into the database as if they came from that organisation. The check names keys, never
    /// values.
    fn validate_api_base(&self) -> Result<(), ConfigError> {
        let base = &self.dingtalk.api_base;
        let real = self.real_organisation_keys();
        let keys = real.join(", ");
        let verb = if real.len() == 1 { "is" } else { "are" };
        if base.is_empty() {
            let message = if real.is_empty() {
                format!(
                    "not set: set it to DingTalk's address ({DINGTALK_API}), or to \"{EMULATOR}\" to run the local stand-in"
                )
            } else {
                format!(
                    "not set, and {keys} {verb} set: set dingtalk.api_base to DingTalk's address ({DINGTALK_API}); the emulator never runs with a real organisation's secrets"
                )
            };
            return Err(invalid("dingtalk.api_base", message));
        }
        if base == EMULATOR {
            if !real.is_empty() {
                return Err(invalid(
                    "dingtalk.api_base",
                    format!(
                        "is \"{EMULATOR}\" but {keys} {verb} set: the emulator never runs with a real organisation's secrets; set dingtalk.api_base to DingTalk's address ({DINGTALK_API}) or remove {keys}"
                    ),
                ));
            }
            return Ok(());
        }
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(invalid(
                "dingtalk.api_base",
                format!("must be \"{EMULATOR}\" or an http(s) URL such as {DINGTALK_API}"),
            ));
        }
        Ok(())
    }

    /// `dingtalk.openapi_base`: empty, or an http(s) URL; never beside the embedded emulator,
    /// which serves both families and the Stream gateway itself.
    fn validate_openapi_base(&self) -> Result<(), ConfigError> {
        let v1 = &self.dingtalk.openapi_base;
        if v1.is_empty() {
            return Ok(());
        }
        if self.uses_emulator() {
            return Err(invalid(
                "dingtalk.openapi_base",
                format!(
                    "must be empty with dingtalk.api_base = \"{EMULATOR}\" (the emulator serves both API families)"
                ),
            ));
        }
        if !(v1.starts_with("https://") || v1.starts_with("http://")) {
            return Err(invalid(
                "dingtalk.openapi_base",
                format!("must be empty or an http(s) URL such as {DINGTALK_API_V1}"),
            ));
        }
        Ok(())
    }

    /// The listener's limits (`src/server.rs`): each must be set, none may be unbounded.
    fn validate_connections(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.header_timeout_ms == 0 || s.header_timeout_ms > 60_000 {
            return Err(invalid("server.header_timeout_ms", "must be 1 to 60000"));
        }
        if s.idle_timeout_ms == 0 || s.idle_timeout_ms > 600_000 {
            return Err(invalid("server.idle_timeout_ms", "must be 1 to 600000"));
        }
        // The cap's slots are scanned for an idle one when it is reached: keep that short.
        if s.max_connections == 0 || s.max_connections > 65_536 {
            return Err(invalid("server.max_connections", "must be 1 to 65536"));
        }
        // At least one, so that /healthz answers while every other connection is busy.
        if s.probe_connections == 0 || s.probe_connections > 1024 {
            return Err(invalid("server.probe_connections", "must be 1 to 1024"));
        }
        // hyper allows no read buffer under 8 KiB (its first allocation).
        if s.max_header_bytes < 8192 || s.max_header_bytes > 1 << 20 {
            return Err(invalid(
                "server.max_header_bytes",
                "must be 8192 to 1048576",
            ));
        }
        Ok(())
    }

    /// The keys set that only make sense against a real organisation: its app's credentials, its
    /// CorpId, and the callback as registered at DingTalk (secrets, owner keys, public URL). With
    /// the embedded emulator all of them are generated or implied for the run.
    pub fn real_organisation_keys(&self) -> Vec<&'static str> {
        let (d, c) = (&self.dingtalk, &self.callback);
        [
            ("dingtalk.app_key", !d.app_key.is_empty()),
            ("dingtalk.app_secret", !d.app_secret.is_empty()),
            ("dingtalk.corp_id", !d.corp_id.is_empty()),
            ("callback.token", !c.token.is_empty()),
            ("callback.aes_key", !c.aes_key.is_empty()),
            ("callback.owner_key", !c.owner_key.is_empty()),
            ("callback.public_url", !c.public_url.is_empty()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }

    fn validate_outbox(&self) -> Result<(), ConfigError> {
        let o = &self.outbox;
        if o.concurrency == 0 || o.concurrency > 1024 {
            return Err(invalid("outbox.concurrency", "must be 1 to 1024"));
        }
        if o.max_attempts == 0 {
            return Err(invalid("outbox.max_attempts", "must be at least 1"));
        }
        if o.backoff_base_ms == 0 || o.backoff_max_ms < o.backoff_base_ms {
            return Err(invalid(
                "outbox.backoff_base_ms",
                "must be more than 0 and at most outbox.backoff_max_ms",
            ));
        }
        if o.poll_ms == 0 {
            return Err(invalid("outbox.poll_ms", "must be more than 0"));
        }
        // A create is cut off at half the lease, and must get at least one whole DingTalk call.
        if o.lease_ms < 2 * self.dingtalk.timeout_ms {
            return Err(invalid(
                "outbox.lease_ms",
                format!(
                    "must be at least twice dingtalk.timeout_ms ({} ms): a create may take half the lease",
                    self.dingtalk.timeout_ms
                ),
            ));
        }
        // A worker that stopped mid-send is searched for when its lease ends, at least half a
        // lease after its last possible send: that must cover the settle time too.
        if o.lost_settle_ms > o.lease_ms / 2 {
            return Err(invalid(
                "outbox.lost_settle_ms",
                "must be at most half of outbox.lease_ms",
            ));
        }
        Ok(())
    }

    /// The `[scheduler]` and `[reconcile]` rules, naming the key that breaks one.
    fn validate_reconcile(&self) -> Result<(), ConfigError> {
        let s = &self.scheduler;
        for (key, schedule) in [
            ("scheduler.details", &s.details),
            ("scheduler.sweep", &s.sweep),
            ("scheduler.backfill", &s.backfill),
            ("scheduler.failed", &s.failed),
            ("scheduler.retention", &s.retention),
            ("scheduler.forms", &s.forms),
        ] {
            parse_schedule(schedule).map_err(|e| invalid(key, e))?;
        }
        let r = &self.reconcile;
        if r.process_codes.iter().any(|c| c.trim().is_empty()) {
            return Err(invalid(
                "reconcile.process_codes",
                "contains an empty entry",
            ));
        }
        if r.batch_size == 0 {
            return Err(invalid("reconcile.batch_size", "must be at least 1"));
        }
        if r.concurrency == 0 || r.concurrency >= self.database.max_connections {
            return Err(invalid(
                "reconcile.concurrency",
                "must be at least 1 and less than database.max_connections",
            ));
        }
        if r.detail_max_wait_ms < r.detail_quiet_ms {
            return Err(invalid(
                "reconcile.detail_max_wait_ms",
                "must be at least reconcile.detail_quiet_ms",
            ));
        }
        if r.sweep_checks > 10 {
            return Err(invalid("reconcile.sweep_checks", "must be 0 to 10"));
        }
        if !(1..=24 * 366).contains(&r.sweep_first_check_h) {
            return Err(invalid(
                "reconcile.sweep_first_check_h",
                "must be 1 to 8784 (a year)",
            ));
        }
        if !(1..=86_400).contains(&r.gap_after_s) {
            return Err(invalid("reconcile.gap_after_s", "must be 1 to 86400"));
        }
        if r.gap_checks > 10 {
            return Err(invalid("reconcile.gap_checks", "must be 0 to 10"));
        }
        if !(0.01..=744.0).contains(&r.failed_floor_h) {
            return Err(invalid(
                "reconcile.failed_floor_h",
                "must be 0.01 to 744 hours (DingTalk keeps failed pushes for days, docs/dingtalk.md §3)",
            ));
        }
        if !(60..=86_400).contains(&r.push_silence_s) {
            return Err(invalid(
                "reconcile.push_silence_s",
                "must be 60 to 86400 (DingTalk pushes a start event within seconds of a create)",
            ));
        }
        // DingTalk's listids limits (docs/dingtalk.md §2.4): a window spans at most 120 days and starts
        // within the last 365 days.
        if !(1..=120).contains(&r.backfill_window_days) {
            return Err(invalid(
                "reconcile.backfill_window_days",
                "must be 1 to 120 (DingTalk's listids window is at most 120 days)",
            ));
        }
        if !(1..=364).contains(&r.backfill_days) {
            return Err(invalid(
                "reconcile.backfill_days",
                "must be 1 to 364 (listids only reaches the last 365 days)",
            ));
        }
        if r.backfill_overlap_s >= u64::from(r.backfill_window_days) * 86_400 {
            return Err(invalid(
                "reconcile.backfill_overlap_s",
                "must be shorter than reconcile.backfill_window_days",
            ));
        }
        Ok(())
    }

    /// `admin.*`: the console reads every approval and can retry or cancel outbox rows and
    /// actions, so anywhere but the loopback it needs a token.
    fn validate_admin(&self) -> Result<(), ConfigError> {
        let admin = &self.admin;
        if admin.listen.is_empty() {
            return Ok(());
        }
        let addr = SocketAddr::from_str(&admin.listen).map_err(|e| {
            invalid(
                "admin.listen",
                format!("must be an address like 127.0.0.1:8081, or empty for no console ({e})"),
            )
        })?;
        if addr.port() != 0 && admin.listen == self.server.listen {
            return Err(invalid(
                "admin.listen",
                "must not be server.listen: the console never shares the callback's port",
            ));
        }
        if !addr.ip().is_loopback() && admin.token.is_empty() {
            return Err(invalid(
                "admin.token",
                format!(
                    "must be set (DINGSYNC_ADMIN_TOKEN) when admin.listen is not a loopback \
                     address ({addr}): the console would be open to anyone who can reach it"
                ),
            ));
        }
        if !admin.token.is_empty() && admin.token.expose().len() < 16 {
            return Err(invalid("admin.token", "must be at least 16 characters"));
        }
        if admin.user.is_empty() || admin.user.contains(':') {
            return Err(invalid(
                "admin.user",
                "must be a user name without ':' (basic auth)",
            ));
        }
        Ok(())
    }

    /// `stream.*` and `emulator.delivery` (`dingtalk.openapi_base`: `validate_openapi_base`).
    fn validate_stream(&self) -> Result<(), ConfigError> {
        if !matches!(self.emulator.delivery.as_str(), "http" | "stream") {
            return Err(invalid(
                "emulator.delivery",
                "must be \"http\" (push to the callback URL) or \"stream\" (over Stream connections)",
            ));
        }
        let s = &self.stream;
        if !(1..=64).contains(&s.connections) {
            return Err(invalid("stream.connections", "must be 1 to 64"));
        }
        if !(500..=600_000).contains(&s.silence_limit_ms) {
            return Err(invalid(
                "stream.silence_limit_ms",
                "must be 500 to 600000 (DingTalk pings about every 30 s; 30000 is a good limit)",
            ));
        }
        if s.enabled
            && !self.uses_emulator()
            && (self.dingtalk.app_key.is_empty() || self.dingtalk.app_secret.is_empty())
        {
            return Err(invalid(
                "stream.enabled",
                "needs dingtalk.app_key and dingtalk.app_secret (a Stream connection is opened with the app's credentials)",
            ));
        }
        Ok(())
    }

    /// `[forms]`: names that can be identifiers, keys of the documented shapes.
    fn validate_forms(&self) -> Result<(), ConfigError> {
        let f = &self.forms;
        if f.check_h > 24 * 366 {
            return Err(invalid("forms.check_h", "must be 0 to 8784 (a year)"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (code, name) in &f.names {
            if code.trim().is_empty() {
                return Err(invalid("forms.names", "has an empty process code"));
            }
            if !view_identifier_ok(name, 40) {
                return Err(invalid(
                    &format!("forms.names.\"{code}\""),
                    "must be 1 to 40 bytes of lower-case letters, digits and _ (letters of any script), not starting with a digit",
                ));
            }
            if !seen.insert(name) {
                return Err(invalid(
                    &format!("forms.names.\"{code}\""),
                    format!("{name:?} is the name of another template's view"),
                ));
            }
        }
        for (key, name) in &f.columns {
            let shape_ok = key
                .split_once(':')
                .is_some_and(|(code, id)| !code.trim().is_empty() && !id.trim().is_empty());
            if !shape_ok {
                return Err(invalid(
                    &format!("forms.columns.\"{key}\""),
                    "the key must be \"PROC-...:<control id>\"",
                ));
            }
            if !view_identifier_ok(name, 63) {
                return Err(invalid(
                    &format!("forms.columns.\"{key}\""),
                    "must be 1 to 63 bytes of lower-case letters, digits and _ (letters of any script), not starting with a digit",
                ));
            }
        }
        for index in &f.indexes {
            let ok = index.split_once('.').is_some_and(|(view, column)| {
                !view.is_empty() && !column.is_empty() && !column.contains('.')
            });
            if !ok {
                return Err(invalid(
                    "forms.indexes",
                    format!("{index:?} must be \"view.column\" (a view of schema dingsync_forms)"),
                ));
            }
        }
        Ok(())
    }

    pub fn uses_emulator(&self) -> bool {
        self.dingtalk.api_base == EMULATOR
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.server.listen.parse().expect("validated at load")
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.server.request_timeout_ms)
    }
}

/// Whether `name` is a name dingsync would choose itself for a form view or column: it is then
/// used as is, never rewritten behind the operator's back.
fn view_identifier_ok(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && !name.starts_with(|c: char| c.is_ascii_digit() || c == '_')
        && name
            .chars()
            .all(|c| c == '_' || (c.is_alphanumeric() && !c.is_uppercase()))
}

/// Keys of earlier versions that were replaced: (section, key, what replaces it).
const REPLACED_KEYS: [(&str, &str, &str); 3] = [
    (
        "reconcile",
        "sweep_min_interval_s",
        "reconcile.sweep_first_check_h and reconcile.sweep_checks (the sweep re-checks an open approval a bounded number of times)",
    ),
    (
        "reconcile",
        "sweep_max_interval_s",
        "reconcile.sweep_first_check_h and reconcile.sweep_checks (the sweep re-checks an open approval a bounded number of times)",
    ),
    (
        "reconcile",
        "sweep_age_divisor",
        "reconcile.sweep_first_check_h and reconcile.sweep_checks (checks at sweep_first_check_h x 4^k)",
    ),
];

/// A file written for an earlier version gets a message naming the replacement, rather than
/// serde's list of every known key.
fn refuse_replaced_keys(table: &toml::Table) -> Result<(), ConfigError> {
    for (section, key, replacement) in REPLACED_KEYS {
        if table
            .get(section)
            .and_then(|s| s.as_table())
            .is_some_and(|s| s.contains_key(key))
        {
            return Err(invalid(
                &format!("{section}.{key}"),
                format!("was removed; use {replacement}"),
            ));
        }
    }
    Ok(())
}

/// Overrides `table[section][key]` from `DINGSYNC_SECTION_KEY`. The value is parsed as the type the
/// key has in the defaults, so `DINGSYNC_DATABASE_MAX_CONNECTIONS=32` becomes an integer; an
/// unknown key is an error rather than a silently ignored typo.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let defaults = toml::Table::try_from(Config::default()).expect("defaults serialize");
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in env {
        if let Some(rest) = name.strip_prefix(ENV_PREFIX) {
            vars.insert(rest.to_ascii_lowercase(), value);
        }
    }
    for (rest, value) in vars {
        let env_name = format!("{ENV_PREFIX}{}", rest.to_ascii_uppercase());
        if let Some(app) = rest.strip_prefix("apps_") {
            apps::apply_env(table, app, value, &env_name)?;
            continue;
        }
        let Some((section, key)) = rest.split_once('_') else {
            return Err(invalid(
                &env_name,
                "is not of the form DINGSYNC_<SECTION>_<KEY>",
            ));
        };
        let Some(default) = defaults.get(section).and_then(|s| s.get(key)) else {
            if let Some((_, _, replacement)) = REPLACED_KEYS
                .iter()
                .find(|(s, k, _)| *s == section && *k == key)
            {
                return Err(invalid(
                    &env_name,
                    format!("{section}.{key} was removed; use {replacement}"),
                ));
            }
            return Err(invalid(
                &env_name,
                format!("there is no key {section}.{key}"),
            ));
        };
        let dotted = format!("{section}.{key} (from {env_name})");
        let parsed = match default {
            toml::Value::Integer(_) => toml::Value::Integer(
                value
                    .trim()
                    .parse()
                    .map_err(|_| invalid(&dotted, "must be a whole number"))?,
            ),
            toml::Value::Float(_) => toml::Value::Float(
                value
                    .trim()
                    .parse()
                    .map_err(|_| invalid(&dotted, "must be a number such as 0.5"))?,
            ),
            toml::Value::Boolean(_) => toml::Value::Boolean(
                value
                    .trim()
                    .parse()
                    .map_err(|_| invalid(&dotted, "must be true or false"))?,
            ),
            // A table as `key=value` pairs separated by commas:
            // DINGSYNC_FORMS_NAMES="PROC-A=expense,PROC-B=leave".
            toml::Value::Table(_) => {
                let mut pairs = toml::Table::new();
                for pair in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let (k, v) = pair.split_once('=').ok_or_else(|| {
                        invalid(&dotted, "must be key=value pairs separated by commas")
                    })?;
                    pairs.insert(
                        k.trim().to_string(),
                        toml::Value::String(v.trim().to_string()),
                    );
                }
                toml::Value::Table(pairs)
            }
            toml::Value::Array(_) => toml::Value::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
            ),
            _ => toml::Value::String(value),
        };
        let section_table = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match section_table {
            toml::Value::Table(t) => {
                t.insert(key.to_string(), parsed);
            }
            _ => return Err(invalid(section, "must be a table")),
        }
    }
    Ok(())
}

/// A negative `dingtalk.monthly_calls` or `monthly_deliveries` named as such: read into an
/// unsigned field it would only be "invalid value: integer `-1`, expected u64".
fn check_monthly_signs(table: &toml::Table) -> Result<(), ConfigError> {
    let Some(dingtalk) = table.get("dingtalk").and_then(toml::Value::as_table) else {
        return Ok(());
    };
    for key in MONTHLY_KEYS {
        if let Some(value) = dingtalk.get(key).and_then(toml::Value::as_integer)
            && value < 0
        {
            let what = if key == "monthly_calls" {
                "calls"
            } else {
                "deliveries"
            };
            return Err(invalid(
                &format!("dingtalk.{key}"),
                format!(
                    "is {value}: must be 0 (unmetered) or a positive number of {what} per month"
                ),
            ));
        }
    }
    Ok(())
}

fn string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        OneOrMany::Many(v) => v,
    })
}

/// A secret (token, key, password-bearing URL). `Debug` and `Display` print `***` so that a
/// logged config or error can never leak it; [`Secret::expose`] is the one way to read it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Parses a schedule as tokio-cron-scheduler does: six fields `sec min hour day-of-month month
/// day-of-week`, seconds required.
pub fn parse_schedule(schedule: &str) -> Result<Cron, String> {
    CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(schedule)
        .map_err(|e| {
            format!("{schedule:?} is not a cron schedule with six fields (sec min hour day-of-month month day-of-week): {e}")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../config.toml");

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_sources(
            text,
            "test.toml",
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn a_console_beyond_the_loopback_needs_a_token_and_its_own_port() {
        let shipped = load(SHIPPED, &[]).unwrap();
        assert_eq!(shipped.admin.listen, "127.0.0.1:8081");
        assert!(shipped.admin.token.is_empty());
        let open = [("DINGSYNC_ADMIN_LISTEN", "0.0.0.0:8081")];
        let err = load(SHIPPED, &open).unwrap_err().to_string();
        assert!(
            err.contains("admin.token") && err.contains("DINGSYNC_ADMIN_TOKEN"),
            "{err}"
        );
        let token = ("DINGSYNC_ADMIN_TOKEN", "0123456789abcdef0123");
        let config = load(SHIPPED, &[open[0], token]).unwrap();
        assert_eq!(config.admin.token.expose(), token.1);
        let short = load(SHIPPED, &[open[0], ("DINGSYNC_ADMIN_TOKEN", "short")]);
        assert!(short.unwrap_err().to_string().contains("admin.token"));
        let shared = load(SHIPPED, &[("DINGSYNC_ADMIN_LISTEN", "127.0.0.1:8080")]);
        assert!(shared.unwrap_err().to_string().contains("admin.listen"));
        let off = load(SHIPPED, &[("DINGSYNC_ADMIN_LISTEN", "")]).unwrap();
        assert_eq!(off.admin.listen_addr(), None);
    }

    /// The shipped config.toml without its `api_base` line.
    fn without_api_base() -> String {
        let line = "api_base = \"emulator\"\n";
        assert!(SHIPPED.contains(line));
        SHIPPED.replace(line, "")
    }

    #[test]
    fn shipped_config_toml_is_valid_and_equals_the_defaults() {
        let config = load(SHIPPED, &[]).unwrap();
        assert_eq!(config.dingtalk.api_base, EMULATOR);
        // api_base alone has no default: the shipped file names the emulator itself.
        let mut defaults = Config::default();
        assert_eq!(defaults.dingtalk.api_base, "");
        defaults.dingtalk.api_base = EMULATOR.into();
        assert_eq!(
            toml::Table::try_from(&config).unwrap(),
            toml::Table::try_from(&defaults).unwrap(),
            "config.toml and Config::default() disagree"
        );
    }

    #[test]
    fn a_replaced_sweep_key_names_its_replacement_in_the_file_and_the_environment() {
        let old = SHIPPED.replace("[reconcile]\n", "[reconcile]\nsweep_age_divisor = 10\n");
        let e = load(&old, &[]).unwrap_err().to_string();
        assert!(
            e.starts_with("reconcile.sweep_age_divisor: was removed")
                && e.contains("reconcile.sweep_first_check_h"),
            "{e}"
        );
        let e = load(
            SHIPPED,
            &[("DINGSYNC_RECONCILE_SWEEP_MIN_INTERVAL_S", "60")],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("reconcile.sweep_checks"), "{e}");
    }

    #[test]
    fn environment_overrides_keys_with_their_types() {
        let config = load(
            SHIPPED,
            &[
                ("DINGSYNC_DATABASE_URL", "postgres://u@db:5432/x"),
                ("DINGSYNC_DATABASE_MAX_CONNECTIONS", "32"),
                ("DINGSYNC_RECONCILE_PROCESS_CODES", "PROC-A, PROC-B"),
                ("DINGSYNC_SERVER_LISTEN", "0.0.0.0:9000"),
                ("DINGSYNC_EMULATOR_TIME_SCALE", "0.01"),
                ("DINGSYNC_OUTBOX_ENABLED", "false"),
                ("OTHER_VAR", "ignored"),
            ],
        )
        .unwrap();
        assert_eq!(config.database.url.expose(), "postgres://u@db:5432/x");
        assert_eq!(config.database.max_connections, 32);
        assert_eq!(config.emulator.time_scale, 0.01);
        assert!(!config.outbox.enabled);
        assert_eq!(config.reconcile.process_codes, vec!["PROC-A", "PROC-B"]);
        assert_eq!(config.server.listen, "0.0.0.0:9000");
    }

    #[test]
    fn forms_names_and_columns_come_from_the_file_or_the_environment_and_are_checked() {
        let file = SHIPPED.replace(
            "names = {}",
            "names = { \"PROC-A\" = \"expense\", \"PROC-B\" = \"请假\" }",
        );
        let config = load(&file, &[]).unwrap();
        assert_eq!(config.forms.names["PROC-B"], "请假");
        let config = load(
            SHIPPED,
            &[
                ("DINGSYNC_FORMS_NAMES", "PROC-A=expense, PROC-B=leave"),
                ("DINGSYNC_FORMS_COLUMNS", "PROC-A:TextField-1=reason"),
                ("DINGSYNC_FORMS_INDEXES", "expense.amount"),
            ],
        )
        .unwrap();
        assert_eq!(config.forms.names["PROC-A"], "expense");
        assert_eq!(config.forms.columns["PROC-A:TextField-1"], "reason");
        assert_eq!(config.forms.indexes, ["expense.amount"]);
        for (env, value, key) in [
            (
                "DINGSYNC_FORMS_NAMES",
                "PROC-A=Expense",
                "forms.names.\"PROC-A\"",
            ),
            (
                "DINGSYNC_FORMS_NAMES",
                "PROC-A=x,PROC-B=x",
                "forms.names.\"PROC-B\"",
            ),
            (
                "DINGSYNC_FORMS_NAMES",
                "PROC-A",
                "forms.names (from DINGSYNC_FORMS_NAMES)",
            ),
            (
                "DINGSYNC_FORMS_COLUMNS",
                "TextField-1=reason",
                "forms.columns.\"TextField-1\"",
            ),
            ("DINGSYNC_FORMS_INDEXES", "amount", "forms.indexes"),
        ] {
            let e = load(SHIPPED, &[(env, value)]).unwrap_err().to_string();
            assert!(e.starts_with(key), "{env}={value}: {e}");
        }
    }

    #[test]
    fn unknown_environment_key_is_named_in_the_error() {
        let err = load(SHIPPED, &[("DINGSYNC_DATABASE_URI", "x")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("DINGSYNC_DATABASE_URI") && err.contains("database.uri"),
            "{err}"
        );
    }

    #[test]
    fn unknown_file_key_is_an_error() {
        let err = load("[server]\nlisten_on = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_on"), "{err}");
    }

    #[test]
    fn bad_aes_key_names_the_key_and_the_rule() {
        let err = load(
            SHIPPED,
            &[
                ("DINGSYNC_DINGTALK_API_BASE", "https://oapi.dingtalk.com"),
                ("DINGSYNC_CALLBACK_TOKEN", "tok123"),
                ("DINGSYNC_CALLBACK_AES_KEY", "tooshort"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("callback.aes_key:") && err.contains("43"),
            "{err}"
        );
    }

    #[test]
    fn non_numeric_override_names_the_key() {
        let err = load(SHIPPED, &[("DINGSYNC_DATABASE_MAX_CONNECTIONS", "many")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("database.max_connections") && err.contains("whole number"),
            "{err}"
        );
    }

    #[test]
    fn real_dingtalk_requires_callback_secrets_owner_key_and_corp_id() {
        let base = [("DINGSYNC_DINGTALK_API_BASE", "https://oapi.dingtalk.com")];
        let err = load(SHIPPED, &base).unwrap_err().to_string();
        assert!(err.starts_with("callback.token:"), "{err}");
        let mut env = base.to_vec();
        env.push(("DINGSYNC_CALLBACK_TOKEN", "tok123"));
        env.push((
            "DINGSYNC_CALLBACK_AES_KEY",
            "1234567890123456789012345678901234567890123",
        ));
        let err = load(SHIPPED, &env).unwrap_err().to_string();
        assert!(err.starts_with("callback.owner_key:"), "{err}");
        env.push(("DINGSYNC_CALLBACK_OWNER_KEY", "dingcorp"));
        let err = load(SHIPPED, &env).unwrap_err().to_string();
        assert!(err.starts_with("dingtalk.corp_id:"), "{err}");
        env.push(("DINGSYNC_DINGTALK_CORP_ID", "dingcorp"));
        load(SHIPPED, &env).unwrap();
    }

    /// Each key that only makes sense against a real organisation, with a value that must never
    /// appear in a message.
    const REAL_KEYS: [(&str, &str, &str); 7] = [
        (
            "DINGSYNC_DINGTALK_APP_KEY",
            "dingtalk.app_key",
            "dingrealappkey777",
        ),
        (
            "DINGSYNC_DINGTALK_APP_SECRET",
            "dingtalk.app_secret",
            "RealAppSecretValue777",
        ),
        (
            "DINGSYNC_DINGTALK_CORP_ID",
            "dingtalk.corp_id",
            "dingrealcorp777",
        ),
        (
            "DINGSYNC_CALLBACK_TOKEN",
            "callback.token",
            "RealCallbackToken777",
        ),
        (
            "DINGSYNC_CALLBACK_AES_KEY",
            "callback.aes_key",
            "RealAesKey777RealAesKey777RealAesKey7770000",
        ),
        (
            "DINGSYNC_CALLBACK_OWNER_KEY",
            "callback.owner_key",
            "dingrealowner777",
        ),
        (
            "DINGSYNC_CALLBACK_PUBLIC_URL",
            "callback.public_url",
            "https://real777.example.com/dingtalk/callback",
        ),
    ];

    #[test]
    fn the_emulator_with_any_real_organisation_key_is_refused_naming_the_key_not_its_value() {
        for (env, key, value) in REAL_KEYS {
            let err = load(SHIPPED, &[(env, value)]).unwrap_err().to_string();
            assert!(
                err.starts_with("dingtalk.api_base: is \"emulator\" but ")
                    && err.contains(&format!("{key} is set"))
                    && err.contains("https://oapi.dingtalk.com")
                    && err.contains(&format!("remove {key}")),
                "{err}"
            );
            assert!(!err.contains(value), "the value of {key} leaked: {err}");
        }
        let all: Vec<(&str, &str)> = REAL_KEYS.iter().map(|(e, _, v)| (*e, *v)).collect();
        let err = load(SHIPPED, &all).unwrap_err().to_string();
        for (_, key, value) in REAL_KEYS {
            assert!(err.contains(key) && !err.contains(value), "{err}");
        }
        assert!(err.contains(" are set"), "{err}");
    }

    #[test]
    fn a_config_without_api_base_is_refused_and_with_secrets_is_pointed_at_dingtalk() {
        let text = without_api_base();
        let err = load(&text, &[]).unwrap_err().to_string();
        assert!(
            err.starts_with("dingtalk.api_base: not set: ")
                && err.contains("https://oapi.dingtalk.com")
                && err.contains("\"emulator\""),
            "{err}"
        );
        let secrets = [
            ("DINGSYNC_CALLBACK_TOKEN", "RealCallbackToken777"),
            ("DINGSYNC_CALLBACK_OWNER_KEY", "dingrealcorp777"),
        ];
        let err = load(&text, &secrets).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "dingtalk.api_base: not set, and callback.token, callback.owner_key are set"
            ) && err.contains("https://oapi.dingtalk.com"),
            "{err}"
        );
        assert!(!err.contains("RealCallbackToken777") && !err.contains("dingrealcorp777"));
    }

    #[test]
    fn a_standalone_emulator_at_its_url_takes_the_credentials_like_any_dingtalk() {
        let mut env: Vec<(&str, &str)> = REAL_KEYS.iter().map(|(e, _, v)| (*e, *v)).collect();
        env.push(("DINGSYNC_DINGTALK_API_BASE", "http://127.0.0.1:9090"));
        let config = load(SHIPPED, &env).unwrap();
        assert!(!config.uses_emulator());
    }

    #[test]
    fn the_admin_token_comes_from_the_environment_is_checked_and_prints_as_stars() {
        let token = "0123456789abcdef0123";
        let config = load(SHIPPED, &[("DINGSYNC_EMULATOR_ADMIN_TOKEN", token)]).unwrap();
        assert_eq!(config.emulator.admin_token.expose(), token);
        assert!(!format!("{config:?}").contains(token));
        for bad in ["short", "has a space in it ok?"] {
            let err = load(SHIPPED, &[("DINGSYNC_EMULATOR_ADMIN_TOKEN", bad)])
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("emulator.admin_token:") && !err.contains(bad),
                "{err}"
            );
        }
    }

    #[test]
    fn every_shipped_schedule_parses() {
        let s = load(SHIPPED, &[]).unwrap().scheduler;
        for schedule in [&s.details, &s.sweep, &s.backfill, &s.failed, &s.retention] {
            parse_schedule(schedule).unwrap_or_else(|e| panic!("{schedule}: {e}"));
        }
    }

    #[test]
    fn a_bad_schedule_or_window_names_its_key() {
        let err = load(SHIPPED, &[("DINGSYNC_SCHEDULER_SWEEP", "every minute")])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("scheduler.sweep:"), "{err}");
        let err = load(SHIPPED, &[("DINGSYNC_SCHEDULER_FAILED", "0 * * * *")])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("scheduler.failed:"), "{err}");
        let err = load(
            SHIPPED,
            &[("DINGSYNC_RECONCILE_BACKFILL_WINDOW_DAYS", "121")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("reconcile.backfill_window_days:") && err.contains("120"),
            "{err}"
        );
    }

    #[test]
    fn event_keys_are_kept_at_least_as_long_as_events() {
        let config = load(SHIPPED, &[]).unwrap();
        assert_eq!(
            (
                config.retention.events_days,
                config.retention.event_keys_days
            ),
            (180, 400)
        );
        for (events, keys) in [("180", "179"), ("0", "400"), ("30", "29")] {
            let err = load(
                SHIPPED,
                &[
                    ("DINGSYNC_RETENTION_EVENTS_DAYS", events),
                    ("DINGSYNC_RETENTION_EVENT_KEYS_DAYS", keys),
                ],
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.starts_with("retention.event_keys_days:"),
                "{events}/{keys}: {err}"
            );
        }
        for (events, keys) in [("180", "180"), ("180", "0"), ("0", "0"), ("1", "36500")] {
            let config = load(
                SHIPPED,
                &[
                    ("DINGSYNC_RETENTION_EVENTS_DAYS", events),
                    ("DINGSYNC_RETENTION_EVENT_KEYS_DAYS", keys),
                ],
            );
            assert!(config.is_ok(), "{events}/{keys}");
        }
    }

    #[test]
    fn connection_limits_are_bounded_and_name_their_key() {
        for (var, value, key) in [
            (
                "DINGSYNC_SERVER_HEADER_TIMEOUT_MS",
                "0",
                "server.header_timeout_ms:",
            ),
            (
                "DINGSYNC_SERVER_IDLE_TIMEOUT_MS",
                "0",
                "server.idle_timeout_ms:",
            ),
            (
                "DINGSYNC_SERVER_MAX_CONNECTIONS",
                "0",
                "server.max_connections:",
            ),
            (
                "DINGSYNC_SERVER_PROBE_CONNECTIONS",
                "0",
                "server.probe_connections:",
            ),
            (
                "DINGSYNC_SERVER_MAX_HEADER_BYTES",
                "4096",
                "server.max_header_bytes:",
            ),
            (
                "DINGSYNC_SERVER_MAX_HEADER_BYTES",
                "400000000",
                "server.max_header_bytes:",
            ),
        ] {
            let err = load(SHIPPED, &[(var, value)]).unwrap_err().to_string();
            assert!(err.starts_with(key), "{var}={value}: {err}");
        }
    }

    #[test]
    fn retention_days_and_schedule_come_from_the_environment_and_are_checked() {
        let config = load(
            SHIPPED,
            &[
                ("DINGSYNC_RETENTION_EVENTS_DAYS", "0"),
                ("DINGSYNC_RETENTION_EVENT_KEYS_DAYS", "0"),
            ],
        )
        .unwrap();
        assert_eq!(config.retention.events_days, 0);
        let err = load(SHIPPED, &[("DINGSYNC_SCHEDULER_RETENTION", "daily")])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("scheduler.retention:"), "{err}");
    }

    #[test]
    fn a_negative_or_too_small_monthly_allowance_is_refused_naming_the_key() {
        let config = load(SHIPPED, &[]).unwrap();
        assert_eq!(
            (
                config.dingtalk.monthly_calls,
                config.dingtalk.monthly_deliveries
            ),
            (5_000, 3_000)
        );
        let err = load(SHIPPED, &[("DINGSYNC_DINGTALK_MONTHLY_CALLS", "-1")])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("dingtalk.monthly_calls:")
                && err.contains("0 (unmetered) or a positive number of calls per month"),
            "{err}"
        );
        let text = SHIPPED.replace("monthly_deliveries = 3000", "monthly_deliveries = -7");
        let err = load(&text, &[]).unwrap_err().to_string();
        assert!(err.starts_with("dingtalk.monthly_deliveries:"), "{err}");
        let err = load(SHIPPED, &[("DINGSYNC_DINGTALK_MONTHLY_CALLS", "4")])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("dingtalk.monthly_calls:") && err.contains("at least 5"),
            "{err}"
        );
        for ok in ["0", "5", "200000"] {
            let config = load(SHIPPED, &[("DINGSYNC_DINGTALK_MONTHLY_CALLS", ok)]).unwrap();
            assert_eq!(config.dingtalk.monthly_calls.to_string(), ok);
        }
    }

    #[test]
    fn secrets_print_as_stars() {
        let mut config = Config::default();
        config.callback.token = Secret::new("supersecrettoken");
        config.dingtalk.app_secret = Secret::new("appsecretvalue");
        let shown = format!("{config:?}");
        assert!(!shown.contains("supersecrettoken") && !shown.contains("appsecretvalue"));
        assert!(shown.contains("***"));
    }
}
