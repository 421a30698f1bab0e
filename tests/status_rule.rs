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
