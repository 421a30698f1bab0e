//! The `sweep` job: the planner's background tick. Each run reads the plan (the day's allowance
//! of background calls, `planner::Plan`) and the push-health state, then spends within it, in
//! this order:
//! 1. gap checks (purpose `Gap`): open approvals without a RUNNING task, and finished ones with a
//!    task still RUNNING (`store::approvals::gap_page`), whose events have been quiet for `reconcile.gap_after_s` miss an event; each is fetched at most
//!    `reconcile.gap_checks` times, spaced `gap_after_s × 6^k`. A change found is a sign for the
//!    failed-list drain and may say that pushes are missing;
//! 2. push health (`planner::next_mode`), switching between push and polling mode;
//! 3. the reconciliation pass after a month in polling mode (purpose `Sweep`): every open
//!    approval not fetched since the month turned, once;
//! 4. in polling mode (purpose `Poll`): `listids` of `reconcile.process_codes` since the last
//!    listing for approvals no event announced; with the v1.0 family, the finished probe (each
//!    template's `RUNNING` instances listed over its open approvals' window: an open approval
//!    missing from the listing has finished and is fetched); then open approvals, least
//!    recently checked first; a round spends what is left of today spread over the rest of the
//!    day (`Plan::round`), once that pays for the listings and the probe;
//! 5. in push mode (purpose `Sweep`): each open approval re-checked at most
//!    `reconcile.sweep_checks` times over its life, at ages `sweep_first_check_h × 4^k`.
//!
//! A run that runs out of allowance stops and counts `budget`; one DingTalk answers with
//! "calls used up" stops at once (`quota_exhausted`).

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio_util::sync::CancellationToken;

use super::{Fetched, fetch_and_apply, for_each, quota_exhausted};
use crate::{
    dingtalk::Purpose,
    jobs::{Context, Counts},
    planner::{self, Budget, Mode, Plan, PushSigns, PushState},
    store::approvals::{self, Check, SnapshotSource},
};

/// How far back a listing overlaps the previous one (instances created at a window's edge).
const LIST_OVERLAP_MS: i64 = 60_000;
/// While polling, how often a template is listed for approvals no event announced (an approval
/// started in DingTalk is found at most this late).
const LIST_EVERY: Duration = Duration::from_secs(6 * 3600);
/// Calls a polling round waits to have before it spends them: the tick runs every minute while a
/// day's allowance may be ~150 calls, and a round of one call would always be the `listids` and
/// never a `get`. Ten: one listing per template and the rest on open approvals, a round every
/// hour or two at the standard edition's allowance.
const POLL_BATCH: f64 = 10.0;
/// The finished probe lists from this long before a template's oldest open approval: v1.0 gives
/// creation times to the minute (docs/dingtalk.md §11.3), so a stored creation time can be up to
/// a minute early, and DingTalk's clock may differ from the database's.
const PROBE_MARGIN: TimeDelta = TimeDelta::minutes(2);
/// The probe concludes nothing about approvals created this close to its listing's end: one
/// created a moment ago may not be listed yet, or DingTalk's clock may be behind.
const PROBE_SETTLE: TimeDelta = TimeDelta::seconds(10);
/// listids reaches 120 days per window (docs/dingtalk.md §2.4): the probe lists the last 119.
const PROBE_REACH: TimeDelta = TimeDelta::days(119);
/// The outbox's silent approvals are looked for among those created in the last day.
const SILENCE_WINDOW: TimeDelta = TimeDelta::days(1);

