//! The command line: what `dingsync` accepts (`Cli`) and running one command. `main.rs` only
//! parses and calls [`run`]. Each operator command lives in a file of its own here; the runtime
//! (`app`, the jobs, the outbox worker) knows nothing of them.
//!
//! Exit codes: 0 success; 1 a command that failed or found a problem (`doctor` FAIL, `drift`
//! differences); 2 the configuration or the arguments are wrong (and `drift` errors).

pub mod actions;
pub mod backfill;
pub mod callback;
pub mod doctor;
pub mod drift;
pub mod emulator;
pub mod forms;
pub mod outbox;
pub mod quota;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::{app, config::Config, store, telemetry};

#[derive(Parser)]
#[command(version, about = "Keeps PostgreSQL in step with DingTalk approvals")]
pub struct Cli {
    /// Configuration file (every key can be overridden by DINGSYNC_<SECTION>_<KEY>).
    #[arg(long, global = true, default_value = "config.toml")]
    config: PathBuf,
    /// With several apps (`[[apps]]`): the app (`apps[i].name`) an operator command is about;
    /// `doctor` without it checks every app.
    #[arg(long, global = true)]
    app: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve DingTalk callbacks (creates and migrates the database first).
    Serve,
    /// Create the database if missing and apply the migrations, then exit.
    Migrate,
    /// Run the DingTalk emulator on its own (for local development against a stand-in).
    Emulator {
        /// Address to listen on (default: emulator.listen).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Manage the callback registration at DingTalk (register_call_back and friends).
    Callback {
        #[command(subcommand)]
        action: CallbackCommand,
    },
    /// Look at and unblock approval requests in dingsync.outbox.
    Outbox {
        #[command(subcommand)]
        action: OutboxCommand,
    },
    /// Look at and unblock actions on approvals in dingsync.actions.
    Actions {
        #[command(subcommand)]
        action: ActionsCommand,
    },
    /// List instance ids of a template at DingTalk and fetch the approvals the database lacks
    /// (resumes an interrupted run with the same --since).
    Backfill {
        /// The approval template (PROC-...).
        #[arg(long)]
        process_code: String,
        /// First day to list: YYYY-MM-DD (Beijing time, DingTalk's) or an RFC 3339 time; within
        /// the last 365 days (DingTalk's limit).
        #[arg(long)]
        since: String,
        /// List and count only; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check the configuration against PostgreSQL, the clocks and DingTalk (token, callback
    /// crypto, owner key, registration); print one line per check; exit 1 on any FAIL.
    Doctor,
    /// Show this month's DingTalk calls and deliveries against the monthly allowances, the pause
    /// and the forecast (reads the database only); `quota resume` lifts the pause.
    Quota {
        #[command(subcommand)]
        action: Option<QuotaCommand>,
    },
    /// The typed form views of schema dingsync_forms: fetch schemas now, list templates, show
    /// a view's columns.
    Forms {
        #[command(subcommand)]
        action: FormsCommand,
    },
    /// Compare the database with a fresh DingTalk listing of reconcile.process_codes; print
    /// missing, extra and disagreeing approvals; exit 1 when there are any.
    Drift {
        /// How far back: 7d, 12h, 30m.
        #[arg(long, default_value = "7d")]
        since: String,
        /// Templates to compare (default: reconcile.process_codes). Repeatable.
        #[arg(long)]
        process_code: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum OutboxCommand {
    /// List rows, newest first.
    List {
        /// Only rows in this state (pending, sending, unknown, created, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Send a failed or cancelled row again (its attempts start over).
    Retry { id: i64 },
    /// Cancel a pending or failed row.
    Cancel { id: i64 },
}

#[derive(Subcommand)]
pub enum ActionsCommand {
    /// List actions, newest first.
    List {
        /// Only actions in this state (pending, sending, unknown, done, failed, superseded,
        /// cancelled).
        #[arg(long)]
        state: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Carry out a failed or cancelled action again (its attempts start over).
    Retry { id: i64 },
    /// Cancel a pending or failed action.
    Cancel { id: i64 },
}

#[derive(Subcommand)]
pub enum FormsCommand {
    /// Fetch the schemas of these templates now (default: every template seen) and regenerate
    /// their views; one metered DingTalk call each.
    Sync {
        /// Templates (PROC-...).
        process_code: Vec<String>,
    },
    /// Every template seen: its view, schema version, approvals and last fetch.
    List,
    /// A template's views: columns, types, the control of each, sample values.
    Show {
        /// The template (PROC-...).
        process_code: String,
    },
}

#[derive(Subcommand)]
pub enum QuotaCommand {
    /// Lift the pause DingTalk's 90020 started (after an upgrade of the edition, say): metered
    /// calls resume at once on every replica.
    Resume,
}

#[derive(Subcommand)]
pub enum CallbackCommand {
    /// Register callback.public_url for approval events (DingTalk checks the URL first).
    Register,
    /// Show the registration DingTalk holds, and whether it matches the configuration.
    Show,
    /// Replace the registration with the configured URL, token and AES key.
    Update,
    /// Delete the registration.
    Delete,
}

/// Loads the configuration and runs the command.
pub async fn run(cli: Cli) -> ExitCode {
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            if let Command::Doctor = cli.command {
                // Doctor reports even a broken configuration as one of its findings.
                println!("{}", doctor::config_error(&e));
            } else {
                eprintln!("dingsync: configuration error: {e}");
            }
            return ExitCode::from(2);
        }
    };
    telemetry::init(&config.log);
    // `serve` runs every app; `migrate` and `emulator` concern none; `doctor` checks each.
    let whole =
        matches!(
            cli.command,
            Command::Serve | Command::Migrate | Command::Emulator { .. }
        ) || (matches!(cli.command, Command::Doctor) && cli.app.is_none() && config.apps.len() > 1);
    let config = if whole {
        config
    } else {
        match config.for_app(cli.app.as_deref()) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("dingsync: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let result = match cli.command {
        Command::Serve => app::run(config, &cli.config)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Migrate => store::connect_and_migrate(&config.database)
            .await
            .map(|_| ExitCode::SUCCESS),
        Command::Doctor => Ok(doctor::every_app(&config).await),
        Command::Drift {
            since,
            process_code,
        } => Ok(drift::command(&config, &since, &process_code).await),
        Command::Callback { action } => callback::command(&config, action).await,
        Command::Emulator { listen } => emulator::command(&config, listen).await,
        Command::Outbox { action } => outbox::command(&config, action).await,
        Command::Actions { action } => actions::command(&config, action).await,
        Command::Quota { action } => quota::command(&config, action).await,
        Command::Forms { action } => forms::command(&config, action).await,
        Command::Backfill {
            process_code,
            since,
            dry_run,
        } => backfill::command(&config, &process_code, &since, dry_run).await,
    };
    result.unwrap_or_else(|e| {
        tracing::error!("{e:#}");
        eprintln!("dingsync: {e:#}");
        ExitCode::FAILURE
    })
}

/// The jobs' context for an operator command that talks to a DingTalk (a real one, or a
/// standalone `dingsync emulator` at its URL).
async fn jobs_context(config: &Config) -> anyhow::Result<crate::jobs::Context> {
    if config.uses_emulator() {
        anyhow::bail!(
            "dingtalk.api_base: backfill and drift talk to a DingTalk (or a standalone `dingsync emulator` at its URL); the embedded emulator lives inside `serve`"
        );
    }
    app::install_crypto_provider();
    let pool = store::connect_and_migrate(&config.database).await?;
    let client = callback::client(config, pool.clone()).await?;
    Ok(crate::jobs::Context::new(
        pool,
        client,
        &config.dingtalk.corp_id,
        &config.reconcile,
        &config.retention,
    )
    .with_forms(&config.forms))
}
