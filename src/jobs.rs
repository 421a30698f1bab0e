//! What every scheduled job is given and what it reports back: the [`Context`] (database pool,
//! DingTalk client, the organisation and the settings of the jobs) and the [`Counts`] a run
//! records in `dingsync.job_runs`. The jobs themselves are `reconcile`'s and `retention`'s; when
//! they run is `scheduler`'s. Operator commands (backfill, drift) run with the same context.

use std::{collections::BTreeMap, sync::Arc};

use sqlx::PgPool;

use crate::{
    config::{FormsConfig, ReconcileConfig, RetentionConfig},
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
    forms: FormsConfig,
    /// The organisation's events only, whatever `dingsync.corps` lists (an `[[apps]]` app's).
    own_organisation_only: bool,
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
                forms: FormsConfig::default(),
                own_organisation_only: false,
            }),
        }
    }

    /// The same context with the `[forms]` settings (`serve` and `dingsync forms` pass theirs;
    /// others keep the defaults, which only the `forms` job reads).
    pub fn with_forms(self, forms: &FormsConfig) -> Context {
        let i = &self.inner;
        Context {
            inner: Arc::new(Inner {
                pool: i.pool.clone(),
                client: i.client.clone(),
                corp_id: i.corp_id.clone(),
                config: i.config.clone(),
                retention: i.retention.clone(),
                forms: forms.clone(),
                own_organisation_only: i.own_organisation_only,
            }),
        }
    }

    /// The same context for an `[[apps]]` app: what it reads from DingTalk (the failed list) is
    /// its organisation's only, never another served from the same database.
    pub fn own_organisation_only(self) -> Context {
        let i = &self.inner;
        Context {
            inner: Arc::new(Inner {
                pool: i.pool.clone(),
                client: i.client.clone(),
                corp_id: i.corp_id.clone(),
                config: i.config.clone(),
                retention: i.retention.clone(),
                forms: i.forms.clone(),
                own_organisation_only: true,
            }),
        }
    }

    /// Whether events naming another organisation served here are foreign to this context.
    pub fn serves_own_organisation_only(&self) -> bool {
        self.inner.own_organisation_only
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

    /// The `[forms]` settings.
    pub fn forms(&self) -> &FormsConfig {
        &self.inner.forms
    }

    /// The `[retention]` settings.
    pub fn retention(&self) -> &RetentionConfig {
        &self.inner.retention
    }
}

/// What a run did, by name (stored as `job_runs.counts`).
pub type Counts = BTreeMap<&'static str, u64>;
