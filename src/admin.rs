//! The admin listener's routes: `/` (a status page for a person),
//! `/healthz`, `/readyz`, `/status`, `/metrics`. They live on their own
//! port so no upstream path is ever shadowed.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{self as m, Registry};
use crate::token::TokenSlot;

/// What the admin routes read.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The request metrics of every worker.
    pub metrics: Registry,
    /// The token state.
    pub slot: TokenSlot,
    /// Cancelled once shutdown starts: readiness turns false at once.
    pub draining: CancellationToken,
    /// Process start, for `uptime_s`.
    pub started: Instant,
    /// The upstream URL, for `/status`.
    pub upstream: String,
    /// The token endpoint, for the credential in `/status`.
    pub endpoint: crate::token::TokenEndpoint,
    /// The workers' first warm connections, which readiness waits for.
    pub warming: crate::proxy::Warming,
    /// The requests answered at the status page's previous view, and
    /// when: its request rate is since then.
    pub last_view: Arc<Mutex<Option<(Instant, u64)>>>,
}

/// The admin router.
pub fn router(state: AdminState) -> axum::Router {
    axum::Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// Ready, or why not: a usable token and not shutting down.
fn readiness(state: &AdminState) -> Result<(), String> {
    if state.draining.is_cancelled() {
        Err("shutting down".to_owned())
    } else {
        state.slot.readiness()?;
        if state.warming.pending() {
            return Err("opening the first connection to the upstream".to_owned());
        }
        Ok(())
    }
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    match readiness(&state) {
        Ok(()) => (StatusCode::OK, Json(json!({ "ready": true }))),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": reason })),
        ),
    }
}

async fn status(State(state): State<AdminState>) -> impl IntoResponse {
    let token = state.slot.state();
    let credential = state.endpoint.credential();
    let now = Instant::now();
    let usable = token.current.as_ref().filter(|t| t.is_usable(now));
    let expires_in_s = usable.map(|t| {
        t.expires_at
            .duration_since(SystemTime::now())
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    let last_error = token.last_error.as_ref().map(|e| {
        json!({
            "code": e.code,
            "provider_code": e.provider_code,
            "message": e.message,
            "at": rfc3339(e.at),
        })
    });
    let totals = state.metrics.totals();
    let counts = |pairs: &[(&str, u64)]| {
        Value::Object(
            pairs
                .iter()
                .map(|(name, n)| ((*name).to_owned(), json!(n)))
                .collect(),
        )
    };
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "requests": {
            "total": totals.total,
            "in_flight": totals.in_flight,
            "by_status_class": counts(&totals.by_class),
            "by_code": counts(&totals.by_code),
            "upstream_failures": counts(&totals.upstream_failures),
        },
        "uptime_s": now.saturating_duration_since(state.started).as_secs(),
        "upstream": state.upstream,
        "draining": state.draining.is_cancelled(),
        "credential": {
            "kind": credential.kind,
            "chosen_by": credential.reason,
            "detail": credential.detail,
            "certificate_expires_at": credential.certificate_expires.map(|at| {
                rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(at.max(0).unsigned_abs()))
            }),
        },
        "token": {
            "present": usable.is_some(),
            "expires_in_s": expires_in_s,
            "obtained_at": token.current.as_ref().map(|t| rfc3339(t.obtained_at)),
            "next_refresh_at": token.next_attempt_wall.map(rfc3339),
            "consecutive_failures": token.consecutive_failures,
            "forced_renewals": token.forced_renewals,
            "last_error": last_error,
        },
    }))
}

fn rfc3339(at: SystemTime) -> Value {
    Value::String(crate::telemetry::rfc3339(at))
}