pub async fn sweep(ctx: &Context, shutdown: &CancellationToken) -> anyhow::Result<Counts> {
    let pool = ctx.pool();
    let corp = ctx.corp_id();
    let c = ctx.config();
    let ledger = ctx.client().ledger();
    let clock = ledger.clock();
    let now = clock.now();
    let usage = ledger.month(corp, now).await?;
    let plan = Plan::compute(&usage, now, ctx.allowances().calls);
    let mut budget = Budget::new(plan.left_today());
    let db_now = approvals::clock(pool).await?;
    let mut counts = Counts::new();
    let mut state = planner::push_state(pool, corp).await?;
    planner::roll_month(&mut state, now, db_now);

    let quiet = planner::gap_after(c);
    let gap_changed = gap_checks(ctx, &mut budget, db_now, shutdown, &mut counts).await?;
    if gap_changed {
        planner::record_sign(pool, clock, corp, "a gap check found a missed change").await?;
    }

    let from = state
        .since_db
        .unwrap_or(db_now - SILENCE_WINDOW)
        .max(db_now - SILENCE_WINDOW);
    let silence = clock.real_duration(planner::push_silence(c)).as_secs_f64();
    let (silent, created) = approvals::outbox_silence(pool, corp, from, silence).await?;
    let signs = PushSigns {
        deliveries: usage.deliveries(),
        silent,
        created,
        last_push: planner::last_push(pool, corp).await?,
        gap_changed,
    };
    if let Some(switch) = planner::next_mode(&state, &signs, ctx.allowances(), now, quiet) {
        planner::apply_switch(&mut state, switch, now, db_now, plan.per_day);
    }

    if let Some(before) = state.pass_before
        && !stopped(&counts, shutdown)
    {
        let done = pass(ctx, before, &mut budget, shutdown, &mut counts).await?;
        if done {
            tracing::info!("reconciliation pass after a month of polling finished");
            state.pass_before = None;
        }
    }
    match state.mode {
        Mode::Polling => {
            state.polled_month = state.month;
            if !stopped(&counts, shutdown) {
                poll(
                    ctx,
                    &mut state,
                    &plan,
                    &mut budget,
                    now,
                    db_now,
                    shutdown,
                    &mut counts,
                )
                .await?;
            }
        }
        Mode::Push => {
            if !stopped(&counts, shutdown) {
                bounded_sweep(ctx, &mut budget, db_now, shutdown, &mut counts).await?;
            }
        }
    }
    planner::save_push_state(pool, corp, &state).await?;
    counts.insert("polling", u64::from(state.mode == Mode::Polling));
    if budget.spent {
        counts.insert("budget", 1);
    }
    Ok(counts)
}

/// Re-checks every open approval not fetched since this call began (purpose `Sweep`), without
/// pacing: the reconciliation pass as an operator or a test runs it at once.
pub async fn recheck_open(ctx: &Context, shutdown: &CancellationToken) -> anyhow::Result<Counts> {
    let before = approvals::clock(ctx.pool()).await?;
    let mut counts = Counts::new();
    let mut budget = Budget::new(u64::MAX);
    while !pass(ctx, before, &mut budget, shutdown, &mut counts).await? {
        if stopped(&counts, shutdown) {
            break;
        }
    }
    Ok(counts)
}

fn stopped(counts: &Counts, shutdown: &CancellationToken) -> bool {
    shutdown.is_cancelled() || counts.contains_key(Fetched::Paused.name())
}

/// What a phase fetches for: the call's purpose, the snapshot's source, the check it counts and
/// the name its fetches are counted under.
#[derive(Debug, Clone, Copy)]
struct Work {
    purpose: Purpose,
    source: SnapshotSource,
    check: Option<Check>,
    phase: &'static str,
}

const GAP: Work = Work {
    purpose: Purpose::Gap,
    source: SnapshotSource::Gap,
    check: Some(Check::Gap),
    phase: "gap",
};
const SWEEP: Work = Work {
    purpose: Purpose::Sweep,
    source: SnapshotSource::Sweep,
    check: Some(Check::Sweep),
    phase: "sweep",
};
const PASS: Work = Work {
    purpose: Purpose::Sweep,
    source: SnapshotSource::Sweep,
    check: None,
    phase: "pass",
};
const POLL: Work = Work {
    purpose: Purpose::Poll,
    source: SnapshotSource::Poll,
    check: None,
    phase: "poll",
};

/// Fetches `ids` (each already paid from a budget) and applies them; counts `check` for each
/// that reached DingTalk. Adds the outcomes to `counts`, and the number fetched under `phase`;
/// returns the outcomes of this batch alone.
async fn fetch_ids(
    ctx: &Context,
    ids: Vec<String>,
    work: Work,
    shutdown: &CancellationToken,
    counts: &mut Counts,
) -> anyhow::Result<Counts> {
    let Work {
        purpose,
        source,
        check,
        phase,
    } = work;
    let mut batch = Counts::new();
    let ctx2 = ctx.clone();
    for_each(
        ids,
        ctx.config().concurrency,
        shutdown,
        &mut batch,
        move |id: String| {
            let ctx = ctx2.clone();
            async move {
                let fetched = fetch_and_apply(&ctx, &id, purpose, source, None).await?;
                if let Some(check) = check
                    && !matches!(fetched, Fetched::Failed | Fetched::Paused)
                {
                    approvals::checked(ctx.pool(), ctx.corp_id(), &id, check).await?;
                }
                Ok(fetched)
            }
        },
    )
    .await?;
    for (k, v) in &batch {
        *counts.entry(k).or_default() += v;
    }
    *counts.entry(phase).or_default() += batch.get("fetched").copied().unwrap_or(0);
    Ok(batch)
}

