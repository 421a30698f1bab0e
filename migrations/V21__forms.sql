-- Forms as typed views: every version of each template's form schema, the state of fetching
-- them, the schema dingsync_forms that holds one generated view per template, and the safe
-- parse functions those views are written with (docs/schema.md "Form views").

CREATE TABLE dingsync.process_forms (
    corp_id      text        NOT NULL,
    process_code text        NOT NULL,
    version      integer     NOT NULL CHECK (version >= 1),
    fingerprint  text        NOT NULL,
    name         text        NOT NULL,
    modified     text,
    controls     jsonb       NOT NULL CHECK (jsonb_typeof(controls) = 'array'),
    fetched_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (corp_id, process_code, version)
);

COMMENT ON TABLE dingsync.process_forms IS 'Every version of each approval template''s form schema dingsync has fetched (DingTalk''s forms/schemas/processCodes); a new version is stored only when the controls differ from the newest one. The form views in schema dingsync_forms are generated from it.';
COMMENT ON COLUMN dingsync.process_forms.corp_id IS 'DingTalk organisation (CorpId).';
COMMENT ON COLUMN dingsync.process_forms.process_code IS 'Approval template code (PROC-...).';
COMMENT ON COLUMN dingsync.process_forms.version IS 'Version number, from 1, per template: one more for each change of the controls dingsync has seen.';
COMMENT ON COLUMN dingsync.process_forms.fingerprint IS 'SHA-256 (hex) of the controls: the same controls, the same fingerprint.';
COMMENT ON COLUMN dingsync.process_forms.name IS 'Template name as DingTalk gave it with this version, e.g. 报销.';
COMMENT ON COLUMN dingsync.process_forms.modified IS 'DingTalk''s gmtModified of the template, as text (its format is not documented).';
COMMENT ON COLUMN dingsync.process_forms.controls IS 'The controls: JSON array of {id, component, label, biz_alias, required, options, format, children} in form order; children are a table control''s columns.';
COMMENT ON COLUMN dingsync.process_forms.fetched_at IS 'When dingsync fetched this version.';

CREATE TABLE dingsync.form_templates (
    corp_id        text        NOT NULL,
    process_code   text        NOT NULL,
    wanted_at      timestamptz,
    checked_at     timestamptz,
    next_try_at    timestamptz,
    last_error     text,
    compared_until timestamptz,
    unexplained    jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(unexplained) = 'array'),
    views          text[]      NOT NULL DEFAULT '{}',
    view_hash      text,
    generated_at   timestamptz,
    PRIMARY KEY (corp_id, process_code)
);

COMMENT ON TABLE dingsync.form_templates IS 'Internal: each template dingsync has seen (in approvals, the outbox or reconcile.process_codes) and the state of its schema: when a fetch is due, when it was last fetched, and which views were generated for it.';
COMMENT ON COLUMN dingsync.form_templates.corp_id IS 'DingTalk organisation (CorpId).';
COMMENT ON COLUMN dingsync.form_templates.process_code IS 'Approval template code (PROC-...).';
COMMENT ON COLUMN dingsync.form_templates.wanted_at IS 'Set when a fetch of the schema is due: the template is new, or an approval''s form values name a control or label the stored schema lacks. Cleared by the fetch.';
COMMENT ON COLUMN dingsync.form_templates.checked_at IS 'When the schema was last fetched successfully (a new version or the same).';
COMMENT ON COLUMN dingsync.form_templates.next_try_at IS 'After a failed fetch: not tried again before this time.';
COMMENT ON COLUMN dingsync.form_templates.last_error IS 'Why the last fetch failed (DingTalk''s answer or the transport problem); null after a success.';
COMMENT ON COLUMN dingsync.form_templates.compared_until IS 'Approvals created before this (less a margin for the detail fetch) have had their form values compared with the schema.';
COMMENT ON COLUMN dingsync.form_templates.unexplained IS 'Controls approvals carry that the schema fetched after seeing them still lacks: JSON array of [id, label]; not a reason for another fetch.';
COMMENT ON COLUMN dingsync.form_templates.views IS 'The views of schema dingsync_forms generated for this template (the form view and its line-item views).';
COMMENT ON COLUMN dingsync.form_templates.view_hash IS 'SHA-256 of the SQL the views were generated with: a different one (new version, new names in [forms]) regenerates them.';
COMMENT ON COLUMN dingsync.form_templates.generated_at IS 'When the views were last generated.';

COMMENT ON COLUMN dingsync.usage.purpose IS 'What the call was for (outbox, search, details, gap, sweep, poll, backfill, failed, drift, doctor, callback, token, forms); for a delivery: push (stored) or refused (dingsync answered an error).';

