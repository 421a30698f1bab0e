//! DingTalk client + emulator benchmark (a program that reports figures, not a test).
//!
//! 1. Round trips: `processinstance/get` through the real client (shared token, classification)
//!    against the in-process emulator with no injected latency and the rate budget off.
//! 2. Rate-budget accuracy: `dingtalk.qps = 20`, work always queued, for `--seconds`; reports the
//!    busiest one-second window the emulator saw and the share of the budget used.
//!
//! ```sh
//! cargo bench --bench client -- [--calls 20000] [--concurrency 32] [--seconds 30]
//! ```

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use dingsync::{
    config::{Config, Secret},
    crypto,
    dingtalk::{
        Client, Purpose,
        types::{CreateInstance, FormValue},
    },
    store,
};
use dingsync_emulator::{DEFAULT_APP_KEY, DEFAULT_APP_SECRET, Emulator, EmulatorConfig};
use sqlx::{Connection, PgConnection};

fn arg(name: &str, default: u64) -> u64 {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (calls, concurrency, seconds) = (
        arg("--calls", 20_000),
        arg("--concurrency", 32),
        arg("--seconds", 30),
    );
    let server = std::env::var("DINGSYNC_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let db_name = format!("dingsync_bench_{}", crypto::random_nonce(8).to_lowercase());
    let emulator = Emulator::start(EmulatorConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut config = Config::default();
    config.database.url = Secret::new(format!("{server}/{db_name}"));
    config.dingtalk.corp_id = dingsync_emulator::DEFAULT_CORP_ID.into();
    config.dingtalk.app_key = DEFAULT_APP_KEY.into();
    config.dingtalk.app_secret = Secret::new(DEFAULT_APP_SECRET);
    config.dingtalk.qps = 0;
    let pool = store::connect_and_migrate(&config.database).await.unwrap();
    let client = Client::new(pool.clone(), &config.dingtalk, &emulator.base_url()).unwrap();
    let id = client
        .create_instance(&CreateInstance {
            process_code: "PROC-EMU-EXPENSE".into(),
            originator_user_id: "emp1".into(),
            dept_id: 100,
            agent_id: None,
            approvers: None,
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
        })
        .await
        .unwrap();

    // 1. Round trips, budget off.
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, next, id) = (client.clone(), next.clone(), id.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < calls as usize {
                    client
                        .get_instance(&id, Purpose::Details)
                        .await
                        .expect("get");
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = started.elapsed();
    println!(
        "machine: {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "client + emulator round trips: {calls} processinstance/get at concurrency {concurrency} in {:.2} s = {:.0} calls/s",
        elapsed.as_secs_f64(),
        calls as f64 / elapsed.as_secs_f64()
    );

    // 2. Budget accuracy at 20 QPS with work always queued.
    let mut budgeted = config.dingtalk.clone();
    budgeted.qps = 20;
    let limited = Client::new(pool.clone(), &budgeted, &emulator.base_url()).unwrap();
    let endpoint = "topapi/processinstance/get";
    let before = emulator.state().calls(endpoint);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..arg("--budget-workers", 64))
        .map(|_| {
            let (client, stop, id) = (limited.clone(), stop.clone(), id.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    client
                        .get_instance(&id, Purpose::Details)
                        .await
                        .expect("get");
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let window = started.elapsed();
    let made = emulator.state().calls(endpoint) - before;
    let times: Vec<Instant> = emulator
        .state()
        .call_times(endpoint)
        .into_iter()
        .filter(|t| *t >= started)
        .collect();
    let busiest = busiest_second(&times);
    println!(
        "rate budget 20 QPS for {:.1} s: {made} calls, busiest one-second window {busiest}, {:.1}% of the budget used",
        window.as_secs_f64(),
        100.0 * made as f64 / (20.0 * window.as_secs_f64())
    );

    pool.close().await;
    emulator.stop().await;
    let mut admin = PgConnection::connect(&format!("{server}/postgres"))
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
    ))
    .execute(&mut admin)
    .await
    .ok();
}

fn busiest_second(times: &[Instant]) -> usize {
    let mut times = times.to_vec();
    times.sort();
    let (mut best, mut start) = (0, 0);
    for end in 0..times.len() {
        while times[end] - times[start] >= Duration::from_secs(1) {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}
