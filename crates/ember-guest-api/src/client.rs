//! [`GuestClient`]: the typed client of the guest agent's HTTP API, over a
//! pooled keep-alive HTTP/1.1 connection to a `SocketAddr`.
//!
//! It owns request building, the bearer token, timeouts and the decoding of
//! responses into wire types or [`GuestError`]. It does not retry (except
//! [`GuestClient::wait_ready`], whose job is to) and it does not know how the
//! host reaches the guest's address.
//!
//! After a VM is restored from a snapshot, make a new client: pooled
//! connections from before the snapshot are dead.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use http::{HeaderValue, Method, Request, Response, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::AsyncRead;
use tokio_util::io::{ReaderStream, StreamReader};

use crate::error::{ErrorBody, GuestError};
use crate::event::{EventRecord, NdjsonDecoder, ProcessEvent};
use crate::wire::*;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type RequestBody = UnsyncBoxBody<Bytes, BoxError>;

/// JSON responses larger than this are refused (a directory listing of a
/// huge directory is the largest legitimate one).
const MAX_JSON_RESPONSE: usize = 64 << 20;
const UPLOAD_CHUNK: usize = 256 << 10;

/// A client of one guest agent. Cheap to clone; clones share the connection
/// pool and the token (an `init` through one clone re-tokens all of them).
#[derive(Clone)]
pub struct GuestClient {
    shared: Arc<Shared>,
    timeout: Duration,
}

struct Shared {
    addr: SocketAddr,
    http: Client<HttpConnector, RequestBody>,
    token: RwLock<Option<String>>,
}

impl std::fmt::Debug for GuestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestClient")
            .field("addr", &self.shared.addr)
            .field("timeout", &self.timeout)
            .field("has_token", &self.token().is_some())
            .finish()
    }
}

/// How often `wait_ready` starts a new connect to a guest not yet answering.
const READY_PROBE_EVERY: Duration = Duration::from_millis(25);
/// How many of those connects may be pending at once (two seconds' worth).
const READY_PROBES_PENDING: usize = 80;

impl GuestClient {
    /// Default time allowed for one call (see [`GuestClient::with_timeout`]).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

