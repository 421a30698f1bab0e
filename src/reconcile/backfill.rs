//! The `backfill` job and `dingsync backfill`: finds approvals no event announced by listing
//! instance ids per process_code (`processinstance/listids`, docs/dingtalk.md §2.4), and fetches those the
//! database does not have.
//!
//! DingTalk's limits, checked here before any request so that an operator gets a clear message
//! rather than a DingTalk error: a window spans at most 120 days, starts within the last 365 days,
//! and reaches at most 10 000 ids (a window that hits the cap is halved and listed again).
//! Windows overlap by `reconcile.backfill_overlap_s`, so an instance created at a window's edge
//! (or with a clock skew between us and DingTalk) is not missed. `size` is 20: the doc's maximum
//! (the Java SDK comment says 10, docs/dingtalk.md §2.4 marks it unconfirmed; the emulator takes 20 like the
//! doc, so a DingTalk refusing 20 would show up as a clear errcode, never as missed ids).
//!
//! The cursor (window and page) is committed to `dingsync.sync_state` after every page, so an
//! interrupted run resumes where it stopped instead of listing finished windows again.

use std::collections::HashSet;

use anyhow::{Context as _, bail};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Fetched, fetch_and_apply, is_paused};
use crate::jobs::{Context, Counts};
use crate::{
    dingtalk::{
        Purpose,
        listing::{ID_CAP, IdListing},
    },
    store::{
        approvals::{self, SnapshotSource},
        sync_state,
    },
};

/// Longest window DingTalk accepts (docs/dingtalk.md §2.4).
pub const MAX_WINDOW: Duration = Duration::days(120);
/// How far back a window may start (docs/dingtalk.md §2.4).
pub const MAX_AGE: Duration = Duration::days(365);
/// Margin kept from the 365-day limit: the run takes time, and our clock and DingTalk's differ.
const AGE_MARGIN: Duration = Duration::hours(1);
/// A window is halved at most down to this when it hits the id cap.
const MIN_WINDOW: Duration = Duration::minutes(1);
const STATE: &str = "backfill";

/// The cursor in `dingsync.sync_state` (name `backfill`, scope = process_code).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    /// Where the run in progress (or the last one) started.
    pub since_ms: i64,
    /// The window in progress and the `listids` cursor within it; `None` when no run is open.
    pub window: Option<(i64, i64, u64)>,
    /// Everything created before this was listed by a finished run.
    pub done_until_ms: Option<i64>,
}

/// What a backfill of one process_code did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub windows: u64,
    pub pages: u64,
    pub ids: u64,
    pub missing: u64,
    pub fetched: u64,
    pub resumed: bool,
    /// Stopped because the monthly allowance is used up; the cursor keeps the place.
    pub paused: bool,
}

/// Refuses a start DingTalk would refuse, saying why.
pub fn check_since(since: DateTime<Utc>, now: DateTime<Utc>) -> anyhow::Result<()> {
    if since > now {
        bail!("--since {} is in the future", since.to_rfc3339());
    }
    if since < now - MAX_AGE + AGE_MARGIN {
        bail!(
            "--since {} is too far back: DingTalk's listids only lists instances created in the last 365 days (docs/dingtalk.md §2.4); use a date after {}",
            since.date_naive(),
            (now - MAX_AGE + AGE_MARGIN + Duration::days(1)).date_naive()
        );
    }
    Ok(())
}

