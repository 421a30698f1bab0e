//! Actions benchmark (a program that reports figures, not a test): the real daemon (`App`,
//! embedded emulator with nobody acting, callbacks flowing back) on a fresh database, approvals
//! started in the emulator and known to dingsync from their pushed events, then agree actions.
//!
//! 1. Latency: `--latency-actions` agree actions inserted one at a time (one every 20 ms) into an
//!    idle daemon; INSERT-to-done per action from the database's own clock (`done_at -
//!    created_at`), as the outbox benchmark measures INSERT-to-created.
//! 2. Throughput: `--actions` agree actions inserted in one statement, rate budget off,
//!    zero-latency emulator; actions/s from the first insert to the last `done`. Run twice: with
//!    the emulator pushing each action's events back (as DingTalk does), and without pushes
//!    (only the actions worker runs), as the outbox benchmark does.
//!
//! ```sh
//! cargo bench --bench actions -- [--latency-actions 300] [--actions 3000] [--concurrency 16]
//! ```

use std::time::{Duration, Instant};

use dingsync::{
    app::App,
    config::{Config, Secret},
    crypto,
};
use dingsync_emulator::StartInstance;
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

struct Run {
    app: App,
    pool: PgPool,
    db_name: String,
}

impl Run {
    async fn start() -> Run {
        let db_name = format!("dingsync_bench_{}", crypto::random_nonce(8).to_lowercase());
        let mut config = Config::default();
        config.database.url = Secret::new(format!("{}/{db_name}", server()));
        config.server.listen = "127.0.0.1:0".into();
        config.dingtalk.api_base = dingsync::config::EMULATOR.into();
        config.dingtalk.qps = 0;
        // Budget off: neither the rate budget nor dingsync's monthly share holds actions back
        // (thousands of approvals' detail fetches and actions exceed a standard month).
        config.dingtalk.monthly_calls = 0;
        config.emulator.people_pace_ms = 0;
        config.outbox.concurrency = arg("--concurrency", 16) as usize;
        config.log.filter = "warn".into();
        let app = App::start(config).await.expect("daemon starts");
        let pool = app.pool.clone();
        Run { app, pool, db_name }
    }

