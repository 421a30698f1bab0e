//! `dingsync doctor` against a real PostgreSQL and a standalone emulator over real HTTP: a
//! correct setup passes, and each common mistake is a FAIL that names the key and the fix
//! without printing a secret.

mod common;

use common::{CORP_ID, TestApp, TestDb, install_crypto_provider, test_config};
use dingsync::{
    cli::{
        callback::{self as manage, Action},
        doctor::{self, Report, Status},
    },
    config::{Config, Secret},
    crypto,
    dingtalk::Client,
    store,
};
use dingsync_emulator::{self as emulator, Emulator, EmulatorConfig};

/// A daemon, a standalone emulator holding a registration of the daemon's URL (made through
/// `register_call_back`, so DingTalk checked the URL) and the configuration that matches both.
struct Registered {
    app: TestApp,
    emulator: Emulator,
    config: Config,
    _db: TestDb,
}

async fn registered() -> Registered {
    install_crypto_provider();
    let app = TestApp::spawn().await;
    let emulator = Emulator::start(
        EmulatorConfig {
            corp_id: CORP_ID.into(),
            ..EmulatorConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let db = TestDb::new();
    let mut config = test_config(&db.url);
    config.dingtalk.api_base = emulator.base_url();
    config.dingtalk.app_key = emulator::DEFAULT_APP_KEY.into();
    config.dingtalk.app_secret = Secret::new(emulator::DEFAULT_APP_SECRET);
    config.dingtalk.timeout_ms = 1_000;
    config.callback.token = Secret::new(app.token());
    config.callback.aes_key = Secret::new(app.crypto_key());
    config.callback.public_url = format!("{}/dingtalk/callback", app.base_url);
    let pool = store::connect_and_migrate(&config.database).await.unwrap();
    let client = Client::new(pool.clone(), &config.dingtalk, &emulator.base_url()).unwrap();
    manage::run(&client, &config, Action::Register)
        .await
        .expect("the emulator checks the daemon's URL and registers it");
    pool.close().await;
    Registered {
        app,
        emulator,
        config,
        _db: db,
    }
}

impl Registered {
    async fn stop(self) {
        self.emulator.stop().await;
        self.app.stop().await;
    }
}

fn status(report: &Report, check: &str) -> Status {
    report
        .get(check)
        .unwrap_or_else(|| panic!("no {check} finding in\n{report}"))
        .status
}

#[tokio::test]
async fn a_correct_setup_has_no_failure_and_exits_zero() {
    let s = registered().await;
    let report = doctor::run(&s.config).await;
    for check in [
        "config",
        "database",
        "clock",
        "token",
        "crypto round trip",
        "owner key",
        "callback registration",
    ] {
        assert_eq!(status(&report, check), Status::Ok, "{check} in\n{report}");
    }
    assert_eq!(report.exit_code(), 0, "{report}");
    s.stop().await;
}

#[tokio::test]
async fn an_app_key_alone_as_owner_key_fails_for_a_callback_registered_through_the_api() {
    let s = registered().await;
    let mut config = s.config.clone();
    config.callback.owner_key = vec!["dingmadeupappkey0001".into()];
    let report = doctor::run(&config).await;
    let finding = report.get("owner key").expect("an owner key finding");
    assert_eq!(finding.status, Status::Fail, "{report}");
    assert!(finding.finding.contains("callback.owner_key"), "{finding}");
    assert_eq!(
        finding.fix.as_deref(),
        Some("add your CorpId (ding...) to callback.owner_key")
    );
    // The round trip itself works with any owner key: only the registration makes it wrong.
    assert_eq!(status(&report, "crypto round trip"), Status::Ok, "{report}");
    assert_eq!(report.exit_code(), 1);
    s.stop().await;
}

#[tokio::test]
async fn an_aes_key_other_than_the_registered_one_fails_without_printing_either() {
    let s = registered().await;
    let mut config = s.config.clone();
    let other = crypto::random_aes_key();
    config.callback.aes_key = Secret::new(other.clone());
    let report = doctor::run(&config).await;
    let finding = report
        .get("callback registration")
        .expect("a registration finding");
    assert_eq!(finding.status, Status::Fail, "{report}");
    assert!(finding.finding.contains("callback.aes_key"), "{finding}");
    assert!(!finding.finding.contains("callback.token"), "{finding}");
    assert!(
        finding
            .fix
            .as_deref()
            .is_some_and(|fix| fix.contains("dingsync callback update")),
        "{finding}"
    );
    let printed = report.to_string();
    for secret in [other.as_str(), s.app.crypto_key(), s.app.token()] {
        assert!(!printed.contains(secret), "{printed}");
    }
    assert_eq!(report.exit_code(), 1);
    s.stop().await;
}

#[tokio::test]
async fn no_registration_fails_unless_the_owner_keys_suggest_a_console_subscription() {
    let s = registered().await;
    let pool = store::connect(&s.config.database).await.unwrap();
    let client = Client::new(pool.clone(), &s.config.dingtalk, &s.emulator.base_url()).unwrap();
    client.delete_callback().await.unwrap();
    pool.close().await;
    let report = doctor::run(&s.config).await;
    let finding = report
        .get("callback registration")
        .expect("a registration finding");
    assert_eq!(finding.status, Status::Fail, "{report}");
    assert_eq!(finding.fix.as_deref(), Some("dingsync callback register"));
    // Only the AppKey listed: the app probably subscribed in the console, invisible to the API.
    let mut config = s.config.clone();
    config.callback.owner_key = vec![emulator::DEFAULT_APP_KEY.into()];
    let report = doctor::run(&config).await;
    assert_eq!(
        status(&report, "callback registration"),
        Status::Warn,
        "{report}"
    );
    assert_eq!(status(&report, "owner key"), Status::Ok, "{report}");
    assert_eq!(report.exit_code(), 0, "{report}");
    s.stop().await;
}

#[tokio::test]
async fn a_database_without_the_migrations_fails_with_dingsync_migrate() {
    install_crypto_provider();
    let db = TestDb::new();
    let config = test_config(&db.url);
    // The database exists (store::connect creates it) but nothing is migrated.
    store::connect(&config.database)
        .await
        .unwrap()
        .close()
        .await;
    let report = doctor::run(&config).await;
    let finding = report.get("database").expect("a database finding");
    assert_eq!(finding.status, Status::Fail, "{report}");
    assert_eq!(finding.fix.as_deref(), Some("dingsync migrate"));
    assert_eq!(status(&report, "token"), Status::Skip, "{report}");
    assert_eq!(report.exit_code(), 1);
    // Doctor only looks: the migrations are still missing.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let schema: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('dingsync.schema_history')::text")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(schema, None);
    pool.close().await;
}

#[tokio::test]
async fn a_missing_database_fails_and_is_not_created() {
    install_crypto_provider();
    let db = TestDb::new();
    let report = doctor::run(&test_config(&db.url)).await;
    assert_eq!(status(&report, "database"), Status::Fail, "{report}");
    let server = sqlx::PgPool::connect(&format!("{}/postgres", common::server_url()))
        .await
        .unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&db.name)
            .fetch_one(&server)
            .await
            .unwrap();
    assert!(!exists, "doctor created {}", db.name);
    server.close().await;
}

#[tokio::test]
async fn a_wrong_app_secret_or_a_missing_ip_whitelist_fails_the_token_with_its_fix() {
    let s = registered().await;
    // The old family's codes (40096, 60020 from gettoken), whichever family this run uses.
    let mut legacy = s.config.clone();
    legacy.dingtalk.api_family = dingsync::config::ApiFamily::Legacy;
    let mut config = legacy.clone();
    let wrong = "not-the-emulator-secret-0001";
    config.dingtalk.app_secret = Secret::new(wrong);
    let report = doctor::run(&config).await;
    let finding = report.get("token").expect("a token finding");
    assert_eq!(finding.status, Status::Fail, "{report}");
    assert_eq!(
        finding.fix.as_deref(),
        Some("check dingtalk.app_key and dingtalk.app_secret (errcode 40096: wrong key or secret)")
    );
    assert!(!report.to_string().contains(wrong), "{report}");
    assert_eq!(report.exit_code(), 1);

    // DingTalk refuses a token to a machine outside the app's IP whitelist (errcode 60020).
    s.emulator.state().inject(
        "gettoken",
        emulator::InjectedError::Custom {
            errcode: 60020,
            sub_code: None,
            errmsg: "访问ip不在白名单之中".into(),
        },
        1,
    );
    let report = doctor::run(&legacy).await;
    let finding = report.get("token").expect("a token finding");
    assert_eq!(finding.status, Status::Fail, "{report}");
    assert!(
        finding
            .fix
            .as_deref()
            .is_some_and(|fix| fix.contains("IP whitelist")),
        "{finding}"
    );
    s.stop().await;
}

#[tokio::test]
async fn the_api_family_check_says_which_family_the_apps_permissions_allow() {
    let s = registered().await;
    let mut config = s.config.clone();
    config.dingtalk.api_family = dingsync::config::ApiFamily::Legacy;
    let report = doctor::run(&config).await;
    assert_eq!(status(&report, "api family"), Status::Ok, "{report}");
    // One probe in each family, each one metered call.
    let state = s.emulator.state();
    assert_eq!(state.calls("topapi/processinstance/get"), 1);
    assert_eq!(state.calls("GET v1.0/workflow/processInstances"), 1);

    // An app with only v1.0 permissions, configured for the old family: fail, and say so.
    state.update_faults(|f| f.denied_families = vec!["legacy".into()]);
    let report = doctor::run(&config).await;
    let finding = report.get("api family").unwrap();
    assert_eq!(finding.status, Status::Fail, "{report}");
    assert!(
        finding
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("dingtalk.api_family = \"v1\"")),
        "{finding}"
    );
    config.dingtalk.api_family = dingsync::config::ApiFamily::V1;
    let report = doctor::run(&config).await;
    assert_eq!(status(&report, "api family"), Status::Ok, "{report}");

    // An app with only the old permissions: fine for legacy, with a warning of what v1 adds.
    state.update_faults(|f| f.denied_families = vec!["v1".into()]);
    config.dingtalk.api_family = dingsync::config::ApiFamily::Legacy;
    let report = doctor::run(&config).await;
    assert_eq!(status(&report, "api family"), Status::Warn, "{report}");
    config.outbox.forecast_check = true;
    let report = doctor::run(&config).await;
    assert_eq!(status(&report, "api family"), Status::Fail, "{report}");
    s.stop().await;
}
