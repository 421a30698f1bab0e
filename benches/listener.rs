//! The listener under a connection attack (a program that reports figures, not a test).
//!
//! Starts `dingsync serve` as a child process on a fresh database, with the shipped `[server]`
//! limits, and runs four phases of `--seconds` each. In every phase a DingTalk stand-in (on a
//! thread of its own) sends valid signed callbacks one after another, each on a new connection
//! (about 20 a second), and
//! the program reports their latency (p50/p99/max), how many failed or took over DingTalk's
//! 1500 ms, and the daemon's RSS before, at its highest during (sampled every 100 ms) and after.
//!
//! 1. quiet: no attack, the baseline.
//! 2. unfinished headers: `--connections` clients each open a connection and send `--header-kb`
//!    KiB of a header that never ends, and open a new one as soon as the server closes theirs.
//! 3. idle: `--connections` clients each hold a connection that sends nothing, re-opened when
//!    closed.
//! 4. probes: `--probe-clients` clients request `/readyz` and `/metrics` as fast as they are
//!    answered.
//!
//! At the end it prints the connections the daemon shed, by reason (`/metrics`).
//!
//! ```sh
//! cargo bench --bench listener -- [--connections 1500] [--header-kb 380] [--seconds 10] [--probe-clients 50]
//! ```
//! Needs the local PostgreSQL (or DINGSYNC_TEST_DATABASE_URL), and an open-file limit above
//! `--connections` for this program.

use std::{
    collections::BTreeMap,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use dingsync::crypto::{self, CallbackCrypto};
use sqlx::{Connection, PgConnection};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};

const CORP: &str = "dingbenchcorp0000001";

struct Args {
    connections: usize,
    header_kb: usize,
    seconds: u64,
    probe_clients: usize,
}

fn args() -> Args {
    let mut a = Args {
        connections: 1_500,
        header_kb: 380,
        seconds: 10,
        probe_clients: 50,
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
            "--connections" => a.connections = value(),
            "--header-kb" => a.header_kb = value(),
            "--seconds" => a.seconds = value() as u64,
            "--probe-clients" => a.probe_clients = value(),
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

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A memory figure of a process from /proc (Linux), in MiB: `VmRSS` now, `VmHWM` its peak.
fn memory_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|kib| kib.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What the attackers of a phase did.
#[derive(Default)]
struct Attack {
    opened: AtomicU64,
    closed_by_server: AtomicU64,
    connect_errors: AtomicU64,
}

/// Each attacker: open a connection, send `payload` (if any), wait for the server to close it,
/// repeat until `stop`.
fn attackers(
    port: u16,
    n: usize,
    payload: Arc<Vec<u8>>,
    stop: Arc<AtomicBool>,
    attack: Arc<Attack>,
) -> Vec<JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let (payload, stop, attack) = (payload.clone(), stop.clone(), attack.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
                        attack.connect_errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    attack.opened.fetch_add(1, Ordering::Relaxed);
                    // The server stops reading at its header limit: the write then fails.
                    let _ = stream.write_all(&payload).await;
                    let mut buf = [0u8; 1024];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => continue,
                        }
                    }
                    attack.closed_by_server.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect()
}

