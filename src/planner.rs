//! The planner: how many DingTalk calls background work may spend, and when the failed-push
//! list is worth a call, decided from the allowance ledger, the clock and the configuration
//! (docs/dingtalk.md §7: an organisation gets a monthly allowance of metered calls and of push
//! deliveries; past the calls allowance every metered call fails).
//!
//! Three decisions, each a pure function here, unit-tested, with the state they need kept in
//! `dingsync.sync_state` (name `planner`) so that every replica and a restart agree:
//! - [`Plan`]: the day's allowance of background calls (purposes that are not
//!   `Purpose::is_live`): what is left of the month, minus a reserve for live work (creates,
//!   searches, detail fetches: the live pace so far × days left × 1.25, at least 10% of the
//!   allowance for the part of the month still ahead), spread over the days left; and within
//!   the day, polling's pace ([`Plan::round`]): what today has left spread over the rest of it,
//!   so that checks go on until the day's (and the month's) last hour.
//! - [`drain_due`]: the failed-push list is drained on signs of missed pushes (refused
//!   deliveries, downtime, a database outage, a gap the gap check found), [`SIGN_WAIT`] after
//!   the sign (items reach the list 3-5 minutes after DingTalk's last retry, docs/dingtalk.md §3,
//!   §6), again every [`SIGN_WAIT`] while drains find items, and at least every
//!   `reconcile.failed_floor_h`.
//! - [`next_mode`]: push mode, or polling mode when pushes are missing (deliveries allowance
//!   used up, approvals created through the outbox that got no event, a gap found while no push
//!   arrives), and back.
//!
//! Times in the planner's state are on the planner's [`Clock`] (the ledger's: real in
//! production, faster with a scaled embedded emulator); durations compared with times the
//! database stamps (`last_event_at`, `created_at`) are converted to real time with
//! `Clock::real_duration` by the callers' store queries.
//!
//! Owns: the decisions and their state. Does not own: the calls (`reconcile`), when jobs tick
//! (`scheduler`), the SQL (`store`), what is counted (`ledger`). Imports no job.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::{
    clock::{self, Clock},
    config::ReconcileConfig,
    ledger::{Allowances, Ledger, Purpose, Usage},
    metrics,
    store::{job_runs, sync_state, usage},
};

/// A failed push reaches the list 3-5 minutes after DingTalk's last retry (docs/dingtalk.md §3,
/// §6): a drain this long after a sign finds what the sign was about.
pub const SIGN_WAIT: Duration = Duration::from_secs(6 * 60);

/// A daemon that last worked longer ago than this before a start may have missed pushes
/// meanwhile. DingTalk parks a push in the failed list only after its retries, 10 s and then 30 s
/// later (docs/dingtalk.md §6), have failed too, so a downtime shorter than 30 s (40 s on the
/// other reading of the ladder) parks nothing; 20 s leaves room for the job log's granularity
/// (a run every few seconds). A sign costs one drain.
pub const DOWNTIME: Duration = Duration::from_secs(20);

/// Share of the monthly calls kept for live work for a whole month ahead (less as the month
/// goes by).
const MIN_RESERVE: f64 = 0.10;
/// Margin on the live pace for the rest of the month.
const RESERVE_MARGIN: f64 = 1.25;

/// `sync_state.name` of the planner's documents.
const STATE: &str = "planner";

/// What background work may spend today, from one reading of the ledger.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// `dingtalk.monthly_calls` (0: unmetered, no pacing).
    pub monthly_calls: u64,
    /// Metered calls this month, all purposes.
    pub used: i64,
    /// Calls kept for live work over the rest of the month.
    pub reserve: f64,
    /// Days of the month from the start of today (today included).
    pub days_left: f64,
    /// Background calls allowed per day from today on.
    pub per_day: f64,
    /// Metered background calls made today.
    pub background_today: i64,
    /// What is left of today (Beijing day, planner's clock).
    pub rest_of_day: Duration,
}

