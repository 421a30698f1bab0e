//! The business app of the out-of-the-box demo: with the embedded emulator and its simulated
//! people, it asks for an expense approval through `dingsync.request_approval` every few paces,
//! so a new user sees the outbox at work next to the approvals people start in "DingTalk".
//!
//! Owns only that loop. It uses the public SQL contract, exactly as a real app would; it never
//! runs against a real DingTalk (`app` starts it only with `dingtalk.api_base = "emulator"`).

use std::time::Duration;

use rand::Rng;
use sqlx::PgPool;

use crate::store;
use tokio_util::sync::CancellationToken;

/// One request every this many people-paces (10 s at the default 2 s pace).
const PACES_PER_REQUEST: u32 = 5;
/// Who the demo asks approvals for: people of the emulator's organisation.
const ORIGINATORS: [&str; 4] = ["emp1", "emp2", "emp3", "emp4"];
const REASONS: [&str; 4] = ["出差杭州", "客户拜访", "办公用品", "团队活动"];

/// Runs until `shutdown`.
pub async fn run(pool: PgPool, pace: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(pace * PACES_PER_REQUEST);
    tick.tick().await; // the first tick is immediate: give the daemon a moment first
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        n += 1;
        let (originator, reason, amount) = {
            let mut rng = rand::rng();
            (
                ORIGINATORS[rng.random_range(0..ORIGINATORS.len())],
                REASONS[rng.random_range(0..REASONS.len())],
                rng.random_range(50..5_000),
            )
        };
        let key = format!("demo-{}-{n}", chrono::Utc::now().timestamp_millis());
        let form_values = serde_json::json!([
            {"name": "Reason", "value": reason},
            {"name": "Amount", "value": amount},
        ]);
        let requested = store::outbox::request_approval(
            &pool,
            &key,
            "PROC-EMU-EXPENSE",
            originator,
            &form_values,
        )
        .await;
        match requested {
            Ok(id) => tracing::info!(
                outbox_id = id,
                "demo app: requested an expense approval through dingsync.outbox"
            ),
            Err(e) => tracing::warn!(error = %e, "demo app: could not request an approval"),
        }
    }
}
