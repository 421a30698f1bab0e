//! The outbox worker: turns `dingsync.outbox` rows into DingTalk approvals, each exactly once.
//!
//! DingTalk's create API has no idempotency key (docs/dingtalk.md §2.1, §7), so exactly-once rests on three
//! rules:
//! 1. A row is claimed (`FOR UPDATE SKIP LOCKED`, a short transaction, a lease) before its create
//!    is sent, so two workers never send the same row; the create runs outside any transaction.
//! 2. A create that may have reached DingTalk without an answer is never resent blindly: the row
//!    becomes `unknown` and is searched for (listids of the originator's instances of that
//!    template around the send, then compare with each one no row owns); found → adopted,
//!    certainly absent → sent again. One search serves all of an originator's `unknown` rows
//!    (`search`).
//! 3. Every send for a claim ends (or is cut off) within half the lease, and a search starts only
//!    after the lease has expired plus `lost_settle_ms`, so a search never races a create that is
//!    still on its way. A worker that dies mid-send leaves its row `sending`; when the lease runs
//!    out another worker (or the next start) takes it over as `unknown`, due `lost_settle_ms`
//!    later like any unanswered create (the create may have left just before the worker died).
//!
//! Owns: the claim loop (LISTEN `dingsync_outbox` plus polling, for PgBouncer), sending, backoff,
//! the lost-response search. Does not own: the SQL (`store::outbox`), the shapes DingTalk takes
//! (`request`), the operator commands (`manage`).

pub mod request;
mod search;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use rand::Rng;
use sqlx::{PgPool, postgres::PgListener};
use tokio::{
    sync::{Semaphore, mpsc, oneshot},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    batching,
    config::OutboxConfig,
    dingtalk,
    store::outbox::{self as store, Claim, OutboxRow, Work},
};

/// How often a row waiting for the monthly allowance is tried again before the month ends, so
/// that a pause lifted by a new `dingtalk.monthly_calls` is noticed (`dingsync quota resume` makes
/// the rows due at once). A try while still paused costs no DingTalk call: the gate answers.
pub const PAUSED_RECHECK: Duration = Duration::from_secs(10 * 60);
/// How long a stopping worker waits for creates in flight before it abandons them (as `unknown`).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the forecast pre-check leaves to do.
enum Forecasted {
    /// Send the create.
    Go,
    /// The row has been dealt with (failed, or waiting for the allowance).
    Done,
}

/// The worker of one organisation.
pub struct Worker {
    pool: PgPool,
    /// Where LISTEN connects (none behind a transaction pooler without `database.direct_url`).
    listen: crate::store::Listen,
    client: dingtalk::Client,
    corp_id: String,
    config: OutboxConfig,
    /// Rows with a task running, so that a stop can mark the abandoned ones.
    in_flight: Mutex<HashSet<i64>>,
    /// Successful creates on their way to [`record_loop`], and its end of the channel until
    /// `run` starts it.
    created: mpsc::Sender<Created>,
    created_rx: Mutex<Option<mpsc::Receiver<Created>>>,
    /// One queue per originator and template: this worker's searches of them one at a time.
    search_queues: Mutex<HashMap<search::SearchKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Rows claimed for a search whose task is running.
    searching: Mutex<HashSet<i64>>,
    /// Of those, the ones an earlier search of their originator has dealt with.
    searched: Mutex<HashSet<i64>>,
}

/// A create that succeeded: the row, its instance, and who waits for the row to be recorded.
type Created = (i64, String, oneshot::Sender<sqlx::Result<bool>>);

/// Most creates recorded in one transaction.
const RECORD_BATCH: usize = 256;

