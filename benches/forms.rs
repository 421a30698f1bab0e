//! What the typed form views cost a DBA: 1,000,000 approvals across 20 templates generated in
//! the database (realistic form values: text, money, a date, a select, departments, a multi
//! select, a table of 1-3 line items; 2% of the money and date values malformed), then three
//! report queries on one template's view (50,000 approvals), each timed on the plain views and
//! again with the expression indexes `[forms] indexes` builds; and the time to regenerate all 20
//! templates' views.
//!
//! Run: `cargo bench --bench forms` (PostgreSQL from `DINGSYNC_TEST_DATABASE_URL`, default the
//! local one; its database `dingsync_bench_forms` is dropped at the end). `FORMS_APPROVALS`
//! changes the number of approvals; `FORMS_KEEP=1` keeps the database. Prints figures; asserts nothing about time.

mod common;

use std::time::{Duration, Instant};

use dingsync::{
    config::{Config, FormsConfig, Secret},
    dingtalk,
    forms::FormSchema,
    jobs::Context,
    reconcile::forms as job,
    store::{self, forms as forms_store},
};
use serde_json::{Value, json};
use sqlx::PgPool;

const DATABASE: &str = "dingsync_bench_forms";
const CORP: &str = "dingbenchcorp0000001";
const TEMPLATES: usize = 20;
/// Rows inserted per statement.
const CHUNK: i64 = 100_000;
/// Each query's time is the median of this many runs (after one to warm the cache).
const RUNS: usize = 5;

fn item(id: &str, component: &str, label: &str, extra: Value) -> Value {
    let mut props = json!({"id": id, "label": label, "bizAlias": ""});
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            props[k] = v;
        }
    }
    json!({"componentName": component, "props": props})
}

/// The form of every benchmark template: the controls of a typical expense claim.
fn schema_items() -> Vec<Value> {
    let mut items = item("TableField-I", "TableField", "明细", json!({}));
    items["children"] = json!([
        item("TextField-I1", "TextField", "品名", json!({})),
        item("NumberField-I2", "NumberField", "数量", json!({})),
        item("MoneyField-I3", "MoneyField", "单价", json!({})),
    ]);
    vec![
        item(
            "TextField-R",
            "TextField",
            "Reason",
            json!({"bizAlias": "reason", "required": true}),
        ),
        item(
            "MoneyField-A",
            "MoneyField",
            "Amount",
            json!({"bizAlias": "amount"}),
        ),
        item(
            "DDDateField-D",
            "DDDateField",
            "Date",
            json!({"bizAlias": "spent_on", "format": "yyyy-MM-dd"}),
        ),
        item(
            "DDSelectField-T",
            "DDSelectField",
            "Type",
            json!({"bizAlias": "type",
            "options": ["{\"value\":\"差旅\",\"key\":\"option_0\"}", "{\"value\":\"办公\",\"key\":\"option_1\"}", "{\"value\":\"招待\",\"key\":\"option_2\"}", "{\"value\":\"培训\",\"key\":\"option_3\"}", "{\"value\":\"其他\",\"key\":\"option_4\"}"]}),
        ),
        item(
            "DepartmentField-C",
            "DepartmentField",
            "CostCenter",
            json!({"bizAlias": "cost_center"}),
        ),
        item(
            "DDMultiSelectField-G",
            "DDMultiSelectField",
            "Tags",
            json!({}),
        ),
        item("TextareaField-M", "TextareaField", "Remark", json!({})),
        items,
    ]
}

