//! Throughput of the callback crypto on one core: `open` (verify + decrypt + receiver check)
//! of a ~700-byte `bpms_instance_change` event, and `seal` (encrypt + sign) of the same.
//!
//! Run with `cargo bench --bench crypto`. The target is over 100,000 `open`s per second per core.

use std::hint::black_box;
use std::time::{Duration, Instant};

use dingsync::crypto::{CallbackCrypto, random_nonce};

const TOKEN: &str = "approvalCbToken";
const AES_KEY: &str = "m0xVQzJXtw3XVBOsrT5mH3DaWvTrmFLHBMUAPTT0aZN";
const RECEIVER: &str = "ding7f3a9c2e51b04d86";
const TIMESTAMP: &str = "1718094600789";
const NONCE: &str = "QwErTy12";
const RUN_FOR: Duration = Duration::from_secs(3);
const TARGET_OPEN_PER_SEC: f64 = 100_000.0;

/// A flat HTTP-push `bpms_instance_change` (docs/dingtalk.md §5.2) with the 2026 envelope fields.
fn event() -> String {
    let event = concat!(
        r#"{"EventType":"bpms_instance_change","#,
        r#""processInstanceId":"ad253df6-e175-47ae-9d88-cd7d6c2ee2d3","#,
        r#""corpId":"ding7f3a9c2e51b04d86","#,
        r#""eventId":"5c1f0a6e9b8d4c2fa1e3b7d9c0f2e4a6","#,
        r#""EventTime":1718094600789,"createTime":1718091000456,"finishTime":1718094600000,"#,
        r#""title":"张三提交的请假申请（年假，2024-06-17 至 2024-06-21）","#,
        r#""type":"finish","result":"agree","staffId":"manager8816","#,
        r#""url":"https://aflow.dingtalk.com/dingtalk/mobile/homepage.htm?corpid=ding7f3a9c2e51b04d86"#,
        r#"&procInstId=ad253df6-e175-47ae-9d88-cd7d6c2ee2d3"#,
        r#"&dinghash=approval#approval","#,
        r#""processCode":"PROC-FF6Y4BE1N2-7LQ5ZBX2J4ZH0QH3T4V1-9KXQ2Z0J-1","#,
        r#""bizCategoryId":"","businessId":"202406171541000123","businessType":"leave"}"#,
    );
    event.to_owned()
}

struct Figures {
    ops: u64,
    elapsed: Duration,
}

impl Figures {
    fn per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn ns_per_op(&self) -> f64 {
        self.elapsed.as_nanos() as f64 / self.ops as f64
    }
}

/// Runs `op` in batches until `RUN_FOR` has passed, after a short warm-up.
fn time(mut op: impl FnMut()) -> Figures {
    let warm_up = Instant::now();
    while warm_up.elapsed() < Duration::from_millis(300) {
        op();
    }
    const BATCH: u64 = 1_000;
    let start = Instant::now();
    let mut ops = 0;
    loop {
        for _ in 0..BATCH {
            op();
        }
        ops += BATCH;
        let elapsed = start.elapsed();
        if elapsed >= RUN_FOR {
            return Figures { ops, elapsed };
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too, so keep it short
    // there and only report figures.
    let quick = !std::env::args().any(|arg| arg == "--bench");

    let crypto = CallbackCrypto::new(TOKEN, AES_KEY).expect("valid AES key");
    let message = event();
    let sealed = crypto.seal(&message, RECEIVER, TIMESTAMP, NONCE);
    let accepted = [RECEIVER];
    let opened = crypto
        .open(
            TIMESTAMP,
            NONCE,
            &sealed.encrypt,
            &sealed.signature,
            &accepted,
        )
        .expect("the sealed event opens");
    assert_eq!(opened.message, message);
    if quick {
        println!(
            "crypto bench: sanity check passed (run `cargo bench --bench crypto` for figures)"
        );
        return;
    }

    println!(
        "message: {} bytes UTF-8, encrypt: {} base64 characters ({} bytes of ciphertext)",
        message.len(),
        sealed.encrypt.len(),
        sealed.encrypt.len() / 4 * 3 - sealed.encrypt.matches('=').count(),
    );
    println!("single thread, {} s per measurement\n", RUN_FOR.as_secs());

    let open = time(|| {
        let opened = crypto.open(
            black_box(TIMESTAMP),
            black_box(NONCE),
            black_box(&sealed.encrypt),
            black_box(&sealed.signature),
            black_box(&accepted),
        );
        black_box(opened).expect("opens");
    });
    let verify = time(|| {
        let verified = crypto.verify(
            black_box(TIMESTAMP),
            black_box(NONCE),
            black_box(&sealed.encrypt),
            black_box(&sealed.signature),
        );
        black_box(verified).expect("verifies");
    });
    let decrypt = time(|| {
        let opened = crypto.decrypt(black_box(&sealed.encrypt), black_box(&accepted));
        black_box(opened).expect("decrypts");
    });
    let seal = time(|| {
        black_box(crypto.seal(
            black_box(&message),
            black_box(RECEIVER),
            black_box(TIMESTAMP),
            black_box(NONCE),
        ));
    });
    // A real reply also needs a fresh nonce; measure the whole reply path once for reference.
    let reply = time(|| {
        let nonce = random_nonce(16);
        black_box(crypto.seal(black_box("success"), RECEIVER, TIMESTAMP, &nonce));
    });

    println!("{:<44} {:>12} {:>10}", "operation", "ops/s/core", "ns/op");
    for (name, figures) in [
        ("open (verify + decrypt + receiver check)", &open),
        ("  verify only", &verify),
        ("  decrypt only", &decrypt),
        ("seal (encrypt + sign)", &seal),
        ("seal \"success\" reply with a fresh nonce", &reply),
    ] {
        println!(
            "{:<44} {:>12.0} {:>10.0}",
            name,
            figures.per_sec(),
            figures.ns_per_op()
        );
    }
    println!(
        "\nopen: {:.1}x the target of {} per second per core",
        open.per_sec() / TARGET_OPEN_PER_SEC,
        TARGET_OPEN_PER_SEC as u64
    );
}
