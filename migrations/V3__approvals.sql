-- One row per approval instance. Events and (later) API snapshots are folded in monotonically: a
-- late or repeated event can never move an approval backwards.

-- How far along a status is, for both approvals and tasks: a change is applied only when it moves
-- the rank up, so a late 'start' never undoes a 'finish'. Terminal states share the top rank: the
-- first terminal state seen wins (a later API snapshot may still correct it).
CREATE FUNCTION dingsync.status_rank(status text) RETURNS int
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE status WHEN 'NEW' THEN 0 WHEN 'RUNNING' THEN 1 WHEN 'PAUSED' THEN 1 ELSE 2 END;
COMMENT ON FUNCTION dingsync.status_rank(text) IS 'Order of approval/task statuses: NEW 0, RUNNING/PAUSED 1, COMPLETED/TERMINATED/CANCELED 2. dingsync only moves a row to a higher rank.';

CREATE TABLE dingsync.approvals (
    corp_id             text        NOT NULL,
    process_instance_id text        NOT NULL,
    process_code        text,
    title               text,
    business_id         text,
    originator_userid   text,
    originator_dept_id  text,
    status              text        NOT NULL,
    result              text,
    form_values         jsonb,
    url                 text,
    created_at          timestamptz,
    finished_at         timestamptz,
    outbox_id           bigint,
    last_event_at       timestamptz,
    detail_synced_at    timestamptz,
    detail_wanted_at    timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (corp_id, process_instance_id),
    CONSTRAINT approvals_status_check
        CHECK (status IN ('NEW', 'RUNNING', 'COMPLETED', 'TERMINATED', 'CANCELED')),
    CONSTRAINT approvals_result_check CHECK (result IN ('agree', 'refuse')),
    -- Only a COMPLETED approval has a result; "approved" is COMPLETED + agree.
    CONSTRAINT approvals_result_only_when_completed CHECK (result IS NULL OR status = 'COMPLETED')
)
-- Rows are updated several times in their life (start, tasks, finish, detail fetch): free space
-- in each page lets PostgreSQL update them in place (HOT) when no indexed column changes.
WITH (fillfactor = 80);

-- Apps often hold only the instance id (from a link or a push of their own).
CREATE INDEX approvals_instance_idx ON dingsync.approvals (process_instance_id);
CREATE INDEX approvals_status_idx ON dingsync.approvals (corp_id, status, created_at);
CREATE INDEX approvals_process_created_idx ON dingsync.approvals (corp_id, process_code, created_at);
CREATE INDEX approvals_originator_idx ON dingsync.approvals (corp_id, originator_userid, created_at);
CREATE INDEX approvals_business_id_idx ON dingsync.approvals (corp_id, business_id);
-- The detail-fetch queue: small, because rows leave it once fetched.
CREATE INDEX approvals_detail_wanted_idx ON dingsync.approvals (detail_wanted_at)
    WHERE detail_wanted_at IS NOT NULL;

COMMENT ON TABLE dingsync.approvals IS 'One row per DingTalk approval instance (审批实例), kept in step with DingTalk by dingsync. Read by business apps and reports; written by dingsync only.';
COMMENT ON COLUMN dingsync.approvals.corp_id IS 'DingTalk organisation (CorpId) the approval belongs to.';
COMMENT ON COLUMN dingsync.approvals.process_instance_id IS 'DingTalk approval instance id (processInstanceId); unique per organisation.';
COMMENT ON COLUMN dingsync.approvals.process_code IS 'Approval template code (PROC-...).';
COMMENT ON COLUMN dingsync.approvals.title IS 'Title DingTalk shows, e.g. "张三提交的报销".';
COMMENT ON COLUMN dingsync.approvals.business_id IS 'DingTalk approval serial number (审批编号).';
COMMENT ON COLUMN dingsync.approvals.originator_userid IS 'userid of the person who started the approval.';
COMMENT ON COLUMN dingsync.approvals.originator_dept_id IS 'Department the approval was started in (-1 = root); known after a detail fetch.';
COMMENT ON COLUMN dingsync.approvals.status IS 'NEW, RUNNING, COMPLETED (finished; see result), TERMINATED (withdrawn/revoked) or CANCELED. Only ever moves forward.';
COMMENT ON COLUMN dingsync.approvals.result IS 'agree or refuse once COMPLETED; null otherwise. Approved = status COMPLETED and result agree.';
COMMENT ON COLUMN dingsync.approvals.form_values IS 'Form values from the detail fetch: JSON array of {id, name, value, ext_value, component_type}; values are DingTalk''s text, stored as received.';
COMMENT ON COLUMN dingsync.approvals.url IS 'Link to the approval in DingTalk.';
COMMENT ON COLUMN dingsync.approvals.created_at IS 'When the approval was started in DingTalk.';
COMMENT ON COLUMN dingsync.approvals.finished_at IS 'When the approval reached COMPLETED or TERMINATED.';
COMMENT ON COLUMN dingsync.approvals.outbox_id IS 'The dingsync.outbox row that created this approval, when dingsync created it.';
COMMENT ON COLUMN dingsync.approvals.last_event_at IS 'Provenance: when dingsync last stored an event about this approval.';
COMMENT ON COLUMN dingsync.approvals.detail_synced_at IS 'Provenance: when dingsync last applied a full snapshot from DingTalk''s API (processinstance/get).';
COMMENT ON COLUMN dingsync.approvals.detail_wanted_at IS 'Internal: set when an event arrives, cleared when the detail fetch has applied a newer snapshot. Not part of the public contract.';
COMMENT ON COLUMN dingsync.approvals.updated_at IS 'When dingsync last changed this row.';
