//! The actions worker: carries out `dingsync.actions` rows in DingTalk (agree, refuse, redirect,
//! terminate, comment), each exactly once.
//!
//! DingTalk's action APIs have no idempotency key (docs/dingtalk.md §12.6), so exactly-once
//! rests on the outbox's three rules, with a read-back where the outbox searches:
//! 1. A row is claimed (`FOR UPDATE SKIP LOCKED`, a short transaction, a lease) before its call
//!    is sent, so two workers never send the same row; the call runs outside any transaction.
//! 2. An action that may have reached DingTalk without an answer (a lost answer, a 5xx, a
//!    timeout) is never resent blindly: the row becomes `unknown`, and the approval is read back
//!    first (`readback`): the task finished by that approver with that result, the instance
//!    terminated, the task redirected to that user, the comment present (`store::actions::
//!    record_comment_found` counts them) → `done`; someone else acted first → `superseded`;
//!    certainly not carried out → sent again. A row retried after any other failure is read back
//!    first too (the stricter reading: a refusal that may pass, a rate limit, a token).
//! 3. Every call of a claim ends (or is cut off) within half the lease, and a read-back after a
//!    lost answer starts `outbox.lost_settle_ms` after the cut-off, so it never races a call
//!    still on its way. A worker that dies mid-call leaves its row `sending`; when the lease runs
//!    out another worker (or the next start) takes it over as `unknown`.
//!
//! A refusal is read back too, so that "someone acted first" ends `superseded` (who and how, in
//! columns), not `failed`; a refusal of an action whose task or approval is still open is
//! `failed` with DingTalk's reason, except the 15-second terminate guard, which is waited out.
//! Rate limits, refused tokens and the monthly allowance behave as for creates: the client
//! retries what it may; what is left goes back to `pending` with backoff (the allowance: without
//! counting the attempt, `outbox::PAUSED_RECHECK`).
//!
//! The approval rows follow from the events DingTalk pushes for the action and from the detail
//! fetch, as for any change; a read-back's snapshot is stored as well (`SnapshotSource::Action`).
//! Timings and limits are the outbox's (`[outbox]`): the same lease, settle time, backoff,
//! attempts and concurrency.
//!
//! Owns: the claim loop (LISTEN `dingsync_actions` plus polling), sending, the read-back, the
//! outcomes. Does not own: the SQL (`store::actions`), the wire (`dingtalk::actions`), the
//! judgement of a read-back (`readback`), the operator commands (`cli::actions`).

mod readback;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, postgres::PgListener};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    batching,
    config::OutboxConfig,
    dingtalk::{self, Purpose, actions::ActionRequest},
    outbox,
    snapshot::Snapshot,
    store::{
        actions::{self as store, ActionClaim, ActionRow, ActionWork},
        approvals::{self, SnapshotSource},
    },
};
use readback::Verdict;

/// How long a stopping worker waits for calls in flight before it abandons them (as `unknown`).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Most `done` rows recorded in one statement.
const RECORD_BATCH: usize = 256;
/// DingTalk refuses a terminate within 15 s of the submission (docs/dingtalk.md §12.3) with
/// this text under `aflowProcessInstStatusException`: the one refusal that passes by itself.
const TOO_SOON: &str = "15 秒内不允许撤销";
/// How long after a too-early terminate it is tried again: past the 15 s, with a margin.
const TOO_SOON_WAIT: Duration = Duration::from_secs(16);

/// A `done` on its way to the recorder, and who waits for it to be committed.
type Done = (i64, oneshot::Sender<sqlx::Result<bool>>);

/// A claim's share of `outbox.concurrency`: held while DingTalk is asked, given back before the
/// claim waits for the recorder's commit. A row waiting for a group commit has nothing left to
/// send, so it must not keep the next row's call from starting (with it held, the commit's wait
/// was part of every row's time in a slot and capped the calls per second).
struct Slot(Mutex<Option<OwnedSemaphorePermit>>);