impl Plan {
    /// The plan for `usage` (this month's ledger) at `now` (the planner's clock).
    pub fn compute(usage: &Usage, now: DateTime<Utc>, monthly_calls: u64) -> Plan {
        let today = clock::day(now);
        let first = clock::month(now);
        let live: Vec<Purpose> = Purpose::ALL.into_iter().filter(|p| p.is_live()).collect();
        let background: Vec<Purpose> = Purpose::ALL.into_iter().filter(|p| !p.is_live()).collect();
        let used = usage.metered_calls();
        let used_before_today = used - usage.metered_calls_on(today);
        let day_start = clock::start_of(today);
        let days_left = clock::days_left(day_start);
        let background_today = usage.metered_calls_for(&background, today);
        let rest_of_day = (day_start + TimeDelta::days(1) - now)
            .to_std()
            .unwrap_or_default();
        if monthly_calls == 0 {
            return Plan {
                monthly_calls,
                used,
                reserve: 0.0,
                days_left,
                per_day: f64::INFINITY,
                background_today,
                rest_of_day,
            };
        }
        let m = monthly_calls as f64;
        // The live pace so far: live calls this month per day elapsed (at least one day, so that
        // the first hours of a month do not extrapolate a single create into thousands).
        let elapsed_days =
            ((now - clock::start_of(first)).num_milliseconds() as f64 / 86_400_000.0).max(1.0);
        let live_pace = usage.metered_calls_for(&live, first) as f64 / elapsed_days;
        // The floor shrinks with the month: a tenth of the allowance for a whole month ahead, a
        // day's share of it on the last day (what is kept and not needed by then is wasted).
        let month_days = clock::days_left(clock::start_of(first));
        let floor = m * MIN_RESERVE * (days_left / month_days).min(1.0);
        let reserve = (live_pace * days_left * RESERVE_MARGIN).max(floor);
        let per_day = ((m - used_before_today as f64 - reserve) / days_left).max(0.0);
        Plan {
            monthly_calls,
            used,
            reserve,
            days_left,
            per_day,
            background_today,
            rest_of_day,
        }
    }

    pub fn unmetered(&self) -> bool {
        self.monthly_calls == 0
    }

    /// Background calls still allowed today (`u64::MAX` when unmetered).
    pub fn left_today(&self) -> u64 {
        if self.unmetered() {
            return u64::MAX;
        }
        (self.per_day.floor() as i64 - self.background_today).max(0) as u64
    }

    /// What a polling round may spend now of `left` (the calls today still allows), `since` its
    /// last round (planner's clock, at most a day), if it spends only once it has `batch`: `left`
    /// spread evenly over the rest of the day from the last round on; 0 while that is less than
    /// `batch` (the round waits), unless the day ends before another wait as long (the day's last
    /// round takes what is left: a remainder too small for a round of its own would otherwise
    /// not be spent today, and on the month's last day never). Paced on what is left rather than
    /// on the day's allowance, what other work spent (gap checks, drains) and what earlier
    /// rounds left unspent is spread over the hours still ahead, so that the day's calls last
    /// until its end, and the last day's until the month's end.
    pub fn round(&self, left: u64, since: Duration, batch: f64) -> u64 {
        if self.unmetered() {
            return left;
        }
        let since = since.min(Duration::from_secs(86_400)).as_secs_f64();
        let rest = self.rest_of_day.as_secs_f64();
        let may = if since + rest > 0.0 {
            left as f64 * since / (since + rest)
        } else {
            left as f64
        };
        if may >= batch {
            (may.floor() as u64).min(left)
        } else if rest <= since {
            left
        } else {
            0
        }
    }
}

/// What a background job may still spend in this run; each call takes one.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    left: u64,
    /// The run stopped because the budget was spent.
    pub spent: bool,
}

impl Budget {
    pub fn new(calls: u64) -> Budget {
        Budget {
            left: calls,
            spent: false,
        }
    }

    /// Takes one call; false (and `spent` set) when none is left.
    pub fn take(&mut self) -> bool {
        if self.left == 0 {
            self.spent = true;
            return false;
        }
        self.left -= 1;
        true
    }

