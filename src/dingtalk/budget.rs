//! The app's request budget, shared by every replica (`dingsync.rate_budget`): calls are given
//! slots 1/qps apart (GCRA), taken in one row update, so no one-second window ever holds more than
//! `dingtalk.qps` calls whichever replica makes them (docs/dingtalk.md §7: 20 per app per API is the
//! commonly quoted limit; we apply it to the app as a whole, the stricter reading).
//!
//! Priorities: live sync may queue for slots far ahead; outbox creates only a little; bulk work
//! (backfill) only takes a slot that is free now. So a backfill can never push live sync or the
//! outbox back.
//!
//! Should DingTalk's real limit be lower than `dingtalk.qps`, its "too many calls" answer pauses
//! the whole app for a second ([`Budget::throttled`]), every replica included, so that the app
//! settles at what DingTalk takes instead of keeping DingTalk's window full with refused calls.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{sync::Mutex, time::Instant};

use sqlx::PgPool;

use crate::{config::DingTalkConfig, store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Detail fetches, callback management, the failed-push list.
    Live,
    /// Creating approvals from the outbox.
    Outbox,
    /// Backfill and sweeps.
    Bulk,
}

impl Priority {
    /// How far ahead of now this priority may reserve a slot.
    fn horizon(self) -> Duration {
        match self {
            Priority::Live => Duration::from_secs(60),
            Priority::Outbox => Duration::from_secs(5),
            Priority::Bulk => Duration::ZERO,
        }
    }
}

/// How late after its slot a call may still go. Slots are 1.1/qps apart (qps + 1 slots span
/// 1.1 s), so a call up to this late still never makes qps + 1 calls in one second, with 80 ms
/// left for what happens after the call leaves (network, DingTalk's own scheduling).
const LATE: Duration = Duration::from_millis(20);
/// Slots a call gives up for lateness before it goes late anyway.
const MAX_GIVE_UPS: u32 = 5;

pub struct Budget {
    pool: PgPool,
    corp_id: String,
    app_key: String,
    /// Seconds between slots; `None` = no budget (benchmarks against the emulator).
    spacing: Option<f64>,
    /// Earliest time this process may make its next call.
    next_local: Mutex<Instant>,
    /// Bumped when DingTalk says the app calls too often ([`Budget::throttled`]): a call that
    /// took its slot before that takes a new one, behind the pause.
    throttles: AtomicU64,
    /// When this process last paused the app: at most one pause per [`PAUSE_COOLDOWN`].
    last_pause: std::sync::Mutex<Option<Instant>>,
}

/// Least time from one pause to the next. DingTalk may also refuse calls for reasons of its own
/// (other quotas, a busy gateway) while the app is well within its window; pausing again at each
/// such refusal would stop the app for good, so at least two thirds of the time stay open.
const PAUSE_COOLDOWN: Duration = Duration::from_secs(3);

impl Budget {
    pub fn new(pool: PgPool, config: &DingTalkConfig) -> Budget {
        Budget {
            pool,
            corp_id: config.corp_id.clone(),
            app_key: config.app_key.clone(),
            // 10% slack: a call leaves a little after its slot (timer and scheduling delays) and
            // arrives after a varying delay, and qps + 1 calls must never land in one second at
            // DingTalk. With 5% the faults test saw 21 arrivals in one second on a loaded machine.
            spacing: (config.qps > 0).then(|| 1.1 / f64::from(config.qps)),
            next_local: Mutex::new(Instant::now()),
            throttles: AtomicU64::new(0),
            last_pause: std::sync::Mutex::new(None),
        }
    }

    /// DingTalk answered "call frequency over limit" (88/90002, 90002, HTTP 429): its own counter
    /// is full, and its real limit may be below `dingtalk.qps` (the numbers are [UNCONFIRMED],
    /// docs/dingtalk.md §7). DingTalk counts the calls it refuses too, so if every call only backed off on
    /// its own, the others would keep its window full and nothing would get through. Instead the
    /// whole app goes quiet: no replica's next slot is earlier than `pause` from now, and this
    /// process's calls already holding a slot take a new one behind the pause. Refusals during
    /// [`PAUSE_COOLDOWN`] after a pause do not start another one.
    pub async fn throttled(&self, pause: Duration) -> sqlx::Result<()> {
        if self.spacing.is_none() {
            return Ok(());
        }
        {
            let mut last = self.last_pause.lock().unwrap();
            let now = Instant::now();
            if last.is_some_and(|at| now - at < PAUSE_COOLDOWN) {
                return Ok(());
            }
            *last = Some(now);
        }
        store::rate_budget::pause(&self.pool, &self.corp_id, &self.app_key, pause).await?;
        // After the pause is in the database, so that the calls sent back for a new slot get
        // one behind it.
        self.throttles.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// The database hands out slots, but the answer reaches each caller after a varying delay, so
    /// calls of one process could still bunch up; they also leave at least `spacing` apart here.
    async fn space_locally(&self, spacing: f64) {
        let mut next = self.next_local.lock().await;
        let at = (*next).max(Instant::now());
        tokio::time::sleep_until(at).await;
        *next = at + Duration::from_secs_f64(spacing);
    }

    /// Waits for a slot for one call at `priority`.
    pub async fn acquire(&self, priority: Priority) -> sqlx::Result<()> {
        let Some(spacing) = self.spacing else {
            return Ok(());
        };
        let started = Instant::now();
        let mut given_up = 0;
        loop {
            let throttles = self.throttles.load(Ordering::SeqCst);
            // Time the query only: waiting for a pooled connection happens before the slot is
            // chosen and says nothing about when it is.
            let mut conn = self.pool.acquire().await?;
            let asked = Instant::now();
            // The database clock is the one clock all replicas share.
            let slot = store::rate_budget::take_slot(
                &mut *conn,
                &self.corp_id,
                &self.app_key,
                spacing,
                priority.horizon(),
            )
            .await?;
            drop(conn);
            match slot {
                Some(wait) => {
                    let wait = Duration::from_secs_f64(wait.max(0.0));
                    // The slot lies between `asked + wait` and `answered + wait`: never go
                    // before the later bound, and measure lateness from the earlier one, so a
                    // slow answer (a busy database or machine) counts as lateness too.
                    let earliest = asked + wait;
                    tokio::time::sleep_until(Instant::now() + wait).await;
                    // DingTalk refused a call while this one waited: its slot lies inside the
                    // pause (or right behind it, with every other waiting call). Take a new one.
                    if self.throttles.load(Ordering::SeqCst) != throttles {
                        continue;
                    }
                    // Too late, the call would land next to the calls of later slots: give the
                    // slot up and take a new one. After a few tries on a machine this busy,
                    // go anyway rather than never.
                    if Instant::now() - earliest <= LATE || given_up >= MAX_GIVE_UPS {
                        self.space_locally(spacing).await;
                        crate::metrics::budget_waited(started.elapsed());
                        return Ok(());
                    }
                    given_up += 1;
                }
                // No slot within this priority's horizon: the budget is taken by more urgent work.
                None => tokio::time::sleep(Duration::from_secs_f64(spacing)).await,
            }
        }
    }
}
