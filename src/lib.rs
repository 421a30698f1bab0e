//! dingsync keeps PostgreSQL in step with DingTalk approvals. The binary (`main.rs`) only parses
//! arguments; everything runs from here so that the tests start the same code as production.
//!
//! Flow: `callback` (HTTP) → `crypto` (verify, decrypt) → `event` (what it means) → `ingest`
//! (group commit) → `store` (SQL). The other way, `outbox` turns `dingsync.outbox` rows into
//! DingTalk approvals through `dingtalk` (the API client). `app` wires them together; `config` is
//! read once at start-up.

pub mod app;
mod batching;
pub mod callback;
pub mod cli;
pub mod config;
mod demo;
pub mod dingtalk;
mod error;
pub mod event;
mod health;
mod ingest;
pub mod jobs;
mod metrics;
pub mod outbox;
pub mod reconcile;
pub mod retention;
pub mod scheduler;
pub mod snapshot;
pub mod store;
mod telemetry;

/// The callback crypto lives in its own crate so that the DingTalk emulator can share it without
/// depending on the daemon; `dingsync::crypto` keeps naming it for the daemon, tests and fuzzing.
pub use dingsync_crypto as crypto;
