//! The upstream: its client, connections over rustls with one deadline
//! around the whole connect (TCP and TLS handshake), HTTP/2 by ALPN
//! (unless `upstream.http2` is off: then `http/1.1` alone is offered). Over
//! HTTP/1.1 every request, with a body or without, goes by [`conn`] on one
//! pool; over HTTP/2, by hyper's client on one shared connection. Its
//! failures are put in words here ([`describe_upstream_error`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::{Arc, Mutex};

use http::header::{CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::{Method, Request, Response, Uri};
use http_body::Body as _;
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use bytes::Bytes;
use http::uri::Authority;
use http_body_util::Full;
use tokio::time::Instant;

use crate::http1::field::CONTENT_LENGTH;
use crate::http1::{self, FieldValues, ResponseHead, WriteFields};
use crate::metrics::{Protocol, Shard, UpstreamFailure};
use crate::reply::ErrorCode;

pub mod body;
pub mod conn;

use body::TrackedBody;
use conn::{BodyFraming, Conn, DirectBody, ExchangeError, Rest, UploadBody};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How many times a request goes on shared HTTP/2 connections that do
/// not process it, before it gets a connection of its own.
const H2_ATTEMPTS: u32 = 3;

/// How long an idle pooled connection to the upstream is kept: less than
/// the idle limits common upstreams keep (nginx 75 s, cloud load balancers
/// 60 s), so that the proxy, not the upstream, closes it, never under a
/// request just sent. A warm one is opened in its place ([`Upstream::keep_warm`]).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// While streams are open, an HTTP/2 connection is pinged this often, and
/// closed when no answer comes within `H2_PING_TIMEOUT`. Idle, it is not
/// pinged (servers may count pings without streams as abuse): it is
/// replaced after `WARM_REFRESH` instead.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// A warm connection idle this long is replaced by a new one (opened
/// first): before nginx closes an unused HTTP/2 connection (60 s) or an
/// idle one (75 s), and before this pool's own limit.
const WARM_REFRESH: Duration = Duration::from_secs(40);
/// How often idle upstream connections are checked for expiry.
const POOL_SWEEP: Duration = Duration::from_secs(15);
/// TCP keepalive on upstream connections, so dead peers are noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// The connect deadline passed: named so the proxy can answer 504, not 502.
#[derive(Debug, thiserror::Error)]
#[error("connecting to the upstream took longer than {}", humantime::format_duration(*.0))]
pub struct ConnectTimeout(pub Duration);

/// Wraps a connector so that TCP connect and TLS handshake share one deadline.
#[derive(Debug, Clone)]
pub struct TimeoutConnector<C> {
    inner: C,
    timeout: Duration,
}

impl<C> tower::Service<Uri> for TimeoutConnector<C>
where
    C: tower::Service<Uri> + Send,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.timeout;
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(Box::new(ConnectTimeout(timeout)) as BoxError),
            }
        })
    }
}

/// The connector type of the upstream client.
pub type Connector = TimeoutConnector<HttpsConnector<crate::egress::EgressConnector>>;

/// A connection to the upstream, as `conn` reads and writes it.
pub type Io = TokioIo<<Connector as tower::Service<Uri>>::Response>;

/// An upstream answer's body: from hyper's client (HTTP/2), or read by `conn`.
pub type UpstreamBody = Either<Incoming, DirectBody<Io>>;

/// The body sent upstream: the client's stream, or a body held back for replay.
pub type OutBody = Either<TrackedBody<Incoming>, Full<Bytes>>;

/// What the upstream answered.
#[derive(Debug)]
pub struct Answer {
    /// Its head: over HTTP/1.1 without a body, the fields as they arrived.
    pub head: ResponseHead,
    pub body: UpstreamBody,
    /// After `101 Switching Protocols` to an upgrade that was asked for:
    /// the connection, which now speaks the new protocol.
    pub switched: Option<Switched>,
}

impl Answer {
    fn hyper(response: Response<Incoming>) -> Self {
        let (parts, body) = response.into_parts();
        Self {
            head: ResponseHead::from_parts(parts),
            body: Either::Left(body),
            switched: None,
        }
    }
}

/// An upstream connection that switched protocols.
#[derive(Debug)]
pub struct Switched(Box<Conn<Io>>);

impl Switched {
    /// The connection, the bytes of the new protocol that came with the
    /// answer's head, and what counts the connection open in the metrics
    /// (to be kept as long as the connection).
    pub fn into_parts(self) -> (Io, Bytes, Option<crate::metrics::Open>) {
        let Self(mut conn) = self;
        let counted = conn.take_counted();
        let (io, early) = (*conn).into_parts();
        (io, early, counted)
    }
}

