//! The console's pages as maud templates (escaped by construction), one layout, labels in English
//! and in Chinese where DingTalk's own words are what an operator knows (template and status
//! names as DingTalk shows them: 审批中, 已同意, 已拒绝, 已撤销).

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use super::{
    Op, Target,
    figures::{self, Latency, Series},
};
use crate::{
    config::{self, SchedulerConfig},
    ledger::Usage,
    metrics::AllowanceReading,
    operate,
    store::{
        actions::ActionRow,
        console::{
            ApprovalEvent, ApprovalSummary, JobRun, MinuteCount, OutboxTimes, Replica, Task,
        },
        outbox::OutboxRow,
        usage::Pause,
    },
};

/// The one stylesheet, embedded in the binary (no external asset).
pub const STYLESHEET: &str = include_str!("console.css");

const NAV: [(&str, &str, &str); 5] = [
    ("/", "Overview", "概览"),
    ("/outbox", "Outbox & actions", "发起与操作"),
    ("/quota", "Quota", "调用额度"),
    ("/reconcile", "Reconciliation", "对账"),
    ("/approvals", "Approvals", "审批"),
];

fn layout(title: &str, current: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · dingsync" }
                link rel="stylesheet" href="/console.css";
            }
            body {
                header {
                    strong.brand { "dingsync" }
                    nav {
                        @for (href, en, zh) in NAV {
                            a href=(href) class=[(href == current).then_some("current")] {
                                (en) " " span.zh { (zh) }
                            }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

/// A page that only says something (a change's outcome, a refusal, an error).
pub fn message(title: &str, text: &str, back: Option<(&str, &str)>) -> Markup {
    layout(
        title,
        "",
        html! {
            p.message { (text) }
            @if let Some((href, label)) = back { p { a href=(href) { (label) } } }
        },
    )
}

fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn opt_time(at: Option<DateTime<Utc>>) -> String {
    at.map(time).unwrap_or_else(|| "—".into())
}

fn ago(at: DateTime<Utc>) -> String {
    let secs = (Utc::now() - at).num_seconds().max(0);
    match secs {
        0..60 => format!("{secs} s ago"),
        60..3600 => format!("{} min ago", secs / 60),
        3600..86400 => format!("{:.1} h ago", secs as f64 / 3600.0),
        _ => format!("{:.1} days ago", secs as f64 / 86400.0),
    }
}

/// An approval's status as DingTalk shows it.
pub fn status_label(status: &str, result: Option<&str>) -> &'static str {
    match (status, result) {
        ("NEW", _) => "新创建 new",
        ("RUNNING", _) => "审批中 running",
        ("COMPLETED", Some("agree")) => "已同意 approved",
        ("COMPLETED", Some("refuse")) => "已拒绝 refused",
        ("COMPLETED", _) => "已完成 completed",
        ("TERMINATED", _) => "已撤销 withdrawn",
        ("CANCELED", _) => "已取消 cancelled",
        _ => "unknown",
    }
}

/// An outbox row's or action's state, with its Chinese name.
fn state_label(state: &str) -> String {
    let zh = match state {
        "pending" => "待发送",
        "sending" => "发送中",
        "unknown" => "结果未知",
        "created" => "已发起",
        "done" => "已完成",
        "failed" => "失败",
        "superseded" => "已被取代",
        "cancelled" => "已取消",
        _ => "",
    };
    format!("{state} {zh}")
}

fn state_badge(state: &str) -> Markup {
    html! { span class={ "badge " (state) } { (state_label(state)) } }
}

pub struct Overview<'a> {
    pub not_ready: Option<String>,
    pub last_event: Option<(DateTime<Utc>, String)>,
    pub minutes: Vec<MinuteCount>,
    pub series: Series,
    pub replicas: Vec<Replica>,
    pub this_replica: &'a str,
    pub latest: Vec<JobRun>,
    pub outbox: Vec<(String, i64)>,
    pub actions: Vec<(String, i64)>,
}

fn source_label(source: &str) -> String {
    match source {
        "http_push" => "HTTP push".into(),
        "stream" => "Stream".into(),
        "failed_list" => "failed-push list".into(),
        other => other.into(),
    }
}

fn latency_cells(l: &Latency) -> Markup {
    let ms = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.1} ms"));
    html! {
        td.num { (l.count) } td.num { (ms(l.mean_ms())) }
        td.num { "≤ " (ms(l.quantile_ms(0.5))) } td.num { "≤ " (ms(l.quantile_ms(0.99))) }
    }
}

pub fn overview(o: Overview<'_>) -> Markup {
    // The last 30 minutes, one column a minute, by source.
    let now = Utc::now();
    let first = now - chrono::TimeDelta::minutes(29);
    let mut sources: Vec<String> = o.minutes.iter().map(|m| m.source.clone()).collect();
    sources.sort();
    sources.dedup();
    if sources.is_empty() {
        sources = vec!["http_push".into(), "stream".into()];
    }
    let mut labels = Vec::new();
    let mut values = Vec::new();
    for i in 0..30 {
        let minute = first + chrono::TimeDelta::minutes(i);
        let key = minute.format("%H:%M").to_string();
        let col = sources
            .iter()
            .map(|s| {
                o.minutes
                    .iter()
                    .filter(|m| &m.source == s && m.minute.format("%H:%M").to_string() == key)
                    .map(|m| m.count as f64)
                    .sum()
            })
            .collect();
        labels.push(key);
        values.push(col);
    }
    let names: Vec<String> = sources.iter().map(|s| source_label(s)).collect();
    let leader = o.latest.iter().max_by_key(|r| r.started_at);
    layout(
        "Overview 概览",
        "/",
        html! {
            section.cards {
                div class={ "card " (if o.not_ready.is_none() { "ok" } else { "bad" }) } id="readiness" {
                    h2 { "Readiness 就绪" }
                    @match &o.not_ready {
                        None => p.big { "ready 就绪" },
                        Some(why) => { p.big { "not ready 未就绪" } p { (why) } },
                    }
                }
                div.card id="last-event" {
                    h2 { "Last event received 最近事件" }
                    @match &o.last_event {
                        Some((at, source)) => { p.big { (ago(*at)) } p { (time(*at)) " · " (source_label(source)) } },
                        None => p.big { "none yet 暂无" },
                    }
                }
                div.card {
                    h2 { "Outbox 发起队列" }
                    ul.counts { @for (state, n) in &o.outbox { li { a href={ "/outbox?state=" (state) } { (state_badge(state)) } " " (n) } } }
                    h2 { "Actions 审批操作" }
                    ul.counts { @for (state, n) in &o.actions { li { (state_badge(state)) " " (n) } } }
                }
            }
            section {
                h2 { "Events stored per minute, by source 每分钟事件" }
                (figures::stacked_bars("Events stored per minute by source", &names, &labels, &values))
            }
            section.two {
                div {
                    h2 { "HTTP pushes by outcome (since this process started)" }
                    table {
                        thead { tr { th { "outcome" } th.num { "pushes" } } }
                        tbody {
                            @for (outcome, n) in &o.series.push_outcomes { tr { td { (outcome) } td.num { (n) } } }
                            @if o.series.push_outcomes.is_empty() { tr { td colspan="2" { "none yet" } } }
                        }
                    }
                }
                div {
                    h2 { "Stream acknowledgements by status" }
                    table {
                        thead { tr { th { "status" } th.num { "acks" } } }
                        tbody {
                            @for (status, n) in &o.series.stream_acks { tr { td { (status) } td.num { (n) } } }
                            @if o.series.stream_acks.is_empty() { tr { td colspan="2" { "none yet" } } }
                        }
                    }
                }
            }
            section {
                h2 { "Ack latency 应答耗时 (receipt to answer, after the commit)" }
                table {
                    thead { tr { th { "source" } th.num { "answered" } th.num { "mean" } th.num { "p50" } th.num { "p99" } } }
                    tbody {
                        tr { td { "HTTP push" } (latency_cells(&o.series.push_ack)) }
                        tr { td { "Stream" } (latency_cells(&o.series.stream_ack)) }
                    }
                }
                p.note { "DingTalk waits 1500 ms for an HTTP push's answer. Quantiles are bucket bounds." }
            }
            section {
                h2 { "Replicas 副本 (that ran a job in the last 24 h)" }
                table {
                    thead { tr { th { "replica" } th { "last job run" } th.num { "runs" } } }
                    tbody {
                        @for r in &o.replicas {
                            tr {
                                td { code { (r.replica) }
                                    @if r.replica == o.this_replica { " " span.badge.created { "this one 本副本" } }
                                    @if leader.is_some_and(|l| l.replica == r.replica) { " " span.badge.pending { "ran the latest job" } }
                                }
                                td { (time(r.last_run_at)) }
                                td.num { (r.runs) }
                            }
                        }
                        @if o.replicas.is_empty() { tr { td colspan="3" { "no job has run yet; this replica is " code { (o.this_replica) } } } }
                    }
                }
                p.note { "Each job tick runs on one replica, whichever takes it first; there is no fixed leader." }
            }
        },
    )
}

pub struct Queues<'a> {
    pub state: Option<&'a str>,
    pub counts: Vec<(String, i64)>,
    pub action_counts: Vec<(String, i64)>,
    pub attention: Vec<OutboxRow>,
    pub rows: Vec<OutboxRow>,
    pub action_attention: Vec<ActionRow>,
    pub actions: Vec<ActionRow>,
}

