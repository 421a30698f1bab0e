//! `dingsync doctor`: checks a configuration against the world it has to work in — PostgreSQL,
//! the clocks, DingTalk's access token, the callback crypto and DingTalk's callback registration —
//! and returns a [`Report`] of one [`Finding`] per check, each with what to do about it.
//!
//! Owns: the checks and their wording. Does not own: loading the configuration (a load error is
//! turned into a finding by [`config_error`]), printing, or the exit code's use (`main.rs`).
//! Changes nothing: it connects without creating the database, applies no migration and
//! registers nothing (only an access token may be fetched and shared, as any command would).
//! Secrets never appear in a finding: at most their first 4 characters and their length.

use std::{fmt, process::ExitCode, str::FromStr, time::Duration};

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::{PgPool, postgres::PgConnectOptions};

use crate::{
    config::{ApiFamily, Config, ConfigError},
    crypto::{self, CallbackCrypto},
    dingtalk::{self, Client, Purpose, types::CallbackRegistration},
    store,
};

/// Clock skew beyond which callback timestamps and token expiry start to mislead.
const SKEW_WARN: TimeDelta = TimeDelta::seconds(5);
/// Clock skew at which they are wrong.
const SKEW_FAIL: TimeDelta = TimeDelta::seconds(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok,
    /// Not run, with the reason in the finding (emulator mode, or what it needs failed).
    Skip,
    Warn,
    Fail,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Status::Ok => "ok",
            Status::Skip => "skip",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        })
    }
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub status: Status,
    pub check: &'static str,
    pub finding: String,
    /// What to do; `None` when there is nothing to do.
    pub fix: Option<String>,
}

impl Finding {
    fn new(status: Status, check: &'static str, finding: impl Into<String>) -> Finding {
        Finding {
            status,
            check,
            finding: finding.into(),
            fix: None,
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Finding {
        self.fix = Some(fix.into());
        self
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<4}  {}: {}", self.status, self.check, self.finding)?;
        match &self.fix {
            Some(fix) => write!(f, "; fix: {fix}"),
            None => Ok(()),
        }
    }
}

/// Every finding, in the order the checks ran.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn has_failure(&self) -> bool {
        self.findings.iter().any(|f| f.status == Status::Fail)
    }

    /// 0 without a FAIL, 1 with one (2, a configuration that does not load, is `main`'s).
    pub fn exit_code(&self) -> u8 {
        u8::from(self.has_failure())
    }

    /// The finding of `check`, if it ran.
    pub fn get(&self, check: &str) -> Option<&Finding> {
        self.findings.iter().find(|f| f.check == check)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for finding in &self.findings {
            writeln!(f, "{finding}")?;
        }
        Ok(())
    }
}

/// A configuration that does not load, as a finding. A TOML parse error quotes the offending
/// line, which may hold a secret: only its first and last lines (position and reason) are kept.
pub fn config_error(e: &ConfigError) -> Finding {
    let (finding, fix) = match e {
        ConfigError::Read { .. } => (e.to_string(), "pass --config FILE".to_string()),
        ConfigError::Parse { path, message } => {
            let lines: Vec<&str> = message.lines().filter(|l| !l.trim().is_empty()).collect();
            let summary = match (lines.first(), lines.last()) {
                (Some(first), Some(last)) if lines.len() > 1 => format!("{first}: {}", last.trim()),
                (Some(only), _) => only.to_string(),
                _ => String::new(),
            };
            (format!("{path}: {summary}"), "correct the file".into())
        }
        ConfigError::Invalid { key, .. } => (e.to_string(), format!("set {key} correctly")),
    };
    Finding::new(Status::Fail, "config", finding).fix(fix)
}