/// `INSERT` of approvals `from..to` (template = n % 20), form values built in SQL.
fn insert_sql(from: i64, to: i64) -> String {
    format!(
        r#"INSERT INTO dingsync.approvals (corp_id, process_instance_id, process_code, title,
               business_id, originator_userid, originator_dept_id, status, result, form_values,
               created_at, finished_at, detail_synced_at)
        SELECT '{CORP}', 'pi-' || n, 'PROC-BENCH-' || lpad((n % {TEMPLATES})::text, 2, '0'),
               'user' || ((h / 41) % 500) || '提交的报销', n::text, 'user' || ((h / 41) % 500), (100 + (h / 43) % 7)::text,
               status, CASE WHEN status = 'COMPLETED' THEN CASE WHEN (h / 37) % 9 = 0 THEN 'refuse' ELSE 'agree' END END,
               jsonb_build_array(
                   jsonb_build_object('id', 'TextField-R', 'name', 'Reason', 'value', '出差 客户拜访 #' || (n % 997), 'ext_value', '', 'component_type', 'TextField'),
                   jsonb_build_object('id', 'MoneyField-A', 'name', 'Amount', 'value',
                       CASE WHEN (h / 11) % 100 = 0 THEN '¥' || (h % 5000) WHEN (h / 11) % 100 = 1 THEN '1,' || lpad((h % 1000)::text, 3, '0') || '.50'
                            ELSE ((h / 13) % 500000 / 100.0)::text END, 'ext_value', '', 'component_type', 'MoneyField'),
                   jsonb_build_object('id', 'DDDateField-D', 'name', 'Date', 'value',
                       CASE WHEN (h / 11) % 100 = 2 THEN '下周二' ELSE to_char(date '2026-01-01' + ((h / 17) % 365)::int, 'YYYY-MM-DD') END, 'ext_value', '', 'component_type', 'DDDateField'),
                   jsonb_build_object('id', 'DDSelectField-T', 'name', 'Type', 'value', (ARRAY['差旅','办公','招待','培训','其他'])[1 + (h / 7) % 5],
                       'ext_value', '{{"label":"x","key":"option_0"}}', 'component_type', 'DDSelectField'),
                   jsonb_build_object('id', 'DepartmentField-C', 'name', 'CostCenter', 'value', (100 + (h / 43) % 7)::text, 'ext_value', '', 'component_type', 'DepartmentField'),
                   jsonb_build_object('id', 'DDMultiSelectField-G', 'name', 'Tags', 'value', '["IT","紧急"]', 'ext_value', '', 'component_type', 'DDMultiSelectField'),
                   jsonb_build_object('id', 'TextareaField-M', 'name', 'Remark', 'value', CASE WHEN h % 3 = 0 THEN 'null' ELSE '详见附件' END, 'ext_value', '', 'component_type', 'TextareaField'),
                   jsonb_build_object('id', 'TableField-I', 'name', '明细', 'ext_value', '', 'component_type', 'TableField', 'value',
                       (SELECT jsonb_agg(jsonb_build_object('rowNumber', 'row' || r, 'rowValue', jsonb_build_array(
                            jsonb_build_object('key', 'TextField-I1', 'label', '品名', 'value', (ARRAY['笔记本','显示器','机票','酒店','午餐'])[1 + (h / 23 + r) % 5], 'componentType', 'TextField'),
                            jsonb_build_object('key', 'NumberField-I2', 'label', '数量', 'value', (1 + (h / 19 + r) % 4)::text, 'componentType', 'NumberField'),
                            jsonb_build_object('key', 'MoneyField-I3', 'label', '单价', 'value', ((h / 29 + r * 17) % 100000 / 100.0)::text, 'componentType', 'MoneyField'))))::text
                        FROM generate_series(1, 1 + (h / 31) % 3) r))
               ),
               created, CASE WHEN status <> 'RUNNING' THEN created + interval '5 hours' END, created
        FROM (SELECT n, h, timestamptz '2026-01-01 00:00+08' + (h % 365) * interval '1 day' + (h % 86400) * interval '1 second' AS created,
                     CASE WHEN h % 10 < 8 THEN 'COMPLETED' WHEN h % 10 = 8 THEN 'RUNNING' ELSE 'TERMINATED' END AS status
              FROM (SELECT n, abs(hashint8(n)::bigint) AS h FROM generate_series({from}, {to}) n) g) s"#
    )
}

const QUERIES: [(&str, &str); 3] = [
    (
        "1 money > 1000 in Q3 by type",
        "SELECT type, count(*), sum(amount) FROM dingsync_forms.form_01
         WHERE amount > 1000 AND spent_on >= date '2026-07-01' AND spent_on < date '2026-10-01'
         GROUP BY type ORDER BY type",
    ),
    (
        "2 line items of approved claims, top 10 items",
        "SELECT i.品名, count(*), sum(i.数量 * i.单价) AS total
         FROM dingsync_forms.form_01 f
         JOIN dingsync_forms.form_01_明细 i USING (corp_id, process_instance_id)
         WHERE f.status = 'COMPLETED' AND f.result = 'agree'
           AND f.spent_on >= date '2026-10-01' AND f.spent_on < date '2027-01-01'
         GROUP BY i.品名 ORDER BY total DESC LIMIT 10",
    ),
    (
        "3 the 50 largest claims (>= 4990)",
        "SELECT process_instance_id, originator_userid, amount, reason FROM dingsync_forms.form_01
         WHERE amount >= 4990 ORDER BY amount DESC LIMIT 50",
    ),
];