    /// A client for the agent at `addr`, without a token (enough for a fresh
    /// agent's `health` and first `init`).
    pub fn new(addr: SocketAddr) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Self::CONNECT_TIMEOUT));
        connector.set_keepalive(Some(Duration::from_secs(30)));
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        GuestClient {
            shared: Arc::new(Shared {
                addr,
                http,
                token: RwLock::new(None),
            }),
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// Use `token` for every request (e.g. the token a snapshot was taken with).
    pub fn with_token(self, token: impl Into<String>) -> Self {
        self.set_token(Some(token.into()));
        self
    }

    pub fn set_token(&self, token: Option<String>) {
        *self.shared.token.write().unwrap_or_else(|e| e.into_inner()) = token;
    }

    pub fn token(&self) -> Option<String> {
        self.shared
            .token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A clone whose calls use `timeout`. A call's timeout covers the whole
    /// call for JSON answers; for streamed answers (events, file reads) it
    /// covers the wait for the response to start; for uploads (file writes,
    /// stdin from a reader) it is the longest pause in the upload's progress
    /// plus the wait for the answer.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        GuestClient {
            shared: self.shared.clone(),
            timeout,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `GET /health`.
    pub async fn health(&self) -> Result<Health, GuestError> {
        self.call_json("health", Method::GET, "/health".into(), empty())
            .await
    }

    /// Polls `GET /health` until the agent answers or `deadline` passes. An
    /// answer that is an error (e.g. `unauthorized`) is returned at once: the
    /// agent is up, the caller has to act.
    pub async fn wait_ready(&self, deadline: Instant) -> Result<Health, GuestError> {
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(GuestError::Timeout {
                    addr: self.addr(),
                    operation: "wait_ready",
                    after: started.elapsed(),
                });
            }
            attempts += 1;
            if !self.wait_listening(deadline).await {
                continue;
            }
            let attempt = self.with_timeout(left.min(Duration::from_secs(5)));
            match attempt.health().await {
                Ok(health) => {
                    tracing::debug!(
                        addr = %self.addr(),
                        attempts,
                        ms = started.elapsed().as_secs_f64() * 1e3,
                        "guest agent ready"
                    );
                    return Ok(health);
                }
                Err(e) if e.is_unreachable() => {
                    tracing::trace!(addr = %self.addr(), error = %e, "guest agent not ready yet");
                    tokio::time::sleep(READY_PROBE_EVERY.min(left)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until a TCP connection to the agent succeeds (true) or
    /// `deadline` passes (false). A SYN sent before the guest's network is
    /// up is retransmitted only a second later, so a single connect sees a
    /// guest up to a second late: a new connect starts every
    /// `READY_PROBE_EVERY` while the earlier ones stay pending (up to two
    /// seconds' worth, with the kernel's retransmits for a slow guest),
    /// and the first to connect wins.
    async fn wait_listening(&self, deadline: Instant) -> bool {
        use futures::StreamExt;
        use futures::stream::FuturesUnordered;
        let addr = self.addr();
        let mut pending = FuturesUnordered::new();
        let mut tick = tokio::time::interval(READY_PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let until = tokio::time::Instant::from_std(deadline);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if pending.len() >= READY_PROBES_PENDING {
                        pending.clear();
                    }
                    pending.push(tokio::net::TcpStream::connect(addr));
                }
                Some(result) = pending.next() => match result {
                    Ok(_) => return true,
                    // Refused: the guest is up and will listen soon; the
                    // next tick tries again.
                    Err(e) => tracing::trace!(%addr, error = %e, "guest agent not listening yet"),
                },
                _ = tokio::time::sleep_until(until) => return false,
            }
        }
    }

    /// `POST /init`. On success the client uses `req.token` from then on.
    pub async fn init(&self, req: &InitRequest) -> Result<InitResponse, GuestError> {
        let resp = self
            .call_json("init", Method::POST, "/init".into(), json_body(req))
            .await?;
        self.set_token(Some(req.token.clone()));
        Ok(resp)
    }

    /// `POST /shutdown`: the agent kills every process, syncs and powers the
    /// VM off (or exits, outside a VM).
    pub async fn shutdown(&self) -> Result<(), GuestError> {
        self.call_json::<serde_json::Value>("shutdown", Method::POST, "/shutdown".into(), empty())
            .await
            .map(drop)
    }

    /// `POST /processes`: starts a process and returns its event stream once
    /// the agent has reported the start (so [`ProcessEvents::pid`] is known).
    /// Dropping the stream of a foreground process kills it.
    pub async fn start_process(&self, req: &StartProcess) -> Result<ProcessEvents, GuestError> {
        let op = "start_process";
        let call = async {
            let resp = self
                .send(
                    op,
                    Method::POST,
                    "/processes".into(),
                    json_body(req),
                    Some(JSON),
                )
                .await?;
            let mut events = ProcessEvents::new(self.addr(), 0, resp.into_body());
            let first = events.next().await.ok_or_else(|| GuestError::Malformed {
                operation: op,
                detail: "event stream ended before the start event".into(),
            })??;
            let ProcessEvent::Start { pid } = first.event else {
                return Err(GuestError::Malformed {
                    operation: op,
                    detail: format!("first event is not start: {:?}", first.event),
                });
            };
            events.pid = pid;
            events.pending.push_back(first);
            Ok(events)
        };
        self.deadline(op, call).await
    }

    /// `GET /processes/{pid}/events?after=`: buffered events after `after`,
    /// then live ones. Attaching this way never kills the process.
    pub async fn process_events(&self, pid: u32, after: u64) -> Result<ProcessEvents, GuestError> {
        let op = "process_events";
        let pq = format!("/processes/{pid}/events?{}", query(&EventsQuery { after }));
        let call = async {
            let resp = self.send(op, Method::GET, pq, empty(), None).await?;
            Ok(ProcessEvents::new(self.addr(), pid, resp.into_body()))
        };
        self.deadline(op, call).await
    }

    /// `GET /processes`.
    pub async fn list_processes(&self) -> Result<Vec<ProcessInfo>, GuestError> {
        let list: ProcessList = self
            .call_json("list_processes", Method::GET, "/processes".into(), empty())
            .await?;
        Ok(list.processes)
    }

    /// `GET /processes/{pid}`.
    pub async fn process(&self, pid: u32) -> Result<ProcessInfo, GuestError> {
        self.call_json("process", Method::GET, format!("/processes/{pid}"), empty())
            .await
    }

    /// `POST /processes/{pid}/stdin` with `data`.
    pub async fn write_stdin(&self, pid: u32, data: impl Into<Bytes>) -> Result<u64, GuestError> {
        let body = Full::new(data.into())
            .map_err(|e| match e {})
            .boxed_unsync();
        let written: StdinWritten = self
            .call_json(
                "write_stdin",
                Method::POST,
                format!("/processes/{pid}/stdin"),
                body,
            )
            .await?;
        Ok(written.written)
    }

    /// `POST /processes/{pid}/stdin`, streaming everything `reader` yields.
    pub async fn write_stdin_from<R>(&self, pid: u32, reader: R) -> Result<u64, GuestError>
    where
        R: AsyncRead + Send + 'static,
    {
        let written: StdinWritten = self
            .upload(
                "write_stdin",
                Method::POST,
                format!("/processes/{pid}/stdin"),
                ReaderStream::with_capacity(reader, UPLOAD_CHUNK),
            )
            .await?;
        Ok(written.written)
    }

    /// `POST /processes/{pid}/stdin/close` (for a PTY: sends end-of-file, ^D).
    pub async fn close_stdin(&self, pid: u32) -> Result<(), GuestError> {
        self.call_json::<serde_json::Value>(
            "close_stdin",
            Method::POST,
            format!("/processes/{pid}/stdin/close"),
            empty(),
        )
        .await
        .map(drop)
    }

    /// `POST /processes/{pid}/signal`.
    pub async fn signal(&self, pid: u32, req: &SignalRequest) -> Result<(), GuestError> {
        self.call_json::<serde_json::Value>(
            "signal",
            Method::POST,
            format!("/processes/{pid}/signal"),
            json_body(req),
        )
        .await
        .map(drop)
    }

    /// `POST /processes/{pid}/resize`.
    pub async fn resize_pty(&self, pid: u32, size: PtySize) -> Result<(), GuestError> {
        self.call_json::<serde_json::Value>(
            "resize_pty",
            Method::POST,
            format!("/processes/{pid}/resize"),
            json_body(&size),
        )
        .await
        .map(drop)
    }

    /// `GET /files`: the file's content as a stream; nothing is buffered
    /// beyond one network chunk.
    pub async fn read_file(
        &self,
        path: &str,
        user: Option<&UserSpec>,
    ) -> Result<FileContent, GuestError> {
        let op = "read_file";
        let pq = format!("/files?{}", query(&path_query(path, user)));
        let resp = self
            .deadline(op, self.send(op, Method::GET, pq, empty(), None))
            .await?;
        let size = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Ok(FileContent {
            addr: self.addr(),
            size,
            body: resp.into_body(),
        })
    }

    /// `PUT /files`: streams everything `reader` yields into `path`
    /// (atomically replaced on the guest).
    pub async fn write_file<R>(
        &self,
        path: &str,
        options: &WriteOptions,
        reader: R,
    ) -> Result<FileInfo, GuestError>
    where
        R: AsyncRead + Send + 'static,
    {
        self.write_file_stream(
            path,
            options,
            ReaderStream::with_capacity(reader, UPLOAD_CHUNK),
        )
        .await
    }

    /// `PUT /files` from a stream of chunks.
    pub async fn write_file_stream<S>(
        &self,
        path: &str,
        options: &WriteOptions,
        chunks: S,
    ) -> Result<FileInfo, GuestError>
    where
        S: Stream<Item = io::Result<Bytes>> + Send + 'static,
    {
        let q = WriteQuery {
            path: path.to_owned(),
            mode: options.mode.map(|m| format!("{m:o}")),
            parents: options.parents,
            user: options.user.as_ref().map(UserSpec::to_query_value),
        };
        self.upload(
            "write_file",
            Method::PUT,
            format!("/files?{}", query(&q)),
            chunks,
        )
        .await
    }

    /// `GET /files/stat`.
    pub async fn stat(&self, path: &str, user: Option<&UserSpec>) -> Result<FileInfo, GuestError> {
        let pq = format!("/files/stat?{}", query(&path_query(path, user)));
        self.call_json("stat", Method::GET, pq, empty()).await
    }

    /// `GET /files/list`.
    pub async fn list_dir(
        &self,
        path: &str,
        user: Option<&UserSpec>,
    ) -> Result<Vec<FileInfo>, GuestError> {
        let pq = format!("/files/list?{}", query(&path_query(path, user)));
        let listing: DirListing = self.call_json("list_dir", Method::GET, pq, empty()).await?;
        Ok(listing.entries)
    }

    /// `GET /files/watch`: changes under `path` as they happen, from when
    /// this returns (the agent's `started` line has arrived) until the
    /// stream is dropped. Needs [`crate::capability::FILES_WATCH`].
    pub async fn watch(
        &self,
        path: &str,
        recursive: bool,
        user: Option<&UserSpec>,
    ) -> Result<WatchEvents, GuestError> {
        let op = "watch";
        let q = WatchQuery {
            path: path.to_owned(),
            recursive,
            user: user.map(UserSpec::to_query_value),
        };
        let pq = format!("/files/watch?{}", query(&q));
        let call = async {
            let resp = self.send(op, Method::GET, pq, empty(), None).await?;
            let mut events = WatchEvents {
                addr: self.addr(),
                body: resp.into_body(),
                decoder: NdjsonDecoder::new(),
                finished: false,
            };
            match events.next().await {
                Some(Ok(WatchEvent {
                    kind: WatchEventKind::Started,
                    ..
                })) => Ok(events),
                Some(Ok(other)) => Err(GuestError::Malformed {
                    operation: op,
                    detail: format!("first watch event is not started: {other:?}"),
                }),
                Some(Err(e)) => Err(e),
                None => Err(GuestError::Malformed {
                    operation: op,
                    detail: "the watch stream ended before it started".into(),
                }),
            }
        };
        self.deadline(op, call).await
    }

    /// `POST /files/mkdir`.
    pub async fn mkdir(&self, req: &MkdirRequest) -> Result<FileInfo, GuestError> {
        self.call_json("mkdir", Method::POST, "/files/mkdir".into(), json_body(req))
            .await
    }

    /// `DELETE /files`.
    pub async fn remove(
        &self,
        path: &str,
        recursive: bool,
        user: Option<&UserSpec>,
    ) -> Result<(), GuestError> {
        let q = RemoveQuery {
            path: path.to_owned(),
            recursive,
            user: user.map(UserSpec::to_query_value),
        };
        let pq = format!("/files?{}", query(&q));
        self.call_json::<serde_json::Value>("remove", Method::DELETE, pq, empty())
            .await
            .map(drop)
    }

    /// `POST /files/rename`.
    pub async fn rename(&self, req: &RenameRequest) -> Result<FileInfo, GuestError> {
        self.call_json(
            "rename",
            Method::POST,
            "/files/rename".into(),
            json_body(req),
        )
        .await
    }

    // ---- plumbing ----

    async fn deadline<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, GuestError>>,
    ) -> Result<T, GuestError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(GuestError::Timeout {
                addr: self.addr(),
                operation,
                after: self.timeout,
            }),
        }
    }

    async fn call_json<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        method: Method,
        path_and_query: String,
        body: RequestBody,
    ) -> Result<T, GuestError> {
        self.deadline(operation, async {
            let resp = self
                .send(operation, method, path_and_query, body, Some(JSON))
                .await?;
            read_json(self.addr(), operation, resp).await
        })
        .await
    }

    /// Streams `chunks` as the request body. The timeout is the longest the
    /// upload may make no progress, then the longest wait for the answer.
    async fn upload<T, S>(
        &self,
        operation: &'static str,
        method: Method,
        path_and_query: String,
        chunks: S,
    ) -> Result<T, GuestError>
    where
        T: DeserializeOwned,
        S: Stream<Item = io::Result<Bytes>> + Send + 'static,
    {
        let progress = Arc::new(AtomicU64::new(0));
        let source_error: Arc<Mutex<Option<io::Error>>> = Arc::default();
        let chunks = {
            let progress = progress.clone();
            let source_error = source_error.clone();
            chunks.map(move |chunk| {
                progress.fetch_add(1, Ordering::Relaxed);
                chunk.map(Frame::data).map_err(|e| {
                    let message = e.to_string();
                    *source_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    BoxError::from(message)
                })
            })
        };
        let body = StreamBody::new(chunks).boxed_unsync();
        let call = async {
            let resp = self
                .send(operation, method, path_and_query, body, Some(OCTETS))
                .await?;
            read_json(self.addr(), operation, resp).await
        };
        tokio::pin!(call);
        let mut seen = 0;
        let result = loop {
            tokio::select! {
                result = &mut call => break result,
                () = tokio::time::sleep(self.timeout) => {
                    let now = progress.load(Ordering::Relaxed);
                    if now == seen {
                        break Err(GuestError::Timeout { addr: self.addr(), operation, after: self.timeout });
                    }
                    seen = now;
                }
            }
        };
        let source_failed = source_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match (result, source_failed) {
            (Err(_), Some(source)) => Err(GuestError::Source { operation, source }),
            (result, _) => result,
        }
    }

    /// Sends one request and returns the response if its status is a success;
    /// an error status becomes [`GuestError::Api`] (or `Malformed`).
    async fn send(
        &self,
        operation: &'static str,
        method: Method,
        path_and_query: String,
        body: RequestBody,
        content_type: Option<&'static str>,
    ) -> Result<Response<Incoming>, GuestError> {
        let addr = self.addr();
        let uri = format!("http://{addr}{path_and_query}");
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(ct) = content_type {
            builder = builder.header(header::CONTENT_TYPE, ct);
        }
        if let Some(token) = self.token() {
            let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                GuestError::Request {
                    operation,
                    detail: "the token contains characters not allowed in an HTTP header; use visible ASCII".into(),
                }
            })?;
            builder = builder.header(header::AUTHORIZATION, value);
        }
        let req = builder.body(body).map_err(|e| GuestError::Request {
            operation,
            detail: e.to_string(),
        })?;
        let resp = self.shared.http.request(req).await.map_err(|e| {
            if e.is_connect() {
                GuestError::Connect {
                    addr,
                    source: Box::new(e),
                }
            } else {
                GuestError::Disconnected {
                    addr,
                    operation,
                    source: Box::new(e),
                }
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(error_from_response(addr, operation, resp).await)
    }
}

const JSON: &str = "application/json";
const OCTETS: &str = "application/octet-stream";

fn empty() -> RequestBody {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

fn json_body<T: Serialize>(value: &T) -> RequestBody {
    let bytes = serde_json::to_vec(value).expect("wire types always serialise");
    Full::new(Bytes::from(bytes))
        .map_err(|e| match e {})
        .boxed_unsync()
}

fn query<T: Serialize>(q: &T) -> String {
    serde_urlencoded::to_string(q).expect("query types always encode")
}

fn path_query(path: &str, user: Option<&UserSpec>) -> PathQuery {
    PathQuery {
        path: path.to_owned(),
        user: user.map(UserSpec::to_query_value),
    }
}

async fn collect_limited(
    addr: SocketAddr,
    operation: &'static str,
    body: Incoming,
    limit: usize,
) -> Result<Bytes, GuestError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(GuestError::Malformed {
            operation,
            detail: format!("response larger than {limit} bytes"),
        }),
        Err(source) => Err(GuestError::Disconnected {
            addr,
            operation,
            source,
        }),
    }
}

