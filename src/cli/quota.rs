//! `dingsync quota` and `dingsync quota resume`: the organisation's Beijing month against its
//! monthly allowances (docs/dingtalk.md §7), and lifting a pause.
//!
//! `quota` prints this month's calls and deliveries by API and purpose, the metered totals
//! against `dingtalk.monthly_calls` and `monthly_deliveries`, the pause if any, and the forecast
//! to the month's end with the day each allowance runs out at the current pace. It reads the
//! database only (the ledger every replica writes): no DingTalk call, so it works while paused.
//! Its days are real Beijing days; a `serve` against an emulator with `emulator.time_scale` < 1
//! counts on a faster clock, whose months this command does not follow.
//!
//! `quota resume` lifts the pause DingTalk's 90020 started (the operator knows the allowance
//! changed, e.g. an upgraded edition) and makes the outbox rows that wait for it due. It cannot
//! lift dingsync's own share: that takes a higher `dingtalk.monthly_calls` (SIGHUP or restart).

use std::{collections::BTreeMap, fmt::Write, process::ExitCode};

use chrono::{DateTime, Datelike, Utc};
use sqlx::PgPool;

use super::QuotaCommand;
use crate::{
    app::EMULATOR_CORP_ID,
    clock::{self, Clock},
    config::Config,
    dingtalk::quota::{self, Allowances},
    ledger::{Ledger, Outlook},
    store,
};

/// The organisation `config` serves (the embedded emulator's with `api_base = "emulator"`).
pub fn corp_id(config: &Config) -> String {
    if config.uses_emulator() {
        EMULATOR_CORP_ID.to_string()
    } else {
        config.dingtalk.corp_id.clone()
    }
}

/// What `dingsync quota` prints for `corp_id` at `now`.
pub async fn report(
    pool: &PgPool,
    corp_id: &str,
    allowances: Allowances,
    now: DateTime<Utc>,
) -> anyhow::Result<String> {
    let ledger = Ledger::new(pool.clone(), Clock::real());
    let usage = ledger.month(corp_id, now).await?;
    let month = clock::month(now);
    let days_in_month = (clock::next_month(month) - month).num_days();
    let mut out = format!(
        "{corp_id}: Beijing month {} (day {} of {days_in_month}, {:.1} days left)\n\n",
        month.format("%Y-%m"),
        clock::day(now).day(),
        clock::days_left(now)
    );
    let mut table: BTreeMap<(&str, &str, &str, bool), i64> = BTreeMap::new();
    for r in &usage.rows {
        *table
            .entry((&r.kind, &r.api, &r.purpose, r.metered))
            .or_default() += r.count;
    }
    let _ = writeln!(
        out,
        "{:<9}  {:<40}  {:<9}  {:<7}  {:>8}",
        "kind", "api", "purpose", "metered", "count"
    );
    for ((kind, api, purpose, metered), count) in &table {
        let _ = writeln!(
            out,
            "{kind:<9}  {api:<40}  {purpose:<9}  {:<7}  {count:>8}",
            if *metered { "yes" } else { "no" }
        );
    }
    if table.is_empty() {
        let _ = writeln!(out, "(nothing counted this month)");
    }
    let forecast = usage.forecast(now, allowances.calls, allowances.deliveries);
    out.push('\n');
    let _ = writeln!(
        out,
        "{}",
        outlook_line("metered calls", "dingtalk.monthly_calls", &forecast.calls)
    );
    let _ = writeln!(
        out,
        "{}",
        outlook_line(
            "deliveries",
            "dingtalk.monthly_deliveries",
            &forecast.deliveries
        )
    );
    let _ = write!(
        out,
        "{}",
        pause_line(pool, corp_id, allowances, now, forecast.calls.so_far).await?
    );
    Ok(out)
}

