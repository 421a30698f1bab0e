//! All SQL lives here, one file per table. Functions take an executor or a connection, so the
//! caller decides the transaction. This module also owns connecting (creating the database when
//! it is missing) and applying the migrations.

pub mod actions;
pub mod approvals;
pub mod batch;
pub mod console;
pub mod corps;
pub mod forms;
pub mod job_runs;
mod migrate;
pub mod outbox;
pub mod prune;
pub mod rate_budget;
pub mod scrape;
pub mod sync_state;
pub mod tokens;
pub mod usage;

use std::{str::FromStr, time::Duration};

use anyhow::Context;
use sqlx::{
    ConnectOptions, Connection, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgListener, PgPoolOptions},
};

use crate::config::{DatabaseConfig, Pooler};

pub use migrate::{migrate, migrate_for, migrate_up_to, migration_applied, newest_migration};

/// Creates the database named in the URL when it does not exist (through the `postgres`
/// maintenance database on the same server), then opens the pool.
pub async fn connect(config: &DatabaseConfig) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(config.url.expose()).context("database.url")?;
    // Straight to PostgreSQL when there is a way: a pooler that was asked for a database that
    // did not exist yet may refuse it for a while after (PgBouncer's server_login_retry).
    let checked = if !config.direct_url.is_empty() {
        PgConnectOptions::from_str(config.direct_url.expose()).context("database.direct_url")?
    } else {
        match config.pooler {
            Pooler::None => options.clone(),
            Pooler::Transaction => pooled(options.clone()),
        }
    };
    ensure_database(&checked).await?;
    open_with(config, options).await
}

/// Opens the pool without creating anything: for `dingsync doctor`, which only looks.
pub async fn open(config: &DatabaseConfig) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(config.url.expose()).context("database.url")?;
    open_with(config, options).await
}

async fn open_with(config: &DatabaseConfig, options: PgConnectOptions) -> anyhow::Result<PgPool> {
    let options = match config.pooler {
        // Reuse one plan per prepared statement. dingsync's statements are keyed lookups and
        // `unnest` batches with one good plan; PostgreSQL's default of re-planning them for each
        // parameter set (custom plans) cost more CPU than the callback batch itself.
        Pooler::None => options.options([("plan_cache_mode", "force_generic_plan")]),
        Pooler::Transaction => pooled(options),
    };
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_millis(config.acquire_timeout_ms))
        .connect_with(options)
        .await
        .context("connecting to PostgreSQL (database.url)")?;
    Ok(pool)
}

/// Options for a connection through a pooler in transaction mode (PgBouncer 1.18 keeps no
/// prepared statements across transactions, and refuses startup parameters it does not know):
///
/// - no statement cache: sqlx then names no statement it keeps. With the cache on, a statement
///   prepared in one transaction is used in a later one, which the pooler may run on another
///   server connection ("prepared statement sqlx_s_1 does not exist"). sqlx 0.8 still prepares
///   each query (Parse, Describe, Sync) before binding it, as the unnamed statement when the
///   cache is off; the pooler keeps a client on its server connection from Parse to Sync and
///   through the Bind/Execute that follows only inside a transaction, which is why
///   [`crate::store`]'s callers that need several statements run them in one.
/// - no `options` startup parameter (`plan_cache_mode`): PgBouncer refuses it. A generic plan
///   needs a statement kept anyway; set it on the role if wanted (`ALTER ROLE ... SET`).
/// - no `extra_float_digits` (sqlx sends 2; PgBouncer refuses it unless told to ignore it, and
///   PostgreSQL 12+ prints floats exactly by default).
fn pooled(options: PgConnectOptions) -> PgConnectOptions {
    options.statement_cache_capacity(0).extra_float_digits(None)
}

/// Whether the database answers a trivial query (a job checks it before it consumes anything
/// from DingTalk that it could not store).
pub async fn ping(db: impl sqlx::PgExecutor<'_>) -> sqlx::Result<()> {
    sqlx::query("SELECT 1").execute(db).await.map(drop)
}

