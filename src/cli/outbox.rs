//! `dingsync outbox list|retry|cancel`: what an operator needs to see and unblock outbox rows.
//! Only the transitions that cannot double an approval are offered: `retry` takes back a row
//! that certainly created nothing (`failed`, `cancelled`), `cancel` stops one that has not been
//! sent or failed. Rows in flight (`sending`, `unknown`) are left to the worker.

use std::{fmt::Write, process::ExitCode};

use anyhow::bail;
use sqlx::PgPool;

use super::OutboxCommand;
use crate::{
    config::Config,
    store::{
        self as db,
        outbox::{self as store, OutboxRow},
    },
};

pub const STATES: [&str; 6] = [
    "pending",
    "sending",
    "unknown",
    "created",
    "failed",
    "cancelled",
];

/// The rows as a table, newest first.
pub async fn list(pool: &PgPool, state: Option<&str>, limit: i64) -> anyhow::Result<String> {
    if let Some(state) = state
        && !STATES.contains(&state)
    {
        bail!("--state {state}: must be one of {}", STATES.join(", "));
    }
    let rows = store::list(pool, state, limit).await?;
    Ok(table(&rows))
}

fn table(rows: &[OutboxRow]) -> String {
    let mut out = format!(
        "{:>8}  {:<9}  {:>8}  {:<24}  {:<20}  {:<20}  {:<19}  {}\n",
        "id",
        "state",
        "attempts",
        "idempotency_key",
        "process_code",
        "process_instance_id",
        "next_attempt_at (UTC)",
        "last_error"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:>8}  {:<9}  {:>8}  {:<24}  {:<20}  {:<20}  {:<19}  {}",
            r.id,
            r.state,
            r.attempts,
            r.idempotency_key,
            r.process_code,
            r.process_instance_id.as_deref().unwrap_or("-"),
            r.next_attempt_at.format("%Y-%m-%d %H:%M:%S"),
            r.last_error.as_deref().unwrap_or("")
        );
    }
    let _ = write!(out, "({} rows)", rows.len());
    out
}

/// `outbox retry ID`.
pub async fn retry(pool: &PgPool, id: i64) -> anyhow::Result<String> {
    match store::retry(pool, id).await?.as_deref() {
        None => bail!("no outbox row with id {id}"),
        Some("failed" | "cancelled") => Ok(format!(
            "outbox row {id} is pending again; a worker will send it now"
        )),
        Some("unknown") => bail!(
            "outbox row {id} is unknown: its create may have reached DingTalk, and dingsync is searching for the instance; retrying it could create a second approval"
        ),
        Some(state) => {
            bail!("outbox row {id} is {state}: only failed or cancelled rows can be retried")
        }
    }
}

/// `outbox cancel ID`.
pub async fn cancel(pool: &PgPool, id: i64) -> anyhow::Result<String> {
    match store::cancel(pool, id).await?.as_deref() {
        None => bail!("no outbox row with id {id}"),
        Some("pending" | "failed") => Ok(format!("outbox row {id} cancelled")),
        Some(state @ ("sending" | "unknown")) => bail!(
            "outbox row {id} is {state}: its create may already have reached DingTalk; wait until it is created or failed"
        ),
        Some(state) => {
            bail!("outbox row {id} is {state}: only pending or failed rows can be cancelled")
        }
    }
}

pub async fn command(config: &Config, command: OutboxCommand) -> anyhow::Result<ExitCode> {
    let pool = db::connect_and_migrate(&config.database).await?;
    let output = match command {
        OutboxCommand::List { state, limit } => list(&pool, state.as_deref(), limit).await,
        OutboxCommand::Retry { id } => retry(&pool, id).await,
        OutboxCommand::Cancel { id } => cancel(&pool, id).await,
    };
    pool.close().await;
    println!("{}", output?);
    Ok(ExitCode::SUCCESS)
}