/// Runs every check against `config`.
/// `dingsync doctor`: prints one line per check; exit 1 on any FAIL.
/// `dingsync doctor`: with several apps (`[[apps]]`, no `--app`), the checks of each app in
/// turn under its name; the exit code is 1 when any app has a FAIL.
pub async fn every_app(config: &Config) -> ExitCode {
    if config.apps.len() <= 1 {
        return command(config).await;
    }
    let apps = match config.apps() {
        Ok(apps) => apps,
        Err(e) => {
            println!("{}", config_error(&e));
            return ExitCode::from(2);
        }
    };
    let mut worst = ExitCode::SUCCESS;
    for app in apps {
        println!("app {} (corp_id {}):", app.name, app.corp_id());
        let code = match config.for_app(Some(&app.name)) {
            Ok(single) => command(&single).await,
            Err(e) => {
                println!("{}", config_error(&e));
                ExitCode::from(2)
            }
        };
        if code != ExitCode::SUCCESS && worst == ExitCode::SUCCESS {
            worst = code;
        }
    }
    worst
}

pub async fn command(config: &Config) -> ExitCode {
    crate::app::install_crypto_provider();
    let report = run(config).await;
    print!("{report}");
    ExitCode::from(report.exit_code())
}

pub async fn run(config: &Config) -> Report {
    let mut findings = vec![Finding::new(Status::Ok, "config", "loaded and valid")];
    let (database, pool) = database(config).await;
    let migrated = database.status == Status::Ok;
    findings.push(database);
    let dingtalk = if config.uses_emulator() {
        None
    } else {
        pool.as_ref()
            .filter(|_| migrated)
            .map(|pool| Client::new(pool.clone(), &config.dingtalk, &config.dingtalk.api_base))
    };
    findings.push(clock(config, pool.as_ref()).await);
    let (token, client) = token(config, dingtalk).await;
    findings.push(token);
    let registration = match &client {
        Some(client) => Some(client.get_callback(Purpose::Doctor).await),
        None => None,
    };
    findings.push(stream(config, client.as_ref(), pool.as_ref().filter(|_| migrated)).await);
    findings.push(crypto_round_trip(config));
    findings.push(api_families(config, &client).await);
    let registered = matches!(registration, Some(Ok(_)));
    findings.push(owner_key(config, registered));
    findings.push(callback_registration(config, registration));
    findings.push(allowance(config, pool.as_ref().filter(|_| migrated), Utc::now()).await);
    if let Some(client) = &client
        && let Err(e) = client.ledger().flush().await
    {
        tracing::warn!(error = %e, "could not count doctor's calls in the allowance ledger");
    }
    if let Some(pool) = pool {
        pool.close().await;
    }
    Report { findings }
}

/// This month against the monthly allowances (docs/dingtalk.md §7): warns while metered calls
/// are paused and when the forecast to the month's end goes beyond an allowance. Reads the
/// ledger only.
pub async fn allowance(config: &Config, pool: Option<&PgPool>, now: DateTime<Utc>) -> Finding {
    const CHECK: &str = "allowance";
    let Some(pool) = pool else {
        return Finding::new(
            Status::Skip,
            CHECK,
            "the ledger is in the database, which is not ready (see database)",
        );
    };
    let corp = super::quota::corp_id(config);
    let (calls, deliveries) = (
        config.dingtalk.monthly_calls,
        config.dingtalk.monthly_deliveries,
    );
    let ledger = crate::ledger::Ledger::new(pool.clone(), crate::clock::Clock::real());
    let usage = match ledger.month(&corp, now).await {
        Ok(usage) => usage,
        Err(e) => return Finding::new(Status::Fail, CHECK, format!("reading dingsync.usage: {e}")),
    };
    let f = usage.forecast(now, calls, deliveries);
    let month = crate::clock::month(now);
    let cap = i64::try_from(calls).unwrap_or(i64::MAX);
    let pause = match store::usage::pause(pool, &corp).await {
        Ok(pause) => pause.filter(|p| p.month == month && p.allowance == cap),
        Err(e) => {
            return Finding::new(
                Status::Fail,
                CHECK,
                format!("reading dingsync.quota_pause: {e}"),
            );
        }
    };
    let of = |used: i64, allowance: u64| {
        if allowance == 0 {
            format!("{used} (unmetered)")
        } else {
            format!("{used} of {allowance}")
        }
    };
    let summary = format!(
        "this month {} metered calls, {} deliveries; forecast {} and {} by the month's end",
        of(f.calls.so_far, calls),
        of(f.deliveries.so_far, deliveries),
        f.calls.at_month_end,
        f.deliveries.at_month_end
    );
    if let Some(p) = pause {
        return Finding::new(Status::Warn, CHECK, format!("metered calls paused since {}: {}; {summary}", p.paused_at.format("%Y-%m-%d %H:%M UTC"), p.reason))
            .fix("they resume with the next Beijing month; after upgrading the edition run `dingsync quota resume` and raise dingtalk.monthly_calls");
    }
    if cap > 0 && f.calls.so_far >= cap {
        return Finding::new(Status::Warn, CHECK, format!("dingsync's share of metered calls is used: {summary}"))
            .fix("metered calls resume with the next Beijing month; raise dingtalk.monthly_calls (SIGHUP) if the organisation's allowance has room");
    }
    let mut over = Vec::new();
    for (what, o) in [("metered calls", &f.calls), ("deliveries", &f.deliveries)] {
        if o.exceeds() {
            let day = o
                .runs_out
                .map(|d| format!(", running out on {d}"))
                .unwrap_or_default();
            over.push(format!(
                "{what} would reach {} of {}{day}",
                o.at_month_end, o.allowance
            ));
        }
    }
    if over.is_empty() {
        Finding::new(Status::Ok, CHECK, summary)
    } else {
        Finding::new(Status::Warn, CHECK, format!("at the pace of the last 7 days {}; {summary}", over.join(" and ")))
            .fix("see `dingsync quota`; raise dingtalk.monthly_calls / monthly_deliveries if the organisation's allowance has room, or fewer background jobs")
    }
}

