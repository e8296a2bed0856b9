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

use crate::error_chain::chain;
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
    /// Built once from the three above.
    matcher: Option<Arc<Matcher>>,
}

impl Proxies {
    /// From the three settings.
    pub fn new(http: Option<ProxyUrl>, https: Option<ProxyUrl>, no_proxy: Option<String>) -> Self {
        let mut proxies = Self {
            http,
            https,
            no_proxy,
            matcher: None,
        };
        if proxies.any() {
            let mut builder = Matcher::builder();
            if let Some(http) = &proxies.http {
                builder = builder.http(http.secret());
            }
            if let Some(https) = &proxies.https {
                builder = builder.https(https.secret());
            }
            proxies.matcher = Some(Arc::new(
                builder
                    .no(proxies.no_proxy.clone().unwrap_or_default())
                    .build(),
            ));
        }
        proxies
    }

    /// Whether any proxy is configured.
    pub fn any(&self) -> bool {
        self.http.is_some() || self.https.is_some()
    }

    fn intercept(&self, uri: &Uri) -> Option<hyper_util::client::proxy::matcher::Intercept> {
        self.matcher.as_ref()?.intercept(uri)
    }

    /// The proxy for `url`, or `None` to go direct (for reqwest).
    pub fn for_url(&self, url: &str) -> Option<&ProxyUrl> {
        let uri: Uri = url.parse().ok()?;
        self.intercept(&uri)?;
        match uri.scheme_str() {
            Some("https") => self.https.as_ref(),
            _ => self.http.as_ref(),
        }
    }

    /// How a destination is reached, for `check`'s report: the proxy's
    /// scheme, host and port only, never its credentials.
    pub fn describe(&self, url: &str) -> String {
        let Ok(uri) = url.parse::<Uri>() else {
            return "direct".to_owned();
        };
        match self.intercept(&uri) {
            Some(intercept) => format!("through the proxy {}", public_part(intercept.uri())),
            None => "direct".to_owned(),
        }
    }
}

/// `scheme://host:port` of a proxy URI, whatever else it holds.
fn public_part(uri: &Uri) -> String {
    let host = uri.host().unwrap_or_default();
    match uri.port_u16() {
        Some(port) => format!("{}://{host}:{port}", uri.scheme_str().unwrap_or("http")),
        None => format!("{}://{host}", uri.scheme_str().unwrap_or("http")),
    }
}

/// A proxy URL as curl reads one: surrounding space trimmed, `http://`
/// when no scheme is given, port 1080 when none is; credentials
/// percent-encoded so that every parser splits them alike. `https://`
/// proxies are refused: the tunnel to the proxy would not be encrypted.
/// Errors never contain the value, which may hold a password.
pub fn normalize(raw: &ProxyUrl) -> Result<ProxyUrl, String> {
    let trimmed = raw.secret().trim();
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("http://{trimmed}")
    };
    let mut url = reqwest::Url::parse(&with_scheme)
        .map_err(|_| "expected a proxy URL such as \"http://proxy.example:3128\"".to_owned())?;
    match url.scheme() {
        "http" => {}
        "https" => {
            return Err("https:// proxies are not supported: use the proxy's http:// address (the tunnel to the upstream stays TLS end to end)".to_owned());
        }
        _ => return Err("expected an http:// proxy URL".to_owned()),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the proxy URL has no host".to_owned());
    }
    if url.port().is_none() {
        let _ = url.set_port(Some(1080));
    }
    let normalized = ProxyUrl::new(url.to_string());
    // The connector's matcher parses it its own way: make sure it agrees.
    let probe = Matcher::builder().all(normalized.secret()).build();
    if probe
        .intercept(&Uri::from_static("https://probe.invalid/"))
        .is_none()
    {
        return Err("the proxy URL cannot be used by the HTTP client".to_owned());
    }
    Ok(normalized)
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
            matcher: proxies.matcher.clone(),
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
                let proxy = public_part(intercept.uri());
                let cause = chain(&e);
                Box::new(std::io::Error::other(format!(
                    "through the proxy {proxy}: {cause}"
                ))) as BoxError
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(no_proxy: &str) -> Proxies {
        Proxies::new(
            Some(ProxyUrl::new("http://proxy.example:3128")),
            Some(ProxyUrl::new("http://user:pa55@proxy.example:3128")),
            Some(no_proxy.to_owned()),
        )
    }

    #[test]
    fn proxy_urls_are_read_as_curl_reads_them() {
        let norm = |s: &str| normalize(&ProxyUrl::new(s)).map(|u| u.secret().to_owned());
        assert_eq!(
            norm(" proxy.example:3128 ").as_deref(),
            Ok("http://proxy.example:3128/")
        );
        assert_eq!(
            norm("http://proxy.example").as_deref(),
            Ok("http://proxy.example:1080/")
        );
        assert_eq!(
            norm("http://u:p@ss@proxy.example:3128").as_deref(),
            Ok("http://u:p%40ss@proxy.example:3128/")
        );
        let https = norm("https://u:secret@proxy.example:443")
            .err()
            .unwrap_or_default();
        assert!(
            https.contains("https:// proxies are not supported") && !https.contains("secret"),
            "{https}"
        );
        assert!(norm("socks5://proxy.example:1080").is_err());
        let p = Proxies::new(
            None,
            norm("http://u:p@ss@proxy.example:3128")
                .ok()
                .map(ProxyUrl::new),
            None,
        );
        assert_eq!(
            p.describe("https://api.example/"),
            "through the proxy http://proxy.example:3128"
        );
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
}
