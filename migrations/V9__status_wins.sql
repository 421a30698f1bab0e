-- The forward-only status rule, written once. Every statement that folds a status into
-- dingsync.approvals or dingsync.approval_tasks (events, processinstance/get snapshots, the
-- outbox's link) asks this function whether the new status replaces the stored one, and moves
-- the status's companions (result, finish time, remark, next check) by the same answer. dingsync's
-- Rust code folds a batch's changes by the same rule (event::status_wins); a test checks that the
-- two agree for every pair of statuses.
--
-- NULL means "no status": a change that carries none (an event that only marks the row) never
-- wins, and any known status wins over none. Both status columns are NOT NULL, so a stored NULL
-- only occurs while folding changes that have not been stored yet.
--
-- Both functions are LANGUAGE sql IMMUTABLE with a single-expression body and no SET clause, so
-- the planner inlines them into the calling statement: the ingest hot path evaluates the rule per
-- row as a plain expression, with no function call.

-- A missing status has no rank (it ranked as a terminal state before, through the ELSE branch:
-- nothing relied on that, both status columns being NOT NULL, but it contradicted the rule).
CREATE OR REPLACE FUNCTION dingsync.status_rank(status text) RETURNS int
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN status IS NULL THEN NULL
                WHEN status = 'NEW' THEN 0
                WHEN status IN ('RUNNING', 'PAUSED') THEN 1
                ELSE 2 END;
COMMENT ON FUNCTION dingsync.status_rank(text) IS 'Order of approval/task statuses: NEW 0, RUNNING/PAUSED 1, COMPLETED/TERMINATED/CANCELED (and any status dingsync does not know) 2; NULL (no status) has no rank. Compare statuses with dingsync.status_wins.';

-- ties_win is the one difference between the writers: events keep the stored row on a tie (the
-- first terminal state seen wins), a snapshot is DingTalk's truth and takes a tie.
CREATE FUNCTION dingsync.status_wins(new_status text, old_status text, ties_win boolean)
    RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN new_status IS NOT NULL
       AND (old_status IS NULL
            OR dingsync.status_rank(new_status) > dingsync.status_rank(old_status)
            OR (ties_win IS TRUE
                AND dingsync.status_rank(new_status) = dingsync.status_rank(old_status)));
COMMENT ON FUNCTION dingsync.status_wins(text, text, boolean) IS 'Whether new_status replaces the stored old_status: it must rank higher (dingsync.status_rank), or the same when ties_win. A NULL new_status (no status) never wins; any status wins over a NULL old_status. Never returns NULL. dingsync moves result and finish time with the status by the same answer.';
