//! bearer-proxy: a local authenticating reverse proxy. It holds OAuth2 client
//! credentials, keeps a valid access token, and forwards every request to one
//! upstream API with `Authorization: Bearer <token>` added.
//!
//! # Layout
//!
//! Each module owns one concern and imports only the layers below it;
//! `tests/layers.rs` checks that, and that no two files import each other.
//! From the bottom up:
//!
//! - Foundations, importing nothing of the crate: [`http1`], the HTTP/1.1
//!   codec (field tagging, raw fields, heads parsed and written, one
//!   framing rule for requests and answers, bodies decoded and framed);
//!   [`reply`], the proxy's own error answers (`ErrorCode`, `ProxyError`);
//!   [`error_chain`], one walker over an error's causes; [`secret`],
//!   `ClientSecret`, `AccessToken`, `LocalKey`, `ProxyUrl`, whose `Debug`
//!   is redacted; [`pki`], certificate and key files read, checked,
//!   signed with and reloaded on change.
//! - The way out: [`tls`], the rustls settings shared by both outgoing
//!   clients, the reloading client certificate, TLS failures in words;
//!   [`egress`], forward proxies and the connector that tunnels through
//!   them.
//! - [`config`]: the key table, sources (flag > environment > file >
//!   default) and validation into [`Config`]; every error names the key.
//! - [`token`]: the endpoint client, its errors, the refresher task that
//!   alone talks to the endpoint, and the slot the request path reads;
//!   [`listen`], TCP and unix-socket listeners; [`telemetry`], logging;
//!   [`shutdown`], signals.
//! - The request path's parts: [`guard`], who may use the proxy;
//!   [`upstream`], the client (one HTTP/1.1 pool per worker for every
//!   request, by [`upstream::conn`]; hyper's client only when the upstream
//!   speaks HTTP/2), the retry rule and upstream failures in words;
//!   [`server`], accepting,
//!   the worker threads, graceful drain, and the lean HTTP/1.1 driver that
//!   serves requests without a body without hyper's server.
//! - [`proxy`]: the policy: what is removed and added on the way, replay
//!   after a 401, `Location` rewriting, token masking, upgrades (h2c
//!   ignored, WebSocket tunnelled by [`proxy::tunnel`]).
//! - Wiring: [`admin`] (`/healthz`, `/readyz`, `/status`), [`check`] and
//!   [`healthcheck`] (the operator subcommands), and this file's [`run`].
//!
//! `main.rs` parses the command line, loads the config, installs logging and
//! calls [`run`], which the integration tests in `tests/` call too.

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub mod admin;
pub mod check;
pub mod config;
pub mod egress;
pub mod error_chain;
pub mod guard;
pub mod healthcheck;
pub mod http1;
pub mod listen;
pub mod metrics;
pub mod pki;
pub mod proxy;
pub mod reply;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod upstream;

pub use config::Config;

pub use listen::{Listeners, ProxyListener};

/// Why the proxy could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] listen::BindError),
    /// TLS or client setup failed.
    #[error("{0}")]
    Setup(String),
    /// A task the proxy cannot run without ended early.
    #[error("{0}")]
    Stopped(String),
}

/// Binds the configured listeners and runs until SIGTERM or SIGINT.
pub async fn run_until_signal(config: Config) -> Result<(), RunError> {
    let shutdown =
        shutdown::on_signal().map_err(|e| RunError::Setup(format!("cannot watch signals: {e}")))?;
    let listeners = Listeners::bind(&config).await?;
    run(config, listeners, shutdown).await
}

/// How often start-up says what it still waits for.
const WAITING_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Until the first token comes: every few seconds, a line that says what
/// the proxy waits for and the last error, rather than silence.
async fn say_what_start_waits_for(
    slot: token::TokenSlot,
    token_url: String,
    stop: CancellationToken,
) {
    let started = Instant::now();
    let mut ticks = tokio::time::interval_at(started + WAITING_EVERY, WAITING_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let state = slot.state();
        if state.current.is_some() {
            return;
        }
        let waited = started.elapsed().as_secs();
        match &state.last_error {
            Some(error) => tracing::warn!(
                waited_s = waited,
                attempts = state.consecutive_failures,
                code = %error.code,
                provider_code = error.provider_code.as_deref(),
                next_attempt = state.next_attempt_wall.map(crate::telemetry::rfc3339),
                "still waiting for a first token from {token_url}: {}",
                error.message
            ),
            None => tracing::warn!(
                waited_s = waited,
                "still waiting for a first token from {token_url}: the first token request has not been answered yet"
            ),
        }
    }
}

