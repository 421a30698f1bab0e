//! The emulator's Stream gateway works with DingTalk's official Python SDK (`dingtalk-stream`)
//! unchanged, pointed at it by the SDK's endpoint setting (`DINGTALK_OPENAPI_ENDPOINT`): the SDK
//! opens a connection, receives an approval event, acknowledges it (the gateway counts it
//! consumed) and answers the gateway's pings with their data.
//!
//! The SDK is installed with pip into a virtual environment under the target directory (once;
//! later runs reuse it). Without python3, venv or pip this test fails with the reason: it never
//! skips.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use dingsync_emulator::{
    DEFAULT_APP_KEY, DEFAULT_APP_SECRET, Delivery, Emulator, EmulatorConfig, StartInstance,
};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The SDK version checked (pinned, so that a new release cannot change what passed).
const SDK: &str = "dingtalk-stream==0.24.3";

fn run(command: &mut Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A python with the SDK installed.
fn python_with_sdk() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("stream-sdk-venv");
    let python = venv.join("bin/python");
    let marker = venv.join(SDK);
    if !marker.exists() {
        run(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "python3 -m venv (the check needs python3 with venv)",
        );
        run(
            Command::new(&python).args(["-m", "pip", "install", "--quiet", SDK]),
            "pip install dingtalk-stream",
        );
        std::fs::write(&marker, "").unwrap();
    }
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_receives_and_acknowledges_an_event_from_the_emulator() {
    let python = tokio::task::spawn_blocking(python_with_sdk).await.unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Pings every 30 s × 0.05 = 1.5 s.
    let emu = Emulator::start(
        EmulatorConfig {
            time_scale: 0.05,
            delivery: Delivery::Stream,
            ..EmulatorConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/stream_sdk/receive.py");
    let mut sdk = tokio::process::Command::new(&python)
        .arg(&script)
        .env("DINGTALK_OPENAPI_ENDPOINT", emu.base_url())
        .env("APP_KEY", DEFAULT_APP_KEY)
        .env("APP_SECRET", DEFAULT_APP_SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the SDK script starts");
    let mut lines = BufReader::new(sdk.stdout.take().unwrap()).lines();
    let connected = tokio::time::timeout(Duration::from_secs(30), async {
        while emu.state().stream_report().connections.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(connected.is_ok(), "the SDK connected within 30 s");
    let instance = emu
        .state()
        .start_instance(StartInstance {
            process_code: "PROC-EMU-EXPENSE".into(),
            originator_userid: "emp1".into(),
            approvers: Some(vec!["manager1".into()]),
            ..StartInstance::default()
        })
        .unwrap();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the SDK printed an event within 20 s")
        .unwrap()
        .expect("a line");
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        event["data"]["processInstanceId"],
        instance.process_instance_id.as_str()
    );
    assert!(event["eventId"].is_string() && event["eventType"].is_string());
    // The SDK's ack (code 200 and the event's data) consumes the message; its ping answers
    // carry the ping's data.
    let report = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let report = emu.state().stream_report();
            let consumed = emu
                .state()
                .stream_acks()
                .iter()
                .filter(|a| a.consumed)
                .count();
            if consumed >= 2 && report.pings_answered >= 1 {
                return report;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the SDK acknowledged both events and a ping within 20 s");
    assert_eq!(report.pings_answered_wrong, 0);
    assert_eq!(report.redeliveries, 0, "{report:?}");
    sdk.kill().await.unwrap();
    emu.stop().await;
}