fn outbox_table(rows: &[OutboxRow], id: &str) -> Markup {
    html! {
        div.scroll {
            table id=(id) {
                thead { tr { th { "id" } th { "state" } th.num { "attempts" } th { "template 模板" } th { "business key" } th { "instance" } th { "DingTalk's reason / last error" } } }
                tbody {
                    @for r in rows {
                        tr {
                            td { a href={ "/outbox/" (r.id) } { (r.id) } }
                            td { (state_badge(&r.state)) }
                            td.num { (r.attempts) }
                            td { code { (r.process_code) } }
                            td { (r.idempotency_key) }
                            td { @if let Some(pid) = &r.process_instance_id { a href={ "/approvals/" (pid) } { code { (pid) } } } @else { "—" } }
                            td.reason { (r.last_error.as_deref().unwrap_or("")) }
                        }
                    }
                    @if rows.is_empty() { tr { td colspan="7" { "none 无" } } }
                }
            }
        }
    }
}

fn actions_table(rows: &[ActionRow], id: &str) -> Markup {
    html! {
        div.scroll {
            table id=(id) {
                thead { tr { th { "id" } th { "state" } th { "action" } th.num { "attempts" } th { "instance" } th { "DingTalk's reason / last error" } } }
                tbody {
                    @for r in rows {
                        tr {
                            td { a href={ "/actions/" (r.id) } { (r.id) } }
                            td { (state_badge(&r.state)) }
                            td { (r.action) }
                            td.num { (r.attempts) }
                            td { a href={ "/approvals/" (r.process_instance_id) } { code { (r.process_instance_id) } } }
                            td.reason { (r.last_error.as_deref().unwrap_or("")) }
                        }
                    }
                    @if rows.is_empty() { tr { td colspan="6" { "none 无" } } }
                }
            }
        }
    }
}

