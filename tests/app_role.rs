//! Migration V10, as a business app sees it: logged in as a role granted `dingsync_app`, an app
//! inserts requests and nothing else (no state, no attempts, no instance id), only for an
//! organisation served here; PUBLIC executes no dingsync function; every function that resolves
//! names at run time has a fixed search_path.

mod common;

use std::{str::FromStr, time::Duration};

use common::{CORP_ID, TestDb, test_config};
use dingsync::{
    crypto,
    store::{self, outbox::Work},
};
use sqlx::{
    Connection, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

const FORM: &str = r#"'[{"name": "Reason", "value": "x"}]'"#;

/// A LOGIN role of its own for one test, connected to the test's database. Roles are global to
/// the cluster, so the name is unique and the role is dropped (with its grants) afterwards.
struct LoginRole {
    name: String,
    database_url: String,
    pool: PgPool,
}

impl LoginRole {
    /// A new login role, granted `member_of` (e.g. `dingsync_app`) when given.
    async fn create(db: &TestDb, admin: &PgPool, member_of: Option<&str>) -> LoginRole {
        let name = format!("dingsync_t_{}", crypto::random_nonce(10).to_lowercase());
        sqlx::raw_sql(&format!("CREATE ROLE {name} LOGIN"))
            .execute(admin)
            .await
            .unwrap();
        if let Some(group) = member_of {
            sqlx::raw_sql(&format!("GRANT {group} TO {name}"))
                .execute(admin)
                .await
                .unwrap();
        }
        let options = PgConnectOptions::from_str(&db.url).unwrap().username(&name);
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .unwrap();
        LoginRole {
            name,
            database_url: db.url.clone(),
            pool,
        }
    }
}

impl Drop for LoginRole {
    fn drop(&mut self) {
        let (name, url) = (self.name.clone(), self.database_url.clone());
        // Drop runs inside the test's runtime; use a thread with its own. The role's pool belongs
        // to the test's runtime and cannot be closed from here: its sessions are ended instead.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(&url).await {
                    let sql = format!(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}';
                         DROP OWNED BY {name}; DROP ROLE IF EXISTS {name}"
                    );
                    let _ = sqlx::raw_sql(&sql).execute(&mut admin).await;
                    let _ = admin.close().await;
                }
            })
        })
        .join();
    }
}

/// A migrated database; with `corp`, serving it (as a started dingsync would have registered it).
async fn migrated(corp: Option<&str>) -> (TestDb, PgPool) {
    let db = TestDb::new();
    let pool = store::connect_and_migrate(&test_config(&db.url).database)
        .await
        .unwrap();
    if let Some(corp) = corp {
        store::outbox::register_corp(&pool, corp).await.unwrap();
    }
    (db, pool)
}

