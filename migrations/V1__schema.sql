-- The dingsync schema holds everything the daemon owns. Business apps and DBAs read from it; only
-- the daemon (and, for the outbox, the apps) write to it.
CREATE SCHEMA IF NOT EXISTS dingsync;
COMMENT ON SCHEMA dingsync IS 'dingsync: DingTalk approvals mirrored into PostgreSQL (see README.md and docs/schema.md).';
