-- Actions: business apps act on running approvals from SQL (agree, refuse, redirect a task;
-- terminate an instance; comment on one) by inserting rows (or calling dingsync.request_action);
-- dingsync carries each out in DingTalk exactly once. DingTalk's action APIs have no idempotency
-- key (docs/dingtalk.md §12.6), so exactly-once is built as for the outbox: a unique idempotency_key
-- per organisation, claims with a lease, and a read-back of the instance (never a blind resend)
-- when an action may have reached DingTalk without an answer.

CREATE TABLE dingsync.actions (
    corp_id             text        NOT NULL DEFAULT dingsync.default_corp_id(),
    id                  bigint      GENERATED ALWAYS AS IDENTITY,
    idempotency_key     text        NOT NULL,
    action              text        NOT NULL,
    process_instance_id text        NOT NULL,
    task_id             bigint,
    actor_user_id       text,
    as_system           boolean     NOT NULL DEFAULT false,
    to_user_id          text,
    remark              text,
    state               text        NOT NULL DEFAULT 'pending',
    attempts            int         NOT NULL DEFAULT 0,
    -- For pending/unknown rows: when to act next. For a claimed row (sending, or unknown being
    -- read back): the end of the claim's lease. One column, so one index finds all due work.
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    sent_at             timestamptz,
    last_error          text,
    superseded_by       text,
    superseded_how      text,
    superseded_at       timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    done_at             timestamptz,
    -- corp_id leads every key: it is the distribution key on a sharded PostgreSQL (as the outbox).
    PRIMARY KEY (corp_id, id),
    CONSTRAINT actions_idempotency_key_unique UNIQUE (corp_id, idempotency_key),
    CONSTRAINT actions_state_check
        CHECK (state IN ('pending', 'sending', 'unknown', 'done', 'failed', 'superseded', 'cancelled')),
    CONSTRAINT actions_action_check
        CHECK (action IN ('agree', 'refuse', 'redirect', 'terminate', 'comment')),
    CONSTRAINT actions_idempotency_key_check CHECK (length(idempotency_key) BETWEEN 1 AND 256),
    CONSTRAINT actions_process_instance_id_check CHECK (btrim(process_instance_id) <> ''),
    -- agree, refuse and redirect act on one task; terminate and comment on the instance.
    CONSTRAINT actions_task_check
        CHECK ((action IN ('agree', 'refuse', 'redirect')) = (task_id IS NOT NULL)),
    -- Every action has a person acting, except a terminate by the system.
    CONSTRAINT actions_actor_check
        CHECK (CASE WHEN as_system THEN action = 'terminate' AND actor_user_id IS NULL
                    ELSE coalesce(btrim(actor_user_id), '') <> '' END),
    CONSTRAINT actions_to_user_check
        CHECK ((action = 'redirect') = (to_user_id IS NOT NULL)
               AND (to_user_id IS NULL OR (btrim(to_user_id) <> '' AND to_user_id <> actor_user_id))),
    -- DingTalk's limits (docs/dingtalk.md §12): 1024 characters of remark or comment text, 256
    -- for a redirect's remark; a comment needs its text.
    CONSTRAINT actions_remark_check
        CHECK (length(remark) <= CASE WHEN action = 'redirect' THEN 256 ELSE 1024 END
               AND (action <> 'comment' OR btrim(coalesce(remark, '')) <> '')),
    CONSTRAINT actions_attempts_check CHECK (attempts >= 0),
    CONSTRAINT actions_superseded_check
        CHECK ((state = 'superseded') = (superseded_how IS NOT NULL))
);

-- The worker's queue: only rows with work left, in the order they fall due.
CREATE INDEX actions_due_idx ON dingsync.actions (corp_id, next_attempt_at)
    WHERE state IN ('pending', 'sending', 'unknown');
-- Apps and operators look rows up by id alone, and list them by state.
CREATE INDEX actions_id_idx ON dingsync.actions (id);
CREATE INDEX actions_state_idx ON dingsync.actions (corp_id, state, id);
-- An instance's actions: the read-back of a comment counts the ones already done.
CREATE INDEX actions_instance_idx ON dingsync.actions (corp_id, process_instance_id);