/// Where the database is, without user or password.
fn database_name(config: &Config) -> String {
    match PgConnectOptions::from_str(config.database.url.expose()) {
        Ok(o) => format!(
            "{}:{}/{}",
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or("(default)")
        ),
        Err(_) => "database.url".into(),
    }
}

async fn database(config: &Config) -> (Finding, Option<PgPool>) {
    const CHECK: &str = "database";
    let place = database_name(config);
    let pool = match store::open(&config.database).await {
        Ok(pool) => pool,
        Err(e) => {
            let finding = Finding::new(Status::Fail, CHECK, format!("{place}: {e:#}")).fix(
                "check database.url and that PostgreSQL runs; `dingsync migrate` creates a missing database",
            );
            return (finding, None);
        }
    };
    let newest = store::newest_migration();
    let finding = match store::migration_applied(&pool, newest).await {
        Ok(true) => Finding::new(
            Status::Ok,
            CHECK,
            format!("{place}: connected, migrations applied up to V{newest}"),
        ),
        // No history table (or no schema) yet: nothing was ever migrated.
        Ok(false) => not_migrated(&place, newest),
        Err(e) if store::is_code(&e, "42P01") || store::is_code(&e, "3F000") => {
            not_migrated(&place, newest)
        }
        Err(e) => Finding::new(
            Status::Fail,
            CHECK,
            format!("{place}: reading dingsync.schema_history: {e}"),
        )
        .fix("check that database.url's user may read the dingsync schema"),
    };
    (finding, Some(pool))
}

fn not_migrated(place: &str, newest: i32) -> Finding {
    Finding::new(
        Status::Fail,
        "database",
        format!("{place}: migration V{newest} is not applied"),
    )
    .fix("dingsync migrate")
}

