-- Hardening after a security review, in four parts: (1) an outbox row an app writes is a request,
-- never state; (2) a request for an organisation this database does not serve is refused instead
-- of waiting for ever; (3) dingsync's functions run only for the roles that need them, with a
-- fixed search_path; (4) the shared access token is fetched under a lease, so no replica holds a
-- connection or a transaction while DingTalk answers gettoken.

-- 1. Outbox rows are requests.
--
-- V8 granted dingsync_app INSERT on the whole outbox, so an app could insert a row already
-- `created` with another row's process_instance_id (that row's lost-answer search then skips the
-- instance as owned and sends its create again: a second approval), a row in `unknown`, or a row
-- with forged attempts and times. Column grants (below, in the roles block) limit the app to the
-- request columns; every lifecycle column then takes its default: state pending, attempts 0, due
-- now, no instance, no error, created_at/updated_at now, no sent_at/done_at.
--
-- Column grants rather than a trigger that resets or refuses lifecycle columns:
--   * PostgreSQL enforces them before any of our code runs, for INSERT ... SELECT, COPY and
--     ON CONFLICT alike, and they show in \dp: nothing to get wrong in a trigger body.
--   * They bind exactly the app role. dingsync itself runs as the schema owner and writes
--     lifecycle columns (and operators and tests insert rows in given states); a trigger would have
--     to tell the daemon from an app by role membership, and a superuser is a member of every role.
--   * A forged column is refused (insufficient_privilege), not silently replaced: an app that
--     thinks it sets a state has a bug, and an error shows it at once.
-- request_approval stays SECURITY INVOKER: it inserts only request columns, so the column grants
-- suffice, and a definer function would run with the owner's rights for no gain.
-- The app role gets no UPDATE or DELETE on the outbox. Cancelling is an operator's command
-- (`dingsync outbox cancel`): rows carry no owner, so "its own pending row" could not be told from
-- another app's, and a column UPDATE grant on state would let an app move a row to any state.

-- 2. Only organisations served here. The worker takes only rows of its own corp_id, so a row for an
-- organisation no dingsync serves stayed pending for ever and was never announced on
-- dingsync_outbox_done. A row's corp_id must be in dingsync.corps (written by every dingsync at
-- start-up, store::outbox::register_corp).
--
-- While dingsync.corps is empty (no dingsync has started against this database yet), every insert
-- is refused, even with an explicit corp_id: nothing yet says which organisation this database will
-- serve, and the first start may register another one (e.g. the emulator's), which would leave the
-- row hanging exactly as above. default_corp_id() already refuses a row without corp_id then; this
-- makes the explicit case agree. Start dingsync once before apps ask for approvals.
CREATE FUNCTION dingsync.outbox_corp_served() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, dingsync, pg_temp
AS $$
DECLARE
    served text;
BEGIN
    -- An explicit NULL is the NOT NULL constraint's to report.
    IF NEW.corp_id IS NULL
       OR EXISTS (SELECT FROM dingsync.corps c WHERE c.corp_id = NEW.corp_id) THEN
        RETURN NEW;
    END IF;
    SELECT string_agg(c.corp_id, ', ' ORDER BY c.corp_id) INTO served FROM dingsync.corps c;
    IF served IS NULL THEN
        RAISE EXCEPTION 'dingsync.outbox: corp_id "%" is not served by this database: no organisation is registered yet (see dingsync.corps)',
            NEW.corp_id
            USING ERRCODE = 'check_violation',
                  HINT = 'Start dingsync once: it registers the organisation it serves (dingtalk.corp_id) in dingsync.corps.';
    END IF;
    RAISE EXCEPTION 'dingsync.outbox: corp_id "%" is not served by this database (see dingsync.corps)',
        NEW.corp_id
        USING ERRCODE = 'check_violation',
              HINT = format('This database serves: %s. Pass one of them, or leave corp_id out while only one is served.', served);
END;
$$;
COMMENT ON FUNCTION dingsync.outbox_corp_served() IS 'Trigger: refuses an outbox row whose corp_id is not in dingsync.corps (no dingsync would ever take it), naming the corp and the ones served.';
-- BEFORE triggers fire in name order: this one before outbox_validate, so an unknown organisation
-- is reported before the shape of the request.
CREATE TRIGGER outbox_corp_served
    BEFORE INSERT OR UPDATE OF corp_id ON dingsync.outbox
    FOR EACH ROW EXECUTE FUNCTION dingsync.outbox_corp_served();

-- 3. Functions and the schema.
--
-- Functions are executable by PUBLIC unless revoked. EXECUTE now goes only to the roles that need
-- it (roles block below); the owner (dingsync itself) keeps it. Triggers fire without an EXECUTE
-- check, so outbox_validate, outbox_wake, outbox_done and outbox_corp_served need no grant; a
-- column default and a CHECK constraint are checked against the inserting role, hence the app's
-- grants on default_corp_id, form_values_problem and approvers_problem.
--
-- ALTER DEFAULT PRIVILEGES is not used: a per-schema REVOKE cannot take back PUBLIC's global
-- default EXECUTE (PostgreSQL adds per-schema defaults to the global ones), and a global one
-- would change every function the migrating user creates anywhere in this database, which is
-- shared with the apps. A later migration that creates a function revokes PUBLIC's EXECUTE
-- itself; tests/app_role.rs fails while any function in the schema is executable by PUBLIC.
REVOKE ALL ON SCHEMA dingsync FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA dingsync FROM PUBLIC;

-- Every function whose body is resolved when it runs (PL/pgSQL) gets a fixed search_path, so a
-- caller's search_path cannot redirect an unqualified name (an operator, a function, a type) to
-- an object someone planted in another schema. pg_temp is named last: left out, it would be
-- searched first for tables and types.
--
-- Not dingsync.status_rank and dingsync.status_wins (V9): they are SQL-standard-body functions
-- (RETURN ...), parsed and bound to the objects they name when created, so search_path cannot
-- redirect them; and a SET clause would stop the planner from inlining them, which the ingest hot
-- path relies on (tests/status_rule.rs checks they stay inlined).
ALTER FUNCTION dingsync.default_corp_id() SET search_path = pg_catalog, dingsync, pg_temp;
ALTER FUNCTION dingsync.form_values_problem(jsonb) SET search_path = pg_catalog, dingsync, pg_temp;
ALTER FUNCTION dingsync.approvers_problem(jsonb) SET search_path = pg_catalog, dingsync, pg_temp;
ALTER FUNCTION dingsync.outbox_validate() SET search_path = pg_catalog, dingsync, pg_temp;
ALTER FUNCTION dingsync.outbox_wake() SET search_path = pg_catalog, dingsync, pg_temp;
ALTER FUNCTION dingsync.outbox_done() SET search_path = pg_catalog, dingsync, pg_temp;
ALTER FUNCTION dingsync.request_approval(text, text, text, jsonb, bigint, jsonb, text[], text, text)
    SET search_path = pg_catalog, dingsync, pg_temp;

-- The roles' rights, complete (this supersedes V8's list and the script of its NOTICE). Applied
-- whenever both roles exist, so it also repairs a database whose V8 could only print the script.
-- Otherwise a NOTICE gives the script to run as a superuser or CREATEROLE user.
DO $roles$
DECLARE
    grants text := $grants$
        GRANT USAGE ON SCHEMA dingsync TO dingsync_app, dingsync_report;
        GRANT SELECT ON dingsync.approvals, dingsync.approval_tasks TO dingsync_app;
        -- default_corp_id() and the outbox_corp_served trigger read the organisations served here.
        GRANT SELECT ON dingsync.corps TO dingsync_app;
        -- Outbox: read every column, insert only the request columns (part 1).
        REVOKE ALL ON dingsync.outbox FROM dingsync_app;
        GRANT SELECT ON dingsync.outbox TO dingsync_app;
        GRANT INSERT (corp_id, idempotency_key, process_code, originator_user_id, dept_id,
                      form_values, approvers, cc_list, cc_position)
            ON dingsync.outbox TO dingsync_app;
        -- request_approval, and what an insert evaluates as the inserting role: the corp_id
        -- default and the CHECK constraints' validators.
        GRANT EXECUTE ON FUNCTION
            dingsync.request_approval(text, text, text, jsonb, bigint, jsonb, text[], text, text),
            dingsync.default_corp_id(),
            dingsync.form_values_problem(jsonb),
            dingsync.approvers_problem(jsonb)
            TO dingsync_app;
        GRANT SELECT ON dingsync.report_turnaround, dingsync.report_pending_tasks,
                        dingsync.report_outbox_health, dingsync.report_sync_lag TO dingsync_report;
    $grants$;
