//! `dingsync`: parse the command line, load the configuration, run the command.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use dingsync::{app, config::Config, store, telemetry};

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
