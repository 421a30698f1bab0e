//! Simulated people, so that the embedded default shows approvals flowing: every `pace` one of
//! them starts an approval or acts on an open task (mostly agree, sometimes refuse or redirect,
//! rarely the originator withdraws). Choices come from the seeded people RNG.
//!
//! Owns: the loop and its choices. Does not own: the approval rules (`model`) or pushes.

use std::time::Duration;

use rand::Rng;

use super::{
    handle::{Handle, StartInstance, TaskAction},
    model::ActionType,
    model::NodeSpec,
};

/// Above this many open instances people only work through their tasks.
const MAX_OPEN: usize = 12;

/// What one tick does.
enum Move {
    Start(StartInstance),
    Agree(i64, String),
    Refuse(i64, String),
    Redirect(i64, String),
    Withdraw(String),
}

pub(crate) async fn run(handle: Handle, pace: Duration) {
    let pace = pace.max(Duration::from_millis(1));
    let mut ticker = tokio::time::interval(pace);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            () = handle.shared.shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let result = match choose(&handle) {
            Move::Start(request) => handle.start_instance(request).map(drop),
            Move::Agree(task, remark) => handle
                .agree(
                    task,
                    TaskAction {
                        remark: Some(remark),
                        ..TaskAction::default()
                    },
                )
                .map(drop),
            Move::Refuse(task, remark) => handle
                .refuse(
                    task,
                    TaskAction {
                        remark: Some(remark),
                        ..TaskAction::default()
                    },
                )
                .map(drop),
            Move::Redirect(task, to) => handle
                .redirect(
                    task,
                    TaskAction {
                        to: Some(to),
                        ..TaskAction::default()
                    },
                )
                .map(drop),
            Move::Withdraw(id) => handle.terminate(&id, None, Some("撤销".into())).map(drop),
        };
        if let Err(e) = result {
            // E.g. a test acted on the same task in between: harmless.
            tracing::debug!(error = %e, "emulator: simulated person could not act");
        }
    }
}

fn choose(handle: &Handle) -> Move {
    let open = handle.open_tasks();
    let open_instances = {
        let mut ids: Vec<&str> = open
            .iter()
            .map(|t| t.process_instance_id.as_str())
            .collect();
        ids.dedup();
        ids.len()
    };
    let mut world = handle.shared.world();
    let world = &mut *world;
    let rng = &mut world.people_rng;
    if !open.is_empty() && (open_instances >= MAX_OPEN || rng.random_bool(0.6)) {
        let task = &open[rng.random_range(0..open.len())];
        let roll: usize = rng.random_range(0..100);
        return match roll {
            0..80 => Move::Agree(task.task.taskid, ["同意", "OK", "没问题"][roll % 3].into()),
            80..92 => Move::Refuse(task.task.taskid, "预算不足，请修改后重新提交".into()),
            92..97 => {
                let people: Vec<&String> = world
                    .org
                    .people
                    .keys()
                    .filter(|u| **u != task.task.userid)
                    .collect();
                match people.is_empty() {
                    true => Move::Agree(task.task.taskid, "同意".into()),
                    false => Move::Redirect(
                        task.task.taskid,
                        people[rng.random_range(0..people.len())].clone(),
                    ),
                }
            }
            _ => Move::Withdraw(task.process_instance_id.clone()),
        };
    }
    let templates: Vec<&String> = world.org.templates.keys().collect();
    let people: Vec<&String> = world.org.people.keys().collect();
    let process_code = templates[rng.random_range(0..templates.len())].clone();
    let originator = people[rng.random_range(0..people.len())].clone();
    // Now and then an explicit two-step flow; otherwise the template's own.
    let approvers_v2 = rng.random_bool(0.25).then(|| {
        vec![
            NodeSpec {
                task_action_type: ActionType::Or,
                user_ids: vec!["manager1".into(), "boss1".into()],
            },
            NodeSpec {
                task_action_type: ActionType::None,
                user_ids: vec!["fin1".into()],
            },
        ]
    });
    Move::Start(StartInstance {
        process_code,
        originator_userid: originator,
        approvers_v2,
        ..StartInstance::default()
    })
}
