//! dingsync keeps PostgreSQL in step with DingTalk approvals. The binary (`main.rs`) only parses
//! arguments; everything runs from here so that the tests start the same code as production.
//!
//! Flow: `callback` (HTTP) → `crypto` (verify, decrypt) → `event` (what it means) → `ingest`
//! (group commit) → `store` (SQL). The other way, `outbox` turns `dingsync.outbox` rows into
//! DingTalk approvals through `dingtalk` (the API client). `app` wires them together; `config` is
//! read once at start-up.

pub mod app;
pub mod callback;
pub mod config;
pub mod crypto;
pub mod demo;
pub mod dingtalk;
pub mod doctor;
pub mod emulator;
pub mod error;
pub mod event;
pub mod ingest;
pub mod metrics;
pub mod outbox;
pub mod reconcile;
pub mod retention;
pub mod scheduler;
pub mod snapshot;
pub mod store;
pub mod telemetry;
