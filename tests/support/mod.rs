//! Test support: a fake Entra v2.0 token endpoint, a fake upstream that
//! records each request as it went over the wire, the proxy started in
//! process on port 0, and raw HTTP/1.1 clients.

#![allow(dead_code, unreachable_pub)]

pub mod pki;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bearer_proxy::config::{Config, Flags};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

pub const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
pub const CLIENT_SECRET: &str = "Xy8Q~not-a-real-secret.value_42";

// ---------------------------------------------------------------- token endpoint

/// One answer of the fake token endpoint.
#[derive(Debug, Clone)]
pub enum TokenReply {
    /// Entra's success body with the next token (`token-N`) and this lifetime.
    Ok { expires_in: u64 },
    /// A status and a raw JSON body, plus extra headers.
    Raw {
        status: u16,
        body: String,
        headers: Vec<(String, String)>,
    },
}

impl TokenReply {
    /// Entra's 401 for a wrong secret (AADSTS7000215), as it really looks.
    pub fn invalid_secret() -> Self {
        Self::entra_error(
            401,
            "invalid_client",
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '11111111-2222-3333-4444-555555555555'.",
        )
    }

    /// An Entra error body.
    pub fn entra_error(status: u16, error: &str, code: u64, text: &str) -> Self {
        let body = serde_json::json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {text}\r\nTrace ID: 0d3ab8a6-8d4c-4e5b-a1c3-5d0a7c2f2b00\r\nCorrelation ID: 7c6f9a52-3b1e-4a8d-9c0e-2f4b6d8a1e33\r\nTimestamp: 2026-11-28 12:00:00Z"),
            "error_codes": [code],
            "timestamp": "2026-11-28 12:00:00Z",
            "trace_id": "0d3ab8a6-8d4c-4e5b-a1c3-5d0a7c2f2b00",
            "correlation_id": "7c6f9a52-3b1e-4a8d-9c0e-2f4b6d8a1e33",
            "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
        });
        Self::Raw {
            status,
            body: body.to_string(),
            headers: Vec::new(),
        }
    }
}

/// What the token endpoint received.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// When it arrived.
    pub at: std::time::Instant,
    pub path: String,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    pub form: HashMap<String, String>,
}

#[derive(Debug, Default)]
struct TokenInner {
    requests: Vec<TokenRequest>,
    /// Each token issued, with when its request arrived.
    issued_at: Vec<(String, std::time::Instant)>,
    down: bool,
    script: VecDeque<TokenReply>,
    issued: u32,
    delay: Duration,
    in_flight: u32,
    max_in_flight: u32,
}

/// A fake Entra v2.0 token endpoint on loopback.
#[derive(Debug, Clone)]
pub struct FakeTokenEndpoint {
    pub addr: SocketAddr,
    inner: Arc<Mutex<TokenInner>>,
}

