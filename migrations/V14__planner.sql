-- The planner (src/planner.rs): an open approval is re-checked a bounded number of times over its
-- life instead of at a cadence, so each approval counts its checks.
ALTER TABLE dingsync.approvals
    ADD COLUMN sweep_checks smallint NOT NULL DEFAULT 0,
    ADD COLUMN gap_checks   smallint NOT NULL DEFAULT 0,
    DROP CONSTRAINT approvals_snapshot_source_check,
    ADD CONSTRAINT approvals_snapshot_source_check
        CHECK (snapshot_source IN ('details', 'sweep', 'backfill', 'gap', 'poll'));

-- No new index: the gap check, the sweep and polling read the open approvals of one organisation
-- through approvals_next_check_idx (partial, NEW/RUNNING, V7) and their running tasks through
-- approval_tasks_instance_idx. An index on last_event_at would make every event's update of its
-- approval a non-HOT update (the ingest path).

COMMENT ON COLUMN dingsync.approvals.sweep_checks IS 'Internal: how many times the sweep has re-checked this approval while it was open (at most reconcile.sweep_checks).';
COMMENT ON COLUMN dingsync.approvals.gap_checks IS 'Internal: how many times the gap check has fetched this approval (open, no running task, events quiet; at most reconcile.gap_checks).';
COMMENT ON COLUMN dingsync.approvals.next_check_at IS 'Internal: a fetch that failed or was refused is not retried by the sweep, gap check or polling before this time; null = no hold.';
COMMENT ON COLUMN dingsync.approvals.snapshot_source IS 'Provenance: which job fetched the applied snapshot: details (the one fetch after the first event), sweep (open approval re-checked), gap (a missing event suspected), poll (pushes missing) or backfill (found by listids).';
