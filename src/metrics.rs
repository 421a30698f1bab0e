//! Every `dingsync_*` series: names, help texts, labels, buckets and the one process-wide
//! registry, plus the text encoding of the `/metrics` page. A leaf: it imports nothing of the
//! daemon. Each domain names its own outcomes and passes them in as bounded `&'static str`
//! labels (event type, outcome class, endpoint path, errcode, job): never instance, row or user
//! ids. Serving the page and reading the database at scrape time is `health`'s.

use std::{sync::LazyLock, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, text},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// The `Content-Type` of the page [`encode`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event_type: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    endpoint: String,
    errcode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    job: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AllowanceLabels {
    corp_id: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CorpLabel {
    corp_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FrameLabel {
    frame: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchLabels {
    source: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

struct Metrics {
    registry: Registry,
    events: Family<EventLabels, Counter>,
    ack_seconds: Histogram,
    outbox_creates: Family<OutcomeLabel, Counter>,
    outbox_create_seconds: Histogram,
    outbox_failed: Family<ReasonLabel, Counter>,
    actions_sent: Family<ActionLabels, Counter>,
    action_seconds: Histogram,
    dingtalk_calls: Family<CallLabels, Counter>,
    budget_wait_seconds: Histogram,
    job_runs: Family<JobLabels, Counter>,
    job_seconds: Histograms<JobLabel>,
    reconcile_fetches: Family<FetchLabels, Counter>,
    connections_open: Gauge,
    connections_shed: Family<ReasonLabel, Counter>,
    push_mode: Family<CorpLabel, Gauge>,
    stream_connections: Family<StateLabel, Gauge>,
    stream_reconnects: Family<CauseLabel, Counter>,
    stream_frames: Family<FrameLabel, Counter>,
    stream_acks: Family<StatusLabel, Counter>,
    stream_ack_seconds: Histogram,
}

/// 1 ms … ~16 s: a callback ack must stay under DingTalk's 1.5 s.
fn fast_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// 10 ms … ~1.5 h: outbox creates and job runs.
fn slow_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 20))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut m = Metrics {
        registry: Registry::default(),
        events: Family::default(),
        ack_seconds: fast_buckets(),
        outbox_creates: Family::default(),
        outbox_create_seconds: slow_buckets(),
        outbox_failed: Family::default(),
        actions_sent: Family::default(),
        action_seconds: slow_buckets(),
        dingtalk_calls: Family::default(),
        budget_wait_seconds: fast_buckets(),
        job_runs: Family::default(),
        job_seconds: Family::new_with_constructor(slow_buckets),
        reconcile_fetches: Family::default(),
        connections_open: Gauge::default(),
        connections_shed: Family::default(),
        push_mode: Family::default(),
        stream_connections: Family::default(),
        stream_reconnects: Family::default(),
        stream_frames: Family::default(),
        stream_acks: Family::default(),
        stream_ack_seconds: fast_buckets(),
    };
    m.registry.register(
        "dingsync_stream_connections",
        "Stream connections of this replica by state (connecting, up, draining: told to disconnect, kept until its replacement is up)",
        m.stream_connections.clone(),
    );
    m.registry.register(
        "dingsync_stream_reconnects",
        "Stream connections replaced, by cause (closed, error, silent, disconnect, open_failed, connect_failed)",
        m.stream_reconnects.clone(),
    );
    m.registry.register(
        "dingsync_stream_frames",
        "Stream frames received by kind (event, ping, disconnect, system, callback, malformed)",
        m.stream_frames.clone(),
    );
    m.registry.register(
        "dingsync_stream_acks",
        "Stream acknowledgements sent by status (success, later, bad_request, not_found, error)",
        m.stream_acks.clone(),
    );
    m.registry.register(
        "dingsync_stream_ack_seconds",
        "From an EVENT frame's arrival to its acknowledgement (after the commit)",
        m.stream_ack_seconds.clone(),
    );
    m.registry.register(
        "dingsync_events_received",
        "Callback pushes by event type and outcome (stored, duplicate, answered, refused_*, unavailable, failed)",
        m.events.clone(),
    );
    m.registry.register(
        "dingsync_callback_ack_seconds",
        "Time from receiving a callback push to answering it",
        m.ack_seconds.clone(),
    );
    m.registry.register(
        "dingsync_outbox_creates",
        "Outbox creates sent to DingTalk by outcome (created, rejected, not_sent, no_response, paused: held back for the monthly allowance)",
        m.outbox_creates.clone(),
    );
    m.registry.register(
        "dingsync_outbox_create_seconds",
        "Time from an outbox row's INSERT until DingTalk created its approval",
        m.outbox_create_seconds.clone(),
    );
    m.registry.register(
        "dingsync_outbox_failed",
        "Outbox rows failed for good by reason (invalid request, rejected by DingTalk, refused by the forecast, out of attempts)",
        m.outbox_failed.clone(),
    );
    m.registry.register(
        "dingsync_actions_sent",
        "Actions on approvals sent to DingTalk by action and outcome (done, refused, not_sent, no_response, paused)",
        m.actions_sent.clone(),
    );
    m.registry.register(
        "dingsync_action_seconds",
        "Time from an action's INSERT until DingTalk carried it out (answered sends only)",
        m.action_seconds.clone(),
    );
    m.registry.register(
        "dingsync_dingtalk_calls",
        "DingTalk API exchanges by endpoint and errcode (0 success, http_<status>, transport)",
        m.dingtalk_calls.clone(),
    );
    m.registry.register(
        "dingsync_rate_budget_wait_seconds",
        "Time a DingTalk call waited for a slot of the shared rate budget",
        m.budget_wait_seconds.clone(),
    );
    m.registry.register(
        "dingsync_job_runs",
        "Scheduled job runs by job and outcome (ok, failed, cancelled)",
        m.job_runs.clone(),
    );
    m.registry.register(
        "dingsync_job_duration_seconds",
        "Duration of scheduled job runs",
        m.job_seconds.clone(),
    );
    m.registry.register(
        "dingsync_reconcile_fetches",
        "Approvals fetched from DingTalk and applied, by source (details, sweep, gap, poll, backfill, search) and outcome (changed, unchanged, stale, rejected, failed, paused); changed by sweep, gap or backfill is drift repaired",
        m.reconcile_fetches.clone(),
    );
    m.registry.register(
        "dingsync_http_connections",
        "HTTP connections open now (server.max_connections plus server.probe_connections at most)",
        m.connections_open.clone(),
    );
    m.registry.register(
        "dingsync_push_mode",
        "How the planner keeps an organisation in step: 0 pushes arrive, 1 polling (pushes missing)",
        m.push_mode.clone(),
    );
    m.registry.register(
        "dingsync_http_connections_shed",
        "Connections the server closed or refused itself, by reason (evicted, refused, header_timeout, idle_timeout, probe_only)",
        m.connections_shed.clone(),
    );
    m
});

