//! Simulated-month benchmark (a program that reports figures, not a test): what dingsync spends
//! of an organisation's monthly allowances (docs/dingtalk.md §7) over a whole month, on a
//! compressed clock.
//!
//! A daemon with the embedded emulator runs with `emulator.time_scale` = one day in
//! `--day-seconds` real seconds (20 by default: a month in ten minutes); the daemon's planning
//! clock runs at the same pace (`clock::Clock`), so its days, months and allowances are the
//! emulator's. The emulator enforces the standard edition's allowances (5,000 calls, and the
//! scenario's deliveries) and loses 1% of pushes for good (no retry, not in the failed list).
//!
//! Each scenario waits for the next Beijing month on that clock, then a business app requests
//! the scenario's approvals through `dingsync.request_approval`, evenly over the month, each with
//! three approvers in sequence who decide (95% agree) after one hour to two days each
//! (log-uniform). At the month's end it prints calls and deliveries by API and purpose (the
//! daemon's ledger and the emulator's own count), calls per approval, idle calls per day (the
//! first days, before any approval), approvals wrong at month end (status, result or any task
//! differing from the emulator), outbox rows not created, and 90020 answers received. Then the
//! month rolls over and it waits for one reconciliation pass, and prints how many are still
//! wrong.
//!
//! Scenarios: 300 approvals (deliveries within the allowance) and 1,000 approvals with 3,000
//! deliveries (they run out mid-month, so the daemon must notice and poll).
//!
//! ```sh
//! cargo bench --bench month -- [--day-seconds 20] [--scenario 300|1000|all] [--idle-days 3]
//!     [--api-family legacy|v1]
//! ```
//! Needs the local PostgreSQL (or DINGSYNC_TEST_DATABASE_URL).

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use chrono::{DateTime, TimeDelta, Utc};
use common::{drop_database, server_url};
use dingsync::{
    app::{App, EMULATOR_CORP_ID},
    clock::{self, Clock},
    config::{ApiFamily, Config, Secret},
    ledger::Purpose,
};
use dingsync_emulator::{Faults, Handle, PushFaults, TaskAction};
use rand::{Rng, SeedableRng, rngs::StdRng};
use sqlx::PgPool;

const CODE: &str = "PROC-EMU-EXPENSE";
/// The timeline printed for the month's last days: how many, and every how many hours.
const TIMELINE_DAYS: i64 = 2;
const TIMELINE_EVERY_H: i64 = 3;

/// Whether a ledger purpose is live work (not paced by the planner).
fn live_purpose(name: &str) -> bool {
    Purpose::ALL
        .into_iter()
        .any(|p| p.name() == name && p.is_live())
}
const APPROVERS: [&str; 3] = ["manager1", "fin1", "boss1"];

struct Args {
    day_seconds: f64,
    scenario: String,
    idle_days: f64,
    api_family: ApiFamily,
}

fn args() -> Args {
    let mut a = Args {
        day_seconds: 20.0,
        scenario: "all".into(),
        idle_days: 3.0,
        api_family: ApiFamily::Legacy,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let value = || argv.get(i + 1).cloned().expect("flag needs a value");
        match argv[i].as_str() {
            "--day-seconds" => a.day_seconds = value().parse().expect("a number"),
            "--scenario" => a.scenario = value(),
            "--idle-days" => a.idle_days = value().parse().expect("a number"),
            "--api-family" => {
                a.api_family = match value().as_str() {
                    "legacy" => ApiFamily::Legacy,
                    "v1" => ApiFamily::V1,
                    other => panic!("--api-family legacy|v1, not {other}"),
                }
            }
            _ => {} // cargo bench passes --bench
        }
        i += if argv[i].starts_with("--") && argv[i] != "--bench" {
            2
        } else {
            1
        };
    }
    a
}

struct Scenario {
    approvals: usize,
    monthly_calls: u64,
    monthly_deliveries: u64,
}

