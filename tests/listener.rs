//! The listener's limits against a real daemon, with raw TCP clients playing the attacker: a
//! stalled header and an idle kept-alive connection are closed in time; connections held open
//! keep neither a signed callback nor `/healthz` out, and those past the cap are closed rather
//! than queued; with every connection's request in flight a callback is refused at once and
//! `/healthz` still answers; oversized headers and h2c are refused.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const T0: i64 = 1_764_300_000_000;

async fn connect(app: &TestApp) -> TcpStream {
    let addr = app.app.as_ref().unwrap().addr;
    TcpStream::connect(addr).await.unwrap()
}

/// Reads (and discards) until the server closes the connection (EOF or reset); `false` when it
/// is still open at `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Reads one response to a `GET /healthz` (body `ok`), within a deadline.
async fn read_healthz_response(stream: &mut TcpStream) -> String {
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !response.ends_with(b"\r\n\r\nok") {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("a response within 10 s")
            .unwrap();
        assert!(
            n > 0,
            "closed before the response: {:?}",
            String::from_utf8_lossy(&response)
        );
        response.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(response).unwrap()
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: dingsync\r\n\r\n";

#[tokio::test]
async fn a_connection_that_stalls_halfway_through_its_header_is_closed_within_the_header_timeout() {
    let app = TestApp::spawn_with(|c| {
        c.server.header_timeout_ms = 1_000;
        c.server.idle_timeout_ms = 60_000;
    })
    .await;
    let stream = connect(&app).await;
    let (mut read, mut write) = stream.into_split();
    write
        .write_all(b"POST /dingtalk/callback?signature=a&timestamp=1&nonce=n HTTP/1.1\r\nHost: dingsync\r\nX-Slow: ")
        .await
        .unwrap();
    // A byte now and then does not buy more time (slowloris).
    let trickle = tokio::spawn(async move {
        while write.write_all(b"a").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    trickle.abort();
    assert!(
        closed.is_ok(),
        "a half-sent header still open after {:?} (header_timeout_ms = 1000)",
        started.elapsed()
    );
    app.stop().await;
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_idle_timeout() {
    let app = TestApp::spawn_with(|c| {
        c.server.header_timeout_ms = 30_000;
        c.server.idle_timeout_ms = 1_000;
    })
    .await;
    let mut stream = connect(&app).await;
    // Two requests on the connection: it is kept alive between them.
    for _ in 0..2 {
        stream.write_all(HEALTHZ).await.unwrap();
        let response = read_healthz_response(&mut stream).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
    assert!(
        closed_within(&mut stream, Duration::from_secs(6)).await,
        "an idle kept-alive connection still open 6 s after its last response (idle_timeout_ms = 1000)"
    );
    app.stop().await;
}

#[tokio::test]
async fn connections_held_open_keep_neither_a_signed_callback_nor_healthz_out_and_the_excess_is_closed()
 {
    const CAP: usize = 64;
    let app = TestApp::spawn_with(|c| {
        c.server.max_connections = CAP;
        c.server.probe_connections = 4;
        // Only the cap may close connections in this test.
        c.server.header_timeout_ms = 60_000;
        c.server.idle_timeout_ms = 60_000;
        c.server.request_timeout_ms = 60_000;
        c.server.shutdown_timeout_ms = 60_000;
    })
    .await;
    // The cap filled by connections that say nothing, stall in their header, or stall in their
    // body.
    let mut held = Vec::new();
    for i in 0..CAP {
        let mut stream = connect(&app).await;
        let sent: &[u8] = match i % 3 {
            0 => b"",
            1 => b"POST /dingtalk/callback HTTP/1.1\r\nHost: dingsync\r\nX-Pad: aaaa",
            _ => {
                b"POST /dingtalk/callback?signature=a&timestamp=1&nonce=n HTTP/1.1\r\n\
                   Host: dingsync\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            }
        };
        stream.write_all(sent).await.unwrap();
        held.push(stream);
    }

    let started = Instant::now();
    app.push_ok(&instance_event("pid-listener-1", "start", None, T0, None))
        .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1_500),
        "a callback behind {CAP} held connections took {took:?} (DingTalk waits 1500 ms)"
    );
    let health = reqwest::Client::new()
        .get(format!("{}/healthz", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    // More than the cap: the longest idle are closed, and the newest are served at once.
    for _ in 0..16 {
        held.push(connect(&app).await);
    }
    let newest = held.last_mut().unwrap();
    newest.write_all(HEALTHZ).await.unwrap();
    let response = read_healthz_response(newest).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let total = held.len();
    let mut closed = vec![false; total];
    let deadline = Instant::now() + Duration::from_secs(10);
    while total - closed.iter().filter(|&&c| c).count() > CAP {
        assert!(
            Instant::now() < deadline,
            "{} of {total} held connections still open 10 s on, with server.max_connections = {CAP}",
            total - closed.iter().filter(|&&c| c).count()
        );
        let checks = held
            .iter_mut()
            .zip(&closed)
            .filter(|(_, closed)| !**closed)
            .map(|(stream, _)| closed_within(stream, Duration::from_millis(100)));
        let now_closed = futures::future::join_all(checks).await;
        let mut now_closed = now_closed.into_iter();
        for c in closed.iter_mut().filter(|c| !**c) {
            *c = now_closed.next().unwrap();
        }
    }
    // Those saying nothing or stalling in a header went first; those with a whole header in
    // (stalling in the body) go last.
    for (kind, what) in [(0, "saying nothing"), (1, "stalling in a header")] {
        assert!(
            (0..CAP).any(|i| i % 3 == kind && closed[i]),
            "no connection {what} closed"
        );
    }
    assert!(
        !(0..CAP).any(|i| i % 3 == 2 && closed[i]),
        "a connection stalling in its body closed while others were idle"
    );
    app.push_ok(&instance_event("pid-listener-2", "start", None, T0, None))
        .await;
    assert_eq!(app.count("events").await, 2);
    app.stop().await;
}

#[tokio::test]
async fn requests_stalled_in_their_body_cannot_keep_a_signed_callback_out() {
    const CAP: usize = 4;
    let app = TestApp::spawn_with(|c| {
        c.server.max_connections = CAP;
        c.server.request_timeout_ms = 60_000;
        c.server.shutdown_timeout_ms = 60_000;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..CAP {
        let mut stream = connect(&app).await;
        stream
            .write_all(
                b"POST /dingtalk/callback?signature=a&timestamp=1&nonce=n HTTP/1.1\r\n\
                  Host: dingsync\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
            )
            .await
            .unwrap();
        held.push(stream);
    }
    let started = Instant::now();
    app.push_ok(&instance_event(
        "pid-listener-slow-body",
        "start",
        None,
        T0,
        None,
    ))
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1_500),
        "a callback behind {CAP} stalled bodies took {took:?}"
    );
    // The stalled request that waited longest made room (the first, unless they were read out
    // of order).
    let mut closed = false;
    for stream in &mut held {
        if closed_within(stream, Duration::from_secs(5)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "no stalled request closed to make room");
    app.stop().await;
}

#[tokio::test]
async fn with_every_connection_busy_a_callback_is_refused_at_once_and_healthz_still_answers() {
    const CAP: usize = 8;
    let app = TestApp::spawn_with(|c| {
        c.server.max_connections = CAP;
        c.server.probe_connections = 2;
        c.server.request_timeout_ms = 60_000;
        c.server.shutdown_timeout_ms = 60_000;
    })
    .await;
    // The database holds every commit: the callbacks that fill the cap stay in flight, whole.
    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE dingsync.events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    // Each retries, as DingTalk does, until it is answered `success`: while the cap fills, a
    // connection whose request is not in yet may be closed to make room for another.
    let waiting: Vec<_> = (0..CAP)
        .map(|i| {
            let pusher = Pusher::new(&app.base_url, app.crypto.clone(), &app.owner_key);
            let event = instance_event(&format!("pid-listener-busy-{i}"), "start", None, T0, None);
            tokio::spawn(async move {
                loop {
                    if let Ok(response) = pusher.send(&event).await
                        && response.status() == 200
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
        .collect();

    let event = instance_event("pid-listener-refused", "start", None, T0, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        // Until all of the cap's callbacks are in, one of these may take a slot and wait too.
        let pusher = Pusher::new(&app.base_url, app.crypto.clone(), &app.owner_key);
        let started = Instant::now();
        let sent = tokio::time::timeout(Duration::from_secs(2), pusher.send(&event)).await;
        if let Ok(Ok(response)) = sent
            && response.status() == 503
        {
            break started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "no callback refused within 20 s with every connection busy"
        );
    };
    assert!(
        refused < Duration::from_millis(1_500),
        "refused after {refused:?}: not at once"
    );
    let health = reqwest::Client::new()
        .get(format!("{}/healthz", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "the probe reserve answers /healthz");

    // Once the database lets go, the callbacks in flight are stored and answered.
    lock.rollback().await.unwrap();
    for push in waiting {
        tokio::time::timeout(Duration::from_secs(30), push)
            .await
            .expect("every waiting callback answered within 30 s")
            .unwrap();
    }
    app.push_ok(&event).await;
    app.stop().await;
}

#[tokio::test]
async fn a_header_larger_than_max_header_bytes_is_refused_with_431() {
    let app = TestApp::spawn_with(|c| c.server.max_header_bytes = 16 * 1024).await;
    let mut stream = connect(&app).await;
    let mut request = b"GET /healthz HTTP/1.1\r\nHost: dingsync\r\nX-Pad: ".to_vec();
    request.extend(std::iter::repeat_n(b'a', 64 * 1024));
    request.extend_from_slice(b"\r\n\r\n");
    // The server may stop reading (and close) before all of it is written.
    let _ = stream.write_all(&request).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("closed within 10 s");
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 431"), "{response:?}");
    app.stop().await;
}

#[tokio::test]
async fn an_h2c_connection_preface_is_refused() {
    let app = TestApp::spawn().await;
    let mut stream = connect(&app).await;
    // HTTP/2 with prior knowledge: the preface, then an empty SETTINGS frame.
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    stream.write_all(&preface).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("closed within 10 s");
    // An HTTP/2 server answers with its own SETTINGS frame (type 4 in the fourth byte).
    assert!(
        !(answer.len() >= 9 && answer[3] == 4),
        "the server spoke HTTP/2: {answer:?}"
    );
    app.stop().await;
}
