-- Reporting (issue 6): stable, documented views for DBAs, and two least-privilege roles. The views
-- are public contract (docs/schema.md): columns are only ever added, never renamed or removed.
-- They run with their owner's rights, so dingsync_report needs no access to the tables.

-- Approval turnaround per organisation, template and month. The month is the calendar month in
-- Asia/Shanghai (Beijing time), which is how Chinese companies close their books: an approval
-- started at 2026-01-31 20:00 UTC counts for February.
CREATE VIEW dingsync.report_turnaround AS
SELECT corp_id,
       process_code,
       date_trunc('month', created_at AT TIME ZONE 'Asia/Shanghai')::date AS month,
       count(*) AS started,
       count(*) FILTER (WHERE status IN ('COMPLETED', 'TERMINATED', 'CANCELED')) AS finished,
       count(*) FILTER (WHERE status = 'COMPLETED' AND result = 'agree') AS approved,
       count(*) FILTER (WHERE status = 'COMPLETED' AND result = 'refuse') AS refused,
       count(*) FILTER (WHERE status = 'TERMINATED') AS terminated,
       count(*) FILTER (WHERE status = 'CANCELED') AS canceled,
       round(avg(extract(epoch FROM finished_at - created_at) / 3600), 2) AS avg_hours,
       round((percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at) / 3600))::numeric, 2) AS p50_hours,
       round((percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at) / 3600))::numeric, 2) AS p90_hours
FROM dingsync.approvals
WHERE created_at IS NOT NULL
GROUP BY corp_id, process_code, month;

COMMENT ON VIEW dingsync.report_turnaround IS 'Public (reporting): approvals per organisation, template and Beijing-time month of created_at: how many started, how they ended, and how long finished ones took. Approvals whose start time is not known yet are left out.';
COMMENT ON COLUMN dingsync.report_turnaround.corp_id IS 'DingTalk organisation (CorpId).';
COMMENT ON COLUMN dingsync.report_turnaround.process_code IS 'Approval template code (PROC-...); null while not known.';
COMMENT ON COLUMN dingsync.report_turnaround.month IS 'First day of the month the approvals were started in, in Asia/Shanghai time (not UTC).';
COMMENT ON COLUMN dingsync.report_turnaround.started IS 'Approvals started in the month.';
COMMENT ON COLUMN dingsync.report_turnaround.finished IS 'Of those, how many are finished (COMPLETED, TERMINATED or CANCELED) by now.';
COMMENT ON COLUMN dingsync.report_turnaround.approved IS 'Of those, COMPLETED with result agree.';
COMMENT ON COLUMN dingsync.report_turnaround.refused IS 'Of those, COMPLETED with result refuse.';
COMMENT ON COLUMN dingsync.report_turnaround.terminated IS 'Of those, TERMINATED (withdrawn/revoked).';
COMMENT ON COLUMN dingsync.report_turnaround.canceled IS 'Of those, CANCELED.';
COMMENT ON COLUMN dingsync.report_turnaround.avg_hours IS 'Mean hours from created_at to finished_at over approvals with a finished_at (2 decimals).';
COMMENT ON COLUMN dingsync.report_turnaround.p50_hours IS 'Median hours from created_at to finished_at (continuous percentile, 2 decimals).';
COMMENT ON COLUMN dingsync.report_turnaround.p90_hours IS '90th percentile of hours from created_at to finished_at (continuous percentile, 2 decimals).';

-- What is waiting for whom (approval_tasks_userid_status_idx serves a filter on corp_id + userid).
CREATE VIEW dingsync.report_pending_tasks AS
SELECT t.corp_id,
       t.userid,
       t.process_instance_id,
       a.title,
       a.process_code,
       t.created_at,
       now() - t.created_at AS age
FROM dingsync.approval_tasks t
LEFT JOIN dingsync.approvals a
       ON a.corp_id = t.corp_id AND a.process_instance_id = t.process_instance_id
WHERE t.status IN ('NEW', 'RUNNING');

COMMENT ON VIEW dingsync.report_pending_tasks IS 'Public (reporting): approver tasks still open (status NEW or RUNNING), one row per task, with the approval they belong to.';
COMMENT ON COLUMN dingsync.report_pending_tasks.corp_id IS 'DingTalk organisation (CorpId).';
COMMENT ON COLUMN dingsync.report_pending_tasks.userid IS 'userid of the approver the task waits for.';
COMMENT ON COLUMN dingsync.report_pending_tasks.process_instance_id IS 'The approval the task belongs to.';
COMMENT ON COLUMN dingsync.report_pending_tasks.title IS 'Title of the approval.';
COMMENT ON COLUMN dingsync.report_pending_tasks.process_code IS 'Approval template code (PROC-...).';
COMMENT ON COLUMN dingsync.report_pending_tasks.created_at IS 'When the task was assigned.';
COMMENT ON COLUMN dingsync.report_pending_tasks.age IS 'How long the task has been waiting (now() - created_at).';

-- Is the outbox keeping up? p50/p90 only for created rows: the time an app waits for its approval.
CREATE VIEW dingsync.report_outbox_health AS
SELECT corp_id,
       state,
       count(*) AS row_count,
       min(created_at) AS oldest_created_at,
       max(attempts) AS max_attempts,
       round((percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM done_at - created_at))
              FILTER (WHERE state = 'created' AND done_at IS NOT NULL))::numeric, 3) AS p50_seconds_to_done,
       round((percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM done_at - created_at))
              FILTER (WHERE state = 'created' AND done_at IS NOT NULL))::numeric, 3) AS p90_seconds_to_done
FROM dingsync.outbox
GROUP BY corp_id, state;

