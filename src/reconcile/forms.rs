//! The `forms` job: keeps the typed form views of schema `dingsync_forms` in step with the
//! templates' schemas. Each run:
//! 1. registers every template seen (approvals, the outbox's open rows, `reconcile.process_codes`);
//! 2. compares the form values the detail fetches stored since the last run with the newest
//!    schema: a control id or label the schema lacks marks the template for a fetch (a control
//!    added or renamed); what a fetch still does not explain is remembered, so it never causes
//!    another;
//! 3. fetches the schema (`forms/schemas/processCodes`, one metered call, docs/dingtalk.md §2.5)
//!    of each template that has none, is marked, or has had new approvals for `forms.check_h`
//!    since its last fetch (what instances cannot show: removed controls, renamed options), and
//!    stores a new version when the controls differ;
//! 4. regenerates the views of every template whose SQL changed (a new version, other names in
//!    `[forms]`), each template in one transaction, and builds the configured indexes.
//!
//! So a schema is fetched when it can have changed, never per instance. Safe to run twice and
//! to interrupt: each step commits on its own and is repeated by the next run if it did not.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, TimeDelta, Utc};
use tokio_util::sync::CancellationToken;

use sqlx::PgPool;

use crate::{
    config::FormsConfig,
    dingtalk::{self, Purpose},
    forms::{self, FormSchema, Naming, Version, ViewPlan, view},
    jobs::{Context, Counts},
    store::{approvals, forms as store},
};

/// Retry of a fetch that failed for a transient reason.
const RETRY_S: i64 = 300;
/// Retry of a schema answer dingsync could not read, or a refusal (no such template, no
/// permission): a day, when the daily check would come anyway.
const REFUSED_RETRY_S: i64 = 86_400;

/// The scheduled run.
pub async fn scheduled(ctx: &Context, shutdown: &CancellationToken) -> anyhow::Result<Counts> {
    if !ctx.forms().enabled {
        return Ok(Counts::new());
    }
    run(ctx, shutdown).await
}

/// One run (also `dingsync forms sync`, after marking its templates wanted).
pub async fn run(ctx: &Context, shutdown: &CancellationToken) -> anyhow::Result<Counts> {
    let (pool, corp) = (ctx.pool(), ctx.corp_id());
    let mut counts = Counts::new();
    let registered = store::register_seen(pool, corp, &ctx.config().process_codes).await?;
    add(&mut counts, "registered", registered);
    let changed = store::mark_changed(pool, corp).await?;
    for code in &changed {
        tracing::info!(process_code = %code, "an approval shows a form control the stored schema lacks; fetching the schema");
    }
    add(&mut counts, "changed", changed.len() as u64);
    let now = approvals::clock(pool).await?;
    let check = TimeDelta::hours(ctx.forms().check_h as i64);
    for template in store::templates(pool, corp).await? {
        if shutdown.is_cancelled() {
            break;
        }
        if !due(&template, now, check) {
            continue;
        }
        match fetch(ctx, &template.process_code).await? {
            Fetch::Paused => {
                add(&mut counts, "paused", 1);
                break;
            }
            outcome => add(&mut counts, outcome.name(), 1),
        }
    }
    let (regenerated, indexed) = regenerate(ctx).await?;
    add(&mut counts, "regenerated", regenerated);
    add(&mut counts, "indexed", indexed);
    Ok(counts)
}

fn add(counts: &mut Counts, name: &'static str, n: u64) {
    if n > 0 {
        *counts.entry(name).or_default() += n;
    }
}

/// Whether a template's schema is due for a fetch at `now`.
fn due(t: &store::Template, now: DateTime<Utc>, check: TimeDelta) -> bool {
    if t.next_try_at.is_some_and(|at| at > now) {
        return false;
    }
    match t.checked_at {
        None => true,
        Some(_) if t.wanted_at.is_some() => true,
        Some(checked) => {
            check > TimeDelta::zero() && t.created_since_check && now - checked >= check
        }
    }
}

/// What one schema fetch came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// A new version was stored.
    NewVersion,
    /// The same controls as the newest version.
    Unchanged,
    /// DingTalk refused, or answered what dingsync cannot read: tried again in a day.
    Rejected,
    /// Transient: tried again in a few minutes.
    Failed,
    /// The month's calls are used up: nothing was asked.
    Paused,
}

impl Fetch {
    fn name(self) -> &'static str {
        match self {
            Fetch::NewVersion => "new_version",
            Fetch::Unchanged => "unchanged",
            Fetch::Rejected => "rejected",
            Fetch::Failed => "failed",
            Fetch::Paused => "paused",
        }
    }
}

