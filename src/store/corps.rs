//! Which organisations this database serves, as the ingest paths check each event's corp id:
//! the rows of `dingsync.corps` (migration V6; every daemon registers its `dingtalk.corp_id` there
//! at start-up, `store::outbox::register_corp`) and the configured corp id. An event that names
//! another organisation is not written into that organisation's rows (`callback` refuses the
//! push, `reconcile::failed` keeps the item raw under its own organisation).
//!
//! With `[[apps]]` each app's events are checked with [`Served::only`]: the organisation of an
//! event is the app's it arrived for, never another one served from the same database (an event
//! signed with app A's secrets that names organisation B is not B's, whatever `dingsync.corps`
//! lists).
//!
//! [`Served`] keeps the set in memory: the hot path runs no query per event. A miss re-reads the
//! table, at most once per [`REFRESH_AFTER`], so that an organisation added while the daemon runs
//! is found without a restart and a flood of foreign events costs one query per interval.

use std::{
    collections::HashSet,
    sync::{Mutex, PoisonError, RwLock},
    time::{Duration, Instant},
};

use sqlx::{PgExecutor, PgPool};

/// Least time between two re-reads of `dingsync.corps` caused by misses.
pub const REFRESH_AFTER: Duration = Duration::from_secs(10);

/// The organisations served here, in memory.
pub struct Served {
    pool: PgPool,
    configured: String,
    /// Only `configured` (`Served::only`): `dingsync.corps` is never read.
    only: bool,
    known: RwLock<HashSet<String>>,
    /// When a miss last re-read the table; `None` lets the next miss re-read at once.
    reread_at: Mutex<Option<Instant>>,
}

impl Served {
    /// Reads `dingsync.corps`; `configured` (`dingtalk.corp_id`) is served whether listed or not.
    pub async fn load(pool: PgPool, configured: &str) -> sqlx::Result<Served> {
        let known = read(&pool).await?;
        Ok(Served {
            pool,
            configured: configured.to_string(),
            only: false,
            known: RwLock::new(known),
            reread_at: Mutex::new(None),
        })
    }

    /// Serves `corp_id` alone: the check of one `[[apps]]` entry's events.
    pub fn only(pool: PgPool, corp_id: &str) -> Served {
        Served {
            pool,
            configured: corp_id.to_string(),
            only: true,
            known: RwLock::new(HashSet::new()),
            reread_at: Mutex::new(None),
        }
    }

    /// Whether events of `corp_id` may be stored here. A query only on a miss, at most once per
    /// [`REFRESH_AFTER`]; an error is the database's (the caller answers as for any outage).
    pub async fn serves(&self, corp_id: &str) -> sqlx::Result<bool> {
        if corp_id == self.configured || self.knows(corp_id) {
            return Ok(true);
        }
        if self.only {
            return Ok(false);
        }
        let previous = {
            let mut reread_at = self
                .reread_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let previous = *reread_at;
            if previous.is_some_and(|at| at.elapsed() < REFRESH_AFTER) {
                return Ok(false);
            }
            *reread_at = Some(Instant::now());
            previous
        };
        match read(&self.pool).await {
            Ok(known) => {
                let served = known.contains(corp_id);
                *self.known.write().unwrap_or_else(PoisonError::into_inner) = known;
                Ok(served)
            }
            Err(e) => {
                // Not counted as a re-read: the next miss tries again.
                *self
                    .reread_at
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = previous;
                Err(e)
            }
        }
    }

    fn knows(&self, corp_id: &str) -> bool {
        self.known
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(corp_id)
    }
}

async fn read(db: impl PgExecutor<'_>) -> sqlx::Result<HashSet<String>> {
    let corps: Vec<String> = sqlx::query_scalar("SELECT corp_id FROM dingsync.corps")
        .fetch_all(db)
        .await?;
    Ok(corps.into_iter().collect())
}
