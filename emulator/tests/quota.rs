//! DingTalk's monthly allowances in the emulator, over real HTTP (docs/dingtalk.md §7): past the
//! calls allowance metered calls are refused with 90020 and not carried out while `gettoken`
//! keeps working; calls refused for rate or lost at the gateway are not counted; past the
//! deliveries allowance events are neither pushed nor parked in the failed list; a rollover and
//! a raised allowance take effect at once.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use dingsync_crypto::{self as crypto, CallbackCrypto};
use dingsync_emulator::{
    Allowances, Emulator, EmulatorConfig, Faults, InjectedError, OVER_ALLOWANCE, PushOutcome,
    QuotaReport, StartInstance, TaskAction,
};
use serde_json::{Value, json};

const TAGS: [&str; 2] = ["bpms_instance_change", "bpms_task_change"];

/// DingTalk's refusal text for a count and an allowance (docs/dingtalk.md §7).
fn refusal_text(count: u64, allowance: u64) -> String {
    format!(
        "您的企业本月api调用量已超过限制,调用量:{count}次,额度:{allowance}次,请登录开发者后台-资源管理-查看用量明细"
    )
}

async fn start(monthly_calls: u64, monthly_deliveries: u64) -> Emulator {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Emulator::start(
        EmulatorConfig {
            time_scale: 0.01,
            seed: 11,
            monthly_calls,
            monthly_deliveries,
            ..EmulatorConfig::default()
        },
        local,
    )
    .await
    .unwrap()
}

/// A bare DingTalk client, without retries.
struct Dt {
    http: reqwest::Client,
    base: String,
}

impl Dt {
    fn new(emulator: &Emulator) -> Dt {
        Dt {
            http: reqwest::Client::new(),
            base: emulator.base_url(),
        }
    }

