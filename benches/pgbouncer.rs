//! PgBouncer and partitioned events benchmark (a program that reports figures, not a test).
//!
//! 1. Ingest: the daemon (in this process, the library's `App`) on a fresh database, `--events`
//!    distinct encrypted callbacks at `--concurrency`, once straight to PostgreSQL
//!    (`database.pooler = "none"`, statement cache on) and once through a PgBouncer 1.18 in
//!    transaction mode with `--server-connections` server connections (`pooler = "transaction"`:
//!    unnamed statements, parsed per execution), alternating for `--rounds` rounds. Prints
//!    events/s per round and the median ratio.
//! 2. Retention: `--retention-events` rows (default 10 million, made with `generate_series`, not
//!    through the daemon) in one past month's partition of `dingsync.events`, removed once by
//!    batch deletes of 10,000 rows (the old way, plus the VACUUM that makes the space reusable)
//!    and once, after inserting them again, by dropping the partition (the way since V22).
//!
//! ```sh
//! cargo bench --bench pgbouncer -- [--events 20000] [--concurrency 32] [--rounds 3]
//!     [--server-connections 8] [--retention-events 10000000] [--drop-only]
//! ```
//! Needs the local PostgreSQL (or DINGSYNC_TEST_DATABASE_URL) and `pgbouncer` (Debian package).

mod common;
#[allow(dead_code)] // the tests' starter, of which this uses a part
#[path = "../tests/common/pgbouncer.rs"]
mod pgbouncer;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{Datelike, TimeZone, Utc};
use dingsync::{
    app::App,
    config::{Config, Pooler, Secret},
    crypto::{self, CallbackCrypto},
    retention::BATCH,
    store::{self, prune::Aged},
};

const CORP: &str = "dingbenchcorp0000001";

struct Args {
    events: usize,
    concurrency: usize,
    rounds: usize,
    server_connections: u32,
    retention_events: i64,
    /// `--drop-only`: skip the batch delete (at 10 million rows it runs for hours).
    drop_only: bool,
}

fn args() -> Args {
    let mut a = Args {
        events: 20_000,
        concurrency: 32,
        rounds: 3,
        server_connections: 8,
        retention_events: 10_000_000,
        drop_only: false,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let value = || -> u64 {
            argv.get(i + 1)
                .and_then(|v| v.parse().ok())
                .expect("flag needs a number")
        };
        match argv[i].as_str() {
            "--events" => a.events = value() as usize,
            "--concurrency" => a.concurrency = value() as usize,
            "--rounds" => a.rounds = value().max(1) as usize,
            "--server-connections" => a.server_connections = value() as u32,
            "--retention-events" => a.retention_events = value() as i64,
            "--drop-only" => a.drop_only = true,
            _ => {} // cargo bench passes --bench
        }
        i += 1;
    }
    a
}

/// A port nobody listens on now (the PgBouncer starter asks its parent module for one).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

fn config(url: &str) -> Config {
    let mut c = Config::default();
    c.database.url = Secret::new(url);
    c.server.listen = "127.0.0.1:0".into();
    c.callback.token = Secret::new(crypto::random_nonce(32));
    c.callback.aes_key = Secret::new(crypto::random_aes_key());
    c.callback.owner_key = vec![CORP.into()];
    c.dingtalk.corp_id = CORP.into();
    c.dingtalk.api_base = "http://127.0.0.1:9".into(); // no DingTalk: callbacks only
    c
}

