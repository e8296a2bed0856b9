//! One request's record, from its head to the last byte of its answer:
//! counted in the worker's metrics shard, and written as an access-log
//! line, when the answer's body ends or is dropped (its client gone).
//!
//! The lines are written by hand into the worker's own buffer, as
//! tracing-subscriber would write them (text or JSON), and handed to the
//! log's writer thread in batches: at 16 KiB, and every 200 ms. Through
//! tracing, a line cost more than the rest of the request.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tracing_appender::non_blocking::NonBlocking;

use http::{Method, Uri, Version};

use super::request_id::{RequestId, trace_id};
use crate::config::{AccessLog, LogFormat};
use crate::http1::RequestHead;
use crate::http1::field::put_decimal as number;
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
    /// The worker's buffer, when lines are written in batches.
    lines: Option<Arc<Lines>>,
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
    pub(crate) fn start(
        shard: &Arc<Shard>,
        head: &RequestHead,
        style: Option<Style>,
        lines: Option<&Arc<Lines>>,
    ) -> Self {
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
            lines: style.and(lines).cloned(),
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

    /// The line, into the worker's buffer.
    fn write(&self, lines: &Lines, style: Style, done: &Finished) {
        let (path, query) = match &self.target {
            Some(target) => (target.path(), target.query().filter(|_| style.query)),
            None => ("", None),
        };
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let code = code_of(done);
        let version = match self.version {
            Version::HTTP_10 => "HTTP/1.0",
            Version::HTTP_2 => "HTTP/2.0",
            _ => "HTTP/1.1",
        };
        lines.push(|out, timestamp| {
            if style.json {
                out.extend_from_slice(b"{\"timestamp\":\"");
                out.extend_from_slice(timestamp);
                out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"access\",\"method\":");
                json_string(out, done.method.as_str());
                out.extend_from_slice(b",\"path\":");
                json_string(out, path);
                if let Some(query) = query {
                    out.extend_from_slice(b",\"query\":");
                    json_string(out, query);
                }
                out.extend_from_slice(b",\"version\":\"");
                out.extend_from_slice(version.as_bytes());
                out.extend_from_slice(b"\",\"status\":");
                number(out, u64::from(done.status));
                if let Some(code) = code {
                    out.extend_from_slice(b",\"code\":\"");
                    out.extend_from_slice(code.as_bytes());
                    out.push(b'"');
                }
                out.extend_from_slice(b",\"duration_ms\":");
                millis(out, micros(done.duration));
                if let Some(upstream) = done.upstream {
                    out.extend_from_slice(b",\"upstream_ms\":");
                    millis(out, micros(upstream));
                }
                out.extend_from_slice(b",\"bytes_in\":");
                number(out, done.received_bytes);
                out.extend_from_slice(b",\"bytes_out\":");
                number(out, done.sent_bytes);
                out.extend_from_slice(if self.replayed {
                    b",\"replayed\":true"
                } else {
                    b",\"replayed\":false"
                });
                out.extend_from_slice(b",\"request_id\":");
                json_string(out, self.request_id());
                if let Some(trace) = &self.trace_id {
                    out.extend_from_slice(b",\"trace_id\":");
                    json_string(out, trace);
                }
                out.extend_from_slice(b",\"target\":\"access\"}\n");
                return;
            }
            out.extend_from_slice(timestamp);
            out.extend_from_slice(b"  INFO access: ");
            out.extend_from_slice(done.method.as_str().as_bytes());
            out.push(b' ');
            out.extend_from_slice(path.as_bytes());
            if let Some(query) = query {
                out.push(b'?');
                out.extend_from_slice(query.as_bytes());
            }
            out.push(b' ');
            out.extend_from_slice(version.as_bytes());
            out.push(b' ');
            number(out, u64::from(done.status));
            if let Some(code) = code {
                out.push(b' ');
                out.extend_from_slice(code.as_bytes());
            }
            out.push(b' ');
            millis(out, micros(done.duration));
            out.extend_from_slice(b"ms");
            if let Some(upstream) = done.upstream {
                out.extend_from_slice(b" (upstream ");
                millis(out, micros(upstream));
                out.extend_from_slice(b"ms)");
            }
            out.extend_from_slice(b" in=");
            number(out, done.received_bytes);
            out.extend_from_slice(b" out=");
            number(out, done.sent_bytes);
            if self.replayed {
                out.extend_from_slice(b" replayed");
            }
            out.extend_from_slice(b" request_id=");
            out.extend_from_slice(self.request_id().as_bytes());
            if let Some(trace) = &self.trace_id {
                out.extend_from_slice(b" trace_id=");
                out.extend_from_slice(trace.as_bytes());
            }
            out.push(b'\n');
        });
    }

    /// The line as a tracing event, where the log has no writer of its
    /// own (the proxy run inside another program, as the tests do).
    fn log(&self, style: Style, done: &Finished) {
        let (path, query) = match &self.target {
            Some(target) => (target.path(), target.query().filter(|_| style.query)),
            None => ("", None),
        };
        let millis = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let duration_ms = millis(done.duration);
        let upstream_ms = done.upstream.map(millis);
        let code = code_of(done);
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
        // No status: the client left before an answer head was ready.
        let client_closed = self.status == 0;
        let done = Finished {
            method: std::mem::replace(&mut self.method, Method::GET),
            status: if client_closed { 499 } else { self.status },
            client_closed,
            code: self.code,
            duration: self.started.elapsed(),
            upstream: self.upstream,
            received_bytes: received,
            sent_bytes: self.sent,
        };
        self.shard.finish(&done);
        match (self.style, &self.lines) {
            (Some(style), Some(lines)) => self.write(lines, style, &done),
            (Some(style), None) => self.log(style, &done),
            (None, _) => {}
        }
    }
}

