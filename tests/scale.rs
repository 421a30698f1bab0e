//! Many organisations at once: ten apps of ten organisations, each against its own emulator
//! (different CorpId, AppKey, secret and seed), served together by three replicas in this
//! process, the database behind PgBouncer in transaction pooling mode, with DingTalk's gateway
//! answering 5xx and losing create answers the whole time. Every organisation's outbox rows are
//! inserted at once; while they are created, the approvers of each organisation decide the
//! approvals already made, so that approvals change state after creation. It proves:
//! - no duplicate: each emulator holds exactly one instance per outbox row of its organisation
//!   (tied by a Reason no other row has), and none without a row;
//! - nothing lost: every row ends `created` with that instance, linked to its approval;
//! - the mirror: every approval row (status, result, tasks) equals its organisation's DingTalk;
//! - fairness is measured, not yet held: the spread of the times from the insert to each
//!   organisation's last row created is printed (an open finding: docs/scaling.md).

mod common;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use common::{pgbouncer::PgBouncer, *};
use dingsync::{
    app::App,
    config::{AppEntry, AppStream, Config, Pooler, Secret},
};
use dingsync_emulator::{Delivery, Emulator, EmulatorConfig, Handle, Person, TaskAction};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const ORGS: usize = 10;
const REPLICAS: usize = 3;
const TEMPLATE: &str = "PROC-EMU-EXPENSE";
/// Originators per organisation: a lost create's search reads one originator's instances, so the
/// rows come from many people, as most organisations' approvals do (tests/faults.rs).
const PEOPLE: i32 = 20;
/// Server connections PgBouncer opens for the database: far fewer than the three replicas'
/// pools together (3 × 16), so that clients really share them.
const SERVER_CONNECTIONS: u32 = 10;

/// Outbox rows per organisation, all inserted at once. The full size runs in about 110 s on the
/// two shared cores (docs/BENCHMARKS.md), short enough to be the only size.
const ROWS_PER_ORG: i32 = 300;
/// Deadline for every row to be created and every approval to equal DingTalk. A correctness
/// bound, not a speed target: eight times the run seen on a loaded machine.
const WITHIN: Duration = Duration::from_secs(900);

fn corp_id(org: usize) -> String {
    format!("dingscalecorp{org:07}")
}

fn app_key(org: usize) -> String {
    format!("dingscaleappkey{org:05}")
}