CREATE SCHEMA dingsync_forms;
COMMENT ON SCHEMA dingsync_forms IS 'One generated view per approval template (typed columns per form control) and one per table control (line items); written by dingsync only, readable by dingsync_report and dingsync_app.';

-- The safe parse functions. Each answers NULL for a value that does not parse, never an error,
-- so that no text DingTalk sends can make a query on a form view fail: a regular expression
-- decides before any conversion, so a conversion never sees text it would refuse.
--
-- Speed matters (a report evaluates them per approval; benches/forms.rs). The ones that can be
-- are SQL-standard bodies the planner inlines: bound when created (no search_path can redirect
-- them, no SET clause that would stop the inlining), each using its argument once (an argument
-- used twice is evaluated twice), built only of immutable functions (a stable one, such as
-- jsonb_build_object or a text-to-date cast, stops the inlining). Dates, times and JSON need
-- more than one expression: PL/pgSQL with a fixed search_path. Regular expressions use no
-- bounded repetition ({1,200}) or lookahead: PostgreSQL's engine makes those a hundred times
-- slower. form_jsonb alone needs an exception block (JSON cannot be checked by a regular
-- expression): it and the functions that call it are PARALLEL UNSAFE, since no process of a
-- parallel query, the leader included, may start the subtransaction (RESTRICTED is not enough:
-- such a query fails with "cannot start subtransactions during a parallel operation").

