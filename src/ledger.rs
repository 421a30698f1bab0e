//! The ledger of DingTalk's two monthly allowances (docs/dingtalk.md §7): every call dingsync
//! makes to DingTalk and every event delivered to it, counted per organisation, Beijing day, API
//! and [`Purpose`] in `dingsync.usage`, across replicas and restarts.
//!
//! Counting must not slow the paths it counts (a callback is answered within DingTalk's 1500 ms,
//! and a database write per call or event would serialise them on one counter row), so counts
//! gather in memory and a flusher adds them to the database every [`FLUSH_EVERY`], in one
//! statement, and once more at shutdown. What a `kill -9` can lose is the last second's counts:
//! the ledger can under-count by that much, never over-count. Readers ([`Ledger::month`]) see the
//! database plus what this process has not flushed yet.
//!
//! Owns: the purposes, the counters and their flushing. Does not own: which calls are metered
//! (`dingtalk::quota`), what the counts are used for (`planner`, `cli::quota`), the SQL
//! (`store::usage`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    clock::{self, Clock},
    config::DingTalkConfig,
    store::usage::{self, Delta, UsageRow},
};

/// How often counts are added to the database.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// What a DingTalk call is for. The ledger counts by it; the client derives the call's priority
/// from it (`dingtalk::Client`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Purpose {
    /// Creating an approval from the outbox.
    Outbox,
    /// Looking for the instance of a create whose answer was lost.
    Search,
    /// Carrying out an action on an approval (`dingsync.actions`), and reading it back.
    Action,
    /// The detail fetch of an approval an event announced.
    Details,
    /// Checking an approval whose events suggest one went missing.
    Gap,
    /// Re-checking open approvals.
    Sweep,
    /// Polling while pushes do not arrive.
    Poll,
    /// Listing a template's instances for ones no event announced.
    Backfill,
    /// Draining DingTalk's failed-push list.
    Failed,
    /// `dingsync drift`.
    Drift,
    /// `dingsync doctor`.
    Doctor,
    /// Registering, reading or deleting the callback.
    Callback,
    /// Fetching the access token.
    Token,
    /// Opening a Stream connection (`v1.0/gateway/connections/open`).
    Stream,
    /// Fetching a template's form schema (the typed form views).
    Forms,
}

impl Purpose {
    pub const ALL: [Purpose; 15] = [
        Purpose::Outbox,
        Purpose::Search,
        Purpose::Action,
        Purpose::Details,
        Purpose::Gap,
        Purpose::Sweep,
        Purpose::Poll,
        Purpose::Backfill,
        Purpose::Failed,
        Purpose::Drift,
        Purpose::Doctor,
        Purpose::Callback,
        Purpose::Token,
        Purpose::Stream,
        Purpose::Forms,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Purpose::Outbox => "outbox",
            Purpose::Search => "search",
            Purpose::Action => "action",
            Purpose::Details => "details",
            Purpose::Gap => "gap",
            Purpose::Sweep => "sweep",
            Purpose::Poll => "poll",
            Purpose::Backfill => "backfill",
            Purpose::Failed => "failed",
            Purpose::Drift => "drift",
            Purpose::Doctor => "doctor",
            Purpose::Callback => "callback",
            Purpose::Token => "token",
            Purpose::Stream => "stream",
            Purpose::Forms => "forms",
        }
    }

    /// Work that cannot wait for a better day: creates and actions (a business app waits for
    /// them), their searches and read-backs, the one detail fetch that brings an approval's
    /// form, and the schema of a form (a few calls a month; without it no form view). The rest is background work, paced by what is left of the month (`planner`).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            Purpose::Outbox
                | Purpose::Search
                | Purpose::Action
                | Purpose::Details
                | Purpose::Callback
                | Purpose::Doctor
                | Purpose::Token
                | Purpose::Stream
                | Purpose::Forms
        )
    }
}

/// dingsync's share of the organisation's monthly allowances; 0: unmetered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowances {
    pub calls: u64,
    pub deliveries: u64,
}

impl Allowances {
    pub fn from_config(config: &DingTalkConfig) -> Allowances {
        Allowances {
            calls: config.monthly_calls,
            deliveries: config.monthly_deliveries,
        }
    }
}

/// The two things DingTalk meters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Call,
    Delivery,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Call => "call",
            Kind::Delivery => "delivery",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    corp_id: String,
    day: NaiveDate,
    kind: Kind,
    api: String,
    purpose: &'static str,
    metered: bool,
}

/// The counters; one per process, shared by every organisation it serves. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    clock: Clock,
    pending: Mutex<HashMap<Key, (i64, DateTime<Utc>)>>,
}

