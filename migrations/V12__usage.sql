-- The ledger of DingTalk's two monthly allowances (docs/dingtalk.md §7): every call dingsync makes
-- and every event delivered to it, per organisation, per calendar day in Beijing time (DingTalk's
-- month presumably turns over at Beijing midnight; a month is the sum of its days). Rows are
-- counters, added to by every replica (`store::usage`), so totals survive restarts and are shared.
CREATE TABLE dingsync.usage (
    corp_id  text    NOT NULL,
    -- Calendar day in Asia/Shanghai (UTC+8, no daylight saving).
    day      date    NOT NULL,
    -- 'call': an HTTP request to DingTalk's API; 'delivery': an event pushed to dingsync.
    kind     text    NOT NULL CHECK (kind IN ('call', 'delivery')),
    -- The endpoint ('topapi/processinstance/get') or, for deliveries, the event type.
    api      text    NOT NULL,
    -- What the call was for: outbox, search, details, gap, sweep, poll, backfill, failed, drift,
    -- doctor, callback, token; for deliveries: push.
    purpose  text    NOT NULL,
    -- Whether DingTalk counts it against the allowance (docs/dingtalk.md §7): the token API is
    -- not metered; a call dingsync took for unmetered is counted metered once DingTalk answers it
    -- with 90020.
    metered  boolean NOT NULL,
    count    bigint  NOT NULL CHECK (count >= 0),
    last_at  timestamptz NOT NULL,
    PRIMARY KEY (corp_id, day, kind, api, purpose, metered)
);

-- DingTalk answered 90020 (`ApiCountLimitForOrg`): the organisation's monthly allowance is used
-- up. Metered calls stop until the Beijing month in `month` is over, an operator lifts the pause
-- (`dingsync quota resume`), or the configured allowance differs from `allowance`.
CREATE TABLE dingsync.quota_pause (
    corp_id   text PRIMARY KEY,
    -- First day of the Beijing month the pause belongs to.
    month     date NOT NULL,
    paused_at timestamptz NOT NULL,
    -- dingtalk.monthly_calls when it paused (0 = unmetered): a new setting lifts the pause.
    allowance bigint NOT NULL,
    reason    text NOT NULL
);

DO $roles$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dingsync_report') THEN
        GRANT SELECT ON dingsync.usage, dingsync.quota_pause TO dingsync_report;
    END IF;
END;
$roles$;
