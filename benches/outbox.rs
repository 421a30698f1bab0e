//! Outbox benchmark (a program that reports figures, not a test). Each part runs the real daemon
//! (`App`, embedded emulator with nobody acting, callbacks flowing back) on a fresh database.
//!
//! 1. Latency: rows inserted one at a time (`--latency-rows`, one every 20 ms) into an idle
//!    daemon; INSERT-to-created per row from the database's own clock (`done_at - created_at`).
//! 2. Throughput: `--rows` inserted in one statement, rate budget off, zero-latency emulator;
//!    rows/s from the first insert to the last `created`. Run twice: with the emulator pushing
//!    each new approval's events back to the daemon (as DingTalk does), and with no callback
//!    registered (the outbox alone).
//! 3. Budget: `--budget-rows` rows with `dingtalk.qps = 20`; the busiest one-second window of
//!    creates the emulator saw.
//! 4. Lost responses: `--lost-rows` rows with 30% of create responses lost; counts the
//!    emulator's instances per row (duplicates) and rows not created (lost).
//!
//! 5. Search economy: `--search-rows` rows created at once by `--search-workers` daemons (one
//!    database, one standalone emulator pushing to the first daemon) for `--search-originators`
//!    originators, 30% of create answers lost; the DingTalk calls the lost-answer search made
//!    (by the daemons' ledgers), per lost answer, and the detail fetches its snapshots saved.
//!
//! Any part given 0 rows is skipped.
//!
//! ```sh
//! cargo bench --bench outbox -- [--latency-rows 300] [--rows 5000] [--budget-rows 200] \
//!     [--lost-rows 1000] [--search-rows 300] [--search-workers 3] [--search-originators 3] \
//!     [--concurrency 16]
//! ```

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use dingsync::{
    app::App,
    config::{Config, Secret},
    crypto,
};
use dingsync_emulator::Handle;
use sqlx::{Connection, PgConnection, PgPool};