impl FakeTokenEndpoint {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind token endpoint");
        Self::start_on(listener)
    }

    /// On a listener the test made: a provider that comes up late on a port
    /// the proxy was already told about.
    pub fn start_on(listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("local addr");
        let inner = Arc::new(Mutex::new(TokenInner::default()));
        let app = axum::Router::new()
            .route(
                "/{tenant}/oauth2/v2.0/token",
                axum::routing::post(token_handler),
            )
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, inner }
    }

    pub fn url(&self) -> String {
        format!("http://{}/test-tenant/oauth2/v2.0/token", self.addr)
    }

    /// Answers to give, in order; after them, success with 3599 s.
    pub fn script(&self, replies: impl IntoIterator<Item = TokenReply>) {
        self.lock().script.extend(replies);
    }

    /// Delay before each answer.
    pub fn delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// While down, every request gets Entra's 503 `temporarily_unavailable`.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    /// The tokens issued, with the time their request arrived.
    pub fn issued(&self) -> Vec<(String, std::time::Instant)> {
        self.lock().issued_at.clone()
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.lock().requests.clone()
    }

    pub fn count(&self) -> usize {
        self.lock().requests.len()
    }

    pub fn max_in_flight(&self) -> u32 {
        self.lock().max_in_flight
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TokenInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn token_handler(
    State(inner): State<Arc<Mutex<TokenInner>>>,
    axum::extract::Path(tenant): axum::extract::Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let (reply, delay) = {
        let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.requests.push(TokenRequest {
            at: std::time::Instant::now(),
            path: format!("/{tenant}/oauth2/v2.0/token"),
            content_type: header("content-type"),
            authorization: header("authorization"),
            form,
        });
        inner.in_flight += 1;
        inner.max_in_flight = inner.max_in_flight.max(inner.in_flight);
        let reply = if inner.down {
            TokenReply::entra_error(
                503,
                "temporarily_unavailable",
                50196,
                "The service is temporarily unavailable.",
            )
        } else {
            inner
                .script
                .pop_front()
                .unwrap_or(TokenReply::Ok { expires_in: 3599 })
        };
        (reply, inner.delay)
    };
    tokio::time::sleep(delay).await;
    let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
    inner.in_flight -= 1;
    match reply {
        TokenReply::Ok { expires_in } => {
            inner.issued += 1;
            let name = format!("token-{}", inner.issued);
            let arrived = inner
                .requests
                .last()
                .map_or_else(std::time::Instant::now, |r| r.at);
            inner.issued_at.push((name, arrived));
            let body = serde_json::json!({
                "token_type": "Bearer",
                "expires_in": expires_in,
                "ext_expires_in": expires_in,
                "access_token": format!("token-{}", inner.issued),
            });
            (
                [("content-type", "application/json; charset=utf-8")],
                body.to_string(),
            )
                .into_response()
        }
        TokenReply::Raw {
            status,
            body,
            headers,
        } => {
            let mut response = (
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                [("content-type", "application/json; charset=utf-8")],
                body,
            )
                .into_response();
            for (name, value) in headers {
                if let (Ok(name), Ok(value)) = (
                    axum::http::HeaderName::from_bytes(name.as_bytes()),
                    axum::http::HeaderValue::from_str(&value),
                ) {
                    response.headers_mut().insert(name, value);
                }
            }
            response
        }
    }
}

// ---------------------------------------------------------------- managed identity

/// What the fake identity endpoint received.
#[derive(Debug, Clone)]
pub struct IdentityRequest {
    pub method: String,
    pub path: String,
    pub query: HashMap<String, String>,
    pub headers: HeaderMap,
}

/// A scripted answer: status, body, headers.
pub type Scripted = (u16, String, Vec<(&'static str, &'static str)>);

/// A fake managed identity endpoint (IMDS or App Service's): answers from
/// a script, then a token.
#[derive(Clone)]
pub struct FakeIdentity {
    pub addr: std::net::SocketAddr,
    requests: Arc<Mutex<Vec<IdentityRequest>>>,
    pub script: Arc<Mutex<VecDeque<Scripted>>>,
}

impl FakeIdentity {
    pub async fn start(success: String) -> Result<Self, std::io::Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let fake = FakeIdentity {
            addr: listener.local_addr()?,
            requests: Arc::default(),
            script: Arc::default(),
        };
        let state = fake.clone();
        let app = axum::Router::new().fallback(
            move |method: axum::http::Method, uri: axum::http::Uri, headers: HeaderMap| {
                let state = state.clone();
                let success = success.clone();
                async move {
                    let query = form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
                        .into_owned()
                        .collect();
                    state
                        .requests
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(IdentityRequest {
                            method: method.to_string(),
                            path: uri.path().to_owned(),
                            query,
                            headers,
                        });
                    let next = state
                        .script
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .pop_front();
                    let (status, body, headers) = next.unwrap_or((200, success, Vec::new()));
                    let mut response = (
                        axum::http::StatusCode::from_u16(status)
                            .unwrap_or(axum::http::StatusCode::OK),
                        [("content-type", "application/json; charset=utf-8")],
                        body,
                    )
                        .into_response();
                    for (name, value) in headers {
                        if let Ok(value) = axum::http::HeaderValue::from_str(value) {
                            response.headers_mut().insert(name, value);
                        }
                    }
                    response
                }
            },
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(fake)
    }

    pub fn requests(&self) -> Vec<IdentityRequest> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

// ---------------------------------------------------------------- upstream

/// A request as the fake upstream read it off the socket.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    /// When its head had been read.
    pub at: Option<std::time::Instant>,
    pub method: String,
    /// The request target, byte for byte.
    pub target: Vec<u8>,
    pub version: u8,
    /// Headers in the order they arrived, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body, up to [`KEEP_BODY`] bytes.
    pub body: Vec<u8>,
    pub body_len: u64,
    pub chunked: bool,
}

/// Bodies longer than this are counted, not kept.
pub const KEEP_BODY: usize = 4 * 1024 * 1024;

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn target_str(&self) -> String {
        String::from_utf8_lossy(&self.target).into_owned()
    }

    /// The token the request carried: its `Authorization` value without
    /// `Bearer ` (empty without one).
    pub fn bearer(&self) -> &str {
        self.header("authorization")
            .unwrap_or_default()
            .trim_start_matches("Bearer ")
    }
}