async fn clock(config: &Config, pool: Option<&PgPool>) -> Finding {
    const CHECK: &str = "clock";
    let mut parts = Vec::new();
    let mut worst = TimeDelta::zero();
    if let Some(pool) = pool {
        let before = Utc::now();
        match store::server_time(pool).await {
            Ok(theirs) => {
                let ours = before + (Utc::now() - before) / 2;
                let skew = theirs - ours;
                worst = worst.max(skew.abs());
                parts.push(format!("PostgreSQL {}", seconds(skew)));
            }
            Err(e) => parts.push(format!("PostgreSQL's now() failed: {e}")),
        }
    }
    if !config.uses_emulator() {
        match dingtalk_date(config).await {
            Ok(skew) => {
                worst = worst.max(skew.abs());
                parts.push(format!(
                    "DingTalk {} (HTTP Date, 1 s resolution)",
                    seconds(skew)
                ));
            }
            Err(why) => parts.push(format!("DingTalk's Date unknown ({why})")),
        }
    }
    if parts.is_empty() {
        return Finding::new(Status::Skip, CHECK, "nothing to compare with (no database)");
    }
    let finding = format!("this machine vs {}", parts.join(", "));
    if worst > SKEW_FAIL {
        Finding::new(Status::Fail, CHECK, finding)
            .fix("synchronise this machine's clock (NTP); callback timestamps and token expiry depend on it")
    } else if worst > SKEW_WARN {
        Finding::new(Status::Warn, CHECK, finding)
            .fix("synchronise the clocks (NTP) before the skew grows")
    } else {
        Finding::new(Status::Ok, CHECK, finding)
    }
}

fn seconds(skew: TimeDelta) -> String {
    format!("{:+.1} s", skew.num_milliseconds() as f64 / 1000.0)
}

/// DingTalk's clock minus ours, from the `Date` header of a request that carries no credentials.
async fn dingtalk_date(config: &Config) -> Result<TimeDelta, String> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_millis(config.dingtalk.timeout_ms))
        .build()
        .map_err(|e| e.to_string())?;
    let before = Utc::now();
    let response = http
        .get(format!(
            "{}/",
            config.dingtalk.api_base.trim_end_matches('/')
        ))
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    let ours = before + (Utc::now() - before) / 2;
    let date = response
        .headers()
        .get(reqwest::header::DATE)
        .and_then(|v| v.to_str().ok())
        .ok_or("no Date header")?;
    let theirs =
        DateTime::parse_from_rfc2822(date).map_err(|e| format!("Date header unreadable: {e}"))?;
    // The header has whole seconds: compare with our time truncated the same way.
    Ok(theirs.to_utc() - ours + TimeDelta::milliseconds(500))
}

async fn token(
    config: &Config,
    client: Option<anyhow::Result<Client>>,
) -> (Finding, Option<Client>) {
    const CHECK: &str = "token";
    if config.uses_emulator() {
        let finding = Finding::new(
            Status::Skip,
            CHECK,
            "dingtalk.api_base is \"emulator\": the embedded emulator only exists inside `serve`",
        );
        return (finding, None);
    }
    let Some(client) = client else {
        let why = "the token is shared through the database, which is not ready (see database)";
        return (Finding::new(Status::Skip, CHECK, why), None);
    };
    if config.dingtalk.app_key.is_empty() || config.dingtalk.app_secret.is_empty() {
        let finding = Finding::new(Status::Fail, CHECK, "no credentials")
            .fix("set dingtalk.app_key and dingtalk.app_secret");
        return (finding, None);
    }
    let client = match client {
        Ok(client) => client,
        Err(e) => return (Finding::new(Status::Fail, CHECK, format!("{e:#}")), None),
    };
    // Straight from DingTalk: a fresh token in the database would hide a wrong secret for up to
    // two hours.
    match client.tokens().check_credentials().await {
        Ok(_) => {
            let finding = Finding::new(
                Status::Ok,
                CHECK,
                format!(
                    "access token obtained for app_key {}",
                    config.dingtalk.app_key
                ),
            );
            (finding, Some(client))
        }
        Err(e) => {
            let fix = match &e {
                dingtalk::Error::Rejected { errcode: 40096, .. }
                | dingtalk::Error::Rejected { errcode: 40089, .. } => {
                    "check dingtalk.app_key and dingtalk.app_secret (errcode 40096: wrong key or secret)"
                }
                dingtalk::Error::Rejected { errcode: 60020, .. } => {
                    "add this machine's public IP to the app's IP whitelist in the developer console (errcode 60020)"
                }
                e if e.v1_code() == Some("invalidClientIdOrSecret") => {
                    "check dingtalk.app_key and dingtalk.app_secret (invalidClientIdOrSecret: wrong key or secret)"
                }
                dingtalk::Error::Transient(_) | dingtalk::Error::NoResponse(_) => {
                    "check that dingtalk.api_base is reachable from this machine"
                }
                _ => "check dingtalk.app_key, dingtalk.app_secret and dingtalk.api_base",
            };
            (
                Finding::new(Status::Fail, CHECK, e.to_string()).fix(fix),
                None,
            )
        }
    }
}

