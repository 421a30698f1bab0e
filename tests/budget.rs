//! The shared rate budget: replicas (separate pools) together never exceed `dingtalk.qps`.

mod common;

use std::time::{Duration, Instant};

use common::{TestDb, test_config};
use dingsync::{
    dingtalk::{Budget, Priority},
    store,
};
use futures::future::join_all;

/// The most calls that fall in any one-second window.
fn busiest_second(times: &mut [Duration]) -> usize {
    times.sort();
    let mut best = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= Duration::from_secs(1) {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

// Several worker threads, and each call on its own task, as in the daemon: on one thread a late
// wake-up would make calls that left on time look bunched together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_together_never_exceed_the_budget() {
    let db = TestDb::new();
    let mut config = test_config(&db.url);
    config.dingtalk.app_key = "dingbudgetapp".into();
    config.dingtalk.qps = 20;
    let pool_a = store::connect_and_migrate(&config.database).await.unwrap();
    let pool_b = store::connect(&config.database).await.unwrap();
    let budgets = [
        std::sync::Arc::new(Budget::new(pool_a.clone(), &config.dingtalk)),
        std::sync::Arc::new(Budget::new(pool_b.clone(), &config.dingtalk)),
    ];
    // Warm up: both replicas have a connection open, as running daemons would.
    for budget in &budgets {
        budget.acquire(Priority::Live).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let calls = 80;
    let mut times = Vec::with_capacity(calls);
    let mut waits = Vec::new();
    for i in 0..calls {
        let budget = budgets[i % 2].clone();
        waits.push(tokio::spawn(async move {
            budget.acquire(Priority::Live).await.unwrap();
            started.elapsed()
        }));
    }
    for t in join_all(waits).await {
        times.push(t.unwrap());
    }
    assert!(
        busiest_second(&mut times) <= 20,
        "more than 20 calls in one second: {times:?}"
    );
    // How much of the budget is used is a benchmark figure (benches/client.rs), not asserted here.
    assert_eq!(times.len(), calls);
    pool_a.close().await;
    pool_b.close().await;
}

#[tokio::test]
async fn bulk_work_never_takes_slots_that_live_sync_is_queued_for() {
    let db = TestDb::new();
    let mut config = test_config(&db.url);
    config.dingtalk.app_key = "dingbudgetapp2".into();
    config.dingtalk.qps = 10;
    let pool = store::connect_and_migrate(&config.database).await.unwrap();
    let budget = Budget::new(pool.clone(), &config.dingtalk);
    // Live sync queues 20 calls (two seconds of budget); a bulk call must wait until they are done.
    let started = Instant::now();
    let live: Vec<_> = (0..20).map(|_| budget.acquire(Priority::Live)).collect();
    let bulk = async {
        tokio::time::sleep(Duration::from_millis(50)).await; // live work is queued by now
        budget.acquire(Priority::Bulk).await.unwrap();
        started.elapsed()
    };
    let (_, bulk_at) = tokio::join!(join_all(live), bulk);
    // 20 live calls at 10/s end after ~2 s; bulk had to wait for the queue to drain.
    assert!(
        bulk_at >= Duration::from_millis(1_800),
        "bulk went at {bulk_at:?}"
    );
    pool.close().await;
}