COMMENT ON TABLE dingsync.actions IS 'Actions of business apps on approvals: insert a row (or call dingsync.request_action) and dingsync carries it out in DingTalk exactly once (agree, refuse or redirect a task; terminate or comment on an instance), then sets state done, failed or superseded. Apps write the request columns; dingsync writes the rest.';
COMMENT ON COLUMN dingsync.actions.corp_id IS 'DingTalk organisation of the approval; defaults to the only organisation this database serves.';
COMMENT ON COLUMN dingsync.actions.id IS 'Row id; the payload of the dingsync_action_done notification.';
COMMENT ON COLUMN dingsync.actions.idempotency_key IS 'The app''s own key for this action (e.g. ''erp-approve-4711''), unique per organisation: the same key twice is the same action, never a second one in DingTalk.';
COMMENT ON COLUMN dingsync.actions.action IS 'agree or refuse (a task, as its approver), redirect (a task, to to_user_id), terminate (the instance, by its originator or as the system), comment (the instance; remark is the text).';
COMMENT ON COLUMN dingsync.actions.process_instance_id IS 'The approval acted on; must be known to dingsync (dingsync.approvals).';
COMMENT ON COLUMN dingsync.actions.task_id IS 'agree, refuse, redirect: the task acted on (dingsync.approval_tasks.task_id, of this approval); null for terminate and comment.';
COMMENT ON COLUMN dingsync.actions.actor_user_id IS 'userid of the person acting: the task''s approver (agree, refuse, redirect; filled in from dingsync.approval_tasks when left out), the originator (terminate unless as_system), the commenter (comment).';
COMMENT ON COLUMN dingsync.actions.as_system IS 'terminate only: true ends the approval as the system (DingTalk''s isSystem) rather than as its originator; actor_user_id is then null.';
COMMENT ON COLUMN dingsync.actions.to_user_id IS 'redirect only: userid of the new approver.';
COMMENT ON COLUMN dingsync.actions.remark IS 'The approver''s opinion (agree, refuse; at most 1024 characters), the reason (terminate; 1024), the note (redirect; 256), or the comment''s text (comment; required, 1024).';
COMMENT ON COLUMN dingsync.actions.state IS 'pending (waiting to be sent), sending (call in flight), unknown (sent but unanswered: dingsync reads the approval back before anything else, never blindly resending), done (DingTalk carried it out), failed (see last_error), superseded (someone acted in DingTalk first: see superseded_by, superseded_how), cancelled (by an operator).';
COMMENT ON COLUMN dingsync.actions.attempts IS 'How many times the action was sent to DingTalk.';
COMMENT ON COLUMN dingsync.actions.next_attempt_at IS 'pending/unknown: when dingsync acts on the row next. sending: when its claim expires (a worker that stopped mid-send is then recovered).';
COMMENT ON COLUMN dingsync.actions.sent_at IS 'When the action was first sent; a comment found on read-back must be at least this recent.';
COMMENT ON COLUMN dingsync.actions.last_error IS 'failed: DingTalk''s code and message; otherwise why the latest attempt has not finished the action (transport problem, rate limit, paused allowance).';
COMMENT ON COLUMN dingsync.actions.superseded_by IS 'superseded: userid of who acted in DingTalk first, when DingTalk says (null for a task cancelled by the flow).';
COMMENT ON COLUMN dingsync.actions.superseded_how IS 'superseded: what happened first: the task was AGREE, REFUSE or REDIRECTED by superseded_by, or CANCELED; or the approval was TERMINATED, COMPLETED (agree/refuse) or CANCELED.';
COMMENT ON COLUMN dingsync.actions.superseded_at IS 'superseded: when that happened in DingTalk, when DingTalk says.';
COMMENT ON COLUMN dingsync.actions.created_at IS 'When the row was inserted.';
COMMENT ON COLUMN dingsync.actions.updated_at IS 'When dingsync last changed the row.';
COMMENT ON COLUMN dingsync.actions.done_at IS 'When the row reached done, failed, superseded or cancelled.';

