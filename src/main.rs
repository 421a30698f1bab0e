//! `dingsync`: parses the command line and runs the command (`cli::run`).

use std::process::ExitCode;

use clap::Parser;
use dingsync::cli::{self, Cli};

/// mimalloc instead of the system allocator: request handling allocates many small short-lived
/// buffers, and glibc's malloc was the largest single item in the ingest profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    cli::run(Cli::parse()).await
}
