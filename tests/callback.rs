//! POST /dingtalk/callback against a real daemon and a fresh database per test.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use dingsync::crypto::{self, CallbackCrypto};
use sqlx::postgres::PgListener;

const T0: i64 = 1_764_300_000_000; // 2025-11-28T03:20:00Z

fn ts(ms: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp_millis(ms)
}

#[tokio::test]
async fn start_then_task_finish_then_instance_finish_ends_completed_agree_with_its_task() {
    let app = TestApp::spawn().await;
    app.push_ok(&instance_event("pid-1", "start", None, T0, None))
        .await;
    app.push_ok(&task_event("pid-1", 101, "start", None, T0 + 1_000, None))
        .await;
    assert_eq!(app.task(101).await.status, "RUNNING");
    app.push_ok(&task_event(
        "pid-1",
        101,
        "finish",
        Some("agree"),
        T0 + 1_000,
        Some(T0 + 60_000),
    ))
    .await;
    app.push_ok(&instance_event(
        "pid-1",
        "finish",
        Some("agree"),
        T0,
        Some(T0 + 61_000),
    ))
    .await;

    let a = app.approval("pid-1").await;
    assert_eq!(
        (a.status.as_str(), a.result.as_deref()),
        ("COMPLETED", Some("agree"))
    );
    assert_eq!(a.title.as_deref(), Some("张三提交的报销"));
    assert_eq!(a.originator_userid.as_deref(), Some("originator1"));
    assert_eq!(a.created_at, ts(T0));
    assert_eq!(a.finished_at, ts(T0 + 61_000));
    assert!(a.wanted, "an event marks the approval for a detail fetch");
    let t = app.task(101).await;
    assert_eq!(
        t,
        TaskRow {
            status: "COMPLETED".into(),
            result: Some("AGREE".into()),
            userid: Some("approver1".into()),
            remark: Some("同意 ✅".into()),
            finished_at: ts(T0 + 60_000),
        }
    );
    assert_eq!(app.counts().await, (4, 1, 1));
    app.stop().await;
}

#[tokio::test]
async fn the_same_event_delivered_twice_re_encrypted_is_stored_once() {
    let app = TestApp::spawn().await;
    let event = instance_event("pid-dup", "start", None, T0, None);
    let first = app.crypto.encrypt(&event, &app.owner_key);
    app.push_ok(&event).await;
    app.push_ok(&event).await; // new random prefix: different ciphertext, same event
    let second = app.crypto.encrypt(&event, &app.owner_key);
    assert_ne!(first, second);
    let before = app.approval("pid-dup").await;
    app.push_ok(&event).await;
    assert_eq!(app.counts().await, (1, 1, 0));
    let updated_at = |app: &TestApp| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
                "SELECT updated_at FROM dingsync.approvals",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let stamp = updated_at(&app).await;
    app.push_ok(&event).await;
    assert_eq!(updated_at(&app).await, stamp, "a duplicate changes nothing");
    assert_eq!(app.approval("pid-dup").await, before);
    app.stop().await;
}

#[tokio::test]
async fn finish_before_start_ends_finished() {
    let app = TestApp::spawn().await;
    app.push_ok(&instance_event(
        "pid-late",
        "finish",
        Some("agree"),
        T0,
        Some(T0 + 5_000),
    ))
    .await;
    app.push_ok(&task_event(
        "pid-late",
        7,
        "finish",
        Some("agree"),
        T0,
        Some(T0 + 4_000),
    ))
    .await;
    app.push_ok(&task_event("pid-late", 7, "start", None, T0, None))
        .await;
    app.push_ok(&instance_event("pid-late", "start", None, T0, None))
        .await;
    let a = app.approval("pid-late").await;
    assert_eq!(
        (a.status.as_str(), a.result.as_deref(), a.finished_at),
        ("COMPLETED", Some("agree"), ts(T0 + 5_000))
    );
    let t = app.task(7).await;
    assert_eq!(
        (t.status.as_str(), t.result.as_deref()),
        ("COMPLETED", Some("AGREE"))
    );
    app.stop().await;
}