pub fn outbox(q: Queues<'_>) -> Markup {
    layout(
        "Outbox & actions 发起与操作",
        "/outbox",
        html! {
            section {
                h2 { "Outbox rows by state 按状态" }
                ul.counts {
                    li { a href="/outbox" class=[q.state.is_none().then_some("current")] { "all 全部" } }
                    @for (state, n) in &q.counts { li { a href={ "/outbox?state=" (state) } { (state_badge(state)) } " " (n) } }
                }
                h2 { "Actions by state" }
                ul.counts { @for (state, n) in &q.action_counts { li { a href={ "/outbox?state=" (state) } { (state_badge(state)) } " " (n) } } }
            }
            section {
                h2 { "Needs attention: failed and unknown 需处理" }
                (outbox_table(&q.attention, "attention"))
                (actions_table(&q.action_attention, "action-attention"))
            }
            section {
                h2 { "Outbox rows 发起队列" @if let Some(s) = q.state { " · " (state_label(s)) } }
                (outbox_table(&q.rows, "outbox-rows"))
            }
            section {
                h2 { "Actions 审批操作" @if let Some(s) = q.state { " · " (state_label(s)) } }
                (actions_table(&q.actions, "action-rows"))
            }
        },
    )
}

fn buttons(target: Target, id: i64, state: &str) -> Markup {
    html! {
        p.buttons {
            @if operate::can_retry(state) {
                a.button id="retry" href={ "/" (target.path()) "/" (id) "/retry" } { "Retry… 重试" }
            }
            @if operate::can_cancel(state) {
                a.button.danger id="cancel" href={ "/" (target.path()) "/" (id) "/cancel" } { "Cancel… 取消" }
            }
            @if !operate::can_retry(state) && !operate::can_cancel(state) {
                span.note { "A " (state) " row can be neither retried nor cancelled." }
            }
        }
    }
}