/// An instance id no organisation has: asking for it costs one metered call, and changes nothing.
const PROBE_INSTANCE: &str = "dingsync-doctor-permission-probe";

/// What one family's probe says about the app's permissions.
enum Permitted {
    Yes,
    No(String),
    /// DingTalk did not say (unreachable, rate limited, paused).
    Unknown(String),
}

/// Which API family's approval permissions the app has (docs/dingtalk.md §11.7): one `get` of an
/// instance that does not exist in each family, two metered calls in all (`topapi/processinstance/get`
/// and v1.0 `GET /v1.0/workflow/processInstances`), with the token already fetched (one token
/// serves both). "No such instance" means the API ran, so the app may call it; a permission
/// refusal means it may not.
async fn api_families(config: &Config, client: &Option<Client>) -> Finding {
    const CHECK: &str = "api family";
    let Some(client) = client else {
        let why = if config.uses_emulator() {
            "dingtalk.api_base is \"emulator\": the embedded emulator serves both families"
        } else {
            "needs an access token (see token)"
        };
        return Finding::new(Status::Skip, CHECK, why);
    };
    let mut other = config.dingtalk.clone();
    other.api_family = match client.family() {
        ApiFamily::Legacy => ApiFamily::V1,
        ApiFamily::V1 => ApiFamily::Legacy,
    };
    let other = match Client::with_ledger(
        client.pool().clone(),
        &other,
        &config.dingtalk.api_base,
        client.ledger().clone(),
    ) {
        Ok(other) => other,
        Err(e) => return Finding::new(Status::Fail, CHECK, format!("{e:#}")),
    };
    let (configured, other_family) = (client.family(), other.family());
    let ours = permitted(client).await;
    let theirs = permitted(&other).await;
    let name = |f: ApiFamily| match f {
        ApiFamily::Legacy => "legacy (topapi/processinstance/*)",
        ApiFamily::V1 => "v1 (/v1.0/workflow/*)",
    };
    let key = format!("dingtalk.api_family = \"{}\"", configured.as_str());
    match (ours, theirs) {
        (Permitted::Yes, Permitted::Yes) => Finding::new(
            Status::Ok,
            CHECK,
            format!("{key}; the app may call both families (2 metered calls spent on this check)"),
        ),
        (Permitted::Yes, Permitted::No(why)) => {
            let finding = format!(
                "{key} works; {} is not permitted ({why})",
                name(other_family)
            );
            if configured == ApiFamily::Legacy && config.outbox.forecast_check {
                Finding::new(Status::Fail, CHECK, format!("{finding}: outbox.forecast_check needs it"))
                    .fix("grant the app Workflow.Instance.Write in the developer console, or set outbox.forecast_check = false")
            } else if configured == ApiFamily::Legacy {
                Finding::new(Status::Warn, CHECK, format!("{finding}: the forecast, self-selected approvers and task actions need v1"))
                    .fix("grant the app Workflow.Instance.Read and Workflow.Instance.Write in the developer console to use them")
            } else {
                Finding::new(Status::Ok, CHECK, finding)
            }
        }
        (Permitted::No(why), Permitted::Yes) => Finding::new(
            Status::Fail,
            CHECK,
            format!(
                "{key}, but the app may not call {} ({why}); it may call {}",
                name(configured),
                name(other_family)
            ),
        )
        .fix(format!(
            "set dingtalk.api_family = \"{}\", or grant the app the {} permissions in the developer console",
            other_family.as_str(),
            configured.as_str()
        )),
        (Permitted::No(why), _) => Finding::new(
            Status::Fail,
            CHECK,
            format!("the app may not call {} ({why})", name(configured)),
        )
        .fix("grant the app the approval permissions (v1: Workflow.Instance.Read and Workflow.Instance.Write) in the developer console"),
        (Permitted::Unknown(why), _) | (Permitted::Yes, Permitted::Unknown(why)) => {
            Finding::new(Status::Warn, CHECK, format!("{key}; could not tell: {why}"))
                .fix("run dingsync doctor again")
        }
    }
}

