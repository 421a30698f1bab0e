//! `dingsync forms sync|list|show`: the typed form views of schema `dingsync_forms`.
//!
//! - `sync [PROC-...]`: fetches the schemas of the named templates (all registered ones when none
//!   is named) now, one metered call each, and regenerates the views; then runs what the `forms`
//!   job would (new templates, noticed changes). Talks to DingTalk (or a standalone emulator).
//! - `list`: every template dingsync has seen, its view, newest schema version and last fetch.
//! - `show PROC-...`: the view's columns with their types, the control each comes from, and
//!   sample values of the newest approvals; the same for its line-item views.
//!
//! `list` and `show` read the database only.

use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::FormsCommand;
use crate::{
    config::Config,
    reconcile::forms as job,
    store::{self, forms as forms_store},
};

pub async fn command(config: &Config, action: FormsCommand) -> anyhow::Result<ExitCode> {
    match action {
        FormsCommand::Sync { process_code } => sync(config, &process_code).await,
        FormsCommand::List => list(config).await,
        FormsCommand::Show { process_code } => show(config, &process_code).await,
    }
}

async fn sync(config: &Config, codes: &[String]) -> anyhow::Result<ExitCode> {
    let ctx = super::jobs_context(config).await?;
    let (pool, corp) = (ctx.pool(), ctx.corp_id());
    forms_store::register_seen(pool, corp, &config.reconcile.process_codes).await?;
    let codes: Vec<String> = if codes.is_empty() {
        forms_store::templates(pool, corp)
            .await?
            .into_iter()
            .map(|t| t.process_code)
            .collect()
    } else {
        codes.to_vec()
    };
    for code in &codes {
        forms_store::want(pool, corp, code).await?;
    }
    let counts = job::run(&ctx, &CancellationToken::new()).await?;
    println!("forms sync: {}", serde_json::to_string(&counts)?);
    let mut failed = false;
    for template in forms_store::templates(pool, corp).await? {
        if !codes.contains(&template.process_code) {
            continue;
        }
        match (&template.last_error, template.views.first()) {
            (Some(error), _) => {
                failed = true;
                println!("{}: FAILED {error}", template.process_code);
            }
            (None, Some(_)) => {
                let views: Vec<String> = template
                    .views
                    .iter()
                    .map(|v| format!("{}.{v}", job::SCHEMA))
                    .collect();
                println!("{}: {}", template.process_code, views.join(", "));
            }
            (None, None) => println!("{}: no view (no schema stored)", template.process_code),
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn list(config: &Config) -> anyhow::Result<ExitCode> {
    let pool = store::connect_and_migrate(&config.database).await?;
    let corp = super::quota::corp_id(config);
    let templates = forms_store::templates(&pool, &corp).await?;
    if templates.is_empty() {
        println!("no templates seen yet for {corp}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<28} {:<32} {:>7} {:>9}  {:<20} status",
        "process_code", "view", "version", "approvals", "fetched"
    );
    for t in templates {
        let versions = forms_store::versions(&pool, &corp, &t.process_code).await?;
        let version = versions
            .last()
            .map_or("-".to_string(), |v| v.version.to_string());
        let (view, rows) = match t.views.first() {
            Some(view) => (
                format!("{}.{view}", job::SCHEMA),
                forms_store::view_rows(&pool, view).await?.to_string(),
            ),
            None => ("-".to_string(), "-".to_string()),
        };
        let fetched = t.checked_at.map_or("never".to_string(), |at| {
            at.format("%Y-%m-%d %H:%M").to_string()
        });
        let status = match (&t.last_error, t.wanted_at) {
            (Some(e), _) => format!("error: {e}"),
            (None, Some(_)) => "fetch due".to_string(),
            (None, None) => "ok".to_string(),
        };
        println!(
            "{:<28} {:<32} {:>7} {:>9}  {:<20} {status}",
            t.process_code, view, version, rows, fetched
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A sample value as one short line.
fn short(value: Option<&Value>) -> String {
    let text = match value {
        None | Some(Value::Null) => return "NULL".into(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    let mut out: String = text.chars().take(40).collect();
    if text.chars().count() > 40 {
        out.push('…');
    }
    out.replace('\n', " ")
}

async fn show(config: &Config, process_code: &str) -> anyhow::Result<ExitCode> {
    let pool = store::connect_and_migrate(&config.database).await?;
    let corp = super::quota::corp_id(config);
    let plans = job::plans(&pool, &corp, &config.forms).await?;
    let Some(plan) = plans.into_iter().find(|p| p.process_code == process_code) else {
        println!(
            "{process_code}: no form view (no schema stored yet; `dingsync forms sync {process_code}` fetches it)"
        );
        return Ok(ExitCode::FAILURE);
    };
    let template = forms_store::templates(&pool, &corp)
        .await?
        .into_iter()
        .find(|t| t.process_code == process_code)
        .context("template not registered")?;
    println!(
        "{process_code} \"{}\": schema version {}, fetched {}",
        plan.template_name, plan.version, plan.fetched_at
    );
    for (i, view) in template.views.iter().enumerate() {
        let columns = forms_store::view_columns(&pool, view).await?;
        let sample = if i == 0 {
            forms_store::view_sample(&pool, view, 3).await?
        } else {
            forms_store::child_sample(&pool, view, 3).await?
        };
        println!("\n{}.{view}", job::SCHEMA);
        println!("  {:<28} {:<12} {:<40} sample", "column", "type", "control");
        for (name, sql_type, _) in &columns {
            let control = plan
                .columns
                .iter()
                .chain(
                    plan.children
                        .iter()
                        .filter(|c| &c.name == view)
                        .flat_map(|c| &c.columns),
                )
                .find(|c| &c.name == name)
                .map_or(String::new(), |c| {
                    format!("{} \"{}\"", c.control_id, c.label)
                });
            let samples: Vec<String> = sample
                .iter()
                .filter(|_| name != "_raw")
                .map(|row| short(row.get(name)))
                .collect();
            println!(
                "  {name:<28} {sql_type:<12} {control:<40} {}",
                samples.join(" | ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