-- Clear errors for bad requests, naming the field. The CHECK constraints above say the same for
-- the shape, but only by name; this trigger runs first and also checks the request against what
-- dingsync knows: the approval, its task, its approver and originator, and whether they are still
-- open. What dingsync knows of a finished task or approval is final (statuses only move forward,
-- migration V9), so refusing on it is safe; an approval that finishes after the insert is the
-- worker's to report (superseded).
CREATE FUNCTION dingsync.actions_validate() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, dingsync, pg_temp
AS $$
DECLARE
    problem  text;
    served   text;
    approval dingsync.approvals;
    task     dingsync.approval_tasks;
BEGIN
    -- The same key again: the unique constraint (ON CONFLICT, or request_action) answers it. The
    -- state checks below must not: the approval may have moved on since, by this very action.
    IF EXISTS (SELECT FROM dingsync.actions a
               WHERE a.corp_id = NEW.corp_id AND a.idempotency_key = NEW.idempotency_key) THEN
        RETURN NEW;
    END IF;
    IF NEW.corp_id IS NOT NULL
       AND NOT EXISTS (SELECT FROM dingsync.corps c WHERE c.corp_id = NEW.corp_id) THEN
        SELECT string_agg(c.corp_id, ', ' ORDER BY c.corp_id) INTO served FROM dingsync.corps c;
        RAISE EXCEPTION 'dingsync.actions: corp_id "%" is not served by this database (see dingsync.corps)', NEW.corp_id
            USING ERRCODE = 'check_violation',
                  HINT = format('This database serves: %s.', coalesce(served, 'no organisation yet; start dingsync once'));
    END IF;
    problem := coalesce(
        CASE WHEN NEW.idempotency_key IS NULL OR length(NEW.idempotency_key) NOT BETWEEN 1 AND 256
             THEN 'idempotency_key is required: 1 to 256 characters of the app''s own key for this action' END,
        CASE WHEN NEW.action IS NULL OR NEW.action NOT IN ('agree', 'refuse', 'redirect', 'terminate', 'comment')
             THEN format('action must be agree, refuse, redirect, terminate or comment, not %s', coalesce(quote_literal(NEW.action), 'NULL')) END,
        CASE WHEN NEW.process_instance_id IS NULL OR btrim(NEW.process_instance_id) = ''
             THEN 'process_instance_id is required (the approval acted on)' END);
    IF problem IS NULL THEN
        SELECT * INTO approval FROM dingsync.approvals ap
        WHERE ap.corp_id = NEW.corp_id AND ap.process_instance_id = NEW.process_instance_id;
        IF NOT FOUND THEN
            problem := format('process_instance_id %s is not known to dingsync (no row in dingsync.approvals for corp_id %s)',
                              NEW.process_instance_id, NEW.corp_id);
        END IF;
    END IF;
    IF problem IS NULL AND NEW.action IN ('agree', 'refuse', 'redirect') THEN
        IF NEW.task_id IS NULL THEN
            problem := format('task_id is required for %s (the task acted on; see dingsync.approval_tasks)', NEW.action);
        ELSE
            SELECT * INTO task FROM dingsync.approval_tasks t
            WHERE t.corp_id = NEW.corp_id AND t.task_id = NEW.task_id;
            IF NOT FOUND THEN
                problem := format('task_id %s is not known to dingsync (no row in dingsync.approval_tasks)', NEW.task_id);
            ELSIF task.process_instance_id <> NEW.process_instance_id THEN
                problem := format('task_id %s belongs to approval %s, not to process_instance_id %s',
                                  NEW.task_id, task.process_instance_id, NEW.process_instance_id);
            ELSIF task.status IN ('CANCELED', 'COMPLETED', 'TERMINATED') THEN
                problem := format('task_id %s is already %s%s: it can no longer be acted on',
                                  NEW.task_id, task.status, coalesce('/' || task.result, ''));
            ELSIF NEW.actor_user_id IS NULL AND task.userid IS NULL THEN
                problem := format('actor_user_id is required: the approver of task_id %s is not known yet', NEW.task_id);
            ELSIF NEW.actor_user_id IS NULL THEN
                -- On behalf of the task's approver: DingTalk takes only them (docs/dingtalk.md §12.2).
                NEW.actor_user_id := task.userid;
            ELSIF task.userid IS NOT NULL AND NEW.actor_user_id <> task.userid THEN
                problem := format('actor_user_id %s is not the approver of task_id %s (%s): only the approver can act on a task',
                                  NEW.actor_user_id, NEW.task_id, task.userid);
            END IF;
        END IF;
    ELSIF problem IS NULL AND NEW.task_id IS NOT NULL THEN
        problem := format('task_id must be NULL for %s: it acts on the whole approval', NEW.action);
    END IF;
    IF problem IS NULL THEN
        problem := coalesce(
            CASE WHEN NEW.action <> 'comment' AND approval.status IN ('COMPLETED', 'TERMINATED', 'CANCELED')
                 THEN format('process_instance_id %s is already %s%s: only a comment can still be added',
                             NEW.process_instance_id, approval.status, coalesce('/' || approval.result, '')) END,
            CASE WHEN NEW.action = 'comment' AND approval.status IN ('TERMINATED', 'CANCELED')
                 THEN format('process_instance_id %s is %s: DingTalk takes no comments on it', NEW.process_instance_id, approval.status) END,
            CASE WHEN NEW.as_system AND NEW.action <> 'terminate'
                 THEN 'as_system is only for terminate' END,
            CASE WHEN NEW.as_system AND NEW.actor_user_id IS NOT NULL
                 THEN 'actor_user_id must be NULL with as_system (the system ends the approval, no person)' END,
            CASE WHEN NEW.action = 'terminate' AND NOT NEW.as_system AND NEW.actor_user_id IS NULL
                 THEN 'actor_user_id is required for terminate: the originator (or pass as_system => true)' END,
            CASE WHEN NEW.action = 'terminate' AND NOT NEW.as_system
                      AND approval.originator_userid IS NOT NULL AND NEW.actor_user_id <> approval.originator_userid
                 THEN format('actor_user_id %s is not the originator of %s (%s): only the originator can terminate it (or pass as_system => true)',
                             NEW.actor_user_id, NEW.process_instance_id, approval.originator_userid) END,
            CASE WHEN NEW.action = 'comment' AND (NEW.actor_user_id IS NULL OR btrim(NEW.actor_user_id) = '')
                 THEN 'actor_user_id is required for comment (the userid the comment is written as)' END,
            CASE WHEN NEW.actor_user_id IS NOT NULL AND btrim(NEW.actor_user_id) = ''
                 THEN 'actor_user_id is empty' END,
            CASE WHEN NEW.action = 'redirect' AND (NEW.to_user_id IS NULL OR btrim(NEW.to_user_id) = '')
                 THEN 'to_user_id is required for redirect (the new approver)' END,
            CASE WHEN NEW.action = 'redirect' AND NEW.to_user_id = NEW.actor_user_id
                 THEN format('to_user_id %s is already the approver of task_id %s', NEW.to_user_id, NEW.task_id) END,
            CASE WHEN NEW.action <> 'redirect' AND NEW.to_user_id IS NOT NULL
                 THEN format('to_user_id must be NULL for %s (only redirect hands a task over)', NEW.action) END,
            CASE WHEN NEW.action = 'comment' AND btrim(coalesce(NEW.remark, '')) = ''
                 THEN 'remark is required for comment: it is the comment''s text' END,
            CASE WHEN NEW.action = 'redirect' AND length(NEW.remark) > 256
                 THEN format('remark has %s characters; DingTalk takes at most 256 for a redirect', length(NEW.remark)) END,
            CASE WHEN length(NEW.remark) > 1024
                 THEN format('remark has %s characters; DingTalk takes at most 1024', length(NEW.remark)) END);
    END IF;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'dingsync.actions: %', problem
            USING ERRCODE = 'check_violation',
                  HINT = 'See the README, "Acting on approvals", for each action''s fields.';
    END IF;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION dingsync.actions_validate() IS 'Trigger: refuses a malformed action naming the field, and one that what dingsync knows says DingTalk would refuse (unknown approval or task, not the approver or originator, already finished); fills in the task''s approver as actor_user_id when left out.';
