//! The DingTalk emulator over real HTTP: token, approval APIs, callback management with the
//! `check_url` handshake, encrypted pushes with DingTalk's retry ladder and failed list, faults,
//! and the whole loop into a real daemon and its database.

mod common;

use std::{
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
use common::*;
use dingsync::crypto::{self, CallbackCrypto};
use dingsync_emulator::{
    Emulator, EmulatorConfig, Faults, InjectedError, PushFaults, PushOutcome, StartInstance,
    TaskAction,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const LOCAL: &str = "127.0.0.1:0";
const TAGS: [&str; 2] = ["bpms_instance_change", "bpms_task_change"];

fn local() -> SocketAddr {
    LOCAL.parse().unwrap()
}

async fn start(config: EmulatorConfig) -> Emulator {
    install_crypto_provider();
    Emulator::start(config, local()).await.unwrap()
}

/// An emulator whose DingTalk seconds last `time_scale` real seconds.
async fn emulator(time_scale: f64) -> Emulator {
    start(EmulatorConfig {
        time_scale,
        seed: 7,
        ..EmulatorConfig::default()
    })
    .await
}

/// A bare DingTalk client: what the daemon's client does, without its retries.
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

    async fn gettoken(&self, key: &str, secret: &str) -> Value {
        self.http
            .get(format!("{}/gettoken", self.base))
            .query(&[("appkey", key), ("appsecret", secret)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn token(&self) -> String {
        let c = EmulatorConfig::default();
        let v = self.gettoken(&c.app_key, &c.app_secret).await;
        v["access_token"].as_str().unwrap().to_string()
    }

    /// A topapi call; asserts DingTalk's rule that errors are HTTP 200 too.
    async fn top(&self, path: &str, token: &str, body: Value) -> Value {
        let response = self
            .http
            .post(format!("{}/topapi/{path}", self.base))
            .query(&[("access_token", token)])
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    async fn oapi_get(&self, path: &str, token: &str) -> Value {
        let response = self
            .http
            .get(format!("{}/call_back/{path}", self.base))
            .query(&[("access_token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    async fn oapi_post(&self, path: &str, token: &str, body: Value) -> Value {
        let response = self
            .http
            .post(format!("{}/call_back/{path}", self.base))
            .query(&[("access_token", token)])
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    async fn register(&self, token: &str, url: &str, cb_token: &str, aes_key: &str) -> Value {
        self.oapi_post(
            "register_call_back",
            token,
            json!({"call_back_tag": TAGS, "token": cb_token, "aes_key": aes_key, "url": url}),
        )
        .await
    }
}

/// An emulator (see [`emulator`]), a client for it and a valid access token.
async fn connected(time_scale: f64) -> (Emulator, Dt, String) {
    let emu = emulator(time_scale).await;
    let dt = Dt::new(&emu);
    let token = dt.token().await;
    (emu, dt, token)
}

/// A [`Receiver`] for `emu`'s organisation, registered as its callback (which must succeed).
async fn registered_receiver(emu: &Emulator, dt: &Dt, token: &str) -> Receiver {
    let receiver = Receiver::start(emu.state().corp_id()).await;
    assert_eq!(
        dt.register(token, &receiver.url, &receiver.token, &receiver.aes_key)
            .await["errcode"],
        0
    );
    receiver
}

fn expense_create() -> Value {
    json!({
        "process_code": "PROC-EMU-EXPENSE",
        "originator_user_id": "emp1",
        "dept_id": 100,
        "approvers": "manager1,fin1",
        "form_component_values": [
            {"name": "Reason", "value": "trip"},
            {"name": "Amount", "value": "100.50"},
            {"name": "Type", "value": "差旅"}
        ]
    })
}

fn start_expense() -> StartInstance {
    StartInstance {
        process_code: "PROC-EMU-EXPENSE".into(),
        originator_userid: "emp1".into(),
        ..StartInstance::default()
    }
}

/// What a receiver does with the next push.
#[derive(Clone)]
enum Mode {
    /// Answer like a correct daemon.
    Success,
    /// Answer with this HTTP status.
    Status(u16),
    /// Answer `success`, but sealed with another AES key.
    WrongKey,
}

/// One push as the receiver saw it.
#[derive(Clone, Debug)]
struct Received {
    query: std::collections::HashMap<String, String>,
    message: Value,
}

struct ReceiverState {
    crypto: CallbackCrypto,
    owner_key: String,
    mode: Mutex<Mode>,
    received: Mutex<Vec<Received>>,
}

/// A stand-in for the daemon's callback endpoint, with a token, a key and an owner key.
struct Receiver {
    url: String,
    token: String,
    aes_key: String,
    state: Arc<ReceiverState>,
    stop: CancellationToken,
}

impl Receiver {
    async fn start(owner_key: &str) -> Receiver {
        let token = crypto::random_nonce(32);
        let aes_key = crypto::random_aes_key();
        let state = Arc::new(ReceiverState {
            crypto: CallbackCrypto::new(&token, &aes_key).unwrap(),
            owner_key: owner_key.into(),
            mode: Mutex::new(Mode::Success),
            received: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind(LOCAL).await.unwrap();
        let url = format!("http://{}/callback", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let router = Router::new()
            .route("/callback", post(receive))
            .with_state(state.clone());
        let until = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(until.cancelled_owned())
                .await
                .unwrap();
        });
        Receiver {
            url,
            token,
            aes_key,
            state,
            stop,
        }
    }

    fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// Events received (not `check_url`).
    fn events(&self) -> Vec<Received> {
        self.state
            .received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.message["EventType"] != "check_url")
            .cloned()
            .collect()
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap();
    // Like the daemon: what does not open with our token, key and owner key is refused.
    let Ok(opened) = state.crypto.open(
        &query["timestamp"],
        &query["nonce"],
        body["encrypt"].as_str().unwrap(),
        &query["signature"],
        &[state.owner_key.as_str()],
    ) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    state.received.lock().unwrap().push(Received {
        query: query.clone(),
        message: serde_json::from_str(&opened.message).unwrap(),
    });
    let mode = state.mode.lock().unwrap().clone();
    let crypto = match mode {
        Mode::Status(code) => return StatusCode::from_u16(code).unwrap().into_response(),
        Mode::Success => state.crypto.clone(),
        Mode::WrongKey => CallbackCrypto::new("whatever1", &crypto::random_aes_key()).unwrap(),
    };
    let time_stamp = chrono::Utc::now().timestamp_millis().to_string();
    let nonce = crypto::random_nonce(16);
    let sealed = crypto.seal("success", &state.owner_key, &time_stamp, &nonce);
    Json(json!({"msg_signature": sealed.signature, "timeStamp": time_stamp, "nonce": nonce, "encrypt": sealed.encrypt}))
        .into_response()
}

/// `yyyy-MM-dd HH:mm:ss`.
fn is_beijing_time(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").is_ok() && s.len() == 19
    })
}

#[tokio::test]
async fn gettoken_returns_the_same_token_while_valid_and_40096_for_bad_credentials() {
    let emu = emulator(1.0).await;
    let dt = Dt::new(&emu);
    let c = EmulatorConfig::default();
    let first = dt.gettoken(&c.app_key, &c.app_secret).await;
    assert_eq!(first["errcode"], 0);
    assert_eq!(first["errmsg"], "ok");
    assert_eq!(first["expires_in"], 7200);
    let second = dt.gettoken(&c.app_key, &c.app_secret).await;
    assert_eq!(first["access_token"], second["access_token"]);

    let bad = dt.gettoken(&c.app_key, "not-the-secret").await;
    assert_eq!(bad["errcode"], 40096);
    assert!(bad.get("access_token").is_none());
    assert_eq!(emu.state().calls("gettoken"), 3);
    emu.stop().await;
}

#[tokio::test]
async fn a_token_expires_after_7200_seconds_times_the_time_scale() {
    // 7200 s × 0.0002 = 1.44 s.
    let (emu, dt, token) = connected(0.0002).await;
    let ok = dt.top("processinstance/listids", &token, json!({"process_code": "PROC-EMU-EXPENSE", "start_time": chrono::Utc::now().timestamp_millis() - 1000})).await;
    assert_eq!(ok["errcode"], 0, "{ok}");
    let expired = eventually(Duration::from_secs(5), "the token to expire", || {
        let (dt, token) = (&dt, &token);
        async move {
            let v = dt
                .top(
                    "processinstance/get",
                    token,
                    json!({"process_instance_id": "x"}),
                )
                .await;
            (v["errcode"] == 88).then_some(v)
        }
    })
    .await;
    assert_eq!(expired["sub_code"], "40014");
    assert_ne!(dt.token().await, token);
    emu.stop().await;
}

#[tokio::test]
async fn calls_without_a_valid_token_get_errcode_88_40014_on_topapi_and_40014_on_oapi() {
    let emu = emulator(1.0).await;
    let dt = Dt::new(&emu);
    let body = json!({"process_instance_id": "x"});

    let unknown = dt
        .top("processinstance/get", "nosuchtoken", body.clone())
        .await;
    assert_eq!(unknown["errcode"], 88);
    assert_eq!(unknown["sub_code"], "40014");
    assert!(unknown["request_id"].is_string());
    let missing = dt.top("processinstance/get", "", body.clone()).await;
    assert_eq!(
        (missing["errcode"].clone(), missing["sub_code"].clone()),
        (json!(88), json!("40000"))
    );
    assert_eq!(
        dt.oapi_get("get_call_back", "nosuchtoken").await["errcode"],
        40014
    );

    let token = dt.token().await;
    assert_eq!(emu.state().current_token().as_deref(), Some(token.as_str()));
    emu.state().revoke_token();
    let revoked = dt.top("processinstance/get", &token, body).await;
    assert_eq!(revoked["sub_code"], "40014");
    let fresh = dt.token().await;
    assert_ne!(fresh, token);
    assert_eq!(emu.state().calls("gettoken"), 2);
    assert_eq!(emu.state().calls("topapi/processinstance/get"), 3);
    emu.stop().await;
}

#[tokio::test]
async fn create_then_get_has_dingtalks_shapes_through_to_completed_agree() {
    let (emu, dt, token) = connected(1.0).await;
    let created = dt
        .top("processinstance/create", &token, expense_create())
        .await;
    assert_eq!(created["errcode"], 0, "{created}");
    assert_eq!(created["errmsg"], "ok");
    assert!(created["request_id"].is_string());
    let pid = created["process_instance_id"].as_str().unwrap().to_string();

    let got = dt
        .top(
            "processinstance/get",
            &token,
            json!({"process_instance_id": pid}),
        )
        .await;
    assert_eq!(got["errcode"], 0);
    let p = &got["process_instance"];
    assert_eq!(p["status"], "RUNNING");
    assert_eq!(p["result"], "");
    assert!(p.get("finish_time").is_none());
    assert!(is_beijing_time(&p["create_time"]), "{}", p["create_time"]);
    let beijing_now = (chrono::Utc::now() + chrono::Duration::hours(8)).naive_utc();
    let created_at = chrono::NaiveDateTime::parse_from_str(
        p["create_time"].as_str().unwrap(),
        "%Y-%m-%d %H:%M:%S",
    )
    .unwrap();
    assert!(
        (beijing_now - created_at).num_seconds().abs() < 5,
        "create_time is Beijing time"
    );
    assert_eq!(p["originator_userid"], "emp1");
    assert_eq!(p["originator_dept_id"], "100");
    assert_eq!(p["title"], "张三提交的报销");
    assert!(p["business_id"].as_str().unwrap().len() == 18);
    let form = p["form_component_values"].as_array().unwrap();
    assert_eq!(form.len(), 3);
    assert_eq!(form[1]["component_type"], "MoneyField");
    assert!(form[0]["id"].as_str().unwrap().starts_with("TextField-"));
    assert_eq!(
        p["operation_records"][0]["operation_type"],
        "START_PROCESS_INSTANCE"
    );
    let tasks = p["tasks"].as_array().unwrap();
    assert_eq!(
        tasks.len(),
        1,
        "only the first of two sequential approvers has a task"
    );
    assert_eq!(tasks[0]["userid"], "manager1");
    assert_eq!(tasks[0]["task_status"], "RUNNING");
    let taskid = tasks[0]["taskid"]
        .as_str()
        .expect("taskid is a string here");
    let taskid: i64 = taskid.parse().unwrap();

    let state = emu.state();
    state
        .agree(
            taskid,
            TaskAction {
                remark: Some("ok".into()),
                ..TaskAction::default()
            },
        )
        .unwrap();
    let next = state.instance(&pid).unwrap().tasks[1].taskid;
    state
        .agree(
            next,
            TaskAction {
                userid: Some("fin1".into()),
                ..TaskAction::default()
            },
        )
        .unwrap();

    let p = dt
        .top(
            "processinstance/get",
            &token,
            json!({"process_instance_id": pid}),
        )
        .await["process_instance"]
        .clone();
    assert_eq!(
        (p["status"].as_str(), p["result"].as_str()),
        (Some("COMPLETED"), Some("agree"))
    );
    assert!(is_beijing_time(&p["finish_time"]));
    assert_eq!(p["tasks"][0]["task_result"], "AGREE");
    assert!(is_beijing_time(&p["tasks"][0]["finish_time"]));
    let records: Vec<&str> = p["operation_records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["operation_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        records,
        [
            "START_PROCESS_INSTANCE",
            "EXECUTE_TASK_NORMAL",
            "EXECUTE_TASK_NORMAL"
        ]
    );
    assert_eq!(p["operation_records"][1]["remark"], "ok");

    let unknown = dt
        .top(
            "processinstance/get",
            &token,
            json!({"process_instance_id": "nope"}),
        )
        .await;
    assert_ne!(unknown["errcode"], 0);
    emu.stop().await;
}

#[tokio::test]
async fn create_refuses_what_dingtalk_refuses() {
    let (emu, dt, token) = connected(1.0).await;
    let mut cases = Vec::new();
    for field in [
        "process_code",
        "originator_user_id",
        "dept_id",
        "form_component_values",
    ] {
        let mut body = expense_create();
        body.as_object_mut().unwrap().remove(field);
        cases.push((format!("without {field}"), body));
    }
    let mut number = expense_create();
    number["form_component_values"][1]["value"] = json!(100);
    cases.push(("a number value".into(), number));
    let mut unknown = expense_create();
    unknown["process_code"] = json!("PROC-DOES-NOT-EXIST");
    cases.push(("an unknown process_code".into(), unknown));
    let mut nobody = expense_create();
    nobody["approvers"] = json!("manager1,ghost");
    cases.push(("an unknown approver".into(), nobody));
    let mut required = expense_create();
    required["form_component_values"]
        .as_array_mut()
        .unwrap()
        .remove(0);
    cases.push(("a required control left out".into(), required));
    for (what, body) in cases {
        let v = dt.top("processinstance/create", &token, body).await;
        assert_ne!(v["errcode"], 0, "a create with {what} must fail: {v}");
        assert!(v["errmsg"].is_string());
        assert!(v.get("process_instance_id").is_none());
    }
    assert!(emu.state().instances().is_empty());
    emu.stop().await;
}

#[tokio::test]
async fn listids_pages_with_next_cursor_absent_on_the_last_page_and_refuses_a_window_over_120_days()
{
    let (emu, dt, token) = connected(1.0).await;
    let state = emu.state();
    let now = chrono::Utc::now().timestamp_millis();
    let mut created = Vec::new();
    for _ in 0..25 {
        created.push(
            state
                .start_instance(start_expense())
                .unwrap()
                .process_instance_id,
        );
    }
    // Created 10 days ago, by someone else, and of another template: outside the filters below.
    state
        .start_instance(StartInstance {
            create_time_ms: Some(now - 10 * 86_400_000),
            ..start_expense()
        })
        .unwrap();
    state
        .start_instance(StartInstance {
            originator_userid: "emp2".into(),
            ..start_expense()
        })
        .unwrap();
    state
        .start_instance(StartInstance {
            process_code: "PROC-EMU-LEAVE".into(),
            ..start_expense()
        })
        .unwrap();

    let mut listed = Vec::new();
    let mut cursor = 0;
    let mut pages = Vec::new();
    loop {
        let v = dt
            .top(
                "processinstance/listids",
                &token,
                json!({"process_code": "PROC-EMU-EXPENSE", "start_time": now - 60_000, "size": 10,
                       "cursor": cursor, "userid_list": "emp1"}),
            )
            .await;
        assert_eq!(v["errcode"], 0, "{v}");
        let list = v["result"]["list"].as_array().unwrap();
        pages.push(list.len());
        listed.extend(list.iter().map(|id| id.as_str().unwrap().to_string()));
        match v["result"].get("next_cursor") {
            Some(next) => cursor = next.as_u64().unwrap(),
            None => break,
        }
    }
    assert_eq!(pages, [10, 10, 5]);
    assert_eq!(listed, created);

    let everyone = dt
        .top("processinstance/listids", &token, json!({"process_code": "PROC-EMU-EXPENSE", "start_time": now - 11 * 86_400_000, "size": 20, "cursor": 20}))
        .await;
    assert_eq!(everyone["result"]["list"].as_array().unwrap().len(), 7);
    assert!(everyone["result"].get("next_cursor").is_none());

    let day = 86_400_000_i64;
    for (what, body) in [
        (
            "a window over 120 days",
            json!({"process_code": "PROC-EMU-EXPENSE", "start_time": now - 121 * day, "end_time": now}),
        ),
        (
            "a start over 365 days ago",
            json!({"process_code": "PROC-EMU-EXPENSE", "start_time": now - 400 * day, "end_time": now - 390 * day}),
        ),
        (
            "size 21",
            json!({"process_code": "PROC-EMU-EXPENSE", "start_time": now - day, "size": 21}),
        ),
        ("no start_time", json!({"process_code": "PROC-EMU-EXPENSE"})),
    ] {
        let v = dt.top("processinstance/listids", &token, body).await;
        assert_eq!(v["errcode"], 40035, "{what} must be refused: {v}");
    }
    emu.stop().await;
}

#[tokio::test]
async fn register_fails_with_71009_unless_the_url_answers_an_encrypted_success() {
    let (emu, dt, token) = connected(1.0).await;
    assert_eq!(dt.oapi_get("get_call_back", &token).await["errcode"], 71007);

    let receiver = Receiver::start(emu.state().corp_id()).await;
    for mode in [Mode::Status(500), Mode::WrongKey] {
        receiver.set_mode(mode);
        let v = dt
            .register(&token, &receiver.url, &receiver.token, &receiver.aes_key)
            .await;
        assert_eq!(v["errcode"], 71009, "{v}");
    }
    // A receiver that expects another owner key cannot even open the check.
    let daemon_of_someone_else = Receiver::start("dingsomeothercorp000").await;
    let other = dt
        .register(
            &token,
            &daemon_of_someone_else.url,
            &daemon_of_someone_else.token,
            &daemon_of_someone_else.aes_key,
        )
        .await;
    assert_eq!(other["errcode"], 71009);
    // Nobody listening.
    let closed = dt
        .register(
            &token,
            "http://127.0.0.1:9/callback",
            &receiver.token,
            &receiver.aes_key,
        )
        .await;
    assert_eq!(closed["errcode"], 71009);
    assert!(emu.state().callback().is_none());

    receiver.set_mode(Mode::Success);
    let ok = dt
        .register(&token, &receiver.url, &receiver.token, &receiver.aes_key)
        .await;
    assert_eq!(ok["errcode"], 0, "{ok}");
    let check = receiver.state.received.lock().unwrap()[0].clone();
    assert_eq!(check.message, json!({"EventType": "check_url"}));
    assert_eq!(check.query["timestamp"].len(), 13);
    assert_eq!(check.query["nonce"].len(), 8);
    emu.stop().await;
}

#[tokio::test]
async fn register_against_a_daemon_with_a_wrong_key_fails_and_with_the_right_one_succeeds() {
    let (emu, dt, token) = connected(1.0).await;

    let base = emu.base_url();
    let wrong_owner = TestApp::spawn_with(|c| {
        c.dingtalk.api_base = base.clone();
        c.callback.owner_key = vec!["dingsomeothercorp000".into()];
    })
    .await;
    let url = format!("{}/dingtalk/callback", wrong_owner.base_url);
    let v = dt
        .register(&token, &url, wrong_owner.token(), wrong_owner.crypto_key())
        .await;
    assert_eq!(v["errcode"], 71009, "owner key mismatch: {v}");
    wrong_owner.stop().await;

    let app = daemon_for(&emu).await;
    let url = format!("{}/dingtalk/callback", app.base_url);
    let v = dt
        .register(&token, &url, app.token(), &crypto::random_aes_key())
        .await;
    assert_eq!(v["errcode"], 71009, "another AES key: {v}");

    let v = dt
        .register(&token, &url, app.token(), app.crypto_key())
        .await;
    assert_eq!(v["errcode"], 0, "{v}");
    let again = dt
        .register(&token, &url, app.token(), app.crypto_key())
        .await;
    assert_eq!(again["errcode"], 71006);

    let got = dt.oapi_get("get_call_back", &token).await;
    assert_eq!(got["url"], url);
    assert_eq!(got["token"], app.token());
    assert_eq!(got["aes_key"], app.crypto_key());
    assert_eq!(got["call_back_tag"], json!(TAGS));

    let updated = dt
        .oapi_post(
            "update_call_back",
            &token,
            json!({"call_back_tag": ["bpms_instance_change"], "token": app.token(), "aes_key": app.crypto_key(), "url": url}),
        )
        .await;
    assert_eq!(updated["errcode"], 0, "{updated}");
    assert_eq!(dt.oapi_get("delete_call_back", &token).await["errcode"], 0);
    assert_eq!(
        dt.oapi_get("delete_call_back", &token).await["errcode"],
        71007
    );
    app.stop().await;
    emu.stop().await;
}

/// A daemon configured for `emu`'s organisation: owner key = the emulator's CorpId (callbacks
/// registered with register_call_back, docs/dingtalk.md §4.5). Its DingTalk base URL points at `emu`
/// without credentials, so it serves callbacks only and registers nothing by itself.
async fn daemon_for(emu: &Emulator) -> TestApp {
    let corp = emu.state().corp_id().to_string();
    let base = emu.base_url();
    TestApp::spawn_with(move |c| {
        c.dingtalk.api_base = base;
        c.callback.owner_key = vec![corp.clone()];
        c.dingtalk.corp_id = corp;
    })
    .await
}

async fn approval_state(app: &TestApp, pid: &str) -> Option<(String, Option<String>)> {
    sqlx::query_as("SELECT status, result FROM dingsync.approvals WHERE process_instance_id = $1")
        .bind(pid)
        .fetch_optional(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_approval_approved_in_the_emulator_reaches_completed_agree_in_the_daemons_table() {
    let emu = emulator(0.01).await;
    let app = daemon_for(&emu).await;
    let dt = Dt::new(&emu);
    let token = dt.token().await;
    let url = format!("{}/dingtalk/callback", app.base_url);
    assert_eq!(
        dt.register(&token, &url, app.token(), app.crypto_key())
            .await["errcode"],
        0
    );

    let created = dt
        .top("processinstance/create", &token, expense_create())
        .await;
    let pid = created["process_instance_id"].as_str().unwrap().to_string();
    let running = eventually(
        Duration::from_secs(10),
        "the start event in the table",
        || async { approval_state(&app, &pid).await },
    )
    .await;
    assert_eq!(running.0, "RUNNING");

    let state = emu.state();
    let first = state.open_tasks()[0].task.taskid;
    state.agree(first, TaskAction::default()).unwrap();
    let second = state.open_tasks()[0].task.taskid;
    state
        .agree(
            second,
            TaskAction {
                remark: Some("同意 ✅".into()),
                ..TaskAction::default()
            },
        )
        .unwrap();

    eventually(
        Duration::from_secs(10),
        "COMPLETED/agree in dingsync.approvals",
        || async {
            approval_state(&app, &pid)
                .await
                .filter(|s| s.0 == "COMPLETED" && s.1.as_deref() == Some("agree"))
        },
    )
    .await;
    let task: (String, Option<String>, Option<String>) = eventually(
        Duration::from_secs(10),
        "the second task's finish",
        || async {
            sqlx::query_as(
                "SELECT status, result, remark FROM dingsync.approval_tasks WHERE task_id = $1",
            )
            .bind(second)
            .fetch_optional(&app.pool)
            .await
            .unwrap()
            .filter(|t: &(String, Option<String>, Option<String>)| t.0 == "COMPLETED")
        },
    )
    .await;
    assert_eq!(task.1.as_deref(), Some("AGREE"));
    assert_eq!(task.2.as_deref(), Some("同意 ✅"));
    assert!(state.settle(Duration::from_secs(5)).await);
    let log = state.push_log();
    assert!(
        log.iter()
            .filter(|r| r.attempt.is_some())
            .all(|r| r.outcome == PushOutcome::Delivered),
        "{log:?}"
    );
    // instance start, task start ×2, task finish ×2, instance finish.
    assert_eq!(log.len(), 6);
    app.stop().await;
    emu.stop().await;
}

#[tokio::test]
async fn pushes_carry_dingtalks_query_and_flat_legacy_payload() {
    let (emu, dt, token) = connected(1.0).await;
    let receiver = registered_receiver(&emu, &dt, &token).await;
    let instance = emu.state().start_instance(start_expense()).unwrap();
    let events = eventually(Duration::from_secs(5), "two pushes", || async {
        let e = receiver.events();
        (e.len() == 2).then_some(e)
    })
    .await;
    for e in &events {
        assert_eq!(e.query["timestamp"].len(), 13);
        assert!(e.query["timestamp"].bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(e.query["nonce"].len(), 8);
        assert_eq!(e.message["corpId"], emu.state().corp_id());
        assert_eq!(
            e.message["processInstanceId"],
            instance.process_instance_id.as_str()
        );
        assert!(e.message["createTime"].is_i64());
        assert!(e.message.get("eventId").is_none());
    }
    let task = events
        .iter()
        .find(|e| e.message["EventType"] == "bpms_task_change")
        .unwrap();
    assert_eq!(task.message["taskId"], instance.tasks[0].taskid);
    assert_eq!(task.message["type"], "start");
    assert_eq!(task.message["staffId"], "manager1");
    let start = events
        .iter()
        .find(|e| e.message["EventType"] == "bpms_instance_change")
        .unwrap();
    assert_eq!(start.message["staffId"], "emp1");
    assert!(start.message.get("finishTime").is_none());
    emu.stop().await;
}

#[tokio::test]
async fn pushes_to_a_dead_daemon_are_retried_after_10_and_30_scaled_seconds_then_listed_once() {
    let scale = 0.005; // 10 s → 50 ms, 30 s → 150 ms, failed list readable after 0.9–1.5 s.
    let (emu, dt, token) = connected(scale).await;
    let receiver = registered_receiver(&emu, &dt, &token).await;
    receiver.stop.cancel(); // the daemon goes down; its port closes
    tokio::time::sleep(Duration::from_millis(50)).await;

    let state = emu.state();
    let instance = state.start_instance(start_expense()).unwrap();
    assert!(state.settle(Duration::from_secs(5)).await, "retries end");
    let log = state.push_log();
    let first = log[0].push_id;
    let attempts: Vec<_> = log
        .iter()
        .filter(|r| r.push_id == first && r.attempt.is_some())
        .collect();
    assert_eq!(attempts.len(), 3, "{log:?}");
    assert!(attempts.iter().all(|a| a.outcome.is_failed_attempt()));
    let gap1 = attempts[1].at - attempts[0].at;
    let gap2 = attempts[2].at - attempts[1].at;
    assert!(
        gap1 >= Duration::from_millis(50) && gap1 < Duration::from_millis(1_000),
        "{gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_millis(150) && gap2 < Duration::from_millis(1_100),
        "{gap2:?}"
    );
    assert_eq!(
        log.iter()
            .filter(|r| r.outcome == PushOutcome::Parked)
            .count(),
        2
    );
    assert_eq!(state.failed_pending(), 2);

    let started = Instant::now();
    let failed = eventually(Duration::from_secs(5), "the failed list", || async {
        let v = dt.oapi_get("get_call_back_failed_result", &token).await;
        assert_eq!(v["errcode"], 0);
        let list = v["failed_list"].as_array().unwrap().clone();
        (!list.is_empty()).then_some(v)
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "failed pushes are not readable at once"
    );
    assert_eq!(failed["has_more"], false);
    let mut list = failed["failed_list"].as_array().unwrap().clone();
    if list.len() < 2 {
        // The two events became readable at different moments.
        let more = eventually(Duration::from_secs(5), "the second failed push", || async {
            let v = dt.oapi_get("get_call_back_failed_result", &token).await;
            let l = v["failed_list"].as_array().unwrap().clone();
            (!l.is_empty()).then_some(l)
        })
        .await;
        list.extend(more);
    }
    assert_eq!(list.len(), 2);
    let instance_item = list
        .iter()
        .find(|i| i["call_back_tag"] == "bpms_instance_change")
        .unwrap();
    assert!(instance_item["event_time"].is_i64());
    let data = &instance_item["bpms_instance_change"];
    assert_eq!(data["corpid"], emu.state().corp_id());
    assert_eq!(
        data["bpmsCallBackData"]["processInstanceId"],
        instance.process_instance_id.as_str()
    );
    assert_eq!(data["bpmsCallBackData"]["type"], "start");
    let task_item = list
        .iter()
        .find(|i| i["call_back_tag"] == "bpms_task_change")
        .unwrap();
    assert_eq!(
        task_item["bpms_task_change"]["bpmsCallBackData"]["taskId"],
        instance.tasks[0].taskid
    );

    let empty = dt.oapi_get("get_call_back_failed_result", &token).await;
    assert_eq!(empty["failed_list"], json!([]));
    assert_eq!(empty["has_more"], false);
    assert_eq!(state.failed_pending(), 0);
    emu.stop().await;
}

#[tokio::test]
async fn a_push_that_fails_once_is_delivered_by_the_first_retry() {
    let (emu, dt, token) = connected(0.05).await; // first retry after 500 ms
    let receiver = registered_receiver(&emu, &dt, &token).await;
    receiver.set_mode(Mode::Status(503));
    let state = emu.state();
    state.start_instance(start_expense()).unwrap();
    eventually(
        Duration::from_secs(5),
        "two failed first attempts",
        || async { (receiver.events().len() >= 2).then_some(()) },
    )
    .await;
    receiver.set_mode(Mode::Success);
    assert!(state.settle(Duration::from_secs(5)).await);
    let log = state.push_log();
    assert!(
        log.iter().all(|r| r.outcome != PushOutcome::Parked),
        "{log:?}"
    );
    assert_eq!(
        log.iter()
            .filter(|r| r.outcome == PushOutcome::Delivered)
            .count(),
        2
    );
    assert!(
        log.iter()
            .filter(|r| r.outcome == PushOutcome::Delivered)
            .all(|r| r.attempt == Some(1))
    );
    emu.stop().await;
}

#[tokio::test]
async fn a_lost_create_response_leaves_the_instance_created() {
    let (emu, dt, token) = connected(1.0).await;
    emu.state().update_faults(|f| f.lose_create_response = 1);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let err = client
        .post(format!("{}/topapi/processinstance/create", emu.base_url()))
        .query(&[("access_token", &token)])
        .json(&expense_create())
        .send()
        .await
        .expect_err("no response comes");
    assert!(err.is_timeout(), "{err}");
    let instances = emu.state().instances();
    assert_eq!(instances.len(), 1, "the create was committed");
    assert_eq!(instances[0].originator_userid, "emp1");
    // The instance is findable the way a client must look for it: listids + get.
    let listed = dt
        .top("processinstance/listids", &token, json!({"process_code": "PROC-EMU-EXPENSE", "start_time": chrono::Utc::now().timestamp_millis() - 60_000}))
        .await;
    assert_eq!(
        listed["result"]["list"],
        json!([instances[0].process_instance_id])
    );
    // Only the next one was lost.
    let again = dt
        .top("processinstance/create", &token, expense_create())
        .await;
    assert_eq!(again["errcode"], 0);
    emu.stop().await;
}

#[tokio::test]
async fn injected_errors_rate_limits_and_5xx_answer_like_dingtalk() {
    let (emu, dt, token) = connected(1.0).await;
    let state = emu.state();
    let get = json!({"process_instance_id": "x"});

    state.inject("topapi/processinstance/get", InjectedError::RateLimit, 1);
    let limited = dt.top("processinstance/get", &token, get.clone()).await;
    assert_eq!(
        (limited["errcode"].clone(), limited["sub_code"].clone()),
        (json!(88), json!("90002"))
    );
    state.inject("*", InjectedError::GatewayTimeout, 1);
    let timeout = dt.top("processinstance/get", &token, get.clone()).await;
    assert_eq!(timeout["errcode"], 15);
    assert_eq!(timeout["sub_code"], "isp.top-remote-connection-timeout");
    state.inject("call_back/get_call_back", InjectedError::RateLimit, 1);
    assert_eq!(dt.oapi_get("get_call_back", &token).await["errcode"], 90002);
    // Used up: back to the real answer.
    assert_eq!(
        dt.top("processinstance/get", &token, get.clone()).await["errcode"],
        60121
    );

    // Three calls per second: a burst of five gets the last two refused (an endpoint not called
    // before in this test, so the window starts empty).
    state.update_faults(|f| {
        f.rate_limit_qps
            .insert("topapi/processinstance/listids".into(), 3);
    });
    let list = json!({"process_code": "PROC-EMU-EXPENSE", "start_time": chrono::Utc::now().timestamp_millis() - 1000});
    let mut codes = Vec::new();
    for _ in 0..5 {
        let v = dt
            .top("processinstance/listids", &token, list.clone())
            .await;
        codes.push((v["errcode"].clone(), v["sub_code"].clone()));
    }
    let (ok, limited) = ((json!(0), Value::Null), (json!(88), json!("90002")));
    assert_eq!(
        codes,
        [ok.clone(), ok.clone(), ok, limited.clone(), limited]
    );
    assert_eq!(state.calls("topapi/processinstance/listids"), 5);

    state.set_faults(Faults {
        http_5xx_rate: 1.0,
        latency_ms: 200,
        ..Faults::default()
    });
    let started = Instant::now();
    let response = dt
        .http
        .post(format!("{}/topapi/processinstance/get", emu.base_url()))
        .query(&[("access_token", &token)])
        .json(&get)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert!(started.elapsed() >= Duration::from_millis(200));
    state.reset_faults();
    assert_eq!(state.faults(), Faults::default());
    assert_eq!(
        state.max_calls_within("topapi/processinstance/listids", Duration::from_secs(60)),
        5
    );
    emu.stop().await;
}

#[tokio::test]
async fn push_faults_duplicate_lose_and_drop_deliveries_as_configured() {
    let (emu, dt, token) = connected(0.005).await;
    let receiver = registered_receiver(&emu, &dt, &token).await;
    let state = emu.state();

    // Duplicate: every event arrives twice.
    state.set_faults(Faults {
        push: PushFaults {
            duplicate_rate: 1.0,
            ..PushFaults::default()
        },
        ..Faults::default()
    });
    state.start_instance(start_expense()).unwrap();
    assert!(state.settle(Duration::from_secs(5)).await);
    assert_eq!(receiver.events().len(), 4);

    // A lost reply: the receiver sees every attempt, DingTalk none, so it parks after three.
    state.set_faults(Faults {
        push: PushFaults {
            lose_reply_rate: 1.0,
            ..PushFaults::default()
        },
        ..Faults::default()
    });
    let before = receiver.events().len();
    state
        .terminate(&state.instances()[0].process_instance_id, None, None)
        .unwrap();
    assert!(state.settle(Duration::from_secs(5)).await);
    // task cancel + instance terminate, three attempts each.
    assert_eq!(receiver.events().len() - before, 6);
    assert_eq!(state.failed_pending(), 2);

    // Lost forever: nothing arrives and nothing is parked.
    state.set_faults(Faults {
        push: PushFaults {
            drop_forever_rate: 1.0,
            ..PushFaults::default()
        },
        ..Faults::default()
    });
    let before = receiver.events().len();
    state.start_instance(start_expense()).unwrap();
    assert!(state.settle(Duration::from_secs(5)).await);
    assert_eq!(receiver.events().len(), before);
    assert_eq!(state.failed_pending(), 2);
    assert_eq!(
        state
            .push_log()
            .iter()
            .filter(|r| r.outcome == PushOutcome::LostForever)
            .count(),
        2
    );
    emu.stop().await;
}

#[tokio::test]
async fn reordered_pushes_let_later_events_overtake_earlier_ones() {
    let (emu, dt, token) = connected(1.0).await;
    let receiver = registered_receiver(&emu, &dt, &token).await;
    let state = emu.state();
    state.update_faults(|f| {
        f.push.reorder_rate = 0.5;
        f.push.reorder_max_ms = 300;
    });
    for _ in 0..10 {
        let i = state.start_instance(start_expense()).unwrap();
        state
            .agree(i.tasks[0].taskid, TaskAction::default())
            .unwrap();
    }
    assert!(state.settle(Duration::from_secs(5)).await);
    let events = receiver.events();
    assert_eq!(events.len(), 40);
    // Somewhere a finish arrived before its instance's start.
    let overtaken = events.iter().enumerate().any(|(n, e)| {
        e.message["type"] == "finish"
            && e.message["EventType"] == "bpms_instance_change"
            && !events[..n].iter().any(|s| {
                s.message["type"] == "start"
                    && s.message["EventType"] == "bpms_instance_change"
                    && s.message["processInstanceId"] == e.message["processInstanceId"]
            })
    });
    assert!(
        overtaken,
        "with a seeded 50% reorder some finish overtakes its start"
    );
    emu.stop().await;
}

/// An HTTP client that sends `token` as the admin API's bearer token with every request.
fn admin_client(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

#[tokio::test]
async fn the_admin_api_acts_as_people_over_http() {
    let emu = emulator(1.0).await;
    let http = admin_client(emu.admin_token());
    let base = emu.base_url();
    let started: Value = http
        .post(format!("{base}/_emulator/instances"))
        .json(&json!({"process_code": "PROC-EMU-LEAVE", "originator_userid": "emp2",
                      "approvers_v2": [{"task_action_type": "AND", "user_ids": ["manager1", "hr1"]}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let pid = started["process_instance_id"].as_str().unwrap();
    assert_eq!(started["status"], "RUNNING");
    let tasks: Vec<Value> = http
        .get(format!("{base}/_emulator/tasks"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tasks.len(), 2);
    let taskid = tasks[0]["taskid"].as_i64().unwrap();
    let wrong = http
        .post(format!("{base}/_emulator/tasks/{taskid}/agree"))
        .json(&json!({"userid": "emp4"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 400, "only the task's approver acts on it");
    let refused: Value = http
        .post(format!("{base}/_emulator/tasks/{taskid}/refuse"))
        .json(&json!({"remark": "no"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (refused["status"].as_str(), refused["result"].as_str()),
        (Some("COMPLETED"), Some("refuse"))
    );
    assert_eq!(refused["tasks"][1]["status"], "CANCELED");
    let again = http
        .post(format!("{base}/_emulator/tasks/{taskid}/agree"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let terminate = http
        .post(format!("{base}/_emulator/instances/{pid}/terminate"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        terminate.status(),
        409,
        "a finished instance cannot be withdrawn"
    );

    let faults = http
        .put(format!("{base}/_emulator/faults"))
        .json(&json!({"latency_ms": 5, "push": {"duplicate_rate": 0.5}}))
        .send()
        .await
        .unwrap();
    assert_eq!(faults.status(), 200);
    assert_eq!(emu.state().faults().latency_ms, 5);
    http.post(format!("{base}/_emulator/faults/inject"))
        .json(&json!({"endpoint": "gettoken", "error": {"kind": "busy"}, "count": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(emu.state().faults().inject[0].remaining, 2);
    http.delete(format!("{base}/_emulator/faults"))
        .send()
        .await
        .unwrap();
    assert_eq!(emu.state().faults(), Faults::default());
    let missing = http
        .get(format!("{base}/_emulator/instances/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    emu.stop().await;
}

#[tokio::test]
async fn the_admin_api_refuses_a_missing_or_wrong_token_and_changes_nothing() {
    let emu = emulator(1.0).await;
    let base = emu.base_url();
    let token = emu.admin_token().to_string();
    assert_eq!(token.len(), 32, "{token}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
    let start = json!({"process_code": "PROC-EMU-EXPENSE", "originator_userid": "emp1"});
    // One character off (a token that ends in 0 gets a 1 there instead).
    let last = if token.ends_with('0') { '1' } else { '0' };
    let near_miss = format!("{}{last}", &token[..31]);
    let longer = format!("{token}0");
    let attempts = [
        ("no token", reqwest::Client::new()),
        ("a wrong token", admin_client(&near_miss)),
        ("the token with a character more", admin_client(&longer)),
        ("an empty token", admin_client("")),
    ];
    for (what, http) in &attempts {
        let started = http
            .post(format!("{base}/_emulator/instances"))
            .json(&start)
            .send()
            .await
            .unwrap();
        assert_eq!(started.status(), 401, "{what}");
        assert!(started.headers().contains_key("www-authenticate"), "{what}");
        let body = started.text().await.unwrap();
        assert!(!body.contains(&token), "{what}: the answer shows the token");
        let faults = http
            .put(format!("{base}/_emulator/faults"))
            .json(&json!({"latency_ms": 5}))
            .send()
            .await
            .unwrap();
        assert_eq!(faults.status(), 401, "{what}");
        let listed = http
            .get(format!("{base}/_emulator/instances"))
            .send()
            .await
            .unwrap();
        assert_eq!(listed.status(), 401, "{what}");
    }
    // A basic-auth header carrying the token is not a bearer token either.
    let basic = reqwest::Client::new()
        .get(format!("{base}/_emulator/instances"))
        .basic_auth("admin", Some(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401);
    assert!(
        emu.state().instances().is_empty(),
        "a refused request started an instance"
    );
    assert_eq!(emu.state().faults(), Faults::default());

    let started = admin_client(&token)
        .post(format!("{base}/_emulator/instances"))
        .json(&start)
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 201);
    assert_eq!(emu.state().instances().len(), 1);
    // The scheme is case-insensitive, as HTTP has it.
    let lower = reqwest::Client::new()
        .get(format!("{base}/_emulator/instances"))
        .header("authorization", format!("bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status(), 200);
    // DingTalk's own API keeps DingTalk's credentials and needs no admin token.
    let c = EmulatorConfig::default();
    let gettoken: Value = reqwest::Client::new()
        .get(format!("{base}/gettoken"))
        .query(&[("appkey", &c.app_key), ("appsecret", &c.app_secret)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(gettoken["errcode"], 0, "{gettoken}");
    emu.stop().await;
}

#[tokio::test]
async fn each_emulator_makes_its_own_admin_token_unless_given_one() {
    let (first, second) = (emulator(1.0).await, emulator(1.0).await);
    assert_ne!(first.admin_token(), second.admin_token());
    assert!(first.admin_usage().contains(first.admin_token()));
    assert!(
        first
            .admin_usage()
            .contains(&format!("{}/_emulator/", first.base_url()))
    );
    let given = "a-configured-admin-token-0001";
    let third = start(EmulatorConfig {
        admin_token: Some(given.into()),
        ..EmulatorConfig::default()
    })
    .await;
    assert_eq!(third.admin_token(), given);
    let answer = admin_client(given)
        .get(format!("{}/_emulator/calls", third.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    for emulator in [first, second, third] {
        emulator.stop().await;
    }
}

#[tokio::test]
async fn simulated_people_keep_approvals_moving_and_the_same_seed_repeats_the_ids() {
    let config = EmulatorConfig {
        seed: 99,
        people: Some(Duration::from_millis(5)),
        ..EmulatorConfig::default()
    };
    let emu = start(config.clone()).await;
    let state = emu.state();
    eventually(Duration::from_secs(10), "a finished approval", || async {
        state.instances().iter().any(|i| !i.is_open()).then_some(())
    })
    .await;
    emu.stop().await;

    let a = start(EmulatorConfig {
        people: None,
        ..config.clone()
    })
    .await;
    let b = start(EmulatorConfig {
        people: None,
        ..config
    })
    .await;
    let ia = a.state().start_instance(start_expense()).unwrap();
    let ib = b.state().start_instance(start_expense()).unwrap();
    assert_eq!(ia.process_instance_id, ib.process_instance_id);
    assert_eq!(ia.tasks[0].taskid, ib.tasks[0].taskid);
    a.stop().await;
    b.stop().await;
}