/// An upgrade cannot be asked for over HTTP/2 (RFC 9113 §8.2.2).
fn no_upgrade_over_h2() -> UpstreamError {
    UpstreamError::Request(
        "the upstream speaks HTTP/2, over which a connection cannot be upgraded (WebSocket over HTTP/2, RFC 8441, is not supported)"
            .into(),
    )
}

/// A worker's connections to the upstream: one pool of HTTP/1.1
/// connections for every request, with a body or without, kept idle in a
/// stack (the most recently used first, so few stay warm), each carrying
/// one request at a time; an HTTP/2 connection (by ALPN) is shared by
/// every request. A connection's task runs on the runtime that opened it,
/// which is the worker's.
#[derive(Debug)]
pub struct Upstream {
    connector: Connector,
    /// `scheme://authority/`: what the connector dials.
    origin: Uri,
    /// The HTTP/2 connection, if the upstream chose HTTP/2.
    h2: Arc<Mutex<H2>>,
    /// Idle HTTP/1.1 connections.
    idle: Arc<conn::Idle<Io>>,
    /// Where open connections are counted.
    metrics: Option<Arc<Shard>>,
    /// Held by the one request that opens a new HTTP/2 connection.
    h2_opening: tokio::sync::Mutex<()>,
    /// Connections being opened now, by requests or to keep one warm.
    connecting: Arc<std::sync::atomic::AtomicUsize>,
    /// Held while a warm HTTP/1.1 connection is opened: a request that
    /// finds no idle connection meanwhile races it with one of its own.
    warming: tokio::sync::Mutex<()>,
    /// HTTP/1.1 connections out of the pool with a request (not tunnels).
    busy: Arc<std::sync::atomic::AtomicUsize>,
}

#[derive(Debug, Default)]
struct H2 {
    sender: Option<http2::SendRequest<OutBody>>,
    /// Counts the connections that have been shared, so that a request
    /// that failed on one forgets that one, not its successor.
    generation: u64,
    /// The upstream chose HTTP/2 for its latest connection.
    known: bool,
    /// When a request last took the shared connection (or it was opened).
    last_used: Option<Instant>,
    /// Whether a task closes connections idle for `POOL_IDLE_TIMEOUT`.
    sweeping: bool,
}

impl H2 {
    /// `sender`'s connection is the shared one from now on: a new
    /// generation, so that failures on the one before forget only that one.
    fn share(&mut self, sender: http2::SendRequest<OutBody>) {
        self.sender = Some(sender);
        self.generation += 1;
        self.last_used = Some(Instant::now());
    }
}

/// Why the upstream gave no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection: DNS, TCP, the TLS handshake, a forward proxy, or the
    /// connect deadline.
    #[error("cannot connect: {0}")]
    Connect(BoxError),
    /// The request failed on an established connection.
    #[error("the request failed: {0}")]
    Request(#[source] BoxError),
}

impl UpstreamError {
    /// What went wrong, under the kind of failure.
    fn cause(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            Self::Connect(cause) | Self::Request(cause) => cause.as_ref(),
        }
    }

    /// An answer whose header fields a header map refuses.
    pub fn invalid_answer(message: String) -> Self {
        Self::Request(ExchangeError::Invalid(message).into())
    }
}

/// A new connection: HTTP/2 (handshake done, shared from now on), or a
/// transport for HTTP/1.1.
enum Connected<B, T = Io> {
    H2(http2::SendRequest<B>),
    H1(T),
}

impl Upstream {
    /// Connections to `origin` (only its scheme and authority count).
    /// Over TLS, ALPN offers `h2` and `http/1.1` when `http2`, else
    /// `http/1.1` alone (by name, as `curl --http1.1` does, so that a
    /// server or balancer that routes by ALPN sees what is asked).
    pub fn new(
        mut tls: rustls::ClientConfig,
        connect_timeout: Duration,
        proxies: &crate::egress::Proxies,
        origin: Uri,
        http2: bool,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_keepalive(Some(TCP_KEEPALIVE));
        let http = crate::egress::EgressConnector::new(http, proxies);
        let https = if http2 {
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .wrap_connector(http)
        } else {
            // The builder would offer no ALPN at all for HTTP/1.1 alone
            // (and refuses a config that has its own); `from` is its
            // https_or_http connector with the config as it is.
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            hyper_rustls::HttpsConnector::from((http, tls))
        };
        let connector = TimeoutConnector {
            inner: https,
            timeout: connect_timeout,
        };
        Self::from_connector(connector, origin)
    }

    /// The same upstream with a pool of its own, for another worker: the
    /// connector (and its TLS settings) is shared, the connections are not.
    #[must_use]
    pub fn with_own_pool(&self) -> Self {
        Self::from_connector(self.connector.clone(), self.origin.clone())
    }

