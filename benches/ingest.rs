//! Callback ingest load benchmark (a program that reports figures, not a test).
//!
//! Starts `dingsync serve` as a child process on a fresh database and then runs `--rounds`
//! rounds, each of two halves: it sends N distinct, properly encrypted events over keep-alive
//! HTTP/1.1 at a fixed concurrency and measures events/s and the p50/p99/max acknowledgement
//! latency; then it runs `pgbench` with a one-row INSERT per transaction at the same client count
//! (a fresh table each round): the naive one-commit-per-event ceiling dingsync is compared with.
//! Every round sends new approvals (new process instance and task ids), so every round does the
//! same work; alternating the halves spreads the noise of a shared machine over both. It prints
//! each round's figures and ratio, the median ratio, whether the rows in PostgreSQL equal the
//! acknowledged events (over all rounds), and `serve`'s memory.
//!
//! ```sh
//! cargo bench --bench ingest -- [--events 40000] [--concurrency 64] [--seconds-pgbench 10] [--rounds 3]
//! ```
//! Needs the local PostgreSQL (or DINGSYNC_TEST_DATABASE_URL) and `pgbench` on PATH (the
//! comparison is skipped with a note when missing).

use std::{
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use dingsync::crypto::{self, CallbackCrypto};
use sqlx::{Connection, PgConnection};

const CORP: &str = "dingbenchcorp0000001";

struct Args {
    events: usize,
    concurrency: usize,
    pgbench_seconds: u64,
    rounds: usize,
}

fn args() -> Args {
    let mut a = Args {
        events: 40_000,
        concurrency: 64,
        pgbench_seconds: 10,
        rounds: 3,
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
            "--concurrency" => a.concurrency = value(),
            "--seconds-pgbench" => a.pgbench_seconds = value() as u64,
            "--rounds" => a.rounds = value().max(1),
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

/// Four events per approval: instance start, task start, task finish, instance finish. Ids
/// carry the round, so that each round's approvals and tasks are new (same work every round).
fn messages(round: usize, n: usize) -> Vec<String> {
    let t0 = 1_764_300_000_000_i64;
    let first_task = (round * n) as i64;
    (0..n)
        .map(|i| {
            let (pid, step) = (format!("b{round:04}-{:08}-5d3a-4f7b-8e6c-0a1d2b3c4e5f", i / 4), i % 4);
            let task = first_task + i as i64;
            let url = format!("https://aflow.dingtalk.com/dingtalk/mobile/homepage.htm?corpid={CORP}&procInstId={pid}&dinghash=approval");
            match step {
                0 => serde_json::json!({"EventType":"bpms_instance_change","processInstanceId":pid,"corpId":CORP,"createTime":t0,"title":"张三提交的请假申请","type":"start","staffId":"manager7421","url":url,"processCode":"PROC-7E1B3A52-4C9D-4F0E-B6A8-2D5C9E1F7A30","bizCategoryId":"","businessId":"202406111630000123456"}),
                1 => serde_json::json!({"EventType":"bpms_task_change","processInstanceId":pid,"corpId":CORP,"createTime":t0,"title":"张三提交的请假申请","type":"start","staffId":"boss1","taskId":task,"processCode":"PROC-7E1B3A52-4C9D-4F0E-B6A8-2D5C9E1F7A30","bizCategoryId":"","businessId":"202406111630000123456"}),
                2 => serde_json::json!({"EventType":"bpms_task_change","processInstanceId":pid,"corpId":CORP,"createTime":t0,"finishTime":t0+60_000,"title":"张三提交的请假申请","type":"finish","result":"agree","remark":"同意","staffId":"boss1","taskId":task-1,"processCode":"PROC-7E1B3A52-4C9D-4F0E-B6A8-2D5C9E1F7A30","bizCategoryId":"","businessId":"202406111630000123456"}),
                _ => serde_json::json!({"EventType":"bpms_instance_change","processInstanceId":pid,"corpId":CORP,"createTime":t0,"finishTime":t0+61_000,"title":"张三提交的请假申请","type":"finish","result":"agree","staffId":"manager7421","url":url,"processCode":"PROC-7E1B3A52-4C9D-4F0E-B6A8-2D5C9E1F7A30","bizCategoryId":"","businessId":"202406111630000123456"}),
            }
            .to_string()
        })
        .collect()
}

struct Daemon(Child);

/// A memory figure of a process from /proc (Linux), in KiB: `VmRSS` now, `VmHWM` its peak.
fn memory(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(f64::NAN)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
    let server = std::env::var("DINGSYNC_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let db_name = format!("dingsync_bench_{}", crypto::random_nonce(8).to_lowercase());
    let db_url = format!("{server}/{db_name}");
    let (token, aes_key) = (crypto::random_nonce(32), crypto::random_aes_key());
    let port = free_port();
    let load_before = load_average();

    let daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_dingsync"))
            .arg("serve")
            .arg("--config")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"))
            .env("DINGSYNC_DATABASE_URL", &db_url)
            .env("DINGSYNC_DATABASE_MAX_CONNECTIONS", "16")
            .env("DINGSYNC_SERVER_LISTEN", format!("127.0.0.1:{port}"))
            .env("DINGSYNC_CALLBACK_TOKEN", &token)
            .env("DINGSYNC_CALLBACK_AES_KEY", &aes_key)
            .env("DINGSYNC_CALLBACK_OWNER_KEY", CORP)
            .env("DINGSYNC_DINGTALK_CORP_ID", CORP)
            // No DingTalk: the daemon only serves callbacks (no embedded emulator adding events).
            .env("DINGSYNC_DINGTALK_API_BASE", "http://127.0.0.1:9")
            // Errors only: the warnings that a callbacks-only daemon is expected to print
            // (no DingTalk credentials) would clutter the figures.
            .env("DINGSYNC_LOG_FILTER", "error")
            .stdout(Stdio::null())
            .spawn()
            .expect("start dingsync serve"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "dingsync did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let idle_rss = memory(daemon.0.id(), "VmRSS");

    println!(
        "machine: {} cores, load average {load_before:.2} before the benchmark; PostgreSQL at {server}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{} rounds: {} events at concurrency {}, then pgbench (one-row INSERT per transaction) for {} s at {} clients",
        args.rounds, args.events, args.concurrency, args.pgbench_seconds, args.concurrency
    );

    let cipher = CallbackCrypto::new(&token, &aes_key).unwrap();
    let mut conn = PgConnection::connect(&db_url).await.unwrap();
    let (mut acked, mut failed) = (0usize, 0usize);
    let mut ratios = Vec::new();
    for round in 0..args.rounds {
        let label = format!("round {}/{}", round + 1, args.rounds);
        let requests = encrypt(&cipher, round, args.events, port);
        // Both halves start right after a checkpoint, so neither pays for the other's dirty pages
        // and a timed checkpoint is unlikely to land in one of them only.
        checkpoint(&mut conn).await;
        let sent = send(port, requests, args.concurrency).await;
        acked += sent.latencies.len();
        failed += sent.failed;
        let rate = sent.latencies.len() as f64 / sent.elapsed.as_secs_f64();
        println!(
            "{label}: dingsync {rate:>6.0} events/s  ack p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms  ({} acked, {} failed, {:.2} s)",
            ms(sent.percentile(0.50)),
            ms(sent.percentile(0.99)),
            ms(sent.percentile(1.0)),
            sent.latencies.len(),
            sent.failed,
            sent.elapsed.as_secs_f64()
        );
        checkpoint(&mut conn).await;
        let Some(tps) = pgbench(
            &mut conn,
            &server,
            &db_name,
            args.concurrency,
            args.pgbench_seconds,
        )
        .await
        else {
            continue;
        };
        println!(
            "{label}: pgbench  {tps:>6.0} tps       ratio dingsync events/s / pgbench tps: {:.2}",
            rate / tps
        );
        ratios.push(rate / tps);
    }

    // Every acknowledged event must be in the database, exactly once.
    let (events, approvals, completed, tasks): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM dingsync.events),
                (SELECT count(*) FROM dingsync.approvals),
                (SELECT count(*) FROM dingsync.approvals WHERE status = 'COMPLETED' AND result = 'agree'),
                (SELECT count(*) FROM dingsync.approval_tasks WHERE status = 'COMPLETED')",
    )
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
    let avg_plain = messages(0, args.events.min(100))
        .iter()
        .map(String::len)
        .sum::<usize>()
        / args.events.min(100);
    println!("message size: ~{avg_plain} bytes decrypted");
    println!(
        "serve memory: RSS {:.1} MiB idle, peak {:.1} MiB under this load",
        idle_rss / 1024.0,
        peak_rss / 1024.0
    );
    println!(
        "database: {events} events, {approvals} approvals ({completed} completed/agree), {tasks} completed tasks"
    );
    let consistent = events as usize == acked
        && failed == 0
        && approvals as usize == args.rounds * args.events.div_ceil(4);
    println!(
        "rows == acknowledged events ({acked} over all rounds): {}",
        if consistent { "yes" } else { "NO" }
    );

    let mut admin = PgConnection::connect(&format!("{server}/postgres"))
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
    ))
    .execute(&mut admin)
    .await
    .ok();
    if !consistent {
        std::process::exit(1);
    }
}

/// The whole HTTP request for each of a round's events, encrypted up front: the clock measures
/// dingsync, not the load generator's crypto.
fn encrypt(cipher: &CallbackCrypto, round: usize, events: usize, port: u16) -> Arc<Vec<Vec<u8>>> {
    let ts = 1_764_300_000_000_i64.to_string();
    Arc::new(
        messages(round, events)
            .iter()
            .map(|m| {
                let nonce = crypto::random_nonce(8);
                let sealed = cipher.seal(m, CORP, &ts, &nonce);
                let body = serde_json::json!({ "encrypt": sealed.encrypt }).to_string();
                // Signature (hex), timestamp (digits) and nonce (alphanumeric) need no escaping.
                format!(
                    "POST /dingtalk/callback?signature={}&timestamp={ts}&nonce={nonce} HTTP/1.1\r\n\
                     Host: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n\r\n{body}",
                    sealed.signature,
                    body.len()
                )
                .into_bytes()
            })
            .collect(),
    )
}

/// One round's answers: the latency of each acknowledged event (sorted), how many were not
/// acknowledged, and the wall time of the round.
struct Sent {
    latencies: Vec<Duration>,
    failed: usize,
    elapsed: Duration,
}

impl Sent {
    fn percentile(&self, p: f64) -> Duration {
        let last = self.latencies.len().saturating_sub(1);
        self.latencies
            .get(((self.latencies.len() as f64 * p) as usize).min(last))
            .copied()
            .unwrap_or_default()
    }
}

/// Sends every request once, `concurrency` at a time, each connection kept alive.
async fn send(port: u16, requests: Arc<Vec<Vec<u8>>>, concurrency: usize) -> Sent {
    let next = Arc::new(AtomicUsize::new(0));
    // Connect first, so that the clock does not include the TCP handshakes.
    let mut conns = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        conns.push(KeepAlive::connect(port).await);
    }
    let started = Instant::now();
    let mut workers = Vec::new();
    for mut conn in conns {
        let (requests, next) = (requests.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failed = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(request) = requests.get(i) else {
                    break;
                };
                let t = Instant::now();
                match conn.exchange(request).await {
                    Ok(200) => latencies.push(t.elapsed()),
                    Ok(_) => failed += 1,
                    Err(_) => {
                        failed += 1;
                        conn = KeepAlive::connect(port).await;
                    }
                }
            }
            (latencies, failed)
        }));
    }
    let mut sent = Sent {
        latencies: Vec::with_capacity(requests.len()),
        failed: 0,
        elapsed: Duration::ZERO,
    };
    for w in workers {
        let (l, f) = w.await.unwrap();
        sent.latencies.extend(l);
        sent.failed += f;
    }
    sent.elapsed = started.elapsed();
    sent.latencies.sort();
    sent
}

