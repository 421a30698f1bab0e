//! Stream mode (docs/dingtalk.md §8): the second way events arrive, beside HTTP push. dingsync
//! opens `stream.connections` outbound WebSocket connections to DingTalk's gateway (each with a
//! fresh ticket from `dingtalk::gateway`) and receives the app's events over them; each event
//! goes through the push's parsing (`event::parse_at`), the organisation check (`store::corps`),
//! the group commit, dedup and forward-only apply (`ingest`), and is acknowledged only after the
//! commit that holds it (`LATER` while the database is down). Rows carry `source = 'stream'`.
//!
//! Owns: the connection slots and their replacement (`connection`), the frames and acks
//! (`frame`), and whether a connection has been up lately ([`Status`], which `/readyz` reads
//! through a closure: `health` does not import this module). Does not own: what an event means
//! (`event`), storing it (`ingest`), the gateway call and its metering (`dingtalk::gateway`).

mod connection;
pub mod frame;

pub use connection::probe;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::StreamConfig, dingtalk::gateway::Gateway, ingest::Ingest, ledger::Ledger,
    store::corps::Served,
};

/// What the connections need.
pub struct Deps {
    pub gateway: Gateway,
    pub ingest: Ingest,
    pub corps: Served,
    /// Counts every delivery against the deliveries allowance, as for pushes.
    pub ledger: Ledger,
    /// The app's organisation (`dingtalk.corp_id`): an event naming none is its.
    pub corp_id: String,
    /// `stream.silence_limit_ms`.
    pub silence: Duration,
}

/// Whether connections are up, for `/readyz`.
pub struct Status {
    up: AtomicUsize,
    /// When a connection was last seen up (or the stream started).
    last_up: Mutex<Instant>,
    last_error: Mutex<Option<String>>,
    limit: Duration,
}

impl Status {
    fn new(limit: Duration) -> Status {
        Status {
            up: AtomicUsize::new(0),
            last_up: Mutex::new(Instant::now()),
            last_error: Mutex::new(None),
            limit,
        }
    }

    fn up(&self) -> usize {
        self.up.load(Ordering::Acquire)
    }

    fn connection_up(&self) {
        self.up.fetch_add(1, Ordering::AcqRel);
        *self.last_up.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn connection_down(&self) {
        *self.last_up.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.up.fetch_sub(1, Ordering::AcqRel);
    }

    fn failed(&self, why: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// `None` while a connection is up or was within `stream.silence_limit_ms`; else why not.
    pub fn not_ready(&self) -> Option<String> {
        if self.up() > 0 {
            return None;
        }
        let since = self
            .last_up
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed();
        if since <= self.limit {
            return None;
        }
        let error = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        Some(format!(
            "no Stream connection up for {} s{}",
            since.as_secs(),
            error
                .as_deref()
                .map(|e| format!(" (last failure: {e})"))
                .unwrap_or_default()
        ))
    }
}

/// The running Stream client.
pub struct Stream {
    status: Arc<Status>,
}

impl Stream {
    /// Starts `config.connections` slots on `tracker` (the app waits for it before it stops the
    /// ingest, so that events in flight still commit); they stop at `shutdown`.
    pub fn start(
        config: &StreamConfig,
        deps: Deps,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Stream {
        let status = Arc::new(Status::new(deps.silence));
        let deps = Arc::new(DepsWithStatus {
            deps,
            status: status.clone(),
        });
        for slot in 0..config.connections {
            tracker.spawn(connection::run_slot(deps.clone(), slot, shutdown.clone()));
        }
        Stream { status }
    }

    /// What `/readyz` asks.
    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }
}

/// [`Deps`] with the slots' shared [`Status`].
struct DepsWithStatus {
    deps: Deps,
    status: Arc<Status>,
}

impl std::ops::Deref for DepsWithStatus {
    type Target = Deps;
    fn deref(&self) -> &Deps {
        &self.deps
    }
}