/// One callback push was answered after `took`: `event_type` is the event's type (or `unknown`
/// when it was refused before it could be read), `outcome` what became of it.
pub fn callback_answered(event_type: &'static str, outcome: &'static str, took: Duration) {
    METRICS
        .events
        .get_or_create(&EventLabels {
            event_type,
            outcome,
        })
        .inc();
    METRICS.ack_seconds.observe(took.as_secs_f64());
}

/// One outbox create came back with `outcome`; `insert_to_created` is the row's INSERT-to-created
/// latency when it was created.
pub fn outbox_create(outcome: &'static str, insert_to_created: Option<Duration>) {
    if let Some(age) = insert_to_created {
        METRICS.outbox_create_seconds.observe(age.as_secs_f64());
    }
    METRICS
        .outbox_creates
        .get_or_create(&OutcomeLabel { outcome })
        .inc();
}

/// An outbox row was failed for good, for `reason`.
pub fn outbox_failed(reason: &'static str) {
    METRICS
        .outbox_failed
        .get_or_create(&ReasonLabel { reason })
        .inc();
}

/// One action sent to DingTalk came back with `outcome`; when `done`, its INSERT-to-done latency
/// since `inserted_at` is observed.
pub fn action(action: &str, outcome: &'static str, inserted_at: chrono::DateTime<chrono::Utc>) {
    if outcome == "done" {
        let age = (chrono::Utc::now() - inserted_at)
            .to_std()
            .unwrap_or_default();
        METRICS.action_seconds.observe(age.as_secs_f64());
    }
    METRICS
        .actions_sent
        .get_or_create(&ActionLabels {
            action: action.to_string(),
            outcome,
        })
        .inc();
}

