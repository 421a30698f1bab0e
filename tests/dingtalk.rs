//! The DingTalk client against the emulator over real HTTP, with a real database for the shared
//! token and budget: every call, each error class, one gettoken for two replicas.

mod common;

use std::time::{Duration, Instant};

use common::{
    CORP_ID, TestApp, TestDb, api, api_family, embedded_emulator, eventually,
    install_crypto_provider, test_config,
};
use dingsync::{
    cli::callback::{self as manage, Action},
    config::{ApiFamily, Config, Secret},
    dingtalk::{
        Client, Error, Purpose,
        types::{CreateInstance, FormValue, ListIds},
    },
    store,
};
use dingsync_emulator::{Emulator, EmulatorConfig, InjectedError, TaskAction};
use sqlx::PgPool;

struct Setup {
    emulator: Emulator,
    config: Config,
    client: Client,
    _db: TestDb,
}

async fn setup(adjust: impl FnOnce(&mut Config)) -> Setup {
    install_crypto_provider();
    let emulator = Emulator::start(
        EmulatorConfig {
            corp_id: CORP_ID.into(),
            time_scale: 0.01,
            ..EmulatorConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let db = TestDb::new();
    let mut config = test_config(&db.url);
    config.dingtalk.app_key = dingsync_emulator::DEFAULT_APP_KEY.into();
    config.dingtalk.app_secret = Secret::new(dingsync_emulator::DEFAULT_APP_SECRET);
    config.dingtalk.timeout_ms = 1_000;
    config.dingtalk.qps = 0;
    adjust(&mut config);
    let pool = store::connect_and_migrate(&config.database).await.unwrap();
    let client = Client::new(pool, &config.dingtalk, &emulator.base_url()).unwrap();
    Setup {
        emulator,
        config,
        client,
        _db: db,
    }
}

impl Setup {
    /// The client's configuration, with the callback settings of a running daemon `app`.
    fn callback_config(&self, app: &TestApp) -> Config {
        let mut config = self.config.clone();
        config.callback.token = Secret::new(app.token());
        config.callback.aes_key = Secret::new(app.crypto_key());
        config.callback.public_url = format!("{}/dingtalk/callback", app.base_url);
        config
    }
}

fn expense() -> CreateInstance {
    CreateInstance {
        process_code: "PROC-EMU-EXPENSE".into(),
        originator_user_id: "emp1".into(),
        dept_id: 100,
        agent_id: None,
        approvers: Some("manager1".into()),
        approvers_v2: None,
        cc_list: None,
        cc_position: None,
        form_component_values: vec![
            FormValue {
                name: "Reason".into(),
                value: "trip".into(),
                ext_value: None,
                ..FormValue::default()
            },
            FormValue {
                name: "Amount".into(),
                value: "100".into(),
                ext_value: None,
                ..FormValue::default()
            },
        ],
        ..CreateInstance::default()
    }
}

#[tokio::test]
async fn create_get_and_listids_round_trip_through_the_emulator() {
    let s = setup(|_| {}).await;
    let id = s.client.create_instance(&expense()).await.unwrap();
    let instance = s.client.get_instance(&id, Purpose::Details).await.unwrap();
    assert_eq!(instance.status, "RUNNING");
    assert_eq!(instance.originator_userid.as_deref(), Some("emp1"));
    assert!(!instance.tasks.is_empty() && instance.tasks[0].taskid.parse::<i64>().is_ok());
    // Beijing-time "yyyy-MM-dd HH:mm:ss".
    assert_eq!(instance.create_time.as_deref().map(str::len), Some(19));
    let now = chrono::Utc::now().timestamp_millis();
    let page = s
        .client
        .list_instance_ids(
            &ListIds {
                process_code: "PROC-EMU-EXPENSE".into(),
                start_time: now - 3_600_000,
                end_time: None,
                size: 20,
                cursor: 0,
                userid_list: None,
                statuses: Vec::new(),
            },
            Purpose::Backfill,
        )
        .await
        .unwrap();
    assert_eq!(page.list, vec![id]);
    assert_eq!(page.next_cursor, None);
    assert_eq!(
        s.emulator.state().calls(api::token()),
        1,
        "one token for all three calls"
    );
    s.emulator.stop().await;
}

#[tokio::test]
async fn a_business_rejection_is_permanent_and_carries_errcode_and_errmsg() {
    let s = setup(|_| {}).await;
    let mut bad = expense();
    bad.process_code = "PROC-DOES-NOT-EXIST".into();
    match s.client.create_instance(&bad).await {
        Err(Error::Rejected {
            errcode, errmsg, ..
        }) => assert!(errcode != 0 && !errmsg.is_empty()),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(s.emulator.state().calls(api::create()), 1, "not retried");
    s.emulator.stop().await;
}

#[tokio::test]
async fn a_revoked_token_is_refreshed_once_and_the_call_retried() {
    let s = setup(|_| {}).await;
    let id = s.client.create_instance(&expense()).await.unwrap();
    s.emulator.state().revoke_token();
    s.client.get_instance(&id, Purpose::Details).await.unwrap();
    assert_eq!(s.emulator.state().calls(api::token()), 2);
    // A token refused again right after the refresh is reported, not retried forever.
    s.emulator
        .state()
        .inject(api::get(), InjectedError::TokenInvalid, 5);
    assert!(matches!(
        s.client.get_instance(&id, Purpose::Details).await,
        Err(Error::InvalidToken { .. })
    ));
    s.emulator.stop().await;
}

#[tokio::test]
async fn rate_limits_back_off_and_retry_within_the_attempt_bound() {
    let s = setup(|c| c.dingtalk.max_attempts = 2).await;
    let id = s.client.create_instance(&expense()).await.unwrap();
    s.emulator
        .state()
        .inject(api::get(), InjectedError::RateLimit, 1);
    let started = std::time::Instant::now();
    s.client.get_instance(&id, Purpose::Details).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "backed off at least a second"
    );
    s.emulator
        .state()
        .inject(api::get(), InjectedError::RateLimit, 5);
    assert!(matches!(
        s.client.get_instance(&id, Purpose::Details).await,
        Err(Error::RateLimited { .. })
    ));
    s.emulator.stop().await;
}

#[tokio::test]
async fn transient_failures_are_retried_for_reads_but_not_for_create() {
    let s = setup(|_| {}).await;
    let id = s.client.create_instance(&expense()).await.unwrap();
    s.emulator
        .state()
        .inject(api::get(), InjectedError::GatewayTimeout, 1);
    s.client.get_instance(&id, Purpose::Details).await.unwrap();
    s.emulator.state().update_faults(|f| f.http_5xx_rate = 1.0);
    assert!(matches!(
        s.client.get_instance(&id, Purpose::Details).await,
        Err(Error::Transient(_))
    ));
    s.emulator.state().reset_faults();
    // A create that hit a gateway timeout may have been processed: no blind retry.
    s.emulator
        .state()
        .inject(api::create(), InjectedError::GatewayTimeout, 1);
    assert!(matches!(
        s.client.create_instance(&expense()).await,
        Err(Error::NoResponse(_))
    ));
    s.emulator.stop().await;
}

#[tokio::test]
async fn a_create_whose_response_is_lost_reports_no_response_and_the_instance_exists() {
    let s = setup(|_| {}).await;
    let before = s.emulator.state().instances().len();
    s.emulator
        .state()
        .update_faults(|f| f.lose_create_response = 1);
    assert!(matches!(
        s.client.create_instance(&expense()).await,
        Err(Error::NoResponse(_))
    ));
    assert_eq!(
        s.emulator.state().instances().len(),
        before + 1,
        "created, exactly once"
    );
    assert_eq!(s.emulator.state().calls(api::create()), 1, "not retried");
    s.emulator.stop().await;
}

#[tokio::test]
async fn two_replicas_needing_a_token_at_once_make_exactly_one_gettoken() {
    let s = setup(|_| {}).await;
    let other_pool = store::connect(&s.config.database).await.unwrap();
    let other = Client::new(
        other_pool.clone(),
        &s.config.dingtalk,
        &s.emulator.base_url(),
    )
    .unwrap();
    let (a, b, c, d) = tokio::join!(
        s.client.tokens().get(),
        other.tokens().get(),
        s.client.tokens().get(),
        other.tokens().get()
    );
    let tokens = [a.unwrap(), b.unwrap(), c.unwrap(), d.unwrap()];
    assert!(tokens.iter().all(|t| t == &tokens[0]));
    assert_eq!(s.emulator.state().calls(api::token()), 1);
    other_pool.close().await;
    s.emulator.stop().await;
}

/// Two replicas with a pool of one connection each, the way a starved daemon would be.
async fn one_connection_replicas(s: &Setup) -> [(PgPool, Client); 2] {
    let mut small = s.config.database.clone();
    small.max_connections = 1;
    small.acquire_timeout_ms = 500;
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let pool = store::connect(&small).await.unwrap();
        let client = Client::new(pool.clone(), &s.config.dingtalk, &s.emulator.base_url()).unwrap();
        replicas.push((pool, client));
    }
    replicas.try_into().unwrap_or_else(|_| unreachable!())
}

#[tokio::test]
async fn no_replica_holds_a_connection_or_a_transaction_while_dingtalk_answers_gettoken() {
    let s = setup(|c| c.dingtalk.timeout_ms = 10_000).await;
    s.emulator.state().update_faults(|f| f.latency_ms = 2_000);
    let [(pool_a, a), (pool_b, b)] = one_connection_replicas(&s).await;
    let observer = PgPool::connect(s.config.database.url.expose())
        .await
        .unwrap();
    let database = s._db.name.clone();
    let fetching = async {
        let token = a.tokens().get().await.unwrap();
        (token, Instant::now())
    };
    let waiting = async {
        // Asks once the first replica's gettoken is on its way.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let token = b.tokens().get().await.unwrap();
        (token, Instant::now())
    };
    let checks = async {
        eventually(Duration::from_secs(5), "gettoken on its way", || async {
            (s.emulator.state().calls(api::token()) == 1).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Each replica's only connection is free for other work (it waits 500 ms at most).
        for pool in [&pool_a, &pool_b] {
            store::ping(pool)
                .await
                .expect("the pool's connection is free");
        }
        let in_transaction: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = $1 AND state LIKE 'idle in transaction%'",
        )
        .bind(&database)
        .fetch_one(&observer)
        .await
        .unwrap();
        assert_eq!(in_transaction, 0, "a session idles in a transaction");
        Instant::now()
    };
    let ((token_a, got_a), (token_b, got_b), checked) = tokio::join!(fetching, waiting, checks);
    assert_eq!(token_a, token_b);
    assert!(
        checked < got_a && checked < got_b,
        "the checks ran while gettoken was answering"
    );
    assert_eq!(
        s.emulator.state().calls(api::token()),
        1,
        "one fetch for both"
    );
    for pool in [pool_a, pool_b, observer] {
        pool.close().await;
    }
    s.emulator.stop().await;
}

#[tokio::test]
async fn a_replica_that_died_holding_the_fetch_lease_delays_the_next_one_by_the_lease_only() {
    let s = setup(|_| {}).await;
    let pool = store::connect(&s.config.database).await.unwrap();
    // A replica claimed the fetch and died before storing a token.
    let lease = Duration::from_millis(800);
    let claimed = store::tokens::claim_fetch(
        &pool,
        CORP_ID,
        &s.config.dingtalk.app_key,
        chrono::Utc::now(),
        lease,
    )
    .await
    .unwrap();
    assert!(claimed.is_some());
    let started = Instant::now();
    let token = s.client.tokens().get().await.unwrap();
    let waited = started.elapsed();
    assert!(!token.is_empty());
    assert!(
        waited >= lease - Duration::from_millis(100) && waited < Duration::from_secs(5),
        "waited {waited:?} for a lease of {lease:?}"
    );
    assert_eq!(s.emulator.state().calls(api::token()), 1);
    // The lease is gone with the token stored: the next replica takes the token at once.
    let other = Client::new(pool.clone(), &s.config.dingtalk, &s.emulator.base_url()).unwrap();
    let started = Instant::now();
    assert_eq!(other.tokens().get().await.unwrap(), token);
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(s.emulator.state().calls(api::token()), 1);
    pool.close().await;
    s.emulator.stop().await;
}

#[tokio::test]
async fn wrong_app_secret_is_a_clear_rejection_without_the_secret() {
    let s = setup(|c| c.dingtalk.app_secret = Secret::new("wrong-secret-value")).await;
    let err = s
        .client
        .get_instance("x", Purpose::Details)
        .await
        .unwrap_err();
    let text = err.to_string();
    match api_family() {
        ApiFamily::Legacy => assert!(
            matches!(err, Error::Rejected { errcode: 40096, .. }),
            "{text}"
        ),
        ApiFamily::V1 => assert_eq!(err.v1_code(), Some("invalidClientIdOrSecret"), "{text}"),
    }
    assert!(
        text.contains("dingtalk.app_secret") && !text.contains("wrong-secret-value"),
        "{text}"
    );
    s.emulator.stop().await;
}

#[tokio::test]
async fn the_rate_budget_is_never_exceeded_at_the_emulator() {
    // 50 calls queue for slots at once. A small pool keeps this test from taking a large share
    // of PostgreSQL's connections while the rest of the file runs in parallel (new connections
    // are refused beyond max_connections and the pool would time out), and a connection may
    // take longer than the harness's 1 s to come free.
    let s = setup(|c| {
        c.dingtalk.qps = 20;
        c.database.max_connections = 4;
        c.database.acquire_timeout_ms = 10_000;
    })
    .await;
    let id = s.client.create_instance(&expense()).await.unwrap();
    let calls: Vec<_> = (0..50)
        .map(|_| s.client.get_instance(&id, Purpose::Details))
        .collect();
    for result in futures::future::join_all(calls).await {
        result.unwrap();
    }
    let busiest = s
        .emulator
        .state()
        .max_calls_within(api::get(), Duration::from_secs(1));
    assert!(busiest <= 20, "{busiest} calls in one second");
    s.emulator.stop().await;
}

#[tokio::test]
async fn callback_management_registers_shows_updates_and_deletes() {
    let app = TestApp::spawn().await;
    let s = setup(|_| {}).await;
    let config = s.callback_config(&app);
    let said = manage::run(&s.client, &config, Action::Register)
        .await
        .unwrap();
    assert!(said.contains("registered"), "{said}");
    let again = manage::run(&s.client, &config, Action::Register)
        .await
        .unwrap_err();
    assert!(
        format!("{again:#}").contains("callback update"),
        "{again:#}"
    );
    let shown = manage::run(&s.client, &config, Action::Show).await.unwrap();
    assert!(
        shown.contains("matches") && !shown.contains(app.token()),
        "{shown}"
    );
    manage::run(&s.client, &config, Action::Update)
        .await
        .unwrap();
    manage::run(&s.client, &config, Action::Delete)
        .await
        .unwrap();
    let none = manage::run(&s.client, &config, Action::Show)
        .await
        .unwrap_err();
    assert!(
        format!("{none:#}").contains("callback register"),
        "{none:#}"
    );
    s.emulator.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn registration_fails_clearly_when_the_daemon_has_another_aes_key_or_owner_key() {
    // The daemon accepts only another owner key than the emulator's CorpId.
    let app = TestApp::spawn_with(|c| c.callback.owner_key = vec!["dingsomeappkey".into()]).await;
    let s = setup(|_| {}).await;
    let mut config = s.callback_config(&app);
    let err = format!(
        "{:#}",
        manage::run(&s.client, &config, Action::Register)
            .await
            .unwrap_err()
    );
    assert!(err.contains("71009") && err.contains("owner_key"), "{err}");
    // Another AES key than the daemon's.
    config.callback.aes_key = Secret::new(dingsync::crypto::random_aes_key());
    let err = format!(
        "{:#}",
        manage::run(&s.client, &config, Action::Register)
            .await
            .unwrap_err()
    );
    assert!(err.contains("71009") && err.contains("aes_key"), "{err}");
    s.emulator.stop().await;
    app.stop().await;
}

/// End to end: the daemon registers with the emulator, a person starts and approves, the push
/// lands in dingsync.approvals as COMPLETED/agree.
#[tokio::test]
async fn an_approval_made_in_the_emulator_lands_completed_in_the_database() {
    let db = TestDb::new();
    let app = TestApp::spawn_on(db, |c| {
        embedded_emulator(c);
        c.emulator.people_pace_ms = 0;
        c.emulator.time_scale = 0.01;
    })
    .await;
    let emulator = app
        .app
        .as_ref()
        .unwrap()
        .emulator
        .as_ref()
        .unwrap()
        .state()
        .clone();
    assert!(
        emulator.callback().is_some(),
        "serve registered its callback"
    );
    let instance = emulator
        .start_instance(serde_json::from_value(serde_json::json!({
            "process_code": "PROC-EMU-EXPENSE", "originator_userid": "emp1", "approvers": ["manager1"]
        })).unwrap())
        .unwrap();
    let taskid = instance.tasks[0].taskid;
    emulator
        .agree(
            taskid,
            TaskAction {
                userid: None,
                remark: Some("ok".into()),
                to: None,
            },
        )
        .unwrap();
    let pid = instance.process_instance_id.clone();
    common::eventually(Duration::from_secs(10), "the approval to complete", || {
        let (app, pid) = (&app, &pid);
        async move {
            let a: Option<(String, Option<String>)> = sqlx::query_as(
                "SELECT status, result FROM dingsync.approvals WHERE process_instance_id = $1",
            )
            .bind(pid)
            .fetch_optional(&app.pool)
            .await
            .unwrap();
            (a == Some(("COMPLETED".into(), Some("agree".into())))).then_some(())
        }
    })
    .await;
    let task: (String, Option<String>) =
        sqlx::query_as("SELECT status, result FROM dingsync.approval_tasks WHERE task_id = $1")
            .bind(taskid)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(task, ("COMPLETED".into(), Some("AGREE".into())));
    app.stop().await;
}

#[tokio::test]
async fn pushes_that_failed_while_the_daemon_was_down_are_read_once_from_the_failed_list() {
    let app = TestApp::spawn().await;
    let s = setup(|_| {}).await;
    let config = s.callback_config(&app);
    manage::run(&s.client, &config, Action::Register)
        .await
        .unwrap();
    app.stop().await; // the daemon goes down
    let emulator = s.emulator.state();
    let instance = emulator
        .start_instance(
            serde_json::from_value(serde_json::json!({
                "process_code": "PROC-EMU-EXPENSE", "originator_userid": "emp1"
            }))
            .unwrap(),
        )
        .unwrap();
    // The retry ladder (scaled) fails, then the events (instance start, task start) become
    // readable from the failed list, each at its own time. Collect until the instance's is there.
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let pid = instance.process_instance_id.as_str();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let is_ours = |item: &serde_json::Value| {
        item["call_back_tag"] == "bpms_instance_change"
            && item["bpms_instance_change"]["bpmsCallBackData"]["processInstanceId"] == pid
    };
    while !seen.iter().any(is_ours) {
        assert!(
            std::time::Instant::now() < deadline,
            "the instance's failed push was never listed"
        );
        for item in s.client.failed_callbacks().await.unwrap().failed_list {
            // Read-once: nothing is returned twice.
            assert!(!seen.contains(&item), "returned twice: {item}");
            seen.push(item);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.emulator.stop().await;
}

#[tokio::test]
async fn a_busy_rate_limited_or_failing_gettoken_is_retried_and_never_a_rejection() {
    let s = setup(|c| c.dingtalk.max_attempts = 2).await;
    // errcode -1 from gettoken says nothing about the credentials: the call goes through.
    s.emulator
        .state()
        .inject(api::token(), InjectedError::Busy, 1);
    let id = s.client.create_instance(&expense()).await.unwrap();
    assert_eq!(s.emulator.state().calls(api::token()), 2);
    assert_eq!(s.emulator.state().calls(api::create()), 1);
    // Still rate limited after backing off: reported as such, not as bad credentials.
    s.emulator.state().revoke_token();
    s.emulator
        .state()
        .inject(api::token(), InjectedError::RateLimit, 2);
    let err = s
        .client
        .get_instance(&id, Purpose::Details)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RateLimited { .. }), "{err:?}");
    // A 502 from gettoken is DingTalk being unavailable, not an unreadable answer.
    s.emulator.state().update_faults(|f| f.http_5xx_rate = 1.0);
    let err = s
        .client
        .get_instance(&id, Purpose::Details)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Transient(_)), "{err:?}");
    s.emulator.state().reset_faults();
    s.client.get_instance(&id, Purpose::Details).await.unwrap();
    s.emulator.stop().await;
}

/// A stand-in for DingTalk that answers `gettoken` and every other path with fixed JSON.
async fn fixed_answers(gettoken: serde_json::Value, api: serde_json::Value) -> String {
    use axum::{Json, Router, routing::get};
    let router = Router::new()
        .route("/gettoken", get(move || async move { Json(gettoken) }))
        .fallback(move || async move { Json(api) });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn an_answer_without_errcode_is_never_taken_for_success() {
    // The fixed answers are the old family's (gettoken, errcode), whichever family this run uses.
    let s = setup(|c| {
        c.dingtalk.max_attempts = 1;
        c.dingtalk.api_family = ApiFamily::Legacy;
    })
    .await;
    let token = serde_json::json!({"errcode": 0, "access_token": "t0", "expires_in": 7200});
    // The gateway's flood-ban page (docs/dingtalk.md §7).
    let ban = serde_json::json!({"status": 1111, "wait": 5, "source": "x5", "punish": "deny"});
    let base = fixed_answers(token.clone(), ban).await;
    let pool = store::connect(&s.config.database).await.unwrap();
    let client = Client::new(pool.clone(), &s.config.dingtalk, &base).unwrap();
    let err = client.delete_callback().await.unwrap_err();
    assert!(matches!(err, Error::RateLimited { .. }), "{err:?}");
    // Anything else without errcode: unknown, so a read-once call reports no answer.
    let base = fixed_answers(token, serde_json::json!({"whatever": true})).await;
    let client = Client::new(pool.clone(), &s.config.dingtalk, &base).unwrap();
    let err = client.failed_callbacks().await.unwrap_err();
    assert!(matches!(err, Error::NoResponse(_)), "{err:?}");
    pool.close().await;
    s.emulator.stop().await;
}

#[tokio::test]
async fn an_absurd_expires_in_from_gettoken_is_an_error_not_a_panic() {
    let s = setup(|c| c.dingtalk.api_family = ApiFamily::Legacy).await;
    for expires_in in [i64::MAX, 0, -5] {
        let base = fixed_answers(
            serde_json::json!({"errcode": 0, "access_token": "t0", "expires_in": expires_in}),
            serde_json::json!({"errcode": 0}),
        )
        .await;
        let pool = store::connect(&s.config.database).await.unwrap();
        let client = Client::new(pool.clone(), &s.config.dingtalk, &base).unwrap();
        let err = client.tokens().get().await.unwrap_err();
        assert!(matches!(err, Error::Protocol(_)), "{expires_in}: {err:?}");
        pool.close().await;
    }
    s.emulator.stop().await;
}

#[tokio::test]
async fn a_daemon_whose_emulator_registration_fails_is_not_left_serving() {
    install_crypto_provider();
    let db = TestDb::new();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let mut config = test_config(&db.url);
    config.server.listen = addr.to_string();
    embedded_emulator(&mut config);
    config.emulator.people_pace_ms = 0;
    config.emulator.time_scale = 0.01;
    config.dingtalk.max_attempts = 1;
    // The registration needs an access token, and a token is kept in dingsync.access_tokens:
    // a database that refuses to keep it fails the registration, after the server is up.
    let pool = store::connect_and_migrate(&config.database).await.unwrap();
    sqlx::raw_sql(
        "CREATE FUNCTION public.refuse_tokens() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN RAISE EXCEPTION 'tokens refused by the test'; END $$;
         CREATE TRIGGER refuse_tokens BEFORE INSERT OR UPDATE ON dingsync.access_tokens
             FOR EACH ROW EXECUTE FUNCTION public.refuse_tokens();",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let err = dingsync::app::App::start(config)
        .await
        .err()
        .expect("start fails");
    let err = format!("{err:#}");
    assert!(
        err.contains("registering the callback with the embedded emulator")
            && err.contains("tokens refused by the test"),
        "{err}"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the server still listens after start failed"
    );
}