BEGIN
    IF (SELECT count(*) FROM pg_roles WHERE rolname IN ('dingsync_app', 'dingsync_report')) < 2 THEN
        RAISE NOTICE 'dingsync: roles dingsync_app and dingsync_report are missing; as a superuser or CREATEROLE user, run in this database (this replaces the script of migration V8): CREATE ROLE dingsync_app NOLOGIN; CREATE ROLE dingsync_report NOLOGIN; %',
            grants;
        RETURN;
    END IF;
    EXECUTE grants;
END;
$roles$;

-- 4. The access token's fetch lease. Before, a replica needing a token took an advisory lock in a
-- transaction and held it, with its pool connection, across DingTalk's gettoken (up to the client
-- timeout). Now a replica claims the fetch in one short statement (succeeding only while no
-- unexpired lease is held), calls DingTalk with no connection held, and stores the token, clearing
-- the lease, in another. The others poll the row until a fresh token appears or the lease expires;
-- a replica that died between claim and store leaves only a lease that expires.
--
-- A row may now hold a lease and no token yet (the first fetch, or after a refused token was
-- cleared): the token columns are NULL together.
ALTER TABLE dingsync.access_tokens
    ALTER COLUMN access_token DROP NOT NULL,
    ALTER COLUMN expires_at DROP NOT NULL,
    ALTER COLUMN fetched_at DROP NOT NULL,
    ALTER COLUMN fetched_at DROP DEFAULT,
    ADD COLUMN fetching_until timestamptz,
    ADD CONSTRAINT access_tokens_token_complete
        CHECK (num_nulls(access_token, expires_at, fetched_at) IN (0, 3));
COMMENT ON COLUMN dingsync.access_tokens.access_token IS 'The token itself (secret); null while none is held (first fetch, or a refused token was dropped).';
COMMENT ON COLUMN dingsync.access_tokens.expires_at IS 'When DingTalk stops accepting it (fetch time + expires_in); null without a token.';
COMMENT ON COLUMN dingsync.access_tokens.fetched_at IS 'When it was fetched or last renewed; null without a token.';
COMMENT ON COLUMN dingsync.access_tokens.fetching_until IS 'Lease of the replica fetching a new token (database time); the others wait for its token until then, and one of them takes over after. Null when no fetch is under way.';