/// The SQLSTATE and message of a statement that must fail.
async fn refusal(pool: &PgPool, sql: &str) -> (String, String) {
    match sqlx::raw_sql(sql).execute(pool).await {
        Err(sqlx::Error::Database(e)) => (e.code().unwrap_or_default().into(), e.message().into()),
        other => panic!("{sql}: expected a database error, got {other:?}"),
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn an_app_role_inserts_requests_that_start_pending_and_can_forge_no_lifecycle_column() {
    let (db, pool) = migrated(Some(CORP_ID)).await;
    // A row dingsync created, whose instance a forged row would claim.
    sqlx::raw_sql(&format!(
        "INSERT INTO dingsync.outbox (idempotency_key, process_code, originator_user_id, form_values,
                                      state, attempts, process_instance_id, sent_at, done_at)
         VALUES ('made', 'PROC-1', 'emp1', {FORM}, 'created', 1, 'inst-1', now(), now())"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let app = LoginRole::create(&db, &pool, Some("dingsync_app")).await;

    let forged = [
        ("state, process_instance_id", "'created', 'inst-1'"),
        ("process_instance_id", "'inst-2'"),
        ("attempts", "3"),
        ("state", "'unknown'"),
        ("state", "'sending'"),
        ("sent_at", "now() - interval '1 hour'"),
        ("next_attempt_at", "now() + interval '1 day'"),
        ("last_error", "'forged'"),
        ("created_at", "now() - interval '1 year'"),
        ("updated_at", "now()"),
        ("done_at", "now()"),
    ];
    for (i, (columns, values)) in forged.into_iter().enumerate() {
        let sql = format!(
            "INSERT INTO dingsync.outbox
                 (idempotency_key, process_code, originator_user_id, form_values, {columns})
             VALUES ('forged-{i}', 'PROC-1', 'emp1', {FORM}, {values})"
        );
        let (code, message) = refusal(&app.pool, &sql).await;
        assert_eq!(code, "42501", "{columns}: {message}");
    }
    let (code, _) = refusal(
        &app.pool,
        &format!(
            "INSERT INTO dingsync.outbox (id, idempotency_key, process_code, originator_user_id, form_values)
             OVERRIDING SYSTEM VALUE VALUES (4711, 'forged-id', 'PROC-1', 'emp1', {FORM})"
        ),
    )
    .await;
    assert_eq!(code, "42501", "id");
    for change in [
        "UPDATE dingsync.outbox SET state = 'cancelled'",
        "DELETE FROM dingsync.outbox",
    ] {
        assert_eq!(refusal(&app.pool, change).await.0, "42501", "{change}");
    }

    // What an app may do: request_approval, and a plain INSERT of every request column.
    let requested: i64 = sqlx::query_scalar(&format!(
        "SELECT dingsync.request_approval('req-1', 'PROC-1', 'emp1', {FORM})"
    ))
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let inserted: i64 = sqlx::query_scalar(&format!(
        "INSERT INTO dingsync.outbox
             (corp_id, idempotency_key, process_code, originator_user_id, dept_id, form_values,
              approvers, cc_list, cc_position)
         VALUES ('{CORP_ID}', 'req-2', 'PROC-1', 'emp1', 100, {FORM}, '[\"manager1\"]', '{{hr1}}',
                 'FINISH')
         ON CONFLICT (corp_id, idempotency_key) DO NOTHING
         RETURNING id"
    ))
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let rows: Vec<(i64, String, i32, bool)> = sqlx::query_as(
        "SELECT id, state, attempts,
                process_instance_id IS NULL AND sent_at IS NULL AND done_at IS NULL
                    AND last_error IS NULL
         FROM dingsync.outbox WHERE idempotency_key <> 'made' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            (requested, "pending".into(), 0, true),
            (inserted, "pending".into(), 0, true)
        ],
        "only the two requests, both as new"
    );
    // Each row's times are those of its own insert (its transaction's now()).
    let times_own: bool = sqlx::query_scalar(
        "SELECT bool_and(created_at = updated_at AND next_attempt_at = created_at
                         AND created_at > now() - interval '1 minute')
         FROM dingsync.outbox WHERE idempotency_key <> 'made'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(times_own, "no timestamps but the row's own");

    // The worker sees two rows to send and nothing to search for or adopt.
    let claims = store::outbox::claim(
        &pool,
        CORP_ID,
        10,
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    let work: Vec<(i64, Work)> = claims.iter().map(|c| (c.row.id, c.work)).collect();
    assert_eq!(work, [(requested, Work::Send), (inserted, Work::Send)]);
    drop(app);
    pool.close().await;
}

#[tokio::test]
async fn a_request_for_an_organisation_not_served_here_is_refused_naming_it() {
    let (db, pool) = migrated(Some(CORP_ID)).await;
    let app = LoginRole::create(&db, &pool, Some("dingsync_app")).await;
    let expected = r#"dingsync.outbox: corp_id "dingnosuchcorp0001" is not served by this database (see dingsync.corps)"#;
    for sql in [
        format!(
            "SELECT dingsync.request_approval('k1', 'PROC-1', 'emp1', {FORM}, corp_id => 'dingnosuchcorp0001')"
        ),
        format!(
            "INSERT INTO dingsync.outbox (corp_id, idempotency_key, process_code, originator_user_id, form_values)
             VALUES ('dingnosuchcorp0001', 'k2', 'PROC-1', 'emp1', {FORM})"
        ),
    ] {
        let (code, message) = refusal(&app.pool, &sql).await;
        assert_eq!((code.as_str(), message.as_str()), ("23514", expected));
    }
    assert_eq!(
        count(&pool, "SELECT count(*) FROM dingsync.outbox").await,
        0
    );
    drop(app);
    pool.close().await;

    // Before any dingsync has registered an organisation, no row is taken, even from dingsync's
    // own role with an explicit corp_id: the first start might register another one.
    let (_db, pool) = migrated(None).await;
    let (code, message) = refusal(
        &pool,
        &format!(
            "SELECT dingsync.request_approval('k1', 'PROC-1', 'emp1', {FORM}, corp_id => '{CORP_ID}')"
        ),
    )
    .await;
    assert_eq!(code, "23514");
    assert!(
        message.contains(&format!(r#"corp_id "{CORP_ID}" is not served"#))
            && message.contains("no organisation is registered yet"),
        "{message}"
    );
    store::outbox::register_corp(&pool, CORP_ID).await.unwrap();
    sqlx::raw_sql(&format!(
        "SELECT dingsync.request_approval('k1', 'PROC-1', 'emp1', {FORM}, corp_id => '{CORP_ID}')"
    ))
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
}

#[tokio::test]
async fn public_executes_no_dingsync_function_and_cannot_create_objects_in_the_schema() {
    let (db, pool) = migrated(Some(CORP_ID)).await;
    let public: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p
         WHERE p.pronamespace = 'dingsync'::regnamespace
           AND (p.proacl IS NULL
                OR EXISTS (SELECT FROM aclexplode(p.proacl) a
                           WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'))
         ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        public.is_empty(),
        "executable by PUBLIC (a migration that creates a function must REVOKE EXECUTE ... FROM PUBLIC): {public:?}"
    );

    // A role with no grants but USAGE on the schema, so that what refuses it is the function's ACL.
    let nobody = LoginRole::create(&db, &pool, None).await;
    sqlx::raw_sql(&format!(
        "GRANT USAGE ON SCHEMA dingsync TO {}",
        nobody.name
    ))
    .execute(&pool)
    .await
    .unwrap();
    let (code, message) = refusal(
        &nobody.pool,
        &format!("SELECT dingsync.request_approval('k1', 'PROC-1', 'emp1', {FORM})"),
    )
    .await;
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("42501", "permission denied for function request_approval")
    );
    for planted in [
        "CREATE TABLE dingsync.corps_planted (corp_id text)",
        "CREATE FUNCTION dingsync.planted() RETURNS int LANGUAGE sql RETURN 1",
    ] {
        assert_eq!(refusal(&nobody.pool, planted).await.0, "42501", "{planted}");
    }
    let app = LoginRole::create(&db, &pool, Some("dingsync_app")).await;
    assert_eq!(
        refusal(&app.pool, "CREATE TABLE dingsync.planted (i int)")
            .await
            .0,
        "42501"
    );
    drop((nobody, app));
    pool.close().await;
}

/// The SQL-standard-body functions the planner inlines (migrations V9, V21: the form views' safe
/// parse functions, evaluated per row): bound when created, so no search_path can redirect
/// them, and a SET clause would stop the inlining.
const INLINED: [&str; 10] = [
    "status_rank",
    "status_wins",
    "form_value",
    "form_ext",
    "form_text",
    "form_textarea",
    "form_numeric",
    "form_ymd",
    "form_range_part",
    "form_cell",
];

#[tokio::test]
async fn every_function_pins_its_search_path_unless_it_is_an_inlined_sql_body() {
    let (_db, pool) = migrated(None).await;
    let functions: Vec<(String, Option<String>, bool)> = sqlx::query_as(
        "SELECT p.proname::text,
                (SELECT c FROM unnest(p.proconfig) AS c WHERE c LIKE 'search_path=%'),
                p.prosqlbody IS NOT NULL
         FROM pg_proc p WHERE p.pronamespace = 'dingsync'::regnamespace ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(functions.len() > INLINED.len(), "{functions:?}");
    let wrong: Vec<String> = functions
        .iter()
        .filter_map(|(name, search_path, sql_body)| {
            let inlined = INLINED.contains(&name.as_str());
            match (inlined, search_path.as_deref()) {
                (true, None) if *sql_body => None,
                (true, _) => Some(format!("{name}: must stay a SQL-standard body without SET")),
                (false, Some("search_path=pg_catalog, dingsync, pg_temp")) => None,
                (false, other) => Some(format!(
                    "{name}: search_path {other:?}, want SET search_path = pg_catalog, dingsync, pg_temp"
                )),
            }
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
    pool.close().await;
}

#[tokio::test]
async fn an_app_role_requests_actions_and_can_forge_no_outcome() {
    let (db, pool) = migrated(Some(CORP_ID)).await;
    sqlx::raw_sql(
        "INSERT INTO dingsync.approvals (corp_id, process_instance_id, status, originator_userid)
             VALUES ('dingtestcorp00000001', 'inst-1', 'RUNNING', 'emp1');
         INSERT INTO dingsync.approval_tasks (corp_id, task_id, process_instance_id, userid, status)
             VALUES ('dingtestcorp00000001', 61920249919, 'inst-1', 'manager1', 'RUNNING')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let app = LoginRole::create(&db, &pool, Some("dingsync_app")).await;
    let id: i64 = sqlx::query_scalar(
        "SELECT dingsync.request_action('erp-1', 'agree', 'inst-1', task_id => 61920249919)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let (state, actor): (String, String) =
        sqlx::query_as("SELECT state, actor_user_id FROM dingsync.actions WHERE id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), actor.as_str()), ("pending", "manager1"));
    sqlx::raw_sql(
        "INSERT INTO dingsync.actions (idempotency_key, action, process_instance_id, actor_user_id, remark)
         VALUES ('erp-2', 'comment', 'inst-1', 'fin1', 'paid')",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    for (column, value) in [
        ("state", "'done'"),
        ("attempts", "1"),
        ("superseded_how", "'AGREE'"),
        ("done_at", "now()"),
    ] {
        let (code, _) = refusal(
            &app.pool,
            &format!(
                "INSERT INTO dingsync.actions (idempotency_key, action, process_instance_id, actor_user_id, remark, {column})
                 VALUES ('forged-{column}', 'comment', 'inst-1', 'fin1', 'x', {value})"
            ),
        )
        .await;
        assert_eq!(code, "42501", "{column} was accepted from the app");
    }
    let (code, _) = refusal(&app.pool, "UPDATE dingsync.actions SET state = 'cancelled'").await;
    assert_eq!(code, "42501");
    // The reporting role sees the view, not the table.
    let report = LoginRole::create(&db, &pool, Some("dingsync_report")).await;
    assert_eq!(
        count(&report.pool, "SELECT count(*) FROM dingsync.report_actions").await,
        2
    );
    let (code, _) = refusal(&report.pool, "SELECT * FROM dingsync.actions").await;
    assert_eq!(code, "42501");
}

#[tokio::test]
async fn an_app_role_may_name_self_selected_approvers_in_a_call_or_an_insert() {
    let (db, pool) = migrated(Some(CORP_ID)).await;
    let app = LoginRole::create(&db, &pool, Some("dingsync_app")).await;
    let requested: i64 = sqlx::query_scalar(&format!(
        "SELECT dingsync.request_approval('sel-1', 'PROC-1', 'emp1', {FORM},
             select_approvers => '{{\"manual_1\": [\"fin1\"]}}')"
    ))
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let inserted: i64 = sqlx::query_scalar(&format!(
        "INSERT INTO dingsync.outbox (idempotency_key, process_code, originator_user_id,
                                      form_values, select_approvers)
         VALUES ('sel-2', 'PROC-1', 'emp1', {FORM}, '{{\"manual_1\": [\"emp3\"]}}')
         RETURNING id"
    ))
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        count(
            &pool,
            &format!(
                "SELECT count(*) FROM dingsync.outbox WHERE id IN ({requested}, {inserted})
                 AND state = 'pending' AND select_approvers ? 'manual_1'"
            )
        )
        .await,
        2
    );
    // A malformed one is refused for an app role as for anyone, naming the field.
    let (code, _) = refusal(
        &app.pool,
        &format!(
            "SELECT dingsync.request_approval('sel-3', 'PROC-1', 'emp1', {FORM},
                 select_approvers => '[\"fin1\"]')"
        ),
    )
    .await;
    assert_eq!(
        code, "23514",
        "a malformed select_approvers is a check_violation"
    );
}
