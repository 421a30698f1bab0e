//! When the reconcile jobs and the retention job run: cron definitions
//! (`[scheduler]`, six-field strings, seconds first, UTC), the guard that runs each job on one
//! replica at a time and each tick once, and the run log `dingsync.job_runs`. A tick only
//! triggers work; what a job does lives in `reconcile` and `retention`.
//!
//! The guard, per run: (1) the job's session advisory lock on a dedicated connection, so two runs
//! of one job never overlap, whichever replicas they are on; (2) a row in `job_runs` unique per
//! (job, tick), so a tick that every replica's scheduler fires runs once. A failing run is
//! recorded (`failed` + error) and the next tick runs as usual. On shutdown no new run starts;
//! runs in progress stop between items (each item is committed on its own, so stopping there is
//! safe) and are recorded `cancelled`; `stop` waits for them.

use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, SubsecRound, Utc};
use serde_json::json;
use tokio_cron_scheduler::{Job as CronJob, JobScheduler};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{self, SchedulerConfig},
    jobs::{Context, Counts},
    reconcile::{self, backfill, failed, forms},
    retention,
    store::job_runs,
};

/// How long `stop` waits for runs in progress to reach a safe point.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// The scheduled jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Job {
    Details,
    Sweep,
    Backfill,
    Failed,
    Retention,
    Forms,
}

impl Job {
    pub const ALL: [Job; 6] = [
        Job::Details,
        Job::Sweep,
        Job::Backfill,
        Job::Failed,
        Job::Retention,
        Job::Forms,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Job::Details => "details",
            Job::Sweep => "sweep",
            Job::Backfill => "backfill",
            Job::Failed => "failed",
            Job::Retention => "retention",
            Job::Forms => "forms",
        }
    }

    fn schedule(self, config: &SchedulerConfig) -> &str {
        match self {
            Job::Details => &config.details,
            Job::Sweep => &config.sweep,
            Job::Backfill => &config.backfill,
            Job::Failed => &config.failed,
            Job::Retention => &config.retention,
            Job::Forms => &config.forms,
        }
    }

    async fn work(self, ctx: &Context, shutdown: &CancellationToken) -> anyhow::Result<Counts> {
        match self {
            Job::Details => reconcile::details(ctx, shutdown).await,
            Job::Sweep => reconcile::sweep(ctx, shutdown).await,
            Job::Backfill => backfill::scheduled(ctx, shutdown).await,
            Job::Failed => failed::planned(ctx, shutdown).await,
            Job::Retention => retention::prune(ctx, shutdown).await,
            Job::Forms => forms::scheduled(ctx, shutdown).await,
        }
    }
}

/// What became of one run.
#[derive(Debug, Clone, PartialEq)]
pub enum Ran {
    /// This replica ran it: the `job_runs` id, the outcome, the counts and the error.
    Done {
        id: i64,
        outcome: &'static str,
        counts: Counts,
        error: Option<String>,
    },
    /// Another run of the job was in progress (any replica): nothing done.
    Busy,
    /// Another replica already ran this tick.
    TickTaken,
}

/// The running scheduler; `stop` takes it down.
pub struct Scheduler {
    cron: JobScheduler,
    runs: TaskTracker,
}

/// Starts the cron jobs. Ticks stop when `shutdown` fires; call [`Scheduler::stop`] to wait for
/// the runs in progress.
pub async fn start(
    ctx: Context,
    config: &SchedulerConfig,
    replica: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<Scheduler> {
    let cron = JobScheduler::new()
        .await
        .context("creating the scheduler")?;
    let runs = TaskTracker::new();
    for job in Job::ALL {
        let schedule = job.schedule(config).to_string();
        let parsed = config::parse_schedule(&schedule).map_err(anyhow::Error::msg)?;
        let (ctx, runs, shutdown, replica) = (
            ctx.clone(),
            runs.clone(),
            shutdown.clone(),
            replica.to_string(),
        );
        let cron_job = CronJob::new_async(schedule.as_str(), move |_, _| {
            let (ctx, shutdown, replica) = (ctx.clone(), shutdown.clone(), replica.clone());
            // Every replica computes the same tick: the latest scheduled time not after now.
            let now = Utc::now().trunc_subsecs(0);
            let tick = parsed
                .find_previous_occurrence(&now, true)
                .unwrap_or(now);
            if !shutdown.is_cancelled() {
                runs.spawn(async move {
                    if let Err(e) = run(&ctx, job, tick, &replica, &shutdown).await {
                        tracing::error!(job = job.name(), error = %format!("{e:#}"), "job run could not be recorded");
                    }
                });
            }
            Box::pin(async {})
        })
        .with_context(|| format!("scheduler.{}", job.name()))?;
        cron.add(cron_job).await.context("adding a job")?;
    }
    cron.start().await.context("starting the scheduler")?;
    tracing::info!(
        details = %config.details, sweep = %config.sweep, backfill = %config.backfill,
        failed = %config.failed, retention = %config.retention, forms = %config.forms, "scheduler started (UTC cron, six fields)"
    );
    Ok(Scheduler { cron, runs })
}

impl Scheduler {
    /// Stops ticking and waits (bounded) for runs in progress; the shared shutdown token has
    /// told them to stop between items.
    pub async fn stop(mut self) {
        if let Err(e) = self.cron.shutdown().await {
            tracing::warn!(error = %e, "stopping the scheduler");
        }
        self.runs.close();
        if tokio::time::timeout(STOP_WAIT, self.runs.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "job runs still in progress after {STOP_WAIT:?}; abandoning them (the next run marks them abandoned)"
            );
        }
    }
}

