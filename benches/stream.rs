//! Events per second over Stream mode: the real `dingsync serve` (release) with
//! `stream.connections = 4` against the emulator's gateway in this process, which sends as fast
//! as acks allow (at most `STREAM_WINDOW` messages unacknowledged per connection). Measures the
//! rate from the first frame to the last ack, the ack latency the gateway sees (frame sent to ack
//! received, after the daemon's commit), and the daemon's peak RSS; then `pgbench` with a
//! one-row INSERT per transaction (the naive one-commit-per-event ceiling) in the same run.
//!
//! cargo bench --bench stream -- [--events 40000] [--rounds 3] [--clients 64] [--seconds-pgbench 10]
//!
//! Needs the local PostgreSQL (or DINGSYNC_TEST_DATABASE_URL) and `pgbench` on PATH.

mod common;

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use dingsync::crypto;
use dingsync_emulator::{
    DEFAULT_APP_KEY, DEFAULT_APP_SECRET, Delivery, Emulator, EmulatorConfig, STREAM_WINDOW,
};
use serde_json::{Map, Value, json};
use sqlx::{Connection, PgConnection};

const CORP: &str = "dingbenchcorp0000001";
const CONNECTIONS: usize = 4;

struct Args {
    events: usize,
    rounds: usize,
    clients: usize,
    pgbench_seconds: u64,
}

fn args() -> Args {
    let mut a = Args {
        events: 40_000,
        rounds: 3,
        clients: 64,
        pgbench_seconds: 10,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let value = || {
            argv.get(i + 1)
                .and_then(|v| v.parse().ok())
                .expect("flag needs a number")
        };
        match argv[i].as_str() {
            "--events" => a.events = value(),
            "--rounds" => a.rounds = value().max(1),
            "--clients" => a.clients = value(),
            "--seconds-pgbench" => a.pgbench_seconds = value() as u64,
            _ => {}
        }
        i += if argv[i].starts_with("--") && argv[i] != "--bench" {
            2
        } else {
            1
        };
    }
    a
}

