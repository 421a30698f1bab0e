//! `dingsync drift`: compares the database with a fresh DingTalk listing of each process_code
//! (`listids` windows, then `processinstance/get` per id, bulk priority) and reports approvals
//! missing from the database, extra in it (stored as created in the period but not listed), and
//! disagreeing with DingTalk (status, result, times to the second (v1.0: the minute), title, form
//! values, tasks).
//! Read-only: it changes nothing.

use std::{
    collections::{BTreeSet, HashMap},
    process::ExitCode,
};

use anyhow::Context as _;
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde_json::json;

use crate::{
    config::Config,
    dingtalk::{Purpose, listing::ID_CAP},
    jobs::Context,
    reconcile::backfill,
    snapshot::Snapshot,
    store::approvals::{self, Stored},
};

/// `dingsync drift`: exit 0 when the database agrees with DingTalk, 1 when it does not, 2 when
/// the comparison could not be made.
pub async fn command(config: &Config, since: &str, codes: &[String]) -> ExitCode {
    match report(config, since, codes).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("dingsync: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Prints the drift report; `Ok(true)` when there is none.
async fn report(config: &Config, since: &str, codes: &[String]) -> anyhow::Result<bool> {
    let period = parse_period(since)?;
    let codes = if codes.is_empty() {
        config.reconcile.process_codes.clone()
    } else {
        codes.to_vec()
    };
    if codes.is_empty() {
        anyhow::bail!("no process code: set reconcile.process_codes or pass --process-code");
    }
    let ctx = super::jobs_context(config).await?;
    let report = run(&ctx, &codes, chrono::Utc::now() - period).await;
    ctx.client().ledger().flush().await?;
    let report = report?;
    println!("{report}");
    Ok(report.is_clean())
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    pub listed: u64,
    pub missing: Vec<String>,
    pub extra: Vec<String>,
    /// The instance and what differs (`field: database != DingTalk`).
    pub disagreeing: Vec<(String, Vec<String>)>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.disagreeing.is_empty()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for id in &self.missing {
            writeln!(f, "missing      {id}")?;
        }
        for id in &self.extra {
            writeln!(f, "extra        {id}")?;
        }
        for (id, diffs) in &self.disagreeing {
            writeln!(f, "disagreeing  {id}: {}", diffs.join("; "))?;
        }
        write!(
            f,
            "{} listed, {} missing, {} extra, {} disagreeing",
            self.listed,
            self.missing.len(),
            self.extra.len(),
            self.disagreeing.len()
        )
    }
}

/// Parses `7d`, `12h`, `30m` (a period back from now).
pub fn parse_period(text: &str) -> anyhow::Result<TimeDelta> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let n: i64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a period like 7d, 12h or 30m"))?;
    match unit {
        "d" => Ok(TimeDelta::days(n)),
        "h" => Ok(TimeDelta::hours(n)),
        "m" => Ok(TimeDelta::minutes(n)),
        _ => anyhow::bail!("{text:?} is not a period like 7d, 12h or 30m"),
    }
}

/// Drift of `process_codes` for approvals created since `since`.
pub async fn run(
    ctx: &Context,
    process_codes: &[String],
    since: DateTime<Utc>,
) -> anyhow::Result<Report> {
    let now = Utc::now();
    backfill::check_since(since, now)?;
    let mut report = Report::default();
    for code in process_codes {
        let listed = list_all(ctx, code, since, now).await?;
        report.listed += listed.len() as u64;
        let in_db: BTreeSet<String> =
            approvals::ids_created_between(ctx.pool(), ctx.corp_id(), code, since, now)
                .await?
                .into_iter()
                .collect();
        report.extra.extend(in_db.difference(&listed).cloned());
        let ids: Vec<String> = listed.into_iter().collect();
        for chunk in ids.chunks(ctx.config().batch_size as usize) {
            let stored: HashMap<String, Stored> =
                approvals::stored(ctx.pool(), ctx.corp_id(), chunk)
                    .await?
                    .into_iter()
                    .map(|s| (s.process_instance_id.clone(), s))
                    .collect();
            for id in chunk {
                let instance = ctx
                    .client()
                    .get_instance(id, Purpose::Drift)
                    .await
                    .with_context(|| format!("processinstance/get {id}"))?;
                let snap = Snapshot::from_instance(id, &instance)?;
                match stored.get(id) {
                    None => report.missing.push(id.clone()),
                    Some(row) => {
                        let diffs = compare(row, &snap);
                        if !diffs.is_empty() {
                            report.disagreeing.push((id.clone(), diffs));
                        }
                    }
                }
            }
        }
    }
    Ok(report)
}