    /// Starts `n` approvals in the emulator and waits until dingsync knows each one's task.
    async fn approvals(&self, n: u64) {
        let emu = self.app.emulator.as_ref().unwrap().state().clone();
        for _ in 0..n {
            emu.start_instance(StartInstance {
                process_code: "PROC-EMU-EXPENSE".into(),
                originator_userid: "emp1".into(),
                ..StartInstance::default()
            })
            .unwrap();
        }
        // Until every task is known, or none has become known for 10 s (an event whose push
        // failed waits in DingTalk's failed list for minutes: act on the tasks known).
        let (mut last, mut since) = (0, Instant::now());
        loop {
            let known: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM dingsync.approval_tasks WHERE status = 'RUNNING'",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap();
            if known as u64 >= n || since.elapsed() > Duration::from_secs(10) {
                return;
            }
            if known > last {
                (last, since) = (known, Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Agree actions for up to `n` running tasks without one, in one statement.
    async fn agree(&self, n: i64) -> u64 {
        sqlx::query(
            "SELECT dingsync.request_action('bench-' || t.task_id, 'agree', t.process_instance_id,
                                            task_id => t.task_id)
             FROM dingsync.approval_tasks t
             WHERE t.status = 'RUNNING'
               AND NOT EXISTS (SELECT FROM dingsync.actions a WHERE a.task_id = t.task_id)
             ORDER BY t.task_id LIMIT $1",
        )
        .bind(n)
        .execute(&self.pool)
        .await
        .unwrap()
        .rows_affected()
    }

    async fn wait_done(&self, within: Duration) {
        let started = Instant::now();
        loop {
            let open: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM dingsync.actions WHERE state IN ('pending', 'sending', 'unknown')",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap();
            if open == 0 {
                return;
            }
            assert!(started.elapsed() < within, "{open} actions still open");
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
    let n = arg("--latency-actions", 300);
    if n > 0 {
        let run = Run::start().await;
        run.approvals(n).await;
        for _ in 0..n {
            run.agree(1).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        run.wait_done(Duration::from_secs(60)).await;
        let mut ms: Vec<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM done_at - created_at)::float8 * 1000 FROM dingsync.actions WHERE state = 'done'",
        )
        .fetch_all(&run.pool)
        .await
        .unwrap();
        ms.sort_by(f64::total_cmp);
        println!(
            "latency: {} agree actions one at a time, INSERT to done: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms.len(),
            percentile(&ms, 0.5),
            percentile(&ms, 0.9),
            percentile(&ms, 0.99),
            ms[ms.len() - 1]
        );
        run.stop().await;
    }
    let n = arg("--actions", 3_000);
    if n > 0 {
        for pushes in [true, false] {
            throughput(n, pushes).await;
        }
    }
}

/// Throughput, budget off: `n` agree actions in one INSERT. Without `pushes` the callback is
/// deleted once dingsync knows the tasks, so the emulator pushes nothing back and only the
/// actions worker runs (as the outbox benchmark's "no pushes").
async fn throughput(n: u64, pushes: bool) {
    let run = Run::start().await;
    run.approvals(n).await;
    if !pushes {
        run.app
            .client
            .as_ref()
            .unwrap()
            .delete_callback()
            .await
            .unwrap();
    }
    let emu = run.app.emulator.as_ref().unwrap().state().clone();
    let executes_before = emu.calls(dingsync_emulator::EXECUTE);
    let started = Instant::now();
    let inserted = run.agree(n as i64).await;
    let insert_took = started.elapsed();
    // The database's clock once the INSERT has committed: the rows are visible to the worker
    // from here on (`created_at` is the INSERT's start).
    let committed: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&run.pool)
        .await
        .unwrap();
    if inserted < n {
        println!(
            "({} of {n} approvals' tasks known to dingsync when the actions were inserted)",
            inserted
        );
    }
    run.wait_done(Duration::from_secs(600)).await;
    let (done, span, in_flight): (i64, f64, f64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'done'),
                extract(epoch FROM max(done_at) - min(created_at))::float8,
                extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY done_at - sent_at))::float8 * 1000
         FROM dingsync.actions",
    )
    .fetch_one(&run.pool)
    .await
    .unwrap();
    let (after_commit,): (f64,) = sqlx::query_as(
        "SELECT extract(epoch FROM max(done_at) - $1)::float8 FROM dingsync.actions",
    )
    .bind(committed)
    .fetch_one(&run.pool)
    .await
    .unwrap();
    // `now()` is a transaction's start: each distinct `sent_at` is one claim, each distinct
    // `done_at` one commit of the recorder.
    let (claims, records, claiming): (i64, i64, f64) = sqlx::query_as(
        "SELECT count(DISTINCT sent_at), count(DISTINCT done_at),
                extract(epoch FROM max(sent_at) - min(sent_at))::float8
         FROM dingsync.actions",
    )
    .fetch_one(&run.pool)
    .await
    .unwrap();
    println!(
        "  the INSERT took {:.2} s; from its commit to the last done {after_commit:.2} s = {:.0} actions/s; {claims} claims ({:.1} rows each) over {claiming:.2} s, {records} commits of done rows ({:.1} each)",
        insert_took.as_secs_f64(),
        done as f64 / after_commit,
        done as f64 / claims.max(1) as f64,
        done as f64 / records.max(1) as f64,
    );
    println!(
        "throughput ({}): {done} of {inserted} agree actions done in {span:.2} s (database clock) = {:.0} actions/s; claim to done p50 {in_flight:.1} ms; wall {:.2} s; emulator saw {} executes",
        if pushes {
            "with the emulator's pushes of each action's events"
        } else {
            "no pushes"
        },
        done as f64 / span,
        started.elapsed().as_secs_f64(),
        emu.calls(dingsync_emulator::EXECUTE) - executes_before,
    );
    run.stop().await;
}
