-- State the DingTalk client shares between replicas: one access token per app, and one request
-- budget per app. Internal tables: documented, not part of the public contract.

CREATE TABLE dingsync.access_tokens (
    corp_id      text        NOT NULL,
    app_key      text        NOT NULL,
    -- A credential: readable only by dingsync's own role (see README, "Database roles").
    access_token text        NOT NULL,
    expires_at   timestamptz NOT NULL,
    fetched_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (corp_id, app_key)
);
COMMENT ON TABLE dingsync.access_tokens IS 'Internal: the DingTalk access token shared by all dingsync replicas (one gettoken for all). Contains a credential.';
COMMENT ON COLUMN dingsync.access_tokens.corp_id IS 'DingTalk organisation (CorpId).';
COMMENT ON COLUMN dingsync.access_tokens.app_key IS 'The app (AppKey) the token belongs to.';
COMMENT ON COLUMN dingsync.access_tokens.access_token IS 'The token itself (secret).';
COMMENT ON COLUMN dingsync.access_tokens.expires_at IS 'When DingTalk stops accepting it (fetch time + expires_in).';
COMMENT ON COLUMN dingsync.access_tokens.fetched_at IS 'When it was fetched or last renewed.';

-- Request budget as a schedule of slots (GCRA): each call takes the next free slot, slots are
-- 1/qps apart, so no one-second window ever holds more than qps calls, whichever replica calls.
CREATE TABLE dingsync.rate_budget (
    corp_id text        NOT NULL,
    app_key text        NOT NULL,
    next_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (corp_id, app_key)
);
COMMENT ON TABLE dingsync.rate_budget IS 'Internal: the shared DingTalk request budget of each app; next_at is the earliest free call slot.';
COMMENT ON COLUMN dingsync.rate_budget.corp_id IS 'DingTalk organisation (CorpId).';
COMMENT ON COLUMN dingsync.rate_budget.app_key IS 'The app (AppKey) the budget belongs to.';
COMMENT ON COLUMN dingsync.rate_budget.next_at IS 'Earliest time the next call may be made (advanced by 1/qps per call).';