/// Organisation `org`'s emulator, DingTalk's timings 20 times faster, delivering over Stream
/// (every replica holds a connection per app; DingTalk hands each event to one of them).
async fn emulator(org: usize) -> Emulator {
    install_crypto_provider();
    let emu = Emulator::start(
        EmulatorConfig {
            corp_id: corp_id(org),
            app_key: app_key(org),
            app_secret: format!("secret-of-{}", app_key(org)),
            time_scale: 0.05,
            // Seeds differ per organisation: the same seed would hand out the same ids.
            seed: 1_000 + org as u64,
            delivery: Delivery::Stream,
            ..EmulatorConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    for i in 0..PEOPLE {
        emu.state()
            .add_person(Person {
                userid: format!("scaleemp{i}"),
                name: format!("员工{i}"),
                dept_ids: vec![100],
            })
            .unwrap();
    }
    emu
}

fn entry(org: usize, emu: &Emulator) -> AppEntry {
    AppEntry {
        name: format!("org{org}"),
        app_key: app_key(org),
        app_secret: Secret::new(format!("secret-of-{}", app_key(org))),
        corp_id: corp_id(org),
        api_base: emu.base_url(),
        openapi_base: emu.base_url(),
        stream: AppStream { enabled: true },
        ..AppEntry::default()
    }
}

/// One replica: all ten apps, the pool through PgBouncer, migrations and LISTEN over the direct
/// URL, timings shortened for CI as in tests/faults.rs.
fn replica(db: &TestDb, bouncer: &PgBouncer, emus: &[Emulator]) -> Config {
    let mut c = test_config(&db.url);
    c.dingtalk.app_key = String::new();
    c.dingtalk.app_secret = Secret::default();
    c.dingtalk.corp_id = String::new();
    c.callback.token = Secret::default();
    c.callback.aes_key = Secret::default();
    c.callback.owner_key = Vec::new();
    c.apps = emus
        .iter()
        .enumerate()
        .map(|(org, emu)| entry(org, emu))
        .collect();
    c.database.url = Secret::new(bouncer.url(&db.name));
    c.database.pooler = Pooler::Transaction;
    c.database.direct_url = Secret::new(db.url.clone());
    // Each app's own budget, shared by the three replicas.
    c.dingtalk.qps = 20;
    // A lost create answer costs a worker this long; lease_ms (default 60 s) stays above twice it.
    c.dingtalk.timeout_ms = 1_000;
    c.outbox.lost_settle_ms = 300;
    c.outbox.backoff_base_ms = 100;
    c.outbox.backoff_max_ms = 2_000;
    c.outbox.poll_ms = 200;
    // 5xx and lost answers for the whole run: room for a row meeting several in a row.
    c.outbox.max_attempts = 20;
    // Details fetched every second for new or changed approvals, the sweep every other second.
    c.scheduler.details = "* * * * * *".into();
    c.scheduler.sweep = "*/2 * * * * *".into();
    c.reconcile.detail_quiet_ms = 0;
    c.dingtalk.monthly_calls = 0;
    c.emulator.people_pace_ms = 0;
    c.stream.silence_limit_ms = 3_000;
    c
}

/// Inserts every organisation's rows in one statement: `n` per organisation, each with a Reason
/// no other row of any organisation has.
async fn request_rows(pool: &PgPool, n: i32) {
    let corps: Vec<String> = (0..ORGS).map(corp_id).collect();
    sqlx::query(
        "INSERT INTO dingsync.outbox (corp_id, idempotency_key, process_code, originator_user_id, form_values)
         SELECT c.corp, c.corp || '-' || i, $3, 'scaleemp' || (i % $4),
                jsonb_build_array(jsonb_build_object('name', 'Reason', 'value', c.corp || ' ' || i),
                                  jsonb_build_object('name', 'Amount', 'value', i))
           FROM unnest($1::text[]) AS c(corp), generate_series(1, $2) AS i",
    )
    .bind(&corps)
    .bind(n)
    .bind(TEMPLATE)
    .bind(PEOPLE)
    .execute(pool)
    .await
    .unwrap();
}

/// Until `stop`, every 700 ms: the approvers of each organisation decide some open tasks (agree
/// mostly, refuse some, leave some open), so approvals change state after they were created.
/// Returns the decisions made.
fn approvers(emus: Vec<Handle>, stop: CancellationToken) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(700));
        let mut decided = 0;
        let mut round = 0usize;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            for emu in &emus {
                decided += decide(emu, round);
            }
            round += 1;
        }
        decided
    })
}

fn decide(emu: &Handle, round: usize) -> usize {
    let mut decided = 0;
    for (n, open) in emu.open_tasks().into_iter().enumerate() {
        let act = TaskAction {
            remark: Some(format!("round {round} #{n}")),
            ..TaskAction::default()
        };
        let done = match (n + round) % 5 {
            0 | 1 => emu.agree(open.task.taskid, act),
            2 => emu.refuse(open.task.taskid, act),
            _ => continue,
        };
        decided += usize::from(done.is_ok());
    }
    decided
}

