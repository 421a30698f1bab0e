//! Several organisations in one deployment (`[[apps]]`): two apps of two organisations, each
//! against its own emulator (different CorpId, AppKey and secret) over real HTTP and WebSocket,
//! one delivering by HTTP push and one over Stream, on a fresh database. Each organisation's
//! events land under it only; a push signed for one app is refused on the other's path; one
//! organisation's allowance pause leaves the other creating; each outbox row is created with its
//! own organisation's credentials.

mod common;

use std::time::Duration;

use common::*;
use dingsync::{
    app::App,
    callback::TAGS,
    config::{AppEntry, AppStream, Config, Secret},
    crypto::{self, CallbackCrypto},
    dingtalk::types::CallbackRegistration,
    store::{self, outbox::PAUSED},
};
use dingsync_emulator::{Delivery, Emulator, EmulatorConfig, InjectedError, StartInstance};
use sqlx::PgPool;

const CORP_A: &str = "dingacmecorp00000001";
const KEY_A: &str = "dingacmeappkey000001";
const CORP_B: &str = "dingglobexcorp000002";
const KEY_B: &str = "dingglobexappkey0002";
const TEMPLATE: &str = "PROC-EMU-EXPENSE";

/// One organisation's emulator, DingTalk's timings 20 times faster. Seeds differ per
/// organisation: the same seed would hand out the same instance ids in both.
async fn emulator(corp_id: &str, app_key: &str, seed: u64, delivery: Delivery) -> Emulator {
    install_crypto_provider();
    Emulator::start(
        EmulatorConfig {
            corp_id: corp_id.into(),
            app_key: app_key.into(),
            app_secret: format!("secret-of-{app_key}"),
            time_scale: 0.05,
            seed,
            delivery,
            ..EmulatorConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap()
}

/// Callback secrets of one app, as a test knows them.
struct Secrets {
    token: String,
    aes_key: String,
}

impl Secrets {
    fn new() -> Secrets {
        Secrets {
            token: crypto::random_nonce(32),
            aes_key: crypto::random_aes_key(),
        }
    }

    fn crypto(&self) -> CallbackCrypto {
        CallbackCrypto::new(&self.token, &self.aes_key).unwrap()
    }
}

/// An `[[apps]]` entry of `corp_id` at `base` (its emulator, or nowhere).
fn entry(
    name: &str,
    corp_id: &str,
    app_key: &str,
    base: &str,
    secrets: Option<&Secrets>,
) -> AppEntry {
    AppEntry {
        name: name.into(),
        app_key: app_key.into(),
        app_secret: Secret::new(format!("secret-of-{app_key}")),
        corp_id: corp_id.into(),
        token: Secret::new(secrets.map_or("", |s| s.token.as_str())),
        aes_key: Secret::new(secrets.map_or("", |s| s.aes_key.as_str())),
        api_base: base.into(),
        openapi_base: base.into(),
        stream: AppStream {
            enabled: secrets.is_none(),
        },
        ..AppEntry::default()
    }
}

/// The test configuration without its single app, short timings, and `apps`.
fn several(db: &TestDb, apps: Vec<AppEntry>) -> Config {
    let mut c = test_config(&db.url);
    c.dingtalk.app_key = String::new();
    c.dingtalk.app_secret = Secret::default();
    c.dingtalk.corp_id = String::new();
    c.callback.token = Secret::default();
    c.callback.aes_key = Secret::default();
    c.callback.owner_key = Vec::new();
    c.dingtalk.timeout_ms = 500;
    c.dingtalk.max_attempts = 1;
    c.dingtalk.qps = 50;
    c.outbox.lease_ms = 1_000;
    c.outbox.lost_settle_ms = 100;
    c.outbox.backoff_base_ms = 50;
    c.outbox.backoff_max_ms = 200;
    c.outbox.poll_ms = 100;
    c.stream.silence_limit_ms = 1_500;
    c.apps = apps;
    c
}

/// Two organisations: `acme` (A) by HTTP push, `globex` (B) over Stream, each at its emulator;
/// A's callback registered at A's emulator under A's path.
struct TwoOrgs {
    emu_a: Emulator,
    emu_b: Emulator,
    app: App,
    pool: PgPool,
    _db: TestDb,
}

impl TwoOrgs {
    async fn start() -> TwoOrgs {
        let emu_a = emulator(CORP_A, KEY_A, 7, Delivery::Http).await;
        let emu_b = emulator(CORP_B, KEY_B, 8, Delivery::Stream).await;
        let db = TestDb::new();
        let secrets_a = Secrets::new();
        let config = several(
            &db,
            vec![
                entry("acme", CORP_A, KEY_A, &emu_a.base_url(), Some(&secrets_a)),
                entry("globex", CORP_B, KEY_B, &emu_b.base_url(), None),
            ],
        );
        let app = App::start(config).await.expect("daemon starts");
        let client_a = app.orgs[0].client.clone().expect("acme has a client");
        client_a
            .register_callback(&CallbackRegistration {
                call_back_tag: TAGS.iter().map(|t| t.to_string()).collect(),
                token: secrets_a.token.clone(),
                aes_key: secrets_a.aes_key.clone(),
                url: format!("http://{}/dingtalk/callback/acme", app.addr),
            })
            .await
            .expect("acme's callback registered at acme's emulator");
        let pool = PgPool::connect(&db.url).await.unwrap();
        TwoOrgs {
            emu_a,
            emu_b,
            app,
            pool,
            _db: db,
        }
    }

    async fn stop(self) {
        self.app.stop().await.unwrap();
        self.pool.close().await;
        self.emu_a.stop().await;
        self.emu_b.stop().await;
    }
}

/// Someone of the emulator's organisation starts an approval; its events follow.
fn start_approval(emu: &Emulator) -> String {
    emu.state()
        .start_instance(StartInstance {
            process_code: TEMPLATE.into(),
            originator_userid: "emp1".into(),
            approvers: Some(vec!["manager1".into()]),
            ..StartInstance::default()
        })
        .unwrap()
        .process_instance_id
}

/// The organisations the events of approval `pid` are stored under.
async fn event_corps(pool: &PgPool, pid: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT DISTINCT corp_id FROM dingsync.events WHERE process_instance_id = $1 ORDER BY 1",
    )
    .bind(pid)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn request(pool: &PgPool, corp_id: &str, key: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO dingsync.outbox (corp_id, idempotency_key, process_code, originator_user_id, form_values)
         VALUES ($1, $2, $3, 'emp1',
                 jsonb_build_array(jsonb_build_object('name', 'Reason', 'value', $2::text),
                                   jsonb_build_object('name', 'Amount', 'value', 100)))
         RETURNING id",
    )
    .bind(corp_id)
    .bind(key)
    .bind(TEMPLATE)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[derive(Debug, sqlx::FromRow)]
struct OutboxRow {
    state: String,
    attempts: i32,
    last_error: Option<String>,
    process_instance_id: Option<String>,
}

async fn outbox_row(pool: &PgPool, corp_id: &str, id: i64) -> OutboxRow {
    sqlx::query_as(
        "SELECT state, attempts, last_error, process_instance_id FROM dingsync.outbox
         WHERE corp_id = $1 AND id = $2",
    )
    .bind(corp_id)
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn created(pool: &PgPool, corp_id: &str, id: i64) -> String {
    eventually(
        Duration::from_secs(20),
        "the outbox row created",
        || async { outbox_row(pool, corp_id, id).await.process_instance_id },
    )
    .await
}

#[tokio::test]
async fn events_of_a_pushing_and_a_streaming_organisation_are_stored_under_their_own_organisation_only()
 {
    let orgs = TwoOrgs::start().await;
    let pid_a = start_approval(&orgs.emu_a);
    let pid_b = start_approval(&orgs.emu_b);
    let pool = &orgs.pool;
    for (pid, corp) in [(&pid_a, CORP_A), (&pid_b, CORP_B)] {
        let corps = eventually(
            Duration::from_secs(20),
            "the approval's events stored",
            || async {
                let corps = event_corps(pool, pid).await;
                (!corps.is_empty()).then_some(corps)
            },
        )
        .await;
        assert_eq!(corps, [corp], "approval {pid}'s events");
    }
    let sources: Vec<(String, String)> =
        sqlx::query_as("SELECT DISTINCT corp_id, source FROM dingsync.events ORDER BY 1")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(
        sources,
        [
            (CORP_A.to_string(), "http_push".to_string()),
            (CORP_B.to_string(), "stream".to_string())
        ]
    );
    let approvals: Vec<(String, String)> =
        sqlx::query_as("SELECT corp_id, process_instance_id FROM dingsync.approvals ORDER BY 1")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(
        approvals,
        [(CORP_A.to_string(), pid_a), (CORP_B.to_string(), pid_b)]
    );
    orgs.stop().await;
}

#[tokio::test]
async fn outbox_rows_of_each_organisation_are_created_with_that_organisations_credentials() {
    let orgs = TwoOrgs::start().await;
    let pool = &orgs.pool;
    let a = request(pool, CORP_A, "acme-1").await;
    let b = request(pool, CORP_B, "globex-1").await;
    let pid_a = created(pool, CORP_A, a).await;
    let pid_b = created(pool, CORP_B, b).await;
    // Each emulator knows only its own app's secret: an instance there was made with it.
    assert!(orgs.emu_a.state().instance(&pid_a).is_some());
    assert!(orgs.emu_a.state().instance(&pid_b).is_none());
    assert!(orgs.emu_b.state().instance(&pid_b).is_some());
    assert!(orgs.emu_b.state().instance(&pid_a).is_none());
    assert_eq!(orgs.emu_a.state().calls(api::create()), 1);
    assert_eq!(orgs.emu_b.state().calls(api::create()), 1);
    // Tokens and request budgets are kept per organisation and app.
    let tokens: Vec<(String, String)> =
        sqlx::query_as("SELECT corp_id, app_key FROM dingsync.access_tokens ORDER BY 1")
            .fetch_all(pool)
            .await
            .unwrap();
    let expected = [
        (CORP_A.to_string(), KEY_A.to_string()),
        (CORP_B.to_string(), KEY_B.to_string()),
    ];
    assert_eq!(tokens, expected);
    let budgets: Vec<(String, String)> =
        sqlx::query_as("SELECT corp_id, app_key FROM dingsync.rate_budget ORDER BY 1")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(budgets, expected);
    // The row's own events follow, each under its organisation.
    for (pid, corp) in [(&pid_a, CORP_A), (&pid_b, CORP_B)] {
        let corps = eventually(
            Duration::from_secs(20),
            "the created approval's events",
            || async {
                let corps = event_corps(pool, pid).await;
                (!corps.is_empty()).then_some(corps)
            },
        )
        .await;
        assert_eq!(corps, [corp]);
    }
    // A row for an organisation no app serves is refused when it is inserted.
    let refused = sqlx::query(
        "INSERT INTO dingsync.outbox (corp_id, idempotency_key, process_code, originator_user_id, form_values)
         VALUES ('dingnobody', 'x', 'PROC-EMU-EXPENSE', 'emp1', '[]')",
    )
    .execute(pool)
    .await
    .expect_err("an organisation not served is refused");
    assert!(refused.to_string().contains("not served"), "{refused}");
    orgs.stop().await;
}

#[tokio::test]
async fn one_organisations_allowance_pause_leaves_the_other_creating() {
    let orgs = TwoOrgs::start().await;
    let pool = &orgs.pool;
    // DingTalk answers acme's creates with "calls used up for the month".
    orgs.emu_a.state().inject(
        api::create(),
        InjectedError::Custom {
            errcode: 90020,
            sub_code: None,
            errmsg: "您的企业本月api调用量已超过限制".into(),
        },
        1,
    );
    let a = request(pool, CORP_A, "acme-paused").await;
    let paused = eventually(Duration::from_secs(20), "acme's row paused", || async {
        let row = outbox_row(pool, CORP_A, a).await;
        row.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with(PAUSED))
            .then_some(row)
    })
    .await;
    assert_eq!((paused.state.as_str(), paused.attempts), ("pending", 0));
    assert!(store::usage::pause(pool, CORP_A).await.unwrap().is_some());

    // globex is not paused: its rows are created meanwhile, as many as asked.
    let mut pids = Vec::new();
    for i in 0..3 {
        let b = request(pool, CORP_B, &format!("globex-{i}")).await;
        pids.push(created(pool, CORP_B, b).await);
    }
    assert!(store::usage::pause(pool, CORP_B).await.unwrap().is_none());
    assert_eq!(orgs.emu_b.state().instances().len(), 3);
    // acme stays paused, its row pending, nothing more sent to its DingTalk.
    assert_eq!(outbox_row(pool, CORP_A, a).await.state, "pending");
    assert_eq!(orgs.emu_a.state().calls(api::create()), 1);
    assert!(orgs.emu_a.state().instances().is_empty());
    // /metrics shows each organisation's month: acme paused, globex not.
    let url = format!("http://{}/metrics", orgs.app.addr);
    eventually(
        Duration::from_secs(10),
        "each organisation's pause in /metrics",
        || async {
            let page = reqwest::get(&url).await.ok()?.text().await.ok()?;
            let paused = |corp: &str| {
                let series = format!("dingsync_allowance_paused{{corp_id=\"{corp}\"}} ");
                page.lines()
                    .find_map(|l| l.strip_prefix(series.as_str()).map(str::to_string))
            };
            (paused(CORP_A)?.as_str() == "1" && paused(CORP_B)?.as_str() == "0").then_some(())
        },
    )
    .await;
    orgs.stop().await;
}

/// Seals `message` for `secrets` (owner key `owner`) and posts it to `path`.
async fn push_to(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    secrets: &Secrets,
    owner: &str,
    message: &str,
) -> reqwest::Response {
    let timestamp = chrono::Utc::now().timestamp_millis().to_string();
    let nonce = crypto::random_nonce(8);
    let sealed = secrets.crypto().seal(message, owner, &timestamp, &nonce);
    http.post(format!("{base}{path}"))
        .query(&[
            ("signature", sealed.signature.as_str()),
            ("timestamp", &timestamp),
            ("nonce", &nonce),
        ])
        .json(&serde_json::json!({ "encrypt": sealed.encrypt }))
        .send()
        .await
        .unwrap()
}

/// An instance event of `corp_id`.
fn event_of(corp_id: &str, pid: &str) -> String {
    let mut event = json(&instance_event(pid, "start", None, 1_764_300_000_000, None));
    event["corpId"] = corp_id.into();
    event.to_string()
}

#[tokio::test]
async fn a_push_signed_for_one_app_is_refused_on_the_other_apps_path_and_may_not_name_the_other_organisation()
 {
    install_crypto_provider();
    let db = TestDb::new();
    let (secrets_a, secrets_b) = (Secrets::new(), Secrets::new());
    let nowhere = "http://127.0.0.1:9";
    let mut config = several(
        &db,
        vec![
            entry("acme", CORP_A, KEY_A, nowhere, Some(&secrets_a)),
            entry("globex", CORP_B, KEY_B, nowhere, Some(&secrets_b)),
        ],
    );
    config.outbox.enabled = false;
    let app = App::start(config).await.expect("daemon starts");
    let pool = PgPool::connect(&db.url).await.unwrap();
    let (http, base) = (reqwest::Client::new(), format!("http://{}", app.addr));
    let count = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM dingsync.events")
            .fetch_one(&pool)
            .await
            .unwrap()
    };

    // Signed for acme, sent to globex's path: globex's secrets do not verify it.
    let to_b = push_to(
        &http,
        &base,
        "/dingtalk/callback/globex",
        &secrets_a,
        CORP_A,
        &event_of(CORP_A, "pid-a-1"),
    )
    .await;
    assert_eq!(to_b.status(), 403);
    // Signed for acme, naming globex's organisation, on acme's path: not acme's to store,
    // though globex is served from this database.
    let foreign = push_to(
        &http,
        &base,
        "/dingtalk/callback/acme",
        &secrets_a,
        CORP_A,
        &event_of(CORP_B, "pid-b-1"),
    )
    .await;
    assert_eq!(foreign.status(), 403);
    // With two apps the path must name one; a name not configured is no app.
    for path in ["/dingtalk/callback", "/dingtalk/callback/initech"] {
        let response = push_to(
            &http,
            &base,
            path,
            &secrets_a,
            CORP_A,
            &event_of(CORP_A, "pid-a-1"),
        )
        .await;
        assert_eq!(response.status(), 404, "{path}");
    }
    assert_eq!(count(pool.clone()).await, 0, "nothing stored");

    // Each app's own pushes on its own path are stored under its organisation.
    let ok_a = push_to(
        &http,
        &base,
        "/dingtalk/callback/acme",
        &secrets_a,
        CORP_A,
        &event_of(CORP_A, "pid-a-1"),
    )
    .await;
    assert_success(&secrets_a.crypto(), CORP_A, ok_a).await;
    let ok_b = push_to(
        &http,
        &base,
        "/dingtalk/callback/globex",
        &secrets_b,
        KEY_B,
        &event_of(CORP_B, "pid-b-1"),
    )
    .await;
    assert_success(&secrets_b.crypto(), KEY_B, ok_b).await;
    assert_eq!(event_corps(&pool, "pid-a-1").await, [CORP_A]);
    assert_eq!(event_corps(&pool, "pid-b-1").await, [CORP_B]);
    let refused: String = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        refused
            .lines()
            .any(|l| l.contains("outcome=\"refused_app\"")),
        "the unknown paths are counted"
    );
    app.stop().await.unwrap();
    pool.close().await;
}

