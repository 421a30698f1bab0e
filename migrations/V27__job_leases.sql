-- The scheduler's one-run-per-job guard as a row with an expiry (a lease) instead of a
-- session-level advisory lock. Behind a pooler in transaction mode (PgBouncer) a session lock
-- stays on whichever server connection took it, and a transaction held open for the run instead
-- pins one server connection per running job, which starves a small pool (seen with four server
-- connections and two replicas: every run timed out waiting for a connection). A lease holds no
-- connection: the runner renews it while the job runs, and a process that dies leaves it to
-- expire (src/store/job_runs.rs has the timings).
CREATE TABLE dingsync.job_leases (
    corp_id    text        NOT NULL,
    job        text        NOT NULL,
    holder     text        NOT NULL,
    expires_at timestamptz NOT NULL,
    CONSTRAINT job_leases_pkey PRIMARY KEY (corp_id, job)
);

COMMENT ON TABLE dingsync.job_leases IS 'Internal: which process runs each scheduled job of an organisation now (one at a time across replicas), until when unless renewed. A row past expires_at is free to take.';
COMMENT ON COLUMN dingsync.job_leases.corp_id IS 'DingTalk organisation (CorpId) the job runs for.';
COMMENT ON COLUMN dingsync.job_leases.job IS 'Job name, as in dingsync.job_runs.job.';
COMMENT ON COLUMN dingsync.job_leases.holder IS 'The run holding it: the replica (host:pid:random) and a random suffix per run.';
COMMENT ON COLUMN dingsync.job_leases.expires_at IS 'When the lease lapses unless its holder renews it (every third of its length while the job runs).';