COMMENT ON VIEW dingsync.report_outbox_health IS 'Public (reporting): outbox rows per organisation and state, the oldest of them, and for created rows how long creation took.';
COMMENT ON COLUMN dingsync.report_outbox_health.corp_id IS 'DingTalk organisation (CorpId).';
COMMENT ON COLUMN dingsync.report_outbox_health.state IS 'Outbox state: pending, sending, unknown, created, failed or cancelled.';
COMMENT ON COLUMN dingsync.report_outbox_health.row_count IS 'Number of outbox rows in this state.';
COMMENT ON COLUMN dingsync.report_outbox_health.oldest_created_at IS 'created_at of the oldest row in this state (for pending/unknown: how far behind the worker is).';
COMMENT ON COLUMN dingsync.report_outbox_health.max_attempts IS 'Highest attempts of a row in this state.';
COMMENT ON COLUMN dingsync.report_outbox_health.p50_seconds_to_done IS 'State created only: median seconds from created_at to done_at (3 decimals); null for other states.';
COMMENT ON COLUMN dingsync.report_outbox_health.p90_seconds_to_done IS 'State created only: 90th percentile of seconds from created_at to done_at (3 decimals); null for other states.';

-- How far dingsync is behind DingTalk, per organisation served here (dingsync.corps). Each figure
-- is an index lookup per organisation, so the view stays cheap on large tables: the newest event
-- is the last one to arrive (highest id, primary key), not a scan of received_at.
CREATE VIEW dingsync.report_sync_lag AS
SELECT c.corp_id,
       w.detail_wanted,
       now() - w.oldest_detail_wanted_at AS oldest_detail_wanted_age,
       o.open_approvals,
       e.newest_event_received_at
FROM dingsync.corps c
CROSS JOIN LATERAL (
    SELECT count(*) AS detail_wanted, min(a.detail_wanted_at) AS oldest_detail_wanted_at
    FROM dingsync.approvals a
    WHERE a.corp_id = c.corp_id AND a.detail_wanted_at IS NOT NULL
) w
CROSS JOIN LATERAL (
    SELECT count(*) AS open_approvals
    FROM dingsync.approvals a
    WHERE a.corp_id = c.corp_id AND a.status IN ('NEW', 'RUNNING')
) o
LEFT JOIN LATERAL (
    SELECT ev.received_at AS newest_event_received_at
    FROM dingsync.events ev
    WHERE ev.corp_id = c.corp_id
    ORDER BY ev.id DESC
    LIMIT 1
) e ON true;

COMMENT ON VIEW dingsync.report_sync_lag IS 'Public (reporting): per organisation served from this database (dingsync.corps), how much detail fetching is waiting, how many approvals are open, and when the last event arrived.';
COMMENT ON COLUMN dingsync.report_sync_lag.corp_id IS 'DingTalk organisation (CorpId), from dingsync.corps.';
COMMENT ON COLUMN dingsync.report_sync_lag.detail_wanted IS 'Approvals an event marked for a detail fetch (processinstance/get) that has not applied yet.';
COMMENT ON COLUMN dingsync.report_sync_lag.oldest_detail_wanted_age IS 'How long the oldest of those has waited; null when none waits. Seconds are normal (bursts are coalesced); minutes mean the details job is behind or failing (see dingsync.job_runs).';
COMMENT ON COLUMN dingsync.report_sync_lag.open_approvals IS 'Approvals with status NEW or RUNNING.';
COMMENT ON COLUMN dingsync.report_sync_lag.newest_event_received_at IS 'received_at of the last event to arrive (highest events.id); null when none is stored. Long silence on a working day can mean the callback is not reaching dingsync.';

-- Least-privilege roles. Roles are global to the PostgreSQL cluster and may already exist (another
-- database on the server, a DBA who created them first); the grants are per database. A migrating
-- user without CREATEROLE must not stop the daemon: it gets a NOTICE with the script to run by
-- hand instead. The roles cannot log in: a DBA grants them to login roles (README, "For DBAs").
--   dingsync_app:    what a business app needs: read approvals and tasks, request approvals
--                    through the outbox. Not: change approvals, read the access token.
--   dingsync_report: the report_* views only.
DO $roles$
DECLARE
    grants text := $grants$
        GRANT USAGE ON SCHEMA dingsync TO dingsync_app, dingsync_report;
        GRANT SELECT ON dingsync.approvals, dingsync.approval_tasks, dingsync.outbox TO dingsync_app;
        GRANT INSERT ON dingsync.outbox TO dingsync_app;
        -- default_corp_id() (the outbox's corp_id default) reads the organisations served here.
        GRANT SELECT ON dingsync.corps TO dingsync_app;
        GRANT EXECUTE ON FUNCTION dingsync.request_approval(text, text, text, jsonb, bigint, jsonb, text[], text, text) TO dingsync_app;
        GRANT SELECT ON dingsync.report_turnaround, dingsync.report_pending_tasks,
                        dingsync.report_outbox_health, dingsync.report_sync_lag TO dingsync_report;
    $grants$;
    role text;
BEGIN
    FOREACH role IN ARRAY ARRAY['dingsync_app', 'dingsync_report'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = role) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', role);
            EXCEPTION
                WHEN insufficient_privilege THEN
                    RAISE NOTICE 'dingsync: not allowed to create role %; as a superuser or CREATEROLE user, run in this database: CREATE ROLE dingsync_app NOLOGIN; CREATE ROLE dingsync_report NOLOGIN; %',
                        role, grants;
                    RETURN;
                -- Another database on this server (e.g. tests, replicas of another deployment)
                -- created it at the same moment.
                WHEN duplicate_object OR unique_violation THEN
                    NULL;
            END;
        END IF;
    END LOOP;
    EXECUTE grants;
END;
$roles$;
