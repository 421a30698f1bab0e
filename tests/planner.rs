//! The planner against the embedded emulator on a fast clock (`emulator.time_scale` < 1: the
//! planner's hours pass in seconds) over real HTTP and a real PostgreSQL: an idle daemon spends
//! only the failed-list floor; a lost instance-finish event is caught by the gap check; refused
//! deliveries bring a drain six (clock) minutes later; exhausted deliveries switch to polling,
//! which keeps approvals right, and a push switches back.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dingsync::config::Config;
use dingsync_emulator::{
    Emulator, Faults, Handle, Instance, PushFaults, StartInstance, Task, TaskAction,
};
use serde_json::json;

const FAILED_LIST: &str = "call_back/get_call_back_failed_result";
const GET: &str = "topapi/processinstance/get";
const CODE: &str = "PROC-EMU-EXPENSE";

/// The embedded emulator on a clock `1/scale` times faster, every job every second, nobody
/// acting but the test.
fn fast(c: &mut Config, scale: f64) {
    embedded_emulator(c);
    c.emulator.time_scale = scale;
    c.emulator.people_pace_ms = 0;
    c.emulator.seed = 17;
    c.scheduler.details = "* * * * * *".into();
    c.scheduler.sweep = "* * * * * *".into();
    c.scheduler.failed = "* * * * * *".into();
    c.scheduler.backfill = "0 0 0 1 1 *".into();
    c.reconcile.detail_quiet_ms = 0;
}

fn emulator(app: &TestApp) -> &Emulator {
    app.app.as_ref().unwrap().emulator.as_ref().unwrap()
}

fn start(code: &str, approvers: &[&str]) -> StartInstance {
    StartInstance {
        process_code: code.into(),
        originator_userid: "emp1".into(),
        approvers: Some(approvers.iter().map(|a| a.to_string()).collect()),
        ..StartInstance::default()
    }
}

async fn status(app: &TestApp, pid: &str) -> Option<(String, Option<String>)> {
    sqlx::query_as("SELECT status, result FROM dingsync.approvals WHERE process_instance_id = $1")
        .bind(pid)
        .fetch_optional(&app.pool)
        .await
        .unwrap()
}

async fn mode(app: &TestApp) -> Option<String> {
    sqlx::query_scalar(
        "SELECT state->>'mode' FROM dingsync.sync_state WHERE name = 'planner' AND scope = 'push'",
    )
    .fetch_optional(&app.pool)
    .await
    .unwrap()
    .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_daemon_on_a_fast_clock_spends_only_the_failed_list_floor() {
    let scale = 0.0002; // six hours in 4.3 s
    let app = TestApp::spawn_with(|c| fast(c, scale)).await;
    let started = Instant::now();
    let emu = emulator(&app).state().clone();
    // A bit more than two floors of the planner's clock (six hours each).
    let run = Duration::from_secs_f64(13.0 * 3600.0 * scale);
    eventually(
        run + Duration::from_secs(5),
        "the planner's 13 hours",
        || async { (started.elapsed() >= run).then_some(()) },
    )
    .await;
    let clock_hours = started.elapsed().as_secs_f64() / scale / 3600.0;
    let calls = emu.all_calls();
    let drains = calls.get(FAILED_LIST).copied().unwrap_or(0);
    // The first at once, then one every six hours of the clock: nothing else is due when idle.
    let most = 1 + (clock_hours / 6.0).floor() as usize;
    assert!(
        drains >= 2 && drains <= most,
        "{drains} drains in {clock_hours:.1} clock hours: {calls:?}"
    );
    let other: Vec<_> = calls
        .iter()
        .filter(|(api, _)| {
            !matches!(
                api.as_str(),
                FAILED_LIST | "gettoken" | "call_back/register_call_back"
            )
        })
        .collect();
    assert!(other.is_empty(), "idle calls besides the floor: {other:?}");
    app.stop().await;
}

/// A daemon on a fast clock, and one approval of one approver whose detail fetch (its one `get`
/// so far) has been applied with the approver's task RUNNING.
async fn one_approval_fetched_once() -> (TestApp, Handle, Instance, Task) {
    let app = TestApp::spawn_with(|c| fast(c, 0.001)).await;
    let emu = emulator(&app).state().clone();
    let instance = emu.start_instance(start(CODE, &["manager1"])).unwrap();
    let pid = instance.process_instance_id.clone();
    eventually(Duration::from_secs(15), "the one detail fetch", || async {
        let fetched: Option<bool> = sqlx::query_scalar(
            "SELECT detail_synced_at IS NOT NULL AND EXISTS (SELECT 1 FROM dingsync.approval_tasks t
               WHERE t.process_instance_id = a.process_instance_id AND t.status = 'RUNNING')
             FROM dingsync.approvals a WHERE process_instance_id = $1",
        )
        .bind(&pid)
        .fetch_optional(&app.pool)
        .await
        .unwrap();
        (fetched == Some(true)).then_some(())
    })
    .await;
    assert_eq!(emu.calls(GET), 1);
    let task = emu
        .open_tasks()
        .into_iter()
        .find(|t| t.process_instance_id == pid)
        .unwrap()
        .task;
    (app, emu, instance, task)
}

