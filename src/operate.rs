//! What an operator may do to an outbox row or an action, from the command line
//! (`dingsync outbox|actions retry|cancel`) or the console alike: the transitions that cannot
//! double an approval or an action, and what to tell the operator about each answer. The guarded
//! state changes themselves are `store::outbox` and `store::actions` (`retry`, `cancel`).
//!
//! Only these are offered: `retry` takes back a row that certainly created nothing or was
//! certainly not carried out (`failed`, `cancelled`; the actions worker reads the approval back
//! first if it was ever sent), `cancel` stops one that has not been sent or failed. Rows in flight
//! (`sending`, `unknown`) are left to the workers.

use sqlx::PgPool;

use crate::store;

/// What came of an operator's request: done (what to say), or refused (why, and nothing changed).
pub type Outcome = Result<String, String>;

/// `outbox retry ID`.
pub async fn outbox_retry(pool: &PgPool, id: i64) -> sqlx::Result<Outcome> {
    Ok(match store::outbox::retry(pool, id).await?.as_deref() {
        None => Err(format!("no outbox row with id {id}")),
        Some("failed" | "cancelled") => Ok(format!(
            "outbox row {id} is pending again; a worker will send it now"
        )),
        Some("unknown") => Err(format!(
            "outbox row {id} is unknown: its create may have reached DingTalk, and dingsync is searching for the instance; retrying it could create a second approval"
        )),
        Some(state) => Err(format!(
            "outbox row {id} is {state}: only failed or cancelled rows can be retried"
        )),
    })
}

/// `outbox cancel ID`.
pub async fn outbox_cancel(pool: &PgPool, id: i64) -> sqlx::Result<Outcome> {
    Ok(match store::outbox::cancel(pool, id).await?.as_deref() {
        None => Err(format!("no outbox row with id {id}")),
        Some("pending" | "failed") => Ok(format!("outbox row {id} cancelled")),
        Some(state @ ("sending" | "unknown")) => Err(format!(
            "outbox row {id} is {state}: its create may already have reached DingTalk; wait until it is created or failed"
        )),
        Some(state) => Err(format!(
            "outbox row {id} is {state}: only pending or failed rows can be cancelled"
        )),
    })
}

/// `actions retry ID`.
pub async fn action_retry(pool: &PgPool, id: i64) -> sqlx::Result<Outcome> {
    Ok(match store::actions::retry(pool, id).await?.as_deref() {
        None => Err(format!("no action with id {id}")),
        Some("failed" | "cancelled") => Ok(format!(
            "action {id} is pending again; a worker will carry it out now (reading the approval back first if it was sent before)"
        )),
        Some("unknown") => Err(format!(
            "action {id} is unknown: it may have reached DingTalk, and dingsync is reading the approval back; retrying it could act twice"
        )),
        Some(state) => Err(format!(
            "action {id} is {state}: only failed or cancelled actions can be retried"
        )),
    })
}

/// `actions cancel ID`.
pub async fn action_cancel(pool: &PgPool, id: i64) -> sqlx::Result<Outcome> {
    Ok(match store::actions::cancel(pool, id).await?.as_deref() {
        None => Err(format!("no action with id {id}")),
        Some("pending" | "failed") => Ok(format!("action {id} cancelled")),
        Some(state @ ("sending" | "unknown")) => Err(format!(
            "action {id} is {state}: it may already have reached DingTalk; wait until it is done, failed or superseded"
        )),
        Some(state) => Err(format!(
            "action {id} is {state}: only pending or failed actions can be cancelled"
        )),
    })
}

/// Whether a row in `state` may be retried (the buttons the console shows).
pub fn can_retry(state: &str) -> bool {
    matches!(state, "failed" | "cancelled")
}

/// Whether a row in `state` may be cancelled.
pub fn can_cancel(state: &str) -> bool {
    matches!(state, "pending" | "failed")
}
