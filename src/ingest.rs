//! Group commit of incoming events. Each submitted event is answered only after the transaction
//! that stored it (and applied its effect) has committed, but many concurrent events share one
//! transaction: up to `ingest.max_batch` per batch, `ingest.committers` batches in flight. One
//! commit (one WAL flush) then acknowledges a whole batch, which is how dingsync acks more events
//! per second than one-commit-per-event could.
//!
//! Owns: batching, the transaction, and the per-event fallback when a batch fails. The SQL itself
//! is in `store`.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use sqlx::{Connection, PgPool};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{config::IngestConfig, event::Event, store};

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
    tx: mpsc::Sender<Job>,
}

impl Ingest {
    /// Starts the dispatcher. It stops taking batches when `shutdown` fires, after finishing the
    /// batches in flight.
    pub fn start(
        pool: PgPool,
        config: &IngestConfig,
        shutdown: CancellationToken,
    ) -> (Ingest, tokio::task::JoinHandle<()>) {
        // The queue is bounded so that a stalled database pushes back on the HTTP handlers.
        let (tx, rx) = mpsc::channel(config.max_batch * config.committers * 4);
        let handle = tokio::spawn(dispatch(
            pool,
            rx,
            config.max_batch,
            config.committers,
            shutdown,
        ));
        (Ingest { tx }, handle)
    }

    /// Stores `event` and applies it; returns once that is committed (or has failed).
    pub async fn submit(&self, event: Event) -> Result<Stored, IngestError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job { event, reply })
            .await
            .map_err(|_| IngestError::ShuttingDown)?;
        answer.await.unwrap_or(Err(IngestError::ShuttingDown))
    }
}

async fn dispatch(
    pool: PgPool,
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
    committers: usize,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(committers));
    loop {
        // Take a committer slot first, then the queue: while every committer is busy, events pile
        // up in the channel and the next batch takes them all at once.
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let first = tokio::select! {
            job = rx.recv() => match job { Some(job) => job, None => break },
            _ = shutdown.cancelled() => break,
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            commit_batch(&pool, batch).await;
            drop(slot);
        });
    }
    // Refuse what is still queued (the sender gets 503 and retries) and wait for the batches in
    // flight, so that nothing acknowledged is lost.
    rx.close();
    while let Ok(job) = rx.try_recv() {
        let _ = job.reply.send(Err(IngestError::ShuttingDown));
    }
    let _ = slots.acquire_many(committers as u32).await;
}

async fn commit_batch(pool: &PgPool, mut jobs: Vec<Job>) {
    // One lock order for every transaction (by approval), so that concurrent batches touching
    // the same approvals wait for each other instead of deadlocking. The sort is stable: events
    // of one approval keep their arrival order.
    jobs.sort_by(|a, b| {
        (&a.event.corp_id, &a.event.process_instance_id)
            .cmp(&(&b.event.corp_id, &b.event.process_instance_id))
    });
    let events: Vec<&Event> = jobs.iter().map(|j| &j.event).collect();
    match store_events(pool, &events).await {
        Ok(new) => answer(jobs, &new),
        Err(e) if jobs.len() == 1 => {
            let outcome = classify(&e, &jobs[0].event);
            let _ = jobs.pop().expect("one job").reply.send(Err(outcome));
        }
        Err(e) => {
            // Find out which events fail on their own, so that one bad event (or a lost
            // connection) does not fail its neighbours.
            tracing::debug!(error = %e, events = jobs.len(), "batch failed; committing its events one by one");
            for job in jobs {
                let result = match store_events(pool, &[&job.event]).await {
                    Ok(new) => Ok(stored(&job.event, &new)),
                    Err(e) => Err(classify(&e, &job.event)),
                };
                let _ = job.reply.send(result);
            }
        }
    }
}

fn answer(jobs: Vec<Job>, new: &HashSet<(String, String)>) {
    for job in jobs {
        let _ = job.reply.send(Ok(stored(&job.event, new)));
    }
}

fn stored(event: &Event, new: &HashSet<(String, String)>) -> Stored {
    if new.contains(&(event.corp_id.clone(), event.dedup_key.clone())) {
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

/// One transaction: store the events that are new, apply their changes, notify, commit.
/// Returns the keys of the events that were new.
async fn store_events(pool: &PgPool, events: &[&Event]) -> sqlx::Result<HashSet<(String, String)>> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let inserted = store::events::insert_new(&mut tx, events).await?;
    // The same event twice in one batch (a redelivery racing the original) is applied once.
    let mut applied = HashSet::with_capacity(inserted.len());
    let fresh: Vec<&Event> = events
        .iter()
        .copied()
        .filter(|e| {
            let key = (e.corp_id.clone(), e.dedup_key.clone());
            inserted.contains(&key) && applied.insert(key)
        })
        .collect();
    // A statement may touch a row once, so events are applied in layers with at most one event per
    // approval each; within an approval, arrival order is kept (sorting above was stable).
    let mut layers: Vec<Vec<&Event>> = Vec::new();
    let mut depth: HashMap<(&str, &str), usize> = HashMap::new();
    for e in &fresh {
        let Some(change) = &e.approval else { continue };
        let d = depth
            .entry((e.corp_id.as_str(), change.process_instance_id.as_str()))
            .or_insert(0);
        if layers.len() <= *d {
            layers.push(Vec::new());
        }
        layers[*d].push(e);
        *d += 1;
    }
    for layer in &layers {
        let approvals: Vec<_> = layer
            .iter()
            .filter_map(|e| Some((e.corp_id.as_str(), e.approval.as_ref()?)))
            .collect();
        store::approvals::apply_event_changes(&mut tx, &approvals).await?;
        let tasks: Vec<_> = layer
            .iter()
            .filter_map(|e| Some((e.corp_id.as_str(), e.task.as_ref()?)))
            .collect();
        store::tasks::apply_event_changes(&mut tx, &tasks).await?;
    }
    let mut changed: Vec<&str> = depth.keys().map(|(_, pid)| *pid).collect();
    changed.sort_unstable();
    changed.dedup();
    store::approvals::notify_changed(&mut tx, &changed).await?;
    tx.commit().await?;
    Ok(inserted)
}
