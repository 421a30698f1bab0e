//! The admin console: in a real headless Chromium (driven over WebDriver by chromedriver) it
//! loads with the embedded default running (emulator and demo), shows the demo's approvals
//! flowing, retries and cancels failed outbox rows, and draws the quota chart; every page is
//! saved as a screenshot under `target/console-screenshots/`. Over plain HTTP: no token or a
//! wrong one is refused, a form without the page's CSRF token changes nothing, and `serve`
//! refuses a console on a non-loopback address without a token, naming the key.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); without them the
//! browser test fails saying so.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use sqlx::PgPool;

const TOKEN: &str = "console-test-token-0123456789";
/// One of the emulator's people (the demo's originators).
const ORIGINATOR: &str = "emp1";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
    std::fs::create_dir_all(&dir).expect("creating target/console-screenshots");
    dir
}

/// chromedriver on a port of its own, stopped (by its pid) when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        for path in [CHROMEDRIVER, CHROMIUM] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: the console's browser test needs Debian's chromium and \
                 chromium-driver (apt-get install -y chromium chromium-driver; .ci/run does)"
            );
        }
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        Driver { child, port }
    }

    /// A headless Chromium session, once chromedriver answers (within 20 s).
    async fn session(&self, width: u32, height: u32) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", format!("--window-size={width},{height}"),
                         "--lang=zh-CN,en"]
            }),
        );
        let url = format!("http://127.0.0.1:{}", self.port);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(client) => return client,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no WebDriver session from chromedriver at {url}: {e}"),
            }
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn shot(client: &Client, name: &str) {
    let png = client.screenshot().await.expect("screenshot");
    std::fs::write(screenshots().join(format!("{name}.png")), png).expect("saving a screenshot");
}