#[tokio::test]
async fn terminate_ends_terminated_without_result_and_refuse_ends_completed_refuse() {
    let app = TestApp::spawn().await;
    app.push_ok(&instance_event("pid-t", "start", None, T0, None))
        .await;
    app.push_ok(&task_event("pid-t", 8, "start", None, T0, None))
        .await;
    app.push_ok(&instance_event(
        "pid-t",
        "terminate",
        None,
        T0,
        Some(T0 + 9_000),
    ))
    .await;
    app.push_ok(&task_event(
        "pid-t",
        8,
        "cancel",
        None,
        T0,
        Some(T0 + 9_000),
    ))
    .await;
    let a = app.approval("pid-t").await;
    assert_eq!(
        (a.status.as_str(), a.result, a.finished_at),
        ("TERMINATED", None, ts(T0 + 9_000))
    );
    assert_eq!(app.task(8).await.status, "CANCELED");

    app.push_ok(&instance_event("pid-r", "start", None, T0, None))
        .await;
    app.push_ok(&task_event(
        "pid-r",
        9,
        "finish",
        Some("refuse"),
        T0,
        Some(T0 + 3_000),
    ))
    .await;
    app.push_ok(&instance_event(
        "pid-r",
        "finish",
        Some("refuse"),
        T0,
        Some(T0 + 3_000),
    ))
    .await;
    let a = app.approval("pid-r").await;
    assert_eq!(
        (a.status.as_str(), a.result.as_deref()),
        ("COMPLETED", Some("refuse"))
    );
    assert_eq!(app.task(9).await.result.as_deref(), Some("REFUSE"));
    // A late terminate cannot overwrite a finish: terminal states do not move.
    app.push_ok(&instance_event(
        "pid-r",
        "terminate",
        None,
        T0,
        Some(T0 + 9_000),
    ))
    .await;
    assert_eq!(app.approval("pid-r").await.status, "COMPLETED");
    app.stop().await;
}

