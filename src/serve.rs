//! The accept loop shared by the proxy and admin listeners: HTTP/1.1 and
//! HTTP/2 with prior knowledge on one port, graceful drain on shutdown.

use std::time::Duration;

use crate::listen::ProxyListener;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Pause after a failed accept (out of file descriptors, say), so the loop
/// does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves `service` on `listener` until `stop` fires, then lets open
/// connections finish their requests for up to `grace`.
/// Oversized, malformed or ambiguously framed requests are refused by hyper
/// itself before the service sees them.
pub async fn serve<S, B>(
    listener: ProxyListener,
    service: S,
    stop: CancellationToken,
    grace: Duration,
    header_timeout: Duration,
    name: &'static str,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client gets `header_timeout` to send a request's headers (slowloris).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    // Cancelled when the grace period runs out: ends what is still open.
    let cut = CancellationToken::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(listener = name, %error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let connection = builder
            .serve_connection(TokioIo::new(stream), service.clone())
            .into_owned();
        let watched = graceful.watch(connection);
        let cut = cut.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = watched => if let Err(error) = result {
                    tracing::debug!(listener = name, error = %error, "connection ended with an error");
                },
                _ = cut.cancelled() => {}
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!(listener = name, "all connections closed"),
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(listener = name, grace_s = grace.as_secs_f64(), "shutdown grace elapsed: closing the remaining connections");
        }
    }
    cut.cancel();
}
