-- The outbox: business apps ask for approvals by inserting rows (or calling
-- dingsync.request_approval); dingsync creates each one in DingTalk exactly once and writes the
-- instance id back. DingTalk's create API has no idempotency key, so exactly-once is built here:
-- a unique idempotency_key per organisation, claims with a lease, and a search (never a blind
-- retry) when a create may have reached DingTalk without an answer.

-- The organisations the daemons on this database serve, so that an outbox row can leave out
-- corp_id when there is only one.
CREATE TABLE dingsync.corps (
    corp_id         text        NOT NULL PRIMARY KEY,
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    last_started_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE dingsync.corps IS 'Internal: the DingTalk organisations served from this database, written by each dingsync at start-up. Decides the default corp_id of outbox rows. Remove a row here when a database stops serving an organisation (e.g. after switching from the emulator to a real one).';
COMMENT ON COLUMN dingsync.corps.corp_id IS 'DingTalk organisation (CorpId).';
COMMENT ON COLUMN dingsync.corps.first_seen_at IS 'When a dingsync first started for this organisation.';
COMMENT ON COLUMN dingsync.corps.last_started_at IS 'When a dingsync last started for this organisation.';

-- The corp_id an outbox row gets when the app leaves it out: the one organisation served here.
-- With none or several there is no safe guess, so the insert fails and says why.
CREATE FUNCTION dingsync.default_corp_id() RETURNS text
    LANGUAGE plpgsql STABLE
AS $$
DECLARE
    corps text[];
BEGIN
    SELECT array_agg(corp_id ORDER BY corp_id) INTO corps FROM dingsync.corps;
    IF corps IS NULL THEN
        RAISE EXCEPTION 'dingsync.outbox: corp_id is required: no dingsync has started against this database yet'
            USING ERRCODE = 'not_null_violation',
                  HINT = 'Start dingsync once, or pass corp_id (your CorpId, ding...) explicitly.';
    ELSIF cardinality(corps) > 1 THEN
        RAISE EXCEPTION 'dingsync.outbox: corp_id is required: this database serves several organisations (%)',
            array_to_string(corps, ', ')
            USING ERRCODE = 'not_null_violation',
                  HINT = 'Pass corp_id explicitly, or delete the organisation no longer served from dingsync.corps.';
    END IF;
    RETURN corps[1];
END;
$$;
COMMENT ON FUNCTION dingsync.default_corp_id() IS 'The corp_id of the only organisation this database serves; fails with a clear message when there is none or more than one.';

-- Shape of form values (API.md §2.2). DingTalk validates the content (options, userids, required
-- controls); this catches what is malformed before it costs a DingTalk call. Returns NULL when
-- the value is fine, else a sentence naming the offending item.
--
-- Accepted per item: {"name": label, "value": v, "ext_value": text (optional)} where
--   name  is a label, or a pair of labels for a date range (["开始时间","结束时间"]);
--   value is text (sent as is), a number (sent as its text), or a JSON array, sent as JSON text:
--         strings (multi-select, pictures, people, date range, related approvals),
--         objects (attachments), or rows of {"name","value"} cells (a table).
-- DingTalk takes at most 150 values (v1.0 doc and the Java SDK; the old doc says 200: the
-- stricter number is used) of at most 65535 characters each.
CREATE FUNCTION dingsync.form_values_problem(form_values jsonb) RETURNS text
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    item   jsonb;
    i      int := 0;
    names  text[] := '{}';
    label  text;
    k      text;
    v      jsonb;
    kinds  text[];
    row_   jsonb;
    cell   jsonb;
    at     text;
BEGIN
    IF form_values IS NULL OR jsonb_typeof(form_values) <> 'array' THEN
        RETURN 'form_values must be a JSON array of {"name": ..., "value": ...} objects';
    END IF;
    IF jsonb_array_length(form_values) = 0 THEN
        RETURN 'form_values is empty: DingTalk requires at least one form value';
    END IF;
    IF jsonb_array_length(form_values) > 150 THEN
        RETURN format('form_values has %s items; DingTalk takes at most 150', jsonb_array_length(form_values));
    END IF;
    FOR item IN SELECT e FROM jsonb_array_elements(form_values) AS e LOOP
        at := format('form_values[%s]', i);
        IF jsonb_typeof(item) <> 'object' THEN
            RETURN format('%s must be an object {"name": ..., "value": ...}, not %s', at, jsonb_typeof(item));
        END IF;
        FOR k IN SELECT jsonb_object_keys(item) LOOP
            IF k NOT IN ('name', 'value', 'ext_value') THEN
                RETURN format('%s has an unknown key "%s" (allowed: name, value, ext_value)', at, k);
            END IF;
        END LOOP;
        -- name: a label, or the two labels of a date range.
        CASE jsonb_typeof(item -> 'name')
            WHEN 'string' THEN
                label := item ->> 'name';
                IF btrim(label) = '' THEN
                    RETURN format('%s.name is empty', at);
                END IF;
            WHEN 'array' THEN
                IF jsonb_array_length(item -> 'name') <> 2
                   OR EXISTS (SELECT 1 FROM jsonb_array_elements(item -> 'name') AS n
                              WHERE jsonb_typeof(n) <> 'string' OR btrim(n #>> '{}') = '') THEN
                    RETURN format('%s.name must be a label, or for a date range the pair of its labels ["start label", "end label"]', at);
                END IF;
                label := (item -> 'name')::text;
            ELSE
                RETURN format('%s.name is missing or not text (the label of the form control)', at);
        END CASE;
        IF label = ANY (names) THEN
            RETURN format('%s.name %s appears twice', at, item -> 'name');
        END IF;
        names := names || label;
        IF item ? 'ext_value' AND jsonb_typeof(item -> 'ext_value') <> 'string' THEN
            RETURN format('%s.ext_value must be text', at);
        END IF;
        v := item -> 'value';
        CASE coalesce(jsonb_typeof(v), 'missing')
            WHEN 'string' THEN
                IF length(v #>> '{}') > 65535 THEN
                    RETURN format('%s.value is longer than 65535 characters', at);
                END IF;
            WHEN 'number' THEN
                NULL;
            WHEN 'array' THEN
                SELECT array_agg(DISTINCT jsonb_typeof(e)) INTO kinds FROM jsonb_array_elements(v) AS e;
                IF cardinality(kinds) > 1 THEN
                    RETURN format('%s.value mixes %s in one array: use only strings, only objects (attachments) or only rows (a table)',
                                  at, array_to_string(kinds, ' and '));
                END IF;
                IF kinds[1] NOT IN ('string', 'object', 'array') THEN
                    RETURN format('%s.value is an array of %ss: use strings, e.g. ["a", "b"]', at, kinds[1]);
                END IF;
                IF kinds[1] = 'array' THEN
                    -- A table: each row an array of {"name": column label, "value": text or number}.
                    FOR row_ IN SELECT e FROM jsonb_array_elements(v) AS e LOOP
                        FOR cell IN SELECT e FROM jsonb_array_elements(row_) AS e LOOP
                            IF jsonb_typeof(cell) <> 'object'
                               OR jsonb_typeof(cell -> 'name') IS DISTINCT FROM 'string'
                               OR coalesce(jsonb_typeof(cell -> 'value'), 'missing') NOT IN ('string', 'number') THEN
                                RETURN format('%s.value is a table: every row must be an array of {"name": column label, "value": text}', at);
                            END IF;
                        END LOOP;
                    END LOOP;
                END IF;
                IF length(v::text) > 65535 THEN
                    RETURN format('%s.value is longer than 65535 characters as JSON text', at);
                END IF;
            WHEN 'missing' THEN
                RETURN format('%s.value is missing', at);
            ELSE
                RETURN format('%s.value must be text, a number or a JSON array, not %s', at, jsonb_typeof(v));
        END CASE;
        IF jsonb_typeof(item -> 'name') = 'array'
           AND NOT (jsonb_typeof(v) = 'string'
                    OR (jsonb_typeof(v) = 'array' AND jsonb_array_length(v) = 2 AND kinds = '{string}')) THEN
            RETURN format('%s is a date range: value must be ["start", "end"]', at);
        END IF;
        i := i + 1;
    END LOOP;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION dingsync.form_values_problem(jsonb) IS 'NULL when form_values has the shape DingTalk''s create API takes (README, "Requesting approvals"); otherwise what is wrong, naming the item.';

-- Approvers (API.md §2.1 approvers_v2): a JSON array of at most 20 nodes, each a userid (one
-- approver) or {"action": "AND"|"OR"|"NONE", "user_ids": [...]} (countersign, either-or, single).
CREATE FUNCTION dingsync.approvers_problem(approvers jsonb) RETURNS text
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    node jsonb;
    i    int := 0;
    at   text;
    n    int;
BEGIN
    IF approvers IS NULL THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(approvers) <> 'array' OR jsonb_array_length(approvers) = 0 THEN
        RETURN 'approvers must be NULL (the template''s flow) or a non-empty JSON array of userids or {"action": "AND"|"OR"|"NONE", "user_ids": [...]} nodes';
    END IF;
    IF jsonb_array_length(approvers) > 20 THEN
        RETURN format('approvers has %s nodes; DingTalk takes at most 20', jsonb_array_length(approvers));
    END IF;
    FOR node IN SELECT e FROM jsonb_array_elements(approvers) AS e LOOP
        at := format('approvers[%s]', i);
        IF jsonb_typeof(node) = 'string' THEN
            IF btrim(node #>> '{}') = '' THEN
                RETURN format('%s is an empty userid', at);
            END IF;
        ELSIF jsonb_typeof(node) = 'object' THEN
            IF EXISTS (SELECT 1 FROM jsonb_object_keys(node) AS k WHERE k NOT IN ('action', 'user_ids')) THEN
                RETURN format('%s has an unknown key (allowed: action, user_ids)', at);
            END IF;
            IF (node ->> 'action') IS NULL OR (node ->> 'action') NOT IN ('AND', 'OR', 'NONE') THEN
                RETURN format('%s.action must be "AND" (all approve), "OR" (any one approves) or "NONE" (a single approver)', at);
            END IF;
            IF jsonb_typeof(node -> 'user_ids') IS DISTINCT FROM 'array' THEN
                RETURN format('%s.user_ids must be a JSON array of userids', at);
            END IF;
            n := jsonb_array_length(node -> 'user_ids');
            IF n = 0 OR n > 20
               OR EXISTS (SELECT 1 FROM jsonb_array_elements(node -> 'user_ids') AS u
                          WHERE jsonb_typeof(u) <> 'string' OR btrim(u #>> '{}') = '') THEN
                RETURN format('%s.user_ids must hold 1 to 20 userids', at);
            END IF;
            IF node ->> 'action' = 'NONE' AND n <> 1 THEN
                RETURN format('%s: action "NONE" is a single-approver node; use "AND" or "OR" for %s approvers', at, n);
            END IF;
        ELSE
            RETURN format('%s must be a userid or a {"action", "user_ids"} node', at);
        END IF;
        i := i + 1;
    END LOOP;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION dingsync.approvers_problem(jsonb) IS 'NULL when approvers has the shape the outbox takes (README, "Requesting approvals"); otherwise what is wrong.';

CREATE TABLE dingsync.outbox (
    corp_id             text        NOT NULL DEFAULT dingsync.default_corp_id(),
    id                  bigint      GENERATED ALWAYS AS IDENTITY,
    idempotency_key     text        NOT NULL,
    process_code        text        NOT NULL,
    originator_user_id  text        NOT NULL,
    dept_id             bigint      NOT NULL DEFAULT -1,
    form_values         jsonb       NOT NULL,
    approvers           jsonb,
    cc_list             text[],
    cc_position         text,
    state               text        NOT NULL DEFAULT 'pending',
    attempts            int         NOT NULL DEFAULT 0,
    -- For pending/unknown rows: when to act next. For a claimed row (sending, or unknown being
    -- searched): the end of the claim's lease. One column, so one index finds all due work.
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    sent_at             timestamptz,
    last_error          text,
    process_instance_id text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    done_at             timestamptz,
    -- corp_id leads every key: it is the distribution key on a sharded PostgreSQL (DESIGN.md).
    PRIMARY KEY (corp_id, id),
    CONSTRAINT outbox_idempotency_key_unique UNIQUE (corp_id, idempotency_key),
    -- One outbox row per instance: two rows can never claim (adopt) the same approval.
    CONSTRAINT outbox_instance_unique UNIQUE (corp_id, process_instance_id),
    CONSTRAINT outbox_state_check
        CHECK (state IN ('pending', 'sending', 'unknown', 'created', 'failed', 'cancelled')),
    CONSTRAINT outbox_idempotency_key_check CHECK (length(idempotency_key) BETWEEN 1 AND 256),
    CONSTRAINT outbox_process_code_check CHECK (btrim(process_code) <> ''),
    CONSTRAINT outbox_originator_check CHECK (btrim(originator_user_id) <> ''),
    CONSTRAINT outbox_attempts_check CHECK (attempts >= 0),
    CONSTRAINT outbox_created_has_instance CHECK ((state = 'created') = (process_instance_id IS NOT NULL)),
    CONSTRAINT outbox_form_values_check CHECK (dingsync.form_values_problem(form_values) IS NULL),
    CONSTRAINT outbox_approvers_check CHECK (dingsync.approvers_problem(approvers) IS NULL),
    CONSTRAINT outbox_cc_position_check CHECK (cc_position IN ('START', 'FINISH', 'START_FINISH')),
    -- DingTalk ignores cc_list without approvers (API.md §2.1): refuse it rather than drop it.
    CONSTRAINT outbox_cc_needs_approvers CHECK (cc_list IS NULL OR approvers IS NOT NULL),
    CONSTRAINT outbox_cc_list_check CHECK (cardinality(cc_list) BETWEEN 1 AND 20)
);

-- The worker's queue: only rows with work left, in the order they fall due.
CREATE INDEX outbox_due_idx ON dingsync.outbox (corp_id, next_attempt_at)
    WHERE state IN ('pending', 'sending', 'unknown');
-- Apps and operators look rows up by id alone, and list them by state.
CREATE INDEX outbox_id_idx ON dingsync.outbox (id);
CREATE INDEX outbox_state_idx ON dingsync.outbox (corp_id, state, id);

COMMENT ON TABLE dingsync.outbox IS 'Approval requests from business apps: insert a row (or call dingsync.request_approval) and dingsync creates the approval in DingTalk exactly once, then sets state = created and process_instance_id. Apps write the request columns; dingsync writes the rest.';
COMMENT ON COLUMN dingsync.outbox.corp_id IS 'DingTalk organisation to create the approval in; defaults to the only organisation this database serves.';
COMMENT ON COLUMN dingsync.outbox.id IS 'Row id; also dingsync.approvals.outbox_id of the approval it created.';
COMMENT ON COLUMN dingsync.outbox.idempotency_key IS 'The app''s own key for this request (e.g. ''expense-4711''), unique per organisation: the same key twice is the same request, never a second approval.';
COMMENT ON COLUMN dingsync.outbox.process_code IS 'Approval template code (PROC-...).';
COMMENT ON COLUMN dingsync.outbox.originator_user_id IS 'userid of the person the approval is started for.';
COMMENT ON COLUMN dingsync.outbox.dept_id IS 'Department of the originator the approval is started in; -1 is the root department.';
COMMENT ON COLUMN dingsync.outbox.form_values IS 'JSON array of {"name": label, "value": text | number | JSON array, "ext_value": text}; see README "Requesting approvals" for dates, date ranges, pictures, tables and departments.';
COMMENT ON COLUMN dingsync.outbox.approvers IS 'Optional approver nodes in order: JSON array of userids or {"action": "AND"|"OR"|"NONE", "user_ids": [...]}; NULL uses the template''s flow.';
COMMENT ON COLUMN dingsync.outbox.cc_list IS 'Optional userids to copy (at most 20); needs approvers.';
COMMENT ON COLUMN dingsync.outbox.cc_position IS 'When the cc_list is notified: START, FINISH or START_FINISH (DingTalk default START).';
COMMENT ON COLUMN dingsync.outbox.state IS 'pending (waiting to be sent), sending (create in flight), unknown (sent but unanswered: dingsync is searching DingTalk for it, never blindly retrying), created (done; see process_instance_id), failed (see last_error), cancelled (by an operator).';
COMMENT ON COLUMN dingsync.outbox.attempts IS 'How many times a create was sent for this row.';
COMMENT ON COLUMN dingsync.outbox.next_attempt_at IS 'pending/unknown: when dingsync acts on the row next. sending: when its claim expires (a worker that stopped mid-send is then recovered).';
COMMENT ON COLUMN dingsync.outbox.sent_at IS 'When the latest create was sent; the search for an unanswered create starts here.';
COMMENT ON COLUMN dingsync.outbox.last_error IS 'Why the latest attempt did not create the approval: DingTalk''s errcode and errmsg for a rejection, or the transport problem.';
COMMENT ON COLUMN dingsync.outbox.process_instance_id IS 'The DingTalk instance created for this row (state created); join dingsync.approvals on it.';
COMMENT ON COLUMN dingsync.outbox.created_at IS 'When the row was inserted.';
COMMENT ON COLUMN dingsync.outbox.updated_at IS 'When dingsync last changed the row.';
COMMENT ON COLUMN dingsync.outbox.done_at IS 'When the row reached created, failed or cancelled.';

-- Clear errors for bad requests. The CHECK constraints above say the same, but only by name; this
-- trigger runs first and says what is wrong and where.
CREATE FUNCTION dingsync.outbox_validate() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    problem text;
BEGIN
    problem := coalesce(
        CASE WHEN NEW.idempotency_key IS NULL OR length(NEW.idempotency_key) NOT BETWEEN 1 AND 256
             THEN 'idempotency_key is required: 1 to 256 characters of the app''s own request key' END,
        CASE WHEN NEW.process_code IS NULL OR btrim(NEW.process_code) = ''
             THEN 'process_code is required (the template code, PROC-...)' END,
        CASE WHEN NEW.originator_user_id IS NULL OR btrim(NEW.originator_user_id) = ''
             THEN 'originator_user_id is required (the userid the approval is started for)' END,
        dingsync.form_values_problem(NEW.form_values),
        dingsync.approvers_problem(NEW.approvers),
        CASE WHEN NEW.cc_list IS NOT NULL AND NEW.approvers IS NULL
             THEN 'cc_list needs approvers: DingTalk ignores a cc_list when the template''s flow is used' END,
        CASE WHEN cardinality(NEW.cc_list) NOT BETWEEN 1 AND 20
             THEN 'cc_list must hold 1 to 20 userids (or be NULL)' END,
        CASE WHEN NEW.cc_position NOT IN ('START', 'FINISH', 'START_FINISH')
             THEN 'cc_position must be START, FINISH or START_FINISH' END);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'dingsync.outbox: %', problem
            USING ERRCODE = 'check_violation',
                  HINT = 'See the README, "Requesting approvals", for the accepted shapes.';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER outbox_validate
    BEFORE INSERT OR UPDATE OF idempotency_key, process_code, originator_user_id, form_values,
        approvers, cc_list, cc_position
    ON dingsync.outbox FOR EACH ROW EXECUTE FUNCTION dingsync.outbox_validate();

-- Wakes the worker (LISTEN dingsync_outbox) once per inserting statement, so a bulk insert is
-- one notification. The worker also polls, so it works where LISTEN does not (PgBouncer in
-- transaction mode).
CREATE FUNCTION dingsync.outbox_wake() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('dingsync_outbox', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER outbox_wake
    AFTER INSERT ON dingsync.outbox FOR EACH STATEMENT EXECUTE FUNCTION dingsync.outbox_wake();

-- Tells apps waiting for a result (LISTEN dingsync_outbox_done): payload is the row id.
CREATE FUNCTION dingsync.outbox_done() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('dingsync_outbox_done', NEW.id::text);
    RETURN NULL;
END;
$$;
CREATE TRIGGER outbox_done
    AFTER UPDATE OF state ON dingsync.outbox FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state AND NEW.state IN ('created', 'failed', 'cancelled'))
    EXECUTE FUNCTION dingsync.outbox_done();

-- The app-facing way to ask for an approval: validates, inserts, returns the row id. The same
-- idempotency_key again returns the existing row's id; the same key with a different request is
-- an error (it is almost certainly a bug in the app, and silently returning the old row would
-- hide it).
CREATE FUNCTION dingsync.request_approval(
    idempotency_key    text,
    process_code       text,
    originator_user_id text,
    form_values        jsonb,
    dept_id            bigint DEFAULT -1,
    approvers          jsonb  DEFAULT NULL,
    cc_list            text[] DEFAULT NULL,
    cc_position        text   DEFAULT NULL,
    corp_id            text   DEFAULT NULL
) RETURNS bigint
    LANGUAGE plpgsql
AS $$
#variable_conflict use_variable
DECLARE
    corp     text := coalesce(corp_id, dingsync.default_corp_id());
    new_id   bigint;
    existing dingsync.outbox;
BEGIN
    INSERT INTO dingsync.outbox AS o
        (corp_id, idempotency_key, process_code, originator_user_id, dept_id, form_values,
         approvers, cc_list, cc_position)
    VALUES (corp, idempotency_key, process_code, originator_user_id, dept_id, form_values,
            approvers, cc_list, cc_position)
    ON CONFLICT ON CONSTRAINT outbox_idempotency_key_unique DO NOTHING
    RETURNING o.id INTO new_id;
    IF new_id IS NOT NULL THEN
        RETURN new_id;
    END IF;
    SELECT o.* INTO existing FROM dingsync.outbox o
    WHERE o.corp_id = corp AND o.idempotency_key = request_approval.idempotency_key;
    IF (existing.process_code, existing.originator_user_id, existing.dept_id, existing.form_values,
        existing.approvers, existing.cc_list, existing.cc_position)
       IS DISTINCT FROM
       (process_code, originator_user_id, dept_id, form_values, approvers, cc_list, cc_position) THEN
        RAISE EXCEPTION 'dingsync.request_approval: idempotency_key "%" was already used for a different request (outbox id %)',
            idempotency_key, existing.id
            USING ERRCODE = 'unique_violation',
                  HINT = 'Use a new key for a new request; the same key only to repeat the same request.';
    END IF;
    RETURN existing.id;
END;
$$;
COMMENT ON FUNCTION dingsync.request_approval(text, text, text, jsonb, bigint, jsonb, text[], text, text) IS 'Asks dingsync to create an approval: validates and inserts a dingsync.outbox row and returns its id. The same idempotency_key again returns the same id (never a second approval); the same key with a different request raises unique_violation.';