    /// Takes up to `n` calls; how many were granted.
    pub fn take_up_to(&mut self, n: u64) -> u64 {
        let granted = n.min(self.left);
        self.left -= granted;
        if granted < n {
            self.spent = true;
        }
        granted
    }

    /// Gives back calls taken but not made.
    pub fn give_back(&mut self, n: u64) {
        self.left = self.left.saturating_add(n);
    }

    pub fn left(&self) -> u64 {
        self.left
    }
}

// ---- The failed-push list ------------------------------------------------------------------

/// A sign of missed pushes, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sign {
    /// When it was seen (planner's clock).
    pub at: DateTime<Utc>,
    pub reason: String,
}

/// The failed drain's own state (`sync_state` planner/failed), written only by the failed job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DrainState {
    /// When the list was last drained (planner's clock).
    pub last_drain_at: Option<DateTime<Utc>>,
    /// Items the last drain found.
    pub last_found: u64,
    /// Refused deliveries of `refused_month` already taken as a sign.
    pub refused_seen: i64,
    pub refused_month: Option<NaiveDate>,
    /// The latest sign the job saw itself (refused deliveries, a database outage).
    pub sign: Option<Sign>,
}

/// Why a drain is due now, if it is: `state` the drain's state, `external` the latest sign
/// others recorded (start-up after downtime, a gap found), `floor` `reconcile.failed_floor_h`.
pub fn drain_due(
    state: &DrainState,
    external: Option<&Sign>,
    now: DateTime<Utc>,
    floor: Duration,
) -> Option<String> {
    let Some(last) = state.last_drain_at else {
        return Some("first drain".into());
    };
    let wait = delta(SIGN_WAIT);
    if state.last_found > 0 && now >= last + wait {
        return Some("the last drain found items".into());
    }
    for sign in [state.sign.as_ref(), external].into_iter().flatten() {
        if sign.at > last && now >= sign.at + wait {
            return Some(sign.reason.clone());
        }
    }
    (now >= last + delta(floor)).then(|| "floor".into())
}

fn delta(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

/// Set when a replica's failed job could not reach the database; the next tick that can
/// records it as a sign (callbacks refused meanwhile are in DingTalk's failed list).
static DATABASE_TROUBLE: AtomicBool = AtomicBool::new(false);

/// The failed job could not read the database.
pub fn note_database_trouble() {
    DATABASE_TROUBLE.store(true, Ordering::Relaxed);
}

/// Reads the failed job's state and notices the signs it watches itself: deliveries refused
/// since the last look (from the ledger), and a database outage this process saw.
pub async fn drain_state(
    pool: &PgPool,
    ledger: &Ledger,
    corp_id: &str,
) -> anyhow::Result<(DrainState, Option<Sign>)> {
    let now = ledger.clock().now();
    let mut state: DrainState = load(pool, corp_id, "failed").await?;
    let external: Option<Sign> = load(pool, corp_id, "sign").await?;
    let month = ledger.month(corp_id, now).await?;
    let refused = month.sum(|r| r.kind == "delivery" && r.purpose == "refused");
    if state.refused_month != month.month {
        state.refused_month = month.month;
        state.refused_seen = 0;
    }
    if refused > state.refused_seen {
        state.refused_seen = refused;
        state.sign = Some(Sign {
            at: now,
            reason: "deliveries refused".into(),
        });
    }
    if DATABASE_TROUBLE.swap(false, Ordering::Relaxed) {
        state.sign = Some(Sign {
            at: now,
            reason: "database outage".into(),
        });
    }
    Ok((state, external))
}

/// Saves the failed job's state.
pub async fn save_drain_state(
    pool: &PgPool,
    corp_id: &str,
    state: &DrainState,
) -> sqlx::Result<()> {
    save(pool, corp_id, "failed", state).await
}

/// Records a sign of missed pushes seen outside the failed job (the latest one wins: the drain
/// comes [`SIGN_WAIT`] after it).
pub async fn record_sign(
    pool: &PgPool,
    clock: Clock,
    corp_id: &str,
    reason: &str,
) -> sqlx::Result<()> {
    let sign = Sign {
        at: clock.now(),
        reason: reason.to_string(),
    };
    tracing::info!(
        reason,
        "sign of missed pushes: the failed-push list will be drained"
    );
    save(pool, corp_id, "sign", &sign).await
}

/// At start-up: when this organisation's daemons last worked more than [`DOWNTIME`] (of the
/// planner's clock) ago, pushes may have failed meanwhile: a sign. Reads the job run log (any
/// replica's), which the database keeps.
pub async fn note_start(pool: &PgPool, clock: Clock, corp_id: &str) -> sqlx::Result<()> {
    let (last, now) = job_runs::last_activity(pool, corp_id).await?;
    if let Some(last) = last {
        let down = (now - last).to_std().unwrap_or_default();
        if down > clock.real_duration(DOWNTIME) {
            record_sign(pool, clock, corp_id, "start-up after downtime").await?;
        }
    }
    Ok(())
}

// ---- Push health ---------------------------------------------------------------------------

/// Whether pushes arrive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Push,
    Polling,
}

