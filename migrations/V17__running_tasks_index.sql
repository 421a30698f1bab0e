-- The gap check (src/planner.rs, store::approvals::gap_page) looks for finished approvals that
-- still have a RUNNING task in the database: that task's end event went missing. Finished
-- approvals are most of the table; running tasks are few (the ones waiting for someone now), so
-- the search starts from them, through this partial index, which holds only running tasks.
CREATE INDEX approval_tasks_running_idx ON dingsync.approval_tasks (corp_id, process_instance_id)
    WHERE status = 'RUNNING';