/// Flushes dirty pages now (needs a superuser; skipped otherwise).
async fn checkpoint(conn: &mut PgConnection) {
    sqlx::raw_sql("CHECKPOINT").execute(&mut *conn).await.ok();
}

/// The 1-minute load average (Linux), to tell a quiet machine from a busy one.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// A minimal keep-alive HTTP/1.1 client, so that the load generator spends as little of the
/// shared CPU as pgbench's client does (reqwest cost about a quarter of a core at these rates).
struct KeepAlive {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    async fn connect(port: u16) -> KeepAlive {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        stream.set_nodelay(true).unwrap();
        KeepAlive {
            stream,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends one request and reads its whole response; returns the status code.
    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.stream.write_all(request).await?;
        self.buf.clear();
        let bad = || std::io::Error::other("bad response");
        loop {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::other("closed"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
            let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = std::str::from_utf8(&self.buf[..end]).map_err(|_| bad())?;
            let status: u16 = head
                .get(9..12)
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)?;
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse().ok())
                .ok_or_else(bad)?;
            if self.buf.len() >= end + 4 + length {
                return Ok(status);
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The naive ceiling: one INSERT of a comparable event row per transaction, same client count.
async fn pgbench(
    conn: &mut PgConnection,
    server: &str,
    db: &str,
    clients: usize,
    seconds: u64,
) -> Option<f64> {
    // A fresh table each round: every round inserts into the same empty start.
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
    let url = format!("{server}/{db}");
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
        .arg(&url)
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
            println!(
                "pgbench not run ({e}); install postgresql-client to compare with the naive ceiling"
            );
            None
        }
    }
}
