-- The identity of every event received, kept longer than the raw events. Dedup used to rest on
-- dingsync.events' unique (corp_id, dedup_key) alone, so once retention deleted an event (180 days
-- by default) the same signed push, replayed, counted as new: stored and applied again. The keys
-- are small (corp id, dedup key, time) and are pruned only after retention.event_keys_days, which
-- must be at least retention.events_days. The ingest statement (src/store/batch.rs) inserts an
-- event's key in the same statement as the event: no extra round trip.
CREATE TABLE dingsync.event_keys (
    corp_id     text        NOT NULL,
    dedup_key   text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT event_keys_pkey PRIMARY KEY (corp_id, dedup_key)
);
-- Retention deletes by age; rows arrive in received_at order (BRIN costs next to nothing on the
-- ingest path, as for events).
CREATE INDEX event_keys_received_at_idx ON dingsync.event_keys USING brin (received_at);

-- The events stored so far, in arrival order so that the BRIN ranges stay tight.
INSERT INTO dingsync.event_keys (corp_id, dedup_key, received_at)
SELECT corp_id, dedup_key, received_at
FROM dingsync.events
ORDER BY received_at;

COMMENT ON TABLE dingsync.event_keys IS 'Internal: the identity of every event received (HTTP push, failed-push list), kept after its raw event is pruned so that a replay or redelivery is never stored or applied twice. Pruned after retention.event_keys_days.';
COMMENT ON COLUMN dingsync.event_keys.corp_id IS 'DingTalk organisation (CorpId) of the event, as in dingsync.events.';
COMMENT ON COLUMN dingsync.event_keys.dedup_key IS 'The event''s dedup key, as in dingsync.events.dedup_key: event:<eventId>, or sha256:<hex> of the decrypted JSON with sorted keys.';
COMMENT ON COLUMN dingsync.event_keys.received_at IS 'When dingsync first committed the event.';