/// Fetches one template's schema and stores it. Database errors end the run.
pub async fn fetch(ctx: &Context, process_code: &str) -> anyhow::Result<Fetch> {
    let (pool, corp) = (ctx.pool(), ctx.corp_id());
    let started = approvals::clock(pool).await?;
    let answer = ctx.client().form_schema(process_code, Purpose::Forms).await;
    let result = match answer {
        Ok(result) => result,
        Err(e) if super::quota_exhausted(&e) => return Ok(Fetch::Paused),
        Err(e @ dingtalk::Error::Rejected { .. }) => {
            tracing::warn!(%process_code, error = %e, "DingTalk refused the form schema; asking again in a day");
            store::record_failure(
                pool,
                corp,
                process_code,
                &e.to_string(),
                REFUSED_RETRY_S,
                true,
            )
            .await?;
            return Ok(Fetch::Rejected);
        }
        Err(e) => {
            tracing::warn!(%process_code, error = %e, "form schema fetch failed; retrying later");
            store::record_failure(pool, corp, process_code, &e.to_string(), RETRY_S, false).await?;
            return Ok(Fetch::Failed);
        }
    };
    let schema = match FormSchema::from_result(&result) {
        Ok(schema) => schema,
        Err(why) => {
            tracing::error!(%process_code, error = %why, "unreadable form schema answer");
            let error = format!("unreadable schema: {why}");
            store::record_failure(pool, corp, process_code, &error, REFUSED_RETRY_S, true).await?;
            return Ok(Fetch::Rejected);
        }
    };
    let controls = serde_json::to_value(&schema.controls)?;
    let fingerprint = schema.fingerprint();
    let fetched = store::FetchedSchema {
        fingerprint: &fingerprint,
        name: &schema.name,
        modified: schema.modified.as_deref(),
        controls: &controls,
    };
    let stored = store::store_version(pool, corp, process_code, started, fetched).await?;
    if stored.new {
        tracing::info!(%process_code, version = stored.version, "stored a new version of the form schema");
        Ok(Fetch::NewVersion)
    } else {
        Ok(Fetch::Unchanged)
    }
}

/// The `[forms]` naming for one template.
fn naming(f: &FormsConfig, process_code: &str) -> Naming {
    let prefix = format!("{process_code}:");
    Naming {
        view: f.names.get(process_code).cloned(),
        columns: f
            .columns
            .iter()
            .filter_map(|(key, name)| {
                key.strip_prefix(&prefix)
                    .map(|id| (id.to_string(), name.clone()))
            })
            .collect(),
    }
}

/// The plans of every template of `corp` with a stored schema, names deduplicated. Reads the
/// database only.
pub async fn plans(
    pool: &PgPool,
    corp: &str,
    forms: &FormsConfig,
) -> anyhow::Result<Vec<ViewPlan>> {
    let mut plans = Vec::new();
    for template in store::templates(pool, corp).await? {
        let stored = store::versions(pool, corp, &template.process_code).await?;
        if stored.is_empty() {
            continue;
        }
        let versions = stored
            .into_iter()
            .map(|v| {
                Ok(Version {
                    version: v.version,
                    name: v.name,
                    fetched_at: v
                        .fetched_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    controls: serde_json::from_value(v.controls)?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let naming = naming(forms, &template.process_code);
        plans.push(view::plan(corp, &template.process_code, &versions, &naming));
    }
    let configured: HashSet<String> = forms.names.keys().cloned().collect();
    view::dedupe_views(&mut plans, &configured);
    Ok(plans)
}

/// Regenerates the views whose SQL differs from what was generated last, then builds the
/// configured indexes that are missing. Returns (templates regenerated, indexes built).
pub async fn regenerate(ctx: &Context) -> anyhow::Result<(u64, u64)> {
    let (pool, corp) = (ctx.pool(), ctx.corp_id());
    let generated: BTreeMap<String, Option<String>> = store::templates(pool, corp)
        .await?
        .into_iter()
        .map(|t| (t.process_code, t.view_hash))
        .collect();
    let plans = plans(pool, corp, ctx.forms()).await?;
    let mut regenerated = 0;
    for plan in &plans {
        let views = view::views(plan);
        let hash = view::views_hash(&views);
        if generated
            .get(&plan.process_code)
            .cloned()
            .flatten()
            .as_deref()
            == Some(hash.as_str())
        {
            continue;
        }
        let ddl: Vec<store::ViewDdl> = views
            .into_iter()
            .map(|v| store::ViewDdl {
                name: v.name,
                select: v.select,
                comments: v.comments,
            })
            .collect();
        store::replace_views(pool, corp, &plan.process_code, &ddl, &hash).await?;
        tracing::info!(process_code = %plan.process_code, view = %format!("{}.{}", view::SCHEMA, plan.name), version = plan.version, "form views generated");
        regenerated += 1;
    }
    let mut indexed = 0;
    for wanted in &ctx.forms().indexes {
        let Some((view_name, column)) = wanted.split_once('.') else {
            continue;
        };
        let definition = plans
            .iter()
            .find(|p| p.name == view_name)
            .and_then(|p| view::index_definition(p, column));
        match definition {
            Some((name, definition)) => {
                if store::ensure_index(pool, &name, &definition).await? {
                    tracing::info!(index = %name, "built the form index {wanted}");
                    indexed += 1;
                }
            }
            None => tracing::warn!(
                "forms.indexes: {wanted:?} is not a numeric, date, timestamptz or text column of a form view (yet)"
            ),
        }
    }
    Ok((regenerated, indexed))
}

pub use forms::view::SCHEMA;