/// One organisation's use in one month, by kind, API and purpose.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// First day of the Beijing month.
    pub month: Option<NaiveDate>,
    pub rows: Vec<UsageRow>,
}

impl Usage {
    /// Metered calls in the month.
    pub fn metered_calls(&self) -> i64 {
        self.sum(|r| r.kind == "call" && r.metered)
    }

    /// Deliveries in the month.
    pub fn deliveries(&self) -> i64 {
        self.sum(|r| r.kind == "delivery")
    }

    /// Metered calls on `day`.
    pub fn metered_calls_on(&self, day: NaiveDate) -> i64 {
        self.sum(|r| r.kind == "call" && r.metered && r.day == day)
    }

    /// Metered calls for `purposes`, from `since` (a Beijing day) on.
    pub fn metered_calls_for(&self, purposes: &[Purpose], since: NaiveDate) -> i64 {
        self.sum(|r| {
            r.kind == "call"
                && r.metered
                && r.day >= since
                && purposes.iter().any(|p| p.name() == r.purpose)
        })
    }

    /// Counts by (kind, api, purpose) over the month.
    pub fn by_api_and_purpose(&self) -> BTreeMap<(String, String, String), i64> {
        let mut out = BTreeMap::new();
        for r in &self.rows {
            *out.entry((r.kind.clone(), r.api.clone(), r.purpose.clone()))
                .or_default() += r.count;
        }
        out
    }

    pub fn sum(&self, keep: impl Fn(&UsageRow) -> bool) -> i64 {
        self.rows.iter().filter(|r| keep(r)).map(|r| r.count).sum()
    }

    /// Where this month is heading at `now` (within the month of this usage), given dingsync's
    /// share of the two allowances (`monthly_calls`, `monthly_deliveries`; 0: unmetered).
    ///
    /// The pace is per day over the last [`PACE_DAYS`] Beijing days (today included, pro rata:
    /// the part of it that has passed), or since the month began when it is younger; at least
    /// [`MIN_PACE_SPAN`] is assumed to have passed, so that the first minutes of a month do not
    /// forecast from a handful of calls as if they were a day's.
    pub fn forecast(
        &self,
        now: DateTime<Utc>,
        monthly_calls: u64,
        monthly_deliveries: u64,
    ) -> Forecast {
        let today = clock::day(now);
        let first = self.month.unwrap_or_else(|| clock::month(now));
        let window_start = (today - chrono::TimeDelta::days(PACE_DAYS - 1)).max(first);
        let elapsed_days = ((now - clock::start_of(window_start)).num_milliseconds() as f64
            / 86_400_000.0)
            .max(MIN_PACE_SPAN);
        let days_left = clock::days_left(now);
        let end = clock::month_span(now).1;
        let outlook = |so_far: i64, in_window: i64, allowance: u64| {
            let per_day = in_window as f64 / elapsed_days;
            let at_month_end = so_far + (per_day * days_left).round() as i64;
            let runs_out = (allowance > 0)
                .then(|| {
                    let left = allowance as f64 - so_far as f64;
                    if left <= 0.0 {
                        return Some(today);
                    }
                    if per_day <= 0.0 {
                        return None;
                    }
                    let ms = (left / per_day * 86_400_000.0).min(1e15) as i64;
                    let at = now + chrono::TimeDelta::milliseconds(ms);
                    (at < end).then(|| clock::day(at))
                })
                .flatten();
            Outlook {
                so_far,
                per_day,
                at_month_end,
                allowance,
                runs_out,
            }
        };
        let calls_in_window = self.sum(|r| r.kind == "call" && r.metered && r.day >= window_start);
        let deliveries_in_window = self.sum(|r| r.kind == "delivery" && r.day >= window_start);
        Forecast {
            calls: outlook(self.metered_calls(), calls_in_window, monthly_calls),
            deliveries: outlook(self.deliveries(), deliveries_in_window, monthly_deliveries),
        }
    }
}

/// Days the pace of [`Usage::forecast`] is taken over.
pub const PACE_DAYS: i64 = 7;
/// The shortest span, in days, the pace is taken over (one hour).
pub const MIN_PACE_SPAN: f64 = 1.0 / 24.0;

/// The month's outlook for calls and for deliveries ([`Usage::forecast`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    /// Metered calls.
    pub calls: Outlook,
    pub deliveries: Outlook,
}

/// One allowance's outlook.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outlook {
    /// Counted this month so far.
    pub so_far: i64,
    /// The current pace, per day.
    pub per_day: f64,
    /// So far plus the pace until the month ends.
    pub at_month_end: i64,
    /// dingsync's share; 0: unmetered.
    pub allowance: u64,
    /// The Beijing day the allowance runs out at this pace (today when it already has); `None`
    /// when unmetered or when it lasts the month.
    pub runs_out: Option<NaiveDate>,
}

