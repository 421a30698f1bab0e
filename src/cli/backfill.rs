//! `dingsync backfill --process-code PROC-... --since DAY [--dry-run]`: lists a template's
//! instances at DingTalk and fetches the approvals the database lacks, with the same resumable
//! run as the scheduled `backfill` job (`reconcile::backfill`). Ctrl-C stops it between windows;
//! the same command resumes it.

use std::process::ExitCode;

use crate::{config::Config, reconcile::backfill};

pub async fn command(
    config: &Config,
    process_code: &str,
    since: &str,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let since = parse_since(since)?;
    let ctx = super::jobs_context(config).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    let report = backfill::run(&ctx, process_code, since, dry_run, &stop).await;
    ctx.client().ledger().flush().await?;
    let report = report?;
    println!(
        "{process_code}: {} windows, {} pages, {} ids, {} not in the database, {} fetched{}{}",
        report.windows,
        report.pages,
        report.ids,
        report.missing,
        report.fetched,
        if report.resumed { " (resumed)" } else { "" },
        if dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        }
    );
    if stop.is_cancelled() {
        println!("interrupted: run the same command again to resume");
    }
    Ok(ExitCode::SUCCESS)
}

/// `YYYY-MM-DD` is midnight in Beijing time (DingTalk's day); anything else must be RFC 3339.
fn parse_since(text: &str) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(day) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        let midnight = day.and_hms_opt(0, 0, 0).expect("midnight exists");
        return Ok((midnight - chrono::Duration::hours(8)).and_utc());
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.to_utc())
        .map_err(|_| anyhow::anyhow!("--since {text:?}: use YYYY-MM-DD or an RFC 3339 time"))
}