/// Runs `job` now, under the same guard as a tick (the tick is now), and waits for it: for
/// operators and tests.
pub async fn run_job_now(
    ctx: &Context,
    job: Job,
    replica: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Ran> {
    let tick = reconcile_clock(ctx).await?;
    run(ctx, job, tick, replica, shutdown).await
}

async fn reconcile_clock(ctx: &Context) -> anyhow::Result<DateTime<Utc>> {
    Ok(crate::store::approvals::clock(ctx.pool()).await?)
}

/// One guarded run: lease, claim the tick, work, record. Errors are only those of the guard and
/// the log itself; the work's error is recorded as the run's outcome.
async fn run(
    ctx: &Context,
    job: Job,
    tick: DateTime<Utc>,
    replica: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Ran> {
    let (corp, pool) = (ctx.corp_id(), ctx.pool());
    let holder = format!("{replica}:{}", crate::crypto::random_nonce(6));
    if !job_runs::try_lease(pool, corp, job.name(), &holder).await? {
        tracing::debug!(
            job = job.name(),
            "previous run still in progress; tick skipped"
        );
        return Ok(Ran::Busy);
    }
    let abandoned = job_runs::abandon_stale(pool, corp, job.name()).await?;
    if abandoned > 0 {
        tracing::warn!(
            job = job.name(),
            abandoned,
            "found runs of a process that died"
        );
    }
    let Some(id) = job_runs::begin(pool, corp, job.name(), tick, replica).await? else {
        job_runs::release_lease(pool, corp, job.name(), &holder).await?;
        return Ok(Ran::TickTaken);
    };
    let started = std::time::Instant::now();
    // The job stops between items on shutdown, or when its lease is lost (not renewed in time:
    // another run may have taken it, and two runs must not overlap).
    let stop = shutdown.child_token();
    let renewing = tokio::spawn(renew(
        pool.clone(),
        corp.to_owned(),
        job.name(),
        holder.clone(),
        stop.clone(),
    ));
    // Dropped with this future (a run abandoned mid-way), it stops the renewing too.
    let stop_renewing = stop.clone().drop_guard();
    let result = job.work(ctx, &stop).await;
    let stopped = stop.is_cancelled();
    drop(stop_renewing);
    renewing.abort();
    let (outcome, counts, error) = match result {
        Ok(counts) if stopped => ("cancelled", counts, None),
        Ok(counts) => ("ok", counts, None),
        Err(e) => ("failed", Counts::new(), Some(format!("{e:#}"))),
    };
    crate::metrics::job_run(job.name(), outcome, started.elapsed());
    match &error {
        Some(e) => tracing::warn!(job = job.name(), run = id, error = %e, "job run failed"),
        None => {
            tracing::info!(job = job.name(), run = id, outcome, ms = started.elapsed().as_millis() as u64, counts = %json!(counts), "job run finished")
        }
    }
    job_runs::finish(pool, corp, id, outcome, &json!(counts), error.as_deref()).await?;
    job_runs::release_lease(pool, corp, job.name(), &holder).await?;
    Ok(Ran::Done {
        id,
        outcome,
        counts,
        error,
    })
}

/// Renews the lease of a running job every third of its length; cancels `stop` when the lease is
/// no longer this run's or cannot be renewed before it would lapse.
async fn renew(
    pool: sqlx::PgPool,
    corp: String,
    job: &'static str,
    holder: String,
    stop: CancellationToken,
) {
    let every = job_runs::LEASE / 3;
    let mut renewed = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match job_runs::renew_lease(&pool, &corp, job, &holder).await {
            Ok(true) => renewed = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::warn!(job, "job lease lost to another run; stopping this one");
                stop.cancel();
                return;
            }
            Err(e) if renewed.elapsed() + every < job_runs::LEASE => {
                tracing::warn!(job, error = %e, "renewing the job lease failed; retrying");
            }
            Err(e) => {
                tracing::warn!(job, error = %e, "job lease not renewed in time; stopping the run");
                stop.cancel();
                return;
            }
        }
    }
}

/// This process, as `job_runs.replica` names it.
pub fn replica_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    format!(
        "{host}:{}:{}",
        std::process::id(),
        crate::crypto::random_nonce(6)
    )
}