/// Every id of `process_code` created in `[since, until]`, window by window (no overlap needed:
/// one listing, one point in time).
async fn list_all(
    ctx: &Context,
    process_code: &str,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> anyhow::Result<BTreeSet<String>> {
    let mut ids = BTreeSet::new();
    let mut start = since;
    while start < until {
        let end = (start + backfill::MAX_WINDOW).min(until);
        let mut listing = ctx.client().list_ids(
            process_code,
            (start.timestamp_millis(), end.timestamp_millis()),
            None,
            Purpose::Drift,
        );
        while let Some(page) = listing
            .next_page()
            .await
            .with_context(|| format!("listids {process_code}"))?
        {
            ids.extend(page);
        }
        if listing.capped() {
            anyhow::bail!(
                "more than {ID_CAP} approvals of {process_code} between {} and {}: listids cannot list them all; use a shorter --since",
                start.to_rfc3339(),
                end.to_rfc3339()
            );
        }
        start = end + TimeDelta::milliseconds(1);
    }
    Ok(ids)
}

/// What differs between the stored row and DingTalk's snapshot.
pub fn compare(row: &Stored, snap: &Snapshot) -> Vec<String> {
    let mut diffs = Vec::new();
    let mut check = |field: &str, ours: String, theirs: String| {
        if ours != theirs {
            diffs.push(format!("{field}: {ours} != {theirs}"));
        }
    };
    check("status", row.status.clone(), snap.status.clone());
    check(
        "result",
        format!("{:?}", row.result),
        format!("{:?}", snap.result),
    );
    check(
        "title",
        format!("{:?}", row.title),
        format!("{:?}", snap.title),
    );
    // Compared at the precision DingTalk gave: the second, or the minute for a v1.0 answer
    // (docs/dingtalk.md §11.3).
    let step = if snap.whole_minutes {
        TimeDelta::minutes(1)
    } else {
        TimeDelta::seconds(1)
    };
    check(
        "created_at",
        truncated(row.created_at, step),
        truncated(snap.created_at, step),
    );
    check(
        "finished_at",
        truncated(row.finished_at, step),
        truncated(snap.finished_at, step),
    );
    let form = serde_json::Value::Array(Vec::new());
    check(
        "form_values",
        row.form_values.as_ref().unwrap_or(&form).to_string(),
        snap.form_values.to_string(),
    );
    let mut tasks: Vec<_> = snap
        .tasks
        .iter()
        .map(|t| json!([t.task_id, t.status, t.result]))
        .collect();
    tasks.sort_by_key(|t| t[0].as_i64());
    check(
        "tasks",
        row.tasks.to_string(),
        serde_json::Value::Array(tasks).to_string(),
    );
    diffs
}

fn truncated(t: Option<DateTime<Utc>>, step: TimeDelta) -> String {
    t.and_then(|t| t.duration_trunc(step).ok())
        .map_or("null".into(), |t| t.to_rfc3339())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_days_hours_or_minutes() {
        assert_eq!(parse_period("7d").unwrap(), TimeDelta::days(7));
        assert_eq!(parse_period("12h").unwrap(), TimeDelta::hours(12));
        assert!(parse_period("7 days").is_err());
        assert!(parse_period("d").is_err());
    }
}