/// One family's probe: a `get` of [`PROBE_INSTANCE`].
async fn permitted(client: &Client) -> Permitted {
    match client.get_instance(PROBE_INSTANCE, Purpose::Doctor).await {
        // DingTalk knows no such instance: anything else would be odd, but it did answer.
        Ok(_) => Permitted::Yes,
        Err(e @ dingtalk::Error::Rejected { .. }) => {
            let text = e.to_string();
            // v1.0: 403 AccessTokenPermissionDenied (and the endpoint-specific "no access"
            // codes); old family: 60011 or a message about 权限 (permission), [unconfirmed].
            let denied = matches!(
                e.v1_code(),
                Some(
                    "Forbidden.AccessDenied.AccessTokenPermissionDenied"
                        | "Forbidden.AccessDenied.IpNotInWhiteList"
                        | "noPermission"
                        | "apiPermissionDenied"
                        | "permission.error"
                )
            ) || (e.v1_code().is_none()
                && (text.contains("60011") || text.contains("权限")));
            if denied {
                Permitted::No(text)
            } else {
                Permitted::Yes
            }
        }
        Err(e) => Permitted::Unknown(e.to_string()),
    }
}

/// With `stream.enabled`: opens one Stream connection (a ticket from
/// `{openapi_base}/v1.0/gateway/connections/open`, then the WebSocket) and waits briefly for a
/// first frame (docs/dingtalk.md §8).
async fn stream(config: &Config, client: Option<&Client>, pool: Option<&PgPool>) -> Finding {
    const CHECK: &str = "stream";
    if !config.stream.enabled {
        return Finding::new(
            Status::Skip,
            CHECK,
            "stream.enabled = false (HTTP push only)",
        );
    }
    if config.uses_emulator() {
        return Finding::new(
            Status::Skip,
            CHECK,
            "dingtalk.api_base is \"emulator\": the embedded emulator only exists inside `serve`",
        );
    }
    // The gateway call is counted in the allowance ledger, which needs the database.
    let client = match (client, pool) {
        (Some(client), _) => client.clone(),
        (None, Some(pool)) => {
            match Client::new(pool.clone(), &config.dingtalk, &config.dingtalk.api_base) {
                Ok(client) => client,
                Err(e) => return Finding::new(Status::Fail, CHECK, format!("{e:#}")),
            }
        }
        (None, None) => {
            let why = "the call is counted in the allowance ledger, in the database, which is not ready (see database)";
            return Finding::new(Status::Skip, CHECK, why);
        }
    };
    let gateway = dingtalk::gateway::Gateway::new(&client, &config.dingtalk, client.v1_base());
    let probed = crate::stream::probe(&gateway, Duration::from_secs(3)).await;
    if let Err(e) = client.ledger().flush().await {
        tracing::warn!(error = %e, "could not count doctor's calls in the allowance ledger");
    }
    match probed {
        Ok(p) => Finding::new(
            Status::Ok,
            CHECK,
            format!(
                "connection opened at {}{}",
                p.endpoint,
                p.first_frame
                    .map(|k| format!("; first frame: {k}"))
                    .unwrap_or_default()
            ),
        ),
        Err((true, why)) => Finding::new(Status::Fail, CHECK, why).fix(
            "DingTalk refused dingtalk.app_key / dingtalk.app_secret: set them to the app's AppKey and AppSecret (developer console -> app -> credentials)",
        ),
        Err((false, why)) => Finding::new(Status::Fail, CHECK, why).fix(
            "check that dingtalk.openapi_base (empty: https://api.dingtalk.com) and the endpoint it hands out (wss://...:443) are reachable from this machine, and that the app's event subscription is set to Stream mode",
        ),
    }
}

