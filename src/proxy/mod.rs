//! Forwarding policy: each request goes to the one upstream with the bearer
//! token and the proxy's User-Agent, changed in nothing else that README
//! does not list; a request refused with 401 is replayed once with a new
//! token; `Location` is mapped back; the token is masked where the upstream
//! echoes it. Bodies stream both ways with backpressure. The wire format is
//! `http1`'s, the connections `upstream`'s, the serving `server`'s.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{
    ACCEPT_ENCODING, CONNECTION, CONTENT_ENCODING, CONTENT_LENGTH, LOCATION, UPGRADE,
};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

pub mod body;
pub mod headers;
pub mod mask;
pub mod tunnel;

use body::ProxyBody;
use headers::{Added, LocationRewriter, OutFields, RawRequest};

use crate::config::Config;
use crate::guard::Guard;
use crate::http1::field::{CONTENT_LENGTH as CONTENT_LENGTH_FIELD, EXPECT, X_REQUEST_ID};
use crate::http1::{
    self, FieldValues, Fields, FramingProblem, Known, Offer, RequestHead, ResponseHead,
    WriteFields, visible_ascii,
};
pub use crate::reply::{ErrorCode, ProxyError};
use crate::token::{CurrentToken, LocalToken, Renewal, TokenSlot};
use crate::upstream::body::{Activity, TrackedBody};
use crate::upstream::{Answer, Switched, Upstream, UpstreamBody, UpstreamError, outgoing};
pub use mask::{mask, normalize_path};

mod access;
mod request_id;
use crate::metrics::{Registry, Replay, Shard, UpstreamFailure};
use access::{Exchange, Lines, Style};
use tracing::Instrument as _;

/// Largest status-path answer that is read whole to mask the token in it.
const MASK_LIMIT: usize = 1024 * 1024;

/// The proxy service: cheap to clone, one per connection.
#[derive(Debug, Clone)]
pub struct Proxy {
    inner: Arc<Shared>,
}

/// Cloned for each worker, which then gets a connection pool of its own.
#[derive(Debug, Clone)]
struct Shared {
    client: Arc<Upstream>,
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
    base_path: String,
    user_agent: HeaderValue,
    /// `proxy.mask_token_in`, normalised.
    mask_paths: Vec<Vec<u8>>,
    /// The last segment of each, normalised, for a quick first test.
    mask_tails: Vec<Vec<u8>>,
    guard: Guard,
    capacity: Arc<Semaphore>,
    max_concurrent: usize,
    locations: LocationRewriter,
    slot: TokenSlot,
    /// The current token, copied for this worker (a clone copies again).
    token: LocalToken,
    startup_wait: Duration,
    response_timeout: Duration,
    replay_buffer: usize,
    /// `proxy.tunnel_idle_timeout`.
    tunnel_idle: Duration,
    /// Open tunnels (WebSocket), waited for on shutdown.
    tunnels: TaskTracker,
    min_forced_interval: Duration,
    /// How long a request refused with 401 waits for the forced renewal.
    renewal_wait: Duration,
    /// Where workers get their metrics shards.
    registry: Registry,
    /// This worker's.
    metrics: Arc<Shard>,
    /// The access log's style, when it is on.
    access: Option<Style>,
    /// This worker's access-log lines, written in batches (once logging
    /// is installed).
    lines: Option<Arc<Lines>>,
    /// `upstream.keep_warm`: each worker keeps a connection ready.
    keep_warm: bool,
    /// Workers whose first warm connection is still being opened.
    warming: Warming,
}

/// Counts the workers whose first connection to the upstream is still
/// being opened: readiness waits for them (for their first attempt, not
/// its success), so that the first request after start finds a warm
/// connection.
#[derive(Debug, Clone, Default)]
pub struct Warming(Arc<std::sync::atomic::AtomicUsize>);

impl Warming {
    /// `workers` first attempts to wait for (0: none).
    pub fn new(workers: usize) -> Self {
        Self(Arc::new(std::sync::atomic::AtomicUsize::new(workers)))
    }

    /// Whether a first attempt is still under way.
    pub fn pending(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    fn attempted(&self) {
        let _ = self.0.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |n| n.checked_sub(1),
        );
    }
}

