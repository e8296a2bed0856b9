//! The admin listener's routes: `/healthz`, `/readyz`, `/status`,
//! `/metrics`. They live on their own port so no upstream path is ever
//! shadowed.

use std::fmt::Write as _;
use std::time::SystemTime;

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
}

/// The admin router.
pub fn router(state: AdminState) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let reason = if state.draining.is_cancelled() {
        Err("shutting down".to_owned())
    } else {
        state.slot.readiness()
    };
    match reason {
        Ok(()) => (StatusCode::OK, Json(json!({ "ready": true }))),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": reason })),
        ),
    }
}

async fn status(State(state): State<AdminState>) -> impl IntoResponse {
    let token = state.slot.state();
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
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": now.saturating_duration_since(state.started).as_secs(),
        "upstream": state.upstream,
        "draining": state.draining.is_cancelled(),
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
    Value::String(humantime::format_rfc3339_seconds(at).to_string())
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
        "Token requests by outcome (obtained, rejected, throttled, transport_error, http_error, invalid_response, secret_unreadable), with the provider's OAuth2 error and code where it gave them.",
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
    let ready = !state.draining.is_cancelled() && state.slot.readiness().is_ok();
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