/// Sends `n` distinct instance events (round `round`) at `concurrency`; events/s.
async fn ingest(app: &App, config: &Config, round: usize, n: usize, concurrency: usize) -> f64 {
    let cipher = CallbackCrypto::new(
        config.callback.token.expose(),
        config.callback.aes_key.expose(),
    )
    .unwrap();
    let requests: Arc<Vec<(String, String)>> = Arc::new(
        (0..n)
            .map(|i| {
                let message = serde_json::json!({
                    "EventType": "bpms_instance_change", "processInstanceId": format!("pid-{round}-{i}"),
                    "corpId": CORP, "createTime": 1_764_300_000_000i64, "type": "start",
                    "staffId": "originator1", "processCode": "PROC-BENCH", "title": "bench",
                })
                .to_string();
                let ts = Utc::now().timestamp_millis().to_string();
                let nonce = crypto::random_nonce(8);
                let sealed = cipher.seal(&message, CORP, &ts, &nonce);
                (
                    format!(
                        "http://{}/dingtalk/callback?signature={}&timestamp={ts}&nonce={nonce}",
                        app.addr, sealed.signature
                    ),
                    serde_json::json!({ "encrypt": sealed.encrypt }).to_string(),
                )
            })
            .collect(),
    );
    let http = reqwest::Client::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, requests, next) = (http.clone(), requests.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((url, body)) = requests.get(i) else {
                        return;
                    };
                    let response = http
                        .post(url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap();
                    assert!(response.status().is_success(), "{}", response.status());
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn run_ingest(args: &Args) {
    let bouncer = pgbouncer::PgBouncer::start(args.server_connections);
    let (mut direct, mut pooled) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        for via_bouncer in [false, true] {
            let name = format!("dingsync_bench_{}", crypto::random_nonce(8).to_lowercase());
            let direct_url = format!("{}/{name}", common::server_url());
            let mut c = config(&direct_url);
            if via_bouncer {
                c.database.url = Secret::new(bouncer.url(&name));
                c.database.pooler = Pooler::Transaction;
                c.database.direct_url = Secret::new(direct_url.clone());
            }
            let app = App::start(c.clone()).await.unwrap();
            let rate = ingest(&app, &c, round, args.events, args.concurrency).await;
            app.stop().await.unwrap();
            let pool = sqlx::PgPool::connect(&direct_url).await.unwrap();
            let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM dingsync.events")
                .fetch_one(&pool)
                .await
                .unwrap();
            pool.close().await;
            common::drop_database(&name).await;
            assert_eq!(
                stored as usize, args.events,
                "every acknowledged event stored"
            );
            let how = if via_bouncer { "pgbouncer" } else { "direct" };
            println!(
                "round {round}: {how:9} {rate:8.0} events/s ({} events)",
                args.events
            );
            if via_bouncer {
                pooled.push(rate)
            } else {
                direct.push(rate)
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (d, p) = (median(&mut direct), median(&mut pooled));
    println!(
        "ingest median: direct {d:.0} events/s, through PgBouncer (transaction mode, {} server connections) {p:.0} events/s: {:.2}x",
        args.server_connections,
        p / d
    );
}

/// `n` events of CORP in the month that starts at `month`, in one statement.
async fn fill(pool: &sqlx::PgPool, month: chrono::DateTime<Utc>, n: i64) -> Duration {
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO dingsync.events
             (corp_id, dedup_key, source, event_type, process_instance_id, received_at, raw, payload)
         SELECT $1, 'event:bench-' || g, 'http_push', 'bpms_instance_change', 'pid-' || (g % 100000),
                $2 + make_interval(secs => (g % 2000000)::float8),
                '{\"EventType\":\"bpms_instance_change\",\"n\":' || g || '}', '{}'
         FROM generate_series(1, $3) g",
    )
    .bind(CORP)
    .bind(month)
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
    started.elapsed()
}

/// The retention job before migration V22: batches of `BATCH` deletes, then the VACUUM that makes
/// the space reusable (autovacuum's work, done at once here).
async fn batch_delete(pool: &sqlx::PgPool, before: chrono::DateTime<Utc>) {
    let started = Instant::now();
    let (mut deleted, mut batches) = (0u64, 0u64);
    loop {
        let k = store::prune::older_than(pool, Aged::Events, CORP, before, BATCH)
            .await
            .unwrap();
        deleted += k;
        batches += 1;
        if k < BATCH as u64 {
            break;
        }
    }
    let deleting = started.elapsed();
    let started = Instant::now();
    sqlx::raw_sql("VACUUM dingsync.events")
        .execute(pool)
        .await
        .unwrap();
    let vacuum = started.elapsed();
    println!(
        "retention, batch delete: {deleted} rows in {batches} statements: {:.1} s, then VACUUM {:.1} s",
        deleting.as_secs_f64(),
        vacuum.as_secs_f64()
    );
}

async fn run_retention(args: &Args) {
    let name = format!("dingsync_bench_{}", crypto::random_nonce(8).to_lowercase());
    let url = format!("{}/{name}", common::server_url());
    let pool = store::connect_and_migrate(&config(&url).database)
        .await
        .unwrap();
    let now = Utc::now();
    let month = Utc
        .with_ymd_and_hms(now.year() - 1, 1, 1, 0, 0, 0)
        .single()
        .unwrap();
    sqlx::query("SELECT dingsync.create_events_partition($1::date)")
        .bind(month.date_naive())
        .execute(&pool)
        .await
        .unwrap();
    let n = args.retention_events;
    let before = now - chrono::TimeDelta::days(30);

    let filled = fill(&pool, month, n).await;
    println!(
        "retention: {n} rows inserted in {:.1} s",
        filled.as_secs_f64()
    );
    if !args.drop_only {
        batch_delete(&pool, before).await;
        fill(&pool, month, n).await;
    }
    let started = Instant::now();
    let (mut dropped_rows, mut dropped) = (0u64, 0);
    for partition in store::prune::event_partitions_before(&pool, before)
        .await
        .unwrap()
    {
        if let Some(rows) = store::prune::drop_event_partition(&pool, &partition, CORP)
            .await
            .unwrap()
        {
            dropped_rows += rows;
            dropped += 1;
        }
    }
    println!(
        "retention, partition drop: {dropped_rows} rows in {dropped} partition(s): {:.2} s (counting the rows included)",
        started.elapsed().as_secs_f64()
    );
    pool.close().await;
    common::drop_database(&name).await;
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = args();
    println!(
        "machine: {} cores; PgBouncer 1.18 (pool_mode = transaction)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    run_ingest(&args).await;
    if args.retention_events > 0 {
        run_retention(&args).await;
    }
}