/// One HTTP exchange with DingTalk at `endpoint` (a fixed API path) ended with `errcode` (the
/// client's label: DingTalk's errcode, `http_<status>` or `transport`).
pub fn dingtalk_call(endpoint: &str, errcode: String) {
    METRICS
        .dingtalk_calls
        .get_or_create(&CallLabels {
            endpoint: endpoint.to_string(),
            errcode,
        })
        .inc();
}

/// A call got its rate-budget slot after `waited`.
pub fn budget_waited(waited: Duration) {
    METRICS.budget_wait_seconds.observe(waited.as_secs_f64());
}

/// The planner's mode for `corp_id` (one series per organisation served): polling or push.
pub fn push_mode(corp_id: &str, polling: bool) {
    METRICS
        .push_mode
        .get_or_create(&CorpLabel {
            corp_id: corp_id.to_string(),
        })
        .set(i64::from(polling));
}

/// Stream connections of this replica now in `state` change by `delta`.
pub fn stream_connections(state: &'static str, delta: i64) {
    METRICS
        .stream_connections
        .get_or_create(&StateLabel { state })
        .inc_by(delta);
}

/// A Stream connection is being replaced for `cause`.
pub fn stream_reconnect(cause: &'static str) {
    METRICS
        .stream_reconnects
        .get_or_create(&CauseLabel { cause })
        .inc();
}

/// A Stream frame of `frame` kind arrived.
pub fn stream_frame(frame: &'static str) {
    METRICS
        .stream_frames
        .get_or_create(&FrameLabel { frame })
        .inc();
}

/// A Stream acknowledgement with `status` was sent, `took` after its frame arrived.
pub fn stream_ack(status: &'static str, took: Duration) {
    METRICS
        .stream_acks
        .get_or_create(&StatusLabel { status })
        .inc();
    METRICS.stream_ack_seconds.observe(took.as_secs_f64());
}

/// A scheduled job run ended with `outcome` after `took`.
pub fn job_run(job: &'static str, outcome: &'static str, took: Duration) {
    METRICS
        .job_runs
        .get_or_create(&JobLabels { job, outcome })
        .inc();
    METRICS
        .job_seconds
        .get_or_create(&JobLabel { job })
        .observe(took.as_secs_f64());
}

/// One approval fetched for `source` (a snapshot source: why it was fetched) came to `outcome`.
pub fn reconcile_fetch(source: &'static str, outcome: &'static str) {
    METRICS
        .reconcile_fetches
        .get_or_create(&FetchLabels { source, outcome })
        .inc();
}

/// An HTTP connection was opened (`1`) or closed (`-1`).
pub fn http_connections(delta: i64) {
    METRICS.connections_open.inc_by(delta);
}

/// The server shed a connection for `reason`: `evicted` (closed while idle to make room for a new
/// one), `refused` (no room at all), `header_timeout`, `idle_timeout`, or `probe_only` (a request
/// other than a probe on a probe connection, answered 503).
pub fn http_connection_shed(reason: &'static str) {
    METRICS
        .connections_shed
        .get_or_create(&ReasonLabel { reason })
        .inc();
}

