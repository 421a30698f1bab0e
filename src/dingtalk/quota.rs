//! The monthly allowance gate (docs/dingtalk.md §7): which DingTalk calls count against the
//! organisation's monthly allowance, and whether a metered call may be sent now.
//!
//! Metered: the OA approval APIs, of both families. Not metered: the token APIs (`gettoken`,
//! `/v1.0/oauth2/accessToken`), and SSO and contacts, which dingsync does not call. The
//! callback-management APIs (`call_back/*`, the failed-push list
//! included) are not on DingTalk's exempt list, so they are taken as metered: the stricter
//! reading. A path DingTalk answers with 90020 although dingsync took it for unmetered is
//! metered from then on ([`Gate::is_metered`]).
//!
//! Before every metered call the client asks the [`Gate`], which refuses with
//! [`Error::QuotaExhausted`] when
//! - DingTalk answered 90020 (`ApiCountLimitForOrg`) this Beijing month: the pause is stored in
//!   `dingsync.quota_pause`, so every replica and client of the organisation stops; each gate
//!   caches it and re-reads it at most every [`PAUSE_RECHECK`];
//! - or dingsync's own share, `dingtalk.monthly_calls`, is used: this month's metered calls in
//!   the ledger (all replicas, re-read as often) plus the calls this gate let through since. A
//!   call DingTalk would answer 90020 is then never sent. Other replicas' last seconds of calls
//!   reach this gate only with its next reading, so the share can be overrun by that much.
//!
//! A pause lifts by itself when the Beijing month turns over, when the configured allowance
//! changes (a new setting at start-up or on SIGHUP: [`Gate::set_allowances`]), or when an
//! operator lifts it (`dingsync quota resume`). Unmetered calls always go through.
//!
//! Owns: the metered list, the gate and its log lines. Does not own: the counting (`ledger`),
//! the SQL (`store::usage`), what callers do with a pause (outbox, reconcile).

