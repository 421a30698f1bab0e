//! The real `dingsync` binary and its emulator: the embedded emulator starts only when the
//! configuration names it and never with a real organisation's keys (refused at load, before the
//! database is touched, naming the keys and never their values); the shipped config.toml still
//! starts it and the demo flows; the admin API of the embedded and the standalone emulator needs
//! the token printed once at start-up, a new one every run.

mod common;

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};

/// Real-looking keys of a real organisation (never valid anywhere), each with its variable.
const REAL: [(&str, &str, &str); 7] = [
    (
        "DINGSYNC_DINGTALK_APP_KEY",
        "dingtalk.app_key",
        "dingz7realappkey",
    ),
    (
        "DINGSYNC_DINGTALK_APP_SECRET",
        "dingtalk.app_secret",
        "Z7realAppSecretXq93kLmN0pQr5sTuVwXyZ",
    ),
    (
        "DINGSYNC_DINGTALK_CORP_ID",
        "dingtalk.corp_id",
        "dingz7realcorp01",
    ),
    (
        "DINGSYNC_CALLBACK_TOKEN",
        "callback.token",
        "Z7realCallbackTokenAbC123dEf456gH",
    ),
    (
        "DINGSYNC_CALLBACK_AES_KEY",
        "callback.aes_key",
        "Z7realAesKeyZ7realAesKeyZ7realAesKeyZ7real0",
    ),
    (
        "DINGSYNC_CALLBACK_OWNER_KEY",
        "callback.owner_key",
        "dingz7realowner01",
    ),
    (
        "DINGSYNC_CALLBACK_PUBLIC_URL",
        "callback.public_url",
        "https://z7real.example.com/dingtalk/callback",
    ),
];

async fn database_exists(name: &str) -> bool {
    let mut conn = PgConnection::connect(&format!("{}/postgres", server_url()))
        .await
        .unwrap();
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut conn)
        .await
        .unwrap();
    found.is_some()
}

/// The shipped config.toml without its `api_base` line, as a file of its own.
struct ConfigWithoutApiBase(PathBuf);

impl ConfigWithoutApiBase {
    fn new() -> ConfigWithoutApiBase {
        let shipped = include_str!("../config.toml");
        let line = "api_base = \"emulator\"\n";
        assert!(shipped.contains(line));
        let path = std::env::temp_dir().join(format!(
            "dingsync-no-api-base-{}-{}.toml",
            std::process::id(),
            dingsync::crypto::random_nonce(6)
        ));
        std::fs::write(&path, shipped.replace(line, "")).unwrap();
        ConfigWithoutApiBase(path)
    }
}

impl Drop for ConfigWithoutApiBase {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `serve` with every real key set: exits 2 before creating the database, saying which keys.
async fn assert_serve_refused(mut command: Command, db: &TestDb, expect: &str) {
    let port = free_port();
    command
        .env("DINGSYNC_DATABASE_URL", &db.url)
        .env("DINGSYNC_SERVER_LISTEN", format!("127.0.0.1:{port}"))
        .envs(REAL.iter().map(|(env, _, value)| (env, value)));
    let output = run_to_end(command);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains(expect), "{stderr}");
    for (_, key, value) in REAL {
        assert!(stderr.contains(key), "{key} not named: {stderr}");
        assert!(
            !stderr.contains(value) && !stdout.contains(value),
            "the value of {key} was printed: {stdout}\n{stderr}"
        );
    }
    assert!(
        !database_exists(&db.name).await,
        "the refused serve created its database (and could have written approvals into it)"
    );
}

#[tokio::test]
async fn serve_with_a_real_organisations_keys_and_api_base_emulator_exits_2_and_writes_nothing() {
    let db = TestDb::new();
    assert_serve_refused(
        dingsync_command(&["serve"]),
        &db,
        "dingsync: configuration error: dingtalk.api_base: is \"emulator\" but ",
    )
    .await;
}