/// The code a line carries: the proxy's own, or `client_closed`.
fn code_of(done: &Finished) -> Option<&'static str> {
    if done.client_closed {
        Some("client_closed")
    } else {
        done.code.map(ErrorCode::as_str)
    }
}

/// Batches are handed to the writer at this size...
const FLUSH_AT: usize = 8 * 1024;
/// ...and at least this often.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// One worker's access-log lines, waiting to be handed to the log's
/// writer thread. Only its worker and its flushing task lock it.
#[derive(Debug)]
pub(crate) struct Lines {
    batch: Mutex<Batch>,
}

#[derive(Debug)]
struct Batch {
    text: Vec<u8>,
    writer: NonBlocking,
    /// The timestamp's first 19 characters (`2026-12-06T04:41:03`) for
    /// the second they were made for.
    second: u64,
    prefix: [u8; 19],
}

impl Lines {
    /// Lines for `writer`, flushed by a task of the current runtime (the
    /// worker's) until they are dropped.
    pub(crate) fn start(writer: NonBlocking) -> Arc<Self> {
        let lines = Arc::new(Self {
            batch: Mutex::new(Batch {
                text: Vec::with_capacity(FLUSH_AT + 1024),
                writer,
                second: u64::MAX,
                prefix: [b'0'; 19],
            }),
        });
        let weak = Arc::downgrade(&lines);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(FLUSH_EVERY);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(lines) = weak.upgrade() else { break };
                lines.flush();
            }
        });
        lines
    }

    /// Adds a line, written by `line` after the timestamp it is given.
    fn push(&self, line: impl FnOnce(&mut Vec<u8>, &[u8])) {
        let Ok(mut batch) = self.batch.lock() else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        if now.as_secs() != batch.second {
            batch.second = now.as_secs();
            let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
            let text = humantime::format_rfc3339_seconds(whole).to_string();
            if let Some(prefix) = text.as_bytes().get(..19) {
                batch.prefix.copy_from_slice(prefix);
            }
        }
        let mut timestamp = [0u8; 27];
        timestamp[..19].copy_from_slice(&batch.prefix);
        timestamp[19] = b'.';
        let mut micros = now.subsec_micros();
        for digit in timestamp[20..26].iter_mut().rev() {
            *digit = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        timestamp[26] = b'Z';
        line(&mut batch.text, &timestamp);
        if batch.text.len() >= FLUSH_AT {
            batch.flush();
        }
    }

    fn flush(&self) {
        if let Ok(mut batch) = self.batch.lock() {
            batch.flush();
        }
    }
}

impl Batch {
    fn flush(&mut self) {
        if !self.text.is_empty() {
            // One message to the writer thread: it never blocks (lossy).
            let _ = self.writer.write_all(&self.text);
            self.text.clear();
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Microseconds as milliseconds with three decimals.
fn millis(out: &mut Vec<u8>, micros: u64) {
    number(out, micros / 1000);
    out.push(b'.');
    let rest = micros % 1000;
    out.extend_from_slice(&[
        b'0' + (rest / 100) as u8,
        b'0' + (rest / 10 % 10) as u8,
        b'0' + (rest % 10) as u8,
    ]);
}

/// A JSON string: quoted, with `"`, `\\` and control characters escaped.
fn json_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    for byte in text.bytes() {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0..=0x1f => {
                let _ = write!(out, "\\u{byte:04x}");
            }
            _ => out.push(byte),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_strings_are_written_as_json_has_them() {
        let mut out = Vec::new();
        number(&mut out, 0);
        out.push(b' ');
        number(&mut out, 18_446_744_073_709_551_615);
        out.push(b' ');
        millis(&mut out, 12_034);
        out.push(b' ');
        millis(&mut out, 7);
        out.push(b' ');
        json_string(&mut out, "a\"b\\c\u{1}");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "0 18446744073709551615 12.034 0.007 \"a\\\"b\\\\c\\u0001\""
        );
        let parsed: serde_json::Value =
            serde_json::from_slice(&out[out.len() - 16..]).unwrap_or_default();
        assert_eq!(parsed, "a\"b\\c\u{1}");
    }
}
