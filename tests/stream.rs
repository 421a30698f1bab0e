//! Stream mode end to end: the real daemon (in this process) with `stream.enabled`, against the
//! emulator's Stream gateway over real WebSockets, on a fresh database each. What arrives over
//! Stream must land as HTTP pushes land; an ack must never leave before its event is committed;
//! every fault of the connection (abrupt drop, `disconnect`, a silent zombie, an expired ticket,
//! the database going away) must end with nothing lost and nothing doubled.

mod common;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use dingsync::{
    app::App,
    config::{Config, Secret},
    event::{self, Parsed, Source},
};
use dingsync_emulator::{
    AckRecord, Delivery, Emulator, EmulatorConfig, StartInstance, StreamFaults, TaskAction,
};
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use tokio::sync::mpsc;

const TEMPLATE: &str = "PROC-EMU-EXPENSE";
/// 20 times faster than DingTalk: pings every 1.5 s, redelivery after 0.5 s, 1.5 s, 3 s, 6 s,
/// `disconnect` closes after 0.5 s, tickets last 4.5 s.
const SCALE: f64 = 0.05;

async fn stream_emulator(seed: u64) -> Emulator {
    install_crypto_provider();
    Emulator::start(
        EmulatorConfig {
            corp_id: CORP_ID.into(),
            time_scale: SCALE,
            seed,
            keep_events: true,
            delivery: Delivery::Stream,
            ..EmulatorConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap()
}

/// Stream on with `connections`, the silence limit at 1.5 s, against `emu`.
fn stream_config(emu: &Emulator, db: &TestDb, connections: usize) -> Config {
    let mut config = config_against(emu, db);
    config.dingtalk.openapi_base = emu.base_url();
    config.dingtalk.qps = 0;
    config.stream.enabled = true;
    config.stream.connections = connections;
    config.stream.silence_limit_ms = 1_500;
    config.outbox.enabled = false;
    config
}

async fn start(config: Config) -> (App, PgPool) {
    let pool_url = config.database.url.expose().to_string();
    let app = App::start(config).await.expect("daemon starts");
    let pool = PgPool::connect(&pool_url).await.unwrap();
    (app, pool)
}

/// Connections open at the gateway (and still receiving).
fn open_connections(emu: &Emulator) -> usize {
    emu.state()
        .stream_report()
        .connections
        .iter()
        .filter(|(_, accepting)| *accepting)
        .count()
}

async fn connected(emu: &Emulator, n: usize) {
    eventually(Duration::from_secs(20), "stream connections up", || async {
        (open_connections(emu) >= n).then_some(())
    })
    .await;
}

/// The dedup key dingsync gives the flat event `payload` (as an HTTP push would carry it).
fn dedup_key(payload: &Value) -> String {
    match event::parse(&payload.to_string(), Source::HttpPush, CORP_ID) {
        Ok(Parsed::Event(e)) => e.dedup_key,
        other => panic!("not an event: {other:?}"),
    }
}

/// Approval event keys stored, with how often each.
async fn stored(pool: &PgPool) -> HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT dedup_key, count(*) FROM dingsync.events GROUP BY dedup_key",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// Waits until every event the emulator set out to deliver is stored (and none twice).
async fn all_stored(emu: &Emulator, pool: &PgPool, within: Duration) {
    let state = emu.state().clone();
    let pool = pool.clone();
    eventually(within, "every delivered event stored", || {
        let (state, pool) = (state.clone(), pool.clone());
        async move {
            let wanted: HashSet<String> = state.events_pushed().iter().map(dedup_key).collect();
            let stored = stored(&pool).await;
            assert!(stored.values().all(|n| *n == 1), "an event is stored twice");
            wanted.iter().all(|k| stored.contains_key(k)).then_some(())
        }
    })
    .await;
}

/// People start `n` approvals and agree to every first task.
fn approvals(emu: &Emulator, n: usize) -> Vec<String> {
    let state = emu.state();
    let pids: Vec<String> = (0..n)
        .map(|i| {
            state
                .start_instance(StartInstance {
                    process_code: TEMPLATE.into(),
                    originator_userid: ["emp1", "emp2", "emp3"][i % 3].into(),
                    approvers: Some(vec!["manager1".into()]),
                    ..StartInstance::default()
                })
                .unwrap()
                .process_instance_id
        })
        .collect();
    for task in state.open_tasks() {
        state
            .agree(task.task.taskid, TaskAction::default())
            .unwrap();
    }
    pids
}

/// Checks, at the moment the gateway receives each ack (it waits for this check), that a
/// consumed event is in the database already. Returns the violations seen so far.
fn check_acks_against(emu: &Emulator, pool: &PgPool) -> Arc<Mutex<Vec<String>>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(AckRecord, tokio::sync::oneshot::Sender<()>)>();
    emu.state().set_stream_ack_hook(Some(tx));
    let violations = Arc::new(Mutex::new(Vec::new()));
    let (seen, pool) = (violations.clone(), pool.clone());
    tokio::spawn(async move {
        while let Some((ack, done)) = rx.recv().await {
            if ack.consumed {
                let found: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM dingsync.events
                     WHERE raw::jsonb -> 'headers' ->> 'eventId' = $1",
                )
                .bind(&ack.event_id)
                .fetch_one(&pool)
                .await
                .unwrap_or(0);
                if found == 0 {
                    seen.lock().unwrap().push(format!(
                        "{} acked {:?} before it was stored",
                        ack.event_id, ack.status
                    ));
                }
            }
            let _ = done.send(());
        }
    });
    violations
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_over_stream_land_like_http_pushes_and_every_ack_follows_its_commit() {
    let emu = stream_emulator(1).await;
    let db = TestDb::new();
    let mut config = stream_config(&emu, &db, 2);
    config.scheduler.details = "* * * * * *".into();
    config.reconcile.detail_quiet_ms = 0;
    config.reconcile.process_codes = vec![TEMPLATE.into()];
    let (app, pool) = start(config).await;
    let violations = check_acks_against(&emu, &pool);
    connected(&emu, 2).await;
    let pids = approvals(&emu, 30);
    all_stored(&emu, &pool, Duration::from_secs(30)).await;
    let sources: Vec<String> = sqlx::query_scalar("SELECT DISTINCT source FROM dingsync.events")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(sources, vec!["stream".to_string()]);
    // The approvals end as DingTalk has them (events applied, details fetched), as with HTTP push.
    let state = emu.state().clone();
    let check = pool.clone();
    eventually(
        Duration::from_secs(30),
        "approvals equal DingTalk's",
        || {
            let (state, pool) = (state.clone(), check.clone());
            async move {
                mirror::differences(&pool, CORP_ID, &state.instances())
                    .await
                    .is_empty()
                    .then_some(())
            }
        },
    )
    .await;
    assert_eq!(pids.len(), 30);
    assert!(
        violations.lock().unwrap().is_empty(),
        "{:?}",
        violations.lock().unwrap()
    );
    let acks = emu.state().stream_acks();
    assert!(acks.len() >= emu.state().events_pushed().len());
    // Every delivery (a redelivery too) is counted in the ledger, as pushes are.
    let ledger = app.ledger.clone();
    eventually(
        Duration::from_secs(10),
        "every delivery counted",
        || async {
            ledger.flush().await.unwrap();
            let counted: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(count), 0)::bigint FROM dingsync.usage WHERE kind = 'delivery'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
            let sent = emu.state().stream_report().deliveries;
            (counted as u64 == sent).then_some(())
        },
    )
    .await;
    // Pings were answered with their own data.
    let report = emu.state().stream_report();
    assert_eq!(report.pings_answered_wrong, 0);
    app.stop().await.unwrap();
    emu.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_database_outage_events_are_answered_later_and_stored_once_after_it() {
    let upstream: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = proxy::Proxy::start(upstream).await;
    let emu = stream_emulator(2).await;
    let db = TestDb::new();
    dingsync::store::connect_and_migrate(&test_config(&db.url).database)
        .await
        .unwrap()
        .close()
        .await;
    let mut config = stream_config(&emu, &db, 1);
    config.database.url = Secret::new(db.url.replace("127.0.0.1:5432", &proxy.addr.to_string()));
    let app = App::start(config).await.expect("daemon starts");
    let pool = PgPool::connect(&db.url).await.unwrap();
    let violations = check_acks_against(&emu, &pool);
    connected(&emu, 1).await;
    approvals(&emu, 3);
    all_stored(&emu, &pool, Duration::from_secs(20)).await;

    proxy.cut().await;
    approvals(&emu, 10);
    eventually(
        Duration::from_secs(20),
        "LATER answers during the outage",
        || async {
            let later = emu
                .state()
                .stream_acks()
                .iter()
                .filter(|a| a.status == "LATER")
                .count();
            (later >= 5).then_some(())
        },
    )
    .await;
    // The connection stays up through the outage (it is the database that is down).
    assert_eq!(open_connections(&emu), 1);
    proxy.restore().await;
    all_stored(&emu, &pool, Duration::from_secs(30)).await;
    assert!(
        violations.lock().unwrap().is_empty(),
        "{:?}",
        violations.lock().unwrap()
    );
    assert_eq!(emu.state().stream_report().given_up, 0);
    app.stop().await.unwrap();
    emu.stop().await;
}

/// Runs `fault` while approvals are being made, and requires everything stored once after it.
async fn survives(seed: u64, fault: impl Fn(&Emulator), replaced: impl Fn(&Emulator) -> bool) {
    let emu = stream_emulator(seed).await;
    let db = TestDb::new();
    let (app, pool) = start(stream_config(&emu, &db, 1)).await;
    let violations = check_acks_against(&emu, &pool);
    connected(&emu, 1).await;
    approvals(&emu, 5);
    all_stored(&emu, &pool, Duration::from_secs(20)).await;
    let opened = emu.state().stream_report().connections_opened;
    fault(&emu);
    approvals(&emu, 10);
    eventually(
        Duration::from_secs(20),
        "a replacement connection",
        || async {
            let report = emu.state().stream_report();
            (report.connections_opened > opened && replaced(&emu)).then_some(())
        },
    )
    .await;
    approvals(&emu, 5);
    all_stored(&emu, &pool, Duration::from_secs(30)).await;
    assert!(
        violations.lock().unwrap().is_empty(),
        "{:?}",
        violations.lock().unwrap()
    );
    assert_eq!(emu.state().stream_report().given_up, 0, "nothing given up");
    app.stop().await.unwrap();
    emu.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abruptly_dropped_connection_is_replaced_and_nothing_is_lost() {
    survives(
        3,
        |emu| assert_eq!(emu.state().stream_drop(None), 1),
        |_| true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_zombie_connection_is_presumed_dead_and_replaced_and_nothing_is_lost() {
    survives(
        4,
        |emu| assert_eq!(emu.state().stream_silence(None), 1),
        |_| true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_ticket_is_replaced_by_a_fresh_one_and_nothing_is_lost() {
    survives(
        5,
        |emu| {
            emu.state().update_faults(|f| f.stream.expire_tickets = 2);
            emu.state().stream_drop(None);
        },
        |emu| emu.state().stream_report().tickets_refused >= 2,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_opens_the_replacement_before_the_old_connection_closes() {
    let emu = stream_emulator(6).await;
    let db = TestDb::new();
    let (app, pool) = start(stream_config(&emu, &db, 1)).await;
    let violations = check_acks_against(&emu, &pool);
    connected(&emu, 1).await;
    approvals(&emu, 5);
    assert_eq!(emu.state().stream_disconnect(None), 1);
    // The new connection is up while the old one (told to disconnect) is still open: at some
    // moment the gateway holds both.
    eventually(
        Duration::from_secs(10),
        "old and new connection at once",
        || async {
            let report = emu.state().stream_report();
            let old = report
                .connections
                .iter()
                .filter(|(_, accepting)| !accepting)
                .count();
            let new = report
                .connections
                .iter()
                .filter(|(_, accepting)| *accepting)
                .count();
            (old == 1 && new == 1).then_some(())
        },
    )
    .await;
    approvals(&emu, 10);
    all_stored(&emu, &pool, Duration::from_secs(30)).await;
    eventually(
        Duration::from_secs(10),
        "the old connection closed",
        || async { (emu.state().stream_report().connections.len() == 1).then_some(()) },
    )
    .await;
    assert!(
        violations.lock().unwrap().is_empty(),
        "{:?}",
        violations.lock().unwrap()
    );
    assert_eq!(emu.state().stream_report().given_up, 0);
    app.stop().await.unwrap();
    emu.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_with_two_connections_each_store_every_event_once() {
    let emu = stream_emulator(7).await;
    emu.state().update_faults(|f| {
        f.stream = StreamFaults {
            duplicate_rate: 0.2,
            reorder_rate: 0.2,
            reorder_max_ms: 200,
            ..StreamFaults::default()
        }
    });
    let db = TestDb::new();
    let (a, pool) = start(stream_config(&emu, &db, 2)).await;
    let (b, _) = start(stream_config(&emu, &db, 2)).await;
    connected(&emu, 4).await;
    approvals(&emu, 40);
    all_stored(&emu, &pool, Duration::from_secs(30)).await;
    // Both replicas took a share (each message goes to one connection at random).
    let connections: HashSet<u64> = emu
        .state()
        .stream_acks()
        .iter()
        .map(|a| a.connection)
        .collect();
    assert_eq!(connections.len(), 4, "every connection got messages");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    emu.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_pushed_by_http_and_by_stream_is_stored_once() {
    let emu = stream_emulator(8).await;
    let db = TestDb::new();
    let config = stream_config(&emu, &db, 1);
    let crypto = dingsync::crypto::CallbackCrypto::new(
        config.callback.token.expose(),
        config.callback.aes_key.expose(),
    )
    .unwrap();
    let (app, pool) = start(config).await;
    connected(&emu, 1).await;
    // The same events in DingTalk's two shapes: the flat HTTP push and the Stream frame.
    let events: Vec<Value> = (0..5)
        .map(|i| {
            json(&instance_event(
                &format!("pid-both-{i}"),
                "finish",
                Some("agree"),
                1_764_300_000_000,
                Some(1_764_300_001_000),
            ))
        })
        .collect();
    let pusher = Pusher::new(&format!("http://{}", app.addr), crypto, CORP_ID);
    for (i, e) in events.iter().enumerate() {
        let mut flat: Map<String, Value> = e.as_object().unwrap().clone();
        flat.insert("corpId".into(), CORP_ID.into());
        let flat = Value::Object(flat);
        if i % 2 == 0 {
            let response = pusher.send(&flat.to_string()).await.unwrap();
            assert_eq!(response.status(), 200);
            emu.state()
                .stream_publish(vec![flat.as_object().unwrap().clone()]);
        } else {
            emu.state()
                .stream_publish(vec![flat.as_object().unwrap().clone()]);
            eventually(
                Duration::from_secs(10),
                "the stream copy stored",
                || async {
                    stored(&pool)
                        .await
                        .contains_key(&dedup_key(&flat))
                        .then_some(())
                },
            )
            .await;
            let response = pusher.send(&flat.to_string()).await.unwrap();
            assert_eq!(response.status(), 200);
        }
    }
    eventually(Duration::from_secs(10), "both copies answered", || async {
        (emu.state().stream_acks().len() >= 5).then_some(())
    })
    .await;
    let stored = stored(&pool).await;
    assert_eq!(stored.len(), 5, "{stored:?}");
    assert!(stored.values().all(|n| *n == 1));
    app.stop().await.unwrap();
    emu.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_a_400_unknown_events_are_stored_raw_and_the_connection_lives_on() {
    let emu = stream_emulator(9).await;
    let db = TestDb::new();
    let (app, pool) = start(stream_config(&emu, &db, 1)).await;
    connected(&emu, 1).await;
    let state = emu.state();
    assert!(state.stream_send_raw("this is not JSON"));
    assert!(state.stream_send_raw(
        r#"{"specVersion":"1.0","type":"EVENT","headers":{"messageId":"bad-1","eventType":"bpms_instance_change"},"data":"not json either"}"#
    ));
    assert!(state.stream_send_raw(
        r#"{"specVersion":"1.0","type":"CALLBACK","headers":{"messageId":"cb-1","topic":"/v1.0/im/bot/messages/get"},"data":"{}"}"#
    ));
    let mut unknown = Map::new();
    unknown.insert("EventType".into(), "user_add_org".into());
    unknown.insert("UserId".into(), json!(["u1"]));
    state.stream_publish(vec![unknown]);
    eventually(Duration::from_secs(10), "the unknown event stored raw", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM dingsync.events WHERE event_type = 'user_add_org' AND source = 'stream'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        (n == 1).then_some(())
    })
    .await;
    // The two answers to frames with a message id (400 and 404) reached the gateway as acks of
    // nothing in flight; the connection was never replaced.
    let report = eventually(Duration::from_secs(10), "the 400 and the 404", || async {
        let report = state.stream_report();
        (report.stray_acks >= 2 && report.in_flight == 0).then_some(report)
    })
    .await;
    assert_eq!(report.stray_acks, 2, "{report:?}");
    assert_eq!(report.connections_opened, 1);
    approvals(&emu, 2);
    all_stored(&emu, &pool, Duration::from_secs(20)).await;
    app.stop().await.unwrap();
    emu.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_reason_when_no_stream_connection_is_up_and_metrics_show_the_stream() {
    let emu = stream_emulator(10).await;
    let db = TestDb::new();
    let mut config = stream_config(&emu, &db, 1);
    config.dingtalk.app_secret = Secret::new("not-the-app-secret");
    // The API client would fail on the same secret; the stream is what is checked here.
    let (app, _pool) = start(config).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", app.addr);
    let text = eventually(
        Duration::from_secs(10),
        "readyz failing for the stream",
        || async {
            let r = http.get(format!("{base}/readyz")).send().await.ok()?;
            let status = r.status().as_u16();
            let text = r.text().await.ok()?;
            (status == 503 && text.contains("Stream")).then_some(text)
        },
    )
    .await;
    assert!(text.contains("invalidClientIdOrSecret"), "{text}");
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("dingsync_stream_reconnects_total{cause=\"open_failed\"}"),
        "{metrics}"
    );
    app.stop().await.unwrap();

    // With the right credentials it is ready, and the stream's series count frames and acks.
    let db = TestDb::new();
    let (app, _pool) = start(stream_config(&emu, &db, 1)).await;
    connected(&emu, 1).await;
    approvals(&emu, 1);
    let base = format!("http://{}", app.addr);
    eventually(
        Duration::from_secs(10),
        "ready with a stream connection",
        || async {
            let r = http.get(format!("{base}/readyz")).send().await.ok()?;
            (r.status() == 200).then_some(())
        },
    )
    .await;
    let metrics = eventually(Duration::from_secs(10), "stream acks counted", || async {
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains("dingsync_stream_acks_total{status=\"success\"}")
            .then_some(text)
    })
    .await;
    assert!(
        metrics.contains("dingsync_stream_connections{state=\"up\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dingsync_stream_frames_total{frame=\"event\"}"),
        "{metrics}"
    );
    app.stop().await.unwrap();
    emu.stop().await;
}
