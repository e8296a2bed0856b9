//! What the proxy counts, for `/metrics` (Prometheus' text format).
//!
//! Recording is a few relaxed atomic additions on the worker's own
//! [`Shard`]: no lock, and no cache line shared between workers on the
//! request path. A scrape sums the shards. Every label has a fixed, small
//! set of values (methods, status classes, error codes, failure kinds):
//! never a path, a query, an address or an id.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;

use crate::reply::ErrorCode;

/// The method label: the standard methods, else `other`.
const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other",
];

fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        Method::CONNECT => 7,
        Method::TRACE => 8,
        _ => 9,
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Upper bounds of the duration histograms' buckets, in seconds: from
/// loopback's tenth of a millisecond to a minute.
const BOUNDS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// [`BOUNDS`] in nanoseconds, for recording without floating point.
const BOUNDS_NANOS: [u64; BOUNDS.len()] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
];

/// Why the upstream gave no answer, as the `kind` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// No connection: refused, unreachable, DNS, a forward proxy.
    Connect,
    /// The TLS handshake failed.
    Tls,
    /// The connect deadline or the response deadline passed.
    Timeout,
    /// The upstream answered something that is not HTTP.
    InvalidAnswer,
    /// The connection closed or was reset without an answer.
    Reset,
}

impl UpstreamFailure {
    const ALL: [Self; 5] = [
        Self::Connect,
        Self::Tls,
        Self::Timeout,
        Self::InvalidAnswer,
        Self::Reset,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Tls => "tls",
            Self::Timeout => "timeout",
            Self::InvalidAnswer => "invalid_answer",
            Self::Reset => "reset",
        }
    }
}

/// What became of a request replayed after a 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// The new token was accepted.
    Accepted,
    /// The upstream refused the new token too.
    RefusedAgain,
    /// The replay failed (no answer).
    Failed,
}

impl Replay {
    const ALL: [Self; 3] = [Self::Accepted, Self::RefusedAgain, Self::Failed];

    fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::RefusedAgain => "refused_again",
            Self::Failed => "failed",
        }
    }
}

/// The upstream connection's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

const PROTOCOLS: [&str; 2] = ["http/1.1", "h2"];

