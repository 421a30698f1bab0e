//! DingTalk's monthly allowances (docs/dingtalk.md §7, "Monthly allowances"): an organisation
//! may make so many metered API calls and receive so many event deliveries a calendar month.
//! Past the calls allowance every metered call is refused with errcode 90020; past the
//! deliveries allowance events are not pushed.
//!
//! The readings taken where DingTalk's documentation is silent, the stricter one wherever there
//! is a choice:
//! - the month is the calendar month in Beijing time (UTC+8), as DingTalk presumably counts it;
//!   the counters also start again when the emulator starts and on an admin rollover;
//! - metered: the approval APIs and callback management (`call_back/*`, which is not on the
//!   documented exempt list); not metered: `gettoken`;
//! - calls refused for rate and calls lost at the gateway (HTTP 502, gateway timeout) do not count
//!   (documented); calls DingTalk answers, business errors included, count (unstated);
//! - the allowance is enforced at once: DingTalk grants a grace of up to 5 days first;
//! - every HTTP push attempt counts as a delivery, retries included (per event or per attempt is
//!   not documented; per attempt makes the allowance run out sooner), the `check_url` handshake
//!   does not;
//! - an event past the deliveries allowance is dropped for good: no push, no retry, not in the
//!   failed list (what DingTalk does with it is not documented).
//!
//! Owns: this month's counters, which endpoints are metered, the turn of the month and the 90020
//! refusal. Does not own: where calls and pushes are admitted (`api`, `push`), the admin routes
//! (`admin`). Pure apart from a log line: the caller passes `now`.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, FixedOffset, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use super::model::{Rejection, beijing_offset};

/// The errcode of a call refused because the organisation's monthly allowance is used up
/// (docs/dingtalk.md §7).
pub const OVER_ALLOWANCE: i64 = 90020;

/// Whether a call of `endpoint` (the path without its leading slash) counts against the
/// monthly calls allowance. The token APIs are exempt (docs/dingtalk.md §7); the approval APIs
/// of both families are metered; callback management is not on the exempt list, so it is
/// metered too (the stricter reading).
pub fn is_metered(endpoint: &str) -> bool {
    endpoint.starts_with("topapi/processinstance/")
        || endpoint.starts_with("call_back/")
        || endpoint.contains("v1.0/workflow/")
}

/// New allowances, effective at once (the organisation upgraded); a field left out keeps its
/// allowance. 0 = no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Allowances {
    pub monthly_calls: Option<u64>,
    pub monthly_deliveries: Option<u64>,
}

/// This month's use of the allowances (admin API `GET /_emulator/quota`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaReport {
    /// When this month's counting began, in Beijing time: the emulator's start, an admin
    /// rollover, or the first instant of the calendar month.
    pub month_started_at: DateTime<FixedOffset>,
    pub calls: CallsUsage,
    pub deliveries: DeliveriesUsage,
}

/// Metered API calls this month.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallsUsage {
    /// Metered calls allowed a month; 0 = no limit.
    pub allowance: u64,
    /// Metered calls counted (carried out, or answered with a business error).
    pub used: u64,
    /// `used` by endpoint (`"topapi/processinstance/get"` → N).
    pub by_api: BTreeMap<String, u64>,
    /// Calls answered with 90020 (not in `used`).
    pub refused: u64,
}

/// Event deliveries this month.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveriesUsage {
    /// Push attempts allowed a month; 0 = no limit.
    pub allowance: u64,
    /// Push attempts made (retries included).
    pub used: u64,
    /// `used` by callback tag (`"bpms_task_change"` → N).
    pub by_event: BTreeMap<String, u64>,
    /// Events dropped for good because the allowance was used up (each copy of a duplicated
    /// event counts on its own).
    pub undelivered: u64,
}

/// The counters of the month under way.
pub(crate) struct Quota {
    month: QuotaReport,
}

