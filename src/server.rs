//! The HTTP listener of `serve`: accepts TCP connections and serves each with hyper's HTTP/1.1
//! under the limits of `[server]`, so that no client, with credentials or without, can take the
//! memory, the file descriptors or the connection slots a callback needs within DingTalk's
//! 1500 ms (docs/dingtalk.md §4.7). Owns accepting, the limits and the graceful drain of the
//! connections; the routes, the request body limit and the request timeout are `app`'s router.
//!
//! - **A cap** (`max_connections`). When every slot is taken, a new connection takes the place of
//!   an idle one, which is closed: idle means that no whole request has arrived (nothing sent, a
//!   header or a body still arriving, or kept alive), and the order is [`Conn::eviction_order`]'s
//!   (those that have shown least first, and within that the one waiting longest). A connection
//!   whose request has arrived in full is never closed for room. So connections held open
//!   without finishing a request cannot keep a callback out: each new connection displaces an
//!   idle one, and a callback's connection is protected as soon as its request is in (DingTalk
//!   sends it at once).
//! - **A reserve** (`probe_connections`), used only when every connection of the cap has a whole
//!   request in flight: it answers `GET /healthz`, `/readyz` and `/metrics` (served from memory and a
//!   cached reading, never held busy) and anything else with 503 at once, so liveness is
//!   answered under any load. Past the reserve a connection is closed at once, never queued.
//! - **Timeouts**: a request's whole header within `header_timeout_ms` of the connection opening
//!   (on a kept-alive connection, of the request's first byte); a kept-alive connection that
//!   receives nothing for `idle_timeout_ms` after a response is closed. hyper's own header timer,
//!   which starts when it begins waiting for a request, backs both up at their sum.
//! - **A bounded read buffer** (`max_header_bytes`): a larger header gets 431, and an unfinished
//!   one can hold no more than that per connection.
//!
//! Only HTTP/1.1 is served: a push is one plain POST (docs/dingtalk.md §4.7) and the TLS proxy in
//! front speaks HTTP/1.1 to dingsync, so an h2c (cleartext HTTP/2) preface is refused like any
//! malformed request, one protocol stack less to expose. With the cap checked against the
//! open-file limit at start-up ([`check_open_files`]), `accept` cannot run out of file
//! descriptors either; a long accept queue ([`BACKLOG`]) rides out bursts of new connections.

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use anyhow::bail;
use axum::{
    Router,
    body::{Body, Bytes},
    http::{Method, Request, Response, StatusCode, header},
};
use hyper::{body::Incoming, server::conn::http1, service::Service as _, service::service_fn};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Notify,
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{Config, ServerConfig},
    metrics,
};

/// The paths a probe connection serves (with GET or HEAD).
pub const PROBE_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// How often at most the "cap reached" warning is logged: under an attack it would be every accept.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The limits of `[server]` the listener enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub probe_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
}

impl Limits {
    pub fn new(server: &ServerConfig) -> Limits {
        Limits {
            max_connections: server.max_connections,
            probe_connections: server.probe_connections,
            header_timeout: Duration::from_millis(server.header_timeout_ms),
            idle_timeout: Duration::from_millis(server.idle_timeout_ms),
            max_header_bytes: server.max_header_bytes,
        }
    }
}

impl Limits {
    /// The admin console's listener: the same timeouts and header buffer, a cap sized for a few
    /// operators' browsers (each keeps up to six connections) rather than for DingTalk's pushes,
    /// so that the console costs few file descriptors.
    pub fn admin(server: &ServerConfig) -> Limits {
        Limits {
            max_connections: server.max_connections.min(ADMIN_CONNECTIONS),
            probe_connections: server.probe_connections.min(1),
            ..Limits::new(server)
        }
    }
}

/// The admin console's connection cap (at most `server.max_connections`).
const ADMIN_CONNECTIONS: usize = 32;