impl Worker {
    pub fn new(
        pool: PgPool,
        listen: crate::store::Listen,
        client: dingtalk::Client,
        corp_id: String,
        config: OutboxConfig,
    ) -> Arc<Worker> {
        let (created, created_rx) = mpsc::channel(RECORD_BATCH);
        Arc::new(Worker {
            pool,
            listen,
            client,
            corp_id,
            config,
            in_flight: Mutex::new(HashSet::new()),
            created,
            created_rx: Mutex::new(Some(created_rx)),
            search_queues: Mutex::new(HashMap::new()),
            searching: Mutex::new(HashSet::new()),
            searched: Mutex::new(HashSet::new()),
        })
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.config.lease_ms)
    }

    fn settle(&self) -> Duration {
        Duration::from_millis(self.config.lost_settle_ms)
    }

    /// Runs until `shutdown`: claims due rows whenever woken (NOTIFY, a finished task, the next
    /// due time, or the poll interval) and processes up to `concurrency` at once.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let poll = Duration::from_millis(self.config.poll_ms);
        let created_rx = self.created_rx.lock().unwrap().take();
        let recorder = created_rx
            .map(|rx| tokio::spawn(record_loop(self.pool.clone(), self.corp_id.clone(), rx)));
        let mut listener = self.listen().await;
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut due_now = true;
        let mut wake_at = Instant::now() + poll;
        // At most `concurrency` rows are worked on at once (the permits), and up to as many more
        // are claimed ahead: a claim is a commit, and claiming one row per finished one would
        // make the claim's round trip and WAL flush the limit.
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        let held_max = 2 * self.config.concurrency;
        loop {
            let free = held_max.saturating_sub(tasks.len());
            if due_now && free >= self.config.concurrency && !shutdown.is_cancelled() {
                let claimed = store::claim(
                    &self.pool,
                    &self.corp_id,
                    free as i64,
                    self.lease(),
                    self.settle(),
                )
                .await;
                match claimed {
                    Ok(claims) => {
                        // A full batch: more may be due as soon as there is room.
                        due_now = claims.len() == free;
                        let claimed_at = Instant::now();
                        for claim in claims {
                            if claim.work == Work::TakenOver {
                                tracing::info!(
                                    outbox_id = claim.row.id,
                                    "outbox: took over a create whose worker stopped mid-send; searching DingTalk for it after outbox.lost_settle_ms"
                                );
                                continue;
                            }
                            self.in_flight.lock().unwrap().insert(claim.row.id);
                            let (worker, permits) = (self.clone(), permits.clone());
                            tasks.spawn(async move {
                                let Ok(_permit) = permits.acquire().await else {
                                    // Stopping: nothing was sent for this row yet.
                                    return worker.release(claim.row.id).await;
                                };
                                worker.process(claim, claimed_at).await
                            });
                        }
                        if !due_now {
                            wake_at = self.next_wake(poll).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox: could not claim rows; retrying");
                        due_now = false;
                        wake_at = Instant::now() + poll;
                    }
                }
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                woken = recv(&mut listener) => {
                    match woken {
                        Ok(()) => due_now = true,
                        Err(e) => {
                            tracing::warn!(error = %e, "outbox: LISTEN connection failed; polling until it is back");
                            listener = None;
                        }
                    }
                }
                () = tokio::time::sleep_until(wake_at) => {
                    due_now = true;
                    wake_at = Instant::now() + poll;
                    if listener.is_none() {
                        listener = self.listen().await;
                    }
                }
            }
        }
        // Rows claimed ahead and not started are given back at once.
        permits.close();
        self.stop(tasks).await;
        // Every task has ended, so nothing waits for the recorder any more.
        if let Some(recorder) = recorder {
            recorder.abort();
        }
    }

    async fn release(&self, id: i64) {
        if let Err(e) = store::release(&self.pool, &self.corp_id, id).await {
            // Its lease runs out and it is taken over as usual.
            tracing::warn!(outbox_id = id, error = %e, "outbox: could not give back a claimed row");
        }
        self.in_flight.lock().unwrap().remove(&id);
    }

    /// Hands a successful create to the recorder and waits until it is committed.
    async fn record_created(&self, id: i64, instance_id: &str) -> anyhow::Result<bool> {
        let (reply, recorded) = oneshot::channel();
        self.created
            .send((id, instance_id.to_string(), reply))
            .await
            .context("the outbox recorder has stopped")?;
        Ok(recorded
            .await
            .context("the outbox recorder has stopped")??)
    }

    /// Stops claiming, gives creates in flight `SHUTDOWN_GRACE` to finish, then abandons the rest
    /// as `unknown` (they may have reached DingTalk), so nothing is left `sending`.
    async fn stop(&self, mut tasks: JoinSet<()>) {
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_ok() {
            return;
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let abandoned: Vec<i64> = self.in_flight.lock().unwrap().drain().collect();
        let marked = store::record_unknown(
            &self.pool,
            &self.corp_id,
            &abandoned,
            "dingsync stopped while this create was in flight; searching DingTalk for the instance",
            self.settle(),
        )
        .await;
        match marked {
            Ok(n) => tracing::info!(
                rows = n,
                "outbox: creates in flight at shutdown left to the lost-response search"
            ),
            // Their leases expire and the next start searches for them anyway.
            Err(e) => tracing::warn!(error = %e, "outbox: could not mark abandoned creates"),
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        match self.listen.channel("dingsync_outbox").await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "outbox: LISTEN unavailable; polling every outbox.poll_ms");
                None
            }
        }
    }

    /// The sooner of the next row's due time and the next poll.
    async fn next_wake(&self, poll: Duration) -> Instant {
        let fallback = Instant::now() + poll;
        match store::next_due(&self.pool, &self.corp_id).await {
            Ok(Some(at)) => {
                let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                fallback.min(Instant::now() + wait)
            }
            _ => fallback,
        }
    }

    async fn process(&self, claim: Claim, claimed_at: Instant) {
        let id = claim.row.id;
        let outcome = match claim.work {
            Work::Send => self.send(&claim.row, claimed_at).await,
            Work::Search => {
                self.searching.lock().unwrap().insert(id);
                let outcome = self.search(&claim.row).await;
                self.searching.lock().unwrap().remove(&id);
                outcome
            }
            Work::TakenOver => Ok(()), // never spawned: see `run`
        };
        self.in_flight.lock().unwrap().remove(&id);
        if let Err(e) = outcome {
            // The claim's lease runs out and the row is taken up again (as `unknown` if a create
            // may have gone out): nothing is lost, the outcome is only late.
            tracing::warn!(outbox_id = id, error = %format!("{e:#}"), "outbox: could not record an outcome");
        }
    }

    /// Sends the create of a claimed row and records what came of it.
    async fn send(&self, row: &OutboxRow, claimed_at: Instant) -> anyhow::Result<()> {
        let request = match request::create_request(row) {
            Ok(request) => request,
            Err(why) => {
                self.fail(row.id, "invalid", &format!("invalid request: {why}"))
                    .await?;
                return Ok(());
            }
        };
        if self.config.forecast_check {
            match self.forecast(row, &request, claimed_at).await? {
                Forecasted::Go => {}
                Forecasted::Done => return Ok(()),
            }
        }
        // Cut off at half the lease after the claim: by the time the lease expires, this send is
        // over (rule 3).
        let deadline = claimed_at + self.lease() / 2;
        let sent = tokio::time::timeout_at(deadline, self.client.create_instance(&request)).await;
        count_create(&sent, row.created_at);
        match sent {
            Ok(Ok(instance_id)) => {
                if self.record_created(row.id, &instance_id).await? {
                    tracing::info!(outbox_id = row.id, process_instance_id = %instance_id, "outbox: approval created");
                } else {
                    tracing::warn!(outbox_id = row.id, process_instance_id = %instance_id,
                        "outbox: approval created, but the row was already resolved elsewhere");
                }
            }
            Ok(Err(e @ dingtalk::Error::Rejected { .. })) => {
                let why = e.to_string();
                tracing::info!(outbox_id = row.id, "outbox: {why}");
                self.fail(row.id, "rejected", &why).await?;
            }
            // DingTalk certainly did not process these: nothing was sent, or it was refused
            // before processing (token, rate limit).
            Ok(Err(
                e @ (dingtalk::Error::Transient(_)
                | dingtalk::Error::RateLimited { .. }
                | dingtalk::Error::InvalidToken { .. }),
            )) => self.not_created(row, &e.to_string()).await?,
            // Nothing was sent: the row waits for the allowance, never `failed` for it.
            Ok(Err(dingtalk::Error::QuotaExhausted { until, reason })) => {
                self.paused(row, until, &reason).await?
            }
            Ok(Err(e @ (dingtalk::Error::NoResponse(_) | dingtalk::Error::Protocol(_)))) => {
                self.maybe_created(row, &e.to_string()).await?
            }
            Err(_elapsed) => {
                self.maybe_created(row, "no answer from DingTalk within half the claim's lease")
                    .await?
            }
        }
        Ok(())
    }

    /// `outbox.forecast_check`: asks DingTalk's forecast (docs/dingtalk.md §11.5) whether the
    /// create can work, before it is sent. A forecast DingTalk refuses, or one whose route has a
    /// required self-selected node the row names no approvers for, fails the row with DingTalk's
    /// reason (nothing was created: the forecast creates nothing). Any other outcome lets the
    /// create go ahead: a transient failure, a rate limit or a lost answer says nothing about the
    /// request, and a row is never failed for one. Bounded to a quarter of the lease, so that the
    /// create still has its own time within the half lease of rule 3.
    async fn forecast(
        &self,
        row: &OutboxRow,
        request: &dingtalk::types::CreateInstance,
        claimed_at: Instant,
    ) -> anyhow::Result<Forecasted> {
        let deadline = claimed_at + self.lease() / 4;
        let asked = self.client.forecast(request, dingtalk::Purpose::Outbox);
        let answer = match tokio::time::timeout_at(deadline, asked).await {
            Ok(answer) => answer,
            Err(_elapsed) => {
                tracing::info!(
                    outbox_id = row.id,
                    "outbox: the forecast did not answer in time; creating without it"
                );
                return Ok(Forecasted::Go);
            }
        };
        let refusal = match answer {
            Ok(forecast) if !forecast.success => {
                Some("DingTalk's forecast found no route for this request".to_string())
            }
            Ok(forecast) => forecast
                .select_nodes
                .iter()
                .find(|node| {
                    node.required
                        && request.approvers.is_none()
                        && request.approvers_v2.is_none()
                        && !request
                            .target_select_actioners
                            .iter()
                            .any(|a| a.actioner_key == node.actor_key && !a.user_ids.is_empty())
                })
                .map(|node| {
                    format!(
                        "DingTalk's forecast: the template's self-selected node {:?} needs approvers: set select_approvers {{\"{}\": [userid, ...]}}",
                        node.activity_name, node.actor_key
                    )
                }),
            Err(e @ dingtalk::Error::Rejected { .. }) => {
                Some(format!("DingTalk's forecast refused the request: {e}"))
            }
            // Nothing was sent: the row waits for the allowance, as a create would.
            Err(dingtalk::Error::QuotaExhausted { until, reason }) => {
                self.paused(row, until, &reason).await?;
                return Ok(Forecasted::Done);
            }
            Err(e) => {
                tracing::info!(outbox_id = row.id, error = %e, "outbox: no forecast; creating without it");
                None
            }
        };
        match refusal {
            Some(why) => {
                tracing::info!(outbox_id = row.id, "outbox: {why}");
                self.fail(row.id, "forecast", &why).await?;
                Ok(Forecasted::Done)
            }
            None => Ok(Forecasted::Go),
        }
    }

    /// Fails row `id` for good with `why`, counted by `reason` (`invalid`, `rejected`,
    /// `forecast`, `attempts`) when this call failed it (not when it was resolved elsewhere).
    async fn fail(&self, id: i64, reason: &'static str, why: &str) -> sqlx::Result<()> {
        if store::record_failed(&self.pool, &self.corp_id, id, why).await? {
            crate::metrics::outbox_failed(reason);
        }
        Ok(())
    }

    /// Certainly not created: back off and retry, or give up after `max_attempts` sends.
    async fn not_created(&self, row: &OutboxRow, why: &str) -> anyhow::Result<()> {
        let (pool, corp) = (&self.pool, self.corp_id.as_str());
        if row.attempts as u32 >= self.config.max_attempts {
            let why = format!("gave up after {} attempts: {why}", row.attempts);
            tracing::warn!(outbox_id = row.id, "outbox: {why}");
            self.fail(row.id, "attempts", &why).await?;
        } else {
            let delay = self.backoff(row.attempts as u32);
            tracing::debug!(
                outbox_id = row.id,
                ?delay,
                reason = why,
                "outbox: retrying later"
            );
            store::record_retry(pool, corp, row.id, why, delay).await?;
        }
        Ok(())
    }

    /// The monthly allowance is used up: `pending` again, the attempt not counted, due at the
    /// sooner of the month's end and [`PAUSED_RECHECK`].
    async fn paused(
        &self,
        row: &OutboxRow,
        until: DateTime<Utc>,
        reason: &str,
    ) -> anyhow::Result<()> {
        let clock = self.client.ledger().clock();
        // `until` is on the ledger's clock (faster than real time against a scaled emulator).
        let left = (until - clock.now()).to_std().unwrap_or(Duration::ZERO);
        let delay = clock.real_duration(left).min(PAUSED_RECHECK);
        let detail = format!(
            ": metered calls paused until {} (the next Beijing month), or until `dingsync quota resume` or a new dingtalk.monthly_calls; {reason}",
            until.format("%Y-%m-%d %H:%M:%S UTC")
        );
        tracing::debug!(
            outbox_id = row.id,
            ?delay,
            "outbox: waiting for the monthly allowance"
        );
        store::record_paused(&self.pool, &self.corp_id, row.id, &detail, delay).await?;
        Ok(())
    }

    /// Maybe created: `unknown`, searched for once DingTalk has certainly finished with it.
    async fn maybe_created(&self, row: &OutboxRow, why: &str) -> anyhow::Result<()> {
        tracing::info!(
            outbox_id = row.id,
            reason = why,
            "outbox: no answer to a create; will search DingTalk for the instance before any retry"
        );
        let why = format!("{why}; searching DingTalk for the instance before any retry");
        store::record_unknown(&self.pool, &self.corp_id, &[row.id], &why, self.settle()).await?;
        Ok(())
    }

    fn backoff(&self, attempt: u32) -> Duration {
        backoff(&self.config, attempt)
    }

    /// How long an unanswerable search waits: half the time since the send, at least the settle
    /// time and at most the backoff cap.
    fn search_backoff(&self, row: &OutboxRow) -> Duration {
        let since = row.sent_at.unwrap_or(row.created_at);
        let elapsed = (Utc::now() - since).to_std().unwrap_or(Duration::ZERO);
        let max = Duration::from_millis(self.config.backoff_max_ms);
        (elapsed / 2).clamp(self.settle().min(max), max)
    }
}