/// Why pushes count as missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missing {
    /// The deliveries allowance is used up (the stricter reading: DingTalk delivers nothing).
    Deliveries,
    /// Approvals created through the outbox got no event at all.
    Silence,
    /// A gap check found an approval DingTalk had changed, and no push arrived meanwhile.
    Gap,
}

impl Missing {
    pub fn describe(self) -> &'static str {
        match self {
            Missing::Deliveries => "the month's deliveries allowance is used up",
            Missing::Silence => "approvals created through the outbox got no event",
            Missing::Gap => "a gap check found a change no push announced",
        }
    }
}

/// The push-health state (`sync_state` planner/push), written only by the sweep job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PushState {
    pub mode: Mode,
    pub reason: Option<Missing>,
    /// When the mode last changed (planner's clock) and the database's time then.
    pub since: Option<DateTime<Utc>>,
    pub since_db: Option<DateTime<Utc>>,
    /// The month last seen (first day).
    pub month: Option<NaiveDate>,
    /// A month in which dingsync polled.
    pub polled_month: Option<NaiveDate>,
    /// A month in which a push arrived while the deliveries allowance counted as used up:
    /// DingTalk still delivers, so that reason is not taken again this month.
    pub deliveries_disproved: Option<NaiveDate>,
    /// The reconciliation pass after a month in polling mode re-checks open approvals not
    /// fetched since this database time; none while no pass is due.
    pub pass_before: Option<DateTime<Utc>>,
    /// Polling: when the last round spent calls (planner's clock); the next one spends what
    /// the time since gives (`Plan::round`).
    pub poll_tick_at: Option<DateTime<Utc>>,
    /// Polling: per process_code, instances created up to this time (epoch ms) are listed.
    #[serde(default)]
    pub listed_until_ms: std::collections::BTreeMap<String, i64>,
}

/// What the planner reads to judge push health.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PushSigns {
    /// Deliveries this month.
    pub deliveries: i64,
    /// Approvals created through the outbox (since push mode began, at least
    /// `push_silence_s` ago): without any event, and in all.
    pub silent: i64,
    pub created: i64,
    /// The latest stored push (planner's clock).
    pub last_push: Option<DateTime<Utc>>,
    /// This run's gap checks found an approval DingTalk had changed.
    pub gap_changed: bool,
}

/// A change of mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    ToPolling(Missing),
    ToPush,
}