use std::{
    collections::HashSet,
    sync::{
        Mutex as SyncMutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgPool;
use tokio::{sync::Mutex, time::Instant};

use super::Error;
use crate::{
    clock::{self, Clock},
    ledger::Ledger,
    store::usage::{self, Pause},
};

/// How long a gate trusts its reading of the pause and of the month's metered calls.
pub const PAUSE_RECHECK: Duration = Duration::from_secs(2);

/// Within this many calls of the allowance the gate re-reads the ledger at every
/// [`NEAR_END_RECHECK`], so that replicas sharing the allowance overrun it as little as possible.
const NEAR_END: u64 = 20;
const NEAR_END_RECHECK: Duration = Duration::from_millis(200);

/// DingTalk's v1.0 code for an exhausted monthly allowance (docs/dingtalk.md §7).
pub const V1_QUOTA_CODE: &str = "Forbidden.AccessDenied.ApiCountLimitForOrg";

/// Whether a call to `path` is metered by DingTalk's list (see [`Gate::is_metered`] for what
/// DingTalk's answers have added).
pub fn is_metered(path: &str) -> bool {
    !matches!(
        path.trim_start_matches('/'),
        "gettoken" | "v1.0/oauth2/accessToken"
    )
}

pub use crate::ledger::Allowances;

/// When metered calls resume by themselves: the start of the Beijing month after `now`'s.
pub fn resumes_at(now: DateTime<Utc>) -> DateTime<Utc> {
    clock::month_span(now).1
}

/// Lifts `corp_id`'s pause if it was taken in an earlier month than `now`'s or under another
/// `dingtalk.monthly_calls` than `calls` (start-up and reload); whether one was lifted.
pub async fn lift_stale_pause(
    pool: &PgPool,
    corp_id: &str,
    now: DateTime<Utc>,
    calls: u64,
) -> sqlx::Result<bool> {
    let lifted = usage::clear_stale_pause(pool, corp_id, clock::month(now), as_i64(calls)).await?;
    if lifted {
        tracing::info!(
            corp_id,
            monthly_calls = calls,
            "metered DingTalk calls resume: the pause was taken in an earlier month or under another dingtalk.monthly_calls"
        );
    }
    Ok(lifted)
}

fn as_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// One organisation's gate; one per client, shared with its token fetcher.
pub struct Gate {
    pool: PgPool,
    ledger: Ledger,
    corp_id: String,
    calls: AtomicU64,
    deliveries: AtomicU64,
    /// Paths DingTalk answered 90020 although [`is_metered`] took them for unmetered.
    also_metered: SyncMutex<HashSet<String>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// When the pause and the count were last read (never: `None`).
    read_at: Option<Instant>,
    /// The Beijing month of that reading.
    month: Option<NaiveDate>,
    pause: Option<Pause>,
    /// Metered calls this month at the reading (database plus this process's unflushed counts).
    used: u64,
    /// Metered calls this gate let through since the reading.
    since: u64,
    /// Why this gate last refused, while it refuses: logged once per pause.
    refusing: Option<String>,
}

impl Gate {
    pub(super) fn new(pool: PgPool, ledger: Ledger, corp_id: &str, allowances: Allowances) -> Gate {
        Gate {
            pool,
            ledger,
            corp_id: corp_id.to_string(),
            calls: AtomicU64::new(allowances.calls),
            deliveries: AtomicU64::new(allowances.deliveries),
            also_metered: SyncMutex::new(HashSet::new()),
            state: Mutex::new(State::default()),
        }
    }

    /// The allowances in force.
    pub fn allowances(&self) -> Allowances {
        Allowances {
            calls: self.calls.load(Ordering::Relaxed),
            deliveries: self.deliveries.load(Ordering::Relaxed),
        }
    }

    /// Applies new allowances (a configuration reload) and lifts a pause taken under another
    /// `monthly_calls`; whether one was lifted.
    pub async fn set_allowances(&self, allowances: Allowances) -> sqlx::Result<bool> {
        self.calls.store(allowances.calls, Ordering::Relaxed);
        self.deliveries
            .store(allowances.deliveries, Ordering::Relaxed);
        let lifted = lift_stale_pause(
            &self.pool,
            &self.corp_id,
            self.clock().now(),
            allowances.calls,
        )
        .await?;
        // Read again at the next call, under the new allowance.
        self.state.lock().await.read_at = None;
        Ok(lifted)
    }

    fn clock(&self) -> Clock {
        self.ledger.clock()
    }

    /// Whether DingTalk meters calls to `path`: by its list, or because it answered one with
    /// 90020.
    pub fn is_metered(&self, path: &str) -> bool {
        is_metered(path)
            || self
                .also_metered
                .lock()
                .unwrap()
                .contains(path.trim_start_matches('/'))
    }

    /// May a call to `path` be sent now? Unmetered calls always may; a metered one is refused
    /// while the organisation is paused or dingsync's share of the month is used. A metered call
    /// let through is reserved at once, so calls racing for the last of the allowance do not all
    /// get it.
    pub async fn check(&self, path: &str) -> Result<(), Error> {
        if !self.is_metered(path) {
            return Ok(());
        }
        let now = self.clock().now();
        let month = clock::month(now);
        let limit = self.calls.load(Ordering::Relaxed);
        let mut state = self.state.lock().await;
        let recheck = if limit > 0 && limit.saturating_sub(state.used + state.since) <= NEAR_END {
            NEAR_END_RECHECK
        } else {
            PAUSE_RECHECK
        };
        let stale =
            state.month != Some(month) || state.read_at.is_none_or(|at| at.elapsed() >= recheck);
        if stale {
            self.read(&mut state, now, limit).await;
        }
        let refusal = match &state.pause {
            Some(pause) if pause.month == month && pause.allowance == as_i64(limit) => {
                Some(pause.reason.clone())
            }
            _ if limit > 0 && state.used + state.since >= limit => Some(format!(
                "dingsync's share of the month (dingtalk.monthly_calls = {limit} metered calls) is used"
            )),
            _ => None,
        };
        match refusal {
            Some(reason) => {
                let until = resumes_at(now);
                if state.refusing.as_deref() != Some(reason.as_str()) {
                    tracing::warn!(corp_id = %self.corp_id, %until, %reason,
                        "DingTalk's monthly API allowance is used up: metered calls paused until {until}");
                    state.refusing = Some(reason.clone());
                }
                Err(Error::QuotaExhausted { until, reason })
            }
            None => {
                if state.refusing.take().is_some() {
                    tracing::info!(corp_id = %self.corp_id, monthly_calls = limit,
                        "metered DingTalk calls resume (the month turned over, the pause was lifted or dingtalk.monthly_calls changed)");
                }
                state.since += 1;
                Ok(())
            }
        }
    }

    /// Reads the pause and this month's metered calls; a pause of another month or allowance is
    /// lifted on the way. When the database does not answer, the last reading stands (the call
    /// itself needs the database for its token and budget anyway).
    async fn read(&self, state: &mut State, now: DateTime<Utc>, limit: u64) {
        let month = clock::month(now);
        let read: sqlx::Result<(Option<Pause>, i64)> = async {
            let mut pause = usage::pause(&self.pool, &self.corp_id).await?;
            if pause
                .as_ref()
                .is_some_and(|p| p.month != month || p.allowance != as_i64(limit))
            {
                lift_stale_pause(&self.pool, &self.corp_id, now, limit).await?;
                pause = None;
            }
            let used = self.ledger.month(&self.corp_id, now).await?.metered_calls();
            Ok((pause, used))
        }
        .await;
        state.read_at = Some(Instant::now());
        match read {
            Ok((pause, used)) => {
                state.pause = pause;
                state.used = u64::try_from(used).unwrap_or(0);
                state.since = 0;
                state.month = Some(month);
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not read the allowance pause; using the last reading");
                if state.month != Some(month) {
                    // A new month: last month's count says nothing about this one.
                    state.used = 0;
                    state.since = 0;
                    state.month = Some(month);
                }
            }
        }
    }

    /// DingTalk answered a call to `path` with 90020 (`reason`: its message): pause metered calls
    /// for every replica until the month is over, and return the error for the caller.
    pub async fn exhausted(&self, path: &str, reason: &str) -> Error {
        let path = path.trim_start_matches('/');
        if !self.is_metered(path) {
            tracing::warn!(
                path,
                "DingTalk answered 90020 to a call dingsync counted as unmetered: counting it as metered from now on"
            );
            self.also_metered.lock().unwrap().insert(path.to_string());
        }
        let now = self.clock().now();
        let month = clock::month(now);
        let until = resumes_at(now);
        let allowance = as_i64(self.calls.load(Ordering::Relaxed));
        let reason = format!("DingTalk answered {path} with {reason}");
        if let Err(e) = usage::set_pause(&self.pool, &self.corp_id, month, allowance, &reason).await
        {
            // This gate still refuses; the others meet 90020 themselves.
            tracing::warn!(error = %e, "could not share the allowance pause with the other replicas");
        }
        let mut state = self.state.lock().await;
        state.pause = Some(Pause {
            month,
            paused_at: Utc::now(),
            allowance,
            reason: reason.clone(),
        });
        state.read_at = Some(Instant::now());
        state.month = Some(month);
        if state.refusing.is_none() {
            tracing::warn!(corp_id = %self.corp_id, %until, %reason,
                "DingTalk's monthly API allowance is used up: metered calls paused until {until}");
        }
        state.refusing = Some(reason.clone());
        Error::QuotaExhausted { until, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_token_api_is_unmetered() {
        assert!(!is_metered("/gettoken"));
        assert!(!is_metered("/v1.0/oauth2/accessToken"));
        assert!(is_metered("/v1.0/workflow/processInstances"));
        assert!(is_metered("/topapi/processinstance/get"));
        assert!(is_metered("call_back/get_call_back_failed_result"));
    }

    #[test]
    fn metered_calls_resume_at_the_next_beijing_month() {
        use chrono::TimeZone;
        let t = Utc.with_ymd_and_hms(2026, 12, 31, 15, 59, 0).unwrap();
        assert_eq!(
            resumes_at(t),
            Utc.with_ymd_and_hms(2026, 12, 31, 16, 0, 0).unwrap()
        );
    }
}