impl Proxy {
    /// A proxy to the configured upstream, sending the tokens held in `slot`.
    pub fn new(
        config: &Config,
        tls: rustls::ClientConfig,
        slot: TokenSlot,
        guard: Guard,
        registry: &Registry,
        warming: Warming,
    ) -> Self {
        let upstream = &config.upstream;
        let url = &upstream.url;
        let host = HeaderValue::from_str(url.authority.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Self {
            inner: Arc::new(Shared {
                client: Arc::new(Upstream::new(
                    tls,
                    upstream.connect_timeout,
                    &config.proxies,
                    url.origin(),
                    upstream.http2,
                )),
                scheme: url.scheme.clone(),
                authority: url.authority.clone(),
                host,
                base_path: url.base_path.clone(),
                user_agent: upstream.user_agent.clone(),
                mask_paths: config
                    .proxy
                    .mask_token_in
                    .iter()
                    .map(|p| mask::normalize_path(p))
                    .collect(),
                mask_tails: config
                    .proxy
                    .mask_token_in
                    .iter()
                    .map(|p| {
                        let normalized = mask::normalize_path(p);
                        let start = normalized
                            .iter()
                            .rposition(|b| *b == b'/')
                            .map_or(0, |i| i + 1);
                        normalized[start..].to_vec()
                    })
                    .collect(),
                guard,
                capacity: Arc::new(Semaphore::new(config.proxy.max_concurrent)),
                max_concurrent: config.proxy.max_concurrent,
                locations: LocationRewriter::new(url),
                token: slot.local(),
                slot,
                startup_wait: config.token.startup_wait,
                response_timeout: upstream.response_timeout,
                replay_buffer: config.proxy.replay_buffer,
                min_forced_interval: config.token.min_forced_interval,
                // The forced fetch may take all of token.timeout: wait a little longer.
                renewal_wait: config.token.timeout + Duration::from_secs(1),
                tunnel_idle: config.proxy.tunnel_idle_timeout,
                tunnels: TaskTracker::new(),
                registry: registry.clone(),
                metrics: registry.shard(),
                access: Style::new(config.access_log, config.log_format),
                lines: None,
                keep_warm: upstream.keep_warm,
                warming,
            }),
        }
    }
}

impl Proxy {
    /// The same proxy with an upstream connection pool of its own, for a
    /// worker: call it on the worker's runtime, where the pool's
    /// connection tasks will run. The token slot, guard and capacity limit
    /// stay shared.
    #[must_use]
    pub fn for_worker(&self) -> Self {
        let mut shared = Shared::clone(&self.inner);
        shared.metrics = shared.registry.shard();
        // Nothing kept for lines that the log's filter leaves out (it is
        // set once, before the workers start).
        shared.access = shared
            .access
            .filter(|_| tracing::enabled!(target: "access", tracing::Level::INFO));
        shared.lines = shared
            .access
            .and_then(|_| crate::telemetry::writer())
            .map(Lines::start);
        shared.client = Arc::new(shared.client.with_own_pool().counted(&shared.metrics));
        if shared.keep_warm {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(keep_warm(
                        Arc::downgrade(&shared.client),
                        shared.warming.clone(),
                    ));
                }
                Err(_) => shared.warming.attempted(),
            }
        }
        // Values cloned into every request get bytes of their own, so
        // that their reference counts are not shared with other workers.
        let own = |value: &HeaderValue| HeaderValue::from_bytes(value.as_bytes()).ok();
        if let Some(host) = own(&shared.host) {
            shared.host = host;
        }
        if let Some(user_agent) = own(&shared.user_agent) {
            shared.user_agent = user_agent;
        }
        if let Ok(authority) = Authority::from_maybe_shared(Bytes::copy_from_slice(
            shared.authority.as_str().as_bytes(),
        )) {
            shared.authority = authority;
        }
        Self {
            inner: Arc::new(shared),
        }
    }
}

/// How often a worker looks at its warm connection.
const KEEP_WARM_TICK: Duration = Duration::from_secs(1);
/// The longest pause after failed attempts to open one.
const KEEP_WARM_MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Keeps a connection to the upstream ready for this worker from start
/// (opened while the first token is fetched, so it is ready when the
/// token is), so that neither the first request after start nor the
/// first after a quiet spell pays the TCP and TLS handshakes: a client
/// that opens a connection per request, across a real round trip, gets
/// the pooled connection's speed. Looks once a second
/// ([`Upstream::keep_warm`]); after failures, less often, up to a minute
/// apart. Ends with the worker's pool.
async fn keep_warm(client: std::sync::Weak<Upstream>, warming: Warming) {
    /// Counts the first attempt made however it ends (a panic, the pool
    /// gone), so that readiness never waits for ever.
    struct First(Warming);
    impl Drop for First {
        fn drop(&mut self) {
            self.0.attempted();
        }
    }
    let mut first = Some(First(warming));
    let mut pause = KEEP_WARM_TICK;
    let mut failures = 0u32;
    loop {
        let Some(upstream) = client.upgrade() else {
            return;
        };
        let attempt = upstream.keep_warm().await;
        drop(first.take());
        match attempt {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(failures, "a warm connection to the upstream is open again");
                }
                failures = 0;
                pause = KEEP_WARM_TICK;
            }
            Err(error) => {
                failures += 1;
                pause = (pause * 2).min(KEEP_WARM_MAX_BACKOFF);
                // The first failure is worth a line; a request would meet
                // the same error, and says so itself.
                let message = "cannot open a warm connection to the upstream; trying again";
                let error = crate::error_chain::chain(&error);
                let after = humantime::format_duration(pause);
                if failures == 1 {
                    tracing::warn!(%error, "{message} in {after}");
                } else {
                    tracing::debug!(%error, "{message} in {after}");
                }
            }
        }
        drop(upstream);
        tokio::time::sleep(pause).await;
    }
}

