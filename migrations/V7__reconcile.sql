-- Reconciliation (issue 5): events are hints, DingTalk's API is the truth. This migration adds the
-- scheduler's run log, the cursors of resumable jobs, and what approvals need to be checked
-- against processinstance/get snapshots. Internal tables: documented, not part of the public
-- contract. (V6 belongs to the outbox.)

-- One row per job run. The unique (corp_id, job, tick_at) row is the run-once-per-tick guard:
-- every replica's scheduler fires for the same cron tick, the first to insert the row runs it.
CREATE TABLE dingsync.job_runs (
    corp_id     text        NOT NULL,
    id          bigint      GENERATED ALWAYS AS IDENTITY,
    job         text        NOT NULL,
    tick_at     timestamptz NOT NULL,
    replica     text        NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz,
    outcome     text        NOT NULL DEFAULT 'running',
    counts      jsonb       NOT NULL DEFAULT '{}',
    error       text,
    PRIMARY KEY (corp_id, id),
    CONSTRAINT job_runs_tick_unique UNIQUE (corp_id, job, tick_at),
    CONSTRAINT job_runs_outcome_check
        CHECK (outcome IN ('running', 'ok', 'failed', 'cancelled', 'abandoned'))
);
-- Retention deletes by age; rows arrive in started_at order.
CREATE INDEX job_runs_started_at_idx ON dingsync.job_runs USING brin (started_at);

COMMENT ON TABLE dingsync.job_runs IS 'Internal: one row per scheduled job run (details, sweep, backfill, failed), whichever replica ran it. Safe to prune by started_at.';
COMMENT ON COLUMN dingsync.job_runs.corp_id IS 'DingTalk organisation (CorpId) the job ran for.';
COMMENT ON COLUMN dingsync.job_runs.id IS 'Run number (identity).';
COMMENT ON COLUMN dingsync.job_runs.job IS 'Job name: details, sweep, backfill or failed.';
COMMENT ON COLUMN dingsync.job_runs.tick_at IS 'The cron tick the run belongs to (a manual run: the time it was asked for). Unique per job: a tick runs on one replica only.';
COMMENT ON COLUMN dingsync.job_runs.replica IS 'Which dingsync process ran it (host:pid:random).';
COMMENT ON COLUMN dingsync.job_runs.started_at IS 'When the run started.';
COMMENT ON COLUMN dingsync.job_runs.finished_at IS 'When the run ended; null while running.';
COMMENT ON COLUMN dingsync.job_runs.outcome IS 'running, ok, failed (see error), cancelled (stopped by shutdown between items) or abandoned (its process died; found by the next run).';
COMMENT ON COLUMN dingsync.job_runs.counts IS 'What the run did, e.g. {"fetched": 12, "applied": 12, "failed": 0}.';
COMMENT ON COLUMN dingsync.job_runs.error IS 'Why the run failed (no secrets, no personal data).';

-- Cursors of resumable jobs, e.g. the backfill of one process_code: an interrupted run resumes
-- from here instead of listing finished windows again.
CREATE TABLE dingsync.sync_state (
    corp_id    text        NOT NULL,
    name       text        NOT NULL,
    scope      text        NOT NULL,
    state      jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (corp_id, name, scope)
);
COMMENT ON TABLE dingsync.sync_state IS 'Internal: progress of resumable jobs (backfill cursor per process_code).';
COMMENT ON COLUMN dingsync.sync_state.corp_id IS 'DingTalk organisation (CorpId).';
COMMENT ON COLUMN dingsync.sync_state.name IS 'Which job the state belongs to, e.g. backfill.';
COMMENT ON COLUMN dingsync.sync_state.scope IS 'What within the job, e.g. the process_code being backfilled.';
COMMENT ON COLUMN dingsync.sync_state.state IS 'The cursor as JSON, e.g. {"since_ms":..,"window_start_ms":..,"window_end_ms":..,"cursor":..,"done_until_ms":..}.';
COMMENT ON COLUMN dingsync.sync_state.updated_at IS 'When the cursor last moved.';

-- What a processinstance/get snapshot brings that no event carries, and when to check again.
ALTER TABLE dingsync.approvals
    ADD COLUMN operation_records jsonb,
    ADD COLUMN snapshot_at       timestamptz,
    ADD COLUMN snapshot_source   text,
    ADD COLUMN next_check_at     timestamptz,
    ADD CONSTRAINT approvals_snapshot_source_check
        CHECK (snapshot_source IN ('details', 'sweep', 'backfill'));

-- The sweep's queue: open approvals by when they are due (never checked = null = due first).
CREATE INDEX approvals_next_check_idx ON dingsync.approvals (corp_id, next_check_at NULLS FIRST)
    WHERE status IN ('NEW', 'RUNNING');

COMMENT ON COLUMN dingsync.approvals.operation_records IS 'Operation records from the last applied snapshot (processinstance/get operation_records, as received; times are Beijing-time strings).';
COMMENT ON COLUMN dingsync.approvals.snapshot_at IS 'Provenance: when the applied processinstance/get snapshot was requested (DingTalk''s state as of then). An older snapshot never replaces a newer one. form_values, originator_dept_id and operation_records come only from snapshots; status/result/finished_at come from events until a snapshot corrects them.';
COMMENT ON COLUMN dingsync.approvals.snapshot_source IS 'Provenance: which job fetched the applied snapshot: details (after an event), sweep (open approval re-checked) or backfill (found by listids).';
COMMENT ON COLUMN dingsync.approvals.next_check_at IS 'Internal: when the sweep re-checks this approval while it is NEW/RUNNING (young often, old rarely); null = not checked yet.';