async fn read_json<T: DeserializeOwned>(
    addr: SocketAddr,
    operation: &'static str,
    resp: Response<Incoming>,
) -> Result<T, GuestError> {
    let bytes = collect_limited(addr, operation, resp.into_body(), MAX_JSON_RESPONSE).await?;
    serde_json::from_slice(&bytes).map_err(|e| GuestError::Malformed {
        operation,
        detail: format!("bad JSON: {e}"),
    })
}

async fn error_from_response(
    addr: SocketAddr,
    operation: &'static str,
    resp: Response<Incoming>,
) -> GuestError {
    let status = resp.status();
    let bytes = match collect_limited(addr, operation, resp.into_body(), 1 << 20).await {
        Ok(bytes) => bytes,
        Err(e) => return e,
    };
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(body) => GuestError::Api {
            operation,
            status: status.as_u16(),
            code: body.code,
            message: body.message,
        },
        Err(_) => GuestError::Malformed {
            operation,
            detail: format!(
                "status {status} without an error body: {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ),
        },
    }
}

/// A process's event stream ([`EventRecord`]s in `seq` order), ending after
/// the `exit` event. Events of unknown types are skipped. If the connection
/// breaks first, the stream yields [`GuestError::Disconnected`]; reattach
/// with [`GuestClient::process_events`]`(pid, last_seq())`.
#[derive(Debug)]
pub struct ProcessEvents {
    addr: SocketAddr,
    pid: u32,
    body: Incoming,
    decoder: NdjsonDecoder,
    pending: VecDeque<EventRecord>,
    last_seq: u64,
    finished: bool,
}