    fn from_connector(connector: Connector, origin: Uri) -> Self {
        Self {
            connector,
            origin,
            h2: Arc::default(),
            idle: Arc::default(),
            metrics: None,
            h2_opening: tokio::sync::Mutex::new(()),
            connecting: Arc::default(),
            warming: tokio::sync::Mutex::new(()),
            busy: Arc::default(),
        }
    }

    /// Counts its open connections, by protocol, in `shard`.
    #[must_use]
    pub fn counted(mut self, shard: &Arc<Shard>) -> Self {
        self.metrics = Some(Arc::clone(shard));
        self
    }

    /// A new HTTP/1.1 connection for the pool: counted open, and swept
    /// when idle too long.
    fn new_h1(&self, io: Io) -> Box<Conn<Io>> {
        self.start_sweeping();
        Conn::new(io).counted(self.count(Protocol::Http1))
    }

    fn count(&self, protocol: Protocol) -> Option<crate::metrics::Open> {
        self.metrics
            .as_ref()
            .map(|shard| shard.upstream_connection(protocol))
    }

    /// Sends `request` (its URI absolute, its Host header set) on a pooled
    /// connection or a new one. A request that a reused connection closed
    /// before taking is sent once more on a new connection.
    pub async fn request(&self, request: Request<OutBody>) -> Result<Answer, UpstreamError> {
        if self.speaks_h2() {
            return self.via_h2(request).await;
        }
        let (head, body) = request.into_parts();
        if body.is_end_stream() {
            return self
                .request_direct(&head.method, &head.uri, &head.headers, false)
                .await;
        }
        // Boxed: streaming a body is the rarer path, and its future large.
        Box::pin(self.request_with_body(head, body)).await
    }

    /// Over the shared HTTP/2 connection, boxed: hyper's futures are
    /// large, and every request would otherwise carry their size. A
    /// request that the connection did not take, or did not process (see
    /// [`may_send_again`]), is sent again: on the shared connection, or
    /// the one that replaces it, at most [`H2_ATTEMPTS`] times in all,
    /// then on a connection of its own. Only a request whose body is held
    /// can be: a streamed body has gone.
    async fn via_h2(&self, mut request: Request<OutBody>) -> Result<Answer, UpstreamError> {
        let method = request.method().clone();
        for attempt in 1..=H2_ATTEMPTS {
            let Some((generation, mut sender)) = self.shared_or_new_h2().await? else {
                // The upstream speaks HTTP/1.1 now.
                break;
            };
            let again = replica(&request);
            let mut error = match Box::pin(sender.try_send_request(for_h2(request))).await {
                Ok(response) => return Ok(Answer::hyper(response)),
                Err(error) => error,
            };
            let unsent = error.take_message();
            let error = error.into_error();
            if sender.is_closed()
                || crate::error_chain::find::<h2::Error>(&error).is_some_and(h2::Error::is_go_away)
            {
                self.forget_h2(generation);
            }
            request = match unsent {
                Some(mut unsent) => {
                    restore_host(&mut unsent);
                    unsent
                }
                None => match again.filter(|_| may_send_again(&error, &method)) {
                    Some(again) => again,
                    None => return Err(UpstreamError::Request(error.into())),
                },
            };
            tracing::debug!(%error, attempt, "the upstream's HTTP/2 connection did not process a request: sending it again");
        }
        // On a connection of its own, whatever it speaks.
        Box::pin(self.request_fresh(request)).await
    }

    /// The shared HTTP/2 connection; when there is none, a new one, which
    /// one request opens while the others wait for it (after a GOAWAY,
    /// each request in flight would otherwise open its own). `None` when
    /// the new connection speaks HTTP/1.1: it waits in the idle pool.
    async fn shared_or_new_h2(
        &self,
    ) -> Result<Option<(u64, http2::SendRequest<OutBody>)>, UpstreamError> {
        if let Some(shared) = self.shared_h2() {
            return Ok(Some(shared));
        }
        let _opening = self.h2_opening.lock().await;
        if let Some(shared) = self.shared_h2() {
            return Ok(Some(shared));
        }
        match Box::pin(self.connect()).await? {
            // Shared by `connect`.
            Connected::H2(_) => Ok(self.shared_h2()),
            Connected::H1(io) => {
                let conn = self.new_h1(io);
                if let Ok(mut idle) = self.idle.lock() {
                    idle.push((conn, Instant::now()));
                }
                Ok(None)
            }
        }
    }

    /// The shared HTTP/2 connection, if it is open, with its generation.
    fn shared_h2(&self) -> Option<(u64, http2::SendRequest<OutBody>)> {
        let mut h2 = self.h2.lock().ok()?;
        match &h2.sender {
            Some(sender) if !sender.is_closed() => {
                let shared = (h2.generation, sender.clone());
                h2.last_used = Some(Instant::now());
                Some(shared)
            }
            Some(_) => {
                h2.sender = None;
                None
            }
            None => None,
        }
    }