/// Takes what `budget` allows of a page size.
fn page_size(budget: &mut Budget, batch: u32) -> u32 {
    budget.take_up_to(u64::from(batch)) as u32
}

/// Gap checks; whether one found a change.
async fn gap_checks(
    ctx: &Context,
    budget: &mut Budget,
    run_started: DateTime<Utc>,
    shutdown: &CancellationToken,
    counts: &mut Counts,
) -> anyhow::Result<bool> {
    let c = ctx.config();
    let clock = ctx.client().ledger().clock();
    let after = clock.real_duration(planner::gap_after(c)).as_secs_f64();
    let mut changed = false;
    while !stopped(counts, shutdown) && c.gap_checks > 0 {
        let limit = page_size(budget, c.batch_size);
        if limit == 0 {
            break;
        }
        let ids = approvals::gap_page(
            ctx.pool(),
            ctx.corp_id(),
            run_started,
            after,
            c.gap_checks,
            limit,
        )
        .await?;
        budget.give_back(u64::from(limit) - ids.len() as u64);
        if ids.is_empty() {
            break;
        }
        let batch = fetch_ids(ctx, ids, GAP, shutdown, counts).await?;
        if batch.contains_key(Fetched::Changed.name()) {
            changed = true;
        }
    }
    Ok(changed)
}

/// The bounded sweep of open approvals.
async fn bounded_sweep(
    ctx: &Context,
    budget: &mut Budget,
    run_started: DateTime<Utc>,
    shutdown: &CancellationToken,
    counts: &mut Counts,
) -> anyhow::Result<()> {
    let c = ctx.config();
    let clock = ctx.client().ledger().clock();
    let first = clock
        .real_duration(planner::sweep_first_check(c))
        .as_secs_f64();
    while !stopped(counts, shutdown) && c.sweep_checks > 0 {
        let limit = page_size(budget, c.batch_size);
        if limit == 0 {
            break;
        }
        let ids = approvals::sweep_page(
            ctx.pool(),
            ctx.corp_id(),
            run_started,
            first,
            c.sweep_checks,
            limit,
        )
        .await?;
        budget.give_back(u64::from(limit) - ids.len() as u64);
        if ids.is_empty() {
            break;
        }
        fetch_ids(ctx, ids, SWEEP, shutdown, counts).await?;
    }
    Ok(())
}

/// One step of the pass re-checking open approvals not fetched since `before`; whether none is
/// left.
async fn pass(
    ctx: &Context,
    before: DateTime<Utc>,
    budget: &mut Budget,
    shutdown: &CancellationToken,
    counts: &mut Counts,
) -> anyhow::Result<bool> {
    let c = ctx.config();
    loop {
        if stopped(counts, shutdown) {
            return Ok(false);
        }
        let limit = page_size(budget, c.batch_size);
        if limit == 0 {
            // Nothing left today, or nothing to do: an empty page says which.
            let left =
                approvals::unchecked_since_page(ctx.pool(), ctx.corp_id(), before, 1).await?;
            return Ok(left.is_empty());
        }
        let ids = approvals::unchecked_since_page(ctx.pool(), ctx.corp_id(), before, limit).await?;
        budget.give_back(u64::from(limit) - ids.len() as u64);
        if ids.is_empty() {
            return Ok(true);
        }
        let batch = fetch_ids(ctx, ids, PASS, shutdown, counts).await?;
        if batch.contains_key(Fetched::Failed.name()) {
            // Held for a retry: the next tick continues.
            return Ok(false);
        }
    }
}

