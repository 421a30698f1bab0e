-- Every event dingsync received, as received. Events are hints (DingTalk's API is the truth), but
-- we keep them raw so that an operator can always see what arrived and replay it.
CREATE TABLE dingsync.events (
    corp_id             text        NOT NULL,
    id                  bigint      GENERATED ALWAYS AS IDENTITY,
    -- DingTalk re-encrypts every retry with a new random prefix, so the ciphertext cannot identify
    -- an event: the key is 'event:<eventId>' when the payload carries one, else
    -- 'sha256:<hex>' of the decrypted JSON with its keys sorted.
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
    PRIMARY KEY (corp_id, id),
    CONSTRAINT events_dedup_key_unique UNIQUE (corp_id, dedup_key),
    CONSTRAINT events_source_check CHECK (source IN ('http_push', 'failed_list', 'stream'))
);

CREATE INDEX events_instance_idx ON dingsync.events (corp_id, process_instance_id);
-- Retention deletes by age. Rows arrive in received_at order, so a BRIN index finds old ones for
-- almost no cost on the insert path (a btree here was a measurable share of each callback).
CREATE INDEX events_received_at_idx ON dingsync.events USING brin (received_at);

COMMENT ON TABLE dingsync.events IS 'Every DingTalk event received (HTTP push, failed-push list, stream), raw and decrypted, stored once. Written by dingsync only.';
COMMENT ON COLUMN dingsync.events.corp_id IS 'DingTalk organisation (CorpId) the event belongs to: the payload''s corpId/CorpId, else the configured dingtalk.corp_id.';
COMMENT ON COLUMN dingsync.events.id IS 'Arrival order within dingsync (identity).';
COMMENT ON COLUMN dingsync.events.dedup_key IS 'Identity of the event: event:<eventId> when DingTalk sent an eventId, else sha256:<hex> of the decrypted JSON with sorted keys. A redelivery (re-encrypted) has the same key and is not stored again.';
COMMENT ON COLUMN dingsync.events.source IS 'Where the event came from: http_push (POST /dingtalk/callback), failed_list (get_call_back_failed_result), stream (Stream mode).';
COMMENT ON COLUMN dingsync.events.event_type IS 'DingTalk EventType, e.g. bpms_instance_change, bpms_task_change; unknown types are stored too.';
COMMENT ON COLUMN dingsync.events.change_type IS 'The payload''s "type": start, finish, terminate, delete (instances); start, finish, cancel, comment (tasks). Null when absent.';
COMMENT ON COLUMN dingsync.events.process_instance_id IS 'Approval instance the event is about, when it names one.';
COMMENT ON COLUMN dingsync.events.task_id IS 'Approver task the event is about (bpms_task_change).';
COMMENT ON COLUMN dingsync.events.event_time IS 'When DingTalk says the change happened: EventTime, else finishTime, else createTime (epoch ms converted to timestamptz).';
COMMENT ON COLUMN dingsync.events.received_at IS 'When dingsync committed the event.';
COMMENT ON COLUMN dingsync.events.raw IS 'The decrypted message exactly as DingTalk sent it (text, byte for byte).';
COMMENT ON COLUMN dingsync.events.payload IS 'The decrypted message parsed as JSON, for querying.';