/// How the fake upstream answers.
#[derive(Debug)]
pub enum Body {
    Bytes(Vec<u8>),
    /// Chunked, each message from the channel one chunk.
    Stream(mpsc::Receiver<Vec<u8>>),
    /// `Content-Length: len` of zeros, written in 64 KiB pieces.
    Zeros(u64),
    /// Declares `declared` bytes, sends `sent`, then closes the connection.
    Truncated {
        declared: usize,
        sent: Vec<u8>,
    },
    /// Never answers.
    Hang,
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

impl Reply {
    pub fn ok(body: &str) -> Self {
        Self {
            status: 200,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: Body::Bytes(body.as_bytes().to_vec()),
        }
    }

    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Body::Bytes(Vec::new()),
        }
    }

    /// A 200 with no headers and this body.
    pub fn with_body(body: Body) -> Self {
        Self {
            status: 200,
            headers: Vec::new(),
            body,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

type Responder = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

#[derive(Default)]
struct UpstreamInner {
    requests: Vec<Recorded>,
}

/// A fake upstream: raw HTTP/1.1 over loopback, keep-alive, chunked bodies.
#[derive(Clone)]
pub struct FakeUpstream {
    pub addr: SocketAddr,
    inner: Arc<Mutex<UpstreamInner>>,
    /// Body bytes received so far for the request being read.
    pub progress: watch::Receiver<u64>,
    connections: Arc<Mutex<u32>>,
}

impl FakeUpstream {
    /// Answers every request with 200 "ok".
    pub async fn start() -> Self {
        Self::with(|_| Reply::ok("ok")).await
    }

    pub async fn with(responder: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("local addr");
        let inner = Arc::new(Mutex::new(UpstreamInner::default()));
        let (progress_tx, progress) = watch::channel(0u64);
        let progress_tx = Arc::new(progress_tx);
        let responder: Responder = Arc::new(responder);
        let connections = Arc::new(Mutex::new(0));
        let (state, conns) = (inner.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // Head and body go out in two writes: without this, Nagle's
                // algorithm and delayed ACKs add 40 ms to every answer.
                let _ = stream.set_nodelay(true);
                *conns.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                let (state, responder, progress) =
                    (state.clone(), responder.clone(), progress_tx.clone());
                tokio::spawn(async move {
                    let _ = serve_raw(stream, state, responder, progress).await;
                });
            }
        });
        Self {
            addr,
            inner,
            progress,
            connections,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requests
            .clone()
    }

    pub fn last(&self) -> Recorded {
        self.requests()
            .pop()
            .expect("the upstream received a request")
    }

    pub fn connections(&self) -> u32 {
        *self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn serve_raw(
    stream: TcpStream,
    state: Arc<Mutex<UpstreamInner>>,
    responder: Responder,
    progress: Arc<watch::Sender<u64>>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut head = Vec::new();
        loop {
            let n = read.read_until(b'\n', &mut head).await?;
            if n == 0 {
                return Ok(());
            }
            if head == b"\r\n" {
                head.clear();
            } else if head.ends_with(b"\r\n\r\n") {
                break;
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 256];
        let mut parsed = httparse::Request::new(&mut headers);
        if parsed
            .parse(&head)
            .map_err(std::io::Error::other)?
            .is_partial()
        {
            return Err(std::io::Error::other("partial head"));
        }
        // httparse gives the target as &str; take the raw bytes from the head.
        let method = parsed.method.unwrap_or_default().to_owned();
        let first_line = head.split(|b| *b == b'\r').next().unwrap_or_default();
        let target = first_line
            .splitn(3, |b| *b == b' ')
            .nth(1)
            .unwrap_or_default()
            .to_vec();
        let mut recorded = Recorded {
            at: Some(std::time::Instant::now()),
            method,
            target,
            version: parsed.version.unwrap_or(1),
            headers: lower_headers(parsed.headers),
            ..Recorded::default()
        };
        let _ = progress.send(0);
        let length = recorded
            .header("content-length")
            .and_then(|v| v.parse::<u64>().ok());
        recorded.chunked = recorded
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"));
        if recorded.chunked {
            loop {
                let mut size_line = String::new();
                read.read_line(&mut size_line).await?;
                let size =
                    u64::from_str_radix(size_line.trim().split(';').next().unwrap_or("0"), 16)
                        .map_err(std::io::Error::other)?;
                if size == 0 {
                    // Trailers, then the empty line.
                    loop {
                        let mut line = String::new();
                        read.read_line(&mut line).await?;
                        if line == "\r\n" || line.is_empty() {
                            break;
                        }
                    }
                    break;
                }
                if !read_body(&mut read, size, &mut recorded, &progress).await? {
                    return Ok(());
                }
                let mut crlf = [0u8; 2];
                read.read_exact(&mut crlf).await?;
            }
        } else if let Some(length) = length {
            if !read_body(&mut read, length, &mut recorded, &progress).await? {
                return Ok(());
            }
        }
        let reply = responder(&recorded);
        let head_only = recorded.method == "HEAD";
        state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requests
            .push(recorded);

        let mut out = format!("HTTP/1.1 {} X\r\n", reply.status);
        for (name, value) in &reply.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        match reply.body {
            Body::Bytes(bytes) => {
                if !reply
                    .headers
                    .iter()
                    .any(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                {
                    out.push_str(&format!("content-length: {}\r\n", bytes.len()));
                }
                out.push_str("\r\n");
                write.write_all(out.as_bytes()).await?;
                if !head_only {
                    write.write_all(&bytes).await?;
                }
            }
            Body::Stream(mut rx) => {
                out.push_str("transfer-encoding: chunked\r\n\r\n");
                write.write_all(out.as_bytes()).await?;
                while let Some(chunk) = rx.recv().await {
                    write
                        .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                        .await?;
                    write.write_all(&chunk).await?;
                    write.write_all(b"\r\n").await?;
                    write.flush().await?;
                }
                write.write_all(b"0\r\n\r\n").await?;
            }
            Body::Zeros(len) => {
                out.push_str(&format!("content-length: {len}\r\n\r\n"));
                write.write_all(out.as_bytes()).await?;
                let zeros = vec![0u8; 64 * 1024];
                let mut left = len;
                while left > 0 {
                    let n = (left as usize).min(zeros.len());
                    write.write_all(&zeros[..n]).await?;
                    left -= n as u64;
                }
            }
            Body::Truncated { declared, sent } => {
                out.push_str(&format!("content-length: {declared}\r\n\r\n"));
                write.write_all(out.as_bytes()).await?;
                write.write_all(&sent).await?;
                write.flush().await?;
                return Ok(());
            }
            Body::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return Ok(());
            }
        }
        write.flush().await?;
    }
}

// ---------------------------------------------------------------- the proxy

/// The proxy running in this process on port 0.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), bearer_proxy::RunError>>,
}

impl Proxy {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The admin `/status` document, fetched with a new client.
    pub async fn status(&self) -> reqwest::Result<serde_json::Value> {
        http1()
            .get(self.admin_url("/status"))
            .send()
            .await?
            .json()
            .await
    }
}

/// The environment that points the proxy at the fakes, plus `extra`.
pub fn env_for(
    token: &FakeTokenEndpoint,
    upstream_url: &str,
    extra: &[(&str, &str)],
) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = [
        ("API_CLIENT_ID", CLIENT_ID.to_owned()),
        ("API_CLIENT_SECRET", CLIENT_SECRET.to_owned()),
        ("API_TOKEN_URL", token.url()),
        ("API_SCOPE", "api://test-upstream/.default".to_owned()),
        ("BEARER_PROXY_UPSTREAM", upstream_url.to_owned()),
        ("BEARER_PROXY_SHUTDOWN_GRACE", "5s".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (k, v) in extra {
        env.insert((*k).to_owned(), (*v).to_owned());
    }
    env
}

/// Starts the proxy against the fakes.
pub async fn start_proxy(
    token: &FakeTokenEndpoint,
    upstream_url: &str,
    extra: &[(&str, &str)],
) -> Proxy {
    let env = env_for(token, upstream_url, extra);
    let config = Config::load(&Flags::default(), &env).expect("valid test config");
    let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let (addr, admin_addr) = (
        proxy.local_addr().expect("addr"),
        admin.local_addr().expect("addr"),
    );
    let shutdown = CancellationToken::new();
    let listeners = bearer_proxy::Listeners {
        proxy: proxy.into(),
        admin,
    };
    let task = tokio::spawn(bearer_proxy::run(config, listeners, shutdown.clone()));
    Proxy {
        addr,
        admin: admin_addr,
        shutdown,
        task,
    }
}

/// The usual setup: a fake token endpoint, a fake upstream, and the proxy
/// in front of it with `extra` settings, ready (a token held).
pub async fn ready_proxy(extra: &[(&str, &str)]) -> (FakeTokenEndpoint, FakeUpstream, Proxy) {
    let upstream = FakeUpstream::start().await;
    let (token, proxy) = ready_proxy_to(&upstream.url(), extra).await;
    (token, upstream, proxy)
}

/// A fake token endpoint and the proxy in front of `upstream_url` (an
/// upstream the test made) with `extra` settings, started but not waited on.
pub async fn proxy_to(upstream_url: &str, extra: &[(&str, &str)]) -> (FakeTokenEndpoint, Proxy) {
    let token = FakeTokenEndpoint::start().await;
    let proxy = start_proxy(&token, upstream_url, extra).await;
    (token, proxy)
}

/// [`proxy_to`], ready (a token held).
pub async fn ready_proxy_to(
    upstream_url: &str,
    extra: &[(&str, &str)],
) -> (FakeTokenEndpoint, Proxy) {
    let (token, proxy) = proxy_to(upstream_url, extra).await;
    wait_ready(&proxy).await;
    (token, proxy)
}

/// A fake upstream (200 "ok") and the proxy in front of it, getting its
/// tokens from `token` (a token endpoint the test set up), with `extra`
/// settings, started but not waited on.
pub async fn proxy_with_token(
    token: &FakeTokenEndpoint,
    extra: &[(&str, &str)],
) -> (FakeUpstream, Proxy) {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(token, &upstream.url(), extra).await;
    (upstream, proxy)
}

/// The admin route `path`'s body, after checking that it answered 200
/// with `content_type`.
pub async fn admin_text(
    proxy: &Proxy,
    path: &str,
    content_type: &str,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let response = http1().get(proxy.admin_url(path)).send().await?;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some(content_type)
    );
    Ok(response.text().await?)
}

/// Asserts that `response` is the proxy's own refusal: `status`, with
/// `code` in `X-Bearer-Proxy-Error`.
#[track_caller]
pub fn assert_proxy_error(response: &reqwest::Response, status: u16, code: &str) {
    assert_eq!(response.status(), status);
    assert_eq!(response.headers()["x-bearer-proxy-error"], code);
}

/// Asserts that the text at `json[field]` contains `part`; a failure shows
/// the whole of `json`.
#[track_caller]
pub fn assert_text_contains(json: &serde_json::Value, field: &str, part: &str) {
    assert!(
        json[field].as_str().unwrap_or_default().contains(part),
        "{json}"
    );
}

/// Polls `condition` every 10 ms for up to 5 s; an error names what never came.
pub async fn until(condition: impl Fn() -> bool, what: &str) -> Result<(), String> {
    for _ in 0..500 {
        if condition() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!("timed out waiting for {what}"))
}

/// Waits until `/readyz` answers 200 (a token is held).
pub async fn wait_ready(proxy: &Proxy) {
    let client = http1();
    for _ in 0..200 {
        if let Ok(r) = client.get(proxy.admin_url("/readyz")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the proxy never became ready");
}

/// An HTTP/1.1 client: no redirects, no environment proxy.
pub fn http1() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .expect("client")
}

/// An HTTP/2 client with prior knowledge (h2c).
pub fn h2c() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .expect("client")
}

/// A raw HTTP/1.1 exchange: writes `request` as is, reads the whole answer
/// (the request should carry `Connection: close`).
pub async fn raw(addr: SocketAddr, request: &[u8]) -> std::io::Result<RawResponse> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await?;
    RawResponse::parse(&bytes)
}

/// Writes `request` on a new connection and reads until the other side
/// closes it (at most 5 s): the bytes as they came, for answers that `raw`
/// does not parse as one.
pub async fn exchange(
    addr: SocketAddr,
    request: &[u8],
) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut bytes)).await??;
    Ok(bytes)
}

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Parses the final response, skipping interim (1xx) ones.
    pub fn parse(bytes: &[u8]) -> std::io::Result<Self> {
        let mut bytes = bytes;
        loop {
            let response = Self::parse_one(bytes)?;
            let consumed = bytes.len() - response.body.len();
            if !(100..200).contains(&response.status) || consumed >= bytes.len() {
                return Ok(response);
            }
            bytes = &bytes[consumed..];
        }
    }

    fn parse_one(bytes: &[u8]) -> std::io::Result<Self> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let status = response.parse(bytes).map_err(std::io::Error::other)?;
        let httparse::Status::Complete(len) = status else {
            return Err(std::io::Error::other("incomplete response"));
        };
        Ok(Self {
            status: response.code.unwrap_or(0),
            headers: lower_headers(response.headers),
            body: bytes[len..].to_vec(),
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads `len` body bytes, keeping up to [`KEEP_BODY`] of them and
/// publishing the count as it grows; `false` if the peer closed first.
async fn read_body(
    read: &mut (impl tokio::io::AsyncRead + Unpin),
    len: u64,
    recorded: &mut Recorded,
    progress: &watch::Sender<u64>,
) -> std::io::Result<bool> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let want = (left as usize).min(buf.len());
        let n = read.read(&mut buf[..want]).await?;
        if n == 0 {
            return Ok(false);
        }
        let data = &buf[..n];
        if recorded.body.len() < KEEP_BODY {
            let room = KEEP_BODY - recorded.body.len();
            recorded
                .body
                .extend_from_slice(&data[..data.len().min(room)]);
        }
        recorded.body_len += n as u64;
        let _ = progress.send(recorded.body_len);
        left -= n as u64;
    }
    Ok(true)
}

