//! The admin HTTP server of stdd and tmd: one request per connection, every connection bounded in time and size, a bounded number of them, and no request waiting behind another.
//!
//! Built on hyper (HTTP/1.1) over a current-thread tokio runtime on the
//! caller's thread; handlers are plain blocking functions run on tokio's
//! blocking pool, so a slow handler (a table change) never delays a quick
//! one (`/healthz`). What a hostile or careless client can do is bounded:
//!
//! * request head: [`Limits::max_header_bytes`], within [`Limits::header_timeout`];
//! * the bearer token is checked on the head, before any body is read;
//! * body: at most [`Limits::max_body_bytes`] (413), within [`Limits::body_timeout`] (408);
//! * a whole connection lives at most [`Limits::deadline`] (a client that
//!   pipelines requests and never reads the answers is cut there);
//! * at most [`Limits::max_connections`] at once: a new connection beyond
//!   that closes the oldest one still waiting for its head, or is closed
//!   itself when every one is busy;
//! * out of file descriptors (EMFILE), the oldest idle connection is closed
//!   and the accept retried: the endpoint never dies of it;
//! * with TLS, the handshake counts against [`Limits::header_timeout`]; a
//!   failed one (no or a wrong client certificate, not TLS) is counted and
//!   the connection closed before anything is read.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::sync::Notify;

use crate::auth::{self, AdminConfig};
use crate::tls::{self, TlsError};

/// What bounds the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time from accept to the end of the request head.
    pub header_timeout: Duration,
    /// Time to receive the body once the head is in.
    pub body_timeout: Duration,
    /// Longest life of one connection, answer included.
    pub deadline: Duration,
    /// Largest request head (hyper's read buffer; at least 8 KiB).
    pub max_header_bytes: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
}

/// Default connections at once (a cluster's nodes and operators need a few).
pub const MAX_CONNECTIONS: usize = 128;

/// Idle connections closed per accept that failed for want of descriptors.
const SHED_ON_EMFILE: usize = 8;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            header_timeout: Duration::from_secs(2),
            body_timeout: Duration::from_secs(10),
            deadline: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// A request as a handler sees it: complete, authorised, bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query string, without `?` (empty when none).
    pub query: String,
    /// The body.
    pub body: Vec<u8>,
    /// Who sent it.
    pub peer: SocketAddr,
    /// The SHA-256 fingerprint of the client certificate it presented
    /// (mutual TLS), if any.
    pub client_cert: Option<String>,
}

impl Request {
    /// Whether the query holds `name=value` (`key=include`) as one of its
    /// `&`-separated pairs.
    pub fn asks(&self, pair: &str) -> bool {
        self.query.split('&').any(|p| p == pair)
    }

    /// The body as UTF-8 text.
    pub fn text(&self) -> Result<&str, Reply> {
        std::str::from_utf8(&self.body).map_err(|_| Reply::text(400, "the body is not UTF-8 text"))
    }

    /// The body as JSON of type `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Reply> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Reply::text(400, format!("unreadable request body: {e}")))
    }
}

/// A handler's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Content type.
    pub content_type: &'static str,
    /// Body.
    pub body: Vec<u8>,
    /// A body streamed after `body` (a capture), if any.
    pub stream: Option<Stream>,
}

/// A body streamed chunk by chunk as its producer hands them over
/// ([`StreamSender`]); the connection lives as long as the stream says
/// (beyond [`Limits::deadline`]), and ends when the producer drops its end.
#[derive(Debug, Clone)]
pub struct Stream {
    rx: Arc<Mutex<Option<tokio::sync::mpsc::Receiver<Vec<u8>>>>>,
    lasts: Duration,
}

impl PartialEq for Stream {
    fn eq(&self, other: &Stream) -> bool {
        Arc::ptr_eq(&self.rx, &other.rx)
    }
}
impl Eq for Stream {}

/// The producer's end of a [`Stream`].
#[derive(Debug)]
pub struct StreamSender {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
}