/// Runs the proxy until `shutdown` fires, then drains for `shutdown.grace`.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    tls::install_crypto_provider();
    let tls = tls::client_config(config.tls.ca_file.as_deref()).map_err(RunError::Setup)?;
    let endpoint = token::TokenEndpoint::new(
        config.token.clone(),
        tls.clone(),
        &config.upstream.user_agent,
        &config.proxies,
    )
    .map_err(|e| RunError::Setup(e.to_string()))?;
    let credential = endpoint.credential();
    tracing::info!(
        credential = credential.kind,
        chosen_by = %credential.reason,
        "credential: {}",
        credential.detail
    );
    let slot = token::TokenSlot::new();

    let background = CancellationToken::new();
    let policy = token::RefreshPolicy {
        retry: token::RetryPolicy {
            initial: config.token.retry_initial,
            max: config.token.retry_max,
        },
        refresh_before: config.token.refresh_before,
    };
    let refresher = token::Refresher::new(endpoint.clone(), slot.clone(), policy);
    let refresher = tokio::spawn(refresher.run(background.clone()));
    tokio::spawn(say_what_start_waits_for(
        slot.clone(),
        config.token.url.to_string(),
        background.clone(),
    ));

    let metrics = metrics::Registry::default();
    let warming = proxy::Warming::new(if config.upstream.keep_warm {
        config.proxy.workers.max(1)
    } else {
        0
    });
    let admin_state = admin::AdminState {
        metrics: metrics.clone(),
        slot: slot.clone(),
        draining: shutdown.clone(),
        started: Instant::now(),
        upstream: config.upstream.url.as_string(),
        endpoint,
        warming: warming.clone(),
        last_view: std::sync::Arc::default(),
    };
    let admin_addr = listeners
        .admin
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let admin_service = hyper_util::service::TowerToHyperService::new(admin::router(admin_state));
    let admin = tokio::spawn(server::serve(
        listeners.admin.into(),
        admin_service,
        background.clone(),
        config.shutdown_grace,
        config.proxy.header_timeout,
        "admin",
    ));

    let listen = listeners.proxy.tcp_addr();
    if let Some(addr) = listen
        && !addr.ip().is_loopback()
    {
        tracing::warn!(
            listen = %addr,
            "listening beyond loopback: whoever reaches this address calls the upstream with these credentials; \
             restrict it with guard.allowed_hosts, guard.local_key_file and the network around it"
        );
    }
    let guard = guard::Guard::new(&config.guard, listen);
    let upstream_tls = tls::upstream_config(&tls, config.upstream.client_cert.as_ref())
        .map_err(RunError::Setup)?;
    let proxy = proxy::Proxy::new(&config, upstream_tls, slot, guard, &metrics, warming);
    tracing::info!(
        listen = %listeners.proxy.describe(),
        admin_listen = %admin_addr,
        upstream = %config.upstream.url.as_string(),
        token_url = %config.token.url,
        "bearer-proxy {} listening",
        env!("CARGO_PKG_VERSION")
    );
    let workers = server::Workers::start(
        config.proxy.workers,
        move || proxy.for_worker(),
        config.shutdown_grace,
        config.proxy.header_timeout,
    )
    .map_err(|e| RunError::Setup(format!("cannot start the proxy's worker threads: {e}")))?;
    let serving = workers.serve(listeners.proxy, shutdown.clone());
    tokio::pin!(serving);
    let mut refresher = refresher;
    // The refresher runs until `background` is cancelled; if it ends before,
    // no token will ever come again: drain, then fail loudly (exit 1) so an
    // orchestrator restarts the process rather than it answering 503 forever.
    let mut refresher_ended = false;
    let failure = tokio::select! {
        served = &mut serving => served.err(),
        ended = &mut refresher => {
            refresher_ended = true;
            let failure = match ended {
                Err(error) if error.is_panic() => "the token refresher panicked",
                _ => "the token refresher stopped",
            };
            tracing::error!("{failure}: shutting down");
            shutdown.cancel();
            let _ = serving.await;
            Some(failure.to_owned())
        }
    };
    background.cancel();
    if !refresher_ended {
        let _ = refresher.await;
    }
    let _ = admin.await;
    match failure {
        Some(failure) => {
            tracing::error!("{failure}");
            Err(RunError::Stopped(failure))
        }
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}
