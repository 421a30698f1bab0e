//! Group commit of incoming events. Each submitted event is answered only after the transaction
//! that stored it (and applied its effect) has committed, but many concurrent events share one
//! transaction: up to `ingest.max_batch` per batch, one batch in flight per committer
//! (`ingest.committers`), events sharded over committers by approval. One commit (one WAL flush)
//! then acknowledges a whole batch, which is how dingsync acks more events per second than
//! one-commit-per-event could.
//!
//! Owns: batching, the transaction, the per-event fallback when a batch fails, and what a failure
//! means for the sender. Storing a batch (folding its changes, the statement) is
//! `store::batch::store_events`.

use std::{
    hash::{Hash, Hasher},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    batching,
    config::IngestConfig,
    event::Event,
    store::{
        self,
        batch::{Expect, New, store_events},
    },
};

/// Why an event was not stored.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum IngestError {
    /// The database cannot be reached or is overloaded: try again later (HTTP 503).
    #[error("database unavailable")]
    Unavailable,
    /// Storing this event failed for another reason (HTTP 500; logged where it happened).
    #[error("storing the event failed")]
    Failed,
    /// The daemon is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

/// What happened to a stored event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// First time seen: stored and applied.
    New,
    /// Already stored before (a redelivery): nothing changed.
    Duplicate,
}

struct Job {
    event: Event,
    reply: oneshot::Sender<Result<Stored, IngestError>>,
}

/// Handle for submitting events; cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    shards: Arc<[mpsc::Sender<Job>]>,
    database: Arc<Database>,
}

/// What the last answers said about the database.
#[derive(Default)]
struct Database {
    /// The last event could not be stored because the database was unavailable.
    down: AtomicBool,
    /// An event is finding out whether it is back.
    probing: AtomicBool,
}

/// The one event finding out whether the database is back; lets the next one try when dropped.
struct Probe<'a>(&'a Database);

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        self.0.probing.store(false, Ordering::Release);
    }
}

impl Ingest {
    /// Starts one committer per shard (`ingest.committers`). They stop taking batches when
    /// `shutdown` fires, after finishing the batch in hand; the handle completes when all have.
    pub fn start(
        pool: PgPool,
        config: &IngestConfig,
        shutdown: CancellationToken,
    ) -> (Ingest, tokio::task::JoinHandle<()>) {
        let mut shards = Vec::with_capacity(config.committers);
        let mut committers = tokio::task::JoinSet::new();
        for _ in 0..config.committers {
            // Bounded, so that a stalled database pushes back on the HTTP handlers.
            let (tx, rx) = mpsc::channel(config.max_batch * 4);
            shards.push(tx);
            committers.spawn(committer(
                pool.clone(),
                rx,
                config.max_batch,
                shutdown.clone(),
            ));
        }
        let handle = tokio::spawn(async move { while committers.join_next().await.is_some() {} });
        (
            Ingest {
                shards: shards.into(),
                database: Arc::default(),
            },
            handle,
        )
    }

    /// Stores `event` and applies it; returns once that is committed (or has failed).
    ///
    /// While the database is known to be down, one event at a time finds out whether it is back
    /// (the probe) and the others are refused at once: their senders get 503 within DingTalk's
    /// 1.5 s instead of each waiting up to twice `database.acquire_timeout_ms` (the batch ahead,
    /// then its own) for a connection that is not coming. DingTalk retries them either way; the
    /// first stored event ends it.
    pub async fn submit(&self, event: Event) -> Result<Stored, IngestError> {
        let _probe = if self.database.down.load(Ordering::Acquire) {
            if self.database.probing.swap(true, Ordering::AcqRel) {
                return Err(IngestError::Unavailable);
            }
            Some(Probe(&self.database))
        } else {
            None
        };
        let shard = &self.shards[shard_of(&event, self.shards.len())];
        let (reply, answer) = oneshot::channel();
        shard
            .send(Job { event, reply })
            .await
            .map_err(|_| IngestError::ShuttingDown)?;
        let result = answer.await.unwrap_or(Err(IngestError::ShuttingDown));
        // Written only when it changes: every callback passes here, and a store on every one
        // would bounce the flag's cache line between cores for nothing.
        let down = matches!(result, Err(IngestError::Unavailable));
        let known = result.is_ok() || down;
        if known && self.database.down.load(Ordering::Acquire) != down {
            self.database.down.store(down, Ordering::Release);
        }
        result
    }
}