#[tokio::test]
async fn serve_with_a_real_organisations_keys_and_no_api_base_exits_2_and_writes_nothing() {
    let db = TestDb::new();
    let config = ConfigWithoutApiBase::new();
    assert_serve_refused(
        dingsync_command_with(&config.0, &["serve"]),
        &db,
        "dingsync: configuration error: dingtalk.api_base: not set, and ",
    )
    .await;
}

#[tokio::test]
async fn serve_without_api_base_and_without_secrets_does_not_start_the_emulator_either() {
    let db = TestDb::new();
    let config = ConfigWithoutApiBase::new();
    let mut command = dingsync_command_with(&config.0, &["serve"]);
    command.env("DINGSYNC_DATABASE_URL", &db.url).env(
        "DINGSYNC_SERVER_LISTEN",
        format!("127.0.0.1:{}", free_port()),
    );
    let output = run_to_end(command);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("dingtalk.api_base: not set: set it to DingTalk's address"),
        "{stderr}"
    );
    assert!(!database_exists(&db.name).await);
}

#[tokio::test]
async fn doctor_reports_the_emulator_with_real_keys_as_a_failed_config_check() {
    let mut command = dingsync_command(&["doctor"]);
    command.envs(REAL.iter().map(|(env, _, value)| (env, value)));
    let output = run_to_end(command);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.starts_with("FAIL  config: dingtalk.api_base: is \"emulator\" but ")
            && stdout.contains("dingtalk.app_secret")
            && stdout.contains("fix: set dingtalk.api_base correctly"),
        "{stdout}"
    );
    for (_, key, value) in REAL {
        assert!(!stdout.contains(value), "the value of {key} was printed");
    }
}

/// A child process whose stdout lines arrive on a channel; killed when dropped.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn spawn(mut command: Command) -> Running {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dingsync starts");
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first stdout line containing `needle`, within 60 s.
    fn line_with(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => {
                    self.seen.push(line.clone());
                    return line;
                }
                Ok(line) => self.seen.push(line),
                Err(e) => panic!(
                    "no line with {needle:?} ({e}); status {:?}; stdout so far: {:?}",
                    self.child.try_wait(),
                    self.seen
                ),
            }
        }
    }

    /// Sends `signal` and waits (at most 40 s) for the process to exit.
    fn stop(&mut self, signal: &str) -> ExitStatus {
        let sent = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "did not exit after {signal}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The token and the admin URL of a start-up line `… curl -H 'Authorization: Bearer T' URL`.
fn admin_line(line: &str) -> (String, String) {
    let (_, rest) = line
        .split_once("Authorization: Bearer ")
        .unwrap_or_else(|| panic!("no bearer token in {line:?}"));
    let (token, rest) = rest.split_once('\'').unwrap();
    let url = rest.trim();
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/_emulator/instances"),
        "{line}"
    );
    assert_eq!(token.len(), 32, "{line}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{line}");
    (token.to_string(), url.to_string())
}