    /// No more requests for the shared HTTP/2 connection of `generation`
    /// (going away, or closed); one opened since stays.
    fn forget_h2(&self, generation: u64) {
        if let Ok(mut h2) = self.h2.lock()
            && h2.generation == generation
        {
            h2.sender = None;
        }
    }

    /// A request on a new connection, whatever it speaks.
    async fn request_fresh(&self, request: Request<OutBody>) -> Result<Answer, UpstreamError> {
        let (head, body) = request.into_parts();
        if body.is_end_stream() {
            return self
                .request_direct(&head.method, &head.uri, &head.headers, false)
                .await;
        }
        self.request_with_body(head, body).await
    }

    /// Whether the upstream chose HTTP/2 for its latest connection: then
    /// every request goes by the shared HTTP/2 connection (or waits for
    /// the one that replaces it).
    fn speaks_h2(&self) -> bool {
        self.h2.lock().is_ok_and(|h2| h2.known)
    }

    /// Sends a request without a body, borrowing its head (its URI
    /// absolute, its Host among `fields`), so that it can be sent again
    /// (after a 401) without a copy. An answer over HTTP/1.1 comes with its
    /// header fields as they arrived: no header map is built for them.
    ///
    /// With `upgrade` (the fields ask for one, as a WebSocket handshake
    /// does), a `101 Switching Protocols` answer comes with the connection
    /// in [`Answer::switched`]; the upgrade needs HTTP/1.1.
    pub async fn request_bodiless(
        &self,
        method: &Method,
        uri: &Uri,
        fields: &impl WriteFields,
        upgrade: bool,
    ) -> Result<Answer, UpstreamError> {
        if self.speaks_h2() {
            if upgrade {
                return Err(no_upgrade_over_h2());
            }
            return self.via_h2(empty_request(method, uri, fields)?).await;
        }
        self.request_direct(method, uri, fields, upgrade).await
    }

    /// A request without a body over HTTP/1.1 by `conn`, on the most
    /// recent idle connection or a new one. A reused connection that
    /// turns out closed gets the request sent once more on a new one (see
    /// `ExchangeError::may_retry`).
    async fn request_direct(
        &self,
        method: &Method,
        uri: &Uri,
        fields: &impl WriteFields,
        upgrade: bool,
    ) -> Result<Answer, UpstreamError> {
        let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut fresh = false;
        loop {
            let (mut conn, reused) = match self.checkout_direct(fresh).await? {
                (Connected::H1(conn), reused) => (conn, reused),
                (Connected::H2(_), _) if upgrade => return Err(no_upgrade_over_h2()),
                (Connected::H2(mut sender), _) => {
                    // The upstream chose HTTP/2 for this new connection.
                    let response =
                        Box::pin(sender.send_request(for_h2(empty_request(method, uri, fields)?)))
                            .await
                            .map_err(|e| UpstreamError::Request(e.into()))?;
                    return Ok(Answer::hyper(response));
                }
            };
            match conn.exchange(method, target, fields).await {
                Ok(answer)
                    if upgrade && answer.head.status == http::StatusCode::SWITCHING_PROTOCOLS =>
                {
                    return Ok(Answer {
                        head: answer.head,
                        body: Either::Right(DirectBody::empty()),
                        switched: Some(Switched(conn)),
                    });
                }
                Ok(answer) => {
                    let (head, body) =
                        DirectBody::new(answer, (Rest::Sent, None), conn, &self.idle);
                    return Ok(Answer {
                        head,
                        body: Either::Right(body),
                        switched: None,
                    });
                }
                Err(error) if reused && !fresh && error.may_retry(method) => {
                    tracing::debug!(%error, "a pooled upstream connection had closed: sending the request on a new one");
                    fresh = true;
                }
                Err(error) => return Err(UpstreamError::Request(error.into())),
            }
        }
    }

    /// For `conn`: the most recent idle connection that is still open,
    /// or (always when `fresh`) a new one. Whether it was reused.
    async fn checkout_direct(
        &self,
        fresh: bool,
    ) -> Result<(Connected<OutBody, Box<Conn<Io>>>, bool), UpstreamError> {
        if !fresh && let Some(conn) = self.pop_idle() {
            return Ok((Connected::H1(self.in_use(conn)), true));
        }
        let own = Box::pin(self.connect());
        let connected = if !fresh && self.warming.try_lock().is_err() {
            // A warm connection is being opened: whichever is ready first
            // serves this request, the warm one (an idle HTTP/1.1 one, or
            // the shared HTTP/2 one) or its own; a failed warm attempt
            // leaves it its own, already under way.
            let mut own = own;
            tokio::select! {
                biased;
                connected = &mut own => connected?,
                _ = self.warming.lock() => {
                    if let Some(conn) = self.pop_idle() {
                        return Ok((Connected::H1(self.in_use(conn)), true));
                    }
                    if let Some((_, sender)) = self.shared_h2() {
                        return Ok((Connected::H2(sender), true));
                    }
                    own.await?
                }
            }
        } else {
            own.await?
        };
        let connected = match connected {
            Connected::H2(sender) => Connected::H2(sender),
            Connected::H1(io) => Connected::H1(self.in_use(self.new_h1(io))),
        };
        Ok((connected, false))
    }