fn arg(name: &str, default: u64) -> u64 {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn server() -> String {
    std::env::var("DINGSYNC_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A daemon on a fresh database with the embedded emulator.
struct Run {
    app: App,
    pool: PgPool,
    db_name: String,
}

impl Run {
    async fn start(adjust: impl FnOnce(&mut Config)) -> Run {
        let db_name = format!("dingsync_bench_{}", crypto::random_nonce(8).to_lowercase());
        let mut config = Config::default();
        config.database.url = Secret::new(format!("{}/{db_name}", server()));
        config.server.listen = "127.0.0.1:0".into();
        config.dingtalk.api_base = dingsync::config::EMULATOR.into();
        config.dingtalk.qps = 0;
        config.emulator.people_pace_ms = 0;
        config.outbox.concurrency = arg("--concurrency", 16) as usize;
        config.log.filter = "warn".into();
        adjust(&mut config);
        let app = App::start(config).await.expect("daemon starts");
        let pool = app.pool.clone();
        Run { app, pool, db_name }
    }

    fn emulator(&self) -> Handle {
        self.app.emulator.as_ref().unwrap().state().clone()
    }

    /// Inserts rows `from..from+n` (reason "bench <n>") in one statement.
    async fn insert(&self, from: u64, n: u64) {
        sqlx::query(
            "SELECT dingsync.request_approval('bench-' || i, 'PROC-EMU-EXPENSE', 'emp1',
                jsonb_build_array(jsonb_build_object('name', 'Reason', 'value', 'bench ' || i),
                                  jsonb_build_object('name', 'Amount', 'value', i)))
             FROM generate_series($1::bigint, $2::bigint) AS i",
        )
        .bind(from as i64)
        .bind((from + n - 1) as i64)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    /// Waits until no row is left in flight; returns the time it took.
    async fn wait_done(&self, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let open: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM dingsync.outbox WHERE state IN ('pending', 'sending', 'unknown')",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap();
            if open == 0 {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "{open} rows still open after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.app.stop().await.unwrap();
        let mut admin = PgConnection::connect(&format!("{}/postgres", server()))
            .await
            .unwrap();
        sqlx::raw_sql(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.db_name
        ))
        .execute(&mut admin)
        .await
        .ok();
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    println!(
        "machine: {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    let n = arg("--latency-rows", 300);
    if n > 0 {
        latency(n).await;
    }
    let n = arg("--rows", 5_000);
    if n > 0 {
        throughput(n).await;
    }
    let n = arg("--budget-rows", 200);
    if n > 0 {
        budget(n).await;
    }
    let n = arg("--lost-rows", 1_000);
    if n > 0 {
        lost(n).await;
    }
    let n = arg("--search-rows", 300);
    if n > 0 {
        search(
            n,
            arg("--search-workers", 3) as usize,
            arg("--search-originators", 3),
        )
        .await;
    }
}

/// Latency, one row at a time into an idle daemon.
async fn latency(n: u64) {
    let run = Run::start(|_| {}).await;
    for i in 0..n {
        run.insert(i, 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run.wait_done(Duration::from_secs(60)).await;
    let mut ms: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM done_at - created_at)::float8 * 1000 FROM dingsync.outbox WHERE state = 'created'",
    )
    .fetch_all(&run.pool)
    .await
    .unwrap();
    ms.sort_by(f64::total_cmp);
    println!(
        "latency: {} rows one at a time, INSERT to created: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.9),
        percentile(&ms, 0.99),
        ms[ms.len() - 1]
    );
    run.stop().await;
}

/// Throughput, budget off.
async fn throughput(n: u64) {
    for pushes in [true, false] {
        let run = Run::start(|_| {}).await;
        if !pushes {
            // No callback registered: the emulator pushes nothing back, so only the outbox runs.
            run.app
                .client
                .as_ref()
                .unwrap()
                .delete_callback()
                .await
                .unwrap();
        }
        let started = Instant::now();
        run.insert(0, n).await;
        run.wait_done(Duration::from_secs(600)).await;
        let (created, span, in_flight): (i64, f64, f64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 'created'),
                    extract(epoch FROM max(done_at) - min(created_at))::float8,
                    extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY done_at - sent_at))::float8 * 1000
             FROM dingsync.outbox",
        )
        .fetch_one(&run.pool)
        .await
        .unwrap();
        println!(
            "throughput ({}): {created} of {n} rows created in {span:.2} s (database clock) = {:.0} rows/s; claim to created p50 {in_flight:.1} ms; wall {:.2} s; emulator saw {} creates",
            if pushes {
                "with the emulator's pushes of each new approval"
            } else {
                "no pushes"
            },
            created as f64 / span,
            started.elapsed().as_secs_f64(),
            run.emulator().calls("topapi/processinstance/create")
        );
        run.stop().await;
    }
}

/// Rate budget at 20 QPS.
async fn budget(n: u64) {
    let run = Run::start(|c| c.dingtalk.qps = 20).await;
    let started = Instant::now();
    run.insert(0, n).await;
    let took = run.wait_done(Duration::from_secs(120)).await;
    let emu = run.emulator();
    let times = emu.call_times("topapi/processinstance/create");
    println!(
        "budget: {n} rows at dingtalk.qps = 20 in {:.1} s = {:.1} creates/s; busiest one-second window at the emulator: {} creates",
        took.as_secs_f64(),
        times.len() as f64 / started.elapsed().as_secs_f64(),
        emu.max_calls_within("topapi/processinstance/create", Duration::from_secs(1))
    );
    run.stop().await;
}

/// 30% of create responses lost.
async fn lost(n: u64) {
    let run = Run::start(|c| {
        c.dingtalk.timeout_ms = 200;
        c.outbox.lease_ms = 1_000;
        c.outbox.lost_settle_ms = 100;
        c.outbox.backoff_base_ms = 50;
        c.outbox.backoff_max_ms = 1_000;
    })
    .await;
    let emu = run.emulator();
    emu.update_faults(|f| f.lose_create_response_rate = 0.3);
    run.insert(0, n).await;
    let took = run.wait_done(Duration::from_secs(600)).await;
    emu.reset_faults();
    let mut per_reason: HashMap<String, Vec<String>> = HashMap::new();
    for instance in emu.instances() {
        let reason = instance
            .form_component_values
            .iter()
            .find(|v| v.name == "Reason")
            .map(|v| v.value.clone())
            .unwrap_or_default();
        per_reason
            .entry(reason)
            .or_default()
            .push(instance.process_instance_id);
    }
    let rows: Vec<(i64, String, Option<String>, i32)> = sqlx::query_as(
        "SELECT id, state, process_instance_id, attempts FROM dingsync.outbox ORDER BY id",
    )
    .fetch_all(&run.pool)
    .await
    .unwrap();
    let lost = rows.iter().filter(|r| r.1 != "created").count();
    let duplicates: usize = per_reason
        .values()
        .map(|ids| ids.len().saturating_sub(1))
        .sum();
    let mut mismatched = 0;
    let outbox_ids: HashMap<String, String> = sqlx::query_as::<_, (String, String)>(
        "SELECT 'bench ' || substr(idempotency_key, 7), process_instance_id FROM dingsync.outbox WHERE state = 'created'",
    )
    .fetch_all(&run.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    for (reason, pid) in &outbox_ids {
        if per_reason.get(reason).is_none_or(|ids| !ids.contains(pid)) {
            mismatched += 1;
        }
    }
    let resent = rows.iter().filter(|r| r.3 > 1).count();
    println!(
        "lost responses: {n} rows, 30% of create answers lost: done in {:.1} s; {} creates sent, {} instances in the emulator; duplicates {duplicates}, rows not created {lost}, rows linked to a wrong instance {mismatched}, rows sent more than once {resent}",
        took.as_secs_f64(),
        emu.calls("topapi/processinstance/create"),
        emu.instances().len()
    );
    run.stop().await;
}

/// A counter of this process's metrics page (every daemon of the run adds to the same one).
async fn metric(url: &str, line_start: &str) -> f64 {
    reqwest::get(url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Several daemons create `n` approvals of `originators` originators at once while 30% of create
/// answers are lost; what the lost-answer search cost.
async fn search(n: u64, workers: usize, originators: u64) {
    use dingsync::dingtalk::types::CallbackRegistration;
    use dingsync_emulator::{Emulator, EmulatorConfig};

    let emulator_config = EmulatorConfig {
        seed: 7,
        ..EmulatorConfig::default()
    };
    let corp_id = emulator_config.corp_id.clone();
    let emu = Emulator::start(emulator_config.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let db_name = format!("dingsync_bench_{}", crypto::random_nonce(8).to_lowercase());
    let (token, aes_key) = (crypto::random_nonce(32), crypto::random_aes_key());
    let mut apps = Vec::new();
    for _ in 0..workers {
        let mut config = Config::default();
        config.database.url = Secret::new(format!("{}/{db_name}", server()));
        config.server.listen = "127.0.0.1:0".into();
        config.dingtalk.api_base = emu.base_url();
        config.dingtalk.corp_id = corp_id.clone();
        config.dingtalk.app_key = emulator_config.app_key.clone();
        config.dingtalk.app_secret = Secret::new(emulator_config.app_secret.clone());
        config.dingtalk.qps = 0;
        config.dingtalk.timeout_ms = 200;
        config.callback.token = Secret::new(token.clone());
        config.callback.aes_key = Secret::new(aes_key.clone());
        config.callback.owner_key = vec![corp_id.clone()];
        config.outbox.concurrency = arg("--concurrency", 16) as usize;
        config.outbox.lease_ms = 1_000;
        config.outbox.lost_settle_ms = 100;
        config.outbox.backoff_base_ms = 50;
        config.outbox.backoff_max_ms = 1_000;
        config.scheduler.details = "* * * * * *".into();
        config.log.filter = "warn".into();
        apps.push(App::start(config).await.expect("daemon starts"));
    }
    // DingTalk pushes each new approval's events, here to the first daemon.
    apps[0]
        .client
        .as_ref()
        .unwrap()
        .register_callback(&CallbackRegistration {
            call_back_tag: dingsync::callback::TAGS
                .iter()
                .map(|t| t.to_string())
                .collect(),
            token,
            aes_key,
            url: format!("http://{}/dingtalk/callback", apps[0].addr),
        })
        .await
        .unwrap();
    let pool = apps[0].pool.clone();
    let unanswered = r#"dingsync_outbox_creates_total{outcome="no_response"}"#;
    let metrics = format!("http://{}/metrics", apps[0].addr);
    let unanswered_before = metric(&metrics, unanswered).await;
    emu.state()
        .update_faults(|f| f.lose_create_response_rate = 0.3);
    sqlx::query(
        "SELECT dingsync.request_approval('search-' || i, 'PROC-EMU-EXPENSE', 'emp' || (1 + i % $2),
            jsonb_build_array(jsonb_build_object('name', 'Reason', 'value', 'search ' || i),
                              jsonb_build_object('name', 'Amount', 'value', i)))
         FROM generate_series(1, $1::bigint) AS i",
    )
    .bind(n as i64)
    .bind(originators as i64)
    .execute(&pool)
    .await
    .unwrap();
    let run = Run {
        app: apps.remove(0),
        pool: pool.clone(),
        db_name: db_name.clone(),
    };
    let took = run.wait_done(Duration::from_secs(600)).await;
    emu.state().reset_faults();
    let lost = metric(&metrics, unanswered).await - unanswered_before;
    // The details job drains what is left to fetch.
    let drained = Instant::now();
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM dingsync.approvals WHERE detail_wanted_at IS NOT NULL",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if left == 0 || drained.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut per_reason: HashMap<String, usize> = HashMap::new();
    for instance in emu.state().instances() {
        let reason = instance
            .form_component_values
            .iter()
            .find(|v| v.name == "Reason")
            .map(|v| v.value.clone())
            .unwrap_or_default();
        *per_reason.entry(reason).or_default() += 1;
    }
    let duplicates: usize = per_reason.values().map(|c| c.saturating_sub(1)).sum();
    let (created, resent): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'created'), count(*) FILTER (WHERE attempts > 1)
         FROM dingsync.outbox",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let saved: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dingsync.approvals WHERE snapshot_source = 'search'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    for app in apps {
        app.stop().await.unwrap();
    }
    // Stopping flushes each daemon's ledger, so the calls are read after.
    let app_pool = PgPool::connect(&format!("{}/{db_name}", server()))
        .await
        .unwrap();
    run.app.stop().await.unwrap();
    let calls = |api: &'static str, purpose: &'static str| {
        let pool = app_pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT coalesce(sum(count), 0)::bigint FROM dingsync.usage
                 WHERE kind = 'call' AND api = $1 AND purpose = $2",
            )
            .bind(api)
            .bind(purpose)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let listids = calls("topapi/processinstance/listids", "search").await;
    let gets = calls("topapi/processinstance/get", "search").await;
    let detail_gets = calls("topapi/processinstance/get", "details").await;
    app_pool.close().await;
    let per_lost = (listids + gets) as f64 / lost.max(1.0);
    let net = (listids + gets - saved) as f64 / lost.max(1.0);
    println!(
        "search economy: {n} rows by {workers} daemons for {originators} originators, 30% of create answers lost: done in {:.1} s; rows created {created}, duplicates {duplicates}, lost answers {lost:.0}, rows sent again {resent}; search calls: listids {listids}, get {gets} = {per_lost:.2} per lost answer; detail fetches saved {saved} (details job's gets {detail_gets}) = {net:.2} per lost answer net",
        took.as_secs_f64(),
    );
    let mut admin = PgConnection::connect(&format!("{}/postgres", server()))
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
    ))
    .execute(&mut admin)
    .await
    .ok();
    emu.stop().await;
}