/// The admin API at `url` refuses no token and a wrong one (changing nothing), and lists the
/// instances with the right one.
async fn admin_api_needs(url: &str, token: &str) -> Vec<Value> {
    install_crypto_provider();
    let http = reqwest::Client::new();
    let start =
        serde_json::json!({"process_code": "PROC-EMU-EXPENSE", "originator_userid": "emp1"});
    let without = http.post(url).json(&start).send().await.unwrap();
    assert_eq!(without.status(), 401);
    let wrong = http
        .post(url)
        .bearer_auth("0123456789abcdef0123456789abcdef")
        .json(&start)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let listed = http.get(url).bearer_auth(token).send().await.unwrap();
    assert_eq!(listed.status(), 200);
    listed.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_the_shipped_config_runs_the_demo_and_prints_a_new_admin_token_every_run() {
    let (first_db, second_db) = (TestDb::new(), TestDb::new());
    let serve = |db: &TestDb| {
        let mut command = dingsync_command(&["serve"]);
        // Where to run only (a test database, a free port) and a quicker pace: no key of the
        // shipped configuration's [dingtalk] or [callback] is touched.
        command
            .env("DINGSYNC_DATABASE_URL", &db.url)
            .env(
                "DINGSYNC_SERVER_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .env("DINGSYNC_EMULATOR_PEOPLE_PACE_MS", "100")
            .env_remove("RUST_LOG");
        Running::spawn(command)
    };
    let (mut first, mut second) = (serve(&first_db), serve(&second_db));
    let (token, url) = admin_line(&first.line_with("admin API token for this run"));
    let (other_token, _) = admin_line(&second.line_with("admin API token for this run"));
    assert_ne!(token, other_token, "two runs printed the same admin token");
    admin_api_needs(&url, &token).await;

    // The demo flows: simulated people and the demo app fill the tables through the daemon.
    let pool = PgPool::connect(&first_db.url).await.unwrap();
    eventually(
        Duration::from_secs(60),
        "approvals from the emulator's people and a created outbox row",
        || async {
            let (approvals, created): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM dingsync.approvals),
                        (SELECT count(*) FROM dingsync.outbox WHERE state = 'created')",
            )
            .fetch_one(&pool)
            .await
            .ok()?;
            (approvals > 0 && created > 0).then_some(())
        },
    )
    .await;
    pool.close().await;
    assert!(first.stop("-TERM").success());
    assert!(second.stop("-TERM").success());
    // The process has exited: the rest of its output is complete once the reader sees EOF.
    let rest: Vec<String> = first.lines.iter().collect();
    let printed = first.seen.iter().chain(&rest);
    assert_eq!(
        printed.filter(|l| l.contains(&token)).count(),
        1,
        "the admin token is printed exactly once: {:?} {rest:?}",
        first.seen
    );
}

#[tokio::test]
async fn the_standalone_emulator_prints_its_admin_token_and_requires_it() {
    let mut command = dingsync_command(&["emulator", "--listen", "127.0.0.1:0"]);
    command.env("DINGSYNC_EMULATOR_PEOPLE_PACE_MS", "0");
    let mut emulator = Running::spawn(command);
    let (token, url) = admin_line(&emulator.line_with("admin API token for this run"));
    let instances = admin_api_needs(&url, &token).await;
    assert!(
        instances.is_empty(),
        "a refused request started an instance"
    );
    assert!(emulator.stop("-INT").success());
}

#[tokio::test]
async fn the_standalone_emulator_takes_its_monthly_allowances_from_the_configuration() {
    let mut command = dingsync_command(&["emulator", "--listen", "127.0.0.1:0"]);
    command
        .env("DINGSYNC_EMULATOR_PEOPLE_PACE_MS", "0")
        .env("DINGSYNC_EMULATOR_MONTHLY_CALLS", "5000")
        .env("DINGSYNC_EMULATOR_MONTHLY_DELIVERIES", "3000");
    let mut emulator = Running::spawn(command);
    let (token, url) = admin_line(&emulator.line_with("admin API token for this run"));
    install_crypto_provider();
    let quota: Value = reqwest::Client::new()
        .get(url.replace("/_emulator/instances", "/_emulator/quota"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(quota["calls"]["allowance"], 5000, "{quota}");
    assert_eq!(quota["deliveries"]["allowance"], 3000, "{quota}");
    assert_eq!(quota["calls"]["used"], 0, "{quota}");
    assert!(emulator.stop("-INT").success());
}

#[tokio::test]
async fn the_standalone_emulator_refuses_a_real_organisations_configuration() {
    let mut command = dingsync_command(&["emulator", "--listen", "127.0.0.1:0"]);
    command
        .envs(REAL.iter().map(|(env, _, value)| (env, value)))
        .env("DINGSYNC_DINGTALK_API_BASE", "https://oapi.dingtalk.com");
    let output = run_to_end(command);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("dingtalk.api_base is https://oapi.dingtalk.com")
            && stderr.contains("never runs with its secrets"),
        "{stderr}"
    );
    assert!(!stdout.contains("DingTalk emulator on"), "{stdout}");
    for (_, key, value) in REAL {
        assert!(
            !stdout.contains(value) && !stderr.contains(value),
            "the value of {key} was printed"
        );
    }
}