fn config(db_url: &str, s: &Scenario, scale: f64, api_family: ApiFamily) -> Config {
    let mut c = Config::default();
    c.dingtalk.api_family = api_family;
    c.database.url = Secret::new(db_url);
    c.server.listen = "127.0.0.1:0".into();
    c.dingtalk.api_base = "emulator".into();
    c.dingtalk.monthly_calls = s.monthly_calls;
    c.dingtalk.monthly_deliveries = s.monthly_deliveries;
    c.emulator.time_scale = scale;
    // The rate budget counts real seconds: on a clock 4,000 times faster it would be 4,000 times
    // stricter than DingTalk's per-second limit, and the month's calls would queue behind it.
    c.dingtalk.qps = 0;
    c.emulator.people_pace_ms = 0;
    c.emulator.seed = 14;
    c.emulator.monthly_calls = s.monthly_calls;
    c.emulator.monthly_deliveries = s.monthly_deliveries;
    // Polling finds approvals no event announced by listing this template.
    c.reconcile.process_codes = vec![CODE.into()];
    // The jobs decide every second (72 minutes of the month at 20 s a day); what they spend is
    // the planner's decision, not the cron's.
    for schedule in [
        &mut c.scheduler.details,
        &mut c.scheduler.sweep,
        &mut c.scheduler.failed,
    ] {
        *schedule = "* * * * * *".into();
    }
    c
}

/// Sleeps until the clock reads `at`.
async fn until(clock: &Clock, at: DateTime<Utc>) {
    loop {
        let left = at - clock.now();
        if left <= TimeDelta::zero() {
            return;
        }
        let real = clock.real_duration(left.to_std().unwrap_or_default());
        tokio::time::sleep(real.min(Duration::from_millis(50))).await;
    }
}

/// Approvals whose status or result differ from the emulator's (missing rows count too), and
/// approvals right in themselves but with a task that differs.
struct Wrong {
    instances: usize,
    approvals: Vec<String>,
    tasks_only: Vec<String>,
}

async fn wrong(emu: &Handle, pool: &PgPool) -> Wrong {
    let mut wrong = Vec::new();
    let mut tasks_only = Vec::new();
    let instances = emu.instances();
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT process_instance_id, status, result FROM dingsync.approvals WHERE corp_id = $1",
    )
    .bind(EMULATOR_CORP_ID)
    .fetch_all(pool)
    .await
    .unwrap();
    let approvals: HashMap<String, (String, Option<String>)> =
        rows.into_iter().map(|(id, s, r)| (id, (s, r))).collect();
    let tasks: Vec<(i64, String, Option<String>)> = sqlx::query_as(
        "SELECT task_id, status, result FROM dingsync.approval_tasks WHERE corp_id = $1",
    )
    .bind(EMULATOR_CORP_ID)
    .fetch_all(pool)
    .await
    .unwrap();
    let tasks: HashMap<i64, (String, Option<String>)> =
        tasks.into_iter().map(|(id, s, r)| (id, (s, r))).collect();
    for i in &instances {
        let ok_instance = approvals
            .get(&i.process_instance_id)
            .is_some_and(|(s, r)| s == i.status.as_str() && r.as_deref() == i.result);
        let ok_tasks = i.tasks.iter().all(|t| {
            tasks.get(&t.taskid).is_some_and(|(s, r)| {
                s == t.status.as_str() && r.as_deref().unwrap_or("NONE") == t.result.as_str()
            })
        });
        if !ok_instance {
            let db = approvals.get(&i.process_instance_id);
            wrong.push(format!(
                "{}: status {:?} in the database, {} {:?} in DingTalk",
                i.process_instance_id,
                db,
                i.status.as_str(),
                i.result
            ));
        } else if !ok_tasks {
            let t: Vec<String> = i
                .tasks
                .iter()
                .map(|t| {
                    format!(
                        "{}: {:?} vs {} {}",
                        t.taskid,
                        tasks.get(&t.taskid),
                        t.status.as_str(),
                        t.result.as_str()
                    )
                })
                .collect();
            tasks_only.push(format!("{}: tasks {t:?}", i.process_instance_id));
        }
    }
    Wrong {
        instances: instances.len(),
        approvals: wrong,
        tasks_only,
    }
}

