-- Stream mode (src/stream/) stores events with source 'stream', which V2's CHECK already allows;
-- what changes is what the comments say: a Stream event's raw text is the frame as it arrived
-- (its data is the event's fields as a JSON string, its headers the envelope), the ledger has a
-- purpose 'stream' (opening a connection), and event_keys hold Stream events' keys too.
COMMENT ON COLUMN dingsync.events.raw IS 'The message exactly as DingTalk sent it (text, byte for byte): the decrypted push, the failed-list item, or the Stream frame (headers and the data string).';
COMMENT ON COLUMN dingsync.events.payload IS 'The raw message parsed as JSON, for querying (for a Stream event: the frame, its event fields in the data string).';
COMMENT ON TABLE dingsync.event_keys IS 'Internal: the identity of every event received (HTTP push, failed-push list, stream), kept after its raw event is pruned so that a replay or redelivery is never stored or applied twice. Pruned after retention.event_keys_days.';
COMMENT ON COLUMN dingsync.usage.purpose IS 'What the call was for (outbox, search, details, gap, sweep, poll, backfill, failed, drift, doctor, callback, token, stream: opening a Stream connection); for a delivery: push (stored) or refused (dingsync answered an error).';
