-- The outbox's search for lost create answers (src/outbox/search.rs) resolves every `unknown` row
-- of one organisation, template and originator together: one listids listing serves them all, and
-- the instances it finds are matched oldest first to the oldest rows. Two replicas doing that for
-- the same originator at once would each list and fetch the same instances, and could pair
-- identical requests with instances differently; this lease lets one search at a time run per
-- originator. A row, not an advisory lock: session locks do not survive PgBouncer's transaction
-- pooling, and a transaction held open across DingTalk calls would hold a connection (and its
-- locks) for seconds. A replica that dies mid-search leaves a row that expires by itself.
CREATE TABLE dingsync.outbox_search (
    corp_id            text        NOT NULL,
    process_code       text        NOT NULL,
    originator_user_id text        NOT NULL,
    held_until         timestamptz NOT NULL,
    CONSTRAINT outbox_search_pkey PRIMARY KEY (corp_id, process_code, originator_user_id)
);

COMMENT ON TABLE dingsync.outbox_search IS 'Internal: which originator''s lost create answers a replica is searching DingTalk for right now (one search per organisation, template and originator at a time). Rows are deleted when the search ends and ignored once held_until has passed.';
COMMENT ON COLUMN dingsync.outbox_search.corp_id IS 'DingTalk organisation (CorpId) of the outbox rows searched for.';
COMMENT ON COLUMN dingsync.outbox_search.process_code IS 'Template of the rows searched for.';
COMMENT ON COLUMN dingsync.outbox_search.originator_user_id IS 'Originator of the rows searched for.';
COMMENT ON COLUMN dingsync.outbox_search.held_until IS 'The search''s lease: another replica may start a search for the same originator after this time.';

-- A search that fetches an instance with processinstance/get applies that snapshot to the approval
-- (so the detail fetch its events asked for is not needed): a fourth provenance.
ALTER TABLE dingsync.approvals
    DROP CONSTRAINT approvals_snapshot_source_check,
    ADD CONSTRAINT approvals_snapshot_source_check
        CHECK (snapshot_source IN ('details', 'sweep', 'backfill', 'search'));

COMMENT ON COLUMN dingsync.approvals.snapshot_source IS 'Provenance: which job fetched the applied snapshot: details (after an event), sweep (open approval re-checked), backfill (found by listids) or search (the outbox looking for an instance whose create got no answer).';