-- The value text of control `control_id` in an approval's form values (DingTalk's strings;
-- a non-string value as its JSON text). lax mode and silent: any shape of form_values is read,
-- never an error.
CREATE FUNCTION dingsync.form_value(form_values jsonb, control_id text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN jsonb_path_query_first(form_values, 'lax $[*] ? (@.id == $id)',
                                  jsonb_object(ARRAY['id', control_id]), true) ->> 'value';

CREATE FUNCTION dingsync.form_ext(form_values jsonb, control_id text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN jsonb_path_query_first(form_values, 'lax $[*] ? (@.id == $id).ext_value',
                                  jsonb_object(ARRAY['id', control_id]), true) #>> '{}';

CREATE FUNCTION dingsync.form_text(t text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN NULLIF(t, '');

-- An empty multi-line text reads back as the literal "null" (docs/dingtalk.md §2.3).
CREATE FUNCTION dingsync.form_textarea(t text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN NULLIF(NULLIF(t, ''), 'null');

-- Plain decimal notation only (an optional sign, digits, a point): a currency sign, thousands
-- separators, an exponent or words make it NULL. Without an exponent no text of DingTalk's
-- 65,535 characters exceeds numeric's range (131,072 digits before the point; digits after it
-- beyond its scale are rounded, not refused).
CREATE FUNCTION dingsync.form_numeric(t text) RETURNS numeric
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN substring(t FROM '^\s*([-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*$')::numeric;

-- A day of the proleptic calendar from its parts, or NULL when there is no such day.
CREATE FUNCTION dingsync.form_ymd(y integer, m integer, d integer) RETURNS date
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE
        WHEN y BETWEEN 1 AND 9999 AND m BETWEEN 1 AND 12 AND d BETWEEN 1 AND
             CASE WHEN m = 2 THEN CASE WHEN (y % 4 = 0 AND y % 100 <> 0) OR y % 400 = 0 THEN 29 ELSE 28 END
                  WHEN m IN (4, 6, 9, 11) THEN 30 ELSE 31 END
        THEN make_date(y, m, d) END;

-- yyyy-MM-dd, optionally followed by a time (dropped), as DingTalk writes a date control.
CREATE FUNCTION dingsync.form_date(t text) RETURNS date
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, dingsync, pg_temp
AS $$
DECLARE
    p text[] := regexp_match(t, '^\s*([0-9]{4})-([0-9][0-9]?)-([0-9][0-9]?)(?:[ T][0-9][0-9]?:[0-9][0-9](?::[0-9][0-9])?)?\s*$');
BEGIN
    IF p IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN dingsync.form_ymd(p[1]::integer, p[2]::integer, p[3]::integer);
END;
$$;

-- yyyy-MM-dd HH:mm[:ss] in Beijing time (DingTalk's zone for form values); a bare date is its
-- midnight.
CREATE FUNCTION dingsync.form_timestamptz(t text) RETURNS timestamptz
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, dingsync, pg_temp
AS $$
DECLARE
    p text[] := regexp_match(t, '^\s*([0-9]{4})-([0-9][0-9]?)-([0-9][0-9]?)(?:[ T]([0-9][0-9]?):([0-9][0-9])(?::([0-9][0-9]))?)?\s*$');
    day date;
BEGIN
    IF p IS NULL THEN
        RETURN NULL;
    END IF;
    day := dingsync.form_ymd(p[1]::integer, p[2]::integer, p[3]::integer);
    IF day IS NULL OR coalesce(p[4]::integer, 0) > 23 OR coalesce(p[5]::integer, 0) > 59
       OR coalesce(p[6]::integer, 0) > 59 THEN
        RETURN NULL;
    END IF;
    RETURN (day + make_interval(hours => coalesce(p[4]::integer, 0), mins => coalesce(p[5]::integer, 0),
                                secs => coalesce(p[6]::integer, 0)))
           AT TIME ZONE 'Asia/Shanghai';
END;
$$;

-- Part n (1 or 2) of a date range's value, JSON text of two strings ["2026-01-01","2026-01-05"].
CREATE FUNCTION dingsync.form_range_part(t text, n integer) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN (regexp_match(t, '^\s*\[\s*"([^"\\]*)"\s*,\s*"([^"\\]*)"\s*\]\s*$'))[n];

-- JSON text as jsonb, or NULL when it is not JSON (also: nested too deep, \u0000).
CREATE FUNCTION dingsync.form_jsonb(t text) RETURNS jsonb
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL UNSAFE
    SET search_path = pg_catalog, dingsync, pg_temp
AS $$
BEGIN
    IF t !~ '^\s*[\[{"]' THEN
        RETURN NULL;
    END IF;
    RETURN t::jsonb;
EXCEPTION
    WHEN data_exception OR program_limit_exceeded OR statement_too_complex THEN
        RETURN NULL;
END;
$$;

-- A JSON array's elements as text (multi select, related approvals, userids).
CREATE FUNCTION dingsync.form_text_array(t text) RETURNS text[]
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL UNSAFE
    SET search_path = pg_catalog, dingsync, pg_temp
AS $$
DECLARE
    j jsonb := dingsync.form_jsonb(t);
BEGIN
    IF jsonb_typeof(j) IS DISTINCT FROM 'array' THEN
        RETURN NULL;
    END IF;
    RETURN ARRAY(SELECT jsonb_array_elements_text(j));
END;
$$;

-- Departments: a JSON array, or ids separated by commas (docs/dingtalk.md §2.2).
CREATE FUNCTION dingsync.form_list(t text) RETURNS text[]
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL UNSAFE
    SET search_path = pg_catalog, dingsync, pg_temp
AS $$
BEGIN
    IF btrim(t) = '' THEN
        RETURN NULL;
    END IF;
    IF t ~ '^\s*\[' THEN
        RETURN dingsync.form_text_array(t);
    END IF;
    RETURN ARRAY(SELECT btrim(x) FROM unnest(string_to_array(t, ',')) AS x WHERE btrim(x) <> '');
END;
$$;

-- People: the userids (emplId) of ext_value [{"emplId","name"}]; else the value as a JSON array
-- of userids (as a create sends it). The value itself reads back as display names.
CREATE FUNCTION dingsync.form_userids(ext text, t text) RETURNS text[]
    LANGUAGE plpgsql IMMUTABLE PARALLEL UNSAFE
    SET search_path = pg_catalog, dingsync, pg_temp
AS $$
DECLARE
    j jsonb := dingsync.form_jsonb(ext);
BEGIN
    IF jsonb_typeof(j) = 'array' THEN
        RETURN ARRAY(SELECT e ->> 'emplId' FROM jsonb_array_elements(j) AS e
                     WHERE jsonb_typeof(e) = 'object' AND e ? 'emplId');
    END IF;
    RETURN dingsync.form_text_array(t);
END;
$$;

-- A table control's line items: its value's JSON array, or an empty one.
CREATE FUNCTION dingsync.form_rows(t text) RETURNS jsonb
    LANGUAGE plpgsql IMMUTABLE PARALLEL UNSAFE
    SET search_path = pg_catalog, dingsync, pg_temp
AS $$
DECLARE
    j jsonb := dingsync.form_jsonb(t);
BEGIN
    IF jsonb_typeof(j) = 'array' THEN
        RETURN j;
    END IF;
    RETURN '[]'::jsonb;
END;
$$;

-- One cell of a line item: by the column's control id (key), else by its label; read back as
-- {"rowValue": [{"key", "label", "value", ...}]} (docs/dingtalk.md §2.3), or a row as a create
-- sends it ([{"name", "value"}]).
CREATE FUNCTION dingsync.form_cell(item jsonb, key text, label text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN coalesce(
        jsonb_path_query_first(item, 'lax $.rowValue[*] ? (@.key == $k)', jsonb_object(ARRAY['k', key]), true),
        jsonb_path_query_first(item, 'lax $.rowValue[*] ? (@.label == $l)', jsonb_object(ARRAY['l', label]), true),
        jsonb_path_query_first(item, 'strict $[*] ? (@.name == $l)', jsonb_object(ARRAY['l', label]), true)) ->> 'value';

COMMENT ON FUNCTION dingsync.form_value(jsonb, text) IS 'The value text of control control_id in approvals.form_values; NULL when absent. Never raises.';
COMMENT ON FUNCTION dingsync.form_ext(jsonb, text) IS 'The ext_value text of control control_id in approvals.form_values; NULL when absent. Never raises.';
COMMENT ON FUNCTION dingsync.form_text(text) IS 'Text control: NULL for empty text.';
COMMENT ON FUNCTION dingsync.form_textarea(text) IS 'Multi-line text: NULL for empty text and for the literal null DingTalk reads back for an empty one.';
COMMENT ON FUNCTION dingsync.form_numeric(text) IS 'Number/money in plain decimal notation as numeric; NULL for anything else (currency signs, thousands separators, words). Never raises.';
COMMENT ON FUNCTION dingsync.form_ymd(integer, integer, integer) IS 'make_date that answers NULL for a day that does not exist.';
COMMENT ON FUNCTION dingsync.form_date(text) IS 'yyyy-MM-dd (optionally with a time, dropped) as date; NULL for anything else or a day that does not exist. Never raises.';
COMMENT ON FUNCTION dingsync.form_timestamptz(text) IS 'yyyy-MM-dd HH:mm[:ss] in Beijing time (a bare date: its midnight) as timestamptz; NULL for anything else. Never raises.';
COMMENT ON FUNCTION dingsync.form_range_part(text, integer) IS 'Part 1 or 2 of a date range value ["start","end"]; NULL when it has not that shape.';
COMMENT ON FUNCTION dingsync.form_jsonb(text) IS 'JSON text as jsonb; NULL when it is not JSON. Never raises.';
COMMENT ON FUNCTION dingsync.form_text_array(text) IS 'A JSON array''s elements as text[]; NULL when the text is not a JSON array.';
COMMENT ON FUNCTION dingsync.form_list(text) IS 'Departments: a JSON array, or comma-separated ids, as text[].';
COMMENT ON FUNCTION dingsync.form_userids(text, text) IS 'People: the userids (emplId) of ext_value, else the value as a JSON array of userids.';
COMMENT ON FUNCTION dingsync.form_rows(text) IS 'A table control''s value as a jsonb array of line items; an empty array when it is not one.';
COMMENT ON FUNCTION dingsync.form_cell(jsonb, text, text) IS 'A cell of a line item by control id, else by label; NULL when absent.';

-- Nobody but the roles below executes them (a per-schema default cannot revoke PUBLIC's).
DO $grants$
DECLARE
    f text;
    fns text[] := ARRAY['dingsync.form_value(jsonb, text)', 'dingsync.form_ext(jsonb, text)',
        'dingsync.form_text(text)', 'dingsync.form_textarea(text)', 'dingsync.form_numeric(text)',
        'dingsync.form_ymd(integer, integer, integer)', 'dingsync.form_date(text)',
        'dingsync.form_timestamptz(text)', 'dingsync.form_range_part(text, integer)',
        'dingsync.form_jsonb(text)', 'dingsync.form_text_array(text)', 'dingsync.form_list(text)',
        'dingsync.form_userids(text, text)', 'dingsync.form_rows(text)',
        'dingsync.form_cell(jsonb, text, text)'];
    role text;
BEGIN
    FOREACH f IN ARRAY fns LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
    -- The form views call these with the reader's rights (PostgreSQL checks a view's functions
    -- against the user of the view), and read the tables with dingsync's.
    FOREACH role IN ARRAY ARRAY['dingsync_report', 'dingsync_app'] LOOP
        IF EXISTS (SELECT FROM pg_roles WHERE rolname = role) THEN
            FOREACH f IN ARRAY fns LOOP
                EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f, role);
            END LOOP;
            EXECUTE format('GRANT USAGE ON SCHEMA dingsync_forms TO %I', role);
            EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA dingsync_forms GRANT SELECT ON TABLES TO %I', role);
        ELSE
            RAISE NOTICE 'dingsync: role % does not exist (see migration V8); form views will not be readable by it', role;
        END IF;
    END LOOP;
END;
$grants$;
