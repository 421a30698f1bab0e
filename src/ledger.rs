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
}

impl Purpose {
    pub const ALL: [Purpose; 12] = [
        Purpose::Outbox,
        Purpose::Search,
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
    ];

    pub fn name(self) -> &'static str {
        match self {
            Purpose::Outbox => "outbox",
            Purpose::Search => "search",
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
        }
    }

    /// Work that cannot wait for a better day: creates (a business app waits for them), their
    /// searches, and the one detail fetch that brings an approval's form. The rest is background
    /// work, paced by what is left of the month (`planner`).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            Purpose::Outbox
                | Purpose::Search
                | Purpose::Details
                | Purpose::Callback
                | Purpose::Doctor
                | Purpose::Token
        )
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