/// One scenario, start to end.
async fn run(s: &Scenario, args: &Args) {
    let scale = args.day_seconds / 86_400.0;
    let name = format!(
        "dingsync_bench_month_{}_{}",
        s.approvals,
        std::process::id()
    );
    let url = format!("{}/{name}", server_url());
    drop_database(&name).await;
    let app = App::start(config(&url, s, scale, args.api_family))
        .await
        .unwrap();
    let clock = app.ledger.clock();
    let emu = app.emulator.as_ref().unwrap().state().clone();
    emu.set_faults(Faults {
        push: PushFaults {
            drop_forever_rate: 0.01,
            ..PushFaults::default()
        },
        ..Faults::default()
    });
    let pool = app.pool.clone();
    let mut rng = StdRng::seed_from_u64(s.approvals as u64);

    // The month: from the next Beijing month start on the daemon's clock.
    let (_, month_start) = clock::month_span(clock.now());
    let (_, month_end) = clock::month_span(month_start);
    println!(
        "scenario {} approvals, API family {:?}: waiting {:.0} s for the month {} (one day = {} s)",
        s.approvals,
        args.api_family,
        clock
            .real_duration((month_start - clock.now()).to_std().unwrap_or_default())
            .as_secs_f64(),
        clock::day(month_start),
        args.day_seconds
    );
    until(&clock, month_start).await;
    emu.rollover();
    let idle_end = month_start + TimeDelta::seconds((args.idle_days * 86_400.0) as i64);
    let busy = month_end - idle_end;
    let created_at: Vec<DateTime<Utc>> = (0..s.approvals)
        .map(|k| idle_end + busy * (k as i32) / (s.approvals as i32 + 1))
        .collect();
    until(&clock, idle_end).await;
    let idle_usage = app.ledger.month(EMULATOR_CORP_ID, idle_end).await.unwrap();
    let idle_calls = idle_usage.metered_calls();

    // The business app and the approvers, until the month ends.
    let mut next = 0;
    let mut due: BTreeMap<i64, DateTime<Utc>> = BTreeMap::new();
    // The month's last days, every few hours: where the calls stand and how many approvals are
    // wrong at that moment (whether checks go on until the month's last hour).
    let timeline_from = month_end - TimeDelta::days(TIMELINE_DAYS);
    let mut timeline_at = timeline_from;
    let mut budget_runs = 0;
    println!("the month's last {TIMELINE_DAYS} days (Beijing time):");
    println!("  time         metered  background today  sweep runs out of budget  wrong now");
    loop {
        let now = clock.now();
        if now >= month_end {
            break;
        }
        if now >= timeline_at {
            timeline_at += TimeDelta::hours(TIMELINE_EVERY_H);
            let usage = app.ledger.month(EMULATOR_CORP_ID, now).await.unwrap();
            let today = clock::day(now);
            let background = usage.sum(|r| {
                r.kind == "call" && r.metered && r.day == today && !live_purpose(&r.purpose)
            });
            let runs: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM dingsync.job_runs WHERE job = 'sweep' AND counts ? 'budget'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            let w = wrong(&emu, &pool).await;
            println!(
                "  {}  {:>7}  {:>16}  {:>24}  {:>9}",
                (now + TimeDelta::hours(8)).format("%d %H:%M"),
                usage.metered_calls(),
                background,
                runs - budget_runs,
                w.approvals.len()
            );
            budget_runs = runs;
        }
        while next < created_at.len() && created_at[next] <= now {
            let form = serde_json::json!([
                {"name": "Reason", "value": format!("month bench {next}")},
                {"name": "Amount", "value": 100 + next},
            ]);
            let approvers = serde_json::json!(
                APPROVERS
                    .iter()
                    .map(|u| serde_json::json!({"action": "NONE", "user_ids": [u]}))
                    .collect::<Vec<_>>()
            );
            sqlx::query("SELECT dingsync.request_approval($1, $2, $3, $4, approvers => $5)")
                .bind(format!("month-{next}"))
                .bind(CODE)
                .bind("emp1")
                .bind(&form)
                .bind(&approvers)
                .execute(&pool)
                .await
                .unwrap();
            next += 1;
        }
        for open in emu.open_tasks() {
            let at = *due.entry(open.task.taskid).or_insert_with(|| {
                // One hour to two days, log-uniform.
                let hours = (rng.random_range(0.0f64..(48f64).ln())).exp();
                now + TimeDelta::seconds((hours * 3600.0) as i64)
            });
            if at <= now {
                let act = TaskAction::default();
                let _ = if rng.random_bool(0.95) {
                    emu.agree(open.task.taskid, act)
                } else {
                    emu.refuse(open.task.taskid, act)
                };
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Month end: what the month cost, and how right the database is.
    let usage = app
        .ledger
        .month(EMULATOR_CORP_ID, month_end - TimeDelta::seconds(1))
        .await
        .unwrap();
    let quota = emu.quota();
    let at_end = wrong(&emu, &pool).await;
    let outbox: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM dingsync.outbox GROUP BY state ORDER BY state")
            .fetch_all(&pool)
            .await
            .unwrap();
    let calls = usage.metered_calls();
    let creates = usage.sum(|r| r.kind == "call" && r.purpose == "outbox");
    println!(
        "\n== {} approvals, month {} ==",
        s.approvals,
        clock::day(month_start)
    );
    println!("calls by API and purpose (dingsync's ledger):");
    for ((kind, api, purpose), n) in usage.by_api_and_purpose() {
        println!("  {kind:<9} {api:<45} {purpose:<9} {n:>6}");
    }
    println!(
        "metered calls {calls} of {} (emulator counted {}, refused with 90020: {}); deliveries {} of {} (emulator: {} delivered, {} not delivered)",
        s.monthly_calls,
        quota.calls.used,
        quota.calls.refused,
        usage.deliveries(),
        s.monthly_deliveries,
        quota.deliveries.used,
        quota.deliveries.undelivered,
    );
    println!(
        "idle: {idle_calls} calls in {} days = {:.1} a day",
        args.idle_days,
        idle_calls as f64 / args.idle_days
    );
    println!(
        "per approval: {:.2} calls over its life besides its create ({creates} creates, {} approvals)",
        (calls - creates - idle_calls) as f64 / s.approvals as f64,
        s.approvals
    );
    println!(
        "wrong at month end: {} of {} approvals ({:.2}%) with another status or result than DingTalk's; {} more right but with a task behind; outbox rows by state: {outbox:?}",
        at_end.approvals.len(),
        at_end.instances,
        100.0 * at_end.approvals.len() as f64 / at_end.instances.max(1) as f64,
        at_end.tasks_only.len(),
    );
    for w in at_end.approvals.iter().chain(&at_end.tasks_only).take(6) {
        println!("  {w}");
    }

    // The next month: one reconciliation pass.
    emu.rollover();
    let deadline = month_end + TimeDelta::days(2);
    let mut still = at_end;
    while clock.now() < deadline {
        still = wrong(&emu, &pool).await;
        if still.approvals.is_empty() && still.tasks_only.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "after the rollover and one reconciliation pass: {} approvals wrong, {} with a task behind ({:.1} days into the next month)",
        still.approvals.len(),
        still.tasks_only.len(),
        (clock.now() - month_end).num_seconds() as f64 / 86_400.0
    );
    for w in still.approvals.iter().chain(&still.tasks_only).take(6) {
        println!("  {w}");
    }
    app.stop().await.unwrap();
    drop_database(&name).await;
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter("warn,dingsync=info")
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let scenarios = [
        Scenario {
            approvals: 300,
            monthly_calls: 5_000,
            monthly_deliveries: 3_000,
        },
        Scenario {
            approvals: 1_000,
            monthly_calls: 5_000,
            monthly_deliveries: 3_000,
        },
    ];
    runtime.block_on(async {
        for s in &scenarios {
            if args.scenario == "all" || args.scenario == s.approvals.to_string() {
                run(s, &args).await;
            }
        }
    });
}
