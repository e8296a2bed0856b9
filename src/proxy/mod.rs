//! Forwarding: each request goes to the one upstream with the bearer token
//! and the proxy's User-Agent, changed in nothing else that DESIGN.md does
//! not list; bodies stream both ways with backpressure.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_LENGTH, EXPECT, LOCATION,
};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use tokio::sync::Semaphore;

pub mod body;
pub mod client;
pub mod direct;
pub mod headers;

pub use crate::reply::{ErrorCode, ProxyError};
use body::{Activity, ProxyBody, TrackedBody};
use client::{Answer, ConnectTimeout, Upstream, UpstreamBody, UpstreamError};
use direct::{Added, RawFields, RawRequest};
use headers::LocationRewriter;

use crate::config::Config;
use crate::guard::Guard;
use crate::token::{CurrentToken, LocalToken, Renewal, TokenSlot};

/// Largest status-path answer that is read whole to mask the token in it.
const MASK_LIMIT: usize = 1024 * 1024;
/// What replaces the token where the upstream echoes it.
const TOKEN_MASK: &str = "[masked]";

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
    min_forced_interval: Duration,
    /// How long a request refused with 401 waits for the forced renewal.
    renewal_wait: Duration,
}

impl Proxy {
    /// A proxy to the configured upstream, sending the tokens held in `slot`.
    pub fn new(config: &Config, tls: rustls::ClientConfig, slot: TokenSlot, guard: Guard) -> Self {
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
                    .map(|p| normalize_path(p))
                    .collect(),
                mask_tails: config
                    .proxy
                    .mask_token_in
                    .iter()
                    .map(|p| {
                        let normalized = normalize_path(p);
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
        shared.client = Arc::new(shared.client.with_own_pool());
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

impl hyper::service::Service<Request<Incoming>> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let shared = Arc::clone(&self.inner);
        Box::pin(async move { Ok(shared.answer(request.map(Some), None, false).await.0) })
    }
}

impl crate::serve::Bodiless for Proxy {
    fn call_bodiless(
        &self,
        request: Request<()>,
        fields: Option<RawFields>,
    ) -> impl Future<Output = (Response<ProxyBody>, Option<RawFields>)> + Send + '_ {
        self.inner.answer(request.map(|()| None), fields, true)
    }
}

impl Shared {
    /// The answer to `request` (`None`: it has no body): the upstream's,
    /// or the proxy's error. With `fields`, the request's header fields are
    /// those, as they arrived, and its map is empty. With `raw`, the
    /// upstream's header fields may come as they arrived, cleaned, instead
    /// of in the response's map.
    async fn answer(
        &self,
        request: Request<Option<Incoming>>,
        fields: Option<RawFields>,
        raw: bool,
    ) -> (Response<ProxyBody>, Option<RawFields>) {
        match self.forward(request, fields, raw).await {
            Ok(answer) => answer,
            Err(error) => (
                error.to_response().map(|body| ProxyBody::full(body, None)),
                None,
            ),
        }
    }