/// A histogram of durations: a count per bucket (not cumulative: summed
/// when rendered) and the sum in nanoseconds.
#[derive(Debug)]
struct Histogram {
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn record(&self, duration: Duration) {
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_NANOS
            .iter()
            .position(|bound| nanos <= *bound)
            .unwrap_or(BOUNDS.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    fn add_into(&self, counts: &mut [u64; BOUNDS.len() + 1], sum_nanos: &mut u64) {
        for (total, bucket) in counts.iter_mut().zip(&self.buckets) {
            *total += bucket.load(Relaxed);
        }
        *sum_nanos = sum_nanos.wrapping_add(self.sum_nanos.load(Relaxed));
    }
}

fn counters<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

/// One worker's counts, on cache lines of its own.
#[derive(Debug)]
#[repr(align(128))]
pub struct Shard {
    started: AtomicU64,
    /// Answered by the upstream: by method and status class.
    by_class: [[AtomicU64; 5]; METHODS.len()],
    /// Answered by the proxy itself: by method and error code.
    by_code: [[AtomicU64; ErrorCode::ALL.len()]; METHODS.len()],
    /// Left by their client before an answer head was ready, by method.
    closed: [AtomicU64; METHODS.len()],
    duration: Histogram,
    upstream_duration: Histogram,
    received_bytes: AtomicU64,
    sent_bytes: AtomicU64,
    connections_opened: AtomicU64,
    connections_closed: AtomicU64,
    upstream_opened: [AtomicU64; 2],
    upstream_closed: [AtomicU64; 2],
    upstream_failures: [AtomicU64; UpstreamFailure::ALL.len()],
    replays: [AtomicU64; Replay::ALL.len()],
}

impl Default for Shard {
    fn default() -> Self {
        Self {
            started: AtomicU64::new(0),
            by_class: std::array::from_fn(|_| counters()),
            by_code: std::array::from_fn(|_| counters()),
            closed: counters(),
            duration: Histogram::default(),
            upstream_duration: Histogram::default(),
            received_bytes: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
            connections_opened: AtomicU64::new(0),
            connections_closed: AtomicU64::new(0),
            upstream_opened: counters(),
            upstream_closed: counters(),
            upstream_failures: counters(),
            replays: counters(),
        }
    }
}

/// A request that has begun, as [`Shard::finish`] records it.
#[derive(Debug, Clone)]
pub struct Finished {
    pub method: Method,
    /// 499 when the client left before the answer (as nginx logs it).
    pub status: u16,
    /// The client left before an answer head was ready.
    pub client_closed: bool,
    /// The proxy's own code, when it answered itself.
    pub code: Option<ErrorCode>,
    pub duration: Duration,
    /// Until the upstream's answer head, when the upstream was asked.
    pub upstream: Option<Duration>,
    pub received_bytes: u64,
    pub sent_bytes: u64,
}

impl Shard {
    /// A request has come in (in flight until [`finish`](Self::finish)).
    pub fn start(&self) {
        self.started.fetch_add(1, Relaxed);
    }

    /// A request has been answered in full (or its client has gone).
    pub fn finish(&self, done: &Finished) {
        let method = method_index(&done.method);
        match done.code {
            _ if done.client_closed => self.closed[method].fetch_add(1, Relaxed),
            Some(code) => self.by_code[method][code.index()].fetch_add(1, Relaxed),
            None => {
                let class = usize::from(done.status / 100).clamp(1, 5) - 1;
                self.by_class[method][class].fetch_add(1, Relaxed)
            }
        };
        self.duration.record(done.duration);
        if let Some(upstream) = done.upstream {
            self.upstream_duration.record(upstream);
        }
        self.received_bytes.fetch_add(done.received_bytes, Relaxed);
        self.sent_bytes.fetch_add(done.sent_bytes, Relaxed);
    }

    /// A client connection opened; closed when the guard is dropped.
    pub fn connection(self: &Arc<Self>) -> Open {
        self.connections_opened.fetch_add(1, Relaxed);
        Open {
            shard: Arc::clone(self),
            what: OpenKind::Client,
        }
    }

    /// An upstream connection opened; closed when the guard is dropped.
    pub fn upstream_connection(self: &Arc<Self>, protocol: Protocol) -> Open {
        self.upstream_opened[protocol as usize].fetch_add(1, Relaxed);
        Open {
            shard: Arc::clone(self),
            what: OpenKind::Upstream(protocol),
        }
    }

    pub fn upstream_failure(&self, kind: UpstreamFailure) {
        self.upstream_failures[kind as usize].fetch_add(1, Relaxed);
    }

    pub fn replay(&self, result: Replay) {
        self.replays[result as usize].fetch_add(1, Relaxed);
    }
}

#[derive(Debug)]
enum OpenKind {
    Client,
    Upstream(Protocol),
}

/// An open connection, counted as closed when dropped.
#[derive(Debug)]
pub struct Open {
    shard: Arc<Shard>,
    what: OpenKind,
}

impl Drop for Open {
    fn drop(&mut self) {
        match self.what {
            OpenKind::Client => self.shard.connections_closed.fetch_add(1, Relaxed),
            OpenKind::Upstream(protocol) => {
                self.shard.upstream_closed[protocol as usize].fetch_add(1, Relaxed)
            }
        };
    }
}

/// Every worker's shard.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    shards: Arc<Mutex<Vec<Arc<Shard>>>>,
}

impl Registry {
    /// A new shard, for one worker (or one test).
    pub fn shard(&self) -> Arc<Shard> {
        let shard = Arc::new(Shard::default());
        if let Ok(mut shards) = self.shards.lock() {
            shards.push(Arc::clone(&shard));
        }
        shard
    }

    /// Every shard as it is now, read without the lock held.
    fn snapshot(&self) -> Vec<Arc<Shard>> {
        self.shards
            .lock()
            .map(|shards| shards.clone())
            .unwrap_or_default()
    }