impl ProcessEvents {
    fn new(addr: SocketAddr, pid: u32, body: Incoming) -> Self {
        ProcessEvents {
            addr,
            pid,
            body,
            decoder: NdjsonDecoder::new(),
            pending: VecDeque::new(),
            last_seq: 0,
            finished: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `seq` of the last event this stream yielded (or skipped).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Reads the stream to its end and gathers the output.
    pub async fn wait(mut self) -> Result<ProcessOutput, GuestError> {
        let mut out = ProcessOutput {
            pid: self.pid,
            stdout: Vec::new(),
            stderr: Vec::new(),
            exit: ProcessExit::default(),
            lost_events: 0,
        };
        while let Some(record) = self.next().await {
            match record?.event {
                ProcessEvent::Stdout { data } => out.stdout.extend_from_slice(&data),
                ProcessEvent::Stderr { data } => out.stderr.extend_from_slice(&data),
                ProcessEvent::Exit(exit) => {
                    out.exit = exit;
                    return Ok(out);
                }
                ProcessEvent::Lost { first_seq } => {
                    out.lost_events += self.last_seq + 1 - first_seq;
                }
                _ => {}
            }
        }
        Err(GuestError::Malformed {
            operation: "process events",
            detail: "stream ended without an exit event".into(),
        })
    }

    fn yield_record(&mut self, record: EventRecord) -> Option<EventRecord> {
        self.last_seq = self.last_seq.max(record.seq);
        match record.event {
            ProcessEvent::Unknown => None,
            ProcessEvent::Exit(_) => {
                self.finished = true;
                Some(record)
            }
            _ => Some(record),
        }
    }
}

impl Stream for ProcessEvents {
    type Item = Result<EventRecord, GuestError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(record) = this.pending.pop_front() {
            return Poll::Ready(Some(Ok(record)));
        }
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            match this.decoder.next_record() {
                Ok(Some(record)) => match this.yield_record(record) {
                    Some(record) => return Poll::Ready(Some(Ok(record))),
                    None => continue,
                },
                Ok(None) => {}
                Err(e) => {
                    this.finished = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        this.decoder.push(data);
                    }
                }
                Some(Err(e)) => {
                    this.finished = true;
                    return Poll::Ready(Some(Err(GuestError::Disconnected {
                        addr: this.addr,
                        operation: "process events",
                        source: Box::new(e),
                    })));
                }
                None => {
                    this.finished = true;
                    let err = match this.decoder.finish() {
                        Err(e) => e,
                        Ok(()) => GuestError::Disconnected {
                            addr: this.addr,
                            operation: "process events",
                            source: "the event stream ended before the exit event".into(),
                        },
                    };
                    return Poll::Ready(Some(Err(err)));
                }
            }
        }
    }
}

