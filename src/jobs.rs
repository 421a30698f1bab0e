//! What every scheduled job is given and what it reports back: the [`Context`] (database pool,
//! DingTalk client, the organisation and the settings of the jobs) and the [`Counts`] a run
//! records in `dingsync.job_runs`. The jobs themselves are `reconcile`'s and `retention`'s; when
//! they run is `scheduler`'s. Operator commands (backfill, drift) run with the same context.

use std::{collections::BTreeMap, sync::Arc};

use sqlx::PgPool;

use crate::{
    config::{ReconcileConfig, RetentionConfig},
    dingtalk,
    ledger::Allowances,
};

/// Everything a job needs; cheap to clone.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    client: dingtalk::Client,
    corp_id: String,
    config: ReconcileConfig,
    retention: RetentionConfig,
}

impl Context {
    /// `corp_id` is the organisation the client's app belongs to (`dingtalk.corp_id`).
    pub fn new(
        pool: PgPool,
        client: dingtalk::Client,
        corp_id: &str,
        config: &ReconcileConfig,
        retention: &RetentionConfig,
    ) -> Context {
        Context {
            inner: Arc::new(Inner {
                pool,
                client,
                corp_id: corp_id.to_string(),
                config: config.clone(),
                retention: retention.clone(),
            }),
        }
    }

    /// The monthly allowances in force (the client's gate holds them; a reload changes them).
    pub fn allowances(&self) -> Allowances {
        self.inner.client.quota().allowances()
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    pub fn client(&self) -> &dingtalk::Client {
        &self.inner.client
    }

    pub fn corp_id(&self) -> &str {
        &self.inner.corp_id
    }

    /// The `[reconcile]` settings.
    pub fn config(&self) -> &ReconcileConfig {
        &self.inner.config
    }

    /// The `[retention]` settings.
    pub fn retention(&self) -> &RetentionConfig {
        &self.inner.retention
    }
}

/// What a run did, by name (stored as `job_runs.counts`).
pub type Counts = BTreeMap<&'static str, u64>;
