//! Forms as typed views (schema `dingsync_forms`, migration V21): a view appears once a template
//! has an approval; every control type goes from `request_approval` through the emulator's
//! DingTalk and back into its typed column; whatever text a value holds, a query on a view never
//! fails; a schema change evolves the view (a renamed control keeps its column, a new one adds
//! one, a removed one stays); `dingsync_report` reads every view; a schema is fetched per
//! template, never per approval.

mod common;

use std::{str::FromStr, time::Duration};

use chrono::{DateTime, Utc};
use common::*;
use dingsync::{
    config::Config,
    dingtalk,
    forms::FormSchema,
    jobs::Context,
    reconcile::forms as job,
    store::{self, forms as forms_store},
};
use dingsync_emulator::{Handle, StartInstance};
use serde_json::{Value, json};
use sqlx::{
    PgPool, Row,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// Against the database alone: schemas stored by hand, approvals inserted by hand.

/// A migrated database and a jobs context whose client is never called.
async fn offline() -> (TestDb, Context) {
    install_crypto_provider();
    let db = TestDb::new();
    let config = test_config(&db.url);
    let pool = store::connect_and_migrate(&config.database).await.unwrap();
    let client =
        dingtalk::Client::new(pool.clone(), &config.dingtalk, "http://127.0.0.1:9").unwrap();
    let ctx = Context::new(pool, client, CORP_ID, &config.reconcile, &config.retention)
        .with_forms(&config.forms);
    (db, ctx)
}

fn control(id: &str, component: &str, label: &str) -> Value {
    json!({"componentName": component, "props": {"id": id, "label": label}})
}

/// Stores a schema answer's items as the template's next version, as a fetch would.
async fn store_schema(pool: &PgPool, code: &str, name: &str, items: Vec<Value>) -> i32 {
    let schema =
        FormSchema::from_result(&json!({"name": name, "schemaContent": {"items": items}})).unwrap();
    let started: DateTime<Utc> = store::server_time(pool).await.unwrap();
    let stored = forms_store::store_version(
        pool,
        CORP_ID,
        code,
        started,
        forms_store::FetchedSchema {
            fingerprint: &schema.fingerprint(),
            name: &schema.name,
            modified: None,
            controls: &serde_json::to_value(&schema.controls).unwrap(),
        },
    )
    .await
    .unwrap();
    stored.version
}

async fn insert_approval(pool: &PgPool, code: &str, pid: &str, form_values: Value) {
    sqlx::query(
        "INSERT INTO dingsync.approvals (corp_id, process_instance_id, process_code, status, form_values, created_at)
         VALUES ($1, $2, $3, 'RUNNING', $4, now())",
    )
    .bind(CORP_ID)
    .bind(pid)
    .bind(code)
    .bind(form_values)
    .execute(pool)
    .await
    .unwrap();
}

fn entry(id: &str, name: &str, value: &str) -> Value {
    json!({"id": id, "name": name, "value": value, "ext_value": ""})
}

async fn regenerate(ctx: &Context) {
    job::regenerate(ctx).await.unwrap();
}

/// Columns of a form view: (name, type).
async fn columns(pool: &PgPool, view: &str) -> Vec<(String, String)> {
    forms_store::view_columns(pool, view)
        .await
        .unwrap()
        .into_iter()
        .map(|(n, t, _)| (n, t))
        .collect()
}

async fn column_comment(pool: &PgPool, view: &str, column: &str) -> String {
    forms_store::view_columns(pool, view)
        .await
        .unwrap()
        .into_iter()
        .find(|(n, _, _)| n == column)
        .and_then(|(_, _, c)| c)
        .unwrap_or_else(|| panic!("no comment on {view}.{column}"))
}

fn expense_v1() -> Vec<Value> {
    let mut amount = control("MoneyField-A", "MoneyField", "Amount");
    amount["props"]["bizAlias"] = "amount".into();
    let mut date = control("DDDateField-D", "DDDateField", "Date");
    date["props"]["format"] = "yyyy-MM-dd".into();
    let mut items = control("TableField-T", "TableField", "明细");
    items["children"] = json!([
        control("TextField-C1", "TextField", "品名"),
        control("MoneyField-C2", "MoneyField", "金额"),
    ]);
    vec![
        control("TextField-R", "TextField", "Reason"),
        amount,
        date,
        control("DDSelectField-S", "DDSelectField", "Type"),
        control("DDMultiSelectField-M", "DDMultiSelectField", "Tags"),
        control("DDPhotoField-P", "DDPhotoField", "Receipts"),
        items,
    ]
}

#[tokio::test]
async fn malformed_values_become_null_with_their_text_kept_and_never_break_a_query() {
    let (_db, ctx) = offline().await;
    let pool = ctx.pool();
    store_schema(pool, "PROC-X", "报销", expense_v1()).await;
    insert_approval(
        pool,
        "PROC-X",
        "good",
        json!([
            entry("TextField-R", "Reason", "trip"),
            entry("MoneyField-A", "Amount", "1280.50"),
            entry("DDDateField-D", "Date", "2026-11-28"),
            entry("DDSelectField-S", "Type", "差旅"),
            entry("DDMultiSelectField-M", "Tags", r#"["a","b"]"#),
            entry("DDPhotoField-P", "Receipts", r#"["https://x/a.jpg"]"#),
            entry("TableField-T", "明细", r#"[{"rowValue":[{"key":"TextField-C1","label":"品名","value":"pen"},{"key":"MoneyField-C2","label":"金额","value":"3.5"}],"rowNumber":"r0"}]"#),
        ]),
    )
    .await;
    let deep = "[".repeat(20_000);
    let hostile = [
        ("yuan", "¥12", "2026-02-30", r#"["a""#, "not json"),
        ("thousands", "1,280.50", "next tuesday", "a,b", "{"),
        (
            "exponent",
            "1e99999",
            "0000-01-01",
            deep.as_str(),
            r#""\u0000""#,
        ),
        ("words", "一千", "2026-13-01", "[1,", &deep),
        ("nan", "NaN", "26-1-1", r#"{"a":1}"#, "[[[["),
    ];
    for (pid, amount, date, tags, table) in hostile {
        insert_approval(
            pool,
            "PROC-X",
            pid,
            json!([
                entry("MoneyField-A", "Amount", amount),
                entry("DDDateField-D", "Date", date),
                entry("DDMultiSelectField-M", "Tags", tags),
                entry("DDPhotoField-P", "Receipts", table),
                entry("TableField-T", "明细", table),
            ]),
        )
        .await;
    }
    // Form values of every shape JSON allows, and none.
    for (pid, form) in [
        ("object", json!({"id": "MoneyField-A", "value": "5"})),
        ("string", json!("MoneyField-A")),
        ("number", json!(12)),
        (
            "nulls",
            json!([null, 1, "x", {"id": 7, "value": {"nested": true}}]),
        ),
        ("value-number", json!([{"id": "MoneyField-A", "value": 99}])),
    ] {
        insert_approval(pool, "PROC-X", pid, form).await;
    }
    sqlx::query(
        "INSERT INTO dingsync.approvals (corp_id, process_instance_id, process_code, status) VALUES ($1, 'null', 'PROC-X', 'RUNNING')",
    )
    .bind(CORP_ID)
    .execute(pool)
    .await
    .unwrap();
    regenerate(&ctx).await;

    // Every column of every row, with filters, sorts and aggregates over the typed ones.
    for sql in [
        r#"SELECT * FROM dingsync_forms."报销""#,
        r#"SELECT * FROM dingsync_forms."报销_明细""#,
        r#"SELECT count(*), sum(amount), min(date), max(date) FROM dingsync_forms."报销" WHERE amount > 0 OR date > '2000-01-01'"#,
        r#"SELECT type, sum(amount) FROM dingsync_forms."报销" GROUP BY type ORDER BY 2"#,
        r#"SELECT tags[1], receipts -> 0 FROM dingsync_forms."报销" ORDER BY date NULLS FIRST"#,
        r#"SELECT sum(金额) FROM dingsync_forms."报销_明细" JOIN dingsync_forms."报销" USING (corp_id, process_instance_id)"#,
    ] {
        sqlx::query(sql)
            .fetch_all(pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    // Also when PostgreSQL runs the query in parallel (the JSON parse must not be in one: its
    // exception block is a subtransaction, which no process of a parallel query may start).
    let mut conn = pool.acquire().await.unwrap();
    sqlx::raw_sql(
        "SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0;
         SET max_parallel_workers_per_gather = 2; SET enable_indexscan = off; SET enable_bitmapscan = off",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    for sql in [
        r#"SELECT count(*), sum(amount) FROM dingsync_forms."报销" WHERE amount > 0"#,
        r#"SELECT count(tags), count(receipts), count(_parse_errors) FROM dingsync_forms."报销""#,
        r#"SELECT count(*), sum(金额) FROM dingsync_forms."报销_明细""#,
    ] {
        sqlx::query(sql)
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("parallel {sql}: {e}"));
    }
    drop(conn);

    let good = sqlx::query(
        r#"SELECT amount, date, type, tags, receipts, _parse_errors FROM dingsync_forms."报销" WHERE process_instance_id = 'good'"#,
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let amount: Option<f64> = sqlx::query_scalar(
        r#"SELECT amount::float8 FROM dingsync_forms."报销" WHERE process_instance_id = 'good'"#,
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(amount, Some(1280.5));
    assert_eq!(
        good.get::<Option<Vec<String>>, _>("tags"),
        Some(vec!["a".into(), "b".into()])
    );
    assert_eq!(good.get::<Option<Value>, _>("_parse_errors"), None);

    type Parsed = (String, Option<String>, Option<String>, Option<Value>);
    let rows: Vec<Parsed> = sqlx::query_as(
        r#"SELECT process_instance_id, amount::text, date::text, _parse_errors FROM dingsync_forms."报销"
           WHERE process_instance_id IN ('yuan', 'thousands', 'exponent', 'words', 'nan') ORDER BY 1"#,
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (pid, amount, date, errors) in rows {
        assert_eq!((amount.as_deref(), date.as_deref()), (None, None), "{pid}");
        let errors = errors.unwrap_or_else(|| panic!("{pid}: no _parse_errors"));
        let (_, raw_amount, raw_date, ..) = hostile.iter().find(|h| h.0 == pid).unwrap();
        assert_eq!(errors["amount"], json!(raw_amount), "{pid}");
        assert_eq!(errors["date"], json!(raw_date), "{pid}");
    }
    let items: i64 = sqlx::query_scalar(r#"SELECT count(*) FROM dingsync_forms."报销_明细""#)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(items, 1, "only the good approval has line items");
    let number: Option<f64> = sqlx::query_scalar(
        r#"SELECT amount::float8 FROM dingsync_forms."报销" WHERE process_instance_id = 'value-number'"#,
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        number,
        Some(99.0),
        "a number where text was expected still reads"
    );
}

#[tokio::test]
async fn a_schema_change_renames_nothing_adds_a_column_keeps_a_removed_one_and_comments_say_so() {
    let (_db, ctx) = offline().await;
    let pool = ctx.pool();
    assert_eq!(store_schema(pool, "PROC-X", "报销", expense_v1()).await, 1);
    assert_eq!(
        store_schema(pool, "PROC-X", "报销", expense_v1()).await,
        1,
        "the same controls are the same version"
    );
    insert_approval(
        pool,
        "PROC-X",
        "old",
        json!([
            entry("TextField-R", "Reason", "before"),
            entry("DDSelectField-S", "Type", "办公")
        ]),
    )
    .await;
    regenerate(&ctx).await;
    let before = columns(pool, "报销").await;
    // A DBA's view on top of the form view must survive a regeneration.
    sqlx::raw_sql(r#"CREATE VIEW public.dba_reasons AS SELECT process_instance_id, reason FROM dingsync_forms."报销""#)
        .execute(pool)
        .await
        .unwrap();

    // Version 2: Reason renamed to Purpose, Type removed, Project added.
    let mut v2: Vec<Value> = expense_v1()
        .into_iter()
        .filter(|c| c["props"]["id"] != "DDSelectField-S")
        .collect();
    v2[0]["props"]["label"] = "Purpose".into();
    v2.push(control("TextField-N", "TextField", "Project"));
    assert_eq!(store_schema(pool, "PROC-X", "报销", v2).await, 2);
    insert_approval(
        pool,
        "PROC-X",
        "new",
        json!([
            entry("TextField-R", "Purpose", "after"),
            entry("TextField-N", "Project", "Apollo")
        ]),
    )
    .await;
    regenerate(&ctx).await;
    let after = columns(pool, "报销").await;
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "every column keeps its name, type and place"
    );
    assert_eq!(
        after[before.len()],
        ("project".to_string(), "text".to_string())
    );

    type Evolved = (String, Option<String>, Option<String>, Option<String>);
    let rows: Vec<Evolved> = sqlx::query_as(
        r#"SELECT process_instance_id, reason, type, project FROM dingsync_forms."报销" ORDER BY 1"#,
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            (
                "new".into(),
                Some("after".into()),
                None,
                Some("Apollo".into())
            ),
            (
                "old".into(),
                Some("before".into()),
                Some("办公".into()),
                None
            ),
        ]
    );
    let reason = column_comment(pool, "报销", "reason").await;
    assert!(
        reason.contains("TextField-R")
            && reason.contains("\"Purpose\"")
            && reason.contains("schema versions 1-2"),
        "{reason}"
    );
    let removed = column_comment(pool, "报销", "type").await;
    assert!(removed.contains("not in version 2"), "{removed}");
    let view: String = sqlx::query_scalar(
        r#"SELECT obj_description('dingsync_forms."报销"'::regclass, 'pg_class')"#,
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(
        view.contains("PROC-X") && view.contains("schema version 2"),
        "{view}"
    );
    let dba: i64 = sqlx::query_scalar("SELECT count(*) FROM public.dba_reasons")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(dba, 2);

    // A configured name renames the view (dropped and created again; the DBA's view is in the
    // way, so that regeneration fails and changes nothing).
    let mut forms = dingsync::config::FormsConfig::default();
    forms.names.insert("PROC-X".into(), "expense".into());
    let renamed = ctx.clone().with_forms(&forms);
    assert!(
        job::regenerate(&renamed).await.is_err(),
        "the DBA's dependent view blocks the drop"
    );
    assert_eq!(columns(pool, "报销").await, after, "nothing changed");
    sqlx::raw_sql("DROP VIEW public.dba_reasons")
        .execute(pool)
        .await
        .unwrap();
    job::regenerate(&renamed).await.unwrap();
    assert!(columns(pool, "报销").await.is_empty());
    assert_eq!(columns(pool, "expense").await, after);
    assert!(!columns(pool, "expense_明细").await.is_empty());
}

#[tokio::test]
async fn a_control_whose_type_changes_gets_its_new_type_in_a_recreated_view() {
    let (_db, ctx) = offline().await;
    let pool = ctx.pool();
    store_schema(
        pool,
        "PROC-X",
        "报销",
        vec![control("F-1", "TextField", "Amount")],
    )
    .await;
    regenerate(&ctx).await;
    assert_eq!(columns(pool, "报销").await.last().unwrap().1, "text");
    store_schema(
        pool,
        "PROC-X",
        "报销",
        vec![control("F-1", "MoneyField", "Amount")],
    )
    .await;
    regenerate(&ctx).await;
    assert_eq!(columns(pool, "报销").await.last().unwrap().1, "numeric");
}

/// A LOGIN role of its own for one test, granted `dingsync_report`.
struct ReportRole {
    name: String,
    pool: PgPool,
    admin: PgPool,
}

impl ReportRole {
    async fn create(db: &TestDb, admin: &PgPool) -> ReportRole {
        let name = format!(
            "dingsync_t_{}",
            dingsync::crypto::random_nonce(10).to_lowercase()
        );
        sqlx::raw_sql(&format!(
            "CREATE ROLE {name} LOGIN; GRANT dingsync_report TO {name}"
        ))
        .execute(admin)
        .await
        .unwrap();
        let options = PgConnectOptions::from_str(&db.url).unwrap().username(&name);
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .unwrap();
        ReportRole {
            name,
            pool,
            admin: admin.clone(),
        }
    }

    async fn drop_role(self) {
        self.pool.close().await;
        sqlx::raw_sql(&format!("DROP OWNED BY {0}; DROP ROLE {0}", self.name))
            .execute(&self.admin)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn the_report_role_reads_every_form_view_and_nothing_beneath() {
    let (db, ctx) = offline().await;
    let pool = ctx.pool();
    store_schema(pool, "PROC-X", "报销", expense_v1()).await;
    insert_approval(
        pool,
        "PROC-X",
        "p1",
        json!([
            entry("MoneyField-A", "Amount", "12.5"),
            entry(
                "TableField-T",
                "明细",
                r#"[{"rowValue":[{"key":"MoneyField-C2","label":"金额","value":"2"}]}]"#
            )
        ]),
    )
    .await;
    regenerate(&ctx).await;
    let role = ReportRole::create(&db, pool).await;
    let total: Option<f64> = sqlx::query_scalar(
        r#"SELECT sum(f.amount + i.金额)::float8 FROM dingsync_forms."报销" f JOIN dingsync_forms."报销_明细" i USING (corp_id, process_instance_id)"#,
    )
    .fetch_one(&role.pool)
    .await
    .unwrap();
    assert_eq!(total, Some(14.5));
    let refused = sqlx::query("SELECT * FROM dingsync.approvals")
        .fetch_all(&role.pool)
        .await
        .unwrap_err();
    assert!(store::is_code(&refused, "42501"), "{refused}");
    // A view generated later (a new template) is readable too.
    store_schema(
        pool,
        "PROC-Y",
        "请假",
        vec![control("T-1", "TextField", "Reason")],
    )
    .await;
    regenerate(&ctx).await;
    sqlx::query(r#"SELECT * FROM dingsync_forms."请假""#)
        .fetch_all(&role.pool)
        .await
        .unwrap();
    role.drop_role().await;
}

#[tokio::test]
async fn a_configured_index_serves_a_filter_on_a_typed_column() {
    let (_db, ctx) = offline().await;
    let pool = ctx.pool();
    store_schema(pool, "PROC-X", "报销", expense_v1()).await;
    for i in 0..200 {
        insert_approval(
            pool,
            "PROC-X",
            &format!("p{i}"),
            json!([entry("MoneyField-A", "Amount", &format!("{i}.5"))]),
        )
        .await;
    }
    let forms = dingsync::config::FormsConfig {
        indexes: vec!["报销.amount".into()],
        ..Default::default()
    };
    let ctx = ctx.clone().with_forms(&forms);
    let (_, indexed) = job::regenerate(&ctx).await.unwrap();
    assert_eq!(indexed, 1);
    let (_, again) = job::regenerate(&ctx).await.unwrap();
    assert_eq!(again, 0, "built once");
    sqlx::raw_sql("ANALYZE dingsync.approvals")
        .execute(pool)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    sqlx::raw_sql("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(
        r#"EXPLAIN SELECT count(*) FROM dingsync_forms."报销" WHERE amount > 150"#,
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert!(
        plan.iter().any(|l| l.contains("form_报销_amount")),
        "{plan:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Through the emulator's DingTalk.

/// A daemon with the embedded emulator, the forms job every second, nobody acting in it.
async fn daemon() -> TestApp {
    TestApp::spawn_with(|c: &mut Config| {
        embedded_emulator(c);
        c.emulator.people_pace_ms = 0;
        c.emulator.time_scale = 0.01;
        c.dingtalk.qps = 0;
        c.outbox.poll_ms = 100;
        c.scheduler.details = "* * * * * *".into();
        c.scheduler.forms = "* * * * * *".into();
        c.reconcile.detail_quiet_ms = 50;
        c.forms.check_h = 0;
    })
    .await
}

fn emulator(app: &TestApp) -> Handle {
    app.app
        .as_ref()
        .unwrap()
        .emulator
        .as_ref()
        .unwrap()
        .state()
        .clone()
}

fn ctx(app: &TestApp) -> Context {
    app.app.as_ref().unwrap().jobs.clone().unwrap()
}

/// Waits for the row of `pid` in form view `view` to have `column` set; returns the row as JSON.
async fn view_row(app: &TestApp, view: &str, pid: &str, column: &str) -> Value {
    let sql = format!(
        r#"SELECT to_jsonb(v) FROM dingsync_forms."{view}" v WHERE process_instance_id = $1"#
    );
    eventually(
        Duration::from_secs(30),
        &format!("{view}.{column} of {pid}"),
        || {
            let sql = sql.clone();
            async move {
                // The view may not exist yet: that is an error, not a row.
                let row: Option<Value> = sqlx::query_scalar(&sql)
                    .bind(pid)
                    .fetch_optional(&app.pool)
                    .await
                    .ok()
                    .flatten();
                row.filter(|r| !r[column].is_null())
            }
        },
    )
    .await
}

async fn schema_calls(app: &TestApp) -> usize {
    emulator(app).calls("GET v1.0/workflow/forms/schemas/processCodes")
}

#[tokio::test]
async fn every_control_type_round_trips_from_request_approval_into_its_typed_column() {
    let app = daemon().await;
    let id: i64 = sqlx::query_scalar(
        "SELECT dingsync.request_approval('trip-1', 'PROC-EMU-TRIP', 'emp1', $1)",
    )
    .bind(json!([
        {"name": "出差事由", "value": "客户拜访"},
        {"name": "目的地", "value": "杭州"},
        {"name": ["开始时间", "结束时间"], "value": ["2026-11-28", "2026-11-30"]},
        {"name": "出发时间", "value": "2026-11-28 08:30"},
        {"name": "交通工具", "value": "火车"},
        {"name": "费用类型", "value": ["交通", "住宿"]},
        {"name": "天数", "value": 3},
        {"name": "预计费用", "value": 1280.50},
        {"name": "同行人", "value": ["emp2"]},
        {"name": "所属部门", "value": "100"},
        {"name": "图片", "value": ["https://static.example.com/a.jpg"]},
        {"name": "附件", "value": [{"spaceId": "1", "fileName": "发票.pdf", "fileSize": "20480", "fileType": "pdf", "fileId": "99"}]},
        {"name": "紧急程度", "value": 4},
        {"name": "住址", "value": "浙江省,杭州市,西湖区"},
        {"name": "备注", "value": "第一行\n第二行"},
        {"name": "行程明细", "value": [
            [{"name": "日期", "value": "2026-11-28"}, {"name": "城市", "value": "杭州"}, {"name": "费用", "value": 300}],
            [{"name": "日期", "value": "2026-11-30"}, {"name": "城市", "value": "上海"}, {"name": "费用", "value": "120.5"}]
        ]}
    ]))
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let pid: String = eventually(
        Duration::from_secs(30),
        "the approval is created",
        || async {
            sqlx::query_scalar::<_, Option<String>>(
                "SELECT process_instance_id FROM dingsync.outbox WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap()
        },
    )
    .await;
    let row = view_row(&app, "出差申请", &pid, "出差事由").await;
    assert_eq!(row["出差事由"], "客户拜访");
    assert_eq!(row["目的地"], "杭州");
    assert_eq!(row["开始时间"], "2026-11-28");
    assert_eq!(row["结束时间"], "2026-11-30");
    assert_eq!(
        row["出发时间"], "2026-11-28T00:30:00+00:00",
        "08:30 Beijing time"
    );
    assert_eq!(row["交通工具"], "火车");
    assert_eq!(row["费用类型"], json!(["交通", "住宿"]));
    assert_eq!(row["天数"], json!(3));
    assert_eq!(row["预计费用"], json!(1280.50));
    assert_eq!(row["同行人"], json!(["emp2"]), "people are userids");
    assert_eq!(row["所属部门"], json!(["100"]));
    assert_eq!(row["图片"], json!(["https://static.example.com/a.jpg"]));
    assert_eq!(row["附件"][0]["fileName"], "发票.pdf");
    assert_eq!(row["紧急程度"], json!(4));
    assert_eq!(row["住址"], "浙江省,杭州市,西湖区");
    assert_eq!(row["备注"], "第一行\n第二行");
    assert_eq!(row["_parse_errors"], Value::Null);
    assert_eq!(row["originator_userid"], "emp1");

    let types: Vec<(String, String)> = columns(&app.pool, "出差申请").await;
    let type_of = |c: &str| types.iter().find(|(n, _)| n == c).map(|(_, t)| t.as_str());
    for (column, sql_type) in [
        ("出差事由", "text"),
        ("开始时间", "date"),
        ("出发时间", "timestamp with time zone"),
        ("费用类型", "text[]"),
        ("预计费用", "numeric"),
        ("同行人", "text[]"),
        ("所属部门", "text[]"),
        ("图片", "jsonb"),
        ("附件", "jsonb"),
        ("紧急程度", "numeric"),
    ] {
        assert_eq!(type_of(column), Some(sql_type), "{column}");
    }

    type Item = (i32, Option<String>, Option<String>, Option<f64>);
    let items: Vec<Item> = sqlx::query_as(
        r#"SELECT row_number, 日期::text, 城市, 费用::float8 FROM dingsync_forms."出差申请_行程明细"
           WHERE process_instance_id = $1 ORDER BY row_number"#,
    )
    .bind(&pid)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        items,
        [
            (
                1,
                Some("2026-11-28".into()),
                Some("杭州".into()),
                Some(300.0)
            ),
            (
                2,
                Some("2026-11-30".into()),
                Some("上海".into()),
                Some(120.5)
            ),
        ]
    );
    app.stop().await;
}

#[tokio::test]
async fn a_view_appears_after_the_first_instance_and_evolves_with_its_template() {
    let app = daemon().await;
    let emu = emulator(&app);
    let start = |form: Value| {
        emu.start_instance(StartInstance {
            process_code: "PROC-EMU-EXPENSE".into(),
            originator_userid: "emp1".into(),
            form_values: Some(serde_json::from_value(form).unwrap()),
            ..StartInstance::default()
        })
        .unwrap()
        .process_instance_id
    };
    let first = start(json!([
        {"name": "Reason", "value": "出差杭州"}, {"name": "Amount", "value": "88.80"},
        {"name": "Remark", "value": "before the rename"}, {"name": "Receipts", "value": "[\"https://x/r.jpg\"]"}
    ]));
    let row = view_row(&app, "报销", &first, "amount").await;
    assert_eq!(row["amount"], json!(88.80));
    assert_eq!(row["remark"], "before the rename");
    assert_eq!(schema_calls(&app).await, 1);
    // What README "For DBAs" shows of the embedded default's expense template.
    let names = |cols: Vec<(String, String)>| -> Vec<String> {
        cols.into_iter().map(|(n, t)| format!("{n} {t}")).collect()
    };
    assert_eq!(
        names(columns(&app.pool, "报销").await)[10..],
        [
            "_raw jsonb",
            "_parse_errors jsonb",
            "reason text",
            "amount numeric",
            "expense_type text",
            "expense_date date",
            "remark text",
            "receipts jsonb",
            "cost_center text[]",
        ]
    );
    assert_eq!(
        names(columns(&app.pool, "报销_items").await),
        [
            "corp_id text",
            "process_instance_id text",
            "row_number integer",
            "_raw jsonb",
            "_parse_errors jsonb",
            "item text",
            "amount numeric",
            "date date",
        ]
    );

    // More approvals: no more schema calls.
    for i in 0..3 {
        let pid = start(
            json!([{"name": "Reason", "value": format!("r{i}")}, {"name": "Amount", "value": "1"}]),
        );
        view_row(&app, "报销", &pid, "reason").await;
    }
    job::run(&ctx(&app), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        schema_calls(&app).await,
        1,
        "a schema is fetched per template, not per approval"
    );

    // An administrator renames Remark to Comment: the next approval carries the new label, the
    // schema is fetched again, and the column stays `remark`.
    let template = emu
        .templates()
        .into_iter()
        .find(|t| t.process_code == "PROC-EMU-EXPENSE")
        .unwrap();
    let remark_id = template.control_id(
        template
            .controls
            .iter()
            .find(|c| c.label == "Remark")
            .unwrap(),
    );
    emu.rename_control("PROC-EMU-EXPENSE", &remark_id, "Comment")
        .unwrap();
    let renamed = start(json!([
        {"name": "Reason", "value": "after"}, {"name": "Amount", "value": "2"},
        {"name": "Comment", "value": "after the rename"}
    ]));
    let row = view_row(&app, "报销", &renamed, "remark").await;
    assert_eq!(row["remark"], "after the rename");
    eventually(
        Duration::from_secs(30),
        "the comment names the new label",
        || async {
            let comment = column_comment(&app.pool, "报销", "remark").await;
            comment.contains("\"Comment\"").then_some(())
        },
    )
    .await;
    assert_eq!(schema_calls(&app).await, 2);

    // A new control (added by a re-published template) and a removed one (Receipts).
    let mut template = emu
        .templates()
        .into_iter()
        .find(|t| t.process_code == "PROC-EMU-EXPENSE")
        .unwrap();
    template.controls.retain(|c| c.label != "Receipts");
    let added: dingsync_emulator::Control = serde_json::from_value(json!({
        "component_type": "TextField", "label": "Project", "biz_alias": "project"
    }))
    .unwrap();
    template.controls.push(added);
    template.revision += 1;
    emu.add_template(template).unwrap();
    let newest = start(json!([
        {"name": "Reason", "value": "new"}, {"name": "Amount", "value": "3"}, {"name": "Project", "value": "Apollo"}
    ]));
    let row = view_row(&app, "报销", &newest, "project").await;
    assert_eq!(row["project"], "Apollo");
    assert!(
        row.get("receipts").is_some(),
        "the removed control keeps its column"
    );
    assert_eq!(row["receipts"], Value::Null);
    let versions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dingsync.process_forms WHERE process_code = 'PROC-EMU-EXPENSE'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(versions, 3);
    let old = view_row(&app, "报销", &first, "amount").await;
    assert_eq!(
        old["receipts"],
        json!(["https://x/r.jpg"]),
        "older approvals keep their values"
    );
    app.stop().await;
}

#[tokio::test]
async fn forms_list_and_show_print_the_views_columns_types_and_sample_values() {
    install_crypto_provider();
    let db = TestDb::new();
    let config = test_config(&db.url);
    let pool = store::connect_and_migrate(&config.database).await.unwrap();
    // The shipped config.toml serves the embedded emulator's organisation.
    let corp = dingsync::app::EMULATOR_CORP_ID;
    let client =
        dingtalk::Client::new(pool.clone(), &config.dingtalk, "http://127.0.0.1:9").unwrap();
    let ctx = Context::new(
        pool.clone(),
        client,
        corp,
        &config.reconcile,
        &config.retention,
    );
    let schema =
        FormSchema::from_result(&json!({"name": "报销", "schemaContent": {"items": expense_v1()}}))
            .unwrap();
    let started = store::server_time(&pool).await.unwrap();
    forms_store::store_version(
        &pool,
        corp,
        "PROC-X",
        started,
        forms_store::FetchedSchema {
            fingerprint: &schema.fingerprint(),
            name: &schema.name,
            modified: None,
            controls: &serde_json::to_value(&schema.controls).unwrap(),
        },
    )
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO dingsync.approvals (corp_id, process_instance_id, process_code, status, form_values, created_at)
         VALUES ($1, 'p1', 'PROC-X', 'RUNNING', $2, now())",
    )
    .bind(corp)
    .bind(json!([entry("MoneyField-A", "Amount", "1280.50"), entry("TextField-R", "Reason", "出差杭州")]))
    .execute(&pool)
    .await
    .unwrap();
    job::regenerate(&ctx).await.unwrap();

    let run = |args: &[&str]| {
        let mut command = dingsync_command(args);
        command.env("DINGSYNC_DATABASE_URL", &db.url);
        let output = run_to_end(command);
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(
            output.status.success(),
            "{args:?}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    };
    let list = run(&["forms", "list"]);
    assert!(
        list.contains("PROC-X") && list.contains("dingsync_forms.报销"),
        "{list}"
    );
    let show = run(&["forms", "show", "PROC-X"]);
    for expected in [
        "dingsync_forms.报销",
        "dingsync_forms.报销_明细",
        "amount",
        "numeric",
        "MoneyField-A \"Amount\"",
        "1280.5",
        "出差杭州",
    ] {
        assert!(show.contains(expected), "{expected:?} not in:\n{show}");
    }
    pool.close().await;
}