/// What the database said at the latest reading.
#[derive(Clone)]
pub struct Scraped {
    /// Outbox rows still in progress, by state.
    pub outbox_rows: Vec<(&'static str, i64)>,
    /// Age of the oldest approval change not yet fetched from DingTalk.
    pub sync_lag_seconds: f64,
    /// Each organisation's month against its monthly allowances (one per app).
    pub allowances: Vec<AllowanceReading>,
}

/// One organisation's month against its allowances (docs/dingtalk.md §7).
#[derive(Clone, Debug)]
pub struct AllowanceReading {
    pub corp_id: String,
    /// Metered calls.
    pub calls: Allowance,
    pub deliveries: Allowance,
    /// Whether metered calls are paused now.
    pub paused: bool,
}

/// One allowance this month.
#[derive(Clone, Copy, Debug)]
pub struct Allowance {
    pub used: i64,
    /// dingsync's share; 0: unmetered.
    pub limit: u64,
    /// Used by the month's end at the current pace.
    pub forecast: i64,
}

fn register_allowance(registry: &mut Registry, readings: Vec<AllowanceReading>) {
    let (used, limit, remaining, forecast) = (
        Family::<AllowanceLabels, Gauge>::default(),
        Family::<AllowanceLabels, Gauge>::default(),
        Family::<AllowanceLabels, Gauge>::default(),
        Family::<AllowanceLabels, Gauge>::default(),
    );
    let paused = Family::<CorpLabel, Gauge>::default();
    for a in readings {
        for (kind, allowance) in [("call", a.calls), ("delivery", a.deliveries)] {
            let labels = AllowanceLabels {
                corp_id: a.corp_id.clone(),
                kind,
            };
            let cap = i64::try_from(allowance.limit).unwrap_or(i64::MAX);
            used.get_or_create(&labels).set(allowance.used);
            limit.get_or_create(&labels).set(cap);
            if allowance.limit > 0 {
                remaining
                    .get_or_create(&labels)
                    .set((cap - allowance.used).max(0));
            }
            forecast.get_or_create(&labels).set(allowance.forecast);
        }
        paused
            .get_or_create(&CorpLabel { corp_id: a.corp_id })
            .set(i64::from(a.paused));
    }
    registry.register(
        "dingsync_allowance_used",
        "This Beijing month's metered DingTalk calls (kind=call) or event deliveries (kind=delivery), all replicas",
        used,
    );
    registry.register(
        "dingsync_allowance_limit",
        "dingsync's share of the monthly allowance (dingtalk.monthly_calls, dingtalk.monthly_deliveries; 0: unmetered)",
        limit,
    );
    registry.register(
        "dingsync_allowance_remaining",
        "What is left of dingsync's share this month (metered allowances only)",
        remaining,
    );
    registry.register(
        "dingsync_allowance_forecast",
        "This month's calls or deliveries by its end at the pace of the last 7 days",
        forecast,
    );
    registry.register(
        "dingsync_allowance_paused",
        "1 while metered DingTalk calls are paused (DingTalk answered 90020 this month, or dingtalk.monthly_calls is used)",
        paused,
    );
}

/// The whole `/metrics` page: every series of this process, then the scraped ones (left out
/// when the database did not answer, with `dingsync_database_up` 0). `token_valid_for`: how
/// long the access token held stays valid (zero when none is), `None` without a DingTalk client.
pub fn encode(scraped: Option<Scraped>, token_valid_for: Option<Duration>) -> String {
    let mut page = String::new();
    // Writing to a String cannot fail.
    let _ = text::encode_registry(&mut page, &METRICS.registry);
    let mut registry = Registry::default();
    let database_up = Gauge::<i64>::default();
    if let Some(scraped) = scraped {
        database_up.set(1);
        let rows = Family::<StateLabel, Gauge>::default();
        for (state, count) in scraped.outbox_rows {
            rows.get_or_create(&StateLabel { state }).set(count);
        }
        registry.register(
            "dingsync_outbox_rows",
            "Outbox rows still in progress by state (from the latest reading, at most 1 s old; finished rows are counted by dingsync_outbox_creates)",
            rows,
        );
        let sync_lag = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        sync_lag.set(scraped.sync_lag_seconds);
        if !scraped.allowances.is_empty() {
            register_allowance(&mut registry, scraped.allowances);
        }
        registry.register(
            "dingsync_sync_lag_seconds",
            "Age of the oldest approval change not yet fetched from DingTalk (0 when none)",
            sync_lag,
        );
    }
    if let Some(valid_for) = token_valid_for {
        let token = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        token.set(valid_for.as_secs_f64());
        registry.register(
            "dingsync_access_token_valid_seconds",
            "How long the access token held (this process's, else the one shared in the database) stays valid, for the app whose token runs out first; 0 when none is. Renewal starts 600 s before expiry: less means renewing fails",
            token,
        );
    }
    registry.register(
        "dingsync_database_up",
        "1 when the database answered the latest reading (at most 1 s old)",
        database_up,
    );
    let _ = text::encode_registry(&mut page, &registry);
    let _ = text::encode_eof(&mut page);
    page
}