/// What became of a chunk handed to a [`StreamSender`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Queued for the client.
    Taken,
    /// The client is `capacity` chunks behind: this one is not sent.
    Full,
    /// The client is gone.
    Closed,
}

impl StreamSender {
    /// Queues `chunk` without waiting.
    pub fn try_send(&self, chunk: Vec<u8>) -> Sent {
        match self.tx.try_send(chunk) {
            Ok(()) => Sent::Taken,
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => Sent::Full,
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => Sent::Closed,
        }
    }
}

/// A stream of at most `capacity` chunks in flight that may last `lasts`.
pub fn stream(capacity: usize, lasts: Duration) -> (StreamSender, Stream) {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
    (
        StreamSender { tx },
        Stream {
            rx: Arc::new(Mutex::new(Some(rx))),
            lasts,
        },
    )
}

/// A [`Stream`]'s chunks as an HTTP body.
struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|c| c.map(|v| Ok(hyper::body::Frame::data(Bytes::from(v)))))
    }
}

impl Reply {
    /// Plain text, newline-terminated.
    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        let mut body = body.into();
        if !body.ends_with('\n') {
            body.push('\n');
        }
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into_bytes(),
            stream: None,
        }
    }

    /// A streamed body of `content_type` (see [`stream`]).
    pub fn streamed(content_type: &'static str, stream: Stream) -> Reply {
        Reply {
            status: 200,
            content_type,
            body: Vec::new(),
            stream: Some(stream),
        }
    }

    /// JSON of `value`.
    pub fn json(status: u16, value: &impl Serialize) -> Reply {
        match serde_json::to_vec(value) {
            Ok(body) => Reply {
                status,
                content_type: "application/json",
                body,
                stream: None,
            },
            Err(e) => Reply::text(500, format!("answer not serialisable: {e}")),
        }
    }

    /// Prometheus text exposition.
    pub fn metrics(body: String) -> Reply {
        Reply {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: body.into_bytes(),
            stream: None,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The loopback rule refused the configuration.
    #[error("{0}")]
    Insecure(String),
    /// The TLS settings cannot be used.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// The listen address cannot be bound.
    #[error("admin.listen {listen}: {source}")]
    Bind {
        /// The address.
        listen: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The runtime could not start.
    #[error("admin endpoint runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// What the server counted.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Idle connections closed to make room (limit reached, or out of file descriptors).
    pub shed_idle: AtomicU64,
    /// New connections closed at once because every open one was busy.
    pub refused: AtomicU64,
    /// Accept errors (EMFILE, …).
    pub accept_errors: AtomicU64,
    /// TLS handshakes that failed or did not finish in time (no or a
    /// wrong client certificate, plain HTTP to an HTTPS endpoint, …).
    pub tls_failures: AtomicU64,
}

/// Something that answers requests; any `Fn(Request) -> Reply` is one.
pub trait Handler: Send + Sync + 'static {
    /// The answer to `req` (may block: it runs on a blocking thread).
    fn handle(&self, req: Request) -> Reply;
}

impl<F: Fn(Request) -> Reply + Send + Sync + 'static> Handler for F {
    fn handle(&self, req: Request) -> Reply {
        self(req)
    }
}

/// A bound admin endpoint, ready to [`serve`](Server::serve).
#[derive(Debug)]
pub struct Server {
    listener: std::net::TcpListener,
    live: Arc<arc_swap::ArcSwap<Live>>,
    limits: Limits,
    stats: Arc<ServerStats>,
}

struct Conn {
    /// When it was accepted.
    start: Instant,
    /// How long it may live, ms from `start` (a streamed answer extends it).
    deadline_ms: AtomicU64,
    busy: AtomicBool,
    evicted: AtomicBool,
    kill: Notify,
}

#[derive(Default)]
struct Conns {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Conn>>>,
}