CREATE TRIGGER actions_validate
    BEFORE INSERT ON dingsync.actions FOR EACH ROW EXECUTE FUNCTION dingsync.actions_validate();

-- Wakes the worker (LISTEN dingsync_actions) once per inserting statement; it also polls.
CREATE FUNCTION dingsync.actions_wake() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, dingsync, pg_temp
AS $$
BEGIN
    PERFORM pg_notify('dingsync_actions', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER actions_wake
    AFTER INSERT ON dingsync.actions FOR EACH STATEMENT EXECUTE FUNCTION dingsync.actions_wake();

-- Tells apps waiting for a result (LISTEN dingsync_action_done): payload is the row id.
CREATE FUNCTION dingsync.actions_done() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, dingsync, pg_temp
AS $$
BEGIN
    PERFORM pg_notify('dingsync_action_done', NEW.id::text);
    RETURN NULL;
END;
$$;
CREATE TRIGGER actions_done
    AFTER UPDATE OF state ON dingsync.actions FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state
          AND NEW.state IN ('done', 'failed', 'superseded', 'cancelled'))
    EXECUTE FUNCTION dingsync.actions_done();

-- The app-facing way to act: validates, inserts, returns the row id. The same idempotency_key
-- again returns the existing row's id; the same key with a different action is an error (as
-- request_approval: almost certainly a bug in the app, which returning the old row would hide).
-- The key is looked up first, so that repeating an action whose approval has moved on since (by
-- this action, typically) returns its row instead of the trigger's "already finished".
CREATE FUNCTION dingsync.request_action(
    idempotency_key     text,
    action              text,
    process_instance_id text,
    task_id             bigint  DEFAULT NULL,
    actor_user_id       text    DEFAULT NULL,
    remark              text    DEFAULT NULL,
    to_user_id          text    DEFAULT NULL,
    as_system           boolean DEFAULT false,
    corp_id             text    DEFAULT NULL
) RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, dingsync, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    corp     text := coalesce(corp_id, dingsync.default_corp_id());
    new_id   bigint;
    existing dingsync.actions;
