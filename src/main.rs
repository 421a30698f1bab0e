//! `dingsync`: parse the command line, load the configuration, run the command.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use dingsync::{
    app,
    callback::manage::{self, Action},
    config::Config,
    doctor, outbox, store, telemetry,
};

/// mimalloc instead of the system allocator: request handling allocates many small short-lived
/// buffers, and glibc's malloc was the largest single item in the ingest profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "Keeps PostgreSQL in step with DingTalk approvals")]
struct Cli {
    /// Configuration file (every key can be overridden by DINGSYNC_<SECTION>_<KEY>).
    #[arg(long, global = true, default_value = "config.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
enum OutboxCommand {
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
enum CallbackCommand {
    /// Register callback.public_url for approval events (DingTalk checks the URL first).
    Register,
    /// Show the registration DingTalk holds, and whether it matches the configuration.
    Show,
    /// Replace the registration with the configured URL, token and AES key.
    Update,
    /// Delete the registration.
    Delete,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) if matches!(cli.command, Command::Doctor) => {
            println!("{}", doctor::config_error(&e));
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("dingsync: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&config.log);
    if let Command::Doctor = cli.command {
        app::install_crypto_provider();
        let report = doctor::run(&config).await;
        print!("{report}");
        return ExitCode::from(report.exit_code());
    }
    if let Command::Drift {
        since,
        process_code,
    } = &cli.command
    {
        return match drift(&config, since, process_code).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("dingsync: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let result = match cli.command {
        Command::Serve => app::run(config).await,
        Command::Migrate => store::connect_and_migrate(&config.database)
            .await
            .map(|_| ()),
        Command::Callback { action } => callback(&config, action).await,
        Command::Emulator { listen } => emulator(&config, listen).await,
        Command::Outbox { action } => outbox(&config, action).await,
        Command::Backfill {
            process_code,
            since,
            dry_run,
        } => backfill(&config, &process_code, &since, dry_run).await,
        Command::Drift { .. } | Command::Doctor => unreachable!("handled above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("dingsync: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn callback(config: &Config, command: CallbackCommand) -> anyhow::Result<()> {
    let action = match command {
        CallbackCommand::Register => Action::Register,
        CallbackCommand::Show => Action::Show,
        CallbackCommand::Update => Action::Update,
        CallbackCommand::Delete => Action::Delete,
    };
    app::install_crypto_provider();
    let pool = store::connect_and_migrate(&config.database).await?;
    let client = manage::client(config, pool).await?;
    println!("{}", manage::run(&client, config, action).await?);
    Ok(())
}

async fn outbox(config: &Config, command: OutboxCommand) -> anyhow::Result<()> {
    let pool = store::connect_and_migrate(&config.database).await?;
    let output = match command {
        OutboxCommand::List { state, limit } => {
            outbox::manage::list(&pool, state.as_deref(), limit).await
        }
        OutboxCommand::Retry { id } => outbox::manage::retry(&pool, id).await,
        OutboxCommand::Cancel { id } => outbox::manage::cancel(&pool, id).await,
    };
    pool.close().await;
    println!("{}", output?);
    Ok(())
}

/// The reconcile context of an operator command (needs a real DingTalk's credentials).
async fn reconcile_context(config: &Config) -> anyhow::Result<dingsync::reconcile::Context> {
    if config.uses_emulator() {
        anyhow::bail!(
            "dingtalk.api_base: backfill and drift talk to a DingTalk (or a standalone `dingsync emulator` at its URL); the embedded emulator lives inside `serve`"
        );
    }
    app::install_crypto_provider();
    let pool = store::connect_and_migrate(&config.database).await?;
    let client = manage::client(config, pool.clone()).await?;
    Ok(dingsync::reconcile::Context::new(
        pool,
        client,
        &config.dingtalk.corp_id,
        &config.reconcile,
        &config.retention,
    ))
}

async fn backfill(
    config: &Config,
    process_code: &str,
    since: &str,
    dry_run: bool,
) -> anyhow::Result<()> {
    let since = parse_since(since)?;
    let ctx = reconcile_context(config).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    let report =
        dingsync::reconcile::backfill::run(&ctx, process_code, since, dry_run, &stop).await?;
    println!(
        "{process_code}: {} windows, {} pages, {} ids, {} not in the database, {} fetched{}{}",
        report.windows,
        report.pages,
        report.ids,
        report.missing,
        report.fetched,
        if report.resumed { " (resumed)" } else { "" },
        if dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        }
    );
    if stop.is_cancelled() {
        println!("interrupted: run the same command again to resume");
    }
    Ok(())
}

/// `YYYY-MM-DD` is midnight in Beijing time (DingTalk's day); anything else must be RFC 3339.
fn parse_since(text: &str) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(day) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        let midnight = day.and_hms_opt(0, 0, 0).expect("midnight exists");
        return Ok((midnight - chrono::Duration::hours(8)).and_utc());
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.to_utc())
        .map_err(|_| anyhow::anyhow!("--since {text:?}: use YYYY-MM-DD or an RFC 3339 time"))
}

/// Prints the drift report; `Ok(true)` when there is none.
async fn drift(config: &Config, since: &str, codes: &[String]) -> anyhow::Result<bool> {
    let period = dingsync::reconcile::drift::parse_period(since)?;
    let codes = if codes.is_empty() {
        config.reconcile.process_codes.clone()
    } else {
        codes.to_vec()
    };
    if codes.is_empty() {
        anyhow::bail!("no process code: set reconcile.process_codes or pass --process-code");
    }
    let ctx = reconcile_context(config).await?;
    let report = dingsync::reconcile::drift::run(&ctx, &codes, chrono::Utc::now() - period).await?;
    println!("{report}");
    Ok(report.is_clean())
}

async fn emulator(config: &Config, listen: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    app::install_crypto_provider();
    let listen = match listen {
        Some(addr) => addr,
        None => config.emulator.listen.parse()?,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    let settings = &config.emulator;
    let mut emulator_config = dingsync_emulator::EmulatorConfig {
        time_scale: settings.time_scale,
        seed: settings.effective_seed(),
        people: (settings.people_pace_ms > 0)
            .then(|| std::time::Duration::from_millis(settings.people_pace_ms)),
        ..Default::default()
    };
    if !config.dingtalk.corp_id.is_empty() {
        emulator_config.corp_id = config.dingtalk.corp_id.clone();
    }
    if !config.dingtalk.app_key.is_empty() && !config.dingtalk.app_secret.is_empty() {
        emulator_config.app_key = config.dingtalk.app_key.clone();
        emulator_config.app_secret = config.dingtalk.app_secret.expose().to_string();
    }
    println!(
        "DingTalk emulator on http://{listen} (corp_id {}, app_key {}); Ctrl-C stops it",
        emulator_config.corp_id, emulator_config.app_key
    );
    dingsync_emulator::serve(emulator_config, listen, shutdown).await
}
