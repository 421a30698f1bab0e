//! Test harness: a fresh database per test (created and migrated by the production code), the
//! real daemon on port 0, and a client that speaks DingTalk's side of the callback exchange.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod mirror;
pub mod pgbouncer;
pub mod pgcluster;
pub mod proxy;

use std::{
    future::Future,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use dingsync::{
    app::App,
    callback::EncryptedReply,
    config::{ApiFamily, Config, Secret},
    crypto::{self, CallbackCrypto},
};
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};

pub const CORP_ID: &str = "dingtestcorp00000001";

/// Where test databases are created: `DINGSYNC_TEST_DATABASE_URL` (server URL without a
/// database), default the local trust-auth Postgres. No Postgres means failing tests, never
/// skipped ones.
pub fn server_url() -> String {
    std::env::var("DINGSYNC_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// The real `dingsync` binary with the repository's config.toml, for tests that run it as a
/// child process. The test harness's own settings (`DINGSYNC_TEST_*`) are not the daemon's: the
/// daemon refuses unknown `DINGSYNC_*` variables, so they are taken out of its environment.
pub fn dingsync_command(args: &[&str]) -> std::process::Command {
    dingsync_command_with(
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")),
        args,
    )
}

/// The real `dingsync` binary with the configuration file `config`.
pub fn dingsync_command_with(config: &std::path::Path, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_dingsync"));
    command.arg("--config").arg(config).args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DINGSYNC_TEST_") {
            command.env_remove(key);
        }
    }
    // The shipped console port would be shared by every daemon a test runs at once: none unless
    // the test sets its own DINGSYNC_ADMIN_LISTEN.
    command.env("DINGSYNC_ADMIN_LISTEN", "");
    // The family of this test run (DINGSYNC_TEST_API_FAMILY) is the child's too.
    if std::env::var_os("DINGSYNC_TEST_API_FAMILY").is_some() {
        command.env("DINGSYNC_DINGTALK_API_FAMILY", api_family().as_str());
    }
    command
}

/// A standalone emulator of `CORP_ID` (several daemons can share it), DingTalk's timings 100
/// times faster.
pub async fn standalone_emulator(seed: u64) -> dingsync_emulator::Emulator {
    install_crypto_provider();
    let config = dingsync_emulator::EmulatorConfig {
        corp_id: CORP_ID.into(),
        time_scale: 0.01,
        seed,
        ..dingsync_emulator::EmulatorConfig::default()
    };
    dingsync_emulator::Emulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// A test configuration against the standalone emulator `emu`, with its app's credentials.
pub fn config_against(emu: &dingsync_emulator::Emulator, db: &TestDb) -> Config {
    let mut config = test_config(&db.url);
    let defaults = dingsync_emulator::EmulatorConfig::default();
    config.dingtalk.api_base = emu.base_url();
    config.dingtalk.app_key = defaults.app_key;
    config.dingtalk.app_secret = Secret::new(defaults.app_secret);
    config
}

/// Runs `command` to its end, which must come within 30 s.
pub fn run_to_end(mut command: std::process::Command) -> std::process::Output {
    use std::process::Stdio;
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dingsync runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("dingsync did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A database that exists for one test and is dropped afterwards.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub fn new() -> TestDb {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "dingsync_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            crypto::random_nonce(6).to_lowercase()
        );
        let url = format!("{}/{}", server_url(), name);
        TestDb { name, url }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (server, name) = (server_url(), self.name.clone());
        // Drop runs inside the test's runtime; use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&format!("{server}/postgres")).await {
                    let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    let _ = sqlx::raw_sql(&sql).execute(&mut conn).await;
                }
            })
        })
        .join();
    }
}