    async fn forward(
        &self,
        request: Request<Option<Incoming>>,
        fields: Option<RawFields>,
        raw: bool,
    ) -> Result<(Response<ProxyBody>, Option<RawFields>), ProxyError> {
        match &fields {
            Some(fields) => self.guard.check_fields(&request, fields)?,
            None => self.guard.check(&request)?,
        }
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
        let (mut parts, body) = request.into_parts();
        let path_and_query = self.join(parts.uri.path_and_query())?;
        // Masked paths are matched as the client wrote them and as the
        // upstream sees them (its base path included).
        let masked = parts.method != http::Method::HEAD
            && !self.mask_paths.is_empty()
            && [parts.uri.path(), path_and_query.path()]
                .iter()
                .any(|path| {
                    self.may_be_masked(path) && self.mask_paths.contains(&normalize_path(path))
                });
        parts.uri = Uri::from_parts({
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
        // Hyper's client speaks what the connection negotiated; the version
        // the client used towards the proxy says nothing about that.
        parts.version = Version::HTTP_11;
        // `TE: trailers` is the one TE value worth passing on: gRPC and other
        // trailer users need the upstream to know the client can take them.
        let trailers = match &fields {
            Some(fields) => headers::takes_trailers(fields),
            None => headers::takes_trailers(&parts.headers),
        };
        let expect_continue = parts.headers.get(EXPECT).cloned();
        let added = Added {
            trailers,
            host: self.host.clone(),
            authorization: token.header.clone(),
            user_agent: self.user_agent.clone(),
        };
        // A body that is already over is no body.
        let body = body.filter(|body| !body.is_end_stream());
        // Fields as they arrived (a request without a body, from the lean
        // server) are written out so, cleaned: no map.
        let mut out = match fields {
            Some(mut fields) if !masked && body.is_none() && fields.is_small() => {
                headers::clean_request_fields(&mut fields);
                Some(RawRequest { fields, added })
            }
            fields => {
                if let Some(fields) = fields {
                    // httparse and `http` accept the same bytes: not expected.
                    parts.headers = fields
                        .to_map(4)
                        .map_err(|message| ProxyError::new(ErrorCode::BadRequestTarget, message))?;
                }
                headers::clean_request(&mut parts.headers);
                added.apply(&mut parts.headers);
                if masked {
                    // The answer is read to mask the token in it: ask for it uncompressed.
                    parts.headers.remove(ACCEPT_ENCODING);
                }
                None
            }
        };
        // A masked answer's fields are looked at and changed: in a map.
        let raw = raw && !masked;
        let (answer, token) = match body {
            Some(body) if !self.can_replay(&expect_continue, &parts.headers) => {
                let (body, activity) = TrackedBody::new(body);
                let request = outgoing(parts.method, parts.uri, parts.headers, Either::Left(body));
                // Boxed: streaming a body is the rarer path, and the
                // future of every request is as large as its largest state.
                let answer = Box::pin(self.send(self.client.request(request), activity)).await?;
                if answer.response.status() == StatusCode::UNAUTHORIZED {
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
                    set_authorization(&mut parts, out.as_mut(), &held_token);
                }
                let token = held_token;
                self.send_replayable(parts, out, held, token, raw).await?
            }
        };

        let Answer {
            response,
            connection,
            fields,
        } = answer;
        let (mut parts, body) = response.into_parts();
        parts.version = Version::HTTP_11;
        if let Some(mut fields) = fields {
            headers::clean_response_fields(&mut fields);
            let rewritten = fields
                .values(headers::Known::Location)
                .next()
                .and_then(headers::visible_ascii)
                .is_some_and(|location| self.locations.rewrite(location).is_some());
            if !rewritten && fields.is_small() {
                // Written out as they came: no map, nothing changed.
                let body = ProxyBody::upstream(body, permit, connection);
                return Ok((Response::from_parts(parts, body), Some(fields)));
            }
            // Rare: the map has the rewriting, and no cost grows faster
            // than the head.
            parts.headers = fields
                .into_map()
                .map_err(|message| self.upstream_error(&UpstreamError::invalid_answer(message)))?;
        }
        headers::clean_response(&mut parts.headers);
        if let Some(location) = parts.headers.get(LOCATION).and_then(|v| v.to_str().ok())
            && let Some(rewritten) = self.locations.rewrite(location)
            && let Ok(value) = HeaderValue::from_str(&rewritten)
        {
            parts.headers.insert(LOCATION, value);
        }
        if masked {
            if !is_identity(&parts.headers) {
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
            drop(connection);
            parts.headers.remove(CONTENT_LENGTH);
            // The body changed: validators of the old one no longer hold.
            parts.headers.remove(http::header::ETAG);
            return Ok((
                Response::from_parts(parts, ProxyBody::full(body, permit)),
                None,
            ));
        }
        Ok((
            Response::from_parts(parts, ProxyBody::upstream(body, permit, connection)),
            None,
        ))
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

    /// Whether a request with a body can be sent again after an upstream
    /// 401: one small enough to hold back (by its Content-Length) and not
    /// announced with `Expect: 100-continue` (its sender waits to be asked).
    /// A request without a body always can.
    fn can_replay(&self, expect: &Option<HeaderValue>, headers: &http::HeaderMap) -> bool {
        let length = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        expect.is_none() && length.is_some_and(|length| length <= self.replay_buffer)
    }

    /// Sends a request whose body is held, and if the upstream refuses its
    /// token with 401, renews the token (single flight, rate-limited) and
    /// sends it once more. Returns the answer and the token it carried.
    async fn send_replayable(
        &self,
        mut head: http::request::Parts,
        mut fields: Option<RawRequest>,
        body: Bytes,
        token: Arc<CurrentToken>,
        raw: bool,
    ) -> Result<(Answer, Arc<CurrentToken>), ProxyError> {
        let answer = self.send_held(&head, fields.as_ref(), &body, raw).await?;
        if answer.response.status() != StatusCode::UNAUTHORIZED {
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
            tracing::debug!("the upstream answered 401; no new token now, so the 401 is passed on");
            return Ok((answer, token));
        };
        drop(answer);
        tracing::info!(
            generation = renewed.generation,
            "the upstream answered 401: replaying the request with a new token"
        );
        set_authorization(&mut head, fields.as_mut(), &renewed);
        Ok((
            Box::pin(self.send_held(&head, fields.as_ref(), &body, raw)).await?,
            renewed,
        ))
    }

    /// Sends a request whose body is held, keeping `head` and `body` for a
    /// replay: without a body, nothing is copied (and with `raw`, the
    /// answer's fields may come as they arrived).
    async fn send_held(
        &self,
        head: &http::request::Parts,
        fields: Option<&RawRequest>,
        body: &Bytes,
        raw: bool,
    ) -> Result<Answer, ProxyError> {
        if body.is_empty() {
            return self
                .send(self.client.request_bodiless(head, fields, raw), None)
                .await;
        }
        let mut request = copy_of(head, Either::Right(Full::new(body.clone())));
        if let Some(fields) = fields {
            // Not expected: fields as they arrived come without a body.
            *request.headers_mut() = fields
                .to_map()
                .map_err(|message| ProxyError::new(ErrorCode::BadRequestTarget, message))?;
        }
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
        tracing::warn!(code = ErrorCode::UpstreamTimeout.as_str(), "{message}");
        ProxyError::new(ErrorCode::UpstreamTimeout, message)
    }

    fn upstream_error(&self, error: &UpstreamError) -> ProxyError {
        let (code, message) = describe_upstream_error(error, &self.authority);
        tracing::warn!(code = code.as_str(), "{message}");
        ProxyError::new(code, message)
    }
}

/// The documented code and a sentence for a failed upstream request.
pub fn describe_upstream_error(
    error: &UpstreamError,
    authority: &Authority,
) -> (ErrorCode, String) {
    let (cause, connecting): (&(dyn std::error::Error + 'static), bool) = match error {
        UpstreamError::Connect(cause) => (cause.as_ref(), true),
        UpstreamError::Request(cause) => (cause.as_ref(), false),
    };
    let detail = crate::error_chain::chain(cause);
    if crate::error_chain::find::<ConnectTimeout>(cause).is_some() {
        (
            ErrorCode::UpstreamTimeout,
            format!("{detail} (upstream.connect_timeout)"),
        )
    } else if let Some(tls) = crate::tls::describe_failure(cause) {
        (
            ErrorCode::UpstreamUnreachable,
            format!("TLS with the upstream {authority} failed: {tls}"),
        )
    } else if let Some(direct::ExchangeError::Invalid(problem)) = crate::error_chain::find(cause) {
        (
            ErrorCode::UpstreamUnreachable,
            format!("the upstream {authority} sent an invalid response: {problem}"),
        )
    } else if connecting {
        (
            ErrorCode::UpstreamUnreachable,
            format!("cannot connect to the upstream {authority}: {detail}"),
        )
    } else {
        (
            ErrorCode::UpstreamUnreachable,
            format!("the upstream {authority} closed the connection without a response: {detail}"),
        )
    }
}

/// The body sent upstream: the client's stream, or a body held back for replay.
pub(crate) type OutBody = Either<TrackedBody<Incoming>, Full<Bytes>>;

/// A request for the upstream from its parts (the client's extensions stay behind).
fn outgoing(
    method: http::Method,
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

/// Replaces the token that a request carries, in its map or its fields.
fn set_authorization(
    head: &mut http::request::Parts,
    fields: Option<&mut RawRequest>,
    token: &CurrentToken,
) {
    match fields {
        Some(fields) => fields.added.authorization = token.header.clone(),
        None => {
            head.headers.insert(AUTHORIZATION, token.header.clone());
        }
    }
}

/// A copy of `head` with `body`, for a request that may be sent again
/// (after a 401, or on HTTP/2 when `head` is only borrowed).
fn copy_of(head: &http::request::Parts, body: OutBody) -> Request<OutBody> {
    outgoing(
        head.method.clone(),
        head.uri.clone(),
        head.headers.clone(),
        body,
    )
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

/// `body` with the token masked: in JSON, every `token` field and every
/// string holding the token become `"[masked]"`; in anything else, every
/// copy of the token's bytes.
pub fn mask(body: &Bytes, secret: &str) -> Bytes {
    if secret.is_empty() {
        return body.clone();
    }
    let masked_json = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(mut json) => {
            let changed = mask_json(&mut json, secret);
            changed.then(|| serde_json::to_vec(&json).ok()).flatten()
        }
        Err(_) => None,
    };
    let body = masked_json.map_or_else(|| body.clone(), Bytes::from);
    // Whatever the JSON walk did not reach (a key, a non-JSON body): bytes.
    replace_bytes(&body, secret.as_bytes())
}

fn replace_bytes(body: &Bytes, secret: &[u8]) -> Bytes {
    if !body.windows(secret.len()).any(|w| w == secret) {
        return body.clone();
    }
    let mut out = Vec::with_capacity(body.len());
    let mut rest = &body[..];
    while let Some(at) = rest.windows(secret.len()).position(|w| w == secret) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(TOKEN_MASK.as_bytes());
        rest = &rest[at + secret.len()..];
    }
    out.extend_from_slice(rest);
    Bytes::from(out)
}

/// Masks in place; whether anything changed.
fn mask_json(value: &mut serde_json::Value, secret: &str) -> bool {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut changed = false;
            for (key, item) in map.iter_mut() {
                if key.eq_ignore_ascii_case("token") && item.is_string() {
                    *item = Value::String(TOKEN_MASK.to_owned());
                    changed = true;
                } else {
                    changed |= mask_json(item, secret);
                }
            }
            changed
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, item| mask_json(item, secret) | changed),
        Value::String(text) if text.contains(secret) => {
            *text = text.replace(secret, TOKEN_MASK);
            true
        }
        _ => false,
    }
}

/// A path as compared with `proxy.mask_token_in`: percent-escapes decoded,
/// repeated slashes collapsed, ASCII lower-cased and a trailing slash
/// dropped, so `/api//status`, `/api/%73tatus`, `/API/Status` and
/// `/api/status/` all match (servers that route them alike would echo the
/// token for each).
pub fn normalize_path(path: &str) -> Vec<u8> {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).and_then(|b| hex(*b)),
                bytes.get(i + 2).and_then(|b| hex(*b)),
            )
        {
            decoded.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    let mut out = Vec::with_capacity(decoded.len());
    for byte in decoded {
        if byte == b'/' && out.last() == Some(&b'/') {
            continue;
        }
        out.push(byte.to_ascii_lowercase());
    }
    if out.len() > 1 && out.last() == Some(&b'/') {
        out.pop();
    }
    out
}