/// The push mode's next step: `state` as stored (its month already rolled, see
/// [`roll_month`]), `signs` read now, `quiet` how long without pushes makes a gap's change a
/// sign of missing pushes (`reconcile.gap_after_s`).
pub fn next_mode(
    state: &PushState,
    signs: &PushSigns,
    allowances: Allowances,
    now: DateTime<Utc>,
    quiet: Duration,
) -> Option<Switch> {
    let month = clock::month(now);
    match state.mode {
        Mode::Polling => {
            let pushed = match (signs.last_push, state.since) {
                (Some(push), Some(since)) => push > since,
                (Some(_), None) => true,
                _ => false,
            };
            pushed.then_some(Switch::ToPush)
        }
        Mode::Push => {
            let md = allowances.deliveries;
            if md > 0 && signs.deliveries >= md as i64 && state.deliveries_disproved != Some(month)
            {
                return Some(Switch::ToPolling(Missing::Deliveries));
            }
            // One silent approval is a lost event or two (DingTalk loses some for good); two,
            // or every recent one, is pushes not arriving.
            if signs.silent >= 2 || (signs.silent >= 1 && signs.silent == signs.created) {
                return Some(Switch::ToPolling(Missing::Silence));
            }
            let pushes_quiet = signs.last_push.is_none_or(|p| p + delta(quiet) < now);
            if signs.gap_changed && pushes_quiet {
                return Some(Switch::ToPolling(Missing::Gap));
            }
            None
        }
    }
}

/// Takes the month's turn into account: a new month after a month with polling schedules the
/// reconciliation pass (open approvals not fetched since `db_now`) and ends a polling mode whose
/// reason was the deliveries allowance. Whether anything changed.
pub fn roll_month(state: &mut PushState, now: DateTime<Utc>, db_now: DateTime<Utc>) -> bool {
    let month = clock::month(now);
    if state.month == Some(month) {
        return false;
    }
    let previous = state.month;
    state.month = Some(month);
    if previous.is_some() && (state.polled_month == previous || state.mode == Mode::Polling) {
        state.pass_before = Some(db_now);
    }
    if state.mode == Mode::Polling && state.reason == Some(Missing::Deliveries) {
        state.mode = Mode::Push;
        state.reason = None;
        state.since = Some(now);
        state.since_db = Some(db_now);
        tracing::info!("a new month: the deliveries allowance is renewed; back to pushes");
    }
    true
}

/// Applies `switch` to `state`, logging it.
pub fn apply_switch(
    state: &mut PushState,
    switch: Switch,
    now: DateTime<Utc>,
    db_now: DateTime<Utc>,
    per_day: f64,
) {
    match switch {
        Switch::ToPolling(reason) => {
            tracing::warn!(
                reason = reason.describe(),
                "pushes missing ({}); polling within the calls left: {} calls/day",
                reason.describe(),
                if per_day.is_finite() {
                    format!("{per_day:.0}")
                } else {
                    "unmetered".into()
                }
            );
            state.mode = Mode::Polling;
            state.reason = Some(reason);
            state.poll_tick_at = Some(now);
        }
        Switch::ToPush => {
            tracing::info!("pushes arrive again; back to push mode");
            if state.reason == Some(Missing::Deliveries) {
                state.deliveries_disproved = Some(clock::month(now));
            }
            state.mode = Mode::Push;
            state.reason = None;
        }
    }
    state.since = Some(now);
    state.since_db = Some(db_now);
}

/// Reads the push-health state.
pub async fn push_state(pool: &PgPool, corp_id: &str) -> sqlx::Result<PushState> {
    load(pool, corp_id, "push").await
}

/// Saves the push-health state and shows its mode as `dingsync_push_mode`.
pub async fn save_push_state(pool: &PgPool, corp_id: &str, state: &PushState) -> sqlx::Result<()> {
    metrics::push_mode(corp_id, state.mode == Mode::Polling);
    save(pool, corp_id, "push", state).await
}

/// The latest stored push of `corp_id` (planner's clock, as the ledger stamps it).
pub async fn last_push(pool: &PgPool, corp_id: &str) -> sqlx::Result<Option<DateTime<Utc>>> {
    usage::last_push(pool, corp_id).await
}

/// The plan for now.
pub async fn plan(ledger: &Ledger, corp_id: &str, allowances: Allowances) -> sqlx::Result<Plan> {
    let now = ledger.clock().now();
    let usage = ledger.month(corp_id, now).await?;
    Ok(Plan::compute(&usage, now, allowances.calls))
}