impl hyper::service::Service<Request<Incoming>> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        let shared = Arc::clone(&self.inner);
        // The client's side of an upgrade, should the upstream agree to it.
        let upgrade = request
            .headers()
            .contains_key(http::header::UPGRADE)
            .then(|| hyper::upgrade::on(&mut request));
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let head = RequestHead::from_parts(parts);
            let (head, body) = shared.answer(head, Some(body), upgrade).await;
            Ok(match head.into_parts() {
                Ok(parts) => Response::from_parts(parts, body),
                // httparse and `http` accept the same bytes: not expected.
                Err(message) => {
                    let error = shared.upstream_error(&UpstreamError::invalid_answer(message));
                    tracing::warn!(code = error.code.as_str(), "{}", error.message);
                    let (parts, body) = error_answer(&error);
                    match parts.into_parts() {
                        Ok(parts) => Response::from_parts(parts, body),
                        Err(_) => Response::new(body),
                    }
                }
            })
        })
    }
}

impl crate::server::Bodiless for Proxy {
    fn call_bodiless(
        &self,
        request: RequestHead,
    ) -> impl Future<Output = (ResponseHead, ProxyBody)> + Send + '_ {
        self.inner.answer(request, None, None)
    }

    fn connection_opened(&self) -> Option<crate::metrics::Open> {
        Some(self.inner.metrics.connection())
    }

    fn drained(&self) -> impl Future<Output = ()> + Send + 'static {
        let tunnels = self.inner.tunnels.clone();
        async move {
            tunnels.close();
            tunnels.wait().await;
        }
    }
}

/// The proxy's own answer for `error`.
fn error_answer(error: &ProxyError) -> (ResponseHead, ProxyBody) {
    let (parts, body) = error.to_response().into_parts();
    (ResponseHead::from_parts(parts), ProxyBody::full(body, None))
}

impl Shared {
    /// The answer to a request (`body`: `None` when it has none): the
    /// upstream's, or the proxy's error.
    async fn answer(
        &self,
        head: RequestHead,
        body: Option<Incoming>,
        upgrade: Option<OnUpgrade>,
    ) -> (ResponseHead, ProxyBody) {
        let mut exchange = Box::new(Exchange::start(
            &self.metrics,
            &head,
            self.access,
            self.lines.as_ref(),
        ));
        // Lines logged at debug while the request is forwarded (by the
        // upstream's client, a tunnel) carry its id through this span; the
        // proxy's own lines about it name the id themselves. Unless debug
        // is on, the span is nothing and costs next to nothing.
        let span = tracing::debug_span!("request", request_id = exchange.request_id());
        let forwarding = self
            .forward(head, body, upgrade, &mut exchange)
            .instrument(span);
        let (mut head, mut body) = match forwarding.await {
            Ok(answer) => answer,
            Err(error) => {
                if matches!(
                    error.code,
                    ErrorCode::UpstreamUnreachable | ErrorCode::UpstreamTimeout
                ) {
                    tracing::warn!(
                        code = error.code.as_str(),
                        request_id = exchange.request_id(),
                        "{}",
                        error.message
                    );
                }
                exchange.code = Some(error.code);
                error_answer(&error)
            }
        };
        // The request's id goes back to the client, unless the upstream
        // gave one of its own.
        let id = exchange.request_id.value.clone();
        match &mut head.fields {
            Fields::Raw(fields) => {
                if fields.values(Known::RequestId).next().is_none() {
                    fields.set_request_id(id);
                }
            }
            Fields::Map(map) => {
                map.entry(X_REQUEST_ID.name).or_insert(id);
            }
        }
        exchange.status = head.status.as_u16();
        body.observe(exchange);
        (head, body)
    }