/// A directory watch's events ([`GuestClient::watch`]); dropping it ends
/// the watch in the guest.
#[derive(Debug)]
pub struct WatchEvents {
    addr: SocketAddr,
    body: Incoming,
    decoder: NdjsonDecoder,
    finished: bool,
}

impl Stream for WatchEvents {
    type Item = Result<WatchEvent, GuestError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            match this.decoder.next_line::<WatchEvent>() {
                Ok(Some(ev)) if ev.kind == WatchEventKind::Unknown => continue,
                Ok(Some(ev)) => return Poll::Ready(Some(Ok(ev))),
                Ok(None) => {}
                Err(e) => {
                    this.finished = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        this.decoder.push(data);
                    }
                }
                Some(Err(e)) => {
                    this.finished = true;
                    return Poll::Ready(Some(Err(GuestError::Disconnected {
                        addr: this.addr,
                        operation: "watch",
                        source: Box::new(e),
                    })));
                }
                None => {
                    this.finished = true;
                    return match this.decoder.finish() {
                        Err(e) => Poll::Ready(Some(Err(e))),
                        Ok(()) => Poll::Ready(None),
                    };
                }
            }
        }
    }
}

/// Everything a process printed, and how it ended ([`ProcessEvents::wait`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessOutput {
    pub pid: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: ProcessExit,
    /// Events that fell out of the agent's buffer before this reader got them.
    pub lost_events: u64,
}

/// The content of a file being read ([`GuestClient::read_file`]): a stream
/// of chunks, also usable as an `AsyncRead`.
#[derive(Debug)]
pub struct FileContent {
    addr: SocketAddr,
    size: Option<u64>,
    body: Incoming,
}

impl FileContent {
    /// The file's size as the agent announced it (`Content-Length`).
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    pub fn into_async_read(self) -> impl AsyncRead + Send + Unpin {
        StreamReader::new(self.map_err(io::Error::other))
    }
}

impl Stream for FileContent {
    type Item = Result<Bytes, GuestError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            return match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => Poll::Ready(Some(Ok(data))),
                    Err(_trailers) => continue,
                },
                Some(Err(e)) => Poll::Ready(Some(Err(GuestError::Disconnected {
                    addr: self.addr,
                    operation: "read_file",
                    source: Box::new(e),
                }))),
                None => Poll::Ready(None),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_and_streams_are_send() {
        fn is_send<T: Send>() {}
        is_send::<ProcessEvents>();
        is_send::<FileContent>();
        is_send::<GuestClient>();
    }
}
