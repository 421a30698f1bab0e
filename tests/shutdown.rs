//! SIGTERM to the real `dingsync serve` process while callbacks pour in and outbox rows are being
//! created: it exits by itself, every acknowledged event is stored, and no outbox row is left
//! `sending`.

mod common;

use std::{
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use dingsync::{callback::EncryptedReply, crypto};
use dingsync_emulator::{DEFAULT_APP_KEY, DEFAULT_APP_SECRET, Emulator, EmulatorConfig};
use sqlx::PgPool;

#[tokio::test]
async fn sigterm_during_a_callback_burst_loses_no_acknowledged_event_and_leaves_no_row_sending() {
    install_crypto_provider();
    let db = TestDb::new();
    let port = free_port();
    // DingTalk lives in the test process: the daemon is configured as for a real organisation
    // (its own callback secrets, which the test pushes with), so it cannot embed the emulator.
    let emulator = Emulator::start(
        EmulatorConfig {
            time_scale: 0.01,
            ..EmulatorConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let (token, aes_key) = (crypto::random_nonce(32), crypto::random_aes_key());
    let mut daemon = dingsync_command(&["serve"])
        .env("DINGSYNC_DATABASE_URL", &db.url)
        .env("DINGSYNC_SERVER_LISTEN", format!("127.0.0.1:{port}"))
        .env("DINGSYNC_CALLBACK_TOKEN", &token)
        .env("DINGSYNC_CALLBACK_AES_KEY", &aes_key)
        .env("DINGSYNC_CALLBACK_OWNER_KEY", CORP_ID)
        .env("DINGSYNC_DINGTALK_API_BASE", emulator.base_url())
        .env("DINGSYNC_DINGTALK_APP_KEY", DEFAULT_APP_KEY)
        .env("DINGSYNC_DINGTALK_APP_SECRET", DEFAULT_APP_SECRET)
        .env("DINGSYNC_DINGTALK_CORP_ID", CORP_ID)
        .env("DINGSYNC_LOG_FILTER", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), "the daemon ready", || async {
        let ready = http.get(format!("{base}/readyz")).send().await;
        ready.ok().filter(|r| r.status() == 200).map(|_| ())
    })
    .await;
    let pool = PgPool::connect(&db.url).await.unwrap();
    sqlx::query(
        "SELECT dingsync.request_approval('term-' || n, 'PROC-EMU-EXPENSE', 'emp1',
            jsonb_build_array(jsonb_build_object('name', 'Reason', 'value', 'term ' || n),
                              jsonb_build_object('name', 'Amount', 'value', n)))
         FROM generate_series(1, 300) AS n",
    )
    .execute(&pool)
    .await
    .unwrap();

    // 16 senders push distinct events until the daemon stops answering.
    let crypto = dingsync::crypto::CallbackCrypto::new(&token, &aes_key).unwrap();
    let pusher = Pusher::new(&base, crypto.clone(), CORP_ID);
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..16)
        .map(|s| {
            let (pusher, stop, crypto) = (pusher.clone(), stop.clone(), crypto.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let pid = format!("term-{s}-{n}");
                    let message = instance_event(&pid, "start", None, 1_764_000_000_000, None);
                    let Ok(response) = pusher.send(&message).await else {
                        break;
                    };
                    if response.status() != 200 {
                        continue;
                    }
                    let Ok(reply) = response.json::<EncryptedReply>().await else {
                        continue;
                    };
                    if crypto
                        .open(
                            &reply.time_stamp,
                            &reply.nonce,
                            &reply.encrypt,
                            &reply.msg_signature,
                            &[CORP_ID],
                        )
                        .is_ok_and(|o| o.message == "success")
                    {
                        acked.push(pid);
                    }
                }
                acked
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let term = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "serve exited with {status}");
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for sender in senders {
        acked.extend(sender.await.unwrap());
    }
    assert!(
        acked.len() > 10,
        "only {} events were acknowledged",
        acked.len()
    );

    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dingsync.events WHERE process_instance_id = ANY($1)",
    )
    .bind(&acked)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        stored as usize,
        acked.len(),
        "every acknowledged event is stored"
    );
    let sending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dingsync.outbox WHERE state = 'sending'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(sending, 0, "no outbox row left sending");
    pool.close().await;
    emulator.stop().await;
}