/// `reconcile.gap_after_s` etc. as durations of the planner's clock.
pub fn gap_after(config: &ReconcileConfig) -> Duration {
    Duration::from_secs(config.gap_after_s)
}

pub fn sweep_first_check(config: &ReconcileConfig) -> Duration {
    Duration::from_secs(config.sweep_first_check_h * 3600)
}

pub fn failed_floor(config: &ReconcileConfig) -> Duration {
    Duration::from_secs_f64(config.failed_floor_h * 3600.0)
}

pub fn push_silence(config: &ReconcileConfig) -> Duration {
    Duration::from_secs(config.push_silence_s)
}

async fn load<T: Default + for<'de> Deserialize<'de>>(
    pool: &PgPool,
    corp_id: &str,
    scope: &str,
) -> sqlx::Result<T> {
    let value = sync_state::load(pool, corp_id, STATE, scope).await?;
    Ok(value
        .and_then(|v| match serde_json::from_value(v) {
            Ok(state) => Some(state),
            Err(e) => {
                // A document of another version: start afresh rather than stop planning.
                tracing::warn!(scope, error = %e, "unreadable planner state; starting afresh");
                None
            }
        })
        .unwrap_or_default())
}

async fn save<T: Serialize>(
    pool: &PgPool,
    corp_id: &str,
    scope: &str,
    state: &T,
) -> sqlx::Result<()> {
    let value = serde_json::to_value(state).expect("planner state serializes");
    sync_state::save(pool, corp_id, STATE, scope, &value).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::usage::UsageRow;
    use chrono::TimeZone;

    fn row(day: NaiveDate, kind: &str, purpose: Purpose, count: i64) -> UsageRow {
        UsageRow {
            day,
            kind: kind.into(),
            api: "topapi/processinstance/get".into(),
            purpose: purpose.name().into(),
            metered: true,
            count,
        }
    }

    fn at(d: u32, h: u32) -> DateTime<Utc> {
        // Beijing time d.11.2026 h:00.
        Utc.with_ymd_and_hms(2026, 11, d, h, 0, 0).unwrap() - TimeDelta::hours(8)
    }

    fn day(d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, d).unwrap()
    }

    #[test]
    fn an_idle_month_gives_background_work_the_month_less_the_reserve_spread_over_its_days() {
        let plan = Plan::compute(&Usage::default(), at(1, 9), 5_000);
        assert!((plan.days_left - 30.0).abs() < 1e-9);
        assert!((plan.reserve - 500.0).abs() < 1e-9, "{plan:?}");
        assert!((plan.per_day - 150.0).abs() < 1e-9, "{plan:?}");
        assert_eq!(plan.left_today(), 150);
        // At 9:00, 15 hours are left of the day: a round a minute after the last one spends a
        // minute's share of what is left from then on.
        assert_eq!(plan.rest_of_day, Duration::from_secs(15 * 3600));
        let minute = Duration::from_secs(60);
        assert_eq!(plan.round(150, minute, 1.0), 0, "150 / 901 of a call");
        let hour = Duration::from_secs(3600);
        assert_eq!(plan.round(150, 2 * hour, 10.0), (150.0 * 2.0 / 17.0) as u64);
        assert_eq!(plan.round(150, hour, 10.0), 0, "9.4 calls wait for a tenth");
    }

    #[test]
    fn rounds_paced_on_what_is_left_spend_the_day_until_its_last_hour_whatever_else_takes() {
        // 150 calls a day; a tick every 72 minutes (the month benchmark's); rounds of at least
        // 12 calls, each spending what it may; a drain takes 3 calls every 6 hours.
        let tick = TimeDelta::minutes(72);
        let mut left: u64 = 150;
        let mut last_round = at(1, 0);
        let mut last_spend = None;
        let mut now = at(1, 0);
        while now < at(2, 0) {
            now += tick;
            if now >= at(2, 0) {
                break;
            }
            if (now - at(1, 0)).num_minutes() % 360 < 72 {
                left = left.saturating_sub(3);
            }
            let mut plan = Plan::compute(&Usage::default(), now, 5_000);
            plan.rest_of_day = (at(2, 0) - now).to_std().unwrap();
            let since = (now - last_round).to_std().unwrap();
            let spent = plan.round(left, since, 12.0);
            if spent == 0 {
                continue;
            }
            left -= spent;
            last_round = now;
            last_spend = Some(now);
        }
        // Rounds go on into the day's last two hours, the last one spending what is left.
        assert!(
            last_spend.is_some_and(|t| t >= at(1, 22)),
            "last round {last_spend:?}"
        );
        assert_eq!(left, 0, "left at the day's end");
    }

    #[test]
    fn days_left_count_from_the_start_of_today_so_spending_today_does_not_shrink_today() {
        let usage = Usage {
            month: Some(day(1)),
            rows: vec![row(day(21), "call", Purpose::Sweep, 40)],
        };
        let plan = Plan::compute(&usage, at(21, 23), 5_000);
        assert!((plan.days_left - 10.0).abs() < 1e-9);
        // The reserve's floor: a tenth of the month for the third of it still ahead.
        assert!((plan.reserve - 500.0 / 3.0).abs() < 1e-9, "{plan:?}");
        assert!(
            (plan.per_day - (5_000.0 - 500.0 / 3.0) / 10.0).abs() < 1e-9,
            "{plan:?}"
        );
        assert_eq!(plan.background_today, 40);
        assert_eq!(plan.left_today(), 483 - 40);
    }

    #[test]
    fn a_month_nearly_spent_stops_background_work_and_keeps_the_live_reserve() {
        // 25 days in: 4,000 live calls (160 a day) and 600 background calls.
        let mut rows = vec![row(day(1), "call", Purpose::Sweep, 600)];
        for d in 1..=25 {
            rows.push(row(day(d), "call", Purpose::Details, 160));
        }
        let usage = Usage {
            month: Some(day(1)),
            rows,
        };
        let plan = Plan::compute(&usage, at(26, 0), 5_000);
        // The rest of the month needs ~160 live calls a day: 5 days x 160 x 1.25 = 1,000, more
        // than the 400 left.
        assert!(plan.reserve > 900.0, "{plan:?}");
        assert_eq!(plan.per_day, 0.0);
        assert_eq!(plan.left_today(), 0);
        assert_eq!(
            plan.round(plan.left_today(), Duration::from_secs(3600), 1.0),
            0
        );
    }

    #[test]
    fn the_reserve_is_at_least_a_tenth_of_the_month_ahead_and_an_unmetered_organisation_is_not_paced()
     {
        let usage = Usage {
            month: Some(day(1)),
            rows: vec![row(day(2), "call", Purpose::Poll, 4_400)],
        };
        let plan = Plan::compute(&usage, at(3, 12), 5_000);
        let reserve = 500.0 * 28.0 / 30.0;
        assert!((plan.reserve - reserve).abs() < 1e-9, "{plan:?}");
        assert!(
            (plan.per_day - (600.0 - reserve) / 28.0).abs() < 1e-9,
            "{plan:?}"
        );
        assert_eq!(plan.left_today(), 4);
        let unmetered = Plan::compute(&usage, at(3, 12), 0);
        assert!(unmetered.unmetered());
        assert_eq!(unmetered.left_today(), u64::MAX);
    }

    #[test]
    fn an_idle_month_drains_the_failed_list_at_the_floor_and_nothing_else() {
        let floor = Duration::from_secs(6 * 3600);
        let mut state = DrainState::default();
        let mut drains = Vec::new();
        // A tick a minute over a 30-day month, no sign ever.
        let start = at(1, 0);
        for minute in 0..(30 * 24 * 60) {
            let now = start + TimeDelta::minutes(minute);
            if drain_due(&state, None, now, floor).is_some() {
                drains.push(now);
                state.last_drain_at = Some(now);
                state.last_found = 0;
            }
        }
        // The first at once, then one every six hours: four a day.
        assert_eq!(drains.len(), 30 * 4);
    }

    #[test]
    fn a_sign_brings_a_drain_six_minutes_later_and_items_found_bring_another() {
        let floor = Duration::from_secs(6 * 3600);
        let t0 = at(5, 10);
        let mut state = DrainState {
            last_drain_at: Some(t0),
            ..DrainState::default()
        };
        let sign = Sign {
            at: t0 + TimeDelta::minutes(30),
            reason: "deliveries refused".into(),
        };
        let due = |state: &DrainState, m: i64| {
            drain_due(state, Some(&sign), t0 + TimeDelta::minutes(m), floor)
        };
        assert_eq!(due(&state, 35), None);
        assert_eq!(due(&state, 36).as_deref(), Some("deliveries refused"));
        state.last_drain_at = Some(t0 + TimeDelta::minutes(36));
        state.last_found = 3;
        assert_eq!(due(&state, 41), None);
        assert_eq!(
            due(&state, 42).as_deref(),
            Some("the last drain found items")
        );
        state.last_drain_at = Some(t0 + TimeDelta::minutes(42));
        state.last_found = 0;
        assert_eq!(due(&state, 100), None, "the sign was drained");
        assert_eq!(due(&state, 42 + 360).as_deref(), Some("floor"));
    }

    #[test]
    fn pushes_count_as_missing_for_three_reasons_and_come_back_with_a_push() {
        let now = at(10, 12);
        let quiet = Duration::from_secs(600);
        let allowances = Allowances {
            calls: 5_000,
            deliveries: 3_000,
        };
        let healthy = PushSigns {
            deliveries: 100,
            silent: 1,
            created: 20,
            last_push: Some(now - TimeDelta::seconds(5)),
            gap_changed: true,
        };
        let push = PushState::default();
        assert_eq!(next_mode(&push, &healthy, allowances, now, quiet), None);
        let exhausted = PushSigns {
            deliveries: 3_000,
            ..healthy
        };
        assert_eq!(
            next_mode(&push, &exhausted, allowances, now, quiet),
            Some(Switch::ToPolling(Missing::Deliveries))
        );
        let silent = PushSigns {
            silent: 2,
            ..healthy
        };
        assert_eq!(
            next_mode(&push, &silent, allowances, now, quiet),
            Some(Switch::ToPolling(Missing::Silence))
        );
        let gap = PushSigns {
            last_push: Some(now - TimeDelta::hours(1)),
            ..healthy
        };
        assert_eq!(
            next_mode(&push, &gap, allowances, now, quiet),
            Some(Switch::ToPolling(Missing::Gap))
        );

        let mut state = PushState::default();
        apply_switch(
            &mut state,
            Switch::ToPolling(Missing::Deliveries),
            now,
            now,
            100.0,
        );
        let later = now + TimeDelta::minutes(5);
        let no_push = PushSigns {
            last_push: Some(now - TimeDelta::seconds(1)),
            ..exhausted
        };
        assert_eq!(next_mode(&state, &no_push, allowances, later, quiet), None);
        let pushed = PushSigns {
            last_push: Some(later),
            ..exhausted
        };
        assert_eq!(
            next_mode(&state, &pushed, allowances, later, quiet),
            Some(Switch::ToPush)
        );
        apply_switch(&mut state, Switch::ToPush, later, later, 100.0);
        // DingTalk still delivers: the used-up allowance is not taken as a reason again.
        assert_eq!(next_mode(&state, &pushed, allowances, later, quiet), None);
    }

    #[test]
    fn a_new_month_after_polling_schedules_one_pass_and_ends_a_deliveries_polling() {
        let now = at(30, 23);
        let mut state = PushState::default();
        assert!(roll_month(&mut state, now, now));
        assert_eq!(state.pass_before, None, "the first month seen");
        apply_switch(
            &mut state,
            Switch::ToPolling(Missing::Deliveries),
            now,
            now,
            1.0,
        );
        state.polled_month = state.month;
        let december = now + TimeDelta::hours(2);
        assert!(roll_month(&mut state, december, december));
        assert_eq!(state.mode, Mode::Push);
        assert_eq!(state.pass_before, Some(december));
        assert!(!roll_month(&mut state, december, december));
    }
}