impl Conns {
    fn add(&self, deadline: Duration) -> (u64, Arc<Conn>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let c = Arc::new(Conn {
            start: Instant::now(),
            deadline_ms: AtomicU64::new(deadline.as_millis() as u64),
            busy: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            kill: Notify::new(),
        });
        self.lock().insert(id, Arc::clone(&c));
        (id, c)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Conn>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections open and not being closed.
    fn live(&self) -> usize {
        self.lock()
            .values()
            .filter(|c| !c.evicted.load(Ordering::Relaxed))
            .count()
    }

    /// Closes the oldest connection still waiting for its request head.
    fn evict_oldest_idle(&self) -> bool {
        let open = self.lock();
        let victim = open
            .values()
            .find(|c| !c.busy.load(Ordering::Relaxed) && !c.evicted.load(Ordering::Relaxed));
        match victim {
            Some(c) => {
                c.evicted.store(true, Ordering::Relaxed);
                c.kill.notify_one();
                true
            }
            None => false,
        }
    }
}

/// What a reload may change while the server runs: the token and the TLS
/// settings (a renewed certificate, a new client CA).
struct Live {
    token: Option<String>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Live {
    fn load<const P: u16>(admin: &AdminConfig<P>) -> Result<Live, ServerError> {
        auth::check_listen(admin).map_err(ServerError::Insecure)?;
        let tls = admin.tls.as_ref().map(tls::ServerTls::load).transpose()?;
        Ok(Live {
            token: admin.token.clone().filter(|t| !t.is_empty()),
            tls: tls.map(tokio_rustls::TlsAcceptor::from),
        })
    }
}

/// Changes a running server's token and TLS settings (SIGHUP): what
/// [`Server::reloader`] hands out.
#[derive(Debug, Clone)]
pub struct Reloader {
    live: Arc<arc_swap::ArcSwap<Live>>,
    listen: SocketAddr,
}

impl Reloader {
    /// Takes `admin`'s token and TLS files (read again: a renewed
    /// certificate at the same path is picked up) for every connection
    /// accepted from now on; open ones keep what they started with. A
    /// setting that cannot be used is refused and the running ones stay;
    /// a new `listen` needs a restart (refused, named).
    pub fn reload<const P: u16>(&self, admin: &AdminConfig<P>) -> Result<(), ServerError> {
        if admin.listen != self.listen {
            return Err(ServerError::Insecure(format!(
                "admin.listen {} -> {}: a new listen address needs a restart",
                self.listen, admin.listen
            )));
        }
        self.live.store(Arc::new(Live::load(admin)?));
        Ok(())
    }
}

struct Shared {
    handler: Arc<dyn Handler>,
    live: Arc<arc_swap::ArcSwap<Live>>,
    limits: Limits,
    conns: Conns,
    stats: Arc<ServerStats>,
}

impl Server {
    /// Binds `admin.listen` with its TLS settings loaded, refusing an
    /// endpoint off loopback without a token, or without TLS unless
    /// `insecure_plaintext` is set.
    pub fn bind<const P: u16>(
        admin: &AdminConfig<P>,
        limits: Limits,
    ) -> Result<Server, ServerError> {
        let live = Live::load(admin)?;
        let listen = admin.listen;
        let bind = |e| ServerError::Bind { listen, source: e };
        let listener = std::net::TcpListener::bind(listen).map_err(bind)?;
        listener.set_nonblocking(true).map_err(bind)?;
        Ok(Server {
            listener,
            live: Arc::new(arc_swap::ArcSwap::from_pointee(live)),
            limits,
            stats: Arc::default(),
        })
    }

    /// The bound address (a port of 0 is resolved).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// What changes the token and TLS settings of this server once it
    /// runs (`None` only if the bound socket has no address).
    pub fn reloader(&self) -> Option<Reloader> {
        Some(Reloader {
            live: Arc::clone(&self.live),
            listen: self.listener.local_addr().ok()?,
        })
    }

    /// The server's counters (shared with the running server).
    pub fn stats(&self) -> Arc<ServerStats> {
        Arc::clone(&self.stats)
    }

