//! `dingsync actions list|retry|cancel`: what an operator needs to see and unblock actions on
//! approvals.
//! The transitions offered and what each answer means are `operate`'s (the console offers the
//! same).

use std::{fmt::Write, process::ExitCode};

use anyhow::bail;
use sqlx::PgPool;

use super::ActionsCommand;
use crate::{
    config::Config,
    operate,
    store::{
        self as db,
        actions::{self as store, ActionRow},
    },
};

pub const STATES: [&str; 7] = [
    "pending",
    "sending",
    "unknown",
    "done",
    "failed",
    "superseded",
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

fn table(rows: &[ActionRow]) -> String {
    let mut out = format!(
        "{:>8}  {:<10}  {:<9}  {:>8}  {:<24}  {:<20}  {:<12}  {:<12}  {:<19}  {}\n",
        "id",
        "state",
        "action",
        "attempts",
        "idempotency_key",
        "process_instance_id",
        "task_id",
        "actor",
        "next_attempt_at (UTC)",
        "last_error"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:>8}  {:<10}  {:<9}  {:>8}  {:<24}  {:<20}  {:<12}  {:<12}  {:<19}  {}",
            r.id,
            r.state,
            r.action,
            r.attempts,
            r.idempotency_key,
            r.process_instance_id,
            r.task_id.map_or("-".into(), |t| t.to_string()),
            r.actor_user_id
                .as_deref()
                .unwrap_or(if r.as_system { "(system)" } else { "-" }),
            r.next_attempt_at.format("%Y-%m-%d %H:%M:%S"),
            r.last_error.as_deref().unwrap_or("")
        );
    }
    let _ = write!(out, "({} rows)", rows.len());
    out
}

/// `actions retry ID`.
pub async fn retry(pool: &PgPool, id: i64) -> anyhow::Result<String> {
    operate::action_retry(pool, id)
        .await?
        .map_err(anyhow::Error::msg)
}

/// `actions cancel ID`.
pub async fn cancel(pool: &PgPool, id: i64) -> anyhow::Result<String> {
    operate::action_cancel(pool, id)
        .await?
        .map_err(anyhow::Error::msg)
}

pub async fn command(config: &Config, command: ActionsCommand) -> anyhow::Result<ExitCode> {
    let pool = db::connect_and_migrate(&config.database).await?;
    let output = match command {
        ActionsCommand::List { state, limit } => list(&pool, state.as_deref(), limit).await,
        ActionsCommand::Retry { id } => retry(&pool, id).await,
        ActionsCommand::Cancel { id } => cancel(&pool, id).await,
    };
    pool.close().await;
    println!("{}", output?);
    Ok(ExitCode::SUCCESS)
}
