//! `dingsync outbox list|retry|cancel`: what an operator needs to see and unblock outbox rows.
//! The transitions offered and what each answer means are `operate`'s (the console offers the
//! same).

use std::{fmt::Write, process::ExitCode};

use anyhow::bail;
use sqlx::PgPool;

use super::OutboxCommand;
use crate::{
    config::Config,
    operate,
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
    operate::outbox_retry(pool, id)
        .await?
        .map_err(anyhow::Error::msg)
}

/// `outbox cancel ID`.
pub async fn cancel(pool: &PgPool, id: i64) -> anyhow::Result<String> {
    operate::outbox_cancel(pool, id)
        .await?
        .map_err(anyhow::Error::msg)
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