impl Slot {
    fn free(&self) {
        self.0.lock().unwrap().take();
    }
}

/// The actions worker of one organisation.
pub struct Worker {
    pool: PgPool,
    /// Where LISTEN connects (none behind a transaction pooler without `database.direct_url`).
    listen: crate::store::Listen,
    client: dingtalk::Client,
    corp_id: String,
    config: OutboxConfig,
    /// Rows with a task running, so that a stop can mark the abandoned ones.
    in_flight: Mutex<HashSet<i64>>,
    done: mpsc::Sender<Done>,
    done_rx: Mutex<Option<mpsc::Receiver<Done>>>,
}

/// What a call came to.
enum Sent {
    Done,
    Refused(dingtalk::Error),
    /// Certainly not carried out (nothing sent, or refused before processing).
    Untouched(String),
    Paused(DateTime<Utc>, String),
    /// May have been carried out.
    Unknown(String),
}

impl Worker {
    pub fn new(
        pool: PgPool,
        listen: crate::store::Listen,
        client: dingtalk::Client,
        corp_id: String,
        config: OutboxConfig,
    ) -> Arc<Worker> {
        let (done, done_rx) = mpsc::channel(RECORD_BATCH);
        Arc::new(Worker {
            pool,
            listen,
            client,
            corp_id,
            config,
            in_flight: Mutex::new(HashSet::new()),
            done,
            done_rx: Mutex::new(Some(done_rx)),
        })
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.config.lease_ms)
    }

    fn settle(&self) -> Duration {
        Duration::from_millis(self.config.lost_settle_ms)
    }

    /// Runs until `shutdown`: claims due rows whenever woken (NOTIFY, a finished task, the next
    /// due time, or the poll interval) and works on up to `outbox.concurrency` at once, with as
    /// many more claimed ahead (a claim is a commit: one per row would make it the limit).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let poll = Duration::from_millis(self.config.poll_ms);
        let recorder = self
            .done_rx
            .lock()
            .unwrap()
            .take()
            .map(|rx| tokio::spawn(record_loop(self.pool.clone(), self.corp_id.clone(), rx)));
        let mut listener = self.listen().await;
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut due_now = true;
        let mut wake_at = Instant::now() + poll;
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
                        due_now = claims.len() == free;
                        let claimed_at = Instant::now();
                        for claim in claims {
                            if claim.work == ActionWork::TakenOver {
                                tracing::info!(
                                    action_id = claim.row.id,
                                    "actions: took over an action whose worker stopped mid-call; reading the approval back after outbox.lost_settle_ms"
                                );
                                continue;
                            }
                            self.in_flight.lock().unwrap().insert(claim.row.id);
                            let (worker, permits) = (self.clone(), permits.clone());
                            tasks.spawn(async move {
                                let Ok(permit) = permits.acquire_owned().await else {
                                    return worker.release(claim.row.id).await;
                                };
                                let slot = Slot(Mutex::new(Some(permit)));
                                worker.process(claim, claimed_at, &slot).await
                            });
                        }
                        if !due_now {
                            wake_at = self.next_wake(poll).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "actions: could not claim rows; retrying");
                        due_now = false;
                        wake_at = Instant::now() + poll;
                    }
                }
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                woken = recv(&mut listener) => match woken {
                    Ok(()) => due_now = true,
                    Err(e) => {
                        tracing::warn!(error = %e, "actions: LISTEN connection failed; polling until it is back");
                        listener = None;
                    }
                },
                () = tokio::time::sleep_until(wake_at) => {
                    due_now = true;
                    wake_at = Instant::now() + poll;
                    if listener.is_none() {
                        listener = self.listen().await;
                    }
                }
            }
        }
        permits.close();
        self.stop(tasks).await;
        if let Some(recorder) = recorder {
            recorder.abort();
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        match self.listen.channel("dingsync_actions").await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "actions: LISTEN unavailable; polling every outbox.poll_ms");
                None
            }
        }
    }

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

    async fn release(&self, id: i64) {
        if let Err(e) = store::release(&self.pool, &self.corp_id, id).await {
            tracing::warn!(action_id = id, error = %e, "actions: could not give back a claimed row");
        }
        self.in_flight.lock().unwrap().remove(&id);
    }

    /// Stops claiming, gives calls in flight `SHUTDOWN_GRACE`, then abandons the rest as
    /// `unknown` (they may have reached DingTalk), so nothing is left `sending`.
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
            "dingsync stopped while this action was in flight; reading the approval back before anything else",
            self.settle(),
        )
        .await;
        if let Err(e) = marked {
            // Their leases expire and the next start takes them over anyway.
            tracing::warn!(error = %e, "actions: could not mark abandoned actions");
        }
    }

    async fn process(&self, claim: ActionClaim, claimed_at: Instant, slot: &Slot) {
        let id = claim.row.id;
        // Everything this claim sends ends within half the lease (rule 3).
        let deadline = claimed_at + self.lease() / 2;
        let outcome = match claim.work {
            ActionWork::Send => self.send(&claim.row, deadline, slot).await,
            ActionWork::Verify => self.verify(&claim.row, deadline, slot).await,
            ActionWork::TakenOver => Ok(()),
        };
        self.in_flight.lock().unwrap().remove(&id);
        if let Err(e) = outcome {
            // The lease runs out and the row is taken up again: nothing is lost, only late.
            tracing::warn!(action_id = id, error = %format!("{e:#}"), "actions: could not record an outcome");
        }
    }

    /// Sends a claimed (`sending`) row and records what came of it.
    async fn send(&self, row: &ActionRow, deadline: Instant, slot: &Slot) -> anyhow::Result<()> {
        let request = match request(row) {
            Ok(request) => request,
            Err(why) => {
                store::record_failed(&self.pool, &self.corp_id, row.id, &why).await?;
                return Ok(());
            }
        };
        let sent = tokio::time::timeout_at(deadline, self.client.act(&request)).await;
        let sent = match sent {
            Ok(Ok(())) => Sent::Done,
            Ok(Err(e @ dingtalk::Error::Rejected { .. })) => Sent::Refused(e),
            Ok(Err(
                e @ (dingtalk::Error::Transient(_)
                | dingtalk::Error::RateLimited { .. }
                | dingtalk::Error::InvalidToken { .. }),
            )) => Sent::Untouched(e.to_string()),
            Ok(Err(dingtalk::Error::QuotaExhausted { until, reason })) => {
                Sent::Paused(until, reason)
            }
            Ok(Err(e @ (dingtalk::Error::NoResponse(_) | dingtalk::Error::Protocol(_)))) => {
                Sent::Unknown(e.to_string())
            }
            Err(_elapsed) => {
                Sent::Unknown("no answer from DingTalk within half the claim's lease".into())
            }
        };
        crate::metrics::action(&row.action, sent.label(), row.created_at);
        match sent {
            Sent::Done => {
                if self.record_done(row.id, slot).await? {
                    tracing::info!(action_id = row.id, action = %row.action, process_instance_id = %row.process_instance_id, "actions: done");
                }
            }
            Sent::Refused(e) => self.refused(row, &e, deadline).await?,
            Sent::Untouched(why) => self.not_done(row, &why).await?,
            Sent::Paused(until, reason) => self.paused(row, until, &reason).await?,
            Sent::Unknown(why) => {
                tracing::info!(action_id = row.id, reason = %why, "actions: no answer; will read the approval back before any retry");
                store::record_unknown(
                    &self.pool,
                    &self.corp_id,
                    &[row.id],
                    &format!("{why}; reading the approval back before any retry"),
                    self.settle(),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// A row sent before: reads the approval back, and sends again only if the action has
    /// certainly not taken effect (rule 2).
    async fn verify(&self, row: &ActionRow, deadline: Instant, slot: &Slot) -> anyhow::Result<()> {
        let Some(snap) = self.read_back(row, deadline).await? else {
            return Ok(());
        };
        let verdict = if row.action == "comment" {
            let found = readback::comment_dates(row, &snap);
            if store::record_comment_found(&self.pool, &self.corp_id, row, &found).await? {
                tracing::info!(
                    action_id = row.id,
                    "actions: the comment is in DingTalk; done"
                );
                return Ok(());
            }
            readback::judge(row, &snap, false)
        } else {
            readback::judge(row, &snap, false)
        };
        match verdict {
            Verdict::Done => {
                if self.record_done(row.id, slot).await? {
                    tracing::info!(action_id = row.id, action = %row.action, "actions: carried out in DingTalk (its answer was lost); done");
                }
            }
            Verdict::Superseded(o) => self.superseded(row, &o).await?,
            Verdict::NotDone => {
                if row.attempts as u32 >= self.config.max_attempts {
                    let why = format!(
                        "gave up after {} attempts: {}",
                        row.attempts,
                        row.last_error.as_deref().unwrap_or("not carried out")
                    );
                    store::record_failed(&self.pool, &self.corp_id, row.id, &why).await?;
                    return Ok(());
                }
                // `sending` (a retry: the claim counted the attempt) or `unknown` (sent again now).
                if row.state == "unknown"
                    && !store::resend(&self.pool, &self.corp_id, row.id, self.lease()).await?
                {
                    return Ok(());
                }
                let mut row = row.clone();
                if row.state == "unknown" {
                    row.attempts += 1;
                    row.state = "sending".into();
                }
                self.send(&row, deadline, slot).await?;
            }
        }
        Ok(())
    }

    /// DingTalk refused the send: read back to tell "someone acted first" (`superseded`) from a
    /// refusal of its own (`failed` with DingTalk's reason).
    async fn refused(
        &self,
        row: &ActionRow,
        e: &dingtalk::Error,
        deadline: Instant,
    ) -> anyhow::Result<()> {
        let why = e.to_string();
        tracing::info!(action_id = row.id, reason = %why, "actions: DingTalk refused the action; reading the approval back");
        let Some(snap) = self.read_back(row, deadline).await? else {
            return Ok(());
        };
        match readback::judge(row, &snap, true) {
            Verdict::Superseded(o) => self.superseded(row, &o).await?,
            _ if row.action == "terminate" && why.contains(TOO_SOON) => {
                // DingTalk's seconds: on the ledger's clock (faster against a scaled emulator).
                let wait = self.client.ledger().clock().real_duration(TOO_SOON_WAIT);
                self.retry(row, &why, wait.max(self.backoff(row.attempts as u32)))
                    .await?
            }
            _ => {
                store::record_failed(&self.pool, &self.corp_id, row.id, &why).await?;
            }
        }
        Ok(())
    }

    /// Reads the row's approval from DingTalk and stores the snapshot. `None` (the row's outcome
    /// recorded) when DingTalk cannot be asked now: the row waits, still in doubt.
    async fn read_back(
        &self,
        row: &ActionRow,
        deadline: Instant,
    ) -> anyhow::Result<Option<Snapshot>> {
        let requested_at = approvals::clock(&self.pool).await?;
        let read = tokio::time::timeout_at(
            deadline,
            self.client
                .get_instance(&row.process_instance_id, Purpose::Action),
        )
        .await;
        let instance = match read {
            Ok(Ok(instance)) => instance,
            Ok(Err(dingtalk::Error::QuotaExhausted { until, reason })) => {
                self.paused(row, until, &reason).await?;
                return Ok(None);
            }
            Ok(Err(e)) => {
                self.cannot_read(row, &e.to_string()).await?;
                return Ok(None);
            }
            Err(_) => {
                self.cannot_read(row, "no answer within half the claim's lease")
                    .await?;
                return Ok(None);
            }
        };
        let snap = match Snapshot::from_instance(&row.process_instance_id, &instance) {
            Ok(snap) => snap,
            Err(e) => {
                self.cannot_read(row, &format!("unreadable approval: {e}"))
                    .await?;
                return Ok(None);
            }
        };
        let stored = async {
            let mut conn = self.pool.acquire().await?;
            approvals::apply_snapshot(
                &mut conn,
                &self.corp_id,
                &snap,
                requested_at,
                SnapshotSource::Action,
                None,
            )
            .await
        }
        .await;
        if let Err(e) = stored {
            // The detail fetch its events ask for stores it instead.
            tracing::warn!(action_id = row.id, error = %e, "actions: could not store the snapshot a read-back fetched");
        }
        Ok(Some(snap))
    }

    /// The approval could not be read: a row whose action may have taken effect stays
    /// `unknown`, one that certainly has not goes back to `pending`; both wait the backoff.
    async fn cannot_read(&self, row: &ActionRow, why: &str) -> anyhow::Result<()> {
        let why = format!("reading the approval back failed ({why}); trying again");
        let delay = self.backoff(row.attempts.max(1) as u32);
        tracing::info!(action_id = row.id, reason = %why, ?delay, "actions: cannot read the approval back now");
        if row.state == "unknown" {
            store::record_unknown(&self.pool, &self.corp_id, &[row.id], &why, delay).await?;
        } else {
            store::record_retry(&self.pool, &self.corp_id, row.id, &why, delay).await?;
        }
        Ok(())
    }

    async fn superseded(&self, row: &ActionRow, o: &readback::Overtaken) -> anyhow::Result<()> {
        let detail = o.describe();
        tracing::info!(action_id = row.id, action = %row.action, how = %o.how, "actions: superseded: {detail}");
        store::record_superseded(
            &self.pool,
            &self.corp_id,
            row.id,
            o.by.as_deref(),
            &o.how,
            o.at,
            &detail,
        )
        .await?;
        Ok(())
    }

    /// Certainly not carried out: back off and retry (read back first), or give up after
    /// `outbox.max_attempts`.
    async fn not_done(&self, row: &ActionRow, why: &str) -> anyhow::Result<()> {
        if row.attempts as u32 >= self.config.max_attempts {
            let why = format!("gave up after {} attempts: {why}", row.attempts);
            tracing::warn!(action_id = row.id, "actions: {why}");
            store::record_failed(&self.pool, &self.corp_id, row.id, &why).await?;
            return Ok(());
        }
        self.retry(row, why, self.backoff(row.attempts as u32))
            .await
    }

    async fn retry(&self, row: &ActionRow, why: &str, delay: Duration) -> anyhow::Result<()> {
        tracing::debug!(
            action_id = row.id,
            ?delay,
            reason = why,
            "actions: retrying later"
        );
        store::record_retry(&self.pool, &self.corp_id, row.id, why, delay).await?;
        Ok(())
    }

    /// The monthly allowance is used up: as the outbox's creates, the row waits without the
    /// attempt counted, due at the sooner of the month's end and `outbox::PAUSED_RECHECK`.
    async fn paused(
        &self,
        row: &ActionRow,
        until: DateTime<Utc>,
        reason: &str,
    ) -> anyhow::Result<()> {
        let clock = self.client.ledger().clock();
        let left = (until - clock.now()).to_std().unwrap_or(Duration::ZERO);
        let delay = clock.real_duration(left).min(outbox::PAUSED_RECHECK);
        let detail = format!(
            ": metered calls paused until {} (the next Beijing month), or until `dingsync quota resume` or a new dingtalk.monthly_calls; {reason}",
            until.format("%Y-%m-%d %H:%M:%S UTC")
        );
        if row.state == "unknown" {
            // Its read-back waits; it may have taken effect, so it stays in doubt.
            let why = format!("{}{detail}", crate::store::outbox::PAUSED);
            store::record_unknown(&self.pool, &self.corp_id, &[row.id], &why, delay).await?;
        } else {
            store::record_paused(&self.pool, &self.corp_id, row.id, &detail, delay).await?;
        }
        Ok(())
    }

    fn backoff(&self, attempt: u32) -> Duration {
        outbox::backoff(&self.config, attempt)
    }

    /// Hands a `done` to the recorder, gives the claim's slot back (nothing is sent any more),
    /// and waits until the `done` is committed.
    async fn record_done(&self, id: i64, slot: &Slot) -> anyhow::Result<bool> {
        slot.free();
        let (reply, recorded) = oneshot::channel();
        self.done
            .send((id, reply))
            .await
            .context("the actions recorder has stopped")?;
        Ok(recorded
            .await
            .context("the actions recorder has stopped")??)
    }
}

impl Sent {
    fn label(&self) -> &'static str {
        match self {
            Sent::Done => "done",
            Sent::Refused(_) => "refused",
            Sent::Untouched(_) => "not_sent",
            Sent::Paused(..) => "paused",
            Sent::Unknown(_) => "no_response",
        }
    }
}

/// The DingTalk call for `row`. Fails (with the reason) only for a row the database's checks
/// should already have refused.
fn request(row: &ActionRow) -> Result<ActionRequest, String> {
    let actor = || {
        row.actor_user_id
            .clone()
            .ok_or_else(|| format!("invalid action: {} without actor_user_id", row.action))
    };
    let task = || {
        row.task_id
            .ok_or_else(|| format!("invalid action: {} without task_id", row.action))
    };
    Ok(match row.action.as_str() {
        "agree" | "refuse" => ActionRequest::Execute {
            process_instance_id: row.process_instance_id.clone(),
            task_id: task()?,
            actioner_user_id: actor()?,
            agree: row.action == "agree",
            remark: row.remark.clone(),
        },
        "terminate" => ActionRequest::Terminate {
            process_instance_id: row.process_instance_id.clone(),
            operating_user_id: if row.as_system { None } else { Some(actor()?) },
            remark: row.remark.clone(),
        },
        "comment" => ActionRequest::Comment {
            process_instance_id: row.process_instance_id.clone(),
            comment_user_id: actor()?,
            text: row
                .remark
                .clone()
                .ok_or("invalid action: a comment without text")?,
        },
        "redirect" => ActionRequest::Redirect {
            task_id: task()?,
            operate_user_id: actor()?,
            to_user_id: row
                .to_user_id
                .clone()
                .ok_or("invalid action: redirect without to_user_id")?,
            remark: row.remark.clone(),
        },
        other => return Err(format!("invalid action: unknown action {other}")),
    })
}

/// Records `done` rows in batches (group commit, `batching`): whatever arrived while the
/// previous batch was committing goes into the next one.
async fn record_loop(pool: PgPool, corp_id: String, mut rx: mpsc::Receiver<Done>) {
    while let Some(batch) = batching::next_batch(&mut rx, RECORD_BATCH).await {
        let ids: Vec<i64> = batch.iter().map(|(id, _)| *id).collect();
        match store::record_done(&pool, &corp_id, &ids).await {
            Ok(changed) => {
                for (id, reply) in batch {
                    let _ = reply.send(Ok(changed.contains(&id)));
                }
            }
            Err(e) => {
                for (_, reply) in batch {
                    let _ = reply.send(Err(sqlx::Error::Protocol(format!(
                        "recording actions done: {e}"
                    ))));
                }
            }
        }
    }
}

/// The next notification; never resolves without a listener.
async fn recv(listener: &mut Option<PgListener>) -> sqlx::Result<()> {
    match listener {
        Some(l) => l.try_recv().await.map(|_| ()),
        None => std::future::pending().await,
    }
}