    /// `conn`, counted busy until it is back in the pool.
    fn in_use(&self, mut conn: Box<Conn<Io>>) -> Box<Conn<Io>> {
        conn.set_in_use(&self.busy);
        conn
    }

    /// The most recent idle connection that may still carry a request.
    fn pop_idle(&self) -> Option<Box<Conn<Io>>> {
        while let Some((mut conn, since)) = self.idle.lock().ok().and_then(|mut idle| idle.pop()) {
            if keepable(&mut conn, since, Instant::now()) {
                return Some(conn);
            }
        }
        None
    }

    /// A request with a body over HTTP/1.1 by `conn`, framed by its
    /// Content-Length or else chunked. A reused connection that turns out
    /// closed before any of the body was taken gets the request sent once
    /// more on a new one.
    async fn request_with_body(
        &self,
        head: http::request::Parts,
        mut body: OutBody,
    ) -> Result<Answer, UpstreamError> {
        let framing = match http1::content_length(head.headers.values_of(&CONTENT_LENGTH)) {
            Ok(Some(length)) => BodyFraming::Length(length),
            Ok(None) => BodyFraming::Chunked,
            // The server side has already refused such a request.
            Err(invalid) => {
                return Err(UpstreamError::Request(
                    format!("the request {invalid}").into(),
                ));
            }
        };
        let target = head.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut fresh = false;
        loop {
            let (mut conn, reused) = match self.checkout_direct(fresh).await? {
                (Connected::H1(conn), reused) => (conn, reused),
                (Connected::H2(mut sender), _) => {
                    // The upstream chose HTTP/2 for this new connection.
                    let request = outgoing(head.method, head.uri, head.headers, body);
                    let response = Box::pin(sender.send_request(for_h2(request)))
                        .await
                        .map_err(|e| UpstreamError::Request(e.into()))?;
                    return Ok(Answer::hyper(response));
                }
            };
            let mut touched = false;
            let exchange = conn.exchange_with_body(
                &head.method,
                target,
                &head.headers,
                framing,
                &mut body,
                &mut touched,
            );
            match exchange.await {
                Ok((answer, rest)) => {
                    let upload: UploadBody = Box::new(body);
                    let (head, body) =
                        DirectBody::new(answer, (rest, Some(upload)), conn, &self.idle);
                    return Ok(Answer {
                        head,
                        body: Either::Right(body),
                        switched: None,
                    });
                }
                Err(error) if reused && !fresh && !touched && error.may_retry(&head.method) => {
                    tracing::debug!(%error, "a pooled upstream connection had closed: sending the request on a new one");
                    fresh = true;
                }
                Err(error) => return Err(UpstreamError::Request(error.into())),
            }
        }
    }

