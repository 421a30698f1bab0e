//! `dingsync.approval_tasks`: one row per approver task, only ever moved forward.

use sqlx::PgConnection;

use crate::event::TaskChange;

/// Folds task changes into `approval_tasks` in one statement; each must name a different task, and
/// the caller writes the task's approval row first (there is no foreign key). Same monotonic rule as approvals: status, result, remark and finish
/// time change only when the status rank rises.
pub async fn apply_event_changes(
    conn: &mut PgConnection,
    changes: &[(&str, &TaskChange)],
) -> sqlx::Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let n = changes.len();
    let (mut corp, mut task, mut pid, mut activity, mut user) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut status, mut result, mut remark, mut created, mut finished) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (c, t) in changes {
        corp.push(*c);
        task.push(t.task_id);
        pid.push(t.process_instance_id.as_str());
        activity.push(t.activity_id.as_deref());
        user.push(t.userid.as_deref());
        status.push(t.status);
        result.push(t.result);
        remark.push(t.remark.as_deref());
        created.push(t.created_at);
        finished.push(t.finished_at);
    }
    sqlx::query(
        "INSERT INTO dingsync.approval_tasks AS t
             (corp_id, task_id, process_instance_id, activity_id, userid, status, result, remark,
              created_at, finished_at, last_event_at, updated_at)
         SELECT c, id, p, act, u, s, r, rm, ca, fa, now(), now()
         FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::text[], $9::timestamptz[], $10::timestamptz[])
              AS x(c, id, p, act, u, s, r, rm, ca, fa)
         ON CONFLICT (corp_id, task_id) DO UPDATE SET
             activity_id = coalesce(t.activity_id, excluded.activity_id),
             userid      = coalesce(t.userid, excluded.userid),
             created_at  = coalesce(t.created_at, excluded.created_at),
             status      = CASE WHEN dingsync.status_rank(excluded.status) > dingsync.status_rank(t.status)
                                THEN excluded.status ELSE t.status END,
             result      = CASE WHEN dingsync.status_rank(excluded.status) > dingsync.status_rank(t.status)
                                THEN excluded.result ELSE t.result END,
             remark      = CASE WHEN dingsync.status_rank(excluded.status) > dingsync.status_rank(t.status)
                                THEN coalesce(excluded.remark, t.remark) ELSE coalesce(t.remark, excluded.remark) END,
             finished_at = CASE WHEN dingsync.status_rank(excluded.status) > dingsync.status_rank(t.status)
                                THEN coalesce(excluded.finished_at, t.finished_at) ELSE t.finished_at END,
             last_event_at = now(),
             updated_at    = now()",
    )
    .bind(corp)
    .bind(task)
    .bind(pid)
    .bind(activity)
    .bind(user)
    .bind(status)
    .bind(result)
    .bind(remark)
    .bind(created)
    .bind(finished)
    .execute(conn)
    .await?;
    Ok(())
}