/// Polling: a round on listing and fetching, once what the day has left gives it enough.
#[allow(clippy::too_many_arguments)]
async fn poll(
    ctx: &Context,
    state: &mut PushState,
    plan: &Plan,
    budget: &mut Budget,
    now: DateTime<Utc>,
    db_now: DateTime<Utc>,
    shutdown: &CancellationToken,
    counts: &mut Counts,
) -> anyhow::Result<()> {
    let c = ctx.config();
    let last_round = *state.poll_tick_at.get_or_insert(now);
    let since = (now - last_round).to_std().unwrap_or_default();
    let list_every_ms = ctx
        .client()
        .ledger()
        .clock()
        .real_duration(LIST_EVERY)
        .as_millis() as i64;
    let now_ms = db_now.timestamp_millis();
    let listing_due = |state: &PushState, code: &String| {
        state
            .listed_until_ms
            .get(code)
            .is_none_or(|listed| now_ms - listed >= list_every_ms)
    };
    // A round waits until it can pay for what it is for: a listing per template due, and with
    // the v1.0 family the finished probe (its pages and as much again for the finishes it
    // finds); otherwise POLL_BATCH (a round of one call would always be the listing and never
    // a `get`). Never more than a day's allowance; the day's last round spends what there is.
    let templates = if ctx.client().filters_by_status() {
        approvals::open_by_template(ctx.pool(), ctx.corp_id()).await?
    } else {
        Vec::new()
    };
    let probe: u64 = templates
        .iter()
        .map(|(_, _, open)| 2 * probe_pages(*open))
        .sum();
    let listings = c
        .process_codes
        .iter()
        .filter(|code| listing_due(state, code))
        .count() as u64;
    let wanted = (probe + listings) as f64;
    let batch = POLL_BATCH.max(wanted).min(plan.per_day).max(1.0);
    let may = plan.round(budget.left(), since, batch);
    if may == 0 {
        return Ok(());
    }
    state.poll_tick_at = Some(now);
    let granted = budget.take_up_to(may);
    let mut mine = Budget::new(granted);
    let corp = ctx.corp_id();

    // Approvals no event announced: list what was created since the last listing, at most every
    // LIST_EVERY (planner's clock) per template. A listing costs a call per 20 new instances
    // whether or not dingsync made them; listed every round, it took a quarter of polling's
    // calls in the month benchmark, calls the open approvals' checks needed more.
    for code in &c.process_codes {
        if stopped(counts, shutdown) || mine.left() == 0 {
            break;
        }
        if !listing_due(state, code) {
            continue;
        }
        let since_db = state.since_db.unwrap_or(db_now).timestamp_millis();
        let from = state
            .listed_until_ms
            .get(code)
            .copied()
            .unwrap_or(since_db)
            .saturating_sub(LIST_OVERLAP_MS)
            // listids reaches 120 days per window (docs/dingtalk.md §2.4).
            .max(now_ms - 119 * 86_400_000);
        let mut listing = ctx
            .client()
            .list_ids(code, (from, now_ms), None, Purpose::Poll);
        let mut complete = true;
        let mut found = Vec::new();
        loop {
            if !mine.take() {
                complete = false;
                break;
            }
            *counts.entry("poll_pages").or_default() += 1;
            match listing.next_page().await {
                Ok(Some(ids)) => found.extend(ids),
                Ok(None) => break,
                Err(e) if quota_exhausted(&e) => {
                    tracing::warn!(error = %e, "the month's DingTalk calls are used up; stopping the run");
                    counts.insert(Fetched::Paused.name(), 1);
                    complete = false;
                    break;
                }
                Err(e) => {
                    tracing::warn!(process_code = %code, error = %e, "polling listids failed; the next tick retries");
                    complete = false;
                    break;
                }
            }
            if listing.finished() {
                break;
            }
        }
        let known = approvals::known(ctx.pool(), corp, &found).await?;
        let unknown: Vec<String> = found.into_iter().filter(|id| !known.contains(id)).collect();
        let n = unknown.len() as u64;
        let paid = mine.take_up_to(n);
        if paid < n {
            complete = false;
        }
        let ids: Vec<String> = unknown.into_iter().take(paid as usize).collect();
        if !ids.is_empty() {
            let code = code.clone();
            let ctx2 = ctx.clone();
            let mut batch = Counts::new();
            for_each(
                ids,
                c.concurrency,
                shutdown,
                &mut batch,
                move |id: String| {
                    let (ctx, code) = (ctx2.clone(), code.clone());
                    async move {
                        fetch_and_apply(&ctx, &id, Purpose::Poll, SnapshotSource::Poll, Some(&code))
                            .await
                    }
                },
            )
            .await?;
            *counts.entry("poll_found").or_default() += batch.get("fetched").copied().unwrap_or(0);
            if batch.contains_key(Fetched::Failed.name()) {
                complete = false;
            }
            for (k, v) in batch {
                *counts.entry(k).or_default() += v;
            }
        }
        if complete {
            state.listed_until_ms.insert(code.clone(), now_ms);
        }
    }

    // With the v1.0 family, which open approvals finished, for a page per 20 of them.
    if ctx.client().filters_by_status() && !stopped(counts, shutdown) {
        finished_probe(ctx, templates, &mut mine, db_now, shutdown, counts).await?;
    }

    // Then open approvals, least recently checked first (for what the probe cannot see: a task
    // decided while its approval goes on). With the probe, half of what is left: the other half
    // stays for the next rounds, so that the probe comes round more often; it finds a finish for
    // a few calls, where a `get` of a running approval finds one for dozens (the month benchmark,
    // docs/BENCHMARKS.md).
    let left = if ctx.client().filters_by_status() {
        mine.left() / 2
    } else {
        mine.left()
    };
    let limit = left.min(u64::from(c.batch_size)) as u32;
    if limit > 0 && !stopped(counts, shutdown) {
        let ids = approvals::unchecked_since_page(ctx.pool(), corp, db_now, limit).await?;
        mine.take_up_to(ids.len() as u64);
        fetch_ids(ctx, ids, POLL, shutdown, counts).await?;
    }
    // What this round did not spend stays in the day's allowance, spread over the rounds after.
    budget.give_back(mine.left());
    Ok(())
}

