//! Reconcile benchmark (a program that reports figures, not a test).
//!
//! 1. Sweep: N open approvals (default 10 000) exist in the emulator and as RUNNING rows in a fresh
//!    database; one reconciliation pass (`reconcile::background::recheck_open`, what the planner
//!    runs after a month of polling) re-checks them all. Reports the time, the `processinstance/get`
//!    calls (must be exactly one per approval), the busiest second of calls against
//!    `dingtalk.qps`, and the process's resident memory while it runs (flat: the sweep streams
//!    pages of `reconcile.batch_size` rows). A first, smaller pass (N / 5 approvals) gives the
//!    memory figure to compare with; those stay open, so the second pass meets N + N / 5.
//! 2. Convergence: a daemon with the real scheduler (every job every second) receives M approvals
//!    (default 1 000) moving through their states while the emulator loses 30% of the pushes for
//!    good (plus duplicates and reorders); reports the seconds from the last push until every row
//!    has the emulator's status and result.
//!
//! ```sh
//! cargo bench --bench sweep -- [--approvals 10000] [--qps 200] [--converge 1000]
//! ```
//! Needs the local PostgreSQL (or DINGSYNC_TEST_DATABASE_URL).

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{drop_database, server_url};
use dingsync::{
    app::App,
    callback::TAGS,
    config::{Config, Secret},
    crypto,
    dingtalk::{self, types::CallbackRegistration},
    jobs::Context,
    reconcile, store,
};
use dingsync_emulator::{
    DEFAULT_APP_KEY, DEFAULT_APP_SECRET, Emulator, EmulatorConfig, Faults, PushFaults,
    StartInstance, TaskAction,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const CORP: &str = "dingbenchcorp0000001";
const CODE: &str = "PROC-EMU-EXPENSE";
const GET: &str = "topapi/processinstance/get";

struct Args {
    approvals: usize,
    qps: u32,
    converge: usize,
}

fn args() -> Args {
    let mut a = Args {
        approvals: 10_000,
        qps: 200,
        converge: 1_000,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let value = || -> usize {
            argv.get(i + 1)
                .and_then(|v| v.parse().ok())
                .expect("flag needs a number")
        };
        match argv[i].as_str() {
            "--approvals" => a.approvals = value(),
            "--qps" => a.qps = value() as u32,
            "--converge" => a.converge = value(),
            _ => {} // cargo bench passes --bench
        }
        i += if argv[i].starts_with("--") && argv[i] != "--bench" {
            2
        } else {
            1
        };
    }
    a
}

/// `time_scale` < 1 also shortens the token's life (7200 s scaled): calls in flight when it
/// expires are refused and repeated, so the sweep runs at DingTalk's timings.
async fn emulator(time_scale: f64) -> Emulator {
    Emulator::start(
        EmulatorConfig {
            corp_id: CORP.into(),
            time_scale,
            seed: 5,
            ..EmulatorConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap()
}

fn config(db_url: &str, emu: &Emulator, qps: u32) -> Config {
    let mut c = Config::default();
    c.database.url = Secret::new(db_url);
    c.server.listen = "127.0.0.1:0".into();
    c.callback.token = Secret::new(crypto::random_nonce(32));
    c.callback.aes_key = Secret::new(crypto::random_aes_key());
    c.callback.owner_key = vec![CORP.into()];
    c.dingtalk.corp_id = CORP.into();
    c.dingtalk.api_base = emu.base_url();
    c.dingtalk.app_key = DEFAULT_APP_KEY.into();
    c.dingtalk.app_secret = Secret::new(DEFAULT_APP_SECRET);
    c.dingtalk.qps = qps;
    c.reconcile.process_codes = vec![CODE.into()];
    c.reconcile.detail_quiet_ms = 0;
    // A benchmark of throughput: no monthly pacing, only the rate budget; gap checks after a
    // second of quiet.
    c.dingtalk.monthly_calls = 0;
    c.reconcile.gap_after_s = 1;
    c.reconcile.backfill_days = 1;
    c.reconcile.concurrency = 8;
    c
}

/// Resident memory of this process, KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Starts `n` open approvals in the emulator and inserts them as RUNNING rows never checked.
async fn seed(emu: &Emulator, pool: &PgPool, n: usize) {
    let state = emu.state();
    let mut ids = Vec::with_capacity(n);
    for k in 0..n {
        let instance = state
            .start_instance(StartInstance {
                process_code: CODE.into(),
                originator_userid: ["emp1", "emp2", "emp3"][k % 3].into(),
                ..StartInstance::default()
            })
            .unwrap();
        ids.push(instance.process_instance_id);
    }
    for chunk in ids.chunks(5_000) {
        sqlx::query(
            "INSERT INTO dingsync.approvals (corp_id, process_instance_id, process_code, status)
             SELECT $1, id, $2, 'RUNNING' FROM unnest($3::text[]) AS id",
        )
        .bind(CORP)
        .bind(CODE)
        .bind(chunk)
        .execute(pool)
        .await
        .unwrap();
    }
}

struct SweepFigures {
    counts: String,
    seconds: f64,
    gets: usize,
    busiest_second: usize,
    rss_before: u64,
    rss_peak: u64,
}

async fn sweep_once(ctx: &Context, emu: &Emulator, n: usize, pool: &PgPool) -> SweepFigures {
    seed(emu, pool, n).await;
    let before_gets = emu.state().calls(GET);
    let rss_before = rss_kib();
    let peak = Arc::new(AtomicU64::new(rss_before));
    let stop = CancellationToken::new();
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                peak.fetch_max(rss_kib(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let started = Instant::now();
    let counts = reconcile::background::recheck_open(ctx, &CancellationToken::new())
        .await
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    stop.cancel();
    sampler.await.unwrap();
    let state = emu.state();
    SweepFigures {
        counts: serde_json::to_string(&counts).unwrap(),
        seconds,
        gets: state.calls(GET) - before_gets,
        busiest_second: state.max_calls_within(GET, Duration::from_secs(1)),
        rss_before,
        rss_peak: peak.load(Ordering::Relaxed),
    }
}

async fn sweep_bench(args: &Args) {
    let name = format!("dingsync_bench_sweep_{}", std::process::id());
    let url = format!("{}/{name}", server_url());
    let emu = emulator(1.0).await;
    let config = config(&url, &emu, args.qps);
    // Each pass meets the open approvals not fetched since it began: the first pass's are
    // still open during the second, and fetched again.
    let pool = store::connect_and_migrate(&config.database).await.unwrap();
    let client = dingtalk::Client::new(pool.clone(), &config.dingtalk, &emu.base_url()).unwrap();
    let ctx = Context::new(
        pool.clone(),
        client,
        CORP,
        &config.reconcile,
        &config.retention,
    );

    let small = sweep_once(&ctx, &emu, args.approvals / 5, &pool).await;
    let large = sweep_once(&ctx, &emu, args.approvals, &pool).await;
    // The pass re-checks every open approval: the second one meets the first one's again.
    let (n_small, n_large) = (args.approvals / 5, args.approvals / 5 + args.approvals);
    for (n, f) in [(n_small, &small), (n_large, &large)] {
        println!(
            "pass over {n} open approvals: {:.1} s ({:.0} gets/s), {} processinstance/get calls ({}), busiest second so far {} calls (dingtalk.qps = {}), RSS {} MiB before, peak {} MiB (+{} KiB); outcomes {}",
            f.seconds,
            f.gets as f64 / f.seconds,
            f.gets,
            if f.gets == n {
                "exactly one per approval"
            } else {
                "NOT one per approval"
            },
            f.busiest_second,
            args.qps,
            f.rss_before / 1024,
            f.rss_peak / 1024,
            f.rss_peak.saturating_sub(f.rss_before),
            f.counts,
        );
    }
    pool.close().await;
    emu.stop().await;
    drop_database(&name).await;
}

/// Rows whose status or result differ from the emulator's (missing rows count too).
async fn disagreeing(emu: &Emulator, pool: &PgPool) -> i64 {
    let instances = emu.state().instances();
    let ids: Vec<&str> = instances
        .iter()
        .map(|i| i.process_instance_id.as_str())
        .collect();
    let statuses: Vec<&str> = instances.iter().map(|i| i.status.as_str()).collect();
    let results: Vec<Option<&str>> = instances.iter().map(|i| i.result).collect();
    sqlx::query_scalar(
        "SELECT count(*) FROM unnest($2::text[], $3::text[], $4::text[]) AS e(id, s, r)
         LEFT JOIN dingsync.approvals a ON a.corp_id = $1 AND a.process_instance_id = e.id
         WHERE a.status IS DISTINCT FROM e.s OR a.result IS DISTINCT FROM e.r",
    )
    .bind(CORP)
    .bind(&ids)
    .bind(&statuses)
    .bind(&results)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn convergence_bench(args: &Args) {
    let name = format!("dingsync_bench_converge_{}", std::process::id());
    let url = format!("{}/{name}", server_url());
    // DingTalk's retry ladder and failed-list delay, 100 times faster.
    let emu = emulator(0.01).await;
    let mut config = config(&url, &emu, args.qps);
    for schedule in [
        &mut config.scheduler.details,
        &mut config.scheduler.sweep,
        &mut config.scheduler.backfill,
        &mut config.scheduler.failed,
    ] {
        *schedule = "* * * * * *".into();
    }
    let app = App::start(config.clone()).await.unwrap();
    app.client
        .as_ref()
        .unwrap()
        .register_callback(&CallbackRegistration {
            call_back_tag: TAGS.iter().map(|t| t.to_string()).collect(),
            token: config.callback.token.expose().into(),
            aes_key: config.callback.aes_key.expose().into(),
            url: format!("http://{}/dingtalk/callback", app.addr),
        })
        .await
        .unwrap();
    let state = emu.state();
    state.set_faults(Faults {
        push: PushFaults {
            drop_forever_rate: 0.3,
            duplicate_rate: 0.1,
            reorder_rate: 0.2,
            reorder_max_ms: 200,
            ..PushFaults::default()
        },
        ..Faults::default()
    });
    for k in 0..args.converge {
        state
            .start_instance(StartInstance {
                process_code: CODE.into(),
                originator_userid: "emp1".into(),
                approvers: Some(vec!["manager1".into(), "fin1".into()]),
                ..StartInstance::default()
            })
            .unwrap();
        if k % 10 == 9 {
            tokio::task::yield_now().await;
        }
    }
    for round in 0..3 {
        for (n, open) in state.open_tasks().into_iter().enumerate() {
            let act = TaskAction::default();
            let _ = match (n + round) % 5 {
                0..=2 => state.agree(open.task.taskid, act),
                3 => state.refuse(open.task.taskid, act),
                _ => continue,
            };
        }
    }
    assert!(state.settle(Duration::from_secs(120)).await);
    let pushes_done = Instant::now();
    let pool = app.pool.clone();
    let wrong_at_start = disagreeing(&emu, &pool).await;
    loop {
        let wrong = disagreeing(&emu, &pool).await;
        if wrong == 0 {
            break;
        }
        assert!(
            pushes_done.elapsed() < Duration::from_secs(600),
            "not converged after 600 s: {wrong} rows differ"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "convergence after a 30%-drop run of {} approvals: {wrong_at_start} rows wrong when the last push was made, all equal to the emulator {:.1} s later (every job every second, reconcile.gap_after_s = 1, dingtalk.qps = {})",
        args.converge,
        pushes_done.elapsed().as_secs_f64(),
        args.qps
    );
    app.stop().await.unwrap();
    emu.stop().await;
    drop_database(&name).await;
}

fn main() {
    // Warnings (e.g. a retried DingTalk call) on stderr.
    tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        sweep_bench(&args).await;
        convergence_bench(&args).await;
    });
}