/// Four events per approval (instance start, task start, task finish, instance finish), new ids
/// every round; the flat HTTP-push shape, which the gateway turns into frames.
fn events(round: usize, n: usize) -> Vec<Map<String, Value>> {
    let t0 = 1_764_300_000_000_i64;
    (0..n)
        .map(|i| {
            let pid = format!("s{round:04}-{:08}-5d3a-4f7b-8e6c-0a1d2b3c4e5f", i / 4);
            let task = (round * n + i / 4) as i64;
            let common = json!({"processInstanceId": pid, "corpId": CORP, "createTime": t0,
                "title": "张三提交的请假申请", "processCode": "PROC-7E1B3A52-4C9D-4F0E-B6A8-2D5C9E1F7A30",
                "bizCategoryId": "", "businessId": "202406111630000123456"});
            let mut e = common.as_object().unwrap().clone();
            let extra = match i % 4 {
                0 => json!({"EventType": "bpms_instance_change", "type": "start", "staffId": "manager7421"}),
                1 => json!({"EventType": "bpms_task_change", "type": "start", "staffId": "boss1", "taskId": task}),
                2 => json!({"EventType": "bpms_task_change", "type": "finish", "result": "agree", "remark": "同意",
                    "staffId": "boss1", "taskId": task, "finishTime": t0 + 60_000}),
                _ => json!({"EventType": "bpms_instance_change", "type": "finish", "result": "agree",
                    "staffId": "manager7421", "finishTime": t0 + 61_000}),
            };
            e.extend(extra.as_object().unwrap().clone());
            e
        })
        .collect()
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn memory(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|k| k.parse().ok())
        .unwrap_or(f64::NAN)
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = args();
    let server = common::server_url();
    let db_name = format!("dingsync_bench_{}", crypto::random_nonce(8).to_lowercase());
    let db_url = format!("{server}/{db_name}");
    let load_before = load_average();
    let emu = Emulator::start(
        EmulatorConfig {
            corp_id: CORP.into(),
            delivery: Delivery::Stream,
            ..EmulatorConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let port = free_port();
    const DORMANT: &str = "0 0 0 1 1 *";
    let daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_dingsync"))
            .arg("serve")
            .arg("--config")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"))
            .env("DINGSYNC_DATABASE_URL", &db_url)
            .env("DINGSYNC_DATABASE_MAX_CONNECTIONS", "16")
            .env("DINGSYNC_SERVER_LISTEN", format!("127.0.0.1:{port}"))
            .env("DINGSYNC_DINGTALK_API_BASE", emu.base_url())
            .env("DINGSYNC_DINGTALK_OPENAPI_BASE", emu.base_url())
            .env("DINGSYNC_DINGTALK_APP_KEY", DEFAULT_APP_KEY)
            .env("DINGSYNC_DINGTALK_APP_SECRET", DEFAULT_APP_SECRET)
            .env("DINGSYNC_DINGTALK_CORP_ID", CORP)
            .env("DINGSYNC_STREAM_ENABLED", "true")
            .env("DINGSYNC_STREAM_CONNECTIONS", CONNECTIONS.to_string())
            // Only the stream: no jobs calling the emulator, no outbox.
            .env("DINGSYNC_OUTBOX_ENABLED", "false")
            .env("DINGSYNC_SCHEDULER_DETAILS", DORMANT)
            .env("DINGSYNC_SCHEDULER_SWEEP", DORMANT)
            .env("DINGSYNC_SCHEDULER_BACKFILL", DORMANT)
            .env("DINGSYNC_SCHEDULER_FAILED", DORMANT)
            .env("DINGSYNC_SCHEDULER_RETENTION", DORMANT)
            .env("DINGSYNC_LOG_FILTER", "error")
            .stdout(Stdio::null())
            .spawn()
            .expect("start dingsync serve"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while emu.state().stream_report().connections.len() < CONNECTIONS {
        assert!(Instant::now() < deadline, "dingsync did not connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let idle_rss = memory(daemon.0.id(), "VmRSS");
    println!(
        "machine: {} cores (shared with other work), load average {load_before:.2} before; PostgreSQL at {server}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{} rounds: {} events over {CONNECTIONS} Stream connections (at most {STREAM_WINDOW} unacked each), then pgbench (one-row INSERT per transaction) for {} s at {} clients",
        args.rounds, args.events, args.pgbench_seconds, args.clients
    );
    let mut conn = PgConnection::connect(&db_url).await.unwrap();
    let mut ratios = Vec::new();
    let mut all_acked = 0;
    for round in 0..args.rounds {
        let label = format!("round {}/{}", round + 1, args.rounds);
        let batch = events(round, args.events);
        sqlx::raw_sql("CHECKPOINT").execute(&mut conn).await.ok();
        let before = emu.state().stream_acks().len();
        let started = Instant::now();
        emu.state().stream_publish(batch);
        loop {
            let report = emu.state().stream_report();
            if report.in_flight == 0 && report.waiting == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = started.elapsed();
        let acks = emu.state().stream_acks();
        let round_acks = &acks[before..];
        let mut latency: Vec<u64> = round_acks.iter().map(|a| a.after_us).collect();
        latency.sort_unstable();
        let pct = |p: f64| latency[((latency.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
        let consumed = round_acks.iter().filter(|a| a.consumed).count();
        all_acked += consumed;
        let rate = consumed as f64 / elapsed.as_secs_f64();
        println!(
            "{label}: dingsync {rate:>6.0} events/s  ack p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms  ({consumed} consumed, {} not, {:.2} s)",
            pct(0.5),
            pct(0.99),
            pct(1.0),
            round_acks.len() - consumed,
            elapsed.as_secs_f64()
        );
        sqlx::raw_sql("CHECKPOINT").execute(&mut conn).await.ok();
        if let Some(tps) = pgbench(
            &mut conn,
            &server,
            &db_name,
            args.clients,
            args.pgbench_seconds,
        )
        .await
        {
            println!(
                "{label}: pgbench  {tps:>6.0} tps       ratio dingsync events/s / pgbench tps: {:.2}",
                rate / tps
            );
            ratios.push(rate / tps);
        }
    }
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dingsync.events WHERE source = 'stream'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    let peak_rss = memory(daemon.0.id(), "VmHWM");
    drop(daemon);
    conn.close().await.ok();
    if !ratios.is_empty() {
        let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "median ratio dingsync events/s / pgbench tps: {:.2}  (rounds: {})",
            ratios[ratios.len() / 2],
            listed.join(", ")
        );
    }
    println!(
        "serve memory: RSS {:.1} MiB idle, peak {:.1} MiB under this load",
        idle_rss / 1024.0,
        peak_rss / 1024.0
    );
    println!(
        "rows == consumed events ({all_acked}): {}",
        if events as usize == all_acked {
            "yes"
        } else {
            "NO"
        }
    );
    println!("load average after: {:.2}", load_average());
    emu.stop().await;
    common::drop_database(&db_name).await;
}

/// The naive ceiling: one INSERT of a comparable event row per transaction.
async fn pgbench(
    conn: &mut PgConnection,
    server: &str,
    db: &str,
    clients: usize,
    seconds: u64,
) -> Option<f64> {
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS bench_naive;
         CREATE TABLE bench_naive (id bigserial PRIMARY KEY, dedup_key text NOT NULL UNIQUE,
                                   raw text NOT NULL, payload jsonb NOT NULL,
                                   received_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let script = std::env::temp_dir().join(format!("{db}.sql"));
    let row = r#"{"EventType":"bpms_instance_change","processInstanceId":"ad253df6-e175-47ae-9d88-cd7d6c2ee2d3","corpId":"dingbenchcorp0000001","createTime":1764300000000,"title":"张三提交的请假申请","type":"start","staffId":"manager7421","processCode":"PROC-7E1B3A52-4C9D-4F0E-B6A8-2D5C9E1F7A30","businessId":"202406111630000123456"}"#;
    std::fs::write(
        &script,
        format!("INSERT INTO bench_naive (dedup_key, raw, payload) VALUES (md5(random()::text || clock_timestamp()::text), '{row}', '{row}');\n"),
    )
    .unwrap();
    let out = Command::new("pgbench")
        .args([
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            "-f",
        ])
        .arg(&script)
        .arg(format!("{server}/{db}"))
        .output();
    let _ = std::fs::remove_file(&script);
    match out {
        Ok(out) if out.status.success() => {
            String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
                l.strip_prefix("tps = ")
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
            })
        }
        Ok(out) => {
            println!("pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
            None
        }
        Err(e) => {
            println!("pgbench not run ({e})");
            None
        }
    }
}