    /// The request metrics in Prometheus' text format (version 0.0.4).
    pub fn render(&self, out: &mut String) {
        let shards = self.snapshot();
        let sum = |read: &dyn Fn(&Shard) -> u64| shards.iter().map(|s| read(s)).sum::<u64>();

        header(
            out,
            "bearer_proxy_requests_total",
            "counter",
            "Requests answered, by method and status class; `code` is the proxy's own error code where it answered itself, or client_closed where the client left first.",
        );
        let mut finished = 0;
        for (m, method) in METHODS.iter().enumerate() {
            let n = sum(&|s| s.closed[m].load(Relaxed));
            finished += n;
            if n > 0 {
                let _ = writeln!(
                    out,
                    "bearer_proxy_requests_total{{method=\"{method}\",status_class=\"4xx\",code=\"client_closed\"}} {n}"
                );
            }
            for (c, class) in CLASSES.iter().enumerate() {
                let n = sum(&|s| s.by_class[m][c].load(Relaxed));
                finished += n;
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "bearer_proxy_requests_total{{method=\"{method}\",status_class=\"{class}\",code=\"\"}} {n}"
                    );
                }
            }
            for code in ErrorCode::ALL {
                let n = sum(&|s| s.by_code[m][code.index()].load(Relaxed));
                finished += n;
                if n > 0 {
                    let class = CLASSES[usize::from(code.status().as_u16() / 100) - 1];
                    let _ = writeln!(
                        out,
                        "bearer_proxy_requests_total{{method=\"{method}\",status_class=\"{class}\",code=\"{}\"}} {n}",
                        code.as_str()
                    );
                }
            }
        }
        // After the finished ones: a request that starts and ends between
        // the two reads must not make in-flight negative.
        let started = sum(&|s| s.started.load(Relaxed));
        gauge(
            out,
            "bearer_proxy_requests_in_flight",
            "Requests received and not answered in full yet.",
            started.saturating_sub(finished),
        );
        for (name, help, pick) in [
            (
                "bearer_proxy_request_duration_seconds",
                "Time from a request's head to the last byte of its answer.",
                (|s: &Shard| &s.duration) as fn(&Shard) -> &Histogram,
            ),
            (
                "bearer_proxy_upstream_duration_seconds",
                "Time from sending a request upstream to the upstream's answer head (a replay's included).",
                |s: &Shard| &s.upstream_duration,
            ),
        ] {
            let mut counts = [0; BOUNDS.len() + 1];
            let mut sum_nanos = 0;
            for shard in &shards {
                pick(shard).add_into(&mut counts, &mut sum_nanos);
            }
            header(out, name, "histogram", help);
            let mut cumulative = 0;
            for (bound, count) in BOUNDS.iter().zip(counts) {
                cumulative += count;
                let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
            }
            cumulative += counts[BOUNDS.len()];
            let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
            let _ = writeln!(out, "{name}_sum {}", sum_nanos as f64 / 1e9);
            let _ = writeln!(out, "{name}_count {cumulative}");
        }
        counter(
            out,
            "bearer_proxy_received_bytes_total",
            "Request body bytes received from clients.",
            sum(&|s| s.received_bytes.load(Relaxed)),
        );
        counter(
            out,
            "bearer_proxy_sent_bytes_total",
            "Response body bytes sent to clients.",
            sum(&|s| s.sent_bytes.load(Relaxed)),
        );
        let opened = sum(&|s| s.connections_opened.load(Relaxed));
        let closed = sum(&|s| s.connections_closed.load(Relaxed));
        gauge(
            out,
            "bearer_proxy_client_connections",
            "Client connections open on the proxy port.",
            opened.saturating_sub(closed),
        );
        header(
            out,
            "bearer_proxy_upstream_connections",
            "gauge",
            "Connections open to the upstream, by protocol.",
        );
        for (p, protocol) in PROTOCOLS.iter().enumerate() {
            let open = sum(&|s| s.upstream_opened[p].load(Relaxed))
                .saturating_sub(sum(&|s| s.upstream_closed[p].load(Relaxed)));
            let _ = writeln!(
                out,
                "bearer_proxy_upstream_connections{{protocol=\"{protocol}\"}} {open}"
            );
        }
        labelled(
            out,
            "bearer_proxy_upstream_failures_total",
            "Requests that the upstream gave no answer to, by kind.",
            "kind",
            UpstreamFailure::ALL.map(|kind| {
                (
                    kind.as_str(),
                    sum(&|s| s.upstream_failures[kind as usize].load(Relaxed)),
                )
            }),
        );
        labelled(
            out,
            "bearer_proxy_replays_total",
            "Requests sent once more with a new token after the upstream answered 401, by result.",
            "result",
            Replay::ALL.map(|result| {
                (
                    result.as_str(),
                    sum(&|s| s.replays[result as usize].load(Relaxed)),
                )
            }),
        );
    }
}

