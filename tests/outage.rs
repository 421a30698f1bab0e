//! PostgreSQL really stopped (a private cluster, `pg_ctl stop -m immediate`) for 30 s while the
//! real `dingsync serve` process takes a continuous stream of callbacks and is creating outbox
//! approvals in DingTalk (the emulator). Proves that every callback answered during
//! the outage is a 503 (never `success` without a commit, never a dropped connection), `/readyz`
//! says 503, the process never exits, it recovers by itself once PostgreSQL is back, and nothing
//! is lost or doubled: every acknowledged event is stored, every event (re-sent as DingTalk
//! would) is stored once, and every outbox row became exactly one approval.
//!
//! `DINGSYNC_TEST_LONG=1` runs the long variant: three outages (30 s, 60 s, 30 s) and more rows.

mod common;

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{pgcluster::PgCluster, *};
use dingsync::{
    callback::EncryptedReply,
    crypto::{self, CallbackCrypto},
};
use dingsync_emulator::{DEFAULT_APP_KEY, DEFAULT_APP_SECRET, Emulator, EmulatorConfig};
use futures::StreamExt;
use sqlx::PgPool;

/// How long after PostgreSQL is back a new push must be acknowledged again.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(20);
/// Concurrent DingTalk-side senders of callbacks.
const SENDERS: usize = 16;

/// How much outage and load a run has.
struct Plan {
    /// Each outage's length, in order.
    outages: Vec<Duration>,
    /// Outbox rows requested just before each outage (the outage hits their creates in flight).
    rows_before: i64,
    /// Outbox rows requested after each recovery.
    rows_after: i64,
    /// Callbacks acknowledged after each recovery before the run moves on.
    acks_after: usize,
}

fn plan() -> Plan {
    if std::env::var("DINGSYNC_TEST_LONG").is_ok_and(|v| v == "1") {
        Plan {
            outages: [30, 60, 30].map(Duration::from_secs).to_vec(),
            rows_before: 500,
            rows_after: 200,
            acks_after: 2_000,
        }
    } else {
        // Short enough for CI: one 30 s outage, under a minute in all.
        Plan {
            outages: vec![Duration::from_secs(30)],
            rows_before: 200,
            rows_after: 100,
            acks_after: 300,
        }
    }
}

/// What became of one push.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    /// HTTP 200 with an encrypted `success` that opens with our token, key and owner key.
    Acked,
    /// Any other HTTP answer: DingTalk would retry.
    Refused(u16),
    /// No HTTP answer at all.
    Dropped(String),
}

struct Sent {
    pid: String,
    sent: Instant,
    answered: Instant,
    answer: Answer,
}

/// The time PostgreSQL was down: from `stop` returning to `restart` being called.
struct Outage {
    down: Instant,
    up: Instant,
}

/// The `dingsync serve` child process; killed when the test ends, panics included.
struct Daemon {
    child: Child,
    stderr: PathBuf,
}