    /// Serves until `stop` is set (checked every 100 ms), on this thread.
    pub fn serve(self, handler: Arc<dyn Handler>, stop: &AtomicBool) -> Result<(), ServerError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(32)
            .build()
            .map_err(ServerError::Runtime)?;
        let shared = Arc::new(Shared {
            handler,
            live: self.live,
            limits: self.limits,
            conns: Conns::default(),
            stats: self.stats,
        });
        let std_listener = self.listener;
        let result = rt.block_on(async {
            let listener =
                tokio::net::TcpListener::from_std(std_listener).map_err(ServerError::Runtime)?;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut last_warning: Option<Instant> = None;
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => accept(&shared, stream, peer),
                        Err(e) => {
                            shared.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                            // Out of descriptors (EMFILE, ENFILE) or the
                            // like: close the oldest idle connections and
                            // let them go (yield), or wait a little when
                            // every connection is busy; then go on.
                            let shed = (0..SHED_ON_EMFILE)
                                .take_while(|_| shared.conns.evict_oldest_idle())
                                .count();
                            shared.stats.shed_idle.fetch_add(shed as u64, Ordering::Relaxed);
                            if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                                log::warn!("admin: accept: {e} (closed {shed} idle connections)");
                                last_warning = Some(Instant::now());
                            }
                            if shed > 0 {
                                tokio::task::yield_now().await;
                            } else {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    },
                    _ = tick.tick() => if stop.load(Ordering::Relaxed) { break },
                }
            }
            Ok(())
        });
        rt.shutdown_timeout(Duration::from_secs(1));
        result
    }
}

fn accept(shared: &Arc<Shared>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
    if shared.conns.live() >= shared.limits.max_connections {
        if shared.conns.evict_oldest_idle() {
            shared.stats.shed_idle.fetch_add(1, Ordering::Relaxed);
        } else {
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            return;
        }
    }
    let (id, conn) = shared.conns.add(shared.limits.deadline);
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let tls = shared.live.load().tls.clone();
        match tls {
            None => serve_connection(stream, peer, None, &conn, &shared).await,
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(shared.limits.header_timeout, acceptor.accept(stream));
                let done = tokio::select! {
                    done = handshake => done,
                    _ = conn.kill.notified() => Ok(Err(std::io::ErrorKind::ConnectionAborted.into())),
                };
                match done {
                    Ok(Ok(tls)) => {
                        let cert = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| tls::fingerprint(c.as_ref()));
                        serve_connection(tls, peer, cert, &conn, &shared).await;
                    }
                    Ok(Err(e)) => {
                        shared.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                        log::debug!("admin: TLS handshake with {peer}: {e}");
                    }
                    Err(_) => {
                        shared.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                        log::debug!("admin: TLS handshake with {peer}: not finished in time");
                    }
                }
            }
        }
        shared.conns.lock().remove(&id);
    });
}