#[tokio::test]
async fn check_url_is_answered_with_encrypted_success_and_stores_nothing() {
    let app = TestApp::spawn().await;
    app.push_ok(r#"{"EventType":"check_url"}"#).await;
    assert_eq!(app.counts().await, (0, 0, 0));
    app.stop().await;
}

#[tokio::test]
async fn unknown_event_types_are_stored_and_acknowledged() {
    let app = TestApp::spawn().await;
    // An organisation this database serves besides the configured one (added while running).
    sqlx::query("INSERT INTO dingsync.corps (corp_id) VALUES ('dingothercorp')")
        .execute(&app.pool)
        .await
        .unwrap();
    app.push_ok(r#"{"EventType":"user_add_org","TimeStamp":"1764300000000","UserId":["u1"],"CorpId":"dingothercorp"}"#).await;
    let (corp, kind): (String, String) =
        sqlx::query_as("SELECT corp_id, event_type FROM dingsync.events")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        (corp.as_str(), kind.as_str()),
        ("dingothercorp", "user_add_org")
    );
    assert_eq!(app.counts().await, (1, 0, 0));
    app.stop().await;
}

#[tokio::test]
async fn the_raw_message_and_its_parsed_payload_are_both_kept() {
    let app = TestApp::spawn().await;
    let event = instance_event("pid-raw", "start", None, T0, None);
    app.push_ok(&event).await;
    let (raw, title, source): (String, String, String) =
        sqlx::query_as("SELECT raw, payload->>'title', source FROM dingsync.events")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(raw, event);
    assert_eq!(title, "张三提交的报销");
    assert_eq!(source, "http_push");
    app.stop().await;
}

/// Every kind of bad input: a clear status, no row written, and the daemon keeps serving.
#[tokio::test]
async fn bad_input_gets_a_clear_status_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let event = instance_event("pid-bad", "start", None, T0, None);
    let (timestamp, nonce) = ("1764300000000", "n0nce123");
    let sealed = app.crypto.seal(&event, &app.owner_key, timestamp, nonce);
    let body = |encrypt: &str| serde_json::json!({ "encrypt": encrypt }).to_string();
    let query = |sig: &str| {
        vec![
            ("signature", sig.to_string()),
            ("timestamp", timestamp.into()),
            ("nonce", nonce.into()),
        ]
    };
    let post = |q: Vec<(&'static str, String)>, b: String| {
        let app = &app;
        async move {
            let q: Vec<(&str, &str)> = q.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = app.post_raw(&q, b).await;
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    };

    // Wrong signature: 403.
    let mut wrong = sealed.signature.clone();
    wrong.replace_range(0..1, if wrong.starts_with('0') { "1" } else { "0" });
    assert_eq!(post(query(&wrong), body(&sealed.encrypt)).await.0, 403);
    // Signed with another token: 403.
    let other_token = CallbackCrypto::new("othertoken", app.crypto_key()).unwrap();
    let sig = other_token.signature(timestamp, nonce, &sealed.encrypt);
    assert_eq!(post(query(&sig), body(&sealed.encrypt)).await.0, 403);
    // Encrypted with another AES key (correctly signed): 400.
    let other_key = CallbackCrypto::new(app.token(), &crypto::random_aes_key()).unwrap();
    let foreign = other_key.seal(&event, &app.owner_key, timestamp, nonce);
    assert_eq!(
        post(query(&foreign.signature), body(&foreign.encrypt))
            .await
            .0,
        400
    );
    // Another owner key: 400, and the body does not echo it.
    let other_owner = app.crypto.seal(&event, "dingsomeoneelse", timestamp, nonce);
    let (status, text) = post(query(&other_owner.signature), body(&other_owner.encrypt)).await;
    assert_eq!(status, 400);
    assert!(!text.contains("dingsomeoneelse"), "{text}");
    // Corrupt ciphertext (valid base64, signed): 400.
    let corrupt = format!("{}AAAA", &sealed.encrypt[..sealed.encrypt.len() - 4]);
    let sig = app.crypto.signature(timestamp, nonce, &corrupt);
    assert_eq!(post(query(&sig), body(&corrupt)).await.0, 400);
    // Not base64: 400.
    let sig = app.crypto.signature(timestamp, nonce, "***");
    assert_eq!(post(query(&sig), body("***")).await.0, 400);
    // Body is not JSON / has no encrypt: 400.
    assert_eq!(
        post(query(&sealed.signature), "not json".into()).await.0,
        400
    );
    assert_eq!(
        post(query(&sealed.signature), r#"{"other":1}"#.into())
            .await
            .0,
        400
    );
    // Missing query parameters: 400.
    assert_eq!(post(vec![], body(&sealed.encrypt)).await.0, 400);
    // Decrypts fine but the message is not JSON, or not an event: 400.
    for message in [
        "this is not json",
        "[1,2]",
        r#"{"no":"type"}"#,
        r#"{"EventType":"bpms_instance_change"}"#,
    ] {
        let s = app.crypto.seal(message, &app.owner_key, timestamp, nonce);
        let (status, text) = post(query(&s.signature), body(&s.encrypt)).await;
        assert_eq!(status, 400, "{message}: {text}");
    }
    // Over 64 KiB: 413.
    let huge = app
        .crypto
        .seal(&"x".repeat(70_000), &app.owner_key, timestamp, nonce);
    assert_eq!(
        post(query(&huge.signature), body(&huge.encrypt)).await.0,
        413
    );

    assert_eq!(app.counts().await, (0, 0, 0), "bad input wrote a row");
    // Still serving.
    app.push_ok(&event).await;
    assert_eq!(app.counts().await, (1, 1, 0));
    app.stop().await;
}

#[tokio::test]
async fn older_query_names_msg_signature_and_time_stamp_are_accepted() {
    let app = TestApp::spawn().await;
    let event = instance_event("pid-old", "start", None, T0, None);
    let sealed = app
        .crypto
        .seal(&event, &app.owner_key, "1764300000", "abcdefgh");
    let response = app
        .post_raw(
            &[
                ("msg_signature", sealed.signature.as_str()),
                ("timeStamp", "1764300000"),
                ("nonce", "abcdefgh"),
            ],
            serde_json::json!({ "encrypt": sealed.encrypt }).to_string(),
        )
        .await;
    assert_success(&app.crypto, &app.owner_key, response).await;
    assert_eq!(app.counts().await, (1, 1, 0));
    app.stop().await;
}

#[tokio::test]
async fn any_configured_owner_key_is_accepted_and_the_reply_uses_the_one_received() {
    let app = TestApp::spawn_with(|c| {
        c.callback.owner_key = vec![CORP_ID.into(), "dingappkey123".into()]
    })
    .await;
    let event = instance_event("pid-appkey", "start", None, T0, None);
    let response = app.push_with(&app.crypto, "dingappkey123", &event).await;
    assert_success(&app.crypto, "dingappkey123", response).await;
    assert_eq!(app.counts().await, (1, 1, 0));
    app.stop().await;
}

#[tokio::test]
async fn a_change_is_notified_on_dingsync_approval_changed() {
    let app = TestApp::spawn().await;
    let mut listener = PgListener::connect(&app.db.url).await.unwrap();
    listener.listen("dingsync_approval_changed").await.unwrap();
    app.push_ok(&instance_event("pid-notify", "start", None, T0, None))
        .await;
    let n = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("notified in time")
        .unwrap();
    assert_eq!(n.payload(), "pid-notify");
    app.stop().await;
}

/// Many concurrent callbacks share transactions (group commit); each is acknowledged only after
/// its own commit, and every acknowledged event is in the database.
#[tokio::test]
async fn concurrent_callbacks_are_all_stored_and_applied() {
    let app = TestApp::spawn_with(|c| {
        c.ingest.max_batch = 32;
        c.ingest.committers = 2;
    })
    .await;
    let messages = (0..300).map(|i| {
        if i % 3 == 0 {
            task_event(&format!("pid-c{}", i / 3), i, "start", None, T0, None)
        } else {
            instance_event(
                &format!("pid-c{}", i / 3),
                if i % 3 == 1 { "start" } else { "finish" },
                Some("agree"),
                T0,
                Some(T0 + 1),
            )
        }
    });
    push_all_at_once(&app, messages).await;
    assert_eq!(app.counts().await, (300, 100, 100));
    assert_eq!(completed_agree(&app).await, 100);
    app.stop().await;
}

/// Pushes every message concurrently and asserts each got a valid encrypted `success`.
async fn push_all_at_once(app: &TestApp, messages: impl Iterator<Item = String>) {
    let mut handles = Vec::new();
    for message in messages {
        let pusher = app.pusher();
        handles.push(tokio::spawn(async move {
            let r = pusher.send(&message).await.unwrap();
            assert_success(&pusher.crypto, &pusher.owner_key, r).await;
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
}

async fn completed_agree(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM dingsync.approvals WHERE status = 'COMPLETED' AND result = 'agree'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// Batches are first written as if all their events were new; redeliveries mixed into a burst of
/// new events make that fail, and the batch is written again skipping them: each event is stored
/// once and every new one is applied.
#[tokio::test]
async fn redeliveries_mixed_into_a_burst_are_stored_once_and_the_rest_applied() {
    let app = TestApp::spawn_with(|c| c.ingest.max_batch = 16).await;
    let start = |i: usize| instance_event(&format!("pid-m{i}"), "start", None, T0, None);
    for i in 0..40 {
        app.push_ok(&start(i)).await;
    }
    let messages = (0..80).map(|i| {
        if i % 2 == 0 {
            start(i / 2)
        } else {
            instance_event(
                &format!("pid-m{}", i / 2),
                "finish",
                Some("agree"),
                T0,
                Some(T0 + 1),
            )
        }
    });
    push_all_at_once(&app, messages).await;
    assert_eq!(app.counts().await, (80, 40, 0));
    assert_eq!(completed_agree(&app).await, 40);
    app.stop().await;
}

/// The database goes away mid-traffic: callbacks get 503 (never `success` without a commit), the
/// daemon keeps running, and once the database is back the redelivered event is stored once.
#[tokio::test]
async fn database_down_gives_503_without_success_and_the_daemon_recovers() {
    let upstream: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = proxy::Proxy::start(upstream).await;
    let db = TestDb::new();
    // Create and migrate through the direct URL; the daemon then talks through the proxy.
    dingsync::store::connect_and_migrate(&test_config(&db.url).database)
        .await
        .unwrap()
        .close()
        .await;
    let via_proxy = db.url.replace("127.0.0.1:5432", &proxy.addr.to_string());
    let app = TestApp::spawn_on(db, |c| {
        c.database.url = dingsync::config::Secret::new(via_proxy)
    })
    .await;
    app.push_ok(&instance_event("pid-before", "start", None, T0, None))
        .await;

    proxy.cut().await;
    let event = instance_event("pid-outage", "start", None, T0, None);
    for _ in 0..3 {
        let response = app.push(&event).await;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert_eq!(status, 503, "{text}");
        assert!(
            !text.contains("encrypt"),
            "no success without a commit: {text}"
        );
    }
    // A burst during the outage: every callback gets its 503 promptly (a batch is not retried
    // event by event while the database is unreachable), none gets success.
    let started = std::time::Instant::now();
    let burst: Vec<_> = (0..50)
        .map(|i| {
            let pusher = app.pusher();
            tokio::spawn(async move {
                let message = instance_event(&format!("pid-burst{i}"), "start", None, T0, None);
                pusher.send(&message).await.unwrap().status().as_u16()
            })
        })
        .collect();
    for handle in burst {
        assert_eq!(handle.await.unwrap(), 503);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the burst took {:?} to be refused",
        started.elapsed()
    );
    assert_eq!(
        app.count("events").await,
        1,
        "nothing was written during the outage"
    );
    let health = app
        .http
        .get(format!("{}/healthz", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "the daemon is still alive");
    let ready = app
        .http
        .get(format!("{}/readyz", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);

    proxy.restore().await;
    // DingTalk retries; the first retries may still meet dead pooled connections.
    eventually(
        Duration::from_secs(15),
        "the daemon to store the event again",
        || {
            let app = &app;
            let event = &event;
            async move { (app.push(event).await.status() == 200).then_some(()) }
        },
    )
    .await;
    app.push_ok(&event).await;
    assert_eq!(app.counts().await, (2, 2, 0));
    app.stop().await;
}

/// Shutdown during a burst: the server stops accepting, finishes the callbacks in flight and
/// their commits; every callback that got `success` is in the database.
#[tokio::test]
async fn shutdown_during_a_burst_loses_no_acknowledged_event() {
    let mut app = TestApp::spawn().await;
    let mut handles = Vec::new();
    for i in 0..400 {
        let message = instance_event(&format!("pid-s{i}"), "start", None, T0, None);
        let pusher = app.pusher();
        handles.push(tokio::spawn(async move {
            let sent = pusher.send(&message).await;
            let Ok(r) = sent else { return None };
            let ok = r.status() == 200 && r.text().await.is_ok_and(|t| t.contains("msg_signature"));
            ok.then_some(format!("pid-s{i}"))
        }));
    }
    // Stop while the burst is under way: once the first events are committed.
    eventually(
        Duration::from_secs(10),
        "the first events to commit",
        || {
            let app = &app;
            async move { (app.count("events").await >= 20).then_some(()) }
        },
    )
    .await;
    app.app.take().unwrap().stop().await.unwrap();
    let mut acked = Vec::new();
    for h in handles {
        if let Some(pid) = h.await.unwrap() {
            acked.push(pid);
        }
    }
    let stored: Vec<String> = sqlx::query_scalar("SELECT process_instance_id FROM dingsync.events")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    for pid in &acked {
        assert!(
            stored.contains(pid),
            "{pid} was acknowledged but is not stored"
        );
    }
    assert!(
        !acked.is_empty(),
        "some callbacks were acknowledged before the shutdown"
    );
    app.stop().await;
}

/// An event that says nothing about the status (`delete`, or a type dingsync does not know that
/// names an approval) is stored and marks the approval, without changing what the row says.
#[tokio::test]
async fn an_instance_delete_event_is_stored_and_only_marks_the_approval() {
    let app = TestApp::spawn().await;
    app.push_ok(&instance_event("pid-del", "start", None, T0, None))
        .await;
    let before: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT last_event_at FROM dingsync.approvals")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    app.push_ok(&instance_event("pid-del", "delete", None, T0, None))
        .await;
    let (status, last_event_at): (String, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT status, last_event_at FROM dingsync.approvals")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(status, "RUNNING");
    assert!(
        last_event_at > before,
        "the delete event was recorded on the row"
    );
    assert_eq!(app.counts().await, (2, 1, 0));
    // A delete for an approval dingsync has never seen is stored; no row is invented.
    app.push_ok(&instance_event("pid-unknown", "delete", None, T0, None))
        .await;
    assert_eq!(app.counts().await, (3, 1, 0));
    app.stop().await;
}

/// Status and body of a push.
async fn push_status(app: &TestApp, message: &str) -> (u16, String) {
    let response = app.push(message).await;
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

async fn event_keys(app: &TestApp) -> i64 {
    app.count("event_keys").await
}

#[tokio::test]
async fn an_event_naming_an_organisation_not_served_here_is_refused_and_nothing_is_stored() {
    let app = TestApp::spawn().await;
    let foreign = instance_event("pid-foreign", "start", None, T0, None)
        .replace(CORP_ID, "dingforeigncorp00001");
    for message in [
        foreign.clone(),
        r#"{"EventType":"user_add_org","UserId":["u1"],"CorpId":"dingforeigncorp00001"}"#.into(),
    ] {
        let (status, body) = push_status(&app, &message).await;
        assert_eq!(status, 403, "{body}");
        assert!(
            body.contains("corpId is not an organisation served here"),
            "{body}"
        );
        assert!(
            !body.contains("dingforeigncorp"),
            "the body does not echo it: {body}"
        );
    }
    assert_eq!(app.counts().await, (0, 0, 0));
    assert_eq!(event_keys(&app).await, 0);
    // Envelope fields that disagree on the organisation: refused as malformed.
    let both = instance_event("pid-both", "start", None, T0, None).replacen(
        '{',
        r#"{"CorpId":"dingforeigncorp00001","#,
        1,
    );
    let (status, body) = push_status(&app, &both).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(app.counts().await, (0, 0, 0));
    // Our own organisation, named or not, is served.
    app.push_ok(&instance_event("pid-ours", "start", None, T0, None))
        .await;
    app.push_ok(r#"{"EventType":"user_add_org","UserId":["u1"]}"#)
        .await;
    assert_eq!(app.counts().await, (2, 1, 0));
    app.stop().await;
}

/// The poison inputs of a security review: each once gave 500 (index row size, NOTIFY payload,
/// timestamp or numeric out of range), which DingTalk retries until it gives up.
#[tokio::test]
async fn poison_fields_get_400_naming_the_field_and_nothing_is_stored() {
    let app = TestApp::spawn().await;
    let start = |pid: &str| json(&instance_event(pid, "start", None, T0, None));
    let far_future = chrono::Utc::now().timestamp_millis() + 30 * 86_400_000;
    let mut cases = Vec::new();
    // Random letters and digits: incompressible, as an index row would store them.
    cases.push(("processInstanceId", start(&crypto::random_nonce(9 * 1024))));
    let mut v = start("pid-event-id");
    v["eventId"] = crypto::random_nonce(5 * 1024).into();
    cases.push(("eventId", v));
    let mut v = start("pid-past");
    v["createTime"] = (-8_000_000_000_000_000_i64).into();
    cases.push(("createTime", v));
    cases.push((
        "finishTime",
        json(&instance_event(
            "pid-future",
            "finish",
            Some("agree"),
            T0,
            Some(far_future),
        )),
    ));
    let mut v = start("pid-event-time");
    v["EventTime"] = (9_000_000_000_000_000_i64).into();
    cases.push(("EventTime", v));
    let mut v = json(&task_event("pid-task", 1, "start", None, T0, None));
    v["staffId"] = crypto::random_nonce(3 * 1024).into();
    cases.push(("staffId", v));
    for (field, message) in &cases {
        let (status, body) = push_status(&app, &message.to_string()).await;
        assert_eq!(status, 400, "{field}: {body}");
        assert!(body.contains(field), "{field} is named: {body}");
    }
    // A number PostgreSQL's jsonb cannot hold (serde_json reads it as 0).
    let number = instance_event("pid-number", "start", None, T0, None).replacen(
        '{',
        r#"{"amount":1e-99999,"#,
        1,
    );
    let (status, body) = push_status(&app, &number).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(app.counts().await, (0, 0, 0), "a poison event wrote a row");
    assert_eq!(event_keys(&app).await, 0);
    // Still serving.
    app.push_ok(&instance_event("pid-ok", "start", None, T0, None))
        .await;
    assert_eq!(app.counts().await, (1, 1, 0));
    app.stop().await;
}

#[tokio::test]
async fn an_escaped_backslash_before_u0000_is_stored_and_a_real_nul_is_refused() {
    let app = TestApp::spawn().await;
    // The JSON text "C:\\u0000dir": a backslash and the letters u0000, no NUL.
    let escaped = instance_event("pid-backslash", "start", None, T0, None)
        .replace("张三提交的报销", r"C:\\u0000dir");
    assert!(escaped.contains(r#""C:\\u0000dir""#));
    app.push_ok(&escaped).await;
    let (raw, title): (String, String) =
        sqlx::query_as("SELECT raw, payload->>'title' FROM dingsync.events")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(raw, escaped);
    assert_eq!(title, r"C:\u0000dir");
    assert_eq!(
        app.approval("pid-backslash").await.title.as_deref(),
        Some(r"C:\u0000dir")
    );
    // A real NUL, in a value or in a key: 400, nothing stored.
    for nul in [
        instance_event("pid-nul", "start", None, T0, None).replace("张三", r"\u0000"),
        instance_event("pid-nul", "start", None, T0, None).replace("\"title\"", r#""ti\u0000tle""#),
    ] {
        let (status, body) = push_status(&app, &nul).await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("NUL"), "{body}");
    }
    assert_eq!(app.counts().await, (1, 1, 0));
    app.stop().await;
}

/// The daemon as a process, its log read from stderr: no owner key in it (at DEBUG either), and
/// a burst of bad signatures is summed up rather than logged line by line.
#[tokio::test]
async fn a_refused_owner_key_is_never_logged_and_a_burst_of_bad_signatures_makes_two_warn_lines() {
    install_crypto_provider();
    let db = TestDb::new();
    let port = free_port();
    let (token, aes_key) = (crypto::random_nonce(32), crypto::random_aes_key());
    let log = std::env::temp_dir().join(format!(
        "dingsync-refusals-{}-{}.log",
        std::process::id(),
        crypto::random_nonce(6)
    ));
    let mut child = dingsync_command(&["serve"])
        .env("DINGSYNC_DATABASE_URL", &db.url)
        .env("DINGSYNC_SERVER_LISTEN", format!("127.0.0.1:{port}"))
        .env("DINGSYNC_CALLBACK_TOKEN", &token)
        .env("DINGSYNC_CALLBACK_AES_KEY", &aes_key)
        .env("DINGSYNC_CALLBACK_OWNER_KEY", CORP_ID)
        .env("DINGSYNC_DINGTALK_API_BASE", "http://127.0.0.1:9")
        .env("DINGSYNC_DINGTALK_CORP_ID", CORP_ID)
        .env("DINGSYNC_LOG_FILTER", "dingsync=debug,info")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), "the daemon serving", || {
        let (http, url) = (http.clone(), format!("{base}/healthz"));
        async move {
            let ok = http.get(url).send().await.is_ok_and(|r| r.status() == 200);
            ok.then_some(())
        }
    })
    .await;

    let keys = CallbackCrypto::new(&token, &aes_key).unwrap();
    let secret_owner_key = "dingSecretAppKey0042";
    let event = instance_event("pid-log", "start", None, T0, None);
    let wrong_owner = Pusher::new(&base, keys.clone(), secret_owner_key);
    assert_eq!(wrong_owner.send(&event).await.unwrap().status(), 400);
    let sealed = keys.seal(&event, CORP_ID, "1764300000000", "n0nce123");
    for n in 0..100 {
        let status = http
            .post(format!("{base}/dingtalk/callback"))
            .query(&[
                ("signature", format!("{:040x}", n).as_str()),
                ("timestamp", "1764300000000"),
                ("nonce", "n0nce123"),
            ])
            .json(&serde_json::json!({ "encrypt": sealed.encrypt }))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 403);
    }
    let read = || std::fs::read_to_string(&log).unwrap();
    let summary = eventually(Duration::from_secs(30), "the summary line", || {
        let text = read();
        async move {
            text.lines()
                .find(|l| l.contains("refused 101 callbacks in the last 10 s"))
                .map(str::to_string)
        }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let text = read();
    let _ = std::fs::remove_file(&log);

    assert!(
        summary.contains("signature 100") && summary.contains("owner key 1"),
        "{summary}"
    );
    assert!(!text.contains(secret_owner_key), "the owner key was logged");
    let fingerprint = crypto::Fingerprint::of(secret_owner_key.as_bytes()).to_string();
    assert!(text.contains(&fingerprint), "the log names its fingerprint");
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("refused"))
        .collect();
    // The first owner-key refusal, the first bad signature, the summary.
    assert_eq!(warnings.len(), 3, "{warnings:#?}");
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("DEBUG") && l.contains("callback refused"))
            .count(),
        101,
        "each refusal is at DEBUG"
    );
}
