//! Applies `migrations/*.sql` with refinery, under a Postgres advisory lock so that replicas
//! starting together do not race (refinery itself takes no lock). refinery has no sqlx driver, so
//! this file implements its async traits over a sqlx connection.

use anyhow::Context;
use refinery_core::{
    Migration, Runner,
    traits::r#async::{AsyncMigrate, AsyncQuery, AsyncTransaction},
};
use sqlx::{Connection, PgConnection, PgPool, Row};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

/// Key of the advisory lock held while migrating (any constant unique to dingsync).
const MIGRATION_LOCK: i64 = 0x6469_6e67_7379_6e63; // "dingsync"
/// refinery's history table, kept inside our schema.
const HISTORY_TABLE: &str = "dingsync.schema_history";

/// Applies every migration not yet applied; returns how many were applied.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<usize> {
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
    let result = async {
        // The history table lives in our schema, which must exist before refinery looks for it.
        sqlx::raw_sql("CREATE SCHEMA IF NOT EXISTS dingsync")
            .execute(&mut conn)
            .await?;
        let mut driver = Driver(&mut conn);
        let mut runner = Runner::new(&migrations)
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

/// refinery's view of one sqlx connection.
struct Driver<'c>(&'c mut PgConnection);

impl AsyncTransaction for Driver<'_> {
    type Error = sqlx::Error;

    async fn execute<'a, T: Iterator<Item = &'a str> + Send + 'a>(
        &mut self,
        queries: T,
    ) -> Result<usize, Self::Error> {
        let mut tx = self.0.begin().await?;
        let mut count = 0;
        for query in queries {
            sqlx::raw_sql(sqlx::AssertSqlSafe(query))
                .execute(&mut *tx)
                .await?;
            count += 1;
        }
        tx.commit().await?;
        Ok(count)
    }
}

impl AsyncQuery<Vec<Migration>> for Driver<'_> {
    async fn query(&mut self, query: &str) -> Result<Vec<Migration>, Self::Error> {
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(query))
            .fetch_all(&mut *self.0)
            .await?;
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

impl AsyncMigrate for Driver<'_> {}