/// Exponential backoff with jitter: `base · 2^(attempt-1)`, capped, then between half and all
/// of it, so that rows failing together do not come back together. Also the actions worker's.
pub fn backoff(config: &OutboxConfig, attempt: u32) -> Duration {
    let base = Duration::from_millis(config.backoff_base_ms);
    let max = Duration::from_millis(config.backoff_max_ms);
    let full = base
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
        .min(max);
    full.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// Records successful creates in batches: whatever arrived while the previous batch was
/// committing goes into the next one (group commit). PostgreSQL serialises the commits of
/// transactions that NOTIFY, so one commit per create would cap the outbox at the disk's flush
/// rate. A batch that fails is retried row by row, so one bad row cannot hold back the others.
async fn record_loop(pool: PgPool, corp_id: String, mut rx: mpsc::Receiver<Created>) {
    while let Some(batch) = batching::next_batch(&mut rx, RECORD_BATCH).await {
        let pairs: Vec<(i64, String)> = batch
            .iter()
            .map(|(id, pid, _)| (*id, pid.clone()))
            .collect();
        match store::record_created_batch(&pool, &corp_id, &pairs).await {
            Ok(applied) => {
                for (id, _, reply) in batch {
                    let _ = reply.send(Ok(applied.contains(&id)));
                }
            }
            Err(_) => {
                for (id, pid, reply) in batch {
                    let _ = reply.send(store::record_created(&pool, &corp_id, id, &pid).await);
                }
            }
        }
    }
}

/// The next notification; never resolves without a listener.
async fn recv(listener: &mut Option<PgListener>) -> sqlx::Result<()> {
    match listener {
        // `Ok(None)`: the connection was lost and re-established; notifications may have been
        // missed, so treat it as a wake-up too.
        Some(l) => l.try_recv().await.map(|_| ()),
        None => std::future::pending().await,
    }
}

/// Counts one create by what the worker does next, and its INSERT-to-created latency.
fn count_create<E>(sent: &Result<Result<String, dingtalk::Error>, E>, inserted_at: DateTime<Utc>) {
    let outcome = match sent {
        Ok(Ok(_)) => "created",
        Ok(Err(dingtalk::Error::Rejected { .. })) => "rejected",
        Ok(Err(dingtalk::Error::QuotaExhausted { .. })) => "paused",
        Ok(Err(
            dingtalk::Error::Transient(_)
            | dingtalk::Error::RateLimited { .. }
            | dingtalk::Error::InvalidToken { .. },
        )) => "not_sent",
        Ok(Err(dingtalk::Error::NoResponse(_) | dingtalk::Error::Protocol(_))) | Err(_) => {
            "no_response"
        }
    };
    let latency =
        matches!(sent, Ok(Ok(_))).then(|| (Utc::now() - inserted_at).to_std().unwrap_or_default());
    crate::metrics::outbox_create(outcome, latency);
}