BEGIN
    SELECT a.* INTO existing FROM dingsync.actions a
    WHERE a.corp_id = corp AND a.idempotency_key = request_action.idempotency_key;
    IF NOT FOUND THEN
        INSERT INTO dingsync.actions AS a
            (corp_id, idempotency_key, action, process_instance_id, task_id, actor_user_id,
             as_system, to_user_id, remark)
        VALUES (corp, idempotency_key, action, process_instance_id, task_id, actor_user_id,
                coalesce(as_system, false), to_user_id, remark)
        ON CONFLICT ON CONSTRAINT actions_idempotency_key_unique DO NOTHING
        RETURNING a.id INTO new_id;
        IF new_id IS NOT NULL THEN
            RETURN new_id;
        END IF;
        -- Inserted by a concurrent call between our look-up and our insert.
        SELECT a.* INTO existing FROM dingsync.actions a
        WHERE a.corp_id = corp AND a.idempotency_key = request_action.idempotency_key;
    END IF;
    -- The actor may have been filled in from the task's approver: leaving it out matches it.
    IF (existing.action, existing.process_instance_id, existing.task_id, existing.as_system,
        existing.to_user_id, existing.remark)
       IS DISTINCT FROM
       (action, process_instance_id, task_id, coalesce(as_system, false), to_user_id, remark)
       OR (actor_user_id IS NOT NULL AND actor_user_id IS DISTINCT FROM existing.actor_user_id) THEN
        RAISE EXCEPTION 'dingsync.request_action: idempotency_key "%" was already used for a different action (action id %)',
            idempotency_key, existing.id
            USING ERRCODE = 'unique_violation',
                  HINT = 'Use a new key for a new action; the same key only to repeat the same action.';
    END IF;
    RETURN existing.id;
END;
$$;
COMMENT ON FUNCTION dingsync.request_action(text, text, text, bigint, text, text, text, boolean, text) IS 'Asks dingsync to act on an approval: validates and inserts a dingsync.actions row and returns its id. The same idempotency_key again returns the same id (never a second action in DingTalk); the same key with a different action raises unique_violation.';

-- Functions are not PUBLIC's (migration V10, part 3).
REVOKE EXECUTE ON FUNCTION dingsync.actions_validate(), dingsync.actions_wake(),
    dingsync.actions_done(),
    dingsync.request_action(text, text, text, bigint, text, text, text, boolean, text)
    FROM PUBLIC;