impl Outlook {
    /// Whether the forecast goes beyond a metered allowance.
    pub fn exceeds(&self) -> bool {
        self.allowance > 0 && self.at_month_end > i64::try_from(self.allowance).unwrap_or(i64::MAX)
    }
}

impl Ledger {
    pub fn new(pool: PgPool, clock: Clock) -> Ledger {
        Ledger {
            inner: Arc::new(Inner {
                pool,
                clock,
                pending: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The clock the ledger's days are read on.
    pub fn clock(&self) -> Clock {
        self.inner.clock
    }

    /// Counts one call to DingTalk's `api` (the path without its leading slash).
    pub fn call(&self, corp_id: &str, api: &str, purpose: Purpose, metered: bool) {
        self.count(corp_id, Kind::Call, api, purpose.name(), metered);
    }

    /// Counts one event delivered to dingsync (`event_type`: its tag), as `push` when it was
    /// stored and acknowledged, as `refused` when dingsync answered with an error (DingTalk
    /// retries it, and after its last retry puts it in the failed-push list: a sign for the
    /// failed-list drain, `planner`).
    pub fn delivery(&self, corp_id: &str, event_type: &str, stored: bool) {
        // Every delivery counts against the deliveries allowance: DingTalk exempts only
        // contact-change events, which dingsync does not subscribe to (docs/dingtalk.md §7).
        let purpose = if stored { "push" } else { "refused" };
        self.count(corp_id, Kind::Delivery, event_type, purpose, true);
    }

    fn count(&self, corp_id: &str, kind: Kind, api: &str, purpose: &'static str, metered: bool) {
        let now = self.inner.clock.now();
        let key = Key {
            corp_id: corp_id.to_string(),
            day: clock::day(now),
            kind,
            api: api.trim_start_matches('/').to_string(),
            purpose,
            metered,
        };
        let mut pending = self.inner.pending.lock().unwrap();
        let entry = pending.entry(key).or_insert((0, now));
        entry.0 += 1;
        entry.1 = entry.1.max(now);
    }

    /// Adds the counts gathered so far to the database. On failure they are kept for the next
    /// flush.
    pub async fn flush(&self) -> sqlx::Result<()> {
        let taken: Vec<(Key, (i64, DateTime<Utc>))> =
            self.inner.pending.lock().unwrap().drain().collect();
        if taken.is_empty() {
            return Ok(());
        }
        let deltas: Vec<Delta> = taken
            .iter()
            .map(|(k, (count, last_at))| Delta {
                corp_id: k.corp_id.clone(),
                day: k.day,
                kind: k.kind.name(),
                api: k.api.clone(),
                purpose: k.purpose,
                metered: k.metered,
                count: *count,
                last_at: *last_at,
            })
            .collect();
        if let Err(e) = usage::add(&self.inner.pool, &deltas).await {
            let mut pending = self.inner.pending.lock().unwrap();
            for (key, (count, last_at)) in taken {
                let entry = pending.entry(key).or_insert((0, last_at));
                entry.0 += count;
                entry.1 = entry.1.max(last_at);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Flushes every [`FLUSH_EVERY`] until `shutdown`, then once more.
    pub async fn run_flusher(self, shutdown: CancellationToken) {
        let mut warned = false;
        loop {
            let stop = tokio::select! {
                () = shutdown.cancelled() => true,
                () = tokio::time::sleep(FLUSH_EVERY) => false,
            };
            match self.flush().await {
                Ok(()) => warned = false,
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(error = %e, "could not write the allowance ledger; keeping the counts in memory and retrying");
                }
                Err(_) => {}
            }
            if stop {
                return;
            }
        }
    }

    /// `corp_id`'s use in the Beijing month of `at` (on the ledger's clock): the database plus
    /// what this process has not flushed yet.
    pub async fn month(&self, corp_id: &str, at: DateTime<Utc>) -> sqlx::Result<Usage> {
        let first = clock::month(at);
        let last = clock::next_month(first).pred_opt().expect("a day before");
        let mut rows = usage::rows(&self.inner.pool, corp_id, first, last).await?;
        let pending = self.inner.pending.lock().unwrap();
        for (k, (count, _)) in pending.iter() {
            if k.corp_id != corp_id || k.day < first || k.day > last {
                continue;
            }
            match rows.iter_mut().find(|r| {
                r.day == k.day
                    && r.kind == k.kind.name()
                    && r.api == k.api
                    && r.purpose == k.purpose
                    && r.metered == k.metered
            }) {
                Some(r) => r.count += count,
                None => rows.push(UsageRow {
                    day: k.day,
                    kind: k.kind.name().to_string(),
                    api: k.api.clone(),
                    purpose: k.purpose.to_string(),
                    metered: k.metered,
                    count: *count,
                }),
            }
        }
        Ok(Usage {
            month: Some(first),
            rows,
        })
    }

    /// `corp_id`'s use this month.
    pub async fn this_month(&self, corp_id: &str) -> sqlx::Result<Usage> {
        self.month(corp_id, self.inner.clock.now()).await
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn row(day: u32, kind: &str, purpose: &str, metered: bool, count: i64) -> UsageRow {
        UsageRow {
            day: NaiveDate::from_ymd_opt(2026, 11, day).unwrap(),
            kind: kind.into(),
            api: if kind == "call" {
                "topapi/processinstance/get".into()
            } else {
                "bpms_instance_change".into()
            },
            purpose: purpose.into(),
            metered,
            count,
        }
    }

    fn november(rows: Vec<UsageRow>) -> Usage {
        Usage {
            month: NaiveDate::from_ymd_opt(2026, 11, 1),
            rows,
        }
    }

    /// Beijing noon of November `day` (04:00 UTC).
    fn noon(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, day, 4, 0, 0).unwrap()
    }

    #[test]
    fn the_pace_is_taken_over_the_last_seven_days_with_today_pro_rata() {
        // 100 metered calls a day on the 1st..9th, 50 so far on the 10th (half of it passed).
        let mut rows: Vec<UsageRow> = (1..=9)
            .map(|d| row(d, "call", "details", true, 100))
            .collect();
        rows.push(row(10, "call", "details", true, 50));
        // Unmetered calls count for nothing.
        rows.push(row(10, "call", "token", false, 1_000));
        let usage = november(rows);
        let f = usage.forecast(noon(10), 5_000, 3_000);
        assert_eq!(f.calls.so_far, 950);
        // The 4th..10th: 6 full days and half of today, 650 calls.
        assert!(
            (f.calls.per_day - 650.0 / 6.5).abs() < 1e-9,
            "{}",
            f.calls.per_day
        );
        // 20.5 days left in November.
        assert_eq!(f.calls.at_month_end, 950 + (100.0f64 * 20.5).round() as i64);
        // 4050 left at 100 a day: 40.5 days, past the month's end.
        assert_eq!(f.calls.runs_out, None);
        assert!(!f.calls.exceeds());
        let tight = usage.forecast(noon(10), 2_000, 0);
        // 1050 left at 100 a day: 10.5 days after noon on the 10th is midnight of the 21st.
        assert_eq!(tight.calls.runs_out, NaiveDate::from_ymd_opt(2026, 11, 21));
        assert!(tight.calls.exceeds());
        assert_eq!(tight.deliveries.runs_out, None, "unmetered");
    }

    #[test]
    fn early_in_the_month_the_pace_is_since_the_first_and_an_allowance_used_up_ran_out_today() {
        let usage = november(vec![
            row(1, "call", "outbox", true, 10),
            row(2, "call", "outbox", true, 10),
            row(2, "delivery", "push", true, 30),
        ]);
        let f = usage.forecast(noon(2), 20, 3_000);
        // 1.5 days since the month began.
        assert!((f.calls.per_day - 20.0 / 1.5).abs() < 1e-9);
        assert!((f.deliveries.per_day - 30.0 / 1.5).abs() < 1e-9);
        assert_eq!(f.calls.runs_out, NaiveDate::from_ymd_opt(2026, 11, 2));
        assert_eq!(f.deliveries.so_far, 30);
        // 20 a day over 28.5 days: 570 more.
        assert_eq!(f.deliveries.at_month_end, 600);
        assert_eq!(f.deliveries.runs_out, None);
    }

    #[test]
    fn an_empty_month_forecasts_nothing_and_never_runs_out() {
        let f = november(Vec::new()).forecast(noon(15), 5_000, 3_000);
        assert_eq!((f.calls.so_far, f.calls.at_month_end), (0, 0));
        assert_eq!((f.calls.runs_out, f.deliveries.runs_out), (None, None));
        // The first minutes of a month count as an hour.
        let start = Utc.with_ymd_and_hms(2026, 10, 31, 16, 1, 0).unwrap();
        let f = november(vec![row(1, "call", "outbox", true, 1)]).forecast(start, 5_000, 0);
        assert!((f.calls.per_day - 24.0).abs() < 1e-9);
    }
}