    /// A new connection: an HTTP/2 one is shared from now on.
    async fn connect(&self) -> Result<Connected<OutBody>, UpstreamError> {
        let _connecting = conn::Tally::new(&self.connecting);
        let mut connector = self.connector.clone();
        let io = tower::ServiceExt::oneshot(&mut connector, self.origin.clone())
            .await
            .map_err(UpstreamError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(H2_PING_INTERVAL)
                .keep_alive_timeout(H2_PING_TIMEOUT)
                .handshake(io)
                .await
                .map_err(|e| UpstreamError::Request(e.into()))?;
            let counted = self.count(Protocol::Http2);
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "upstream HTTP/2 connection ended with an error");
                }
                drop(counted);
            });
            if let Ok(mut h2) = self.h2.lock() {
                h2.known = true;
                // Connections opened side by side (before the upstream
                // was known to speak HTTP/2): the first one stays shared.
                if h2.sender.as_ref().is_none_or(http2::SendRequest::is_closed) {
                    h2.share(sender.clone());
                }
            }
            return Ok(Connected::H2(sender));
        }
        if let Ok(mut h2) = self.h2.lock() {
            h2.known = false;
        }
        Ok(Connected::H1(TokioIo::new(io)))
    }

    /// Makes sure that a connection is ready for the next request: the
    /// shared HTTP/2 one is open, or an HTTP/1.1 one is idle (still
    /// usable), busy (it comes back when its answer ends) or being opened;
    /// else one is opened now, so that the next request does not pay the
    /// TCP and TLS handshakes. A ready connection idle for
    /// [`WARM_REFRESH`] is replaced, the new one opened before the old one
    /// goes, so that no request meets the upstream closing it. An error:
    /// none could be opened.
    pub async fn keep_warm(&self) -> Result<(), UpstreamError> {
        if self.connecting.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            return Ok(());
        }
        let now = Instant::now();
        // How long the connection a request would take next has been idle.
        let decision = if self.speaks_h2() {
            let idle_for = self.h2.lock().ok().and_then(|h2| match &h2.sender {
                Some(sender) if !sender.is_closed() => {
                    Some(h2.last_used.map_or(Duration::ZERO, |at| now - at))
                }
                _ => None,
            });
            warm_decision(idle_for, false)
        } else {
            let newest = self.idle.lock().ok().and_then(|mut idle| {
                // The next request takes the most recent: is it good? If
                // not, the pool is swept now rather than at the next sweep.
                if let Some((conn, since)) = idle.last_mut()
                    && keepable(conn, *since, now)
                {
                    return Some(now - *since);
                }
                idle.retain_mut(|(conn, since)| keepable(conn, *since, now));
                idle.last().map(|(_, since)| now - *since)
            });
            let busy = self.busy.load(std::sync::atomic::Ordering::Relaxed) > 0;
            warm_decision(newest, busy)
        };
        // A ready connection growing old is replaced before the upstream's
        // idle limit closes it, the new one opened first.
        let replacing = match decision {
            Warm::Ready => return Ok(()),
            Warm::Replace => true,
            Warm::Open => false,
        };
        // One opener at a time, as for HTTP/2 after a GOAWAY. Requests that
        // find no idle HTTP/1.1 connection meanwhile race this one with
        // their own (`checkout_direct`), unless it replaces one that they
        // can still take.
        let _opening = self.h2_opening.lock().await;
        let _warming = if replacing {
            None
        } else {
            Some(self.warming.lock().await)
        };
        match self.connect().await? {
            Connected::H2(sender) => {
                if replacing && let Ok(mut h2) = self.h2.lock() {
                    // The old one ends once its streams have.
                    h2.share(sender);
                }
            }
            Connected::H1(io) => {
                let conn = self.new_h1(io);
                if let Ok(mut idle) = self.idle.lock() {
                    // The old ones are closed now, not at the next sweep.
                    let now = Instant::now();
                    idle.retain(|(_, since)| now - *since < WARM_REFRESH);
                    idle.push((conn, now));
                }
            }
        }
        Ok(())
    }

    /// Once per pool: a task that closes connections idle too long, so a
    /// burst does not leave its connections open for ever.
    fn start_sweeping(&self) {
        match self.h2.lock() {
            Ok(mut h2) if !h2.sweeping => h2.sweeping = true,
            _ => return,
        }
        let idle = Arc::downgrade(&self.idle);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(POOL_SWEEP);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(idle) = idle.upgrade() else { break };
                if let Ok(mut idle) = idle.lock() {
                    // Also those the upstream has closed since.
                    let now = Instant::now();
                    idle.retain_mut(|(conn, since)| keepable(conn, *since, now));
                }
            }
        });
    }
}

/// What [`Upstream::keep_warm`] does about the connection a request
/// would take next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Warm {
    /// It is fine: nothing to do.
    Ready,
    /// It has been idle long: open a new one, then let it go.
    Replace,
    /// There is none: open one.
    Open,
}

/// `idle_for`: how long the connection a request would take next has been
/// idle (`None`: there is none); `busy`: another is out with a request
/// and comes back when its answer ends.
fn warm_decision(idle_for: Option<Duration>, busy: bool) -> Warm {
    match idle_for {
        Some(idle_for) if idle_for < WARM_REFRESH => Warm::Ready,
        Some(_) => Warm::Replace,
        None if busy => Warm::Ready,
        None => Warm::Open,
    }
}

/// Whether an idle connection for `conn` may carry a request: not idle
/// for `POOL_IDLE_TIMEOUT`, and neither closed by the upstream nor sent
/// anything unasked since.
fn keepable(conn: &mut Conn<Io>, since: Instant, now: Instant) -> bool {
    now - since < POOL_IDLE_TIMEOUT && conn.is_usable()
}

