//! `dingsync`: parse the command line, load the configuration, run the command.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use dingsync::{
    app,
    callback::manage::{self, Action},
    config::Config,
    outbox, store, telemetry,
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
        Err(e) => {
            eprintln!("dingsync: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&config.log);
    let result = match cli.command {
        Command::Serve => app::run(config).await,
        Command::Migrate => store::connect_and_migrate(&config.database)
            .await
            .map(|_| ()),
        Command::Callback { action } => callback(&config, action).await,
        Command::Emulator { listen } => emulator(&config, listen).await,
        Command::Outbox { action } => outbox(&config, action).await,
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
    let mut emulator_config = dingsync::emulator::EmulatorConfig {
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
    dingsync::emulator::serve(emulator_config, listen, shutdown).await
}