async fn median_ms(pool: &PgPool, sql: &str) -> (f64, usize) {
    let rows = sqlx::query(sql).fetch_all(pool).await.unwrap().len();
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let started = Instant::now();
        sqlx::query(sql).fetch_all(pool).await.unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    (ms(times[RUNS / 2]), rows)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let approvals: i64 = std::env::var("FORMS_APPROVALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    common::drop_database(DATABASE).await;
    let mut config = Config::default();
    config.database.url = Secret::new(format!("{}/{DATABASE}", common::server_url()));
    config.dingtalk.corp_id = CORP.into();
    let pool = store::connect_and_migrate(&config.database).await.unwrap();
    let client =
        dingtalk::Client::new(pool.clone(), &config.dingtalk, "http://127.0.0.1:9").unwrap();
    let mut forms = FormsConfig::default();
    for t in 0..TEMPLATES {
        forms
            .names
            .insert(format!("PROC-BENCH-{t:02}"), format!("form_{t:02}"));
    }
    let ctx = Context::new(
        pool.clone(),
        client,
        CORP,
        &config.reconcile,
        &config.retention,
    )
    .with_forms(&forms);

    println!(
        "forms benchmark: {approvals} approvals across {TEMPLATES} templates (machine: {} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let started = Instant::now();
    let mut from = 1;
    while from <= approvals {
        let to = (from + CHUNK - 1).min(approvals);
        sqlx::raw_sql(&insert_sql(from, to))
            .execute(&pool)
            .await
            .unwrap();
        from = to + 1;
    }
    sqlx::raw_sql("VACUUM ANALYZE dingsync.approvals")
        .execute(&pool)
        .await
        .unwrap();
    let size: String =
        sqlx::query_scalar("SELECT pg_size_pretty(pg_total_relation_size('dingsync.approvals'))")
            .fetch_one(&pool)
            .await
            .unwrap();
    println!(
        "  generated in {:.1} s ({size} with indexes)",
        started.elapsed().as_secs_f64()
    );

    let schema = FormSchema::from_result(
        &json!({"name": "报销", "schemaContent": {"items": schema_items()}}),
    )
    .unwrap();
    let controls = serde_json::to_value(&schema.controls).unwrap();
    for t in 0..TEMPLATES {
        let now = store::server_time(&pool).await.unwrap();
        forms_store::store_version(
            &pool,
            CORP,
            &format!("PROC-BENCH-{t:02}"),
            now,
            forms_store::FetchedSchema {
                fingerprint: &schema.fingerprint(),
                name: "报销",
                modified: None,
                controls: &controls,
            },
        )
        .await
        .unwrap();
    }
    let started = Instant::now();
    let (regenerated, _) = job::regenerate(&ctx).await.unwrap();
    println!(
        "  first generation of all views: {regenerated} templates, {:.0} ms",
        ms(started.elapsed())
    );
    sqlx::raw_sql("UPDATE dingsync.form_templates SET view_hash = NULL")
        .execute(&pool)
        .await
        .unwrap();
    let started = Instant::now();
    let (regenerated, _) = job::regenerate(&ctx).await.unwrap();
    println!(
        "  regenerating all views (replaced in place): {regenerated} templates, {:.0} ms",
        ms(started.elapsed())
    );
    let per_view: i64 = sqlx::query_scalar("SELECT count(*) FROM dingsync_forms.form_01")
        .fetch_one(&pool)
        .await
        .unwrap();
    println!("  form_01 has {per_view} approvals\n");

    let mut plain = Vec::new();
    for (name, sql) in QUERIES {
        let (t, rows) = median_ms(&pool, sql).await;
        plain.push(t);
        println!("  plain view    query {name}: {t:8.1} ms ({rows} rows)");
    }

    let mut indexed_forms = forms.clone();
    indexed_forms.indexes = vec!["form_01.amount".into(), "form_01.spent_on".into()];
    let indexed_ctx = ctx.clone().with_forms(&indexed_forms);
    let started = Instant::now();
    let (_, built) = job::regenerate(&indexed_ctx).await.unwrap();
    println!(
        "\n  {built} expression indexes (form_01.amount, form_01.spent_on) built concurrently in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    sqlx::raw_sql("ANALYZE dingsync.approvals")
        .execute(&pool)
        .await
        .unwrap();
    for ((name, sql), before) in QUERIES.iter().zip(plain) {
        let (t, rows) = median_ms(&pool, sql).await;
        println!("  with indexes  query {name}: {t:8.1} ms ({rows} rows; plain {before:.1} ms)");
    }
    let malformed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dingsync_forms.form_01 WHERE _parse_errors IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    println!(
        "\n  form_01 approvals with a value that did not parse (NULL, kept in _parse_errors): {malformed}"
    );
    pool.close().await;
    if std::env::var_os("FORMS_KEEP").is_none() {
        common::drop_database(DATABASE).await;
    }
}
