//! dingsync keeps PostgreSQL in step with DingTalk approvals. The binary (`main.rs`) only parses
//! the command line and calls `cli::run`; everything runs from here, so the tests start the same
//! code as production.
//!
//! Three flows, each one way: push (`callback` → `crypto`, `event` → `ingest` → `store`; or
//! `stream` → `event` → `ingest` → `store` over DingTalk's Stream mode),
//! reconcile (`scheduler` → `reconcile`/`retention`, paced by `planner` → `dingtalk` → `store`)
//! and outbox
//! (`outbox` → `dingtalk` → `store`). `app` wires them for `serve`. The module map, what each
//! module owns and must not import, and where each rule lives: `docs/ARCHITECTURE.md` (checked by
//! `tests/architecture.rs`). Only what the binary and the tests use is public.

pub mod actions;
pub mod app;
mod batching;
pub mod callback;
pub mod cli;
pub mod clock;
pub mod config;
mod console;
mod demo;
pub mod dingtalk;
mod error;
pub mod event;
pub mod forms;
mod health;
mod ingest;
pub mod jobs;
pub mod ledger;
mod metrics;
pub mod operate;
pub mod outbox;
pub mod planner;
pub mod reconcile;
pub mod retention;
pub mod scheduler;
mod server;
pub mod snapshot;
pub mod store;
mod stream;
mod telemetry;

/// The callback crypto lives in its own crate so that the DingTalk emulator can share it without
/// depending on the daemon; `dingsync::crypto` keeps naming it for the daemon, tests and fuzzing.
pub use dingsync_crypto as crypto;
