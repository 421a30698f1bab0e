//! Applies `migrations/*.sql` with refinery, under a Postgres advisory lock so that replicas
//! starting together do not race (refinery itself takes no lock). refinery has no sqlx driver, so
//! this file implements its async traits over a sqlx connection.

use anyhow::Context;
use refinery_core::{
    Migration, Runner, Target,
    traits::r#async::{AsyncMigrate, AsyncQuery, AsyncTransaction},
};
use sqlx::{Connection, Executor, PgConnection, PgPool, Row};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

/// Key of the advisory lock held while migrating (any constant unique to dingsync).
const MIGRATION_LOCK: i64 = 0x6469_6e67_7379_6e63; // "dingsync"
/// refinery's history table, kept inside our schema.
const HISTORY_TABLE: &str = "dingsync.schema_history";

/// Applies every migration not yet applied; returns how many were applied.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<usize> {
    migrate_to(pool, Target::Latest).await
}

/// Applies the migrations up to and including `version` only: for a test that builds an older
/// schema with rows and then migrates it (`tests/migrate.rs`). The daemon always applies all.
pub async fn migrate_up_to(pool: &PgPool, version: i32) -> anyhow::Result<usize> {
    migrate_to(pool, Target::Version(version)).await
}

async fn migrate_to(pool: &PgPool, target: Target) -> anyhow::Result<usize> {
    let migrations = MIGRATIONS
        .iter()
        .map(|(name, sql)| Migration::unapplied(name, sql))
        .collect::<Result<Vec<_>, _>>()
        .context("parsing embedded migrations")?;
    let mut conn = super::single_connection(pool)
        .await
        .context("connecting to migrate")?;
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
