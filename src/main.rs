//! `dingsync`: parse the command line, load the configuration, run the command.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use dingsync::{
    app,
    callback::manage::{self, Action},
    config::Config,
    store, telemetry,
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
    /// Manage the callback registration at DingTalk (register_call_back and friends).
    Callback {
        #[command(subcommand)]
        action: CallbackCommand,
    },
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