/// Refuses a cap the process's open-file limit cannot hold: past that limit `accept` fails and
/// nothing at all is served, the outage the cap is there to prevent. The other open files are
/// the database pool, the DingTalk client's connections (and the embedded emulator's ends of
/// them) and a margin for the listeners, the runtime and log files.
pub fn check_open_files(config: &Config) -> anyhow::Result<()> {
    check_against(config, open_file_limit())
}

fn check_against(config: &Config, limit: Option<u64>) -> anyhow::Result<()> {
    let Some(limit) = limit else {
        return Ok(());
    };
    let dingtalk = (config.outbox.concurrency + config.reconcile.concurrency as usize) as u64;
    let others = u64::from(config.database.max_connections)
        + dingtalk * if config.uses_emulator() { 2 } else { 1 }
        + 64;
    let server = &config.server;
    let admin = if config.admin.listen.is_empty() {
        0
    } else {
        let limits = Limits::admin(server);
        (limits.max_connections + limits.probe_connections) as u64
    };
    let needed = (server.max_connections + server.probe_connections) as u64 + admin + others;
    if needed > limit {
        bail!(
            "server.max_connections: {} connections + {} probe connections + {admin} of the \
             console + about {others} other open files need {needed} file descriptors, but the open-file limit (ulimit -n) is \
             {limit}: lower server.max_connections or raise the limit",
            server.max_connections,
            server.probe_connections,
        );
    }
    Ok(())
}

#[cfg(unix)]
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not on every unix
fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which lives for the call.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    (read && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur as u64)
}

#[cfg(not(unix))]
fn open_file_limit() -> Option<u64> {
    None
}

/// Connections the kernel completes and queues for `accept` (it caps this at
/// `net.core.somaxconn`). Under a storm of new connections a full queue drops the handshakes of
/// new clients, which retry only a second later: a long queue rides out the bursts.
const BACKLOG: u32 = 4096;

/// The listening socket at `addr`.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As std's and tokio's bind do: a restarted daemon takes its port back at once.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Serves `router` on `listener` until `shutdown`; then stops accepting, closes the connections
/// without a whole request in flight, lets the others finish theirs, and returns when every
/// connection is closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        // A backstop: our own timers close the connection first (see `Conn::deadline`).
        .header_read_timeout(limits.header_timeout + limits.idle_timeout)
        .max_buf_size(limits.max_header_bytes)
        .max_header_size(limits.max_header_bytes);
    let registry = Arc::new(Mutex::new(Registry::new(limits)));
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            // The client gave up before we took it: nothing to do.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors or memory: the connection stays queued in the kernel,
                // so wait a moment rather than spin (as axum::serve does).
                tracing::warn!(error = %e, "accepting a connection failed; retrying in 1 s");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let conn = Arc::new(Conn::new());
        let admitted = registry.lock().unwrap().admit(conn.clone());
        let Some(slot) = admitted else {
            // Dropping the stream closes it at once: no slot, no queue.
            metrics::http_connection_shed("refused");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let held = Held {
            registry: registry.clone(),
            id: slot.id,
        };
        connections.spawn(connection(
            stream,
            conn,
            slot,
            held,
            http.clone(),
            router.clone(),
            limits,
            shutdown.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// One connection, from its slot to its close.
#[allow(clippy::too_many_arguments)] // one call site, each argument a different thing
async fn connection(
    stream: TcpStream,
    conn: Arc<Conn>,
    slot: Slot,
    _held: Held,
    http: http1::Builder,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let probes_only = slot.pool == Pool::Probe;
    let app = TowerToHyperService::new(router);
    let watched = conn.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let in_flight = InFlight::start(&watched);
        let request = request.map(|body| Arriving::new(body, &in_flight));
        let app = app.clone();
        async move {
            if probes_only && !is_probe(&request) {
                metrics::http_connection_shed("probe_only");
                return Ok::<_, Infallible>(over_capacity());
            }
            let response = app.call(request).await?;
            // The request stays in flight until hyper has written the whole body and drops it.
            Ok(response.map(|body| {
                Body::new(Tracked {
                    body,
                    _in_flight: in_flight,
                })
            }))
        }
    });
    let io = TokioIo::new(Watched {
        stream,
        conn: conn.clone(),
    });
    let served = http.serve_connection(io, service);
    tokio::pin!(served);
    let mut draining = false;
    loop {
        // Taken before the deadline is read, so that a change in between wakes us.
        let changed = conn.changed.notified();
        let deadline = conn.deadline(&limits);
        tokio::select! {
            done = served.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            () = slot.evict.cancelled() => return,
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                // No whole request in flight: nothing to finish (a request still arriving has
                // not been acted on, and its sender retries). Otherwise hyper closes the
                // connection after the response to the request in flight.
                if conn.eviction_order().is_some() {
                    return;
                }
                served.as_mut().graceful_shutdown();
            }
            () = sleep_until(deadline), if deadline.is_some() => {
                if let Some((at, reason)) = conn.deadline(&limits)
                    && at <= Instant::now()
                {
                    metrics::http_connection_shed(reason);
                    return;
                }
            }
            () = changed => {}
        }
    }
}