/// `metered calls: 950 of 5000 (19%), 4050 left; pace 100.0 a day; forecast 3000 by the month's
/// end; lasts the month`.
fn outlook_line(what: &str, key: &str, o: &Outlook) -> String {
    let pace = format!(
        "pace {:.1} a day; forecast {} by the month's end",
        o.per_day, o.at_month_end
    );
    if o.allowance == 0 {
        return format!("{what}: {} ({key} = 0: unmetered); {pace}", o.so_far);
    }
    let limit = i64::try_from(o.allowance).unwrap_or(i64::MAX);
    let share = 100.0 * o.so_far as f64 / o.allowance as f64;
    let end = match o.runs_out {
        Some(day) => format!("runs out on {day} at this pace"),
        None => "lasts the month at this pace".into(),
    };
    format!(
        "{what}: {} of {limit} ({share:.0}%), {} left; {pace}; {end}",
        o.so_far,
        (limit - o.so_far).max(0)
    )
}

async fn pause_line(
    pool: &PgPool,
    corp_id: &str,
    allowances: Allowances,
    now: DateTime<Utc>,
    used: i64,
) -> anyhow::Result<String> {
    let until = quota::resumes_at(now);
    let calls = i64::try_from(allowances.calls).unwrap_or(i64::MAX);
    let mut out = String::new();
    match store::usage::pause(pool, corp_id).await? {
        Some(p) if p.month == clock::month(now) && p.allowance == calls => {
            let _ = writeln!(
                out,
                "paused since {}: {}; metered calls resume at {until} (the next Beijing month) or after `dingsync quota resume`",
                p.paused_at.format("%Y-%m-%d %H:%M:%S UTC"),
                p.reason
            );
        }
        Some(p) => {
            let _ = writeln!(
                out,
                "a pause of {} (under dingtalk.monthly_calls = {}) is stale: lifted at the next call or start",
                p.month.format("%Y-%m"),
                p.allowance
            );
        }
        None => {}
    }
    if calls > 0 && used >= calls {
        let _ = writeln!(
            out,
            "stopped: dingsync's share (dingtalk.monthly_calls = {calls}) is used; metered calls resume at {until}, or raise dingtalk.monthly_calls and reload (SIGHUP)"
        );
    }
    if out.is_empty() {
        out.push_str("not paused\n");
    }
    Ok(out)
}

/// `dingsync quota resume`: lifts `corp_id`'s pause; what to print.
pub async fn resume(
    pool: &PgPool,
    corp_id: &str,
    allowances: Allowances,
    now: DateTime<Utc>,
) -> anyhow::Result<String> {
    let lifted = store::usage::clear_pause(pool, corp_id).await?;
    let rows = store::outbox::resume_paused(pool, corp_id, quota::PAUSE_RECHECK).await?;
    let actions = store::actions::resume_paused(pool, corp_id, quota::PAUSE_RECHECK).await?;
    let mut out = if lifted {
        format!(
            "pause lifted: metered DingTalk calls resume on every replica within {} s; {rows} outbox rows and {actions} actions waiting for the allowance are due again",
            quota::PAUSE_RECHECK.as_secs()
        )
    } else {
        format!(
            "{corp_id} was not paused; {rows} outbox rows and {actions} actions waiting for the allowance are due again"
        )
    };
    let used = Ledger::new(pool.clone(), Clock::real())
        .month(corp_id, now)
        .await?
        .metered_calls();
    let calls = i64::try_from(allowances.calls).unwrap_or(i64::MAX);
    if calls > 0 && used >= calls {
        let _ = write!(
            out,
            "\nbut dingsync's own share is used ({used} metered calls of dingtalk.monthly_calls = {calls}): raise it and reload (SIGHUP) or restart"
        );
    }
    Ok(out)
}

pub async fn command(config: &Config, action: Option<QuotaCommand>) -> anyhow::Result<ExitCode> {
    let pool = store::connect_and_migrate(&config.database).await?;
    let (corp, allowances, now) = (
        corp_id(config),
        Allowances::from_config(&config.dingtalk),
        Utc::now(),
    );
    let output = match action {
        None => report(&pool, &corp, allowances, now).await,
        Some(QuotaCommand::Resume) => resume(&pool, &corp, allowances, now).await,
    };
    pool.close().await;
    print!("{}", output?.trim_end());
    println!();
    Ok(ExitCode::SUCCESS)
}
