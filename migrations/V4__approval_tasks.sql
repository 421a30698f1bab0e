-- One row per approver task (one person's step in an approval).
CREATE TABLE dingsync.approval_tasks (
    corp_id             text        NOT NULL,
    task_id             bigint      NOT NULL,
    process_instance_id text        NOT NULL,
    activity_id         text,
    userid              text,
    status              text        NOT NULL,
    result              text,
    remark              text,
    created_at          timestamptz,
    finished_at         timestamptz,
    last_event_at       timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (corp_id, task_id),
    -- No foreign key to approvals: dingsync writes a task's approval row in the same transaction
    -- before the task, and the key check (a row lock on an approval just updated in the same
    -- transaction) cost more than all the other work of a task event together.
    CONSTRAINT approval_tasks_status_check
        CHECK (status IN ('NEW', 'RUNNING', 'PAUSED', 'CANCELED', 'COMPLETED', 'TERMINATED')),
    CONSTRAINT approval_tasks_result_check
        CHECK (result IN ('AGREE', 'REFUSE', 'REDIRECTED', 'NONE'))
)
WITH (fillfactor = 80); -- updated in place (HOT) from start to finish

CREATE INDEX approval_tasks_instance_idx ON dingsync.approval_tasks (corp_id, process_instance_id);
-- "What is waiting for this person?"
CREATE INDEX approval_tasks_userid_status_idx ON dingsync.approval_tasks (corp_id, userid, status);

COMMENT ON TABLE dingsync.approval_tasks IS 'One row per approver task (审批任务) of an approval. Read by business apps and reports; written by dingsync only.';
COMMENT ON COLUMN dingsync.approval_tasks.corp_id IS 'DingTalk organisation (CorpId).';
COMMENT ON COLUMN dingsync.approval_tasks.task_id IS 'DingTalk task id (taskId).';
COMMENT ON COLUMN dingsync.approval_tasks.process_instance_id IS 'The approval this task belongs to (dingsync.approvals).';
COMMENT ON COLUMN dingsync.approval_tasks.activity_id IS 'Node of the approval flow the task belongs to, when DingTalk says.';
COMMENT ON COLUMN dingsync.approval_tasks.userid IS 'userid of the approver.';
COMMENT ON COLUMN dingsync.approval_tasks.status IS 'NEW, RUNNING, PAUSED, CANCELED, COMPLETED or TERMINATED (DingTalk''s task_status). Only ever moves forward.';
COMMENT ON COLUMN dingsync.approval_tasks.result IS 'AGREE, REFUSE, REDIRECTED (transferred) or NONE, as DingTalk''s task_result; null while pending.';
COMMENT ON COLUMN dingsync.approval_tasks.remark IS 'The approver''s comment.';
COMMENT ON COLUMN dingsync.approval_tasks.created_at IS 'When the task was assigned.';
COMMENT ON COLUMN dingsync.approval_tasks.finished_at IS 'When the approver acted (or the task was cancelled).';
COMMENT ON COLUMN dingsync.approval_tasks.last_event_at IS 'Provenance: when dingsync last stored an event about this task.';
COMMENT ON COLUMN dingsync.approval_tasks.updated_at IS 'When dingsync last changed this row.';