pub fn outbox_row(r: &OutboxRow, times: Option<&OutboxTimes>, events: &[ApprovalEvent]) -> Markup {
    layout(
        &format!("Outbox row {}", r.id),
        "/outbox",
        html! {
            dl.facts {
                dt { "state" } dd id="state" { (state_badge(&r.state)) }
                dt { "DingTalk's reason / last error" } dd.reason id="reason" { (r.last_error.as_deref().unwrap_or("—")) }
                dt { "template 模板" } dd { code { (r.process_code) } }
                dt { "business key (idempotency_key)" } dd { (r.idempotency_key) }
                dt { "originator 发起人" } dd { (r.originator_user_id) }
                dt { "instance" } dd { @if let Some(pid) = &r.process_instance_id { a href={ "/approvals/" (pid) } { code { (pid) } } } @else { "—" } }
                dt { "attempts" } dd { (r.attempts) }
            }
            (buttons(Target::Outbox, r.id, &r.state))
            h2 { "History 历史" }
            table {
                thead { tr { th { "when" } th { "what" } } }
                tbody {
                    tr { td { (time(r.created_at)) } td { "inserted (pending)" } }
                    @if let Some(at) = r.sent_at { tr { td { (time(at)) } td { "last sent to DingTalk" } } }
                    @if r.state == "pending" || r.state == "unknown" { tr { td { (time(r.next_attempt_at)) } td { "next attempt due" } } }
                    @if let Some(t) = times {
                        tr { td { (time(t.updated_at)) } td { "last change: now " (r.state) } }
                        @if let Some(at) = t.done_at { tr { td { (time(at)) } td { "finished" } } }
                    }
                    @for e in events { tr { td { (time(e.received_at)) } td { "event: " (describe(e)) } } }
                }
            }
        },
    )
}

pub fn action_row(r: &ActionRow) -> Markup {
    layout(
        &format!("Action {}", r.id),
        "/outbox",
        html! {
            dl.facts {
                dt { "state" } dd id="state" { (state_badge(&r.state)) }
                dt { "DingTalk's reason / last error" } dd.reason id="reason" { (r.last_error.as_deref().unwrap_or("—")) }
                dt { "action" } dd { (r.action) }
                dt { "instance" } dd { a href={ "/approvals/" (r.process_instance_id) } { code { (r.process_instance_id) } } }
                dt { "business key (idempotency_key)" } dd { (r.idempotency_key) }
                dt { "attempts" } dd { (r.attempts) }
                @if let Some(by) = &r.superseded_by { dt { "superseded by" } dd { (by) " " (r.superseded_how.as_deref().unwrap_or("")) } }
            }
            (buttons(Target::Action, r.id, &r.state))
            h2 { "History 历史" }
            table {
                tbody {
                    tr { td { (time(r.created_at)) } td { "inserted (pending)" } }
                    @if let Some(at) = r.sent_at { tr { td { (time(at)) } td { "last sent to DingTalk" } } }
                    @if r.state == "pending" || r.state == "unknown" { tr { td { (time(r.next_attempt_at)) } td { "next attempt due" } } }
                }
            }
        },
    )
}

