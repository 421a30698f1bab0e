//! `dingsync.approvals`: one row per approval instance, only ever moved forward.

use sqlx::PgConnection;

use crate::event::ApprovalChange;

/// Folds event changes into `approvals`, one statement for all. Each `(corp_id, change)` must
/// name a different approval (a statement cannot touch a row twice). A status change applies only
/// when it raises `dingsync.status_rank`, and with it its result and finish time; descriptive
/// fields fill in what is still unknown. Changes without a status only update provenance and
/// queue the row for a detail fetch. Every touched row is queued for a detail fetch.
pub async fn apply_event_changes(
    conn: &mut PgConnection,
    changes: &[(&str, &ApprovalChange)],
) -> sqlx::Result<()> {
    let (with_status, touch_only): (Vec<_>, Vec<_>) =
        changes.iter().partition(|(_, c)| c.status.is_some());
    if !with_status.is_empty() {
        upsert(conn, &with_status).await?;
    }
    if !touch_only.is_empty() {
        let corp: Vec<&str> = touch_only.iter().map(|(corp, _)| *corp).collect();
        let pid: Vec<&str> = touch_only
            .iter()
            .map(|(_, c)| c.process_instance_id.as_str())
            .collect();
        sqlx::query(
            "UPDATE dingsync.approvals a
             SET last_event_at = now(),
                 detail_wanted_at = coalesce(a.detail_wanted_at, now()),
                 updated_at = now()
             FROM unnest($1::text[], $2::text[]) AS x(c, p)
             WHERE a.corp_id = x.c AND a.process_instance_id = x.p",
        )
        .bind(corp)
        .bind(pid)
        .execute(conn)
        .await?;
    }
    Ok(())
}

async fn upsert(conn: &mut PgConnection, changes: &[&(&str, &ApprovalChange)]) -> sqlx::Result<()> {
    let n = changes.len();
    let (mut corp, mut pid, mut code, mut title, mut business, mut originator) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut status, mut result, mut url, mut created, mut finished) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (c, ch) in changes.iter().copied() {
        corp.push(*c);
        pid.push(ch.process_instance_id.as_str());
        code.push(ch.process_code.as_deref());
        title.push(ch.title.as_deref());
        business.push(ch.business_id.as_deref());
        originator.push(ch.originator_userid.as_deref());
        status.push(ch.status);
        result.push(ch.result);
        url.push(ch.url.as_deref());
        created.push(ch.created_at);
        finished.push(ch.finished_at);
    }
    sqlx::query(
        "INSERT INTO dingsync.approvals AS a
             (corp_id, process_instance_id, process_code, title, business_id, originator_userid,
              status, result, url, created_at, finished_at, last_event_at, detail_wanted_at, updated_at)
         SELECT c, p, pc, t, b, o, s, r, u, ca, fa, now(), now(), now()
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::text[], $9::text[], $10::timestamptz[], $11::timestamptz[])
              AS x(c, p, pc, t, b, o, s, r, u, ca, fa)
         ON CONFLICT (corp_id, process_instance_id) DO UPDATE SET
             process_code      = coalesce(a.process_code, excluded.process_code),
             title             = coalesce(a.title, excluded.title),
             business_id       = coalesce(a.business_id, excluded.business_id),
             originator_userid = coalesce(a.originator_userid, excluded.originator_userid),
             url               = coalesce(a.url, excluded.url),
             created_at        = coalesce(a.created_at, excluded.created_at),
             status      = CASE WHEN dingsync.status_rank(excluded.status) > dingsync.status_rank(a.status)
                                THEN excluded.status ELSE a.status END,
             result      = CASE WHEN dingsync.status_rank(excluded.status) > dingsync.status_rank(a.status)
                                THEN excluded.result ELSE a.result END,
             finished_at = CASE WHEN dingsync.status_rank(excluded.status) > dingsync.status_rank(a.status)
                                THEN coalesce(excluded.finished_at, a.finished_at) ELSE a.finished_at END,
             last_event_at    = now(),
             detail_wanted_at = coalesce(a.detail_wanted_at, now()),
             updated_at       = now()",
    )
    .bind(corp)
    .bind(pid)
    .bind(code)
    .bind(title)
    .bind(business)
    .bind(originator)
    .bind(status)
    .bind(result)
    .bind(url)
    .bind(created)
    .bind(finished)
    .execute(conn)
    .await?;
    Ok(())
}

/// Tells listeners (`LISTEN dingsync_approval_changed`) which approvals changed; delivered when
/// the surrounding transaction commits, once per distinct id.
pub async fn notify_changed(
    conn: &mut PgConnection,
    process_instance_ids: &[&str],
) -> sqlx::Result<()> {
    if process_instance_ids.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT pg_notify('dingsync_approval_changed', p) FROM unnest($1::text[]) AS p")
        .bind(process_instance_ids)
        .execute(conn)
        .await?;
    Ok(())
}
