-- Comments for the allowance ledger's tables (V12), for DBAs reading the catalogue; and the snapshot
-- sources of V14 and V15 together.
COMMENT ON TABLE dingsync.usage IS
    'DingTalk''s monthly allowances (docs/dingtalk.md §7): calls dingsync made and events delivered to it, per organisation, Beijing day, API and purpose; added to by every replica about once a second.';
COMMENT ON COLUMN dingsync.usage.corp_id IS 'The organisation (CorpId).';
COMMENT ON COLUMN dingsync.usage.day IS 'Calendar day in Beijing time (UTC+8); a month is the sum of its days.';
COMMENT ON COLUMN dingsync.usage.kind IS '''call'' (a request to DingTalk''s API) or ''delivery'' (an event pushed to dingsync).';
COMMENT ON COLUMN dingsync.usage.api IS 'The endpoint called (e.g. topapi/processinstance/get) or, for a delivery, the event type.';
COMMENT ON COLUMN dingsync.usage.purpose IS 'What the call was for (outbox, search, details, gap, sweep, poll, backfill, failed, drift, doctor, callback, token); for a delivery: push (stored) or refused (dingsync answered an error).';
COMMENT ON COLUMN dingsync.usage.metered IS 'Whether DingTalk counts it against the allowance (every call but gettoken; a path answered with 90020 becomes metered).';
COMMENT ON COLUMN dingsync.usage.count IS 'How many.';
COMMENT ON COLUMN dingsync.usage.last_at IS 'When the last of them happened (on the planning clock).';
COMMENT ON TABLE dingsync.quota_pause IS
    'DingTalk answered 90020 (monthly allowance used up): metered calls pause until the Beijing month ends, dingsync quota resume, or another dingtalk.monthly_calls.';
COMMENT ON COLUMN dingsync.quota_pause.corp_id IS 'The organisation (CorpId).';
COMMENT ON COLUMN dingsync.quota_pause.month IS 'First day of the Beijing month the pause belongs to.';
COMMENT ON COLUMN dingsync.quota_pause.paused_at IS 'When metered calls were paused.';
COMMENT ON COLUMN dingsync.quota_pause.allowance IS 'dingtalk.monthly_calls in force when it paused; a different setting lifts the pause.';
COMMENT ON COLUMN dingsync.quota_pause.reason IS 'DingTalk''s answer, or dingsync''s own allowance reached.';

-- V14 (gap, poll) and V15 (search) each widened the snapshot sources from V7's three; together:
ALTER TABLE dingsync.approvals
    DROP CONSTRAINT approvals_snapshot_source_check,
    ADD CONSTRAINT approvals_snapshot_source_check
        CHECK (snapshot_source IN ('details', 'sweep', 'backfill', 'gap', 'poll', 'search'));

COMMENT ON COLUMN dingsync.approvals.snapshot_source IS 'Provenance: which job fetched the applied snapshot: details (the one fetch after the first event), sweep (open approval re-checked), gap (a missing event suspected), poll (pushes missing), backfill (found by listids) or search (the outbox looking for an instance whose create got no answer).';