-- Is the actions worker keeping up? One row per organisation, action and state; the percentiles
-- only for done rows: the time an app waits for its action to take effect.
CREATE VIEW dingsync.report_actions AS
SELECT corp_id,
       action,
       state,
       count(*) AS row_count,
       min(created_at) AS oldest_created_at,
       max(attempts) AS max_attempts,
       round((percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM done_at - created_at))
              FILTER (WHERE state = 'done' AND done_at IS NOT NULL))::numeric, 3) AS p50_seconds_to_done,
       round((percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM done_at - created_at))
              FILTER (WHERE state = 'done' AND done_at IS NOT NULL))::numeric, 3) AS p90_seconds_to_done
FROM dingsync.actions
GROUP BY corp_id, action, state;

COMMENT ON VIEW dingsync.report_actions IS 'Public (reporting): actions on approvals per organisation, action and state (pending ones included: how many wait and since when), and for done ones how long they took.';
COMMENT ON COLUMN dingsync.report_actions.corp_id IS 'DingTalk organisation (CorpId).';
COMMENT ON COLUMN dingsync.report_actions.action IS 'agree, refuse, redirect, terminate or comment.';
COMMENT ON COLUMN dingsync.report_actions.state IS 'Action state: pending, sending, unknown, done, failed, superseded or cancelled.';
COMMENT ON COLUMN dingsync.report_actions.row_count IS 'Number of actions in this state.';
COMMENT ON COLUMN dingsync.report_actions.oldest_created_at IS 'created_at of the oldest action in this state (for pending/unknown: how far behind the worker is).';
COMMENT ON COLUMN dingsync.report_actions.max_attempts IS 'Highest attempts of an action in this state.';
COMMENT ON COLUMN dingsync.report_actions.p50_seconds_to_done IS 'State done only: median seconds from created_at to done_at (3 decimals); null for other states.';
COMMENT ON COLUMN dingsync.report_actions.p90_seconds_to_done IS 'State done only: 90th percentile of seconds from created_at to done_at (3 decimals); null for other states.';

-- The read-back of an action stores what it read (as the outbox's search does): a new source.
ALTER TABLE dingsync.approvals
    DROP CONSTRAINT approvals_snapshot_source_check,
    ADD CONSTRAINT approvals_snapshot_source_check
        CHECK (snapshot_source IN ('details', 'sweep', 'backfill', 'gap', 'poll', 'search', 'action'));
COMMENT ON COLUMN dingsync.approvals.snapshot_source IS 'Provenance: which job fetched the applied snapshot: details (the one fetch after the first event), sweep (open approval re-checked), gap (a missing event suspected), poll (pushes missing), backfill (found by listids), search (the outbox looking for an instance whose create got no answer) or action (an action read its approval back).';
COMMENT ON COLUMN dingsync.usage.purpose IS 'What the call was for (outbox, search, action, details, gap, sweep, poll, backfill, failed, drift, doctor, callback, token); for a delivery: push (stored) or refused (dingsync answered an error).';

-- The roles' rights on actions: as the outbox (V10): read every column, insert only the request
-- columns (a row an app writes is a request, never state), request_action and what an insert
-- evaluates as the inserting role (the corp_id default). dingsync_report reads the new view.
DO $roles$
DECLARE
    grants text := $grants$
        GRANT SELECT ON dingsync.actions TO dingsync_app;
        GRANT INSERT (corp_id, idempotency_key, action, process_instance_id, task_id,
                      actor_user_id, as_system, to_user_id, remark)
            ON dingsync.actions TO dingsync_app;
        GRANT EXECUTE ON FUNCTION
            dingsync.request_action(text, text, text, bigint, text, text, text, boolean, text)
            TO dingsync_app;
        GRANT SELECT ON dingsync.report_actions TO dingsync_report;
    $grants$;
BEGIN
    IF (SELECT count(*) FROM pg_roles WHERE rolname IN ('dingsync_app', 'dingsync_report')) < 2 THEN
        RAISE NOTICE 'dingsync: roles dingsync_app and dingsync_report are missing; as a superuser or CREATEROLE user, run in this database, after the script of migration V10: %',
            grants;
        RETURN;
    END IF;
    EXECUTE grants;
END;
$roles$;
