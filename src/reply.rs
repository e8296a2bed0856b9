//! The errors the proxy itself answers with (README's error table): one status and code each, a
//! JSON body with a sentence a person can act on, and `x-bearer-proxy-error`,
//! so they are never confused with the upstream's.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderName, HeaderValue, Response, StatusCode};

/// The header that marks a response as the proxy's own.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-bearer-proxy-error");

/// The documented error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 400: absolute-form target to another host, CONNECT, dot-segment, bad Host.
    BadRequestTarget,
    /// 403: Host not allowed.
    HostNotAllowed,
    /// 403: foreign Origin.
    OriginNotAllowed,
    /// 401: local key missing or wrong.
    LocalKeyRequired,
    /// 405: TRACE.
    MethodNotAllowed,
    /// 400: a header name that is a framing field's with `_` for `-`.
    AmbiguousHeader,
    /// 501: a transfer coding other than one `chunked`.
    TransferCodingNotSupported,
    /// 501: protocol upgrade.
    UpgradeNotSupported,
    /// 503: too many requests in flight.
    Overloaded,
    /// 503: no valid token.
    TokenUnavailable,
    /// 502: upstream refused, unreachable, TLS failure.
    UpstreamUnreachable,
    /// 504: upstream connect or response-header timeout.
    UpstreamTimeout,
}

impl ErrorCode {
    /// Every code, in the order of [`index`](Self::index).
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::BadRequestTarget,
        ErrorCode::HostNotAllowed,
        ErrorCode::OriginNotAllowed,
        ErrorCode::LocalKeyRequired,
        ErrorCode::MethodNotAllowed,
        ErrorCode::AmbiguousHeader,
        ErrorCode::TransferCodingNotSupported,
        ErrorCode::UpgradeNotSupported,
        ErrorCode::Overloaded,
        ErrorCode::TokenUnavailable,
        ErrorCode::UpstreamUnreachable,
        ErrorCode::UpstreamTimeout,
    ];

    /// Its place in [`ALL`](Self::ALL).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The code as it appears in the body and header.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequestTarget => "bad_request_target",
            ErrorCode::HostNotAllowed => "host_not_allowed",
            ErrorCode::OriginNotAllowed => "origin_not_allowed",
            ErrorCode::LocalKeyRequired => "local_key_required",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::AmbiguousHeader => "ambiguous_header",
            ErrorCode::TransferCodingNotSupported => "transfer_coding_not_supported",
            ErrorCode::UpgradeNotSupported => "upgrade_not_supported",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::TokenUnavailable => "token_unavailable",
            ErrorCode::UpstreamUnreachable => "upstream_unreachable",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
        }
    }

    /// The HTTP status it is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequestTarget | ErrorCode::AmbiguousHeader => StatusCode::BAD_REQUEST,
            ErrorCode::HostNotAllowed | ErrorCode::OriginNotAllowed => StatusCode::FORBIDDEN,
            ErrorCode::LocalKeyRequired => StatusCode::UNAUTHORIZED,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::UpgradeNotSupported | ErrorCode::TransferCodingNotSupported => {
                StatusCode::NOT_IMPLEMENTED
            }
            ErrorCode::Overloaded | ErrorCode::TokenUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            ErrorCode::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// One refusal or failure, ready to be answered.
#[derive(Debug, Clone)]
pub struct ProxyError {
    /// Which one.
    pub code: ErrorCode,
    /// One sentence a person can act on.
    pub message: String,
    /// `Retry-After` in seconds, for 503s.
    pub retry_after: Option<u64>,
    /// The client's own request was broken (its body could not be read):
    /// answered with a plain 400 like other malformed requests, not a JSON error.
    pub client_fault: bool,
}

impl ProxyError {
    /// An error without `Retry-After`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
            client_fault: false,
        }
    }

    /// Adds `Retry-After` (at least one second).
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    /// The client broke its own request off: nothing was or will be forwarded.
    pub fn client_fault() -> Self {
        Self {
            client_fault: true,
            ..Self::new(
                ErrorCode::BadRequestTarget,
                "the request body could not be read",
            )
        }
    }

    /// The response: status, JSON body, `x-bearer-proxy-error`.
    pub fn to_response(&self) -> Response<Bytes> {
        if self.client_fault {
            let mut response = Response::new(Bytes::new());
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return response;
        }
        let body = serde_json::json!({ "error": self.code.as_str(), "message": self.message });
        let mut response = Response::new(Bytes::from(body.to_string()));
        *response.status_mut() = self.code.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.code.as_str()));
        if let Some(secs) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.code == ErrorCode::LocalKeyRequired {
            headers.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("X-Proxy-Key realm=\"bearer-proxy\""),
            );
        }
        response
    }
}
