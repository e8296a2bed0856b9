//! The upstream client: hyper's pooled client over rustls, HTTP/2 by ALPN,
//! with one deadline around the whole connect (TCP and TLS handshake).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long an idle pooled connection to the upstream is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// TCP keepalive on upstream connections, so dead peers are noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// The connect deadline passed: named so the proxy can answer 504, not 502.
#[derive(Debug, thiserror::Error)]
#[error("connecting to the upstream took longer than {}", humantime::format_duration(*.0))]
pub struct ConnectTimeout(pub Duration);

/// Wraps a connector so that TCP connect and TLS handshake share one deadline.
#[derive(Debug, Clone)]
pub struct TimeoutConnector<C> {
    inner: C,
    timeout: Duration,
}

impl<C> tower::Service<Uri> for TimeoutConnector<C>
where
    C: tower::Service<Uri> + Send,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.timeout;
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(Box::new(ConnectTimeout(timeout)) as BoxError),
            }
        })
    }
}

/// The connector type of the upstream client.
pub type Connector = TimeoutConnector<HttpsConnector<crate::egress::EgressConnector>>;

/// Builds the pooled upstream client for bodies of type `B`.
pub fn build<B>(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    proxies: &crate::egress::Proxies,
) -> Client<Connector, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_keepalive(Some(TCP_KEEPALIVE));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(crate::egress::EgressConnector::new(http, proxies));
    let connector = TimeoutConnector {
        inner: https,
        timeout: connect_timeout,
    };
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}