/// Serves one connection (plain or TLS) until it ends, its deadline
/// passes, or it is evicted.
async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    client_cert: Option<String>,
    conn: &Arc<Conn>,
    shared: &Arc<Shared>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(stream);
    let svc = {
        let (shared, conn) = (Arc::clone(shared), Arc::clone(conn));
        service_fn(move |req| {
            respond(
                req,
                peer,
                client_cert.clone(),
                Arc::clone(&conn),
                Arc::clone(&shared),
            )
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_timeout)
        .max_buf_size(shared.limits.max_header_bytes.max(8192))
        .keep_alive(false);
    let connection = builder.serve_connection(io, svc);
    tokio::pin!(connection);
    loop {
        let limit = Duration::from_millis(conn.deadline_ms.load(Ordering::Relaxed));
        let until = tokio::time::Instant::from_std(conn.start + limit);
        tokio::select! {
            _ = &mut connection => break,
            _ = tokio::time::sleep_until(until) => {
                // A streamed answer may have moved the deadline.
                if conn.deadline_ms.load(Ordering::Relaxed) <= limit.as_millis() as u64 {
                    break;
                }
            }
            _ = conn.kill.notified() => break,
        }
    }
}

/// Whether a request of this method may change a node's state (every
/// method but GET and HEAD): those are audited.
fn changes_state(method: &str) -> bool {
    !matches!(method, "GET" | "HEAD")
}

/// One audit line (log target `audit`, level info) for a state-changing
/// request: who (the peer, and the SHA-256 fingerprint of its client
/// certificate under mutual TLS; the token, when one is set, was checked),
/// what (method and path), the result (status and the first line of the
/// reply, at most 200 characters). Bodies are never logged: a table
/// carries the hash key.
fn audit(peer: SocketAddr, cert: Option<&str>, method: &str, path: &str, status: u16, said: &str) {
    let first: String = said
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    match cert {
        Some(c) => {
            log::info!(target: "audit", "{peer} cert=sha256:{c} {method} {path} -> {status} {first}")
        }
        None => log::info!(target: "audit", "{peer} {method} {path} -> {status} {first}"),
    }
}

type Answer = hyper::Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>;

fn answer(reply: Reply) -> Answer {
    let streamed = reply
        .stream
        .and_then(|s| s.rx.lock().unwrap_or_else(|p| p.into_inner()).take());
    let body = match streamed {
        Some(rx) => ChannelBody { rx }.boxed(),
        None => Full::new(Bytes::from(reply.body)).boxed(),
    };
    let mut r = hyper::Response::new(body);
    *r.status_mut() = hyper::StatusCode::from_u16(reply.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    r
}

async fn respond(
    req: hyper::Request<Incoming>,
    peer: SocketAddr,
    client_cert: Option<String>,
    conn: Arc<Conn>,
    shared: Arc<Shared>,
) -> Result<Answer, Infallible> {
    conn.busy.store(true, Ordering::Relaxed);
    let auth = req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes);
    if !auth::authorised(shared.live.load().token.as_deref(), auth) {
        if changes_state(req.method().as_str()) {
            audit(
                peer,
                client_cert.as_deref(),
                req.method().as_str(),
                req.uri().path(),
                401,
                "missing or wrong bearer token",
            );
        }
        return Ok(answer(Reply::text(401, "missing or wrong bearer token")));
    }
    let max = shared.limits.max_body_bytes;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Ok(answer(Reply::text(
            413,
            format!("request body larger than {max} bytes"),
        )));
    }
    let (parts, body) = req.into_parts();
    let collected = tokio::time::timeout(
        shared.limits.body_timeout,
        Limited::new(body, max).collect(),
    )
    .await;
    let body = match collected {
        Err(_) => {
            return Ok(answer(Reply::text(
                408,
                format!(
                    "request body not received within {} s",
                    shared.limits.body_timeout.as_secs_f64()
                ),
            )))
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Ok(answer(Reply::text(
                413,
                format!("request body larger than {max} bytes"),
            )))
        }
        Ok(Err(e)) => return Ok(answer(Reply::text(400, format!("request body: {e}")))),
        Ok(Ok(c)) => c.to_bytes().to_vec(),
    };
    let request = Request {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        body,
        peer,
        client_cert: client_cert.clone(),
    };
    let handler = Arc::clone(&shared.handler);
    let method = request.method.clone();
    let path = request.path.clone();
    let reply = tokio::task::spawn_blocking(move || handler.handle(request))
        .await
        .unwrap_or_else(|e| {
            log::error!("admin: a handler failed: {e}");
            Reply::text(500, "the handler failed")
        });
    if changes_state(&method) {
        let said = String::from_utf8_lossy(&reply.body[..reply.body.len().min(512)]).into_owned();
        audit(
            peer,
            client_cert.as_deref(),
            &method,
            &path,
            reply.status,
            &said,
        );
    }
    if let Some(s) = &reply.stream {
        // The connection lives until the stream's end (and a little more).
        let until = conn.start.elapsed() + s.lasts + Duration::from_secs(5);
        conn.deadline_ms
            .fetch_max(until.as_millis() as u64, Ordering::Relaxed);
    }
    Ok(answer(reply))
}