    async fn gettoken(&self) -> Value {
        let c = EmulatorConfig::default();
        self.http
            .get(format!("{}/gettoken", self.base))
            .query(&[("appkey", &c.app_key), ("appsecret", &c.app_secret)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn token(&self) -> String {
        let v = self.gettoken().await;
        v["access_token"].as_str().unwrap().to_string()
    }

    async fn top_response(&self, path: &str, token: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}/topapi/processinstance/{path}", self.base))
            .query(&[("access_token", token)])
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// A topapi approval call; DingTalk's errors are HTTP 200 too.
    async fn top(&self, path: &str, token: &str, body: Value) -> Value {
        let response = self.top_response(path, token, body).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    async fn get(&self, token: &str, id: &str) -> Value {
        self.top("get", token, json!({"process_instance_id": id}))
            .await
    }

    async fn callback(&self, path: &str, token: &str, body: Option<Value>) -> Value {
        let url = format!("{}/call_back/{path}", self.base);
        let request = match body {
            Some(body) => self.http.post(url).json(&body),
            None => self.http.get(url),
        };
        let response = request
            .query(&[("access_token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }
}

fn expense_create() -> Value {
    json!({
        "process_code": "PROC-EMU-EXPENSE",
        "originator_user_id": "emp1",
        "dept_id": 100,
        "approvers": "manager1",
        "form_component_values": [
            {"name": "Reason", "value": "trip"},
            {"name": "Amount", "value": "100.50"},
            {"name": "Type", "value": "差旅"}
        ]
    })
}

fn listids_body() -> Value {
    json!({"process_code": "PROC-EMU-EXPENSE",
        "start_time": chrono::Utc::now().timestamp_millis() - 60_000})
}

fn admin(emu: &Emulator, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .request(method, format!("{}/_emulator/{path}", emu.base_url()))
        .bearer_auth(emu.admin_token())
}

/// Polls `check` every 10 ms until it is true; fails after `within`.
async fn until(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A callback endpoint that opens every push and answers `success`, or `status` when set.
struct Receiver {
    url: String,
    token: String,
    aes_key: String,
    state: Arc<ReceiverState>,
}

struct ReceiverState {
    crypto: CallbackCrypto,
    owner_key: String,
    status: Mutex<Option<u16>>,
    /// The messages received, `check_url` included.
    received: Mutex<Vec<Value>>,
}

impl Receiver {
    /// Starts a receiver for `emu`'s organisation and registers it (which must succeed).
    async fn registered(emu: &Emulator, dt: &Dt, token: &str) -> Receiver {
        let cb_token = crypto::random_nonce(32);
        let aes_key = crypto::random_aes_key();
        let state = Arc::new(ReceiverState {
            crypto: CallbackCrypto::new(&cb_token, &aes_key).unwrap(),
            owner_key: emu.state().corp_id().to_string(),
            status: Mutex::new(None),
            received: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/callback", listener.local_addr().unwrap());
        let router = Router::new()
            .route("/callback", post(receive))
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        let receiver = Receiver {
            url,
            token: cb_token,
            aes_key,
            state,
        };
        let registered = dt
            .callback(
                "register_call_back",
                token,
                Some(json!({"call_back_tag": TAGS, "token": receiver.token,
                    "aes_key": receiver.aes_key, "url": receiver.url})),
            )
            .await;
        assert_eq!(registered["errcode"], 0, "{registered}");
        receiver
    }

    fn answer_with(&self, status: u16) {
        *self.state.status.lock().unwrap() = Some(status);
    }

    /// Pushes received, `check_url` left out.
    fn events(&self) -> usize {
        let received = self.state.received.lock().unwrap();
        received
            .iter()
            .filter(|m| m["EventType"] != "check_url")
            .count()
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap();
    let Ok(opened) = state.crypto.open(
        &query["timestamp"],
        &query["nonce"],
        body["encrypt"].as_str().unwrap(),
        &query["signature"],
        &[state.owner_key.as_str()],
    ) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let message: Value = serde_json::from_str(&opened.message).unwrap();
    let is_check = message["EventType"] == "check_url";
    state.received.lock().unwrap().push(message);
    if let (Some(status), false) = (*state.status.lock().unwrap(), is_check) {
        return StatusCode::from_u16(status).unwrap().into_response();
    }
    let time_stamp = chrono::Utc::now().timestamp_millis().to_string();
    let nonce = crypto::random_nonce(16);
    let sealed = state
        .crypto
        .seal("success", &state.owner_key, &time_stamp, &nonce);
    Json(
        json!({"msg_signature": sealed.signature, "timeStamp": time_stamp, "nonce": nonce,
        "encrypt": sealed.encrypt}),
    )
    .into_response()
}

fn start_expense() -> StartInstance {
    StartInstance {
        process_code: "PROC-EMU-EXPENSE".into(),
        originator_userid: "emp1".into(),
        approvers: Some(vec!["manager1".into()]),
        ..StartInstance::default()
    }
}

/// Distinct events (pushes) the log says were dropped for the allowance.
fn over_allowance_pushes(emu: &Emulator) -> usize {
    let log = emu.state().push_log();
    let mut ids: Vec<u64> = log
        .iter()
        .filter(|r| r.outcome == PushOutcome::OverAllowance)
        .map(|r| r.push_id)
        .collect();
    ids.dedup();
    ids.len()
}

#[tokio::test]
async fn past_the_calls_allowance_create_get_and_listids_answer_90020_and_create_nothing() {
    let emu = start(3, 0).await;
    let dt = Dt::new(&emu);
    let token = dt.token().await;

    let created = dt.top("create", &token, expense_create()).await;
    assert_eq!(created["errcode"], 0, "{created}");
    let id = created["process_instance_id"].as_str().unwrap().to_string();
    assert_eq!(dt.get(&token, &id).await["errcode"], 0);
    assert_eq!(
        dt.top("listids", &token, listids_body()).await["errcode"],
        0
    );

    // The fourth metered call and every one after it: 90020, DingTalk's message with the count
    // this call would make and the allowance, plain on topapi (no 88 wrapper) with a request_id.
    let refused = dt.top("create", &token, expense_create()).await;
    assert_eq!(refused["errcode"], OVER_ALLOWANCE, "{refused}");
    assert_eq!(refused["errmsg"], refusal_text(4, 3));
    assert!(refused["request_id"].is_string(), "{refused}");
    assert!(refused.get("sub_code").is_none(), "{refused}");
    assert!(refused.get("process_instance_id").is_none(), "{refused}");
    for refused in [
        dt.get(&token, &id).await,
        dt.top("listids", &token, listids_body()).await,
    ] {
        assert_eq!(refused["errcode"], OVER_ALLOWANCE, "{refused}");
        assert_eq!(refused["errmsg"], refusal_text(4, 3));
    }
    // Callback management is metered too; classic paths carry no request_id.
    let refused = dt.callback("get_call_back", &token, None).await;
    assert_eq!(refused["errcode"], OVER_ALLOWANCE, "{refused}");
    assert!(refused.get("request_id").is_none(), "{refused}");

    // The refused create created nothing.
    let instances = emu.state().instances();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].process_instance_id, id);
    let quota = emu.state().quota();
    assert_eq!(
        (quota.calls.allowance, quota.calls.used, quota.calls.refused),
        (3, 3, 4)
    );
    assert_eq!(
        quota.calls.by_api,
        BTreeMap::from([
            ("topapi/processinstance/create".to_string(), 1),
            ("topapi/processinstance/get".to_string(), 1),
            ("topapi/processinstance/listids".to_string(), 1),
        ])
    );
    emu.stop().await;
}

#[tokio::test]
async fn gettoken_is_not_metered_and_still_works_past_the_allowance_while_business_errors_count() {
    let emu = start(1, 0).await;
    let dt = Dt::new(&emu);
    let token = dt.token().await;
    // A business error (no such instance) is counted: the stricter reading.
    let missing = dt.get(&token, "no-such-instance").await;
    assert_ne!(missing["errcode"], 0);
    assert_ne!(missing["errcode"], OVER_ALLOWANCE);
    assert_eq!(
        dt.get(&token, "no-such-instance").await["errcode"],
        OVER_ALLOWANCE
    );

    let again = dt.gettoken().await;
    assert_eq!(again["errcode"], 0, "{again}");
    assert_eq!(again["access_token"], token.as_str());
    emu.state().revoke_token();
    let fresh = dt.gettoken().await;
    assert_eq!(fresh["errcode"], 0, "{fresh}");
    assert_ne!(fresh["access_token"], token.as_str());

    let quota = emu.state().quota();
    assert_eq!((quota.calls.used, quota.calls.refused), (1, 1));
    assert!(!quota.calls.by_api.contains_key("gettoken"));
    assert_eq!(emu.state().calls("gettoken"), 3);
    emu.stop().await;
}

#[tokio::test]
async fn calls_refused_for_rate_or_lost_at_the_gateway_are_not_counted() {
    let emu = start(1, 0).await;
    let dt = Dt::new(&emu);
    let token = dt.token().await;
    let state = emu.state();

    // A limit of 0 calls a second refuses every call of the endpoint for rate.
    state.set_faults(Faults {
        rate_limit_qps: BTreeMap::from([("topapi/processinstance/get".to_string(), 0)]),
        ..Faults::default()
    });
    for _ in 0..3 {
        let limited = dt.get(&token, "x").await;
        assert_eq!(
            (limited["errcode"].clone(), limited["sub_code"].clone()),
            (json!(88), json!("90002")),
            "{limited}"
        );
    }
    state.reset_faults();
    state.inject(
        "topapi/processinstance/get",
        InjectedError::GatewayTimeout,
        2,
    );
    state.inject("topapi/processinstance/get", InjectedError::RateLimit, 1);
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(dt.get(&token, "x").await["errcode"].clone());
    }
    assert_eq!(answers, [json!(15), json!(15), json!(88)]);
    state.set_faults(Faults {
        http_5xx_rate: 1.0,
        ..Faults::default()
    });
    let bad_gateway = dt
        .top_response("get", &token, json!({"process_instance_id": "x"}))
        .await;
    assert_eq!(bad_gateway.status(), 502);
    state.reset_faults();
    // A refused token names no organisation to charge.
    let refused_token = dt.get("not-a-token", "x").await;
    assert_eq!(refused_token["sub_code"], "40014", "{refused_token}");
    assert_eq!(state.quota().calls.used, 0);

    // The allowance of one call is still whole.
    let counted = dt.get(&token, "x").await;
    assert_ne!(counted["errcode"], OVER_ALLOWANCE, "{counted}");
    assert_eq!(dt.get(&token, "x").await["errcode"], OVER_ALLOWANCE);
    let quota = state.quota();
    assert_eq!((quota.calls.used, quota.calls.refused), (1, 1));
    emu.stop().await;
}

#[tokio::test]
async fn past_the_deliveries_allowance_events_are_not_pushed_and_not_in_the_failed_list() {
    let emu = start(0, 1).await;
    let dt = Dt::new(&emu);
    let token = dt.token().await;
    let receiver = Receiver::registered(&emu, &dt, &token).await;
    let state = emu.state();

    // A start makes an instance event and a task event: one fits the allowance.
    let instance = state.start_instance(start_expense()).unwrap();
    assert!(state.settle(Duration::from_secs(10)).await);
    state
        .agree(instance.tasks[0].taskid, TaskAction::default())
        .unwrap();
    assert!(state.settle(Duration::from_secs(10)).await);

    // The check_url handshake of the registration is not a delivery.
    assert_eq!(receiver.events(), 1);
    let quota = state.quota();
    assert_eq!((quota.deliveries.allowance, quota.deliveries.used), (1, 1));
    assert_eq!(quota.deliveries.by_event.values().sum::<u64>(), 1);
    let dropped = over_allowance_pushes(&emu);
    assert!(dropped >= 3, "start and agree make at least four events");
    assert_eq!(quota.deliveries.undelivered, dropped as u64);
    // No retry, nothing parked: the failed list stays empty.
    let log = state.push_log();
    assert!(log.iter().all(|r| r.outcome != PushOutcome::Parked));
    assert_eq!(log.iter().filter(|r| r.attempt.is_some()).count(), 1);
    assert_eq!(state.failed_pending(), 0);
    emu.stop().await;
}

#[tokio::test]
async fn every_push_attempt_counts_so_an_event_whose_retries_run_past_the_allowance_is_dropped() {
    let emu = start(0, 2).await;
    let dt = Dt::new(&emu);
    let token = dt.token().await;
    let receiver = Receiver::registered(&emu, &dt, &token).await;
    receiver.answer_with(500);
    let state = emu.state();

    // Two events, each failing its first attempt: the retries (100 ms later at time_scale
    // 0.01) find the allowance used up, and neither event reaches the failed list.
    state.start_instance(start_expense()).unwrap();
    assert!(state.settle(Duration::from_secs(10)).await);

    assert_eq!(receiver.events(), 2);
    let quota = state.quota();
    assert_eq!(
        (quota.deliveries.used, quota.deliveries.undelivered),
        (2, 2)
    );
    assert_eq!(over_allowance_pushes(&emu), 2);
    let log = state.push_log();
    assert_eq!(log.iter().filter(|r| r.attempt.is_some()).count(), 2);
    assert!(log.iter().all(|r| r.outcome != PushOutcome::Parked));
    assert_eq!(state.failed_pending(), 0);
    emu.stop().await;
}

#[tokio::test]
async fn a_rollover_starts_a_new_month_and_metered_calls_work_again() {
    let emu = start(1, 0).await;
    let dt = Dt::new(&emu);
    let token = dt.token().await;
    assert_ne!(dt.get(&token, "x").await["errcode"], OVER_ALLOWANCE);
    assert_eq!(dt.get(&token, "x").await["errcode"], OVER_ALLOWANCE);

    let unauthorised = reqwest::Client::new()
        .post(format!("{}/_emulator/quota/rollover", emu.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorised.status(), 401);
    assert_eq!(emu.state().quota().calls.used, 1, "a refused rollover");

    let response = admin(&emu, reqwest::Method::POST, "quota/rollover")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let ended: QuotaReport = response.json().await.unwrap();
    assert_eq!(
        (ended.calls.allowance, ended.calls.used, ended.calls.refused),
        (1, 1, 1)
    );
    assert_eq!(
        ended.calls.by_api,
        BTreeMap::from([("topapi/processinstance/get".to_string(), 1)])
    );

    assert_ne!(dt.get(&token, "x").await["errcode"], OVER_ALLOWANCE);
    let response = admin(&emu, reqwest::Method::GET, "quota")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let now: Value = response.json().await.unwrap();
    assert_eq!(now["calls"]["allowance"], 1);
    assert_eq!(now["calls"]["used"], 1);
    assert_eq!(now["calls"]["refused"], 0);
    assert_eq!(now["deliveries"]["used"], 0);
    let started =
        chrono::DateTime::parse_from_rfc3339(now["month_started_at"].as_str().unwrap()).unwrap();
    assert!(started >= ended.month_started_at);
    emu.stop().await;
}

#[tokio::test]
async fn raising_the_allowances_takes_effect_at_once() {
    let emu = start(1, 1).await;
    let dt = Dt::new(&emu);
    let token = dt.token().await;
    // The registration is the one metered call the allowance holds.
    let receiver = Receiver::registered(&emu, &dt, &token).await;
    assert_eq!(dt.get(&token, "x").await["errcode"], OVER_ALLOWANCE);

    let response = admin(&emu, reqwest::Method::POST, "quota")
        .json(&json!({"monthly_calls": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let raised: QuotaReport = response.json().await.unwrap();
    assert_eq!((raised.calls.allowance, raised.calls.used), (3, 1));
    assert_eq!(raised.deliveries.allowance, 1, "left out, so kept");
    assert_ne!(dt.get(&token, "x").await["errcode"], OVER_ALLOWANCE);

    // Deliveries: one event fits, the rest of the start is dropped; with no limit the next
    // events are pushed.
    let state = emu.state();
    let instance = state.start_instance(start_expense()).unwrap();
    assert!(state.settle(Duration::from_secs(10)).await);
    assert_eq!(receiver.events(), 1);
    let unlimited = state.set_allowances(Allowances {
        monthly_deliveries: Some(0),
        ..Allowances::default()
    });
    assert_eq!(unlimited.deliveries.allowance, 0);
    assert_eq!(unlimited.calls.allowance, 3);
    state
        .agree(instance.tasks[0].taskid, TaskAction::default())
        .unwrap();
    until(Duration::from_secs(10), "the agree's events", || {
        receiver.events() >= 3
    })
    .await;

    let unknown_field = admin(&emu, reqwest::Method::POST, "quota")
        .json(&json!({"monthly_api_calls": 10}))
        .send()
        .await
        .unwrap();
    assert!(unknown_field.status().is_client_error());
    assert_eq!(state.quota().calls.allowance, 3);
    emu.stop().await;
}
