//! Applies `migrations/*.sql` with refinery, under a Postgres advisory lock so that replicas
//! starting together do not race (refinery itself takes no lock). refinery has no sqlx driver, so
//! this file implements its async traits over a sqlx connection.
//!
//! The lock is session-level (refinery runs each migration in a transaction of its own, so no
//! transaction spans the run), which needs a connection that is a session: PostgreSQL itself,
//! not a pooler in transaction mode. [`migrate_for`] picks it: `database.direct_url` when set,
//! else the pool's own connection when `database.pooler` is `none`; behind a transaction pooler
//! without a direct URL it applies nothing and fails, naming the keys, when anything is left to
//! apply (and succeeds when the schema is current).

use anyhow::Context;
use refinery_core::{
    Migration, Runner, Target,
    traits::r#async::{AsyncMigrate, AsyncQuery, AsyncTransaction},
};
use std::str::FromStr;

use sqlx::{Connection, Executor, PgConnection, PgPool, Row, postgres::PgConnectOptions};

use crate::config::{DatabaseConfig, Pooler};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

/// Key of the advisory lock held while migrating (any constant unique to dingsync).
const MIGRATION_LOCK: i64 = 0x6469_6e67_7379_6e63; // "dingsync"
/// refinery's history table, kept inside our schema.
const HISTORY_TABLE: &str = "dingsync.schema_history";

/// Applies every migration not yet applied over a connection like the pool's; returns how many
/// were applied. The pool must reach PostgreSQL directly (see [`migrate_for`]).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<usize> {
    migrate_to(pool, Target::Latest).await
}

/// What `serve` and `migrate` do: apply the migrations over the connection `config` says is a
/// session (module docs); returns how many were applied.
pub async fn migrate_for(config: &DatabaseConfig, pool: &PgPool) -> anyhow::Result<usize> {
    if !config.direct_url.is_empty() {
        let options = PgConnectOptions::from_str(config.direct_url.expose())
            .context("database.direct_url")?;
        let conn = PgConnection::connect_with(&options)
            .await
            .context("connecting to PostgreSQL to migrate (database.direct_url)")?;
        return run(conn, Target::Latest).await;
    }
    if config.pooler == Pooler::None {
        return migrate(pool).await;
    }
    let newest = newest_migration();
    match migration_applied(pool, newest).await {
        Ok(true) => Ok(0),
        _ => anyhow::bail!(
            "database.pooler is \"transaction\" and database.direct_url is empty: the schema \
             needs migrating (up to V{newest}), which takes a session-level lock a transaction \
             pooler cannot keep; set database.direct_url to a URL straight to PostgreSQL, or run \
             `dingsync migrate` once with database.url pointing at PostgreSQL"
        ),
    }
}

/// Applies the migrations up to and including `version` only: for a test that builds an older
/// schema with rows and then migrates it (`tests/migrate.rs`). The daemon always applies all.
pub async fn migrate_up_to(pool: &PgPool, version: i32) -> anyhow::Result<usize> {
    migrate_to(pool, Target::Version(version)).await
}

async fn migrate_to(pool: &PgPool, target: Target) -> anyhow::Result<usize> {
    let conn = super::single_connection(pool)
        .await
        .context("connecting to migrate")?;
    run(conn, target).await
}

/// Applies the migrations up to `target` on `conn`, under the lock, and closes it.
async fn run(mut conn: PgConnection, target: Target) -> anyhow::Result<usize> {
    let migrations = MIGRATIONS
        .iter()
        .map(|(name, sql)| Migration::unapplied(name, sql))
        .collect::<Result<Vec<_>, _>>()
        .context("parsing embedded migrations")?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut conn)
        .await?;
    // The history table lives in our schema, which must exist before refinery looks for it.
    let created = sqlx::raw_sql("CREATE SCHEMA IF NOT EXISTS dingsync")
        .execute(&mut conn)
        .await;
    let mut driver = Driver(conn);
    let result = async {
        created?;
        let mut runner = Runner::new(&migrations)
            .set_target(target)
            .set_abort_divergent(true)
            .set_abort_missing(true);
        runner.set_migration_table_name(HISTORY_TABLE);
        let report = runner
            .run_async(&mut driver)
            .await
            .context("applying migrations")?;
        anyhow::Ok(report.applied_migrations().len())
    }
    .await;
    let mut conn = driver.0;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut conn)
        .await
        .ok();
    conn.close().await.ok();
    let applied = result?;
    if applied > 0 {
        tracing::info!(applied, "applied database migrations");
    }
    Ok(applied)
}

/// Version of the newest embedded migration (`V7__name` → 7).
pub fn newest_migration() -> i32 {
    MIGRATIONS
        .iter()
        .filter_map(|(name, _)| {
            name.trim_start_matches(['V', 'U'])
                .split("__")
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// Whether migration `version` is recorded in refinery's history (for `/readyz`).
pub async fn migration_applied(pool: &PgPool, version: i32) -> sqlx::Result<bool> {
    sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM {HISTORY_TABLE} WHERE version = $1)"
    ))
    .bind(version)
    .fetch_one(pool)
    .await
}

/// refinery's view of one sqlx connection.
struct Driver(PgConnection);

impl AsyncTransaction for Driver {
    type Error = sqlx::Error;

    async fn execute<'a, T: Iterator<Item = &'a str> + Send + 'a>(
        &mut self,
        queries: T,
    ) -> Result<usize, Self::Error> {
        // Owned copies: sqlx 0.8's executor bounds cannot be proven `Send` for refinery's
        // borrowed iterator inside this trait's future.
        let queries: Vec<String> = queries.map(str::to_owned).collect();
        let mut tx = self.0.begin().await?;
        for query in &queries {
            tx.execute(query.as_str()).await?;
        }
        tx.commit().await?;
        Ok(queries.len())
    }
}

impl AsyncQuery<Vec<Migration>> for Driver {
    async fn query(&mut self, query: &str) -> Result<Vec<Migration>, Self::Error> {
        let query = query.to_owned();
        let rows = self.0.fetch_all(query.as_str()).await?;
        rows.iter()
            .map(|row| {
                let applied_on: String = row.try_get(2)?;
                let checksum: String = row.try_get(3)?;
                let decode = |e: &dyn std::fmt::Display| sqlx::Error::Decode(e.to_string().into());
                Ok(Migration::applied(
                    row.try_get(0)?,
                    row.try_get(1)?,
                    OffsetDateTime::parse(&applied_on, &Rfc3339).map_err(|e| decode(&e))?,
                    checksum.parse().map_err(|e| decode(&e))?,
                ))
            })
            .collect()
    }
}

impl AsyncMigrate for Driver {}