/// Prometheus' text format: the request metrics, then what the token
/// slot knows, readiness and the build.
async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut out = String::with_capacity(8 * 1024);
    state.metrics.render(&mut out);
    let token = state.slot.state();
    m::header(
        &mut out,
        "bearer_proxy_token_requests_total",
        "counter",
        "Token requests by outcome (obtained, rejected, throttled, transport_error, http_error, invalid_response, credential_unusable), with the provider's OAuth2 error and code where it gave them.",
    );
    if !token
        .outcomes
        .contains_key(&("obtained", String::new(), String::new()))
    {
        out.push_str(
            "bearer_proxy_token_requests_total{outcome=\"obtained\",error=\"\",provider_code=\"\"} 0\n",
        );
    }
    for ((outcome, error, provider_code), n) in &token.outcomes {
        let _ = writeln!(
            out,
            "bearer_proxy_token_requests_total{{outcome=\"{outcome}\",error=\"{}\",provider_code=\"{}\"}} {n}",
            m::escape(error),
            m::escape(provider_code)
        );
    }
    m::counter(
        &mut out,
        "bearer_proxy_token_forced_renewals_total",
        "Token renewals asked for because the upstream answered 401.",
        token.forced_renewals,
    );
    let unix = |at: SystemTime| {
        at.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    let current = token.current.as_ref();
    m::gauge(
        &mut out,
        "bearer_proxy_token_expiry_timestamp_seconds",
        "When the current token expires, in Unix time (0: no token).",
        current.map_or(0.0, |t| unix(t.expires_at)),
    );
    m::gauge(
        &mut out,
        "bearer_proxy_token_obtained_timestamp_seconds",
        "When the current token was obtained, in Unix time (0: no token).",
        current.map_or(0.0, |t| unix(t.obtained_at)),
    );
    m::gauge(
        &mut out,
        "bearer_proxy_token_consecutive_failures",
        "Token requests that failed since the last success.",
        token.consecutive_failures,
    );
    let ready = readiness(&state).is_ok();
    m::gauge(
        &mut out,
        "bearer_proxy_ready",
        "1 when the proxy holds a usable token and is not shutting down.",
        u8::from(ready),
    );
    m::gauge(
        &mut out,
        "bearer_proxy_start_time_seconds",
        "When the process started, in Unix time.",
        unix(SystemTime::now() - state.started.elapsed()),
    );
    m::counter(
        &mut out,
        "bearer_proxy_log_dropped_lines_total",
        "Log lines dropped because stderr could not take them as fast as they came.",
        crate::telemetry::dropped_lines() as u64,
    );
    let credential = state.endpoint.credential();
    m::header(
        &mut out,
        "bearer_proxy_credential_info",
        "gauge",
        "Always 1; the credential's kind (client_secret, certificate, workload_identity, managed_identity) is a label.",
    );
    let _ = writeln!(
        out,
        "bearer_proxy_credential_info{{kind=\"{}\"}} 1",
        credential.kind
    );
    m::gauge(
        &mut out,
        "bearer_proxy_credential_certificate_expiry_timestamp_seconds",
        "When the certificate credential expires, in Unix time (0: no certificate).",
        credential.certificate_expires.unwrap_or(0).max(0),
    );
    m::header(
        &mut out,
        "bearer_proxy_build_info",
        "gauge",
        "Always 1; the version is a label.",
    );
    let _ = writeln!(
        out,
        "bearer_proxy_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}

/// `<` `>` `&` `"` as HTML entities.
fn html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// A duration to the second, as a person reads it (`1h 2m 3s`).
fn span(duration: Duration) -> String {
    humantime::format_duration(Duration::from_secs(duration.as_secs())).to_string()
}

/// How often the page reloads itself.
const PAGE_REFRESH_S: u64 = 5;

/// The status page: plain HTML, no script and nothing fetched from
/// elsewhere, reloading itself; never the token.
async fn page(State(state): State<AdminState>) -> impl IntoResponse {
    let token = state.slot.state();
    let now = Instant::now();
    let wall = SystemTime::now();
    let ready = readiness(&state);
    let totals = state.metrics.totals();
    let uptime = now.saturating_duration_since(state.started);
    let rate = {
        let mut last = state.last_view.lock().unwrap_or_else(|e| e.into_inner());
        let (since, before) = last
            .filter(|(at, _)| now.saturating_duration_since(*at) >= Duration::from_secs(1))
            .unwrap_or((state.started, 0));
        *last = Some((now, totals.total));
        let seconds = now.saturating_duration_since(since).as_secs_f64().max(1.0);
        (
            totals.total.saturating_sub(before) as f64 / seconds,
            seconds,
        )
    };

    let mut out = String::with_capacity(4096);
    let _ = writeln!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{PAGE_REFRESH_S}\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>bearer-proxy: {}</title><style>\
         body{{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:52em;padding:0 1em;color:#222}}\
         h1{{font-size:1.4em;margin:0 0 .2em}} h2{{font-size:1.05em;margin:1.4em 0 .4em;border-bottom:1px solid #ddd}}\
         .ok{{color:#116611;font-weight:bold}} .bad{{color:#aa1111;font-weight:bold}}\
         table{{border-collapse:collapse}} td,th{{padding:.15em 1.2em .15em 0;text-align:left;vertical-align:top}}\
         th{{font-weight:normal;color:#666}} code{{font-size:.95em}} .muted{{color:#777}}\
         </style></head><body>",
        if ready.is_ok() { "ready" } else { "not ready" }
    );
    let _ = writeln!(
        out,
        "<h1>bearer-proxy {}</h1><p class=\"muted\">up {}, forwarding to <code>{}</code>; \
         this page reloads every {PAGE_REFRESH_S} s</p>",
        env!("CARGO_PKG_VERSION"),
        span(uptime),
        html(&state.upstream)
    );
    match &ready {
        Ok(()) => out.push_str("<p class=\"ok\">Ready: a valid token is held.</p>\n"),
        Err(reason) => {
            let _ = writeln!(out, "<p class=\"bad\">Not ready: {}</p>", html(reason));
        }
    }

    out.push_str("<h2>Token</h2><table>\n");
    match token.current.as_ref() {
        Some(current) => {
            let age = wall.duration_since(current.obtained_at).unwrap_or_default();
            let left = current.expires_at.duration_since(wall).unwrap_or_default();
            let _ = writeln!(
                out,
                "<tr><th>obtained</th><td>{} ago ({})</td></tr>\n\
                 <tr><th>expires in</th><td>{}</td></tr>",
                span(age),
                crate::telemetry::rfc3339(current.obtained_at),
                if left.is_zero() {
                    "expired".to_owned()
                } else {
                    span(left)
                },
            );
        }
        None => out.push_str("<tr><th>held</th><td class=\"bad\">none yet</td></tr>\n"),
    }
    if let Some(next) = token.next_attempt_wall {
        let _ = writeln!(
            out,
            "<tr><th>next request</th><td>{}</td></tr>",
            crate::telemetry::rfc3339(next)
        );
    }
    let _ = writeln!(
        out,
        "<tr><th>failures in a row</th><td>{}</td></tr>\n\
         <tr><th>renewals forced by a 401</th><td>{}</td></tr>\n</table>",
        token.consecutive_failures, token.forced_renewals
    );
    match &token.last_error {
        Some(error) => {
            let _ = writeln!(
                out,
                "<h2>Last token error</h2><p><code>{}</code>{} at {}</p><p>{}</p>",
                html(&error.code),
                error
                    .provider_code
                    .as_deref()
                    .map(|code| format!(" <code>{}</code>", html(code)))
                    .unwrap_or_default(),
                crate::telemetry::rfc3339(error.at),
                html(&error.message)
            );
        }
        None => out.push_str("<h2>Last token error</h2><p class=\"muted\">none</p>\n"),
    }

    let _ = writeln!(
        out,
        "<h2>Requests</h2><p>{} answered since start, {:.1} a second over the last {:.0} s, {} in flight.</p><table>",
        totals.total, rate.0, rate.1, totals.in_flight
    );
    for (class, n) in &totals.by_class {
        let _ = writeln!(out, "<tr><th>{class}</th><td>{n}</td></tr>");
    }
    out.push_str("</table>\n<h2>The proxy's own answers</h2>");
    if totals.by_code.is_empty() {
        out.push_str("<p class=\"muted\">none</p>\n");
    } else {
        out.push_str("<table>\n");
        for (code, n) in &totals.by_code {
            let _ = writeln!(out, "<tr><th><code>{code}</code></th><td>{n}</td></tr>");
        }
        out.push_str("</table>\n");
    }
    out.push_str("<h2>Upstream failures</h2>");
    if totals.upstream_failures.is_empty() {
        out.push_str("<p class=\"muted\">none</p>\n");
    } else {
        out.push_str("<table>\n");
        for (kind, n) in &totals.upstream_failures {
            let _ = writeln!(out, "<tr><th>{kind}</th><td>{n}</td></tr>");
        }
        out.push_str("</table>\n");
    }
    out.push_str(
        "<p class=\"muted\">Also: <a href=\"/status\">/status</a> (JSON), \
         <a href=\"/metrics\">/metrics</a> (Prometheus), <a href=\"/readyz\">/readyz</a>.</p>\n</body></html>\n",
    );
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (axum::http::header::CACHE_CONTROL, "no-store"),
        ],
        out,
    )
}