/// Per organisation: rows not yet `created`.
async fn open_rows(pool: &PgPool) -> HashMap<String, i64> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT corp_id, count(*) FILTER (WHERE state <> 'created') FROM dingsync.outbox
          GROUP BY corp_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().collect()
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    corp_id: String,
    id: i64,
    state: String,
    process_instance_id: Option<String>,
    reason: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_organisations_on_three_replicas_behind_pgbouncer_with_faults_create_each_row_once_mirror_dingtalk_and_finish_close_together()
 {
    let bouncer = PgBouncer::start(SERVER_CONNECTIONS);
    let mut emus = Vec::new();
    for org in 0..ORGS {
        emus.push(emulator(org).await);
    }
    let handles: Vec<Handle> = emus.iter().map(|e| e.state().clone()).collect();
    let db = TestDb::new();
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        replicas.push(
            App::start(replica(&db, &bouncer, &emus))
                .await
                .expect("replica starts"),
        );
    }
    let pool = PgPool::connect(&db.url).await.unwrap();
    for h in &handles {
        h.update_faults(|f| {
            f.http_5xx_rate = 0.05;
            f.lose_create_response_rate = 0.1;
        });
    }
    let stop_approvers = CancellationToken::new();
    let deciding = approvers(handles.clone(), stop_approvers.clone());

    let started = Instant::now();
    request_rows(&pool, ROWS_PER_ORG).await;
    let deadline = started + WITHIN;

    // Faults stay on until every row is created: each organisation must get through DingTalk as
    // it misbehaves.
    let mut finished: HashMap<String, Duration> = HashMap::new();
    while finished.len() < ORGS {
        let open = open_rows(&pool).await;
        for (corp, left) in &open {
            if *left == 0 && !finished.contains_key(corp) {
                finished.insert(corp.clone(), started.elapsed());
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {:?}: rows not created per organisation {open:?}",
            WITHIN
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_created = started.elapsed();
    // The last decisions, then the mirror must catch up with DingTalk, faults still on.
    stop_approvers.cancel();
    let decided = deciding.await.unwrap();
    let mut left = Vec::new();
    loop {
        left.clear();
        for (org, h) in handles.iter().enumerate() {
            let d = mirror::differences(&pool, &corp_id(org), &h.instances()).await;
            if !d.is_empty() {
                left.push((corp_id(org), d.len(), d[0].clone()));
            }
        }
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {:?}: approvals differing from DingTalk per organisation \
             (corp, count, first): {left:?}",
            WITHIN
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mirrored = started.elapsed();
    for h in &handles {
        h.reset_faults();
    }
    for app in replicas {
        app.stop().await.unwrap();
    }

    // Exactly one instance per row, tied by its Reason, in the row's own organisation.
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT corp_id, id, state, process_instance_id, form_values->0->>'value' AS reason
           FROM dingsync.outbox ORDER BY corp_id, id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), ORGS * ROWS_PER_ORG as usize);
    let mut instances = 0;
    let mut states: HashMap<String, usize> = HashMap::new();
    for (org, h) in handles.iter().enumerate() {
        let corp = corp_id(org);
        let mut by_reason: HashMap<String, Vec<String>> = HashMap::new();
        for instance in h.instances() {
            instances += 1;
            *states
                .entry(format!("{:?}/{:?}", instance.status, instance.result))
                .or_default() += 1;
            let reason = instance
                .form_component_values
                .iter()
                .find(|v| v.name == "Reason")
                .map(|v| v.value.clone())
                .unwrap_or_default();
            by_reason
                .entry(reason)
                .or_default()
                .push(instance.process_instance_id.clone());
        }
        for row in rows.iter().filter(|r| r.corp_id == corp) {
            assert_eq!(row.state, "created", "{corp} row {}", row.id);
            let made = by_reason.remove(&row.reason).unwrap_or_default();
            assert_eq!(
                made.len(),
                1,
                "{corp} row {} ({}): DingTalk holds {made:?}",
                row.id,
                row.reason
            );
            assert_eq!(row.process_instance_id.as_deref(), Some(made[0].as_str()));
        }
        assert!(
            by_reason.is_empty(),
            "{corp}: instances without a row: {by_reason:?}"
        );
    }
    let linked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dingsync.outbox o JOIN dingsync.approvals a
           ON a.corp_id = o.corp_id AND a.process_instance_id = o.process_instance_id
          AND a.outbox_id = o.id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(linked, rows.len() as i64, "every row has its approval");

    // Fairness: each organisation's time from the insert to its last row created.
    let mut times: Vec<(String, Duration)> = finished.into_iter().collect();
    times.sort_by_key(|(_, t)| *t);
    let fastest = times[0].1;
    let slowest = times[ORGS - 1].1;
    let spread = slowest - fastest;
    let attempts: i64 = sqlx::query_scalar("SELECT sum(attempts)::int8 FROM dingsync.outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    let creates: usize = handles.iter().map(|h| h.calls(api::create())).sum();
    eprintln!(
        "scale run: {ORGS} organisations x {} rows, {REPLICAS} replicas, PgBouncer ({SERVER_CONNECTIONS} \
         server connections); all created in {all_created:.1?}, mirrored in {mirrored:.1?}; \
         per organisation (insert to last row created): {}; fastest {fastest:.1?}, slowest \
         {slowest:.1?}, spread {spread:.1?}; {attempts} outbox attempts, {creates} create calls, \
         {decided} task decisions, instance states {states:?}",
        ROWS_PER_ORG,
        times
            .iter()
            .map(|(c, t)| format!("{c} {t:.1?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert_eq!(instances, rows.len());
    // Fairness is printed above, not asserted: the spread is the open finding of this scenario.
    // Each app has its own outbox worker and budget, yet the organisations finish in two groups
    // (seen: four near 26 s and six at 84-107 s, 4.1 times; earlier runs 2.1 and 2.35 times),
    // and why is not known yet (docs/scaling.md). Every organisation finishing before the
    // deadline, each row once and every approval equal, is what this test holds.
    let _ = spread;

    pool.close().await;
    for emu in emus {
        emu.stop().await;
    }
    drop(bouncer);
}
