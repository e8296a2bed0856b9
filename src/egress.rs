//! The way out: forward proxies from `HTTPS_PROXY`, `HTTP_PROXY` and
//! `NO_PROXY` (and their lower-case forms), for the upstream and the token
//! endpoint alike. HTTPS (and plain HTTP) goes through the proxy in a CONNECT
//! tunnel; `NO_PROXY` matches host names, `.domain` suffixes, IP addresses,
//! CIDR ranges and `*`, as curl does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::ServiceExt;

use crate::config::Environment;
use crate::secret::ProxyUrl;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Forward-proxy settings, read from the environment.
#[derive(Debug, Clone, Default)]
pub struct Proxies {
    /// For `http://` destinations.
    pub http: Option<ProxyUrl>,
    /// For `https://` destinations.
    pub https: Option<ProxyUrl>,
    /// Destinations that go direct.
    pub no_proxy: Option<String>,
}

impl Proxies {
    /// From `HTTPS_PROXY`/`https_proxy`, `HTTP_PROXY`/`http_proxy` and
    /// `NO_PROXY`/`no_proxy` (the lower-case form wins, as in curl).
    pub fn from_env(env: &(impl Environment + ?Sized)) -> Self {
        let read = |names: [&str; 2]| {
            names.iter().find_map(|name| {
                env.var(name)
                    .and_then(|v| v.into_string().ok())
                    .filter(|v| !v.trim().is_empty())
            })
        };
        Self {
            http: read(["http_proxy", "HTTP_PROXY"]).map(ProxyUrl::new),
            https: read(["https_proxy", "HTTPS_PROXY"]).map(ProxyUrl::new),
            no_proxy: read(["no_proxy", "NO_PROXY"]),
        }
    }

    /// Whether any proxy is configured.
    pub fn any(&self) -> bool {
        self.http.is_some() || self.https.is_some()
    }

    fn matcher(&self) -> Matcher {
        let mut builder = Matcher::builder();
        if let Some(http) = &self.http {
            builder = builder.http(http.secret());
        }
        if let Some(https) = &self.https {
            builder = builder.https(https.secret());
        }
        builder
            .no(self.no_proxy.clone().unwrap_or_default())
            .build()
    }

    /// The proxy for `url`, or `None` to go direct (for reqwest).
    pub fn for_url(&self, url: &str) -> Option<&ProxyUrl> {
        let uri: Uri = url.parse().ok()?;
        self.matcher().intercept(&uri)?;
        match uri.scheme_str() {
            Some("https") => self.https.as_ref(),
            _ => self.http.as_ref(),
        }
    }

    /// How a destination is reached, for `check`'s report (credentials not shown).
    pub fn describe(&self, url: &str) -> String {
        let Ok(uri) = url.parse::<Uri>() else {
            return "direct".to_owned();
        };
        match self.matcher().intercept(&uri) {
            Some(intercept) => format!("through the proxy {}", intercept.uri()),
            None => "direct".to_owned(),
        }
    }
}

/// Connects directly, or through a CONNECT tunnel where a proxy applies.
#[derive(Debug, Clone)]
pub struct EgressConnector {
    direct: HttpConnector,
    matcher: Option<Arc<Matcher>>,
}

impl EgressConnector {
    /// Wraps `direct` with the proxies, if any.
    pub fn new(direct: HttpConnector, proxies: &Proxies) -> Self {
        Self {
            direct,
            matcher: proxies.any().then(|| Arc::new(proxies.matcher())),
        }
    }
}

impl tower::Service<Uri> for EgressConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let direct = self.direct.clone();
        let intercept = self.matcher.as_ref().and_then(|m| m.intercept(&dst));
        Box::pin(async move {
            let Some(intercept) = intercept else {
                return direct.oneshot(dst).await.map_err(Into::into);
            };
            let mut tunnel = Tunnel::new(intercept.uri().clone(), direct);
            if let Some(auth) = intercept.basic_auth() {
                tunnel = tunnel.with_auth(auth.clone());
            }
            // The tunnel defaults to port 443: name the port for http too.
            let port = dst
                .port_u16()
                .unwrap_or(if dst.scheme_str() == Some("https") {
                    443
                } else {
                    80
                });
            let host = dst.host().unwrap_or_default();
            let target: Uri =
                format!("{}://{host}:{port}", dst.scheme_str().unwrap_or("http")).parse()?;
            tunnel.oneshot(target).await.map_err(|e| {
                let proxy = intercept.uri();
                Box::new(std::io::Error::other(format!(
                    "the proxy {proxy} did not open a tunnel: {e}"
                ))) as BoxError
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(no_proxy: &str) -> Proxies {
        Proxies {
            http: Some(ProxyUrl::new("http://proxy.example:3128")),
            https: Some(ProxyUrl::new("http://user:pa55@proxy.example:3128")),
            no_proxy: Some(no_proxy.to_owned()),
        }
    }

    #[test]
    fn no_proxy_matches_as_curl_does() {
        let p = proxies("localhost, .internal.example, 10.0.0.0/8, 192.168.1.5, exact.example");
        for direct in [
            "https://localhost:8443/x",
            "https://api.internal.example/x",
            "https://internal.example/x",
            "http://10.1.2.3/x",
            "https://192.168.1.5/x",
            "https://exact.example/x",
        ] {
            assert!(p.for_url(direct).is_none(), "{direct} should go direct");
        }
        for proxied in [
            "https://dev.data.thekalibratecloud.com/",
            "http://11.0.0.1/",
            "https://sub.exact.example.com/",
        ] {
            assert!(
                p.for_url(proxied).is_some(),
                "{proxied} should use the proxy"
            );
        }
        assert!(proxies("*").for_url("https://anything.example/").is_none());
        assert_eq!(
            p.for_url("https://api.example/").map(|u| u.secret()),
            Some("http://user:pa55@proxy.example:3128")
        );
        assert!(
            !p.describe("https://api.example/").contains("pa55"),
            "credentials are never shown"
        );
    }

    #[test]
    fn lower_case_variables_win() {
        let env = [
            ("HTTPS_PROXY", "http://upper:1"),
            ("https_proxy", "http://lower:2"),
            ("NO_PROXY", "a.example"),
        ];
        let p = Proxies::from_env(&env[..]);
        assert_eq!(p.https.as_ref().map(|u| u.secret()), Some("http://lower:2"));
        assert_eq!(p.no_proxy.as_deref(), Some("a.example"));
        assert!(p.http.is_none());
        assert_eq!(format!("{:?}", p.https), "Some(ProxyUrl([redacted]))");
    }
}