/// Probe clients: `/readyz` and `/metrics` as fast as they are answered, until `stop`.
fn probers(
    base: &str,
    n: usize,
    stop: Arc<AtomicBool>,
    attack: Arc<Attack>,
) -> Vec<JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let url = format!("{base}/{}", if i % 2 == 0 { "readyz" } else { "metrics" });
            let (stop, attack) = (stop.clone(), attack.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(r) = http.get(&url).send().await {
                        let _ = r.bytes().await;
                        attack.opened.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect()
}

/// Valid signed callbacks, one after another on new connections, until `stop`: their latencies,
/// and the ones that failed by kind (connection closed before the answer, an HTTP status other
/// than 200, no answer in 5 s, connect error).
async fn callbacks(
    base: String,
    cipher: CallbackCrypto,
    phase: &'static str,
    stop: Arc<AtomicBool>,
) -> (Vec<Duration>, BTreeMap<String, usize>) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let (mut latencies, mut failed) = (Vec::new(), BTreeMap::new());
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let pid = format!("bench-{phase}-{n:06}-5d3a-4f7b-8e6c");
        let message = serde_json::json!({
            "EventType": "bpms_instance_change", "processInstanceId": pid, "corpId": CORP,
            "createTime": 1_764_300_000_000_i64, "title": "bench", "type": "start",
            "staffId": "originator1", "processCode": "PROC-BENCH-1",
        })
        .to_string();
        let timestamp = chrono::Utc::now().timestamp_millis().to_string();
        let nonce = crypto::random_nonce(8);
        let sealed = cipher.seal(&message, CORP, &timestamp, &nonce);
        let started = Instant::now();
        let sent = http
            .post(format!("{base}/dingtalk/callback"))
            .query(&[
                ("signature", sealed.signature.as_str()),
                ("timestamp", &timestamp),
                ("nonce", &nonce),
            ])
            .json(&serde_json::json!({ "encrypt": sealed.encrypt }))
            .send()
            .await;
        let failure = match sent {
            Ok(r) if r.status() == 200 => r.bytes().await.err().map(|_| "closed".to_string()),
            Ok(r) => Some(format!("http {}", r.status().as_u16())),
            Err(e) if e.is_timeout() => Some("no answer in 5 s".into()),
            Err(e) if e.is_connect() => Some("connect".into()),
            Err(_) => Some("closed".into()),
        };
        match failure {
            None => latencies.push(started.elapsed()),
            Some(kind) => *failed.entry(kind).or_insert(0) += 1,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    latencies.sort();
    (latencies, failed)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
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
    let daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_dingsync"))
            .arg("serve")
            .arg("--config")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"))
            .env("DINGSYNC_DATABASE_URL", &db_url)
            .env("DINGSYNC_SERVER_LISTEN", format!("127.0.0.1:{port}"))
            .env("DINGSYNC_CALLBACK_TOKEN", &token)
            .env("DINGSYNC_CALLBACK_AES_KEY", &aes_key)
            .env("DINGSYNC_CALLBACK_OWNER_KEY", CORP)
            .env("DINGSYNC_DINGTALK_CORP_ID", CORP)
            // No DingTalk: the daemon only serves callbacks.
            .env("DINGSYNC_DINGTALK_API_BASE", "http://127.0.0.1:9")
            .env("DINGSYNC_LOG_FILTER", "error")
            .stdout(Stdio::null())
            .spawn()
            .expect("start dingsync serve"),
    );
    let pid = daemon.0.id();
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
    let cipher = CallbackCrypto::new(&token, &aes_key).unwrap();
    println!(
        "machine: {} cores; serve with the shipped [server] limits (config.toml); {} s per phase",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        args.seconds
    );

    let mut header = b"POST /dingtalk/callback HTTP/1.1\r\nHost: dingsync\r\nX-Pad: ".to_vec();
    header.extend(std::iter::repeat_n(b'a', args.header_kb * 1024));
    let header = Arc::new(header);
    for phase in ["quiet", "unfinished-headers", "idle", "probes"] {
        let stop = Arc::new(AtomicBool::new(false));
        let attack = Arc::new(Attack::default());
        let rss_before = memory_mib(pid, "VmRSS");
        let tasks = match phase {
            "unfinished-headers" => attackers(
                port,
                args.connections,
                header.clone(),
                stop.clone(),
                attack.clone(),
            ),
            "idle" => attackers(
                port,
                args.connections,
                Arc::new(Vec::new()),
                stop.clone(),
                attack.clone(),
            ),
            "probes" => probers(&base, args.probe_clients, stop.clone(), attack.clone()),
            _ => Vec::new(),
        };
        // DingTalk's sender is not slowed by the attackers: a thread and runtime of its own.
        let pushes = {
            let (base, cipher, stop) = (base.clone(), cipher.clone(), stop.clone());
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(callbacks(base, cipher, phase, stop))
            })
        };
        let ends = Instant::now() + Duration::from_secs(args.seconds);
        let mut rss_peak: f64 = rss_before;
        while Instant::now() < ends {
            rss_peak = rss_peak.max(memory_mib(pid, "VmRSS"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let (latencies, failed) = pushes.join().unwrap();
        for task in tasks {
            task.abort();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_after = memory_mib(pid, "VmRSS");
        let over = latencies
            .iter()
            .filter(|l| **l > Duration::from_millis(1_500))
            .count();
        println!(
            "{phase:>18}: callbacks {} ok, {} failed {failed:?}, {over} over 1500 ms; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
             | RSS {rss_before:.1} MiB before, {rss_peak:.1} MiB peak, {rss_after:.1} MiB after \
             | attack: {} connections (or probes) opened, {} closed by the server, {} connect errors",
            latencies.len(),
            failed.values().sum::<usize>(),
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.99)),
            ms(percentile(&latencies, 1.0)),
            attack.opened.load(Ordering::Relaxed),
            attack.closed_by_server.load(Ordering::Relaxed),
            attack.connect_errors.load(Ordering::Relaxed),
        );
    }
    println!(
        "serve peak RSS over the run (VmHWM): {:.1} MiB",
        memory_mib(pid, "VmHWM")
    );
    if let Ok(page) = http.get(format!("{base}/metrics")).send().await {
        let page = page.text().await.unwrap_or_default();
        for line in page
            .lines()
            .filter(|l| l.starts_with("dingsync_http_connections_shed_total"))
        {
            println!("  {line}");
        }
    }
    drop(daemon);
    if let Ok(mut conn) = PgConnection::connect(&format!("{server}/postgres")).await {
        let _ = sqlx::raw_sql(&format!(
            "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
        ))
        .execute(&mut conn)
        .await;
    }
}