pub fn confirm(target: Target, op: Op, id: i64, state: &str, csrf: &str) -> Markup {
    let what = match target {
        Target::Outbox => "outbox row",
        Target::Action => "action",
    };
    let explain = match (target, op) {
        (Target::Outbox, Op::Retry) => {
            "The row goes back to pending with its attempts reset, and a worker sends it again. Only a failed or cancelled row is taken back: it never created an approval."
        }
        (Target::Outbox, Op::Cancel) => {
            "The row becomes cancelled and is never sent. Only a pending or failed row can be cancelled."
        }
        (Target::Action, Op::Retry) => {
            "The action goes back to pending; the worker reads the approval back first if it was ever sent."
        }
        (Target::Action, Op::Cancel) => {
            "The action becomes cancelled and is never carried out. Only a pending or failed action can be cancelled."
        }
    };
    let (verb, zh) = match op {
        Op::Retry => ("Retry", "重试"),
        Op::Cancel => ("Cancel", "取消"),
    };
    layout(
        &format!("{verb} {what} {id}? 确认{zh}"),
        "/outbox",
        html! {
            p { "It is " (state_badge(state)) " now. " (explain) }
            form method="post" action={ "/" (target.path()) "/" (id) "/" (op.name()) } {
                input type="hidden" name="csrf" value=(csrf);
                button type="submit" id="confirm" class=[(op == Op::Cancel).then_some("danger")] { "Yes, " (verb.to_lowercase()) " 确认" (zh) }
                " "
                a href={ "/" (target.path()) "/" (id) } { "No, back" }
            }
        },
    )
}

pub fn quota(
    corp_id: &str,
    now: DateTime<Utc>,
    usage: &Usage,
    allowance: Option<AllowanceReading>,
    pause: Option<Pause>,
) -> Markup {
    let mut rows: Vec<(String, f64)> = usage
        .by_api_and_purpose()
        .into_iter()
        .filter(|((kind, _, _), _)| kind == "call")
        .map(|((_, api, purpose), n)| (format!("{api} · {purpose}"), n as f64))
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let deliveries: i64 = usage.deliveries();
    layout(
        "Quota & budget 调用额度",
        "/quota",
        html! {
            p { "Organisation " code { (corp_id) } ", Beijing month " (crate::clock::month(now).format("%Y-%m")) "." }
            @match &allowance {
                Some(a) => {
                    table id="allowance" {
                        thead { tr { th { "" } th.num { "used 已用" } th.num { "dingsync's share 额度" } th.num { "forecast at month end 月末预计" } } }
                        tbody {
                            @for (name, x) in [("metered calls 调用", a.calls), ("deliveries 推送", a.deliveries)] {
                                tr class=[(x.limit > 0 && x.forecast > i64::try_from(x.limit).unwrap_or(i64::MAX)).then_some("over")] {
                                    td { (name) } td.num { (x.used) }
                                    td.num { @if x.limit == 0 { "unmetered" } @else { (x.limit) } }
                                    td.num { (x.forecast) }
                                }
                            }
                        }
                    }
                    p id="pause" class=[a.paused.then_some("bad")] {
                        @if a.paused { "Metered calls are paused 已暂停" } @else { "Not paused 未暂停" }
                        @if let Some(p) = &pause { " — stored pause of " (p.month.format("%Y-%m")) " since " (time(p.paused_at)) ": " (p.reason) }
                    }
                },
                None => p.bad { "The database did not answer the allowance reading." },
            }
            h2 { "This month's calls by API and purpose 按接口和用途" }
            (figures::horizontal_bars("Calls this month by API and purpose", &rows))
            p { "Deliveries (events received) this month: " (deliveries) "." }
        },
    )
}

fn counts_text(counts: &serde_json::Value) -> String {
    match counts.as_object() {
        Some(map) if !map.is_empty() => map
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "—".into(),
    }
}