/// A request as HTTP/2 carries it: the upstream's authority in
/// `:authority` alone (from the URI; RFC 9113 §8.3.1), so no Host field,
/// which strict servers refuse beside it (nginx: "duplicate host header");
/// and none of the connection-specific fields of §8.2.2, which the proxy
/// has dropped already as hop-by-hop (hyper would drop them too, warning).
fn for_h2(mut request: Request<OutBody>) -> Request<OutBody> {
    let headers = request.headers_mut();
    headers.remove(HOST);
    for name in [CONNECTION, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
    if headers.get(TE).is_some_and(|te| te != "trailers") {
        headers.remove(TE);
    }
    request
}

/// A copy of a request whose body is held (or absent), to send again.
fn replica(request: &Request<OutBody>) -> Option<Request<OutBody>> {
    let Either::Right(body) = request.body() else {
        return None;
    };
    let mut copy = Request::new(Either::Right(body.clone()));
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.headers_mut() = request.headers().clone();
    Some(copy)
}

/// Whether a request that failed on an HTTP/2 connection without an
/// answer may be sent again on another.
/// - Whatever its method, when the protocol says that the server did not
///   process it: refused (`REFUSED_STREAM`, RFC 9113 §8.7), or beyond
///   the last stream of a GOAWAY (§6.8). h2 reports a server's GOAWAY to
///   a stream only for those: the streams the server kept, if the
///   connection then fails, see the transport fail. (That holds because
///   a connection's task and its requests run on one thread, the
///   worker's: h2 cannot take a GOAWAY between opening a stream and
///   hyper's next look at the connection.)
/// - A safe method (RFC 9110 §9.2.1), as over HTTP/1.1, when the
///   connection failed under it (the transport, or hyper's task gone):
///   the server may have acted on it.
/// - Never when the server reset the stream for another reason: that is
///   its answer.
fn may_send_again(error: &(dyn std::error::Error + 'static), method: &Method) -> bool {
    match crate::error_chain::find::<h2::Error>(error) {
        Some(h2) if h2.is_remote() && h2.reason() == Some(h2::Reason::REFUSED_STREAM) => true,
        Some(h2) if h2.is_go_away() && h2.is_remote() => true,
        Some(h2) if h2.is_reset() => false,
        _ => method.is_safe(),
    }
}

/// Host once more, from the URI, for a request that [`for_h2`] made ready
/// for HTTP/2 and that goes out on a new connection, which may speak
/// HTTP/1.1.
fn restore_host(request: &mut Request<OutBody>) {
    let host = request
        .uri()
        .authority()
        .and_then(|authority| http::HeaderValue::from_str(authority.as_str()).ok());
    if let Some(host) = host {
        request.headers_mut().insert(HOST, host);
    }
}

/// A bodiless request for hyper's client (HTTP/2).
fn empty_request(
    method: &Method,
    uri: &Uri,
    fields: &impl WriteFields,
) -> Result<Request<OutBody>, UpstreamError> {
    // httparse and `http` accept the same bytes: not expected.
    let headers = fields.to_map().map_err(|message| {
        UpstreamError::Request(format!("the request's header fields: {message}").into())
    })?;
    Ok(outgoing(
        method.clone(),
        uri.clone(),
        headers,
        Either::Right(Full::default()),
    ))
}

/// A request for the upstream from its parts (the client's extensions stay behind).
pub fn outgoing(
    method: Method,
    uri: Uri,
    headers: http::HeaderMap,
    body: OutBody,
) -> Request<OutBody> {
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    request
}

/// The kind of a failed upstream request, for the metrics: the same
/// cases as [`describe_upstream_error`] tells apart.
pub fn failure_kind(error: &UpstreamError) -> UpstreamFailure {
    let cause = error.cause();
    let connecting = matches!(error, UpstreamError::Connect(_));
    if crate::error_chain::find::<ConnectTimeout>(cause).is_some() {
        UpstreamFailure::Timeout
    } else if crate::tls::describe_failure(cause).is_some() {
        UpstreamFailure::Tls
    } else if let Some(ExchangeError::Invalid(_)) = crate::error_chain::find(cause) {
        UpstreamFailure::InvalidAnswer
    } else if connecting {
        UpstreamFailure::Connect
    } else {
        UpstreamFailure::Reset
    }
}

/// The documented code and a sentence for a failed upstream request.
pub fn describe_upstream_error(
    error: &UpstreamError,
    authority: &Authority,
) -> (ErrorCode, String) {
    let cause = error.cause();
    let detail = crate::error_chain::chain(cause);
    match failure_kind(error) {
        UpstreamFailure::Timeout => (
            ErrorCode::UpstreamTimeout,
            format!("{detail} (upstream.connect_timeout)"),
        ),
        UpstreamFailure::Tls => (
            ErrorCode::UpstreamUnreachable,
            format!(
                "TLS with the upstream {authority} failed: {}",
                crate::tls::describe_failure(cause).unwrap_or(detail)
            ),
        ),
        UpstreamFailure::InvalidAnswer => (
            ErrorCode::UpstreamUnreachable,
            match crate::error_chain::find(cause) {
                Some(ExchangeError::Invalid(problem)) => {
                    format!("the upstream {authority} sent an invalid response: {problem}")
                }
                _ => format!("the upstream {authority} sent an invalid response: {detail}"),
            },
        ),
        UpstreamFailure::Connect => (
            ErrorCode::UpstreamUnreachable,
            format!("cannot connect to the upstream {authority}: {detail}"),
        ),
        UpstreamFailure::Reset => (
            ErrorCode::UpstreamUnreachable,
            format!("the upstream {authority} closed the connection without a response: {detail}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warm_connection_is_kept_replaced_before_the_upstream_limits_or_opened() {
        let secs = Duration::from_secs;
        assert_eq!(warm_decision(Some(Duration::ZERO), false), Warm::Ready);
        assert_eq!(warm_decision(Some(secs(39)), false), Warm::Ready);
        // Before nginx's 60 s for an unused HTTP/2 connection, 75 s for an
        // idle one, and this pool's own 50 s.
        assert!(WARM_REFRESH < POOL_IDLE_TIMEOUT && POOL_IDLE_TIMEOUT < secs(60));
        assert_eq!(warm_decision(Some(WARM_REFRESH), false), Warm::Replace);
        assert_eq!(warm_decision(Some(secs(3600)), true), Warm::Replace);
        // None idle: one out with a request comes back; else one is opened.
        assert_eq!(warm_decision(None, true), Warm::Ready);
        assert_eq!(warm_decision(None, false), Warm::Open);
    }

    /// An HTTP/1.1 upstream on loopback that says, in order, which of its
    /// connections opened, carried a request and closed.
    async fn recording_upstream() -> std::io::Result<(Uri, Arc<Mutex<Vec<String>>>)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let origin = Uri::try_from(format!("http://{}/", listener.local_addr()?))
            .map_err(std::io::Error::other)?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&events);
        let note = move |event: String| {
            if let Ok(mut events) = record.lock() {
                events.push(event);
            }
        };
        tokio::spawn(async move {
            for n in 1.. {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                note(format!("open {n}"));
                let note = note.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while let Ok(read @ 1..) = stream.read(&mut buf).await {
                        head.extend_from_slice(&buf[..read]);
                        if head.windows(4).any(|w| w == b"\r\n\r\n") {
                            head.clear();
                            note(format!("request on {n}"));
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                            if stream.write_all(answer).await.is_err() {
                                break;
                            }
                        }
                    }
                    note(format!("close {n}"));
                });
            }
        });
        Ok((origin, events))
    }

    /// Once `events` holds `count` of them, or after 1000 yields (which,
    /// unlike a sleep, leave the paused clock where it is).
    async fn events(events: &Mutex<Vec<String>>, count: usize) -> Vec<String> {
        for _ in 0..1000 {
            let now = events.lock().map(|e| e.clone()).unwrap_or_default();
            if now.len() >= count {
                return now;
            }
            tokio::task::yield_now().await;
        }
        events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn a_warm_connection_idle_for_the_refresh_time_is_replaced_before_the_old_one_goes()
    -> Result<(), Box<dyn std::error::Error>> {
        crate::tls::install_crypto_provider();
        let (origin, log) = recording_upstream().await?;
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let proxies = crate::egress::Proxies::new(None, None, None);
        let upstream = Upstream::new(tls, Duration::from_secs(5), &proxies, origin.clone(), true);

        upstream.keep_warm().await?;
        assert_eq!(events(&log, 1).await, ["open 1"]);
        // Not yet old: kept.
        tokio::time::advance(WARM_REFRESH - Duration::from_secs(1)).await;
        upstream.keep_warm().await?;
        assert_eq!(events(&log, 2).await, ["open 1"]);
        // Old: a new one first, then the old one goes, and the next
        // request takes the new one.
        tokio::time::advance(Duration::from_secs(1)).await;
        upstream.keep_warm().await?;
        assert_eq!(events(&log, 3).await, ["open 1", "open 2", "close 1"]);
        let authority = origin
            .authority()
            .map(ToString::to_string)
            .unwrap_or_default();
        let request = Request::builder()
            .uri(format!("http://{authority}/item"))
            .header(HOST, authority)
            .body(Either::Right(Full::new(Bytes::new())))?;
        // Used 20 s after it opened: its idle time starts again then.
        tokio::time::advance(Duration::from_secs(20)).await;
        let answer = upstream.request(request).await?;
        assert_eq!(answer.head.status, http::StatusCode::OK);
        assert_eq!(
            events(&log, 4).await,
            ["open 1", "open 2", "close 1", "request on 2"]
        );
        // 39 s after that use (59 s after it opened) it stays; at 40 s it
        // is replaced again.
        tokio::time::advance(WARM_REFRESH - Duration::from_secs(1)).await;
        upstream.keep_warm().await?;
        assert_eq!(events(&log, 5).await.len(), 4);
        tokio::time::advance(Duration::from_secs(1)).await;
        upstream.keep_warm().await?;
        assert_eq!(events(&log, 6).await[4..], ["open 3", "close 2"]);
        Ok(())
    }
}
