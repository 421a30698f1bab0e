-- Self-selected approvers ("发起人自选" nodes): a template can leave some of its approver nodes
-- to the originator, who names them when the approval is started. Only the v1.0 create takes
-- them (`targetSelectActioners`, docs/dingtalk.md §11.2), keyed by the node's actionerKey (the
-- forecast's actorKey, §11.5). The outbox gets one request column for them, and
-- request_approval one parameter.

-- Shape of select_approvers: NULL, or a JSON object {"<actionerKey>": ["userid", ...], ...} of 1
-- to 20 nodes, each with 1 to 20 userids. DingTalk checks the keys and who may be chosen; this
-- catches what is malformed before it costs a DingTalk call. NULL when fine, else a sentence
-- naming the offending entry.
CREATE FUNCTION dingsync.select_approvers_problem(select_approvers jsonb) RETURNS text
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    SET search_path = pg_catalog, dingsync, pg_temp
AS $$
DECLARE
    entry record;
    n     int;
BEGIN
    IF select_approvers IS NULL THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(select_approvers) <> 'object' OR select_approvers = '{}'::jsonb THEN
        RETURN 'select_approvers must be NULL or a JSON object {"<actionerKey>": ["userid", ...]} naming the approvers of the template''s self-selected nodes';
    END IF;
    IF (SELECT count(*) FROM jsonb_object_keys(select_approvers)) > 20 THEN
        RETURN 'select_approvers names more than 20 nodes; DingTalk takes at most 20 approver nodes';
    END IF;
    FOR entry IN SELECT key, value FROM jsonb_each(select_approvers) LOOP
        IF btrim(entry.key) = '' OR length(entry.key) > 256 THEN
            RETURN 'select_approvers has an empty or over-long actionerKey (1 to 256 characters)';
        END IF;
        IF jsonb_typeof(entry.value) IS DISTINCT FROM 'array' THEN
            RETURN format('select_approvers.%s must be a JSON array of userids', entry.key);
        END IF;
        n := jsonb_array_length(entry.value);
        IF n = 0 OR n > 20
           OR EXISTS (SELECT 1 FROM jsonb_array_elements(entry.value) AS u
                      WHERE jsonb_typeof(u) <> 'string' OR btrim(u #>> '{}') = '') THEN
            RETURN format('select_approvers.%s must hold 1 to 20 userids', entry.key);
        END IF;
    END LOOP;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION dingsync.select_approvers_problem(jsonb) IS 'NULL when select_approvers has the shape the outbox takes (README, "Self-selected approvers"); otherwise what is wrong.';

ALTER TABLE dingsync.outbox
    ADD COLUMN select_approvers jsonb,
    ADD CONSTRAINT outbox_select_approvers_shape
        CHECK (dingsync.select_approvers_problem(select_approvers) IS NULL),
    -- Self-selected nodes belong to the template's flow; explicit approvers replace that flow,
    -- so DingTalk would have nothing to put them in.
    ADD CONSTRAINT outbox_select_approvers_need_the_flow
        CHECK (select_approvers IS NULL OR approvers IS NULL);
COMMENT ON COLUMN dingsync.outbox.select_approvers IS 'Optional approvers of the template''s self-selected nodes: JSON object {"<actionerKey>": ["userid", ...]} (actionerKey from the template, e.g. DingTalk''s forecast); needs approvers NULL and dingtalk.api_family = "v1" (the old API cannot send them: such a row fails naming the key).';

-- The clear message for the new column, before the CHECK constraints (triggers fire in name
-- order after outbox_corp_served; this one after outbox_validate).
CREATE FUNCTION dingsync.outbox_validate_select() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, dingsync, pg_temp
AS $$
DECLARE
    problem text;
BEGIN
    problem := coalesce(
        dingsync.select_approvers_problem(NEW.select_approvers),
        CASE WHEN NEW.select_approvers IS NOT NULL AND NEW.approvers IS NOT NULL
             THEN 'select_approvers needs approvers NULL: they name the approvers of the template''s own flow, which explicit approvers replace' END);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'dingsync.outbox: %', problem
            USING ERRCODE = 'check_violation',
                  HINT = 'See the README, "Self-selected approvers".';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER outbox_validate_select
    BEFORE INSERT OR UPDATE OF select_approvers, approvers
    ON dingsync.outbox FOR EACH ROW EXECUTE FUNCTION dingsync.outbox_validate_select();

-- request_approval with the new parameter, last and defaulted, so every existing call means what
-- it meant. A second function beside the old one would make calls without it ambiguous, so the
-- old one is replaced.
DROP FUNCTION dingsync.request_approval(text, text, text, jsonb, bigint, jsonb, text[], text, text);
CREATE FUNCTION dingsync.request_approval(
    idempotency_key    text,
    process_code       text,
    originator_user_id text,
    form_values        jsonb,
    dept_id            bigint DEFAULT -1,
    approvers          jsonb  DEFAULT NULL,
    cc_list            text[] DEFAULT NULL,
    cc_position        text   DEFAULT NULL,
    corp_id            text   DEFAULT NULL,
    select_approvers   jsonb  DEFAULT NULL
) RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, dingsync, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    corp     text := coalesce(corp_id, dingsync.default_corp_id());
    new_id   bigint;
    existing dingsync.outbox;
BEGIN
    INSERT INTO dingsync.outbox AS o
        (corp_id, idempotency_key, process_code, originator_user_id, dept_id, form_values,
         approvers, cc_list, cc_position, select_approvers)
    VALUES (corp, idempotency_key, process_code, originator_user_id, dept_id, form_values,
            approvers, cc_list, cc_position, select_approvers)
    ON CONFLICT ON CONSTRAINT outbox_idempotency_key_unique DO NOTHING
    RETURNING o.id INTO new_id;
    IF new_id IS NOT NULL THEN
        RETURN new_id;
    END IF;
    SELECT o.* INTO existing FROM dingsync.outbox o
    WHERE o.corp_id = corp AND o.idempotency_key = request_approval.idempotency_key;
    IF (existing.process_code, existing.originator_user_id, existing.dept_id, existing.form_values,
        existing.approvers, existing.cc_list, existing.cc_position, existing.select_approvers)
       IS DISTINCT FROM
       (process_code, originator_user_id, dept_id, form_values, approvers, cc_list, cc_position,
        select_approvers) THEN
        RAISE EXCEPTION 'dingsync.request_approval: idempotency_key "%" was already used for a different request (outbox id %)',
            idempotency_key, existing.id
            USING ERRCODE = 'unique_violation',
                  HINT = 'Use a new key for a new request; the same key only to repeat the same request.';
    END IF;
    RETURN existing.id;
END;
$$;
COMMENT ON FUNCTION dingsync.request_approval(text, text, text, jsonb, bigint, jsonb, text[], text, text, jsonb) IS 'Asks dingsync to create an approval: validates and inserts a dingsync.outbox row and returns its id. The same idempotency_key again returns the same id (never a second approval); the same key with a different request raises unique_violation. select_approvers (last) names the approvers of the template''s self-selected nodes.';

-- No function of the schema is PUBLIC's (V10): the new ones neither.
REVOKE EXECUTE ON FUNCTION
    dingsync.select_approvers_problem(jsonb),
    dingsync.outbox_validate_select(),
    dingsync.request_approval(text, text, text, jsonb, bigint, jsonb, text[], text, text, jsonb)
    FROM PUBLIC;

-- The app role's rights on what changed (V10 has the rest). Without the roles, the NOTICE gives
-- the script to run once they exist.
DO $roles$
DECLARE
    grants text := $grants$
        GRANT INSERT (select_approvers) ON dingsync.outbox TO dingsync_app;
        GRANT EXECUTE ON FUNCTION
            dingsync.request_approval(text, text, text, jsonb, bigint, jsonb, text[], text, text, jsonb),
            dingsync.select_approvers_problem(jsonb)
            TO dingsync_app;
    $grants$;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dingsync_app') THEN
        RAISE NOTICE 'dingsync: role dingsync_app is missing; after creating it (see migration V10''s notice), also run: %', grants;
        RETURN;
    END IF;
    EXECUTE grants;
END;
$roles$;