fn next_tick(schedule: &str) -> String {
    config::parse_schedule(schedule)
        .ok()
        .and_then(|cron| cron.find_next_occurrence(&Utc::now(), false).ok())
        .map(time)
        .unwrap_or_else(|| "—".into())
}

pub fn reconcile(
    schedules: &SchedulerConfig,
    latest: &[JobRun],
    recent: &[JobRun],
    waiting: i64,
    awaiting: &[ApprovalSummary],
) -> Markup {
    let jobs = [
        ("details", &schedules.details),
        ("sweep", &schedules.sweep),
        ("backfill", &schedules.backfill),
        ("failed", &schedules.failed),
        ("forms", &schedules.forms),
        ("retention", &schedules.retention),
    ];
    layout(
        "Reconciliation 对账",
        "/reconcile",
        html! {
            section {
                h2 { "Jobs 任务" }
                div.scroll { table id="jobs" {
                    thead { tr { th { "job" } th { "last run" } th { "outcome" } th { "counts" } th { "next tick" } } }
                    tbody {
                        @for (job, schedule) in jobs {
                            @let last = latest.iter().find(|r| r.job == job);
                            tr {
                                td { (job) }
                                td { (opt_time(last.map(|r| r.started_at))) }
                                td { @if let Some(r) = last { span class={ "badge " (r.outcome) } { (r.outcome) } @if let Some(e) = &r.error { " " span.reason { (e) } } } @else { "—" } }
                                td { (last.map(|r| counts_text(&r.counts)).unwrap_or_else(|| "—".into())) }
                                td { @if schedule.is_empty() { "off" } @else { (next_tick(schedule)) } }
                            }
                        }
                    }
                } }
            }
            section {
                h2 { "Approvals awaiting a detail fetch 待获取详情: " (waiting) }
                (approval_table(awaiting))
            }
            section {
                h2 { "Recent runs" }
                div.scroll { table {
                    thead { tr { th { "#" } th { "job" } th { "replica" } th { "started" } th { "finished" } th { "outcome" } th { "counts" } } }
                    tbody { @for r in recent { tr {
                        td { (r.id) } td { (r.job) } td { code { (r.replica) } } td { (time(r.started_at)) }
                        td { (opt_time(r.finished_at)) } td { span class={ "badge " (r.outcome) } { (r.outcome) } } td { (counts_text(&r.counts)) }
                    } } }
                } }
            }
            p.note { "A drift report (stored approvals against DingTalk) is `dingsync drift --since 7d` on the command line." }
        },
    )
}

fn approval_table(rows: &[ApprovalSummary]) -> Markup {
    html! {
        div.scroll { table.approvals {
            thead { tr { th { "instance" } th { "template 模板" } th { "title 标题" } th { "status 状态" } th { "originator 发起人" } th { "business key" } th { "changed" } } }
            tbody {
                @for a in rows { tr {
                    td { a href={ "/approvals/" (a.process_instance_id) } { code { (a.process_instance_id) } } }
                    td { (a.template.as_deref().unwrap_or("")) " " code { (a.process_code.as_deref().unwrap_or("")) } }
                    td { (a.title.as_deref().unwrap_or("")) }
                    td { span class={ "status " (a.status) " " (a.result.as_deref().unwrap_or("")) } { (status_label(&a.status, a.result.as_deref())) } }
                    td { (a.originator_userid.as_deref().unwrap_or("")) }
                    td { (a.business_id.as_deref().unwrap_or("")) }
                    td { (time(a.updated_at)) }
                } }
                @if rows.is_empty() { tr { td colspan="7" { "none 无" } } }
            }
        } }
    }
}

pub fn approvals(term: &str, found: &[ApprovalSummary]) -> Markup {
    layout(
        "Approvals 审批",
        "/approvals",
        html! {
            form.search method="get" action="/approvals" {
                input type="search" name="q" value=(term) placeholder="instance id, business key, originator, template 实例 / 业务键 / 发起人 / 模板";
                button type="submit" { "Search 搜索" }
            }
            p.note { @if term.is_empty() { "The latest changed approvals." } @else { (found.len()) " found for " code { (term) } "." } }
            (approval_table(found))
        },
    )
}