/// A loopback port on which nothing listens, held so that no other test
/// takes it while this one expects "connection refused".
pub fn closed_port() -> std::io::Result<(tokio::net::TcpSocket, SocketAddr)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse().map_err(std::io::Error::other)?)?;
    let addr = socket.local_addr()?;
    Ok((socket, addr))
}

/// Header names lower-cased, values as text, in wire order.
fn lower_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// A request body fed from a channel, one message a chunk: the test decides
/// when each piece is sent.
pub fn channel_body(rx: mpsc::Receiver<Result<Vec<u8>, std::io::Error>>) -> reqwest::Body {
    struct Rx(mpsc::Receiver<Result<Vec<u8>, std::io::Error>>);
    impl futures_core::Stream for Rx {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            self.0.poll_recv(cx)
        }
    }
    reqwest::Body::wrap_stream(Rx(rx))
}

/// A hand-written upstream for behaviour the fake does not have: for each
/// connection, reads one request head and hands the stream and the head to
/// `answer`. Returns its address and the count of connections accepted.
pub async fn raw_upstream<F, Fut>(
    answer: F,
) -> std::io::Result<(SocketAddr, Arc<std::sync::atomic::AtomicUsize>)>
where
    F: Fn(TcpStream, Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (counter, answer) = (accepted.clone(), Arc::new(answer));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                answer(stream, head).await;
            });
        }
    });
    Ok((addr, accepted))
}

/// A `raw_upstream` that writes `answer` on each connection, whatever was
/// asked, and closes it.
pub async fn answering(
    answer: &'static [u8],
) -> std::io::Result<(SocketAddr, Arc<std::sync::atomic::AtomicUsize>)> {
    raw_upstream(move |mut stream, _head| async move {
        let _ = stream.write_all(answer).await;
    })
    .await
}

/// A server process that a test runs (nginx, hypercorn), in a process
/// group of its own: dropping it ends the group, its workers too, which
/// killing the first process alone would leave running.
pub struct Daemon(std::process::Child);

impl Daemon {
    pub fn spawn(command: &mut std::process::Command) -> std::io::Result<Self> {
        use std::os::unix::process::CommandExt;
        command
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .spawn()
            .map(Self)
    }
}

impl Daemon {
    /// The process's stdout, when it was piped (once).
    pub fn stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.0.stdout.take()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.0.wait();
    }
}
