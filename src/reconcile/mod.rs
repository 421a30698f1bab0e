//! Reconciliation: events are hints, DingTalk's API is the truth. Owns what the
//! scheduled jobs do (the scheduler only decides when, `scheduler.rs`; how much background work
//! may spend and whether pushes arrive is the `planner`'s):
//! - `details`: the one `processinstance/get` of an approval never fetched (its form), coalesced
//!   per burst (live work);
//! - `sweep`: the planner's background tick (`background.rs`): gap checks, the reconciliation
//!   pass after a month of polling, polling while pushes are missing, and the bounded sweep of
//!   open approvals while they arrive; within the day's allowance;
//! - `backfill`: `processinstance/listids` per process_code in windows, resumable;
//! - `failed`: drain DingTalk's read-once failed-push list when the planner says it is due;
//! - `drift`: compare the database with a fresh listing (operator command);
//! - `forms`: fetch template schemas when they can have changed and keep the typed form views.
//!
//! DingTalk's answer that the month's calls are used up (errcode 90020, docs/dingtalk.md §7)
//! ends a run: [`quota_exhausted`] is the one place that recognises it.
//!
//! Every job is safe to run twice and safe to interrupt: each step is committed on its own and
//! a snapshot is applied by the monotonic rule of `store::approvals`. SQL lives in `store`.

pub mod backfill;
pub mod background;
pub mod failed;
pub mod forms;
pub mod snapshot;

use std::future::Future;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{
    dingtalk::{self, Purpose},
    jobs::{Context, Counts},
    planner,
    snapshot::Snapshot,
    store::approvals::{self, Applied, SnapshotSource},
};

pub use background::sweep;

/// Whether `e` says the month's calls are used up: the run stops (every further metered call
/// would fail the same way until the month turns).
pub fn quota_exhausted(e: &dingtalk::Error) -> bool {
    matches!(e, dingtalk::Error::QuotaExhausted { .. })
}

/// What one fetch-and-apply came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    Changed,
    Unchanged,
    /// A newer snapshot had been applied meanwhile.
    Stale,
    /// DingTalk refused (e.g. the instance does not exist): not asked again until the sweep's
    /// longest interval has passed, or a new event.
    Rejected,
    /// Transient failure or an unreadable answer: tried again by the next run.
    Failed,
    /// The monthly allowance is used up (`dingtalk::Error::QuotaExhausted`): nothing was asked;
    /// the run stops and the approval stays as it was for a later run.
    Paused,
}

impl Fetched {
    fn name(self) -> &'static str {
        match self {
            Fetched::Changed => "changed",
            Fetched::Unchanged => "unchanged",
            Fetched::Stale => "stale",
            Fetched::Rejected => "rejected",
            Fetched::Failed => "failed",
            Fetched::Paused => "paused",
        }
    }
}

/// Fetches one instance and applies the snapshot. Database errors end the run (`Err`); DingTalk
/// errors are outcomes of this one approval. Each outcome is counted by source: a `changed`
/// found by the sweep, a gap check or backfill is drift that no event announced.
pub async fn fetch_and_apply(
    ctx: &Context,
    process_instance_id: &str,
    purpose: Purpose,
    source: SnapshotSource,
    process_code: Option<&str>,
) -> anyhow::Result<Fetched> {
    let fetched =
        fetch_and_apply_once(ctx, process_instance_id, purpose, source, process_code).await?;
    crate::metrics::reconcile_fetch(source.as_str(), fetched.name());
    Ok(fetched)
}

