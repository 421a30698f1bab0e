//! What the benchmarks that make their own databases share: where PostgreSQL is, and dropping a
//! benchmark's database afterwards.

use sqlx::{Connection, PgConnection};

/// The PostgreSQL server (without a database name): `DINGSYNC_TEST_DATABASE_URL`, or the local one.
pub fn server_url() -> String {
    std::env::var("DINGSYNC_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Drops database `name` if it exists, closing its connections.
pub async fn drop_database(name: &str) {
    let mut admin = PgConnection::connect(&format!("{}/postgres", server_url()))
        .await
        .unwrap();
    sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
}
