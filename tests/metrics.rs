//! `GET /metrics` and `GET /readyz` of a real daemon over HTTP, on a fresh PostgreSQL database per
//! test. The metrics registry is process-wide, so counters are checked as lower bounds.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use dingsync::config::Secret;

const T0: i64 = 1_764_300_000_000;

/// The whole page and its content type.
async fn scrape(app: &TestApp) -> String {
    let response = app
        .http
        .get(format!("{}/metrics", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    response.text().await.unwrap()
}

/// The value of the sample named exactly `series` (name and labels as printed).
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.parse().unwrap())
}

async fn readyz(app: &TestApp) -> (u16, String) {
    let response = app
        .http
        .get(format!("{}/readyz", app.base_url))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// A daemon with the embedded emulator, short timings and a rate budget, so that every series
/// gets traffic.
async fn emulator_daemon() -> TestApp {
    TestApp::spawn_with(|c| {
        embedded_emulator(c);
        c.dingtalk.timeout_ms = 300;
        c.dingtalk.qps = 50;
        c.outbox.lease_ms = 1_000;
        c.outbox.lost_settle_ms = 100;
        c.outbox.poll_ms = 100;
        c.emulator.people_pace_ms = 0;
        c.emulator.time_scale = 0.01;
        c.scheduler.details = "* * * * * *".into();
    })
    .await
}

#[tokio::test]
async fn metrics_expose_every_series_with_plausible_values_after_real_traffic() {
    let app = emulator_daemon().await;
    // The embedded emulator's daemon serves the emulator's organisation, not the test corp.
    let served = |event: String| event.replace(CORP_ID, dingsync::app::EMULATOR_CORP_ID);
    let event = served(instance_event("pid-metrics-1", "start", None, T0, None));
    app.push_ok(&event).await;
    app.push_ok(&event).await;
    app.push_ok(&served(task_event(
        "pid-metrics-1",
        7001,
        "start",
        None,
        T0,
        None,
    )))
    .await;
    let refused = app
        .post_raw(
            &[("signature", "0000"), ("timestamp", "1"), ("nonce", "abc")],
            r#"{"encrypt": "AAAA"}"#.into(),
        )
        .await;
    assert_eq!(refused.status(), 403);
    // The pushed approval waits for its detail fetch (quiet for detail_quiet_ms first).
    let early = scrape(&app).await;
    let lag = sample(&early, "dingsync_sync_lag_seconds").expect("sync lag");
    assert!(lag > 0.0 && lag < 60.0, "sync lag {lag}");
    let id: i64 = sqlx::query_scalar(
        "SELECT dingsync.request_approval('metrics-1', 'PROC-EMU-EXPENSE', 'emp1',
            '[{\"name\": \"Reason\", \"value\": \"metrics\"}, {\"name\": \"Amount\", \"value\": 1}]')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let refused_id: i64 = sqlx::query_scalar(
        "SELECT dingsync.request_approval('metrics-2', 'PROC-EMU-MISSING', 'emp1',
            '[{\"name\": \"Reason\", \"value\": \"metrics\"}]')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();

    // The outbox rows are done and the details job (every second here) has fetched an approval.
    let page = eventually(
        Duration::from_secs(20),
        "both outbox rows done and a details fetch",
        || async {
            let page = scrape(&app).await;
            let states: Vec<String> = sqlx::query_scalar(
                "SELECT state FROM dingsync.outbox WHERE id IN ($1, $2) ORDER BY id",
            )
            .bind(id)
            .bind(refused_id)
            .fetch_all(&app.pool)
            .await
            .unwrap();
            let ran = page
                .lines()
                .any(|l| l.starts_with("dingsync_job_runs_total{job=\"details\""))
                && page.contains("dingsync_reconcile_fetches_total{source=\"details\"");
            (states == ["created", "failed"] && ran).then_some(page)
        },
    )
    .await;

    let at_least = |series: &str, min: f64| {
        let v = sample(&page, series).unwrap_or_else(|| panic!("{series} missing:\n{page}"));
        assert!(v >= min, "{series} = {v}, expected at least {min}");
        v
    };
    at_least(
        "dingsync_events_received_total{event_type=\"bpms_instance_change\",outcome=\"stored\"}",
        1.0,
    );
    at_least(
        "dingsync_events_received_total{event_type=\"bpms_instance_change\",outcome=\"duplicate\"}",
        1.0,
    );
    at_least(
        "dingsync_events_received_total{event_type=\"bpms_task_change\",outcome=\"stored\"}",
        1.0,
    );
    at_least(
        "dingsync_events_received_total{event_type=\"unknown\",outcome=\"refused_signature\"}",
        1.0,
    );
    at_least("dingsync_callback_ack_seconds_count", 4.0);
    let ack_sum = at_least("dingsync_callback_ack_seconds_sum", 0.0);
    assert!(ack_sum < 60.0, "ack seconds sum {ack_sum}");

    at_least("dingsync_outbox_creates_total{outcome=\"created\"}", 1.0);
    at_least("dingsync_outbox_creates_total{outcome=\"rejected\"}", 1.0);
    at_least("dingsync_outbox_create_seconds_count", 1.0);
    let create_sum = at_least("dingsync_outbox_create_seconds_sum", 0.0);
    assert!(create_sum < 120.0, "create seconds sum {create_sum}");
    // The row for the missing template failed for good, refused by DingTalk.
    at_least("dingsync_outbox_failed_total{reason=\"rejected\"}", 1.0);
    for state in ["pending", "sending", "unknown"] {
        at_least(&format!("dingsync_outbox_rows{{state=\"{state}\"}}"), 0.0);
    }

    at_least(
        "dingsync_dingtalk_calls_total{endpoint=\"/topapi/processinstance/create\",errcode=\"0\"}",
        1.0,
    );
    at_least(
        "dingsync_dingtalk_calls_total{endpoint=\"/gettoken\",errcode=\"0\"}",
        1.0,
    );
    // The unknown template is refused with DingTalk's errcode, not counted as a success.
    at_least(
        &format!(
            "dingsync_dingtalk_calls_total{{endpoint=\"/topapi/processinstance/create\",errcode=\"{}\"}}",
            dingsync_emulator::errcode::NOT_FOUND
        ),
        1.0,
    );
    at_least("dingsync_rate_budget_wait_seconds_count", 1.0);

    at_least("dingsync_job_duration_seconds_count{job=\"details\"}", 1.0);
    let runs: f64 = page
        .lines()
        .filter(|l| l.starts_with("dingsync_job_runs_total{job=\"details\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert!(runs >= 1.0, "{page}");

    let fetches: f64 = page
        .lines()
        .filter(|l| l.starts_with("dingsync_reconcile_fetches_total{source=\"details\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert!(fetches >= 1.0, "{page}");
    // The emulator's tokens live 7200 s; renewal starts 600 s before the end.
    let token = at_least("dingsync_access_token_valid_seconds", 600.0);
    assert!(token <= 7200.0, "token valid for {token} s");

    at_least("dingsync_sync_lag_seconds", 0.0);
    assert_eq!(sample(&page, "dingsync_database_up"), Some(1.0));
    assert!(page.ends_with("# EOF\n"));
    assert!(!page.contains("pid-metrics-1"), "no instance ids in labels");
    app.stop().await;
}

#[tokio::test]
async fn readyz_fails_with_a_reason_while_the_database_is_unreachable_and_recovers_by_itself() {
    let upstream: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = proxy::Proxy::start(upstream).await;
    let db = TestDb::new();
    dingsync::store::connect_and_migrate(&test_config(&db.url).database)
        .await
        .unwrap()
        .close()
        .await;
    let via_proxy = db.url.replace("127.0.0.1:5432", &proxy.addr.to_string());
    let app = TestApp::spawn_on(db, |c| c.database.url = Secret::new(via_proxy)).await;
    assert_eq!(readyz(&app).await, (200, "ready".into()));

    proxy.cut().await;
    // The probes answer from a reading at most a second old.
    eventually(Duration::from_secs(10), "not ready", || async {
        let (status, reason) = readyz(&app).await;
        (status == 503).then(|| assert_eq!(reason, "not ready: database unreachable (connection)"))
    })
    .await;
    // The metrics page still answers, without the database's series.
    let page = eventually(Duration::from_secs(10), "database_up 0", || async {
        let page = scrape(&app).await;
        (sample(&page, "dingsync_database_up") == Some(0.0)).then_some(page)
    })
    .await;
    assert_eq!(sample(&page, "dingsync_sync_lag_seconds"), None);
    assert!(!page.contains("dingsync_outbox_rows{"), "{page}");
    let health = app
        .http
        .get(format!("{}/healthz", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "still alive");

    proxy.restore().await;
    eventually(Duration::from_secs(15), "ready again", || async {
        (readyz(&app).await.0 == 200).then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "database_up 1", || async {
        (sample(&scrape(&app).await, "dingsync_database_up") == Some(1.0)).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn readyz_requires_the_newest_migration_and_a_valid_dingtalk_token() {
    // No scheduled job may fetch a token while the test has it refused.
    let app = TestApp::spawn_with(|c| {
        embedded_emulator(c);
        c.emulator.people_pace_ms = 0;
        let yearly = "0 0 0 1 1 *".to_string();
        c.scheduler.details = yearly.clone();
        c.scheduler.sweep = yearly.clone();
        c.scheduler.backfill = yearly.clone();
        c.scheduler.failed = yearly;
    })
    .await;
    assert_eq!(readyz(&app).await, (200, "ready".into()));

    // DingTalk refuses the token: the client forgets it here and in the shared table.
    let tokens = app.app.as_ref().unwrap().client.as_ref().unwrap().tokens();
    let token: String = sqlx::query_scalar("SELECT access_token FROM dingsync.access_tokens")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    tokens.invalidate(&token).await;
    // The shared token is read from the database at most a second ago.
    eventually(Duration::from_secs(10), "not ready", || async {
        let (status, reason) = readyz(&app).await;
        (status == 503).then(|| assert_eq!(reason, "not ready: no valid DingTalk access token"))
    })
    .await;
    // This process's own token is checked at every probe.
    tokens.get().await.unwrap();
    assert_eq!(readyz(&app).await, (200, "ready".into()));

    let newest: i32 = sqlx::query_scalar("SELECT max(version) FROM dingsync.schema_history")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM dingsync.schema_history WHERE version = $1")
        .bind(newest)
        .execute(&app.pool)
        .await
        .unwrap();
    let reason = eventually(Duration::from_secs(10), "not ready", || async {
        let (status, reason) = readyz(&app).await;
        (status == 503).then_some(reason)
    })
    .await;
    assert_eq!(
        reason,
        format!("not ready: database migration V{newest} not applied")
    );
    app.stop().await;
}

#[tokio::test]
async fn a_flood_of_probes_reads_the_database_about_once_a_second_and_callbacks_are_unhurt() {
    let app = TestApp::spawn().await;
    let daemon = app.app.as_ref().unwrap();
    let before = daemon.health_readings();
    let started = std::time::Instant::now();
    let flood_for = Duration::from_secs(2);
    // 50 clients, each with its own keep-alive connection, probe as fast as they are answered.
    let probes: Vec<_> = (0..50)
        .map(|i| {
            let url = format!(
                "{}/{}",
                app.base_url,
                if i % 2 == 0 { "readyz" } else { "metrics" }
            );
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut answered = 0u32;
                while started.elapsed() < flood_for {
                    let response = http.get(&url).send().await.unwrap();
                    assert_eq!(response.status(), 200, "{url}");
                    response.bytes().await.unwrap();
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    app.push_ok(&instance_event("pid-probe-flood", "start", None, T0, None))
        .await;
    let mut answered = 0;
    for probe in probes {
        answered += probe.await.unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    let readings = daemon.health_readings() - before;
    assert!(answered >= 100, "only {answered} probes answered");
    assert!(
        (readings as f64) <= seconds.ceil() + 2.0,
        "{answered} probes in {seconds:.1} s made {readings} database readings"
    );
    assert!(readings >= 1);
    app.stop().await;
}