/// Lists `process_code` from `since` to now (resuming an interrupted run with the same `since`)
/// and fetches the approvals the database does not have. `dry_run` lists and counts, writes
/// nothing (no rows, no cursor).
pub async fn run(
    ctx: &Context,
    process_code: &str,
    since: DateTime<Utc>,
    dry_run: bool,
    shutdown: &CancellationToken,
) -> anyhow::Result<Report> {
    let now = Utc::now();
    check_since(since, now)?;
    let config = ctx.config();
    let window_len = Duration::days(i64::from(config.backfill_window_days)).min(MAX_WINDOW);
    let overlap = Duration::seconds(config.backfill_overlap_s as i64);
    let corp = ctx.corp_id();
    let stored: Option<Cursor> = sync_state::load(ctx.pool(), corp, STATE, process_code)
        .await?
        .map(serde_json::from_value)
        .transpose()
        .context("reading the backfill cursor")?;
    let mut report = Report::default();
    // Ids already counted missing in this run: consecutive windows overlap, and a dry run, which
    // fetches nothing, would otherwise count an approval in an overlap twice.
    let mut counted: HashSet<String> = HashSet::new();
    let since_ms = since.timestamp_millis();
    let mut cursor = Cursor {
        since_ms,
        window: None,
        done_until_ms: stored.as_ref().and_then(|s| s.done_until_ms),
    };
    let (mut start, mut end, mut page_cursor) =
        match stored.and_then(|s| (s.since_ms == since_ms).then_some(s.window).flatten()) {
            Some((start, end, at)) => {
                report.resumed = true;
                (ms(start)?, ms(end)?, at)
            }
            None => (since, (since + window_len).min(now), 0),
        };
    loop {
        report.windows += 1;
        // Pages of this window, from `page_cursor`.
        let mut listing = window_listing(ctx, process_code, start, end).resume_at(page_cursor);
        loop {
            if shutdown.is_cancelled() {
                return Ok(report);
            }
            let at = listing.cursor();
            let Some(page) = listing.next_page().await.with_context(|| {
                format!(
                    "listids {process_code} {} .. {} at cursor {at}",
                    start.to_rfc3339(),
                    end.to_rfc3339()
                )
            })?
            else {
                break;
            };
            report.pages += 1;
            report.ids += page.len() as u64;
            if listing.capped() {
                // DingTalk stops at 10 000 ids: there may be more. List a shorter window.
                let half = (end - start) / 2;
                if half < MIN_WINDOW {
                    bail!(
                        "more than {ID_CAP} approvals of {process_code} were created between {} and {}: listids cannot list them (docs/dingtalk.md §2.4)",
                        start.to_rfc3339(),
                        end.to_rfc3339()
                    );
                }
                tracing::info!(
                    process_code,
                    "listids window hit the 10000-id cap; halving it"
                );
                end = start + half;
                listing = window_listing(ctx, process_code, start, end);
                continue;
            }
            let known = approvals::known(ctx.pool(), corp, &page).await?;
            let missing: Vec<&String> = page
                .iter()
                .filter(|id| !known.contains(*id) && counted.insert(id.to_string()))
                .collect();
            report.missing += missing.len() as u64;
            if !dry_run {
                for id in missing {
                    let fetched = fetch_and_apply(
                        ctx,
                        id,
                        Purpose::Backfill,
                        SnapshotSource::Backfill,
                        Some(process_code),
                    )
                    .await?;
                    if fetched == Fetched::Paused {
                        report.paused = true;
                        return Ok(report);
                    }
                    report.fetched += 1;
                }
            }
            if listing.finished() {
                break;
            }
            if !dry_run {
                cursor.window = Some((
                    start.timestamp_millis(),
                    end.timestamp_millis(),
                    listing.cursor(),
                ));
                save(ctx, process_code, &cursor).await?;
            }
        }
        if end >= now {
            break;
        }
        start = end - overlap;
        end = (start + window_len).min(now);
        page_cursor = 0;
        if !dry_run {
            cursor.window = Some((start.timestamp_millis(), end.timestamp_millis(), 0));
            save(ctx, process_code, &cursor).await?;
        }
    }
    if !dry_run {
        cursor.window = None;
        cursor.done_until_ms = Some(now.timestamp_millis());
        save(ctx, process_code, &cursor).await?;
    }
    Ok(report)
}

/// The listing of one backfill window, at bulk priority.
fn window_listing<'a>(
    ctx: &'a Context,
    process_code: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> IdListing<'a> {
    ctx.client().list_ids(
        process_code,
        (start.timestamp_millis(), end.timestamp_millis()),
        None,
        Purpose::Backfill,
    )
}

/// The scheduled job: every configured process_code, continuing where the last run ended (or
/// `reconcile.backfill_days` back the first time; an interrupted run resumes).
pub async fn scheduled(ctx: &Context, shutdown: &CancellationToken) -> anyhow::Result<Counts> {
    let mut counts = Counts::new();
    let now = Utc::now();
    let overlap = Duration::seconds(ctx.config().backfill_overlap_s as i64);
    for code in &ctx.config().process_codes {
        let stored: Option<Cursor> = sync_state::load(ctx.pool(), ctx.corp_id(), STATE, code)
            .await?
            .and_then(|v| serde_json::from_value(v).ok());
        let since = match stored {
            Some(Cursor {
                window: Some(_),
                since_ms,
                ..
            }) => ms(since_ms)?,
            Some(Cursor {
                done_until_ms: Some(done),
                ..
            }) => ms(done)? - overlap,
            _ => now - Duration::days(i64::from(ctx.config().backfill_days)),
        };
        // Never further back than listids allows, however long the daemon was away.
        let since = since.max(now - MAX_AGE + AGE_MARGIN * 2);
        let report = match run(ctx, code, since, false, shutdown).await {
            Ok(report) => report,
            Err(e) if is_paused(&e) => Report {
                paused: true,
                ..Report::default()
            },
            Err(e) => return Err(e),
        };
        if report.paused {
            *counts.entry("paused").or_default() += 1;
        }
        *counts.entry("pages").or_default() += report.pages;
        *counts.entry("ids").or_default() += report.ids;
        *counts.entry("fetched").or_default() += report.fetched;
        if shutdown.is_cancelled() || report.paused {
            break;
        }
    }
    Ok(counts)
}

async fn save(ctx: &Context, process_code: &str, cursor: &Cursor) -> anyhow::Result<()> {
    let value = serde_json::to_value(cursor)?;
    sync_state::save(ctx.pool(), ctx.corp_id(), STATE, process_code, &value).await?;
    Ok(())
}

fn ms(v: i64) -> anyhow::Result<DateTime<Utc>> {
    DateTime::from_timestamp_millis(v).context("time in the backfill cursor out of range")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_beyond_365_days_gets_a_clear_message() {
        let now = Utc::now();
        let err = check_since(now - Duration::days(400), now)
            .unwrap_err()
            .to_string();
        assert!(err.contains("365 days"), "{err}");
        check_since(now - Duration::days(300), now).unwrap();
        assert!(check_since(now + Duration::days(1), now).is_err());
    }
}