async fn sleep_until(deadline: Option<(Instant, &'static str)>) {
    match deadline {
        Some((at, _)) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn is_probe<B>(request: &Request<B>) -> bool {
    matches!(*request.method(), Method::GET | Method::HEAD)
        && PROBE_PATHS.contains(&request.uri().path())
}

/// What a probe connection answers to anything but a probe: at once, and closing the connection
/// (a callback's sender retries, docs/dingtalk.md §6).
fn over_capacity() -> Response<Body> {
    let mut response = Response::new(Body::from(
        "over capacity: every connection is busy; only /healthz, /readyz and /metrics are served\n",
    ));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    response
}

/// Which group of slots a connection holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pool {
    /// `max_connections`: everything is served.
    Main,
    /// `probe_connections`: only the probes are served.
    Probe,
}

/// A connection's place in the registry.
struct Slot {
    id: u64,
    pool: Pool,
    conn: Arc<Conn>,
    /// Cancelled when the connection is closed to make room for a new one.
    evict: CancellationToken,
}

/// The open connections and their slots.
struct Registry {
    limits: Limits,
    next_id: u64,
    open: HashMap<u64, Slot>,
    main: usize,
    probe: usize,
    warned_at: Option<Instant>,
}

impl Registry {
    fn new(limits: Limits) -> Registry {
        Registry {
            limits,
            next_id: 0,
            open: HashMap::new(),
            main: 0,
            probe: 0,
            warned_at: None,
        }
    }

    /// A slot for a new connection: a free one of the cap, else the cap's idlest connection's
    /// (closed), else the same in the reserve; `None` when every connection has a whole request
    /// in flight. A scan of the open connections, only when the cap is reached.
    fn admit(&mut self, conn: Arc<Conn>) -> Option<Slot> {
        let pool = if self.main < self.limits.max_connections {
            Pool::Main
        } else {
            self.warn_full();
            if self.evict_idlest(Pool::Main) {
                Pool::Main
            } else if self.probe < self.limits.probe_connections || self.evict_idlest(Pool::Probe) {
                Pool::Probe
            } else {
                return None;
            }
        };
        match pool {
            Pool::Main => self.main += 1,
            Pool::Probe => self.probe += 1,
        }
        self.next_id += 1;
        let id = self.next_id;
        let evict = CancellationToken::new();
        let kept = Slot {
            id,
            pool,
            conn: conn.clone(),
            evict: evict.clone(),
        };
        self.open.insert(id, kept);
        metrics::http_connections(1);
        Some(Slot {
            id,
            pool,
            conn,
            evict,
        })
    }

    /// Closes the idle connection of `pool` that comes first in [`Conn::eviction_order`], if one
    /// is idle.
    fn evict_idlest(&mut self, pool: Pool) -> bool {
        let idlest = self
            .open
            .values()
            .filter(|slot| slot.pool == pool)
            .filter_map(|slot| Some((slot.conn.eviction_order()?, slot.id)))
            .min();
        let Some((_, id)) = idlest else {
            return false;
        };
        if let Some(slot) = self.remove(id) {
            slot.evict.cancel();
            metrics::http_connection_shed("evicted");
        }
        true
    }

    fn remove(&mut self, id: u64) -> Option<Slot> {
        let slot = self.open.remove(&id)?;
        match slot.pool {
            Pool::Main => self.main -= 1,
            Pool::Probe => self.probe -= 1,
        }
        metrics::http_connections(-1);
        Some(slot)
    }

    fn warn_full(&mut self) {
        let now = Instant::now();
        if self.warned_at.is_some_and(|at| now < at + WARN_EVERY) {
            return;
        }
        self.warned_at = Some(now);
        tracing::warn!(
            max_connections = self.limits.max_connections,
            probe_connections = self.limits.probe_connections,
            "server.max_connections reached: closing the longest idle connections to make room \
             (dingsync_http_connections_shed_total counts them); logged at most once a minute"
        );
    }
}

/// Gives a connection's slot back when its task ends, however it ends.
struct Held {
    registry: Arc<Mutex<Registry>>,
    id: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        // An evicted connection's slot is already gone: then this finds nothing.
        self.registry.lock().unwrap().remove(self.id);
    }
}

/// What a connection is doing, as far as the limits care.
struct Activity {
    /// Requests whose response has not been written in full (HTTP/1.1: at most one).
    in_flight: usize,
    /// Of those, the ones whose body has not arrived in full.
    arriving: usize,
    /// When the latest request's header was in.
    request_since: Instant,
    /// Requests started on this connection.
    requests: u64,
    /// Since when the connection waits for its next request: since it opened, or since the
    /// last response was written.
    waiting_since: Instant,
    /// When the first byte of the next request arrived, once it has.
    first_byte: Option<Instant>,
}

/// A connection's activity, shared by its task, its reads and its requests.
struct Conn {
    activity: Mutex<Activity>,
    /// Whether the connection's task has read from it yet (see [`Conn::eviction_order`]).
    read: AtomicBool,
    /// Wakes the connection's task when its deadline may have moved.
    changed: Notify,
}

impl Conn {
    fn new() -> Conn {
        Conn {
            activity: Mutex::new(Activity {
                in_flight: 0,
                arriving: 0,
                request_since: Instant::now(),
                requests: 0,
                waiting_since: Instant::now(),
                first_byte: None,
            }),
            read: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    /// Where the connection stands among those to close for room, first to last; `None` while
    /// a whole request is in flight (never closed for room). Within each group the one idle
    /// longest goes first:
    ///
    /// 0. read from, and no request in flight: saying nothing, stalling in a header, or kept
    ///    alive between requests;
    /// 1. a request whose header is in and whose body is still arriving: a callback's body may
    ///    take a few task switches to be read after its header (holding a slot this way takes a
    ///    whole header, and lasts `request_timeout_ms` at most);
    /// 2. not read from yet: its task is still queued behind others on a busy machine, and it
    ///    may hold a whole callback, waiting to be read. A client cannot keep its connections in
    ///    this group: reading them is ours.
    fn eviction_order(&self) -> Option<(u8, Instant)> {
        let activity = self.activity.lock().unwrap();
        if activity.in_flight == 0 {
            let group = if self.read.load(Ordering::Relaxed) {
                0
            } else {
                2
            };
            Some((group, activity.waiting_since))
        } else if activity.arriving > 0 {
            Some((1, activity.request_since))
        } else {
            None
        }
    }

    /// When the connection is closed if nothing happens before, and under which reason; `None`
    /// while a request is in flight (the router's request timeout bounds that).
    fn deadline(&self, limits: &Limits) -> Option<(Instant, &'static str)> {
        let activity = self.activity.lock().unwrap();
        if activity.in_flight > 0 {
            return None;
        }
        Some(match (activity.requests, activity.first_byte) {
            (0, _) => (
                activity.waiting_since + limits.header_timeout,
                "header_timeout",
            ),
            (_, Some(at)) => (at + limits.header_timeout, "header_timeout"),
            (_, None) => (activity.waiting_since + limits.idle_timeout, "idle_timeout"),
        })
    }

    /// Bytes arrived from the client.
    fn received(&self) {
        let mut activity = self.activity.lock().unwrap();
        if activity.in_flight == 0 && activity.first_byte.is_none() {
            activity.first_byte = Some(Instant::now());
            drop(activity);
            self.changed.notify_one();
        }
    }
}

/// A request in flight on a connection, from its parsed header until its response is written.
struct InFlight {
    conn: Arc<Conn>,
    /// Set once the request's body has arrived in full (or will not be read).
    body_in: Arc<AtomicBool>,
}

impl InFlight {
    fn start(conn: &Arc<Conn>) -> InFlight {
        let mut activity = conn.activity.lock().unwrap();
        activity.in_flight += 1;
        activity.arriving += 1;
        activity.requests += 1;
        activity.request_since = Instant::now();
        activity.first_byte = None;
        drop(activity);
        conn.changed.notify_one();
        InFlight {
            conn: conn.clone(),
            body_in: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// The request's body has arrived in full: from now on the connection is not idle.
fn body_in(conn: &Conn, flag: &AtomicBool) {
    if !flag.swap(true, Ordering::Relaxed) {
        conn.activity.lock().unwrap().arriving -= 1;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        body_in(&self.conn, &self.body_in);
        let mut activity = self.conn.activity.lock().unwrap();
        activity.in_flight -= 1;
        if activity.in_flight == 0 {
            activity.waiting_since = Instant::now();
            activity.first_byte = None;
        }
        drop(activity);
        self.conn.changed.notify_one();
    }
}

/// A request body that tells its connection when it has arrived in full.
struct Arriving {
    body: Incoming,
    conn: Arc<Conn>,
    body_in: Arc<AtomicBool>,
}

impl Arriving {
    fn new(body: Incoming, in_flight: &InFlight) -> Arriving {
        if http_body::Body::is_end_stream(&body) {
            body_in(&in_flight.conn, &in_flight.body_in);
        }
        Arriving {
            body,
            conn: in_flight.conn.clone(),
            body_in: in_flight.body_in.clone(),
        }
    }
}

impl http_body::Body for Arriving {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || this.body.is_end_stream() {
            body_in(&this.conn, &this.body_in);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A response body that keeps its request in flight until hyper drops it (written or abandoned).
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The TCP stream, telling its connection when bytes arrive.
struct Watched {
    stream: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.conn.read.store(true, Ordering::Relaxed);
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.conn.received();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_over_the_open_file_limit_is_refused_naming_the_key() {
        let config = Config::default();
        // 512 + 8 connections, 32 + 1 of the console, 16 pooled, the DingTalk client's, 64 spare.
        check_against(&config, Some(673)).unwrap();
        let err = check_against(&config, Some(256)).unwrap_err().to_string();
        assert!(
            err.starts_with("server.max_connections:")
                && err.contains("ulimit -n")
                && err.contains("256"),
            "{err}"
        );
        check_against(&config, None).unwrap();
        // Without the console its connections are not counted.
        let mut without = Config::default();
        without.admin.listen = String::new();
        let needed = |c: &Config| {
            (0..2000u64)
                .find(|&n| check_against(c, Some(n)).is_ok())
                .unwrap()
        };
        assert_eq!(needed(&config) - needed(&without), 33);
    }
}