/// The API family the tests run in: `DINGSYNC_TEST_API_FAMILY` (`legacy`, the default, or `v1`).
/// CI runs the client-touching tests once in each (`.ci/run`). An unknown value fails the test
/// rather than silently running the default.
pub fn api_family() -> ApiFamily {
    match std::env::var("DINGSYNC_TEST_API_FAMILY").as_deref() {
        Err(_) | Ok("") | Ok("legacy") => ApiFamily::Legacy,
        Ok("v1") => ApiFamily::V1,
        Ok(other) => panic!("DINGSYNC_TEST_API_FAMILY={other}: must be legacy or v1"),
    }
}

/// The emulator's names of the calls a test counts or injects errors into, in the family the
/// tests run in ([`api_family`]): the old family's paths, or v1.0's method and path.
pub mod api {
    use super::{ApiFamily, api_family};

    fn pick(legacy: &'static str, v1: &'static str) -> &'static str {
        match api_family() {
            ApiFamily::Legacy => legacy,
            ApiFamily::V1 => v1,
        }
    }

    pub fn token() -> &'static str {
        pick("gettoken", "POST v1.0/oauth2/accessToken")
    }
    pub fn create() -> &'static str {
        pick(
            "topapi/processinstance/create",
            "POST v1.0/workflow/processInstances",
        )
    }
    pub fn get() -> &'static str {
        pick(
            "topapi/processinstance/get",
            "GET v1.0/workflow/processInstances",
        )
    }
    pub fn list_ids() -> &'static str {
        pick(
            "topapi/processinstance/listids",
            "POST v1.0/workflow/processes/instanceIds/query",
        )
    }
    /// The ledger's name of the same call (`dingsync.usage.api`): the path without method.
    pub fn ledger_path(emulator_name: &str) -> &str {
        emulator_name
            .split_once(' ')
            .map_or(emulator_name, |(_, path)| path)
    }
}

/// The configuration a test daemon runs with: fresh secrets, port 0, the given database, the
/// API family of this run ([`api_family`]).
pub fn test_config(database_url: &str) -> Config {
    let mut config = Config::default();
    config.dingtalk.api_family = api_family();
    config.database.url = Secret::new(database_url);
    config.database.acquire_timeout_ms = 1_000;
    config.server.listen = "127.0.0.1:0".into();
    // No console unless a test asks for one (tests/console.rs).
    config.admin.listen = String::new();
    config.callback.token = Secret::new(crypto::random_nonce(32));
    config.callback.aes_key = Secret::new(crypto::random_aes_key());
    config.callback.owner_key = vec![CORP_ID.into()];
    config.dingtalk.corp_id = CORP_ID.into();
    // No DingTalk by default: the daemon only serves callbacks. Tests that want the embedded
    // emulator call `embedded_emulator`.
    config.dingtalk.api_base = "http://127.0.0.1:9".into();
    config
}

/// Switches a test configuration to the embedded emulator: `api_base = "emulator"` and none of
/// the keys of a real organisation (the daemon refuses them with the emulator and generates its
/// own; [`TestApp`] reads them back from the emulator's registration).
pub fn embedded_emulator(config: &mut Config) {
    config.dingtalk.api_base = "emulator".into();
    config.dingtalk.app_key = String::new();
    config.dingtalk.app_secret = Secret::default();
    config.dingtalk.corp_id = String::new();
    config.callback.token = Secret::default();
    config.callback.aes_key = Secret::default();
    config.callback.owner_key = Vec::new();
    config.callback.public_url = String::new();
}

/// A running daemon on its own database.
pub struct TestApp {
    pub app: Option<App>,
    pub pool: PgPool,
    pub base_url: String,
    pub crypto: CallbackCrypto,
    pub owner_key: String,
    token: String,
    aes_key: String,
    pub http: reqwest::Client,
    pub db: TestDb,
}

pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    /// Starts the daemon after `adjust` has changed the test configuration.
    pub async fn spawn_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
        let db = TestDb::new();
        Self::spawn_on(db, adjust).await
    }

    pub async fn spawn_on(db: TestDb, adjust: impl FnOnce(&mut Config)) -> TestApp {
        install_crypto_provider();
        let mut config = test_config(&db.url);
        adjust(&mut config);
        let app = App::start(config.clone()).await.expect("daemon starts");
        // With the embedded emulator the daemon made its own secrets and registered them there:
        // push as that emulator does.
        let (token, aes_key, owner_key) = match &app.emulator {
            Some(emulator) => {
                let registration = emulator
                    .state()
                    .callback()
                    .expect("the daemon registered its callback with its emulator");
                (
                    registration.token,
                    registration.aes_key,
                    emulator.state().corp_id().to_string(),
                )
            }
            None => (
                config.callback.token.expose().to_string(),
                config.callback.aes_key.expose().to_string(),
                config.callback.owner_key[0].clone(),
            ),
        };
        let crypto = CallbackCrypto::new(&token, &aes_key).unwrap();
        // Our own pool straight to the database (the daemon's may go through a proxy).
        let pool = PgPool::connect(&db.url).await.unwrap();
        TestApp {
            base_url: format!("http://{}", app.addr),
            app: Some(app),
            pool,
            crypto,
            owner_key,
            token,
            aes_key,
            http: reqwest::Client::new(),
            db,
        }
    }

    /// The callback token the daemon was configured with.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The AES key the daemon was configured with.
    pub fn crypto_key(&self) -> &str {
        &self.aes_key
    }

    /// Encrypts `message` as DingTalk would (random prefix, ms timestamp, 8-char nonce) and posts it.
    pub async fn push(&self, message: &str) -> reqwest::Response {
        self.push_with(&self.crypto, &self.owner_key, message).await
    }

    pub async fn push_with(
        &self,
        crypto: &CallbackCrypto,
        owner_key: &str,
        message: &str,
    ) -> reqwest::Response {
        let pusher = Pusher {
            http: self.http.clone(),
            base_url: self.base_url.clone(),
            crypto: crypto.clone(),
            owner_key: owner_key.to_string(),
        };
        pusher.send(message).await.expect("request sent")
    }

    /// An owned sender of pushes, for spawned tasks.
    pub fn pusher(&self) -> Pusher {
        Pusher {
            http: self.http.clone(),
            base_url: self.base_url.clone(),
            crypto: self.crypto.clone(),
            owner_key: self.owner_key.clone(),
        }
    }

    pub async fn post_raw(&self, query: &[(&str, &str)], body: String) -> reqwest::Response {
        self.http
            .post(format!("{}/dingtalk/callback", self.base_url))
            .query(query)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request sent")
    }

    /// Pushes `message` and asserts the daemon answered with a valid encrypted `success`.
    pub async fn push_ok(&self, message: &str) {
        let response = self.push(message).await;
        assert_success(&self.crypto, &self.owner_key, response).await;
    }

    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM dingsync.{table}"))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Row counts of every table the callback writes.
    pub async fn counts(&self) -> (i64, i64, i64) {
        (
            self.count("events").await,
            self.count("approvals").await,
            self.count("approval_tasks").await,
        )
    }

    pub async fn approval(&self, pid: &str) -> ApprovalRow {
        sqlx::query_as("SELECT status, result, title, originator_userid, created_at, finished_at, detail_wanted_at IS NOT NULL AS wanted FROM dingsync.approvals WHERE process_instance_id = $1")
            .bind(pid)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub async fn task(&self, task_id: i64) -> TaskRow {
        sqlx::query_as("SELECT status, result, userid, remark, finished_at FROM dingsync.approval_tasks WHERE task_id = $1")
            .bind(task_id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await.unwrap();
        }
        self.pool.close().await;
    }
}

/// DingTalk's side of a push, owned so that it can move into a spawned task.
#[derive(Clone)]
pub struct Pusher {
    http: reqwest::Client,
    base_url: String,
    pub crypto: CallbackCrypto,
    pub owner_key: String,
}

impl Pusher {
    /// DingTalk's side of pushes to any daemon, e.g. one running as a separate process.
    pub fn new(base_url: &str, crypto: CallbackCrypto, owner_key: &str) -> Pusher {
        Pusher {
            http: reqwest::Client::new(),
            base_url: base_url.to_string(),
            crypto,
            owner_key: owner_key.to_string(),
        }
    }