async fn fetch_and_apply_once(
    ctx: &Context,
    process_instance_id: &str,
    purpose: Purpose,
    source: SnapshotSource,
    process_code: Option<&str>,
) -> anyhow::Result<Fetched> {
    let pool = ctx.pool();
    let corp = ctx.corp_id();
    // Stamped before the request leaves, on the clock events are stamped with: whatever the
    // answer says was true at least at this moment.
    let requested_at = approvals::clock(pool).await?;
    let answer = ctx
        .client()
        .get_instance(process_instance_id, purpose)
        .await;
    let snap = match answer {
        Ok(instance) => Snapshot::from_instance(process_instance_id, &instance),
        Err(e) if quota_exhausted(&e) => {
            tracing::warn!(%process_instance_id, error = %e, "the month's DingTalk calls are used up; stopping the run");
            return Ok(Fetched::Paused);
        }
        Err(dingtalk::Error::Rejected {
            errcode, errmsg, ..
        }) => {
            tracing::warn!(%process_instance_id, errcode, %errmsg, "processinstance/get refused; not asking again soon");
            // Not before the sweep's first check would come (planner's clock, in real time).
            let clock = ctx.client().ledger().clock();
            let later = clock
                .real_duration(planner::sweep_first_check(ctx.config()))
                .as_secs();
            approvals::postpone(pool, corp, process_instance_id, requested_at, later, true).await?;
            return Ok(Fetched::Rejected);
        }
        Err(e) => {
            tracing::warn!(%process_instance_id, error = %e, "processinstance/get failed; next run retries");
            approvals::postpone(pool, corp, process_instance_id, requested_at, 0, false).await?;
            return Ok(Fetched::Failed);
        }
    };
    let snap = match snap {
        Ok(snap) => snap,
        Err(e) => {
            tracing::error!(%process_instance_id, error = %e, "unreadable processinstance/get answer");
            approvals::postpone(pool, corp, process_instance_id, requested_at, 0, false).await?;
            return Ok(Fetched::Failed);
        }
    };
    let mut conn = pool.acquire().await?;
    let applied =
        approvals::apply_snapshot(&mut conn, corp, &snap, requested_at, source, process_code)
            .await?;
    Ok(match applied {
        Applied::Yes { changed: true } => Fetched::Changed,
        Applied::Yes { changed: false } => Fetched::Unchanged,
        Applied::Stale => {
            // Still leave this run's sweep queue.
            approvals::postpone(pool, corp, process_instance_id, requested_at, 0, true).await?;
            Fetched::Stale
        }
    })
}

/// Whether `e` is DingTalk's monthly allowance used up (somewhere in its chain).
pub fn is_paused(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<dingtalk::Error>()
            .is_some_and(quota_exhausted)
    })
}

/// Runs `work` for each item with at most `limit` in flight; adds up the outcomes in `counts`.
/// On shutdown no new item starts; those in flight finish (each commits on its own).
pub(crate) async fn for_each<I, F, Fut>(
    items: Vec<I>,
    limit: u32,
    shutdown: &CancellationToken,
    counts: &mut Counts,
    work: F,
) -> anyhow::Result<bool>
where
    I: Send + 'static,
    F: Fn(I) -> Fut,
    Fut: Future<Output = anyhow::Result<Fetched>> + Send + 'static,
{
    let mut running = JoinSet::new();
    let mut first_error = None;
    for item in items {
        if shutdown.is_cancelled() || counts.contains_key(Fetched::Paused.name()) {
            break;
        }
        while running.len() >= limit as usize {
            record(running.join_next().await, counts, &mut first_error);
        }
        running.spawn(work(item));
    }
    while let Some(done) = running.join_next().await {
        record(Some(done), counts, &mut first_error);
    }
    first_error.map_or(Ok(counts.contains_key(Fetched::Paused.name())), Err)
}

fn record(
    done: Option<Result<anyhow::Result<Fetched>, tokio::task::JoinError>>,
    counts: &mut Counts,
    first_error: &mut Option<anyhow::Error>,
) {
    match done {
        Some(Ok(Ok(Fetched::Paused))) => {
            *counts.entry(Fetched::Paused.name()).or_default() += 1;
        }
        Some(Ok(Ok(fetched))) => {
            *counts.entry("fetched").or_default() += 1;
            *counts.entry(fetched.name()).or_default() += 1;
        }
        Some(Ok(Err(e))) => {
            first_error.get_or_insert(e);
        }
        Some(Err(e)) => {
            first_error.get_or_insert(anyhow::anyhow!("fetch task failed: {e}"));
        }
        None => {}
    }
}

/// The `details` job: one `processinstance/get` per marked approval, live priority.
pub async fn details(ctx: &Context, shutdown: &CancellationToken) -> anyhow::Result<Counts> {
    let mut counts = Counts::new();
    let c = ctx.config();
    let mut after = None;
    while !shutdown.is_cancelled() {
        let page = approvals::wanted_page(
            ctx.pool(),
            ctx.corp_id(),
            c.detail_quiet_ms,
            c.detail_max_wait_ms,
            after.as_ref(),
            c.batch_size,
        )
        .await?;
        let Some(last) = page.last().cloned() else {
            break;
        };
        after = Some(last);
        let ids = page.into_iter().map(|w| w.process_instance_id).collect();
        let ctx2 = ctx.clone();
        for_each(
            ids,
            c.concurrency,
            shutdown,
            &mut counts,
            move |id: String| {
                let ctx = ctx2.clone();
                async move {
                    fetch_and_apply(&ctx, &id, Purpose::Details, SnapshotSource::Details, None)
                        .await
                }
            },
        )
        .await?;
        if counts.contains_key(Fetched::Paused.name()) {
            break;
        }
    }
    Ok(counts)
}
