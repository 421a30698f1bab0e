//! The emulator's v1.0 family over raw HTTP (docs/dingtalk.md §11): the shapes, time formats and
//! error bodies a v1.0 client sees, and the fault knobs answering in v1.0's shape.

mod common;

use dingsync_emulator::{
    Allowances, DEFAULT_APP_KEY, DEFAULT_APP_SECRET, Emulator, StartInstance, TaskAction,
};
use serde_json::{Value, json};

const TOKEN: &str = "/v1.0/oauth2/accessToken";
const INSTANCES: &str = "/v1.0/workflow/processInstances";
const LIST: &str = "/v1.0/workflow/processes/instanceIds/query";

async fn emulator() -> Emulator {
    common::standalone_emulator(11).await
}

/// `status` and the JSON body of an answer.
async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn token(emu: &Emulator) -> String {
    let (status, body) = answer(
        reqwest::Client::new()
            .post(format!("{}{TOKEN}", emu.base_url()))
            .json(&json!({"appKey": DEFAULT_APP_KEY, "appSecret": DEFAULT_APP_SECRET}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["accessToken"].as_str().unwrap().to_string()
}

fn get(emu: &Emulator, token: Option<&str>, id: &str) -> reqwest::RequestBuilder {
    let request = reqwest::Client::new()
        .get(format!("{}{INSTANCES}", emu.base_url()))
        .query(&[("processInstanceId", id)]);
    match token {
        Some(t) => request.header("x-acs-dingtalk-access-token", t),
        None => request,
    }
}

/// A v1.0 error body: `{"code", "message", "requestid"}`, and its code.
fn code(body: &Value) -> &str {
    assert!(body["message"].is_string(), "{body}");
    assert!(
        body["requestid"].as_str().is_some_and(|r| !r.is_empty()),
        "{body}"
    );
    body["code"].as_str().unwrap()
}

fn start(emu: &Emulator) -> String {
    emu.state()
        .start_instance(StartInstance {
            process_code: "PROC-EMU-EXPENSE".into(),
            originator_userid: "emp1".into(),
            approvers: Some(vec!["manager1".into()]),
            ..StartInstance::default()
        })
        .unwrap()
        .process_instance_id
}

#[tokio::test]
async fn the_v1_token_api_answers_in_camel_case_and_refuses_bad_credentials_with_a_400() {
    let emu = emulator().await;
    let (status, body) = answer(
        reqwest::Client::new()
            .post(format!("{}{TOKEN}", emu.base_url()))
            .json(&json!({"appKey": DEFAULT_APP_KEY, "appSecret": "wrong"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(code(&body), "invalidClientIdOrSecret");
    let first = token(&emu).await;
    // The same token while it is valid, in either family (one token serves both).
    assert_eq!(token(&emu).await, first);
    let old: Value = reqwest::get(format!(
        "{}/gettoken?appkey={DEFAULT_APP_KEY}&appsecret={DEFAULT_APP_SECRET}",
        emu.base_url()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(old["access_token"], first.as_str());
    // Not metered.
    assert_eq!(emu.state().quota().calls.used, 0);
    emu.stop().await;
}

#[tokio::test]
async fn v1_calls_take_the_token_from_their_header_only() {
    let emu = emulator().await;
    let id = start(&emu);
    let token = token(&emu).await;
    let (status, body) = answer(get(&emu, None, &id).send().await.unwrap()).await;
    assert_eq!(
        (status, code(&body)),
        (400, "AuthenticationFailed.MissingParameter")
    );
    let (status, body) = answer(
        get(&emu, None, &id)
            .query(&[("access_token", token.as_str())])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (400, "AuthenticationFailed.MissingParameter")
    );
    let (status, _) = answer(get(&emu, Some(&token), &id).send().await.unwrap()).await;
    assert_eq!(status, 200);
    emu.state().revoke_token();
    let (status, body) = answer(get(&emu, Some(&token), &id).send().await.unwrap()).await;
    assert_eq!((status, code(&body)), (400, "InvalidAuthentication"));
    emu.stop().await;
}

#[tokio::test]
async fn a_v1_get_has_utc_minute_times_numeric_task_ids_and_camel_case_keys() {
    let emu = emulator().await;
    let id = start(&emu);
    let task = emu.state().instance(&id).unwrap().tasks[0].taskid;
    emu.state()
        .agree(
            task,
            TaskAction {
                remark: Some("ok".into()),
                ..TaskAction::default()
            },
        )
        .unwrap();
    let token = token(&emu).await;
    let (status, body) = answer(get(&emu, Some(&token), &id).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], "true");
    let r = &body["result"];
    let minute = |v: &Value| {
        let t = v.as_str().unwrap();
        chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%MZ").is_ok() && t.len() == 17
    };
    assert!(minute(&r["createTime"]) && minute(&r["finishTime"]), "{r}");
    assert_eq!(
        (r["status"].as_str(), r["result"].as_str()),
        (Some("COMPLETED"), Some("agree"))
    );
    assert_eq!(r["originatorUserId"], "emp1");
    assert!(r["formComponentValues"][0]["componentType"].is_string());
    assert_eq!(r["tasks"][0]["taskId"], task, "a number");
    assert!(minute(&r["tasks"][0]["finishTime"]));
    let records = r["operationRecords"].as_array().unwrap();
    assert!(
        records
            .iter()
            .any(|rec| rec["type"] == "EXECUTE_TASK_NORMAL"
                && rec["result"] == "AGREE"
                && rec["userId"] == "manager1"
                && rec["remark"] == "ok")
    );
    let (status, body) = answer(get(&emu, Some(&token), "nope").send().await.unwrap()).await;
    assert_eq!((status, code(&body)), (400, "processInstanceNotExist"));
    emu.stop().await;
}

#[tokio::test]
async fn v1_list_ids_pages_with_a_text_next_token_and_filters_by_status() {
    let emu = emulator().await;
    let ids: Vec<String> = (0..3).map(|_| start(&emu)).collect();
    let task = emu.state().instance(&ids[1]).unwrap().tasks[0].taskid;
    emu.state().refuse(task, TaskAction::default()).unwrap();
    let token = token(&emu).await;
    let now = chrono::Utc::now().timestamp_millis();
    let list = |body: Value| {
        reqwest::Client::new()
            .post(format!("{}{LIST}", emu.base_url()))
            .header("x-acs-dingtalk-access-token", &token)
            .json(&body)
            .send()
    };
    let base = json!({"processCode": "PROC-EMU-EXPENSE", "startTime": now - 60_000, "endTime": now + 1_000});
    let mut first = base.clone();
    first["maxResults"] = 2.into();
    first["nextToken"] = 0.into();
    let (status, page) = answer(list(first).await.unwrap()).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["success"], true);
    assert_eq!(page["result"]["list"].as_array().unwrap().len(), 2);
    assert_eq!(page["result"]["nextToken"], "2", "a string");
    let mut last = base.clone();
    last["maxResults"] = 2.into();
    last["nextToken"] = 2.into();
    let (_, page) = answer(list(last).await.unwrap()).await;
    assert!(
        page["result"].get("nextToken").is_none(),
        "absent on the last page"
    );
    let mut done = base.clone();
    done["statuses"] = json!(["COMPLETED"]);
    let (_, page) = answer(list(done).await.unwrap()).await;
    assert_eq!(page["result"]["list"], json!([ids[1]]));
    let mut too_many = base;
    too_many["maxResults"] = 21.into();
    let (status, body) = answer(list(too_many).await.unwrap()).await;
    assert_eq!((status, code(&body)), (400, "invalidParameter"));
    emu.stop().await;
}

#[tokio::test]
async fn fault_knobs_answer_v1_calls_in_v1_shape_and_create_and_get_are_counted_apart() {
    let emu = emulator().await;
    let id = start(&emu);
    let token = token(&emu).await;
    let state = emu.state();
    state.update_faults(|f| {
        f.rate_limit_qps
            .insert("GET v1.0/workflow/processInstances".into(), 0);
    });
    let (status, body) = answer(get(&emu, Some(&token), &id).send().await.unwrap()).await;
    assert_eq!(
        (status, code(&body)),
        (403, "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi")
    );
    state.reset_faults();
    state.update_faults(|f| f.http_5xx_rate = 1.0);
    let (status, _) = answer(get(&emu, Some(&token), &id).send().await.unwrap()).await;
    assert_eq!(status, 502);
    state.reset_faults();
    state.update_faults(|f| f.denied_families = vec!["v1".into()]);
    let (status, body) = answer(get(&emu, Some(&token), &id).send().await.unwrap()).await;
    assert_eq!(
        (status, code(&body)),
        (403, "Forbidden.AccessDenied.AccessTokenPermissionDenied")
    );
    state.reset_faults();
    state.set_allowances(Allowances {
        monthly_calls: Some(1),
        monthly_deliveries: None,
    });
    let (status, _) = answer(get(&emu, Some(&token), &id).send().await.unwrap()).await;
    assert_eq!(status, 200);
    let (status, body) = answer(get(&emu, Some(&token), &id).send().await.unwrap()).await;
    assert_eq!(
        (status, code(&body)),
        (403, "Forbidden.AccessDenied.ApiCountLimitForOrg")
    );
    assert_eq!(state.calls("GET v1.0/workflow/processInstances"), 5);
    assert_eq!(state.calls("POST v1.0/workflow/processInstances"), 0);
    assert_eq!(
        state
            .quota()
            .calls
            .by_api
            .get("GET v1.0/workflow/processInstances"),
        Some(&1)
    );
    emu.stop().await;
}