impl Daemon {
    fn assert_running(&mut self, when: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            let tail: String = log.lines().rev().take(30).collect::<Vec<_>>().join("\n");
            panic!(
                "dingsync serve exited {when}: {status}; last stderr lines (newest first):\n{tail}"
            );
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// One distinct event per pid; the same pid always gives the same message, so a re-send is a
/// redelivery that must be stored once.
fn event(pid: &str) -> String {
    instance_event(pid, "start", None, 1_764_000_000_000, None)
}

/// Whether `text` is a valid encrypted `success` (what `assert_success` checks, as a bool).
fn is_success(crypto: &CallbackCrypto, owner_key: &str, text: &str) -> bool {
    let Ok(reply) = serde_json::from_str::<EncryptedReply>(text) else {
        return false;
    };
    crypto
        .open(
            &reply.time_stamp,
            &reply.nonce,
            &reply.encrypt,
            &reply.msg_signature,
            &[owner_key],
        )
        .is_ok_and(|opened| opened.message == "success")
}

async fn push(pusher: &Pusher, pid: &str) -> Sent {
    let sent = Instant::now();
    let answer = match pusher.send(&event(pid)).await {
        Err(e) => Answer::Dropped(e.to_string()),
        Ok(response) => {
            let status = response.status().as_u16();
            match response.text().await {
                Err(e) => Answer::Dropped(format!("HTTP {status}, body lost: {e}")),
                Ok(text)
                    if status == 200 && is_success(&pusher.crypto, &pusher.owner_key, &text) =>
                {
                    Answer::Acked
                }
                Ok(_) => Answer::Refused(status),
            }
        }
    };
    Sent {
        pid: pid.to_string(),
        sent,
        answered: Instant::now(),
        answer,
    }
}

async fn ready_status(http: &reqwest::Client, base: &str) -> Result<u16, String> {
    http.get(format!("{base}/readyz"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

/// Asks for outbox rows `from..=to`: key `outage-N`, form value Reason `outage N` (how the
/// emulator's instances are matched to rows at the end).
async fn request_rows(pool: &PgPool, from: i64, to: i64) {
    sqlx::query(
        "SELECT dingsync.request_approval('outage-' || n, 'PROC-EMU-EXPENSE', 'emp1',
            jsonb_build_array(jsonb_build_object('name', 'Reason', 'value', 'outage ' || n),
                              jsonb_build_object('name', 'Amount', 'value', n)))
         FROM generate_series($1::bigint, $2::bigint) AS n",
    )
    .bind(from)
    .bind(to)
    .execute(pool)
    .await
    .unwrap();
}

async fn wait_for_acks(acked: &AtomicUsize, at_least: usize, what: &str) {
    eventually(Duration::from_secs(30), what, || {
        let n = acked.load(Ordering::Relaxed);
        async move { (n >= at_least).then_some(()) }
    })
    .await
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_thirty_seconds_under_load_gets_503s_and_the_daemon_recovers_losing_nothing()
 {
    let started = Instant::now();
    let plan = plan();
    install_crypto_provider();
    let emulator = Emulator::start(
        EmulatorConfig {
            corp_id: CORP_ID.into(),
            time_scale: 0.01,
            seed: 7,
            ..EmulatorConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    // Creates take a moment, so that the outage finds some of them in flight: answered by
    // DingTalk but not yet recorded (the lost-response search must adopt them, never resend).
    emulator.state().update_faults(|f| f.latency_ms = 50);
    let mut cluster = PgCluster::start();

    let port = free_port();
    let (token, aes_key) = (crypto::random_nonce(32), crypto::random_aes_key());
    let stderr = std::env::temp_dir().join(format!(
        "dingsync-outage-{}-{}.log",
        std::process::id(),
        crypto::random_nonce(6)
    ));
    let child = dingsync_command(&["serve"])
        .env("DINGSYNC_DATABASE_URL", cluster.url())
        .env("DINGSYNC_SERVER_LISTEN", format!("127.0.0.1:{port}"))
        .env("DINGSYNC_CALLBACK_TOKEN", &token)
        .env("DINGSYNC_CALLBACK_AES_KEY", &aes_key)
        .env("DINGSYNC_CALLBACK_OWNER_KEY", CORP_ID)
        .env("DINGSYNC_DINGTALK_API_BASE", emulator.base_url())
        .env("DINGSYNC_DINGTALK_APP_KEY", DEFAULT_APP_KEY)
        .env("DINGSYNC_DINGTALK_APP_SECRET", DEFAULT_APP_SECRET)
        .env("DINGSYNC_DINGTALK_CORP_ID", CORP_ID)
        .env("DINGSYNC_DINGTALK_QPS", "0")
        .env("DINGSYNC_DINGTALK_TIMEOUT_MS", "3000")
        // Leases and searches within seconds (lease >= 2 x timeout, settle <= lease / 2), so
        // that creates cut off by the outage are resolved soon after it; the settle time stays
        // at DingTalk's 3 s gateway bound, as the config asks: a search that starts earlier can
        // miss a create the emulator (on a busy machine) is still processing, and send it again.
        .env("DINGSYNC_OUTBOX_LEASE_MS", "6000")
        .env("DINGSYNC_OUTBOX_LOST_SETTLE_MS", "3000")
        .env("DINGSYNC_OUTBOX_BACKOFF_BASE_MS", "100")
        .env("DINGSYNC_OUTBOX_BACKOFF_MAX_MS", "2000")
        .env("DINGSYNC_OUTBOX_POLL_MS", "200")
        // Every job runs every few seconds, so that each meets the outage too.
        .env("DINGSYNC_RECONCILE_PROCESS_CODES", "PROC-EMU-EXPENSE")
        .env("DINGSYNC_SCHEDULER_DETAILS", "*/1 * * * * *")
        .env("DINGSYNC_SCHEDULER_FAILED", "*/2 * * * * *")
        .env("DINGSYNC_SCHEDULER_SWEEP", "*/3 * * * * *")
        .env("DINGSYNC_SCHEDULER_BACKFILL", "*/5 * * * * *")
        .env("DINGSYNC_SCHEDULER_RETENTION", "*/5 * * * * *")
        .env("DINGSYNC_LOG_FILTER", "warn")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = Daemon { child, stderr };
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    eventually(Duration::from_secs(30), "the daemon ready", || {
        daemon.assert_running("while starting");
        async { (ready_status(&http, &base).await == Ok(200)).then_some(()) }
    })
    .await;
    let mut pool = PgPool::connect(&cluster.url()).await.unwrap();

    // 16 senders push distinct events until told to stop, and log every answer.
    let pusher = Pusher::new(
        &base,
        CallbackCrypto::new(&token, &aes_key).unwrap(),
        CORP_ID,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            let (pusher, stop, acked) = (pusher.clone(), stop.clone(), acked.clone());
            tokio::spawn(async move {
                let mut log = Vec::new();
                for n in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let sent = push(&pusher, &format!("ev-{s}-{n}")).await;
                    let refused = sent.answer != Answer::Acked;
                    if !refused {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    log.push(sent);
                    if refused {
                        // Pacing, not synchronisation: DingTalk waits 10 s before a retry;
                        // a refused sender pausing here keeps the outage from being a busy
                        // loop of instant 503s.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                log
            })
        })
        .collect();
    wait_for_acks(&acked, 200, "callbacks flowing before the outage").await;

    let mut requested = 0;
    let mut outages = Vec::new();
    let mut probes = Vec::new();
    let mut recoveries = Vec::new();
    for (round, &hold) in plan.outages.iter().enumerate() {
        let created_before = count(
            &pool,
            "SELECT count(*) FROM dingsync.outbox WHERE state = 'created'",
        )
        .await;
        request_rows(&pool, requested + 1, requested + plan.rows_before).await;
        requested += plan.rows_before;
        // Stop once creates are under way: some rows done, some in flight, most still pending.
        eventually(Duration::from_secs(30), "the first creates", || {
            let pool = &pool;
            async move {
                let created = count(
                    pool,
                    "SELECT count(*) FROM dingsync.outbox WHERE state = 'created'",
                )
                .await;
                (created >= created_before + 20).then_some(())
            }
        })
        .await;
        let unresolved = count(
            &pool,
            "SELECT count(*) FROM dingsync.outbox WHERE state <> 'created'",
        )
        .await;
        pool.close().await;

        tokio::task::block_in_place(|| cluster.stop());
        let down = Instant::now();
        println!(
            "outage {}: PostgreSQL stopped for {hold:?} with {unresolved} outbox rows unresolved",
            round + 1
        );
        // Hold the outage, checking every second that the daemon lives and is not ready.
        // `/readyz` answers from a reading of the database at most a second old, so a reading
        // taken just before the stop may still say ready for that second.
        let mut readyz_checks = 0;
        while down.elapsed() < hold {
            daemon.assert_running("during the outage");
            let status = ready_status(&http, &base).await;
            if down.elapsed() > Duration::from_millis(1_500) {
                assert_eq!(status, Ok(503), "/readyz while PostgreSQL is down");
                readyz_checks += 1;
            }
            tokio::time::sleep(
                hold.saturating_sub(down.elapsed())
                    .min(Duration::from_secs(1)),
            )
            .await;
        }
        assert!(readyz_checks >= 9, "only {readyz_checks} /readyz checks");
        let up = Instant::now();
        tokio::task::block_in_place(|| cluster.restart());
        let restarted = Instant::now();
        outages.push(Outage { down, up });
        daemon.assert_running("right after PostgreSQL restarted");

        // Nothing is done to the daemon: new pushes must be acknowledged again by themselves.
        let recovery = loop {
            let sent = push(&pusher, &format!("probe-{round}-{}", probes.len())).await;
            let ok = sent.answer == Answer::Acked;
            probes.push(sent);
            if ok {
                break restarted.elapsed();
            }
            assert!(
                restarted.elapsed() < RECOVERY_DEADLINE,
                "no new push acknowledged within {RECOVERY_DEADLINE:?} of PostgreSQL's restart; last answer {:?}",
                probes.last().map(|p| &p.answer)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        println!(
            "outage {}: a new push was acknowledged {recovery:?} after PostgreSQL was back",
            round + 1
        );
        recoveries.push(recovery);
        eventually(
            RECOVERY_DEADLINE,
            "/readyz 200 after the restart",
            || async { (ready_status(&http, &base).await == Ok(200)).then_some(()) },
        )
        .await;
        daemon.assert_running("after recovering");

        pool = PgPool::connect(&cluster.url()).await.unwrap();
        request_rows(&pool, requested + 1, requested + plan.rows_after).await;
        requested += plan.rows_after;
        let at_recovery = acked.load(Ordering::Relaxed);
        wait_for_acks(
            &acked,
            at_recovery + plan.acks_after,
            "callbacks acknowledged after recovery",
        )
        .await;
    }

    stop.store(true, Ordering::Relaxed);
    let mut log = probes;
    for sender in senders {
        let sent = tokio::time::timeout(Duration::from_secs(30), sender)
            .await
            .expect("a sender got no answer within 30 s")
            .unwrap();
        log.extend(sent);
    }
    daemon.assert_running("after the load");

    // Every answer was an HTTP answer, and every push made and answered while PostgreSQL was
    // down got 503 (one answered after the restart may have been stored and acknowledged).
    let dropped: Vec<_> = log
        .iter()
        .filter_map(|s| match &s.answer {
            Answer::Dropped(why) => Some((&s.pid, why)),
            _ => None,
        })
        .collect();
    assert!(
        dropped.is_empty(),
        "{} pushes got no HTTP answer, e.g. {:?}",
        dropped.len(),
        &dropped[..dropped.len().min(5)]
    );
    let mut refusal_times = Vec::new();
    for outage in &outages {
        for s in log
            .iter()
            .filter(|s| s.sent >= outage.down && s.answered < outage.up)
        {
            assert_eq!(
                s.answer,
                Answer::Refused(503),
                "push {} during the outage",
                s.pid
            );
            refusal_times.push(s.answered - s.sent);
        }
    }
    let refused_in_outage = refusal_times.len();
    assert!(
        refused_in_outage >= SENDERS * outages.len(),
        "only {refused_in_outage} pushes were answered during the outages"
    );
    refusal_times.sort();
    // DingTalk waits 1.5 s for an answer: while the database is known to be down, callbacks are
    // refused at once (one at a time waits for a connection, to notice the database is back).
    let median = refusal_times[refused_in_outage / 2];
    assert!(
        median < Duration::from_millis(1_500),
        "the median 503 took {median:?}, longer than DingTalk waits"
    );

    // No acknowledged event is missing: checked before the re-sends, which would store it anew.
    let stored: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT process_instance_id, count(*) FROM dingsync.events GROUP BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let acked_missing: Vec<&str> = log
        .iter()
        .filter(|s| s.answer == Answer::Acked && !stored.contains_key(&s.pid))
        .map(|s| s.pid.as_str())
        .collect();
    assert!(
        acked_missing.is_empty(),
        "{} acknowledged events are not stored, e.g. {:?}",
        acked_missing.len(),
        &acked_missing[..acked_missing.len().min(5)]
    );

    // DingTalk retries what was not acknowledged; now every retry is acknowledged.
    let unacked: Vec<String> = log
        .iter()
        .filter(|s| s.answer != Answer::Acked)
        .map(|s| s.pid.clone())
        .collect();
    let resent = futures::stream::iter(unacked.iter())
        .map(|pid| {
            let pusher = &pusher;
            async move {
                eventually(
                    Duration::from_secs(20),
                    &format!("the re-sent {pid} acknowledged"),
                    || async { (push(pusher, pid).await.answer == Answer::Acked).then_some(()) },
                )
                .await
            }
        })
        .buffer_unordered(SENDERS)
        .count()
        .await;
    assert_eq!(resent, unacked.len());

    // dingsync.events holds exactly the events sent, each once.
    let sent: HashSet<&str> = log.iter().map(|s| s.pid.as_str()).collect();
    let stored: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT process_instance_id, count(*) FROM dingsync.events GROUP BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let missing: Vec<&&str> = sent.iter().filter(|p| !stored.contains_key(**p)).collect();
    assert!(missing.is_empty(), "events never stored: {missing:?}");
    let unexpected: Vec<_> = stored
        .iter()
        .filter(|(pid, n)| **n != 1 || !sent.contains(pid.as_str()))
        .collect();
    assert!(
        unexpected.is_empty(),
        "events stored twice or never sent: {unexpected:?}"
    );

    // Every outbox row is created, each as exactly one DingTalk instance, and nothing more.
    eventually(Duration::from_secs(60), "every outbox row created", || {
        let pool = &pool;
        async move {
            let states: Vec<(String, i64, Option<String>)> = sqlx::query_as(
                "SELECT state, count(*), max(last_error) FROM dingsync.outbox GROUP BY state",
            )
            .fetch_all(pool)
            .await
            .unwrap();
            if let Some((_, n, why)) = states.iter().find(|(state, ..)| state == "failed") {
                panic!("{n} outbox rows failed, e.g. {why:?}");
            }
            (states.len() == 1 && states[0].0 == "created").then_some(())
        }
    })
    .await;
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT idempotency_key, process_instance_id FROM dingsync.outbox ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len() as i64, requested);
    let mut by_reason: HashMap<String, Vec<String>> = HashMap::new();
    for instance in emulator.state().instances() {
        for value in &instance.form_component_values {
            if value.name == "Reason" {
                by_reason
                    .entry(value.value.clone())
                    .or_default()
                    .push(instance.process_instance_id.clone());
            }
        }
    }
    for (key, instance_id) in &rows {
        let reason = key.replace("outage-", "outage ");
        assert_eq!(
            by_reason.get(&reason),
            Some(&vec![instance_id.clone()]),
            "DingTalk's instances for outbox row {key}"
        );
    }
    assert_eq!(
        by_reason.len(),
        rows.len(),
        "DingTalk holds instances of no other request"
    );

    daemon.assert_running("at the end");
    let log_text = std::fs::read_to_string(&daemon.stderr).unwrap();
    assert!(
        !log_text.contains("panicked"),
        "the daemon panicked:\n{log_text}"
    );
    println!(
        "{} events sent, {} acknowledged at once, {refused_in_outage} answered 503 during {} outage(s) (median {:?}, slowest {:?}), {} re-sent; {requested} outbox rows created once each; recovery {recoveries:?}; run took {:?}",
        sent.len(),
        log.len() - unacked.len(),
        outages.len(),
        refusal_times[refused_in_outage / 2],
        refusal_times[refused_in_outage - 1],
        unacked.len(),
        started.elapsed()
    );
    pool.close().await;
}