    async fn forward(
        &self,
        head: RequestHead,
        body: Option<Incoming>,
        upgrade: Option<OnUpgrade>,
        exchange: &mut Exchange,
    ) -> Result<(ResponseHead, ProxyBody), ProxyError> {
        if let Some(problem) = http1::field::request_problem(&head.fields) {
            return Err(framing_error(problem));
        }
        self.guard.check_head(&head)?;
        let Ok(permit) = Arc::clone(&self.capacity).try_acquire_owned() else {
            return Err(ProxyError::new(
                ErrorCode::Overloaded,
                format!(
                    "more than {} requests are in flight (proxy.max_concurrent): retry shortly",
                    self.max_concurrent
                ),
            )
            .retry_after(1));
        };
        let permit = Some(permit);
        let token = self.token_now().await?;
        let RequestHead {
            method,
            uri,
            version,
            fields,
        } = head;
        let path_and_query = self.join(uri.path_and_query())?;
        // Masked paths are matched as the client wrote them and as the
        // upstream sees them (its base path included).
        let masked = method != Method::HEAD
            && !self.mask_paths.is_empty()
            && [uri.path(), path_and_query.path()].iter().any(|path| {
                self.may_be_masked(path) && self.mask_paths.contains(&normalize_path(path))
            });
        let uri = Uri::from_parts({
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(self.scheme.clone());
            uri.authority = Some(self.authority.clone());
            uri.path_and_query = Some(path_and_query);
            uri
        })
        .map_err(|_| {
            ProxyError::new(
                ErrorCode::BadRequestTarget,
                "the request target cannot be joined onto the upstream URL",
            )
        })?;
        // `TE: trailers` is the one TE value worth passing on: gRPC and other
        // trailer users need the upstream to know the client can take them.
        let added = Added {
            trailers: http1::takes_trailers(&fields),
            host: self.host.clone(),
            authorization: token.header.clone(),
            user_agent: self.user_agent.clone(),
            request_id: exchange
                .request_id
                .set_upstream
                .then(|| exchange.request_id.value.clone()),
        };
        // A WebSocket handshake (the guard has refused other upgrades, and
        // an h2c offer, or any offer over HTTP/1.0, is ignored): sent on
        // asking for WebSocket alone, whatever else the client offered.
        let upgrade = upgrade.filter(|_| {
            version == Version::HTTP_11 && http1::upgrade_offer(&fields) == Offer::WebSocket
        });
        // A body that is already over is no body.
        let body = body.filter(|body| !body.is_end_stream());
        if upgrade.is_some() && (body.is_some() || masked) {
            return Err(ProxyError::new(
                ErrorCode::UpgradeNotSupported,
                if masked {
                    "a path whose answers have the token masked (proxy.mask_token_in) cannot be a WebSocket"
                } else {
                    "a WebSocket handshake carries no body: send it without one"
                },
            ));
        }
        let replayable = body.is_none() || self.can_replay(&fields);
        // Fields as they arrived (a request without a body, from the lean
        // server) are written out so, cleaned: no map.
        let mut out = match fields {
            Fields::Raw(mut fields) if !masked && body.is_none() && fields.is_small() => {
                headers::clean_request_fields(&mut fields);
                OutFields::Raw(RawRequest { fields, added })
            }
            fields => {
                let mut map = match fields {
                    Fields::Map(map) => map,
                    // httparse and `http` accept the same bytes: not expected.
                    Fields::Raw(raw) => raw
                        .to_map(4)
                        .map_err(|message| ProxyError::new(ErrorCode::BadRequestTarget, message))?,
                };
                headers::clean_request(&mut map);
                added.apply(&mut map);
                if upgrade.is_some() {
                    map.insert(CONNECTION, HeaderValue::from_static("upgrade"));
                    map.insert(UPGRADE, HeaderValue::from_static("websocket"));
                }
                if masked {
                    // The answer is read to mask the token in it: ask for it uncompressed.
                    map.remove(ACCEPT_ENCODING);
                }
                OutFields::Map(map)
            }
        };
        let (answer, token) = match body {
            Some(body) if !replayable => {
                let (body, activity) = TrackedBody::new(body);
                let headers = out
                    .to_map()
                    .map_err(|message| ProxyError::new(ErrorCode::BadRequestTarget, message))?;
                let request = outgoing(method, uri, headers, Either::Left(body));
                exchange.upload.clone_from(&activity);
                let sent_at = Instant::now();
                // Boxed: streaming a body is the rarer path, and the
                // future of every request is as large as its largest state.
                let answer = Box::pin(self.send(self.client.request(request), activity)).await?;
                exchange.upstream = Some(sent_at.elapsed());
                if answer.head.status == StatusCode::UNAUTHORIZED {
                    // Not replayable, but the next requests should not meet the
                    // same refusal: ask for a new token without waiting for it.
                    let _ = self
                        .slot
                        .request_renewal(token.generation, self.min_forced_interval);
                }
                (answer, token)
            }
            body => {
                let (held, held_token) = self.hold(body, Arc::clone(&token)).await?;
                if !Arc::ptr_eq(&held_token, &token) {
                    out.set_authorization(held_token.header.clone());
                }
                exchange.received = held.len() as u64;
                let outgoing = Outgoing {
                    method,
                    uri,
                    fields: out,
                    upgrade: upgrade.is_some(),
                };
                let sent_at = Instant::now();
                let (answer, sent_with) = self
                    .send_replayable(
                        outgoing,
                        held,
                        Arc::clone(&held_token),
                        exchange.request_id(),
                    )
                    .await?;
                exchange.upstream = Some(sent_at.elapsed());
                exchange.replayed = !Arc::ptr_eq(&sent_with, &held_token);
                (answer, sent_with)
            }
        };

        let Answer {
            head,
            body,
            switched,
        } = answer;
        if let (Some(switched), Some(upgrade)) = (switched, upgrade) {
            return self.switch(head, switched, upgrade, permit);
        }
        if head.status == StatusCode::SWITCHING_PROTOCOLS {
            // Not asked for: no tunnel to pass it on to.
            return Err(self.upstream_error(&UpstreamError::invalid_answer(
                "a 101 Switching Protocols that was not asked for".to_owned(),
            )));
        }
        let ResponseHead {
            status,
            reason,
            fields,
            ..
        } = head;
        let mut headers = match fields {
            Fields::Raw(mut fields) => {
                headers::clean_response_fields(&mut fields);
                let rewritten = fields
                    .values(Known::Location)
                    .next()
                    .and_then(visible_ascii)
                    .is_some_and(|location| self.locations.rewrite(location).is_some());
                // A masked answer's fields are looked at and changed: in a map.
                if !rewritten && !masked && fields.is_small() {
                    // Written out as they came: no map, nothing changed.
                    let head = ResponseHead {
                        status,
                        version: Version::HTTP_11,
                        reason,
                        fields: Fields::Raw(fields),
                    };
                    return Ok((head, ProxyBody::upstream(body, permit)));
                }
                // Rare: the map has the rewriting, and no cost grows faster
                // than the head.
                fields.into_map().map_err(|message| {
                    self.upstream_error(&UpstreamError::invalid_answer(message))
                })?
            }
            Fields::Map(mut map) => {
                headers::clean_response(&mut map);
                map
            }
        };
        if let Some(location) = headers.get(LOCATION).and_then(|v| v.to_str().ok())
            && let Some(rewritten) = self.locations.rewrite(location)
            && let Ok(value) = HeaderValue::from_str(&rewritten)
        {
            headers.insert(LOCATION, value);
        }
        let mut head = ResponseHead {
            status,
            version: Version::HTTP_11,
            reason,
            fields: Fields::Map(HeaderMap::new()),
        };
        if masked {
            if !is_identity(&headers) {
                // Fail closed: a compressed answer cannot be searched for the token.
                return Err(ProxyError::new(
                    ErrorCode::UpstreamUnreachable,
                    "the upstream compressed an answer whose token must be masked (proxy.mask_token_in), although it was asked not to",
                ));
            }
            let body = Box::pin(tokio::time::timeout(
                self.response_timeout,
                mask_token(body, &token),
            ))
            .await
            .map_err(|_| self.response_timeout_error(None))??;
            headers.remove(CONTENT_LENGTH);
            // The body changed: validators of the old one no longer hold.
            headers.remove(http::header::ETAG);
            head.fields = Fields::Map(headers);
            return Ok((head, ProxyBody::full(body, permit)));
        }
        head.fields = Fields::Map(headers);
        Ok((head, ProxyBody::upstream(body, permit)))
    }