/// What one event says, in the words of the approval's row.
fn describe(e: &ApprovalEvent) -> String {
    let field = |k: &str| {
        e.payload
            .get(k)
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let change = e.change_type.as_deref().unwrap_or("?");
    let result = field("result");
    match (e.event_type.as_str(), change) {
        ("bpms_instance_change", "start") => "approval started → 审批中 RUNNING".into(),
        ("bpms_instance_change", "finish") => format!(
            "approval finished → {}",
            status_label("COMPLETED", result.as_deref())
        ),
        ("bpms_instance_change", "terminate") => "approval withdrawn → 已撤销 TERMINATED".into(),
        ("bpms_instance_change", other) => format!("instance {other}"),
        ("bpms_task_change", kind) => {
            let who = field("staffId").unwrap_or_default();
            let task = e.task_id.map(|t| t.to_string()).unwrap_or_default();
            match (kind, result.as_deref()) {
                ("start", _) => format!("task {task} opened for {who}"),
                ("finish", Some(r)) => format!("task {task} finished by {who}: {r}"),
                ("comment", _) => format!("task {task}: comment by {who}"),
                (k, _) => format!("task {task} {k} ({who})"),
            }
        }
        (other, _) => format!("{other} {change}"),
    }
}

pub fn approval(a: &ApprovalSummary, tasks: &[Task], events: &[ApprovalEvent]) -> Markup {
    layout(
        &format!("Approval 审批 {}", a.process_instance_id),
        "/approvals",
        html! {
            dl.facts {
                dt { "status 状态" } dd id="status" { span class={ "status " (a.status) " " (a.result.as_deref().unwrap_or("")) } { (status_label(&a.status, a.result.as_deref())) } }
                dt { "template 模板" } dd { (a.template.as_deref().unwrap_or("")) " " code { (a.process_code.as_deref().unwrap_or("")) } }
                dt { "title 标题" } dd { (a.title.as_deref().unwrap_or("")) }
                dt { "originator 发起人" } dd { (a.originator_userid.as_deref().unwrap_or("")) }
                dt { "business key" } dd { (a.business_id.as_deref().unwrap_or("—")) }
                dt { "created 创建" } dd { (opt_time(a.created_at)) }
                dt { "finished 完成" } dd { (opt_time(a.finished_at)) }
                dt { "outbox row" } dd { @if let Some(id) = a.outbox_id { a href={ "/outbox/" (id) } { (id) } } @else { "—" } }
                dt { "details fetched" } dd { (opt_time(a.detail_synced_at)) @if a.detail_wanted_at.is_some() { " (a fetch is due)" } }
            }
            h2 { "Tasks 审批任务" }
            table { thead { tr { th { "task" } th { "approver" } th { "status" } th { "result" } } }
                tbody { @for t in tasks { tr { td { (t.task_id) } td { (t.userid.as_deref().unwrap_or("")) } td { (t.status) } td { (t.result.as_deref().unwrap_or("")) } } } }
            }
            h2 { "Event history 事件历史 (" (events.len()) ")" }
            div.scroll { table id="events" {
                thead { tr { th { "#" } th { "arrived" } th { "source" } th { "DingTalk's time" } th { "what it changed" } } }
                tbody { @for e in events { tr {
                    td { (e.id) } td { (time(e.received_at)) } td { (source_label(&e.source)) }
                    td { (opt_time(e.event_time)) } td { (describe(e)) }
                } } }
            } }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_as_dingtalk_shows_them() {
        assert!(status_label("RUNNING", None).starts_with("审批中"));
        assert!(status_label("COMPLETED", Some("agree")).starts_with("已同意"));
        assert!(status_label("COMPLETED", Some("refuse")).starts_with("已拒绝"));
        assert!(status_label("TERMINATED", None).starts_with("已撤销"));
    }
}