fn crypto_round_trip(config: &Config) -> Finding {
    const CHECK: &str = "crypto round trip";
    let (token, aes_key) = (
        config.callback.token.expose(),
        config.callback.aes_key.expose(),
    );
    if token.is_empty() || aes_key.is_empty() {
        return Finding::new(
            Status::Skip,
            CHECK,
            "callback.token and callback.aes_key are empty: `serve` generates them for the embedded emulator",
        );
    }
    let Some(first) = config.callback.owner_key.first() else {
        return Finding::new(Status::Skip, CHECK, "callback.owner_key is empty");
    };
    let crypto = match CallbackCrypto::new(token, aes_key) {
        Ok(crypto) => crypto,
        Err(e) => {
            return Finding::new(Status::Fail, CHECK, format!("callback.aes_key: {e}"))
                .fix("set callback.aes_key to the 43-character key registered at DingTalk");
        }
    };
    let timestamp = Utc::now().timestamp_millis().to_string();
    let nonce = crypto::random_nonce(16);
    let sealed = crypto.seal("success", first, &timestamp, &nonce);
    let accepted: Vec<&str> = config
        .callback
        .owner_key
        .iter()
        .map(String::as_str)
        .collect();
    match crypto.open(
        &timestamp,
        &nonce,
        &sealed.encrypt,
        &sealed.signature,
        &accepted,
    ) {
        Ok(opened) if opened.message == "success" => Finding::new(
            Status::Ok,
            CHECK,
            "sealed and opened `success` with callback.token, callback.aes_key and callback.owner_key",
        ),
        Ok(_) => Finding::new(
            Status::Fail,
            CHECK,
            "opened something other than what was sealed",
        )
        .fix("report this as a dingsync bug"),
        Err(e) => {
            Finding::new(Status::Fail, CHECK, e.to_string()).fix("report this as a dingsync bug")
        }
    }
}

/// CorpId for a `register_call_back` registration, AppKey for a console subscription (docs/dingtalk.md
/// §4.5): the commonest reason DingTalk's pushes are refused.
fn owner_key(config: &Config, registered_through_api: bool) -> Finding {
    const CHECK: &str = "owner key";
    let listed = |key: &str| !key.is_empty() && config.callback.owner_key.iter().any(|k| k == key);
    let (corp, app) = (
        listed(&config.dingtalk.corp_id),
        listed(&config.dingtalk.app_key),
    );
    let keys = config.callback.owner_key.join(", ");
    if registered_through_api && !corp {
        Finding::new(
            Status::Fail,
            CHECK,
            format!(
                "callback.owner_key ({keys}) lacks dingtalk.corp_id, but the callback is registered through register_call_back, whose pushes carry the CorpId"
            ),
        )
        .fix("add your CorpId (ding...) to callback.owner_key")
    } else if !corp && !app {
        Finding::new(
            Status::Warn,
            CHECK,
            format!("callback.owner_key ({keys}) contains neither dingtalk.corp_id nor dingtalk.app_key"),
        )
        .fix("list the CorpId (register_call_back) or the AppKey (console event subscription) in callback.owner_key")
    } else {
        let which = match (corp, app) {
            (true, true) => "CorpId and AppKey",
            (true, false) => "CorpId",
            _ => "AppKey",
        };
        Finding::new(
            Status::Ok,
            CHECK,
            format!("callback.owner_key lists the {which}"),
        )
    }
}

/// First 4 characters and the length: enough to tell two secrets apart, too little to use one.
fn fingerprint(secret: &str) -> String {
    let head: String = secret.chars().take(4).collect();
    format!("{head}…({} chars)", secret.chars().count())
}