#[tokio::test]
async fn doctor_checks_every_app_and_an_operator_command_must_name_one_of_several() {
    let emu_a = emulator(CORP_A, KEY_A, 11, Delivery::Http).await;
    let emu_b = emulator(CORP_B, KEY_B, 12, Delivery::Stream).await;
    let db = TestDb::new();
    let migrate = test_config(&db.url);
    store::connect_and_migrate(&migrate.database)
        .await
        .unwrap()
        .close()
        .await;
    let secrets = Secrets::new();
    let file = std::env::temp_dir().join(format!("dingsync-orgs-{}.toml", crypto::random_nonce(8)));
    let text = format!(
        r#"
[database]
url = "{db}"

[[apps]]
name = "acme"
corp_id = "{CORP_A}"
app_key = "{KEY_A}"
app_secret = "secret-of-{KEY_A}"
token = "{token}"
aes_key = "{aes_key}"
api_base = "{a}"

[[apps]]
name = "globex"
corp_id = "{CORP_B}"
app_key = "{KEY_B}"
api_base = "{b}"
stream.enabled = true
"#,
        db = db.url,
        token = secrets.token,
        aes_key = secrets.aes_key,
        a = emu_a.base_url(),
        b = emu_b.base_url(),
    );
    std::fs::write(&file, text).unwrap();
    let run = |args: &'static [&'static str]| {
        let file = file.clone();
        tokio::task::spawn_blocking(move || {
            let mut command = dingsync_command_with(&file, args);
            command.env(
                "DINGSYNC_APPS_GLOBEX_APP_SECRET",
                format!("secret-of-{KEY_B}"),
            );
            run_to_end(command)
        })
    };

    let doctor = run(&["doctor"]).await.unwrap();
    let out = String::from_utf8_lossy(&doctor.stdout).to_string();
    let (acme, globex) = out
        .split_once("app globex")
        .unwrap_or_else(|| panic!("a section per app: {out}"));
    assert!(
        acme.contains(&format!("app acme (corp_id {CORP_A})")),
        "{out}"
    );
    for section in [acme, globex] {
        assert!(
            section
                .lines()
                .any(|l| l.starts_with("ok") && l.contains("token")),
            "each app's credentials checked at its own DingTalk: {out}"
        );
    }
    assert!(
        globex
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("stream")),
        "globex's Stream connection opened: {out}"
    );
    assert!(
        !out.contains(&format!("secret-of-{KEY_B}")),
        "no secret printed"
    );
    assert!(emu_a.state().calls(api::token()) >= 1);
    assert!(emu_b.state().calls(api::token()) >= 1);

    let unnamed = run(&["outbox", "list"]).await.unwrap();
    assert_eq!(unnamed.status.code(), Some(2));
    let said = String::from_utf8_lossy(&unnamed.stderr);
    assert!(
        said.contains("--app: several apps are configured (acme, globex): name one"),
        "{said}"
    );
    let named = run(&["outbox", "list", "--app", "globex"]).await.unwrap();
    assert_eq!(
        named.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&named.stderr)
    );
    std::fs::remove_file(&file).unwrap();
    emu_a.stop().await;
    emu_b.stop().await;
}

#[tokio::test]
async fn the_single_app_form_is_the_app_named_default_on_both_paths() {
    let app = TestApp::spawn().await;
    let secrets = Secrets {
        token: app.token().to_string(),
        aes_key: app.crypto_key().to_string(),
    };
    let http = reqwest::Client::new();
    for (path, pid) in [
        ("/dingtalk/callback", "pid-bare"),
        ("/dingtalk/callback/default", "pid-named"),
    ] {
        let response = push_to(
            &http,
            &app.base_url,
            path,
            &secrets,
            CORP_ID,
            &event_of(CORP_ID, pid),
        )
        .await;
        assert_success(&app.crypto, CORP_ID, response).await;
        assert_eq!(event_corps(&app.pool, pid).await, [CORP_ID], "{path}");
    }
    let other = push_to(
        &http,
        &app.base_url,
        "/dingtalk/callback/acme",
        &secrets,
        CORP_ID,
        &event_of(CORP_ID, "pid-x"),
    )
    .await;
    assert_eq!(other.status(), 404);
    app.stop().await;
}