/// The approver agrees and DingTalk loses every event of it for good.
fn agree_losing_its_events(emu: &Handle, taskid: i64) {
    emu.set_faults(Faults {
        push: PushFaults {
            drop_forever_rate: 1.0,
            ..PushFaults::default()
        },
        ..Faults::default()
    });
    emu.agree(taskid, TaskAction::default()).unwrap();
    emu.reset_faults();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_instance_finish_event_is_caught_by_one_gap_check_and_the_approval_ends_right() {
    let (app, emu, instance, task) = one_approval_fetched_once().await;
    let pid = instance.process_instance_id.clone();
    // DingTalk loses both events of the agree; the task's finish is then pushed by hand, so the
    // instance's finish is the one lost for good.
    agree_losing_its_events(&emu, task.taskid);
    let created = instance.create_time.timestamp_millis();
    let finish = json!({
        "EventType": "bpms_task_change", "processInstanceId": pid, "corpId": app.owner_key,
        "createTime": created, "finishTime": created + 1000, "type": "finish", "result": "agree",
        "staffId": "manager1", "taskId": task.taskid, "processCode": CODE,
    });
    app.push_ok(&finish.to_string()).await;
    let done = eventually(Duration::from_secs(20), "the gap check", || async {
        status(&app, &pid).await.filter(|(s, _)| s == "COMPLETED")
    })
    .await;
    assert_eq!(done.1.as_deref(), Some("agree"));
    assert_eq!(emu.calls(GET), 2, "the detail fetch and one gap check");
    let gap_checks: i16 = sqlx::query_scalar(
        "SELECT gap_checks FROM dingsync.approvals WHERE process_instance_id = $1",
    )
    .bind(&pid)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(gap_checks, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_task_finish_of_a_finished_approval_is_caught_by_one_gap_check() {
    let (app, emu, instance, task) = one_approval_fetched_once().await;
    let pid = instance.process_instance_id.clone();
    // DingTalk loses both events of the agree; the instance's finish is then pushed by hand, so
    // the task's finish is the one lost for good: the approval ends with its task still running.
    agree_losing_its_events(&emu, task.taskid);
    let created = instance.create_time.timestamp_millis();
    let finish = json!({
        "EventType": "bpms_instance_change", "processInstanceId": pid, "corpId": app.owner_key,
        "createTime": created, "finishTime": created + 1000, "type": "finish", "result": "agree",
        "staffId": "emp1", "processCode": CODE,
    });
    app.push_ok(&finish.to_string()).await;
    eventually(Duration::from_secs(20), "the gap check", || async {
        let task_status: Option<String> =
            sqlx::query_scalar("SELECT status FROM dingsync.approval_tasks WHERE task_id = $1")
                .bind(task.taskid)
                .fetch_optional(&app.pool)
                .await
                .unwrap();
        (task_status.as_deref() == Some("COMPLETED")).then_some(())
    })
    .await;
    assert_eq!(
        status(&app, &pid).await.unwrap(),
        ("COMPLETED".to_string(), Some("agree".to_string()))
    );
    assert_eq!(emu.calls(GET), 2, "the detail fetch and one gap check");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_deliveries_bring_a_failed_list_drain_six_clock_minutes_later() {
    let scale = 0.01; // six minutes in 3.6 s, the floor (six hours) far away
    let app = TestApp::spawn_with(|c| fast(c, scale)).await;
    let emu = emulator(&app).state().clone();
    eventually(Duration::from_secs(10), "the first drain", || async {
        (emu.calls(FAILED_LIST) == 1).then_some(())
    })
    .await;
    // As the callback counts a delivery it answered with an error.
    let ledger = app.app.as_ref().unwrap().ledger.clone();
    ledger.delivery(&app.owner_key, "bpms_task_change", false);
    let refused = Instant::now();
    eventually(
        Duration::from_secs(15),
        "a drain after the refusal",
        || async { (emu.calls(FAILED_LIST) == 2).then_some(()) },
    )
    .await;
    let clock_minutes = refused.elapsed().as_secs_f64() / scale / 60.0;
    // Six minutes, plus at most a tick and the ledger's flush (a real second each: 100 clock
    // seconds each) and the runs' own time on a busy machine.
    assert!(
        (6.0..=10.5).contains(&clock_minutes),
        "drained {clock_minutes:.1} clock minutes after the refusal"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_deliveries_switch_to_polling_which_keeps_approvals_right_until_a_push_returns() {
    let app = TestApp::spawn_with(|c| {
        fast(c, 0.001);
        c.dingtalk.monthly_deliveries = 2;
        c.reconcile.process_codes = vec![CODE.into()];
    })
    .await;
    let emu = emulator(&app).state().clone();
    let first = emu.start_instance(start(CODE, &["manager1"])).unwrap();
    eventually(Duration::from_secs(15), "polling mode", || async {
        (mode(&app).await.as_deref() == Some("polling")).then_some(())
    })
    .await;
    // DingTalk now delivers nothing: changes and new approvals are found by polling.
    emu.set_faults(Faults {
        push: PushFaults {
            drop_forever_rate: 1.0,
            ..PushFaults::default()
        },
        ..Faults::default()
    });
    let task = emu
        .open_tasks()
        .into_iter()
        .find(|t| t.process_instance_id == first.process_instance_id)
        .unwrap()
        .task;
    emu.agree(task.taskid, TaskAction::default()).unwrap();
    let second = emu.start_instance(start(CODE, &["manager1"])).unwrap();
    eventually(
        Duration::from_secs(40),
        "polling to bring both approvals",
        || async {
            let a = status(&app, &first.process_instance_id).await;
            let b = status(&app, &second.process_instance_id).await;
            (a == Some(("COMPLETED".into(), Some("agree".into())))
                && b == Some(("RUNNING".into(), None)))
            .then_some(())
        },
    )
    .await;
    // The ledger (with what it has not flushed yet) shows the calls as polling.
    let ledger = app.app.as_ref().unwrap().ledger.clone();
    let usage = ledger.this_month(&app.owner_key).await.unwrap();
    let polled = usage.sum(|r| r.kind == "call" && r.purpose == "poll");
    assert!(polled > 0, "{:?}", usage.by_api_and_purpose());
    // Pushes return.
    emu.reset_faults();
    emu.start_instance(start(CODE, &["manager1"])).unwrap();
    eventually(Duration::from_secs(15), "push mode again", || async {
        (mode(&app).await.as_deref() == Some("push")).then_some(())
    })
    .await;
    app.stop().await;
}

/// What the sweep job's runs counted under `name`, all runs summed.
async fn sweep_count(app: &TestApp, name: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum((counts->>$1)::bigint), 0)::bigint FROM dingsync.job_runs
         WHERE job = 'sweep'",
    )
    .bind(name)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_polling_with_the_v1_family_finishes_no_push_announced_are_found_by_listing_running_instances()
 {
    let app = TestApp::spawn_with(|c| {
        fast(c, 0.001);
        c.dingtalk.api_family = dingsync::config::ApiFamily::V1;
        c.dingtalk.monthly_deliveries = 2;
        c.reconcile.process_codes = vec![CODE.into()];
    })
    .await;
    let emu = emulator(&app).state().clone();
    let open: Vec<Instance> = (0..30)
        .map(|_| emu.start_instance(start(CODE, &["manager1"])).unwrap())
        .collect();
    eventually(Duration::from_secs(20), "polling mode", || async {
        (mode(&app).await.as_deref() == Some("polling")).then_some(())
    })
    .await;
    // Each approval's one detail fetch done first, so that only polling can see what follows.
    eventually(
        Duration::from_secs(40),
        "all 30 approvals stored and fetched",
        || async {
            let fetched: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM dingsync.approvals
                 WHERE status = 'RUNNING' AND detail_synced_at IS NOT NULL",
            )
            .fetch_one(&app.pool)
            .await
            .unwrap();
            (fetched == 30).then_some(())
        },
    )
    .await;
    // Until the probe has judged all 30 (it leaves approvals of the last seconds alone), a
    // finish would be found by the `get`s alone.
    eventually(
        Duration::from_secs(40),
        "a probe round that judged all 30",
        || async {
            let judged: Option<i64> = sqlx::query_scalar(
                "SELECT max((counts->>'probe_checked')::bigint) FROM dingsync.job_runs
                 WHERE job = 'sweep'",
            )
            .fetch_one(&app.pool)
            .await
            .unwrap();
            (judged == Some(30)).then_some(())
        },
    )
    .await;
    // DingTalk delivers nothing from here on; three approvals finish.
    emu.set_faults(Faults {
        push: PushFaults {
            drop_forever_rate: 1.0,
            ..PushFaults::default()
        },
        ..Faults::default()
    });
    let finishing: Vec<&Instance> = open.iter().step_by(10).collect();
    for instance in &finishing {
        let task = emu
            .open_tasks()
            .into_iter()
            .find(|t| t.process_instance_id == instance.process_instance_id)
            .unwrap()
            .task;
        emu.agree(task.taskid, TaskAction::default()).unwrap();
    }
    let found_before = sweep_count(&app, "probe_finished").await;
    eventually(Duration::from_secs(60), "the three finishes", || async {
        let mut all = true;
        for i in &finishing {
            all &= status(&app, &i.process_instance_id).await
                == Some(("COMPLETED".into(), Some("agree".into())));
        }
        all.then_some(())
    })
    .await;
    // The probe listed RUNNING instances and named the finished ones (the least recently checked
    // `get`s may have reached one of them first; not all three), as the runs record once they end.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = sweep_count(&app, "probe_finished").await - found_before;
        if found >= 2 && sweep_count(&app, "probe_pages").await > 0 {
            break;
        }
        if Instant::now() > deadline {
            let runs: Vec<serde_json::Value> = sqlx::query_scalar(
                "SELECT counts FROM dingsync.job_runs WHERE job = 'sweep' AND counts ? 'fetched'
                 ORDER BY id",
            )
            .fetch_all(&app.pool)
            .await
            .unwrap();
            panic!("the finished probe named {found} of the three finishes; sweep runs: {runs:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}
