//! The admin listener's routes: `/healthz`, `/readyz`, `/status`. They live
//! on their own port so no upstream path is ever shadowed.

use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::token::TokenSlot;

/// What the admin routes read.
#[derive(Debug, Clone)]
pub struct AdminState {
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