/// Connects, creates the database if needed, applies the migrations and makes the events'
/// partitions of this month and the next few (`prune::create_event_partitions`; the retention
/// job makes them too): what `serve` and `migrate` both do before anything else.
pub async fn connect_and_migrate(config: &DatabaseConfig) -> anyhow::Result<PgPool> {
    let pool = connect(config).await?;
    migrate_for(config, &pool).await?;
    prune::create_event_partitions(&pool)
        .await
        .context("making the partitions of dingsync.events for the coming months")?;
    Ok(pool)
}

async fn ensure_database(options: &PgConnectOptions) -> anyhow::Result<()> {
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(()); // no database in the URL: the server's default for the user
    };
    // Try the database itself first: a deployment may not be allowed to see `postgres`.
    if options.connect().await.is_ok() {
        return Ok(());
    }
    let mut admin = options
        .clone()
        .database("postgres")
        .connect()
        .await
        .with_context(|| format!("connecting to PostgreSQL to create database {name:?}"))?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match sqlx::raw_sql(&sql).execute(&mut admin).await {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another replica created it between our check and our CREATE.
            Err(e) if is_code(&e, "42P04") => {}
            Err(e) => return Err(e).with_context(|| format!("creating database {name:?}")),
        }
    }
    admin.close().await.ok();
    Ok(())
}

/// PostgreSQL's clock (`now()`, the start of the transaction; here a one-statement one).
pub async fn server_time(pool: &PgPool) -> sqlx::Result<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("SELECT now()").fetch_one(pool).await
}

/// Whether `e` is a database error with this SQLSTATE.
pub fn is_code(e: &sqlx::Error, code: &str) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some(code))
}

/// Whether `e` means the database cannot be reached or used right now (as opposed to a query
/// that is wrong for this data): the caller should answer 503 and let the sender retry.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception, 53: insufficient resources, 57P0x: shutting down /
            // cannot connect now, 40001/40P01: serialization failure / deadlock (retry helps).
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "40001"
                || code == "40P01"
        }),
        _ => false,
    }
}

/// Where a worker opens its LISTEN connection: a session of its own, which a pooler in
/// transaction mode cannot give (LISTEN would register on whichever server connection ran it, and
/// notifications would reach whoever uses that one next). `database.direct_url` when set; the
/// pool itself when `database.pooler` is `none`; otherwise none, and the workers poll
/// (`outbox.poll_ms`), which they do anyway as the fallback for a lost LISTEN connection.
#[derive(Debug, Clone)]
pub struct Listen(Option<PgPool>);

impl Listen {
    pub fn new(config: &DatabaseConfig, pool: &PgPool) -> anyhow::Result<Listen> {
        if !config.direct_url.is_empty() {
            let options = PgConnectOptions::from_str(config.direct_url.expose())
                .context("database.direct_url")?;
            // One connection per listening worker (outbox, actions), opened when first needed.
            let direct = PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_millis(config.acquire_timeout_ms))
                .connect_lazy_with(options);
            return Ok(Listen(Some(direct)));
        }
        Ok(Listen(
            (config.pooler == Pooler::None).then(|| pool.clone()),
        ))
    }

    /// A listener on `channel`, or `None` when there is no session to listen on (poll instead).
    pub async fn channel(&self, channel: &str) -> sqlx::Result<Option<PgListener>> {
        let Some(pool) = &self.0 else {
            return Ok(None);
        };
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(channel).await?;
        Ok(Some(listener))
    }
}

/// A dedicated connection, outside the pool (migrations hold a session-level advisory lock).
async fn single_connection(pool: &PgPool) -> anyhow::Result<PgConnection> {
    let options = pool.connect_options();
    Ok(PgConnection::connect_with(&options).await?)
}