    /// Encrypts `message` as DingTalk would (random prefix, ms timestamp, 8-char nonce), posts it.
    pub async fn send(&self, message: &str) -> reqwest::Result<reqwest::Response> {
        let timestamp = chrono::Utc::now().timestamp_millis().to_string();
        let nonce = crypto::random_nonce(8);
        let sealed = self
            .crypto
            .seal(message, &self.owner_key, &timestamp, &nonce);
        self.http
            .post(format!("{}/dingtalk/callback", self.base_url))
            .query(&[
                ("signature", sealed.signature.as_str()),
                ("timestamp", &timestamp),
                ("nonce", &nonce),
            ])
            .json(&serde_json::json!({ "encrypt": sealed.encrypt }))
            .send()
            .await
    }
}

#[derive(Debug, sqlx::FromRow, PartialEq)]
pub struct ApprovalRow {
    pub status: String,
    pub result: Option<String>,
    pub title: Option<String>,
    pub originator_userid: Option<String>,
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    pub wanted: bool,
}

#[derive(Debug, sqlx::FromRow, PartialEq)]
pub struct TaskRow {
    pub status: String,
    pub result: Option<String>,
    pub userid: Option<String>,
    pub remark: Option<String>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Checks a reply as DingTalk does: HTTP 200, the four string fields, a valid `msg_signature`,
/// and `encrypt` decrypting to `success` for our owner key.
pub async fn assert_success(crypto: &CallbackCrypto, owner_key: &str, response: reqwest::Response) {
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "expected success, got {status}: {text}");
    let reply: EncryptedReply =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("reply {text}: {e}"));
    let opened = crypto
        .open(
            &reply.time_stamp,
            &reply.nonce,
            &reply.encrypt,
            &reply.msg_signature,
            &[owner_key],
        )
        .expect("reply opens with our token, key and owner key");
    assert_eq!(opened.message, "success");
}

/// An instance event as DingTalk's HTTP push sends it (docs/dingtalk.md §5.2).
pub fn instance_event(
    pid: &str,
    kind: &str,
    result: Option<&str>,
    create_ms: i64,
    finish_ms: Option<i64>,
) -> String {
    let mut v = serde_json::json!({
        "EventType": "bpms_instance_change", "processInstanceId": pid, "corpId": CORP_ID,
        "createTime": create_ms, "title": "张三提交的报销", "type": kind, "staffId": "originator1",
        "url": format!("https://aflow.dingtalk.com/?procInstId={pid}"), "processCode": "PROC-TEST-1",
        "bizCategoryId": "", "businessId": "202611280001",
    });
    if let Some(r) = result {
        v["result"] = r.into();
    }
    if let Some(f) = finish_ms {
        v["finishTime"] = f.into();
    }
    v.to_string()
}

/// A task event (docs/dingtalk.md §5.3).
pub fn task_event(
    pid: &str,
    task_id: i64,
    kind: &str,
    result: Option<&str>,
    create_ms: i64,
    finish_ms: Option<i64>,
) -> String {
    let mut v = serde_json::json!({
        "EventType": "bpms_task_change", "processInstanceId": pid, "corpId": CORP_ID,
        "createTime": create_ms, "title": "张三提交的报销", "type": kind, "staffId": "approver1",
        "taskId": task_id, "processCode": "PROC-TEST-1", "bizCategoryId": "", "businessId": "202611280001",
    });
    if let Some(r) = result {
        v["result"] = r.into();
        v["remark"] = "同意 ✅".into();
    }
    if let Some(f) = finish_ms {
        v["finishTime"] = f.into();
    }
    v.to_string()
}

/// Polls `check` until it returns Some or the deadline passes.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

/// A port nobody listens on now, for a daemon or cluster a test starts as a process. Another
/// process could take it before the server binds it, but on a test machine that is rare enough;
/// the start then fails loudly.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("finding a free port: {e}"))
        .port()
}