/// Counts summed over methods and workers, for `/status` and the status
/// page.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    /// Requests answered.
    pub total: u64,
    pub in_flight: u64,
    /// By status class, `1xx` to `5xx`.
    pub by_class: Vec<(&'static str, u64)>,
    /// The proxy's own answers, by code: those that happened.
    pub by_code: Vec<(&'static str, u64)>,
    /// Upstream failures by kind: those that happened.
    pub upstream_failures: Vec<(&'static str, u64)>,
}

impl Registry {
    /// What every worker has counted.
    pub fn totals(&self) -> Totals {
        let shards = self.snapshot();
        let sum = |read: &dyn Fn(&Shard) -> u64| shards.iter().map(|s| read(s)).sum::<u64>();
        let mut totals = Totals::default();
        let mut by_class = [0u64; 5];
        for m in 0..METHODS.len() {
            for (c, count) in by_class.iter_mut().enumerate() {
                *count += sum(&|s| s.by_class[m][c].load(Relaxed));
            }
        }
        for code in ErrorCode::ALL {
            let n: u64 = (0..METHODS.len())
                .map(|m| sum(&|s| s.by_code[m][code.index()].load(Relaxed)))
                .sum();
            by_class[usize::from(code.status().as_u16() / 100) - 1] += n;
            if n > 0 {
                totals.by_code.push((code.as_str(), n));
            }
        }
        let closed: u64 = (0..METHODS.len())
            .map(|m| sum(&|s| s.closed[m].load(Relaxed)))
            .sum();
        if closed > 0 {
            by_class[3] += closed;
            totals.by_code.push(("client_closed", closed));
        }
        totals.total = by_class.iter().sum();
        totals.by_class = CLASSES.iter().copied().zip(by_class).collect();
        totals.in_flight = sum(&|s| s.started.load(Relaxed)).saturating_sub(totals.total);
        for kind in UpstreamFailure::ALL {
            let n = sum(&|s| s.upstream_failures[kind as usize].load(Relaxed));
            if n > 0 {
                totals.upstream_failures.push((kind.as_str(), n));
            }
        }
        totals
    }
}

/// `# HELP` and `# TYPE` lines.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A counter with one label, a line for each value.
fn labelled<const N: usize>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: [(&str, u64); N],
) {
    header(out, name, "counter", help);
    for (value, n) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
    }
}

/// A gauge without labels.
pub fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

/// A counter without labels.
pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

/// A label value, escaped as the text format asks.
pub fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_summed_and_histograms_cumulative() {
        let registry = Registry::default();
        let (a, b) = (registry.shard(), registry.shard());
        for (shard, millis, code) in [
            (&a, 3, None),
            (&b, 30, None),
            (&b, 0, Some(ErrorCode::TokenUnavailable)),
        ] {
            shard.start();
            shard.finish(&Finished {
                method: Method::GET,
                status: code.map_or(200, |c: ErrorCode| c.status().as_u16()),
                client_closed: false,
                code,
                duration: Duration::from_millis(millis),
                upstream: code.is_none().then(|| Duration::from_millis(millis)),
                received_bytes: 1,
                sent_bytes: 10,
            });
        }
        b.start();
        let mut out = String::new();
        registry.render(&mut out);
        for line in [
            "bearer_proxy_requests_total{method=\"GET\",status_class=\"2xx\",code=\"\"} 2",
            "bearer_proxy_requests_total{method=\"GET\",status_class=\"5xx\",code=\"token_unavailable\"} 1",
            "bearer_proxy_requests_in_flight 1",
            "bearer_proxy_request_duration_seconds_bucket{le=\"0.0025\"} 1",
            "bearer_proxy_request_duration_seconds_bucket{le=\"0.005\"} 2",
            "bearer_proxy_request_duration_seconds_bucket{le=\"0.05\"} 3",
            "bearer_proxy_request_duration_seconds_count 3",
            "bearer_proxy_upstream_duration_seconds_count 2",
            "bearer_proxy_request_duration_seconds_sum 0.033",
            "bearer_proxy_sent_bytes_total 30",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in:\n{out}");
        }
    }

    #[test]
    fn the_bounds_in_nanoseconds_are_the_bounds() {
        for (seconds, nanos) in BOUNDS.iter().zip(BOUNDS_NANOS) {
            assert_eq!((seconds * 1e9).round() as u64, nanos);
        }
    }

    #[test]
    fn connections_close_when_their_guard_drops() {
        let registry = Registry::default();
        let shard = registry.shard();
        let client = shard.connection();
        let upstream = shard.upstream_connection(Protocol::Http2);
        drop(client);
        let mut out = String::new();
        registry.render(&mut out);
        assert!(out.contains("bearer_proxy_client_connections 0"), "{out}");
        assert!(
            out.contains("bearer_proxy_upstream_connections{protocol=\"h2\"} 1"),
            "{out}"
        );
        drop(upstream);
    }
}