/// A URL without its query (which may carry a credential).
fn without_query(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

fn callback_registration(
    config: &Config,
    registration: Option<Result<CallbackRegistration, dingtalk::Error>>,
) -> Finding {
    const CHECK: &str = "callback registration";
    let Some(registration) = registration else {
        let why = if config.uses_emulator() {
            "dingtalk.api_base is \"emulator\": `serve` registers its own callback with the embedded emulator"
        } else {
            "needs an access token (see token)"
        };
        return Finding::new(Status::Skip, CHECK, why);
    };
    let current = match registration {
        Ok(current) => current,
        Err(dingtalk::Error::Rejected { errcode: 71007, .. }) => {
            let listed = |key: &str| config.callback.owner_key.iter().any(|k| k == key);
            let console = listed(&config.dingtalk.app_key) && !listed(&config.dingtalk.corp_id);
            return if console {
                Finding::new(
                    Status::Warn,
                    CHECK,
                    "none registered through the API (71007); callback.owner_key suggests a console event subscription, which the API cannot show",
                )
                .fix("check the developer console's event subscription: URL, token and AES key")
            } else {
                Finding::new(
                    Status::Fail,
                    CHECK,
                    "no callback registered at DingTalk (71007)",
                )
                .fix("dingsync callback register")
            };
        }
        Err(e) => {
            return Finding::new(Status::Fail, CHECK, format!("get_call_back: {e}"))
                .fix("check dingtalk.api_base and the app's permissions");
        }
    };
    let mut differs = Vec::new();
    if current.url != config.callback.public_url {
        differs.push(format!(
            "callback.public_url ({}) differs from the registered URL ({})",
            without_query(&config.callback.public_url),
            without_query(&current.url)
        ));
    }
    for (key, ours, theirs) in [
        (
            "callback.token",
            config.callback.token.expose(),
            &current.token,
        ),
        (
            "callback.aes_key",
            config.callback.aes_key.expose(),
            &current.aes_key,
        ),
    ] {
        if ours != theirs {
            differs.push(format!(
                "{key} ({}) differs from the registered one ({})",
                fingerprint(ours),
                fingerprint(theirs)
            ));
        }
    }
    if differs.is_empty() {
        Finding::new(
            Status::Ok,
            CHECK,
            format!(
                "{} for {} matches callback.public_url, callback.token and callback.aes_key",
                without_query(&current.url),
                current.call_back_tag.join(", ")
            ),
        )
    } else {
        Finding::new(Status::Fail, CHECK, differs.join("; "))
            .fix("dingsync callback update (or correct the configuration to match DingTalk)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finding_prints_status_check_finding_and_fix() {
        let line = Finding::new(Status::Fail, "database", "V9 missing")
            .fix("dingsync migrate")
            .to_string();
        assert_eq!(line, "FAIL  database: V9 missing; fix: dingsync migrate");
        let ok = Finding::new(Status::Ok, "clock", "fine").to_string();
        assert_eq!(ok, "ok    clock: fine");
    }

    #[test]
    fn a_fingerprint_shows_four_characters_and_the_length() {
        assert_eq!(fingerprint("abcdefgh"), "abcd…(8 chars)");
    }

    #[test]
    fn a_parse_error_keeps_position_and_reason_but_not_the_quoted_line() {
        let e =
            Config::from_sources("[callback]\ntoken = \"s3cr3tvalue\n", "x.toml", []).unwrap_err();
        let finding = config_error(&e);
        assert_eq!(finding.status, Status::Fail);
        assert!(!finding.to_string().contains("s3cr3tvalue"), "{finding}");
        assert!(finding.finding.contains("line 2"), "{finding}");
    }

    #[test]
    fn an_invalid_key_is_named_in_the_finding_and_the_fix() {
        let mut config = Config::default();
        config.dingtalk.api_base = "ftp://x".into();
        let finding = config_error(&config.validate().unwrap_err());
        assert!(
            finding.finding.starts_with("dingtalk.api_base:"),
            "{finding}"
        );
        assert_eq!(
            finding.fix.as_deref(),
            Some("set dingtalk.api_base correctly")
        );
    }

    #[test]
    fn the_registration_needs_the_corp_id_among_the_owner_keys() {
        let mut config = Config::default();
        config.dingtalk.corp_id = "dingcorp".into();
        config.dingtalk.app_key = "dingapp".into();
        config.callback.owner_key = vec!["dingapp".into()];
        assert_eq!(owner_key(&config, false).status, Status::Ok);
        assert_eq!(owner_key(&config, true).status, Status::Fail);
        config.callback.owner_key = vec!["dingother".into()];
        assert_eq!(owner_key(&config, false).status, Status::Warn);
        config.callback.owner_key = vec!["dingcorp".into()];
        assert_eq!(owner_key(&config, true).status, Status::Ok);
    }
}
