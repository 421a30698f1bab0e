-- dingsync.events partitioned by month of received_at (UTC months), so that retention drops a
-- whole month's partition (a catalog change: no dead rows, no vacuum, no WAL per row) instead of
-- deleting old rows in batches, which at tens of millions of events was most of the retention
-- job's time and left the table to autovacuum (docs/BENCHMARKS.md, "Retention").
--
-- Dedup. A unique index on a partitioned table must contain the partition key, so
-- UNIQUE (corp_id, dedup_key) cannot stay on events: (corp_id, dedup_key, received_at) would let
-- a redelivery received in another month through. The identity of every event is
-- dingsync.event_keys (V11): unpartitioned, primary key (corp_id, dedup_key), written in the same
-- statement as the event, kept at least as long as the events (retention.event_keys_days >=
-- retention.events_days) and consulted first: an event row is inserted only when its key was new
-- (src/store/batch.rs). The second guard V2's constraint used to give (an event written without
-- its key by a dingsync older than V11) has no writer left: dingsync refuses to serve with
-- migrations missing, and every version since V11 writes the key first.
--
-- Keys lead with corp_id (a sharded PostgreSQL distributes events by it, docs/scaling.md); the
-- primary key carries received_at because it must.
--
-- PostgreSQL 15 has no identity columns on partitioned tables: id comes from a sequence (same
-- arrival order, same values: the sequence continues where V2's identity stopped).

ALTER TABLE dingsync.events RENAME TO events_v21;
ALTER INDEX dingsync.events_pkey RENAME TO events_v21_pkey;
ALTER TABLE dingsync.events_v21 RENAME CONSTRAINT events_dedup_key_unique TO events_v21_dedup_key_unique;
ALTER INDEX dingsync.events_instance_idx RENAME TO events_v21_instance_idx;
ALTER INDEX dingsync.events_received_at_idx RENAME TO events_v21_received_at_idx;
-- Drops the identity's sequence (dingsync.events_id_seq), whose name the new one takes.
ALTER TABLE dingsync.events_v21 ALTER COLUMN id DROP IDENTITY;

CREATE SEQUENCE dingsync.events_id_seq AS bigint;

CREATE TABLE dingsync.events (
    corp_id             text        NOT NULL,
    id                  bigint      NOT NULL DEFAULT nextval('dingsync.events_id_seq'),
    dedup_key           text        NOT NULL,
    source              text        NOT NULL,
    event_type          text        NOT NULL,
    change_type         text,
    process_instance_id text,
    task_id             bigint,
    event_time          timestamptz,
    received_at         timestamptz NOT NULL DEFAULT now(),
    raw                 text        NOT NULL,
    payload             jsonb       NOT NULL,
    CONSTRAINT events_pkey PRIMARY KEY (corp_id, id, received_at),
    CONSTRAINT events_source_check CHECK (source IN ('http_push', 'failed_list', 'stream'))
) PARTITION BY RANGE (received_at);
ALTER SEQUENCE dingsync.events_id_seq OWNED BY dingsync.events.id;

CREATE INDEX events_instance_idx ON dingsync.events (corp_id, process_instance_id);
-- Within a month's partition rows still arrive in received_at order: BRIN finds the old rows of
-- the default partition and of a month shared with another organisation (src/store/prune.rs).
CREATE INDEX events_received_at_idx ON dingsync.events USING brin (received_at);

-- Catches a row whose month has no partition yet (a clock far ahead, start-up before the first
-- partition was made), so that storing an event never fails for want of a partition.
-- create_events_partition moves such rows into their month's partition when it makes one.
CREATE TABLE dingsync.events_default PARTITION OF dingsync.events DEFAULT;

-- One month's partition, dingsync.events_YYYY_MM for [first of month, first of next month) UTC.
-- Idempotent (false when it exists); rows the default partition holds for that month move into
-- it in the same transaction (attaching checks the default holds none of the month's rows).
-- Called by this migration, at start-up and by the retention job (src/store/prune.rs), a few
-- months ahead.
CREATE FUNCTION dingsync.create_events_partition(month date) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, dingsync, pg_temp
AS $$
DECLARE
    first timestamp := date_trunc('month', month::timestamp);
    lo timestamptz := first AT TIME ZONE 'UTC';
    hi timestamptz := (first + interval '1 month') AT TIME ZONE 'UTC';
    name text := 'events_' || to_char(first, 'YYYY_MM');
BEGIN
    IF to_regclass('dingsync.' || name) IS NOT NULL THEN
        RETURN false;
    END IF;
    -- Two replicas making the same month: the second waits here, then finds the table.
    PERFORM pg_advisory_xact_lock(hashtextextended('dingsync.events_partition:' || name, 0));
    IF to_regclass('dingsync.' || name) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE dingsync.%I (LIKE dingsync.events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', name);
    EXECUTE format(
        'WITH moved AS (DELETE FROM dingsync.events_default WHERE received_at >= $1 AND received_at < $2 RETURNING *)
         INSERT INTO dingsync.%I SELECT * FROM moved', name)
        USING lo, hi;
    EXECUTE format('ALTER TABLE dingsync.events ATTACH PARTITION dingsync.%I FOR VALUES FROM (%L) TO (%L)',
                   name, lo, hi);
    RETURN true;
END
$$;
REVOKE EXECUTE ON FUNCTION dingsync.create_events_partition(date) FROM PUBLIC;

-- Every month of the stored events, and three ahead.
SELECT dingsync.create_events_partition(m::date)
FROM generate_series(
    date_trunc('month', coalesce((SELECT min(received_at) FROM dingsync.events_v21), now()) AT TIME ZONE 'UTC'),
    date_trunc('month', now() AT TIME ZONE 'UTC') + interval '3 months',
    interval '1 month') AS m;

INSERT INTO dingsync.events
    (corp_id, id, dedup_key, source, event_type, change_type, process_instance_id, task_id,
     event_time, received_at, raw, payload)
SELECT corp_id, id, dedup_key, source, event_type, change_type, process_instance_id, task_id,
       event_time, received_at, raw, payload
FROM dingsync.events_v21
ORDER BY received_at, id;
SELECT setval('dingsync.events_id_seq', max(id)) FROM dingsync.events HAVING max(id) IS NOT NULL;

-- The one view on events (V8), rebound to the new table; its grants and comments stay.
CREATE OR REPLACE VIEW dingsync.report_sync_lag AS
SELECT
    c.corp_id,
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

DROP TABLE dingsync.events_v21;

COMMENT ON TABLE dingsync.events IS 'Every DingTalk event received (HTTP push, failed-push list, stream), raw and decrypted, stored once (dedup by dingsync.event_keys). Partitioned by UTC month of received_at (events_YYYY_MM, and events_default for a month without one); retention drops whole months. Written by dingsync only.';
COMMENT ON TABLE dingsync.events_default IS 'Internal: the default partition of dingsync.events, for a row whose month has no partition yet; dingsync.create_events_partition moves its rows into their month''s partition. Normally empty.';
COMMENT ON COLUMN dingsync.events.corp_id IS 'DingTalk organisation (CorpId) the event belongs to: the payload''s corpId/CorpId, else the configured dingtalk.corp_id.';
COMMENT ON COLUMN dingsync.events.id IS 'Arrival order within dingsync (sequence events_id_seq).';
COMMENT ON COLUMN dingsync.events.dedup_key IS 'Identity of the event: event:<eventId> when DingTalk sent an eventId, else sha256:<hex> of the decrypted JSON with sorted keys. A redelivery (re-encrypted) has the same key and is not stored again (unique in dingsync.event_keys, not here: a partitioned table''s unique keys must include received_at).';
COMMENT ON COLUMN dingsync.events.source IS 'Where the event came from: http_push (POST /dingtalk/callback), failed_list (get_call_back_failed_result), stream (Stream mode).';
COMMENT ON COLUMN dingsync.events.event_type IS 'DingTalk EventType, e.g. bpms_instance_change, bpms_task_change; unknown types are stored too.';
COMMENT ON COLUMN dingsync.events.change_type IS 'The payload''s "type": start, finish, terminate, delete (instances); start, finish, cancel, comment (tasks). Null when absent.';
COMMENT ON COLUMN dingsync.events.process_instance_id IS 'Approval instance the event is about, when it names one.';
COMMENT ON COLUMN dingsync.events.task_id IS 'Approver task the event is about (bpms_task_change).';
COMMENT ON COLUMN dingsync.events.event_time IS 'When DingTalk says the change happened: EventTime, else finishTime, else createTime (epoch ms converted to timestamptz).';
COMMENT ON COLUMN dingsync.events.received_at IS 'When dingsync committed the event; the partition key (UTC month).';
COMMENT ON COLUMN dingsync.events.raw IS 'The message exactly as DingTalk sent it (text, byte for byte): the decrypted push, the failed-list item, or the Stream frame (headers and the data string).';
COMMENT ON COLUMN dingsync.events.payload IS 'The raw message parsed as JSON, for querying (for a Stream event: the frame, its event fields in the data string).';