impl Quota {
    pub fn new(monthly_calls: u64, monthly_deliveries: u64, now: DateTime<Utc>) -> Quota {
        Quota {
            month: QuotaReport {
                month_started_at: now.with_timezone(&beijing_offset()),
                calls: CallsUsage {
                    allowance: monthly_calls,
                    ..CallsUsage::default()
                },
                deliveries: DeliveriesUsage {
                    allowance: monthly_deliveries,
                    ..DeliveriesUsage::default()
                },
            },
        }
    }

    /// Counts a call of `endpoint`, or refuses it with 90020 when the calls allowance is used
    /// up. Endpoints that are not metered always pass, uncounted.
    pub fn meter_call(&mut self, endpoint: &str, now: DateTime<Utc>) -> Result<(), Rejection> {
        if !is_metered(endpoint) {
            return Ok(());
        }
        self.turn_month(now);
        let calls = &mut self.month.calls;
        if calls.allowance > 0 && calls.used >= calls.allowance {
            calls.refused += 1;
            // The numbers: the count this call would make, and the allowance (the shape of
            // DingTalk's own message, docs/dingtalk.md §7).
            return Err(Rejection {
                errcode: OVER_ALLOWANCE,
                errmsg: format!(
                    "您的企业本月api调用量已超过限制,调用量:{}次,额度:{}次,请登录开发者后台-资源管理-查看用量明细",
                    calls.used + 1,
                    calls.allowance
                ),
            });
        }
        calls.used += 1;
        *calls.by_api.entry(endpoint.to_string()).or_default() += 1;
        Ok(())
    }

    /// Whether the deliveries allowance is used up (nothing is counted).
    pub fn deliveries_exhausted(&mut self, now: DateTime<Utc>) -> bool {
        self.turn_month(now);
        let d = &self.month.deliveries;
        d.allowance > 0 && d.used >= d.allowance
    }

    /// Counts one push attempt of an event with `tag`; false (nothing counted) when the
    /// allowance is used up and the attempt must not be made.
    pub fn take_delivery(&mut self, tag: &str, now: DateTime<Utc>) -> bool {
        if self.deliveries_exhausted(now) {
            return false;
        }
        let d = &mut self.month.deliveries;
        d.used += 1;
        *d.by_event.entry(tag.to_string()).or_default() += 1;
        true
    }

    /// An event was dropped for good because the deliveries allowance is used up.
    pub fn count_undelivered(&mut self, now: DateTime<Utc>) {
        self.turn_month(now);
        self.month.deliveries.undelivered += 1;
    }

    /// This month so far.
    pub fn report(&mut self, now: DateTime<Utc>) -> QuotaReport {
        self.turn_month(now);
        self.month.clone()
    }

    /// Starts a new month now, whatever the calendar says; returns the month just ended.
    pub fn rollover(&mut self, now: DateTime<Utc>) -> QuotaReport {
        self.turn_month(now);
        self.start_month(now.with_timezone(&beijing_offset()))
    }

    /// Changes the allowances at once, counters kept (DingTalk applies an upgrade immediately,
    /// docs/dingtalk.md §7); returns the month with the new allowances.
    pub fn set_allowances(&mut self, allowances: Allowances, now: DateTime<Utc>) -> QuotaReport {
        self.turn_month(now);
        if let Some(calls) = allowances.monthly_calls {
            self.month.calls.allowance = calls;
        }
        if let Some(deliveries) = allowances.monthly_deliveries {
            self.month.deliveries.allowance = deliveries;
        }
        self.month.clone()
    }

    /// Starts a new month when `now` is in a later calendar month (Beijing time) than the one
    /// under way.
    fn turn_month(&mut self, now: DateTime<Utc>) {
        let now = now.with_timezone(&beijing_offset());
        let started = self.month.month_started_at;
        if (now.year(), now.month()) == (started.year(), started.month()) {
            return;
        }
        let first = beijing_offset()
            .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
            .single()
            .unwrap_or(now);
        let ended = self.start_month(first);
        tracing::info!(
            calls = ended.calls.used,
            refused = ended.calls.refused,
            deliveries = ended.deliveries.used,
            undelivered = ended.deliveries.undelivered,
            "emulator: a new calendar month (Beijing time): monthly allowances start again"
        );
    }