/// The page's text. A page still loading (a click's navigation, a reload) may have no body yet,
/// or replace its body between finding it and reading it; both are tried again, for a few
/// seconds at most.
async fn body_text(client: &Client) -> String {
    use fantoccini::error::{CmdError, ErrorStatus};
    let deadline = Instant::now() + Duration::from_secs(10);
    let loading = |e: &CmdError| {
        matches!(e, CmdError::Standard(w)
            if matches!(w.error, ErrorStatus::StaleElementReference | ErrorStatus::NoSuchElement))
    };
    loop {
        let read = match client.find(Locator::Css("body")).await {
            Ok(body) => body.text().await,
            Err(e) => Err(e),
        };
        match read {
            Ok(text) => return text,
            Err(e) if loading(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the page's text: {e:?}"),
        }
    }
}

/// The page's text once it contains `needle` (a click's navigation may still be under way when
/// the click returns), within a few seconds; the last text read otherwise.
async fn shows(client: &Client, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = body_text(client).await;
        if text.contains(needle) || Instant::now() >= deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (polling the page, reloading it) until its text contains `needle`.
async fn page_shows(client: &Client, url: &str, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        client.goto(url).await.expect("navigating");
        let text = body_text(client).await;
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{url} never showed {needle:?} within {within:?}; it shows:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// An outbox row the console can retry or cancel: failed with DingTalk's reason.
async fn failed_row(pool: &PgPool, key: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO dingsync.outbox (idempotency_key, process_code, originator_user_id,
                                      form_values, state, attempts, last_error, done_at)
         VALUES ($1, 'PROC-EMU-EXPENSE', $2, '[{\"name\":\"Reason\",\"value\":\"taxi\"},{\"name\":\"Amount\",\"value\":\"120\"}]',
                 'failed', 3, 'errcode 400: 审批模板不存在 (template does not exist)', now())
         RETURNING id",
    )
    .bind(key)
    .bind(ORIGINATOR)
    .fetch_one(pool)
    .await
    .expect("inserting a failed outbox row")
}

async fn state_of(pool: &PgPool, id: i64) -> (String, Option<String>) {
    sqlx::query_as("SELECT state, last_error FROM dingsync.outbox WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn with_console(config: &mut dingsync::config::Config) {
    config.admin.listen = "127.0.0.1:0".into();
    config.admin.token = dingsync::config::Secret::new(TOKEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_demo_flowing_and_retries_and_cancels_failed_outbox_rows() {
    let driver = Driver::start();
    let app = TestApp::spawn_with(|config| {
        embedded_emulator(config);
        config.emulator.people_pace_ms = 300;
        config.emulator.time_scale = 0.01;
        with_console(config);
    })
    .await;
    let addr = app.app.as_ref().unwrap().admin_addr.expect("a console");
    let base = format!("http://admin:{TOKEN}@{addr}");
    let retry_id = failed_row(&app.pool, "console-retry").await;
    let cancel_id = failed_row(&app.pool, "console-cancel").await;

    let client = driver.session(1280, 1000).await;
    // The overview loads, signed in with basic auth.
    let text = page_shows(
        &client,
        &format!("{base}/"),
        "Readiness",
        Duration::from_secs(10),
    )
    .await;
    assert!(text.contains("Last event received"), "{text}");
    // The demo's approvals arrive as events and become approvals with DingTalk's status names.
    page_shows(
        &client,
        &format!("{base}/"),
        "s ago",
        Duration::from_secs(60),
    )
    .await;
    shot(&client, "overview").await;
    let approvals = page_shows(
        &client,
        &format!("{base}/approvals"),
        "审批中",
        Duration::from_secs(60),
    )
    .await;
    assert!(approvals.contains("PROC-"), "{approvals}");
    shot(&client, "approvals").await;
    // One approval's event history.
    let link = client
        .find(Locator::Css("table.approvals tbody a"))
        .await
        .expect("an approval in the list");
    link.click().await.unwrap();
    let detail = body_text(&client).await;
    assert!(detail.contains("Event history"), "{detail}");
    assert!(detail.contains("approval started"), "{detail}");
    shot(&client, "approval").await;

    // The failed rows, with DingTalk's reason.
    let outbox = page_shows(
        &client,
        &format!("{base}/outbox"),
        "审批模板不存在",
        Duration::from_secs(5),
    )
    .await;
    assert!(outbox.contains("Needs attention"), "{outbox}");
    shot(&client, "outbox").await;

    // Retry: the row page, the confirmation, the change.
    client
        .goto(&format!("{base}/outbox/{retry_id}"))
        .await
        .unwrap();
    shot(&client, "outbox-row").await;
    client
        .find(Locator::Id("retry"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let confirm = shows(&client, "Retry outbox row").await;
    assert!(confirm.contains("Retry outbox row"), "{confirm}");
    assert_eq!(
        state_of(&app.pool, retry_id).await.0,
        "failed",
        "the confirmation page alone changed the row"
    );
    shot(&client, "outbox-confirm").await;
    client
        .find(Locator::Id("confirm"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let done = shows(&client, "is pending again").await;
    assert!(done.contains("is pending again"), "{done}");
    // Pending again, and the worker (the console did not send it) creates its approval.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (state, error) = state_of(&app.pool, retry_id).await;
        if state == "created" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the retried row is {state} ({error:?}), not created, after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Cancel.
    client
        .goto(&format!("{base}/outbox/{cancel_id}"))
        .await
        .unwrap();
    client
        .find(Locator::Id("cancel"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    client
        .find(Locator::Id("confirm"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let done = shows(&client, "cancelled").await;
    assert!(done.contains("cancelled"), "{done}");
    assert_eq!(state_of(&app.pool, cancel_id).await.0, "cancelled");

    // The quota chart: one bar per API and purpose counted this month.
    let quota = page_shows(
        &client,
        &format!("{base}/quota"),
        "metered calls",
        Duration::from_secs(5),
    )
    .await;
    assert!(quota.contains("Not paused"), "{quota}");
    let bars = client
        .find_all(Locator::Css("figure.chart svg rect"))
        .await
        .unwrap();
    assert!(!bars.is_empty(), "the quota chart has no bars");
    shot(&client, "quota").await;

    page_shows(
        &client,
        &format!("{base}/reconcile"),
        "Jobs",
        Duration::from_secs(5),
    )
    .await;
    shot(&client, "reconcile").await;

    // A wrong token: refused, nothing shown.
    client
        .goto(&format!(
            "http://admin:wrong-token-0000000000@{addr}/outbox"
        ))
        .await
        .unwrap();
    let refused = body_text(&client).await;
    assert!(!refused.contains("Outbox rows"), "{refused}");
    client.close().await.unwrap();

    // The overview on a phone.
    let phone = driver.session(390, 844).await;
    page_shows(
        &phone,
        &format!("{base}/"),
        "Readiness",
        Duration::from_secs(10),
    )
    .await;
    shot(&phone, "overview-phone").await;
    phone.close().await.unwrap();
    drop(driver);
    app.stop().await;
}

#[tokio::test]
async fn the_console_refuses_requests_without_the_token_and_forms_without_the_csrf_token() {
    let app = TestApp::spawn_with(with_console).await;
    let addr = app.app.as_ref().unwrap().admin_addr.expect("a console");
    let url = format!("http://{addr}/outbox");
    let http = reqwest::Client::new();

    let none = http.get(&url).send().await.unwrap();
    assert_eq!(none.status(), 401);
    assert!(
        none.headers()
            .get("www-authenticate")
            .is_some_and(|v| v.to_str().unwrap().starts_with("Basic")),
        "no basic-auth challenge"
    );
    let wrong = http
        .get(&url)
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let wrong_user = http
        .get(&url)
        .basic_auth("root", Some(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_user.status(), 401);
    let bearer = http.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(bearer.status(), 200);
    let basic = http
        .get(&url)
        .basic_auth("admin", Some(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 200);

    // Signed in, but the form's token is not this page's: nothing changes.
    let id = failed_row(&app.pool, "csrf").await;
    let forged = http
        .post(format!("http://{addr}/outbox/{id}/retry"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("csrf=forged")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    assert_eq!(state_of(&app.pool, id).await.0, "failed");
    // Unsigned, with no token at all: refused before anything is read.
    let unsigned = http
        .post(format!("http://{addr}/outbox/{id}/retry"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("csrf=x")
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);

    // The console is not on the callback's port.
    let public = http
        .get(format!("{}/outbox", app.base_url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn serve_refuses_a_console_on_a_non_loopback_address_without_a_token_naming_the_key() {
    let db = TestDb::new();
    let mut command = dingsync_command(&["serve"]);
    command
        .env("DINGSYNC_DATABASE_URL", &db.url)
        .env(
            "DINGSYNC_SERVER_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("DINGSYNC_ADMIN_LISTEN", format!("0.0.0.0:{}", free_port()))
        .env_remove("DINGSYNC_ADMIN_TOKEN");
    let output = run_to_end(command);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("admin.token"), "{stderr}");
    assert!(stderr.contains("DINGSYNC_ADMIN_TOKEN"), "{stderr}");
}