/// The listing pages the finished probe takes for a template with `open` open approvals: theirs
/// and one more for instances dingsync does not know yet. A round lists only with as much again
/// for the fetches it may find: otherwise the round's `get`s are worth more.
fn probe_pages(open: i64) -> u64 {
    u64::try_from(open).unwrap_or(0).div_ceil(20) + 1
}

/// The finished probe (v1.0 family, while polling): for each template with open approvals, list
/// its `RUNNING` instances created since the oldest of them (`instanceIds/query` with `statuses`,
/// docs/dingtalk.md §11.4), 20 a call; an open approval that a complete listing does not hold
/// has finished (or was terminated) in DingTalk and is fetched. About 90 open approvals cost 5
/// calls a round this way instead of 90 `get`s, which is what keeps finishes no push announced
/// (deliveries used up) from waiting most of a day. A template whose listing the round cannot pay
/// for, or that ends incomplete (an error, the budget, DingTalk's 10,000-id cap), concludes
/// nothing: its approvals are left to the `get`s after it.
async fn finished_probe(
    ctx: &Context,
    templates: Vec<(String, DateTime<Utc>, i64)>,
    mine: &mut Budget,
    db_now: DateTime<Utc>,
    shutdown: &CancellationToken,
    counts: &mut Counts,
) -> anyhow::Result<()> {
    let corp = ctx.corp_id();
    for (code, oldest, open) in templates {
        if stopped(counts, shutdown) {
            break;
        }
        let from = (oldest - PROBE_MARGIN).max(db_now - PROBE_REACH);
        let pages = probe_pages(open);
        if mine.left() < 2 * pages {
            continue;
        }
        let mut listing = ctx
            .client()
            .list_ids(
                &code,
                (from.timestamp_millis(), db_now.timestamp_millis()),
                None,
                Purpose::Poll,
            )
            .with_statuses(&["RUNNING"]);
        let mut running = std::collections::HashSet::new();
        let mut complete = true;
        loop {
            if !mine.take() {
                complete = false;
                break;
            }
            *counts.entry("probe_pages").or_default() += 1;
            match listing.next_page().await {
                Ok(Some(ids)) => running.extend(ids),
                Ok(None) => break,
                Err(e) if quota_exhausted(&e) => {
                    tracing::warn!(error = %e, "the month's DingTalk calls are used up; stopping the run");
                    counts.insert(Fetched::Paused.name(), 1);
                    complete = false;
                    break;
                }
                Err(e) => {
                    tracing::warn!(process_code = %code, error = %e, "the finished probe's listing failed; the next round lists again");
                    complete = false;
                    break;
                }
            }
            if listing.finished() {
                break;
            }
        }
        if !complete || listing.capped() {
            continue;
        }
        let open_ids =
            approvals::open_created_between(ctx.pool(), corp, &code, from, db_now - PROBE_SETTLE)
                .await?;
        *counts.entry("probe_checked").or_default() += open_ids.len() as u64;
        let finished: Vec<String> = open_ids
            .into_iter()
            .filter(|id| !running.contains(id))
            .collect();
        let paid = mine.take_up_to(finished.len() as u64) as usize;
        *counts.entry("probe_finished").or_default() += finished.len() as u64;
        let ids = finished.into_iter().take(paid).collect::<Vec<_>>();
        if !ids.is_empty() {
            fetch_ids(ctx, ids, POLL, shutdown, counts).await?;
        }
    }
    Ok(())
}