    /// Zeroes the counters from `at`, keeping the allowances; returns the month that ended.
    fn start_month(&mut self, at: DateTime<FixedOffset>) -> QuotaReport {
        let fresh = QuotaReport {
            month_started_at: at,
            calls: CallsUsage {
                allowance: self.month.calls.allowance,
                ..CallsUsage::default()
            },
            deliveries: DeliveriesUsage {
                allowance: self.month.deliveries.allowance,
                ..DeliveriesUsage::default()
            },
        };
        std::mem::replace(&mut self.month, fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    #[test]
    fn past_the_allowance_metered_calls_are_refused_uncounted_and_gettoken_passes() {
        let now = at("2026-03-10T12:00:00Z");
        let mut quota = Quota::new(2, 0, now);
        assert!(quota.meter_call("topapi/processinstance/get", now).is_ok());
        assert!(quota.meter_call("call_back/get_call_back", now).is_ok());
        let refused = quota
            .meter_call("topapi/processinstance/create", now)
            .unwrap_err();
        assert_eq!(refused.errcode, OVER_ALLOWANCE);
        assert_eq!(
            refused.errmsg,
            "您的企业本月api调用量已超过限制,调用量:3次,额度:2次,请登录开发者后台-资源管理-查看用量明细"
        );
        assert!(quota.meter_call("gettoken", now).is_ok());
        let report = quota.report(now);
        assert_eq!((report.calls.used, report.calls.refused), (2, 1));
        assert_eq!(
            report.calls.by_api,
            BTreeMap::from([
                ("call_back/get_call_back".to_string(), 1),
                ("topapi/processinstance/get".to_string(), 1),
            ])
        );
    }

    #[test]
    fn the_month_turns_at_midnight_beijing_time_keeping_the_allowances() {
        // 2026-03-31 23:59 in Beijing.
        let before = at("2026-03-31T15:59:00Z");
        let mut quota = Quota::new(1, 1, before);
        assert!(
            quota
                .meter_call("topapi/processinstance/get", before)
                .is_ok()
        );
        assert!(quota.take_delivery("bpms_task_change", before));
        assert!(
            quota
                .meter_call("topapi/processinstance/get", before)
                .is_err()
        );
        assert!(!quota.take_delivery("bpms_task_change", before));

        // 2026-04-01 00:00 in Beijing, still March 31 in UTC.
        let after = at("2026-03-31T16:00:00Z");
        assert!(
            quota
                .meter_call("topapi/processinstance/get", after)
                .is_ok()
        );
        let report = quota.report(after);
        assert_eq!(
            report.month_started_at.to_rfc3339(),
            "2026-04-01T00:00:00+08:00"
        );
        assert_eq!((report.calls.allowance, report.calls.used), (1, 1));
        assert_eq!(
            (report.deliveries.allowance, report.deliveries.used),
            (1, 0)
        );
    }

    #[test]
    fn zero_means_no_limit_and_a_rollover_returns_the_month_that_ended() {
        let now = at("2026-03-10T12:00:00Z");
        let mut quota = Quota::new(0, 0, now);
        for _ in 0..1000 {
            assert!(quota.meter_call("topapi/processinstance/get", now).is_ok());
            assert!(quota.take_delivery("bpms_instance_change", now));
        }
        let ended = quota.rollover(now);
        assert_eq!((ended.calls.used, ended.deliveries.used), (1000, 1000));
        let fresh = quota.report(now);
        assert_eq!((fresh.calls.used, fresh.deliveries.used), (0, 0));
        assert!(fresh.calls.by_api.is_empty() && fresh.deliveries.by_event.is_empty());
    }
}