/// Events of one approval always go to the same committer, so concurrent transactions never
/// touch the same approval rows: no committer waits for another's row locks (or deadlocks).
fn shard_of(event: &Event, shards: usize) -> usize {
    let mut hasher = std::hash::DefaultHasher::new();
    event.corp_id.hash(&mut hasher);
    match &event.process_instance_id {
        Some(pid) => pid.hash(&mut hasher),
        None => event.dedup_key.hash(&mut hasher),
    }
    (hasher.finish() % shards as u64) as usize
}

/// One committer: takes everything queued (up to `max_batch`) as one transaction, commits it,
/// answers each event, repeats. While a commit is in flight new events queue up and become the
/// next batch: the busier the daemon, the larger the batches.
async fn committer(
    pool: PgPool,
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
    shutdown: CancellationToken,
) {
    // Redeliveries are rare, so batches are first written as all new; after one that was not,
    // the next batch skips stored events from the start (see `store::batch`).
    let mut expect = Expect::New;
    loop {
        let batch = tokio::select! {
            batch = batching::next_batch(&mut rx, max_batch) => match batch {
                Some(batch) => batch,
                None => break,
            },
            _ = shutdown.cancelled() => break,
        };
        expect = commit_batch(&pool, batch, expect).await;
    }
    // Refuse what is still queued (the sender gets 503 and DingTalk retries); what was taken
    // has been committed and answered above, so nothing acknowledged is lost.
    rx.close();
    while let Ok(job) = rx.try_recv() {
        let _ = job.reply.send(Err(IngestError::ShuttingDown));
    }
}

/// Commits and answers one batch; returns what to expect of the next one.
async fn commit_batch(pool: &PgPool, mut jobs: Vec<Job>, expect: Expect) -> Expect {
    // Group each approval's events (stable: they keep their arrival order) and keep one lock
    // order, should two transactions ever meet on a row (e.g. the per-event fallback below).
    jobs.sort_by(|a, b| {
        (&a.event.corp_id, &a.event.process_instance_id)
            .cmp(&(&b.event.corp_id, &b.event.process_instance_id))
    });
    let events: Vec<&Event> = jobs.iter().map(|j| &j.event).collect();
    match store_events(pool, &events, expect).await {
        Ok(new) => {
            let next = if new.count(events.len()) == events.len() {
                Expect::New
            } else {
                Expect::Any
            };
            for job in jobs {
                let _ = job.reply.send(Ok(stored(&new, &job.event)));
            }
            next
        }
        Err(e) if jobs.len() == 1 => {
            let outcome = classify(&e, &jobs[0].event);
            let _ = jobs.pop().expect("one job").reply.send(Err(outcome));
            expect
        }
        // The database is down or overloaded: retrying event by event would only make every
        // sender wait longer (each attempt waits for a connection). All get 503 now and
        // DingTalk retries them. (A deadlock or serialization failure is retried one by one.)
        Err(e)
            if store::is_unavailable(&e)
                && !(store::is_code(&e, "40001") || store::is_code(&e, "40P01")) =>
        {
            tracing::warn!(error = %e, events = jobs.len(), "database unavailable; batch not stored");
            for job in jobs {
                let _ = job.reply.send(Err(IngestError::Unavailable));
            }
            expect
        }
        Err(e) => {
            // Find out which events fail on their own, so that one bad event (or a lost
            // connection) does not fail its neighbours.
            tracing::debug!(error = %e, events = jobs.len(), "batch failed; committing its events one by one");
            for job in jobs {
                let result = match store_events(pool, &[&job.event], Expect::Any).await {
                    Ok(new) => Ok(stored(&new, &job.event)),
                    Err(e) => Err(classify(&e, &job.event)),
                };
                let _ = job.reply.send(result);
            }
            Expect::Any
        }
    }
}

/// The answer for one event of a stored batch.
fn stored(new: &New, event: &Event) -> Stored {
    if new.contains(event) {
        Stored::New
    } else {
        Stored::Duplicate
    }
}

fn classify(e: &sqlx::Error, event: &Event) -> IngestError {
    if store::is_unavailable(e) {
        tracing::warn!(error = %e, "database unavailable; event not stored");
        IngestError::Unavailable
    } else {
        tracing::error!(error = %e, event_type = %event.event_type, process_instance_id = ?event.process_instance_id, "storing event failed");
        IngestError::Failed
    }
}
