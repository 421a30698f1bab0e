//! The forward-only status rule exists in two languages because two places decide: the SQL
//! writers ask `dingsync.status_wins` about the stored row, and `event::status_wins` folds a
//! batch's changes before they are written. These tests check that the two give the same answer
//! for every pair of statuses.

mod common;

use common::{TestDb, test_config};
use dingsync::{event, store};

/// No status, every status of approvals and tasks, and one DingTalk might add.
const STATUSES: [Option<&str>; 8] = [
    None,
    Some("NEW"),
    Some("RUNNING"),
    Some("PAUSED"),
    Some("COMPLETED"),
    Some("TERMINATED"),
    Some("CANCELED"),
    Some("SOMETHING_NEW"),
];

#[tokio::test]
async fn rust_and_sql_agree_on_which_status_wins_for_every_pair_and_tie_rule() {
    let db = TestDb::new();
    let pool = store::connect_and_migrate(&test_config(&db.url).database)
        .await
        .unwrap();
    let mut disagreements = Vec::new();
    let mut wins = 0;
    for new in STATUSES {
        for old in STATUSES {
            for ties_win in [false, true] {
                let sql: Option<bool> =
                    sqlx::query_scalar("SELECT dingsync.status_wins($1, $2, $3)")
                        .bind(new)
                        .bind(old)
                        .bind(ties_win)
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                let rust = event::status_wins(new, old, ties_win);
                wins += usize::from(rust);
                if sql != Some(rust) {
                    disagreements.push(format!(
                        "status_wins({new:?}, {old:?}, ties_win: {ties_win}): SQL {sql:?}, Rust {rust}"
                    ));
                }
            }
        }
    }
    assert!(disagreements.is_empty(), "{disagreements:#?}");
    // Not a rule that is always or never true (which two broken copies could agree on).
    assert!(
        0 < wins && wins < STATUSES.len() * STATUSES.len() * 2,
        "{wins}"
    );
    pool.close().await;
}

#[tokio::test]
async fn rust_and_sql_agree_on_which_statuses_are_terminal() {
    let db = TestDb::new();
    let pool = store::connect_and_migrate(&test_config(&db.url).database)
        .await
        .unwrap();
    for status in STATUSES.into_iter().flatten() {
        let rank: i32 = sqlx::query_scalar("SELECT dingsync.status_rank($1)")
            .bind(status)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(event::is_terminal(status), rank == 2, "{status}");
    }
    let no_rank: Option<i32> = sqlx::query_scalar("SELECT dingsync.status_rank(NULL)")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(no_rank, None, "no status has no rank");
    pool.close().await;
}

/// The rule is evaluated per row on the ingest hot path, so PostgreSQL must inline it (expand its
/// body into the statement) rather than call it: `status_wins` must stay a single-expression SQL
/// function without a `SET` clause. With `track_functions = 'all'` PostgreSQL counts every call of
/// a function it did not inline, so after every writer has updated rows, the rule's two functions
/// must have no calls while a PL/pgSQL function (the outbox's CHECK) shows the counter works.
#[tokio::test]
async fn the_status_rule_is_inlined_into_every_statement_that_writes_approvals() {
    use dingsync::{
        event::{Event, Parsed, Source},
        snapshot::{Snapshot, SnapshotTask},
        store::{
            approvals::{SnapshotSource, apply_snapshot},
            batch::{Expect, store_events},
            outbox::record_created_batch,
        },
    };
    let db = TestDb::new();
    let pool = store::connect_and_migrate(&test_config(&db.url).database)
        .await
        .unwrap();
    // The outbox takes rows only for an organisation served here (migration V10).
    store::outbox::register_corp(&pool, common::CORP_ID)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL track_functions = 'all'")
        .execute(&mut *tx)
        .await
        .unwrap();
    let event = |raw: &str| -> Event {
        match event::parse(raw, Source::HttpPush, common::CORP_ID).unwrap() {
            Parsed::Event(e) => *e,
            Parsed::Handshake => panic!("handshake"),
        }
    };
    let started = [
        event(r#"{"EventType":"bpms_instance_change","processInstanceId":"p1","type":"start"}"#),
        event(
            r#"{"EventType":"bpms_task_change","processInstanceId":"p1","type":"start","taskId":7}"#,
        ),
    ];
    let finished = [
        event(
            r#"{"EventType":"bpms_task_change","processInstanceId":"p1","type":"finish","result":"agree","taskId":7,"finishTime":1764300002000}"#,
        ),
        event(
            r#"{"EventType":"bpms_instance_change","processInstanceId":"p1","type":"finish","result":"agree","finishTime":1764300002000}"#,
        ),
    ];
    // The first batch inserts the rows, the second updates them (ON CONFLICT DO UPDATE).
    for batch in [&started, &finished] {
        let refs: Vec<&Event> = batch.iter().collect();
        store_events(&mut *tx, &refs, Expect::New).await.unwrap();
    }
    let snapshot = Snapshot {
        process_instance_id: "p1".into(),
        status: "TERMINATED".into(),
        result: None,
        title: None,
        business_id: None,
        originator_userid: None,
        originator_dept_id: None,
        created_at: None,
        finished_at: None,
        form_values: serde_json::json!([]),
        operation_records: serde_json::json!([]),
        tasks: vec![SnapshotTask {
            task_id: 7,
            activity_id: None,
            userid: None,
            status: "CANCELED".into(),
            result: Some("NONE".into()),
            remark: None,
            created_at: None,
            finished_at: None,
        }],
        whole_minutes: false,
    };
    apply_snapshot(
        &mut tx,
        common::CORP_ID,
        &snapshot,
        chrono::Utc::now(),
        SnapshotSource::Details,
        None,
    )
    .await
    .unwrap();
    let outbox_id: i64 = sqlx::query_scalar(
        "INSERT INTO dingsync.outbox
             (corp_id, idempotency_key, process_code, originator_user_id, form_values, state)
         VALUES ($1, 'k1', 'PROC-1', 'emp1', '[{\"name\":\"Reason\",\"value\":\"x\"}]', 'sending')
         RETURNING id",
    )
    .bind(common::CORP_ID)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let linked = record_created_batch(&mut *tx, common::CORP_ID, &[(outbox_id, "p1".into())])
        .await
        .unwrap();
    assert_eq!(linked, [outbox_id]);
    let (status, result): (String, Option<String>) = sqlx::query_as(
        "SELECT status, result FROM dingsync.approvals WHERE process_instance_id = 'p1'",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), result),
        ("TERMINATED", None),
        "every writer ran"
    );

    let calls: Vec<(String, i64)> = sqlx::query_as(
        "SELECT funcname::text, calls FROM pg_stat_xact_user_functions
         WHERE schemaname = 'dingsync' ORDER BY funcname",
    )
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert!(
        calls.iter().any(|(f, _)| f == "form_values_problem"),
        "the counter sees calls: {calls:?}"
    );
    assert!(
        !calls
            .iter()
            .any(|(f, _)| f == "status_wins" || f == "status_rank"),
        "called, not inlined: {calls:?}"
    );
    tx.rollback().await.unwrap();
    pool.close().await;
}