    /// A replayable request's body, read whole (at once when it has none:
    /// no timer, no collecting), and the token to send with it: the body
    /// may have taken long enough to arrive for `token` to near its expiry.
    async fn hold(
        &self,
        body: Option<Incoming>,
        token: Arc<CurrentToken>,
    ) -> Result<(Bytes, Arc<CurrentToken>), ProxyError> {
        let Some(body) = body else {
            return Ok((Bytes::new(), token));
        };
        let collecting = Limited::new(body, self.replay_buffer).collect();
        let held = match Box::pin(tokio::time::timeout(self.response_timeout, collecting)).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            // The client broke off or stalled its own request: nothing to forward.
            _ => return Err(ProxyError::client_fault()),
        };
        if token.is_usable(tokio::time::Instant::now()) {
            Ok((held, token))
        } else {
            Ok((held, self.token_now().await?))
        }
    }

    /// A cheap test before `normalize_path`'s allocation: a path can only
    /// normalise to a masked one if it has a percent-escape or holds a
    /// masked path's last segment (in any case).
    fn may_be_masked(&self, path: &str) -> bool {
        path.contains('%')
            || self.mask_tails.iter().any(|tail| {
                tail.is_empty()
                    || path
                        .as_bytes()
                        .windows(tail.len().max(1))
                        .any(|window| window.eq_ignore_ascii_case(tail))
            })
    }

    /// The token to send now; before the first one, waits up to
    /// `token.startup_wait` for it.
    async fn token_now(&self) -> Result<Arc<CurrentToken>, ProxyError> {
        if let Ok(token) = self.token.current() {
            return Ok(token);
        }
        // Boxed, as every rare path here: the future of every request is
        // as large as its largest state.
        Box::pin(self.slot.current_or_wait(self.startup_wait))
            .await
            .map_err(|u| {
                ProxyError::new(
                    ErrorCode::TokenUnavailable,
                    format!("no valid access token: {}", u.reason),
                )
                .retry_after(u.retry_after_secs)
            })
    }

    /// The upstream switched protocols: the client gets the `101` with
    /// the upstream's fields (its `Upgrade` and `Connection: upgrade` put
    /// back, since they are this hop's), and a tunnel relays the bytes.
    fn switch(
        &self,
        head: ResponseHead,
        switched: Switched,
        upgrade: OnUpgrade,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<(ResponseHead, ProxyBody), ProxyError> {
        let ResponseHead {
            status,
            reason,
            fields,
            ..
        } = head;
        let mut headers = fields
            .into_map()
            .map_err(|message| self.upstream_error(&UpstreamError::invalid_answer(message)))?;
        // Only to what was asked for (RFC 9110 §15.2.2: the 101 names it):
        // another protocol would carry requests past the guard.
        if !headers.lists_token(&http1::field::UPGRADE, "websocket") {
            return Err(self.upstream_error(&UpstreamError::invalid_answer(
                "its 101 Switching Protocols does not name websocket in Upgrade".to_owned(),
            )));
        }
        let protocol = headers.get(UPGRADE).cloned();
        headers::clean_response(&mut headers);
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(protocol) = protocol {
            headers.insert(UPGRADE, protocol);
        }
        let (io, early, counted) = switched.into_parts();
        let relay = tunnel::relay(upgrade, io, early, self.tunnel_idle, permit);
        self.tunnels.spawn(
            async move {
                relay.await;
                // The upstream connection is open as long as the tunnel.
                drop(counted);
            }
            .instrument(tracing::Span::current()),
        );
        let head = ResponseHead {
            status,
            version: Version::HTTP_11,
            reason,
            fields: Fields::Map(headers),
        };
        Ok((head, ProxyBody::full(Bytes::new(), None)))
    }

    /// Whether a request with a body can be sent again after an upstream
    /// 401: one small enough to hold back (by its Content-Length) and not
    /// announced with `Expect: 100-continue` (its sender waits to be asked).
    fn can_replay(&self, fields: &Fields) -> bool {
        let length = http1::content_length(fields.values_of(&CONTENT_LENGTH_FIELD));
        fields.first(&EXPECT).is_none()
            && matches!(length, Ok(Some(length)) if length <= self.replay_buffer as u64)
    }

    /// Sends a request whose body is held, and if the upstream refuses its
    /// token with 401, renews the token (single flight, rate-limited) and
    /// sends it once more. Returns the answer and the token it carried.
    async fn send_replayable(
        &self,
        mut request: Outgoing,
        body: Bytes,
        token: Arc<CurrentToken>,
        request_id: &str,
    ) -> Result<(Answer, Arc<CurrentToken>), ProxyError> {
        let answer = self.send_held(&request, &body).await?;
        if answer.head.status != StatusCode::UNAUTHORIZED {
            return Ok((answer, token));
        }
        let renewed = match self
            .slot
            .request_renewal(token.generation, self.min_forced_interval)
        {
            Renewal::Newer(newer) => Some(newer),
            Renewal::Pending => {
                Box::pin(self.slot.wait_renewal(token.generation, self.renewal_wait)).await
            }
            Renewal::Declined => None,
        };
        let Some(renewed) = renewed else {
            tracing::debug!(
                request_id,
                "the upstream answered 401; no new token now, so the 401 is passed on"
            );
            return Ok((answer, token));
        };
        drop(answer);
        tracing::info!(
            request_id,
            generation = renewed.generation,
            "the upstream answered 401: replaying the request with a new token"
        );
        request.fields.set_authorization(renewed.header.clone());
        let replayed = Box::pin(self.send_held(&request, &body)).await;
        self.metrics.replay(match &replayed {
            Ok(answer) if answer.head.status == StatusCode::UNAUTHORIZED => Replay::RefusedAgain,
            Ok(_) => Replay::Accepted,
            Err(_) => Replay::Failed,
        });
        Ok((replayed?, renewed))
    }

    /// Sends a request whose body is held, keeping the request and its
    /// body for a replay: without a body, nothing is copied.
    async fn send_held(&self, request: &Outgoing, body: &Bytes) -> Result<Answer, ProxyError> {
        let Outgoing {
            method,
            uri,
            fields,
            upgrade,
        } = request;
        if body.is_empty() {
            let sending = self.client.request_bodiless(method, uri, fields, *upgrade);
            return self.send(sending, None).await;
        }
        let headers = fields
            .to_map()
            .map_err(|message| ProxyError::new(ErrorCode::BadRequestTarget, message))?;
        let request = outgoing(
            method.clone(),
            uri.clone(),
            headers,
            Either::Right(Full::new(body.clone())),
        );
        Box::pin(self.send(self.client.request(request), None)).await
    }

    /// The upstream's base path and the request's path and query, joined by
    /// plain concatenation: not a byte is decoded or re-encoded.
    fn join(&self, target: Option<&PathAndQuery>) -> Result<PathAndQuery, ProxyError> {
        let target = target
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        if !target.as_str().starts_with('/') {
            return Err(ProxyError::new(
                ErrorCode::BadRequestTarget,
                "the request target must be a path starting with /",
            ));
        }
        if self.base_path.is_empty() {
            // Already parsed, and shared rather than copied.
            return Ok(target);
        }
        let mut joined = String::with_capacity(self.base_path.len() + target.as_str().len());
        joined.push_str(&self.base_path);
        joined.push_str(target.as_str());
        PathAndQuery::try_from(joined).map_err(|_| bad_target())
    }

    /// Sends the request. `upstream.response_timeout` bounds every silence:
    /// while the body is sent, the time between two pieces of it; after the
    /// last piece, the wait for the response headers. Long uploads that keep
    /// moving are not cut; an upstream that stops reading one is.
    async fn send(
        &self,
        responding: impl Future<Output = Result<Answer, UpstreamError>>,
        activity: Option<Arc<Activity>>,
    ) -> Result<Answer, ProxyError> {
        let timeout = self.response_timeout;
        tokio::pin!(responding);
        let mut deadline = tokio::time::Instant::now() + timeout;
        loop {
            tokio::select! {
                biased;
                result = &mut responding => {
                    if result.is_err() && activity.as_ref().is_some_and(|a| a.client_failed()) {
                        return Err(ProxyError::client_fault());
                    }
                    return result.map_err(|error| self.upstream_error(&error));
                }
                () = tokio::time::sleep_until(deadline) => {
                    let next = activity.as_ref().map(|a| a.last() + timeout);
                    match next {
                        Some(next) if next > tokio::time::Instant::now() => deadline = next,
                        _ => return Err(self.response_timeout_error(activity.as_deref())),
                    }
                }
            }
        }
    }

    fn response_timeout_error(&self, activity: Option<&Activity>) -> ProxyError {
        let limit = humantime::format_duration(self.response_timeout);
        let message = if activity.is_some_and(|a| !a.is_done()) {
            format!(
                "the request body stopped moving to the upstream {} for {limit} (upstream.response_timeout)",
                self.authority
            )
        } else {
            format!(
                "the upstream {} sent no response headers within {limit} (upstream.response_timeout)",
                self.authority
            )
        };
        self.metrics.upstream_failure(UpstreamFailure::Timeout);
        ProxyError::new(ErrorCode::UpstreamTimeout, message)
    }

    fn upstream_error(&self, error: &UpstreamError) -> ProxyError {
        let (code, message) = crate::upstream::describe_upstream_error(error, &self.authority);
        self.metrics
            .upstream_failure(crate::upstream::failure_kind(error));
        ProxyError::new(code, message)
    }
}

