//! One request's record, from its head to the last byte of its answer:
//! counted in the worker's metrics shard, and written as an access-log
//! line, when the answer's body ends or is dropped (its client gone).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Uri, Version};

use super::request_id::{RequestId, trace_id};
use crate::config::{AccessLog, LogFormat};
use crate::http1::RequestHead;
use crate::metrics::{Finished, Shard};
use crate::reply::ErrorCode;
use crate::upstream::body::Activity;

/// How access-log lines are written, when they are.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Style {
    pub json: bool,
    pub query: bool,
}

impl Style {
    /// The style for these settings, or `None` with the log off.
    pub(crate) fn new(access: AccessLog, format: LogFormat) -> Option<Self> {
        access.on.then_some(Self {
            json: format == LogFormat::Json,
            query: access.query,
        })
    }
}

/// A request being answered.
#[derive(Debug)]
pub(crate) struct Exchange {
    shard: Arc<Shard>,
    started: Instant,
    method: Method,
    version: Version,
    /// The target as the client sent it, kept for the log line.
    target: Option<Uri>,
    style: Option<Style>,
    /// The client's, or one the proxy made.
    pub request_id: RequestId,
    /// From `traceparent`, for the log line.
    trace_id: Option<String>,
    pub status: u16,
    /// The proxy's own code, when it answered itself.
    pub code: Option<ErrorCode>,
    /// Until the upstream's answer head.
    pub upstream: Option<Duration>,
    /// Sent once more with a new token after a 401.
    pub replayed: bool,
    /// Body bytes held (a body that was read whole before sending).
    pub received: u64,
    /// A body streamed to the upstream: its bytes are counted as they go.
    pub upload: Option<Arc<Activity>>,
    /// Answer body bytes sent so far.
    pub sent: u64,
}

impl Exchange {
    pub(crate) fn start(shard: &Arc<Shard>, head: &RequestHead, style: Option<Style>) -> Self {
        shard.start();
        Self {
            shard: Arc::clone(shard),
            started: Instant::now(),
            method: head.method.clone(),
            version: head.version,
            target: style.map(|_| head.uri.clone()),
            style,
            request_id: RequestId::of(&head.fields),
            trace_id: style.and_then(|_| trace_id(&head.fields)),
            status: 0,
            code: None,
            upstream: None,
            replayed: false,
            received: 0,
            upload: None,
            sent: 0,
        }
    }

    /// The request's id, for log lines about it.
    pub(crate) fn request_id(&self) -> &str {
        self.request_id.as_str()
    }

    fn log(&self, style: Style, done: &Finished) {
        let (path, query) = match &self.target {
            Some(target) => (target.path(), target.query().filter(|_| style.query)),
            None => ("", None),
        };
        let millis = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let duration_ms = millis(done.duration);
        let upstream_ms = done.upstream.map(millis);
        let code = done.code.map(ErrorCode::as_str);
        if style.json {
            tracing::info!(
                target: "access",
                method = %done.method,
                path,
                query,
                version = ?self.version,
                status = done.status,
                code,
                duration_ms,
                upstream_ms,
                bytes_in = done.received_bytes,
                bytes_out = done.sent_bytes,
                replayed = self.replayed,
                request_id = self.request_id(),
                trace_id = self.trace_id.as_deref(),
                "access"
            );
            return;
        }
        tracing::info!(
            target: "access",
            request_id = self.request_id(),
            trace_id = self.trace_id.as_deref(),
            "{} {path}{}{} {:?} {}{}{} {duration_ms}ms{} in={} out={}{}",
            done.method,
            if query.is_some() { "?" } else { "" },
            query.unwrap_or_default(),
            self.version,
            done.status,
            if code.is_some() { " " } else { "" },
            code.unwrap_or_default(),
            upstream_ms
                .map(|ms| format!(" (upstream {ms}ms)"))
                .unwrap_or_default(),
            done.received_bytes,
            done.sent_bytes,
            if self.replayed { " replayed" } else { "" },
        );
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let received = self.received + self.upload.as_ref().map_or(0, |a| a.bytes());
        let done = Finished {
            method: std::mem::replace(&mut self.method, Method::GET),
            status: self.status,
            code: self.code,
            duration: self.started.elapsed(),
            upstream: self.upstream,
            received_bytes: received,
            sent_bytes: self.sent,
        };
        self.shard.finish(&done);
        if let Some(style) = self.style {
            self.log(style, &done);
        }
    }
}