/// A request on its way upstream, kept whole for a replay.
#[derive(Debug)]
struct Outgoing {
    method: Method,
    uri: Uri,
    fields: OutFields,
    /// It asks for an upgrade (a WebSocket handshake).
    upgrade: bool,
}

/// The answer to a request whose framing the proxy refuses.
fn framing_error(problem: FramingProblem) -> ProxyError {
    match problem {
        FramingProblem::Lookalike => ProxyError::new(
            ErrorCode::AmbiguousHeader,
            "a header name is Content-Length or Transfer-Encoding with '_' for '-': servers that read '_' as '-' would frame the request differently, so it is refused; send the real name",
        ),
        FramingProblem::Coding => ProxyError::new(
            ErrorCode::TransferCodingNotSupported,
            "the request's Transfer-Encoding names a coding other than a single chunked: send the body chunked or with a Content-Length, and name any compression in Content-Encoding",
        ),
    }
}

fn bad_target() -> ProxyError {
    ProxyError::new(
        ErrorCode::BadRequestTarget,
        "the request target is not a valid path and query",
    )
}

fn is_identity(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim().eq_ignore_ascii_case("identity"))
}

/// Reads the status path's answer and replaces every copy of the token.
async fn mask_token(body: UpstreamBody, token: &CurrentToken) -> Result<Bytes, ProxyError> {
    let collected = Limited::new(body, MASK_LIMIT)
        .collect()
        .await
        .map_err(|e| {
            ProxyError::new(
                ErrorCode::UpstreamUnreachable,
                format!("the upstream's status answer could not be read to mask the token: {e}"),
            )
        })?;
    Ok(mask(&collected.to_bytes(), token.token.secret()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request's fields as they arrived go through the guard, the
    /// cleaning and the proxy's additions to the same bytes on the wire as
    /// its header map does: for heads written by hand and thousands
    /// mangled.
    #[test]
    fn raw_request_fields_are_guarded_and_sent_as_a_map() {
        use crate::config::GuardConfig;
        use crate::guard::Guard;
        use crate::http1::{encode_request_head, takes_trailers};
        use crate::server::lean::{Parsed, parse};
        use bytes::BytesMut;
        use headers::{clean_request, clean_request_fields};

        let seeds: [&[u8]; 5] = [
            b"GET /a?b=1 HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: curl/8\r\nAccept: */*\r\nX-A: 1\r\nx-a: 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-Proxy-Key: k3y-0123456789abcdef\r\nauthorization: Basic abc\r\nHOST: 127.0.0.1:8080\r\nTE: trailers, gzip\r\nTrailer: x\r\nAUTHORIZATION: Bearer other\r\n\r\n",
            b"HEAD /x HTTP/1.1\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\nProxy-Authorization: p\r\nhost: [::1]:8080\r\nUSER-AGENT: a\r\nuser-agent: b\r\nCookie: c=1\r\n\r\n",
            b"DELETE /y HTTP/1.1\r\nHost: evil.example\r\nOrigin: http://localhost:3000\r\nSec-Fetch-Site: cross-site\r\nContent-Length: 0\r\n\r\n",
            b"OPTIONS /z HTTP/1.1\r\nHost: localhost:8080\r\nHost: other\r\nOrigin: https://app.example\r\nConnection: close\r\nX-B: 1\r\nProxy-Connection: x\r\nX-B: 2\r\n\r\n",
        ];
        let listen = "127.0.0.1:8080".parse().ok();
        let guards = [
            Guard::new(&GuardConfig::default(), listen),
            Guard::new(
                &GuardConfig {
                    allowed_hosts: vec!["evil.example".into()],
                    allowed_origins: vec!["https://app.example".into()],
                    local_key: Some(crate::secret::LocalKey::new("k3y-0123456789abcdef")),
                },
                listen,
            ),
        ];
        let added = |trailers| Added {
            trailers,
            host: HeaderValue::from_static("api.example.com"),
            authorization: HeaderValue::from_static("Bearer token-1"),
            user_agent: HeaderValue::from_static("bearer-proxy/test"),
            // Set (replacing the client's) or not, with and without trailers.
            request_id: trailers.then(|| HeaderValue::from_static("0123abcd")),
        };
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let (mut compared, mut refused) = (0, 0);
        for case in 0..20_000 {
            let bytes = if case < seeds.len() {
                seeds[case].to_vec()
            } else {
                crate::http1::testing::mangled(&mut rng, &seeds)
            };
            let Parsed::Complete(head) = parse(&mut BytesMut::from(&bytes[..])) else {
                continue;
            };
            let trailers = head.trailers;
            let request = head.request;
            let Fields::Raw(raw) = &request.fields else {
                panic!("a small head came without its fields");
            };
            // What `http` makes of the bytes that httparse accepted.
            let mut map = match raw.to_map(4) {
                Ok(map) => map,
                Err(message) => panic!("{message}: {}", String::from_utf8_lossy(&bytes)),
            };
            assert_eq!(trailers, takes_trailers(&map));
            let mut with_map = Request::new(());
            *with_map.method_mut() = request.method.clone();
            *with_map.uri_mut() = request.uri.clone();
            *with_map.headers_mut() = map.clone();
            for guard in &guards {
                let by_fields = guard.check_head(&request).err().map(|e| e.code);
                let by_map = guard.check(&with_map).err().map(|e| e.code);
                assert_eq!(by_fields, by_map, "{}", String::from_utf8_lossy(&bytes));
                refused += usize::from(by_map.is_some());
            }
            let Fields::Raw(mut raw) = request.fields else {
                continue;
            };
            clean_request(&mut map);
            added(trailers).apply(&mut map);
            clean_request_fields(&mut raw);
            let raw = RawRequest {
                fields: raw,
                added: added(trailers),
            };
            let target = request.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let (mut by_map, mut by_fields) = (BytesMut::new(), BytesMut::new());
            encode_request_head(&mut by_map, &request.method, target, &map, false);
            encode_request_head(&mut by_fields, &request.method, target, &raw, false);
            assert_eq!(
                String::from_utf8_lossy(&by_fields),
                String::from_utf8_lossy(&by_map),
                "{}",
                String::from_utf8_lossy(&bytes)
            );
            assert_eq!(raw.to_map().ok(), Some(map));
            compared += 1;
        }
        // Enough heads were whole, and enough of them refused, to count.
        assert!(compared > 3_000 && refused > 1_000, "{compared} {refused}");
    }
}
