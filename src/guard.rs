//! Who and what may use the proxy. Whoever reaches its port acts with its
//! credentials, so the perimeter is tight by default and every refusal says
//! why. Checks run in README's order: target, Host, Origin, local key,
//! method (capacity is counted by the proxy, which holds the permit).

use std::net::{IpAddr, SocketAddr};

use http::header::HeaderName;
use http::{Method, Request, Uri, Version};

use crate::config::GuardConfig;
use crate::http1::field::{HOST, ORIGIN, SEC_FETCH_SITE};
use crate::http1::{Field, FieldValues, Known, Offer, RequestHead, upgrade_offer, visible_ascii};
use crate::reply::{ErrorCode, ProxyError};
use crate::secret::LocalKey;

/// The header that carries the local key (`guard.local_key_file`).
pub const PROXY_KEY: Field = Field::new(HeaderName::from_static("x-proxy-key"), Known::ProxyKey);

/// A request's line: what the checks read besides its fields.
#[derive(Debug, Clone, Copy)]
struct Line<'a> {
    method: &'a Method,
    uri: &'a Uri,
    version: Version,
}

/// The checks, with what they accept.
#[derive(Debug, Clone)]
pub struct Guard {
    allowed_hosts: Vec<String>,
    allowed_origins: Vec<String>,
    local_key: Option<LocalKey>,
    /// The listen address's IP, or `None` when listening on every interface.
    listen_ip: Option<IpAddr>,
    any_ip: bool,
    /// Host values that the full test would accept and that clients
    /// usually send (`localhost:PORT`, `127.0.0.1:PORT`, the listen
    /// address): compared first, without parsing.
    usual_hosts: Vec<String>,
}

impl Guard {
    /// From the configuration and the address actually listened on.
    pub fn new(config: &GuardConfig, listen: Option<SocketAddr>) -> Self {
        let listen_ip = listen.map(|addr| addr.ip());
        let mut usual_hosts = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        if let Some(listen) = listen {
            let port = listen.port();
            usual_hosts.extend([
                format!("localhost:{port}"),
                format!("127.0.0.1:{port}"),
                format!("[::1]:{port}"),
            ]);
            if !listen.ip().is_unspecified() {
                usual_hosts.push(listen.to_string());
            }
        }
        Self {
            usual_hosts,
            allowed_hosts: config.allowed_hosts.clone(),
            allowed_origins: config.allowed_origins.clone(),
            local_key: config.local_key.clone(),
            any_ip: listen_ip.is_some_and(|ip| ip.is_unspecified()),
            listen_ip,
        }
    }

    /// Refuses what the proxy must never forward, in the documented order.
    pub fn check<B>(&self, request: &Request<B>) -> Result<(), ProxyError> {
        let line = Line {
            method: request.method(),
            uri: request.uri(),
            version: request.version(),
        };
        self.check_line(line, request.headers())
    }

    /// [`check`](Self::check) for a request's head, whose fields are in a
    /// map or as they arrived.
    pub fn check_head(&self, head: &RequestHead) -> Result<(), ProxyError> {
        let line = Line {
            method: &head.method,
            uri: &head.uri,
            version: head.version,
        };
        self.check_line(line, &head.fields)
    }

    fn check_line(&self, request: Line<'_>, fields: &impl FieldValues) -> Result<(), ProxyError> {
        check_target(request, fields)?;
        self.check_host(request, fields)?;
        self.check_origin(fields)?;
        self.check_key(fields)?;
        if *request.method == Method::TRACE {
            return Err(ProxyError::new(
                ErrorCode::MethodNotAllowed,
                "TRACE is refused: the upstream would echo the injected token back",
            ));
        }
        match upgrade_offer(fields) {
            // An h2c offer is optional: the request is served over HTTP/1.1.
            Offer::None | Offer::H2c => Ok(()),
            // HTTP/1.0 has no upgrades: the offer is ignored (RFC 9110 §7.8).
            _ if request.version == Version::HTTP_10 => Ok(()),
            Offer::WebSocket
                if *request.method == Method::GET && request.version == Version::HTTP_11 =>
            {
                Ok(())
            }
            Offer::WebSocket => Err(ProxyError::new(
                ErrorCode::UpgradeNotSupported,
                "a WebSocket handshake is an HTTP/1.1 GET: send it so",
            )),
            Offer::Other(protocol) => Err(ProxyError::new(
                ErrorCode::UpgradeNotSupported,
                format!(
                    "the upgrade to {:?} is not supported: only WebSocket is proxied (an h2c offer is ignored)",
                    shorten(&protocol)
                ),
            )),
        }
    }

    /// DNS rebinding: a page whose name suddenly resolves to 127.0.0.1 still
    /// sends its own name in Host. Only the loopback names, the listen
    /// address and `guard.allowed_hosts` are accepted.
    fn check_host(&self, request: Line<'_>, fields: &impl FieldValues) -> Result<(), ProxyError> {
        let header = fields.first(&HOST);
        let authority = if request.version == Version::HTTP_2 {
            // HTTP/2 names its authority in `:authority`; a `host` header,
            // if any, must agree with it.
            let Some(authority) = request.uri.authority() else {
                return Err(bad_target("the HTTP/2 request has no :authority"));
            };
            if header.is_some_and(|h| !h.eq_ignore_ascii_case(authority.as_str().as_bytes())) {
                return Err(bad_target("the host header differs from :authority"));
            }
            authority.as_str()
        } else {
            match header {
                // HTTP/1.0 without Host: there is no name to rebind.
                None => return Ok(()),
                // The usual values, as they are: accepted before any
                // parsing (as `host_allowed` would).
                Some(host) if self.is_usual_host(host) => return Ok(()),
                Some(host) => match visible_ascii(host) {
                    Some(host) => host,
                    None => return Err(bad_target("the Host header is not plain ASCII")),
                },
            }
        };
        if self.host_allowed(authority) {
            return Ok(());
        }
        Err(ProxyError::new(
            ErrorCode::HostNotAllowed,
            format!(
                "the Host {:?} is not allowed: use localhost, or add the name to guard.allowed_hosts",
                shorten(authority)
            ),
        ))
    }

    fn is_usual_host(&self, host: &[u8]) -> bool {
        self.usual_hosts
            .iter()
            .any(|usual| usual.as_bytes().eq_ignore_ascii_case(host))
    }

    /// Compared without case and without allocating: this runs for every
    /// request.
    fn host_allowed(&self, authority: &str) -> bool {
        let authority = authority.trim();
        if self.is_usual_host(authority.as_bytes()) {
            return true;
        }
        let Some((host, _port)) = split_host_port(authority) else {
            return false;
        };
        let host = host.trim_end_matches('.');
        let localhost_suffix = host
            .len()
            .checked_sub(".localhost".len())
            .and_then(|start| host.get(start..))
            .is_some_and(|tail| tail.eq_ignore_ascii_case(".localhost"));
        if host.eq_ignore_ascii_case("localhost") || localhost_suffix {
            return true;
        }
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map(|ip| ip.to_canonical())
        {
            // An IP literal names no DNS entry that could be rebound.
            if ip.is_loopback() || self.any_ip || Some(ip) == self.listen_ip {
                return true;
            }
        }
        self.allowed_hosts.iter().any(|allowed| {
            allowed == "*"
                || allowed.eq_ignore_ascii_case(host)
                || allowed.eq_ignore_ascii_case(authority)
        })
    }

    /// Browsers: a page from another origin must not make calls with our
    /// credentials. Requests without Origin (curl, apps) are not browsers'.
    fn check_origin(&self, fields: &impl FieldValues) -> Result<(), ProxyError> {
        if let Some(origin) = fields.first(&ORIGIN) {
            let origin = visible_ascii(origin)
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if self.origin_allowed(&origin) {
                return Ok(());
            }
            return Err(ProxyError::new(
                ErrorCode::OriginNotAllowed,
                format!(
                    "requests from the web origin {:?} are refused: add it to guard.allowed_origins if it must call the API",
                    shorten(&origin)
                ),
            ));
        }
        let cross_site = fields
            .first(&SEC_FETCH_SITE)
            .and_then(visible_ascii)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("cross-site"));
        if cross_site {
            return Err(ProxyError::new(
                ErrorCode::OriginNotAllowed,
                "a cross-site browser request is refused: add its origin to guard.allowed_origins if it must call the API",
            ));
        }
        Ok(())
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        if self
            .allowed_origins
            .iter()
            .any(|allowed| allowed == "*" || allowed == origin)
        {
            return true;
        }
        // The proxy's own loopback origins (any port).
        let Some(rest) = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
        else {
            return false;
        };
        let Some((host, _)) = split_host_port(rest) else {
            return false;
        };
        host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    fn check_key(&self, fields: &impl FieldValues) -> Result<(), ProxyError> {
        let Some(key) = &self.local_key else {
            return Ok(());
        };
        let offered = fields.first(&PROXY_KEY).unwrap_or_default();
        if key.matches(offered) {
            return Ok(());
        }
        Err(ProxyError::new(
            ErrorCode::LocalKeyRequired,
            "this proxy requires its local key: send it in the X-Proxy-Key header (guard.local_key_file holds it)",
        ))
    }
}

/// `host:port`, `[v6]:port`, `host` → (host, port); `None` for anything
/// else (junk after `]`, a port that is not digits, userinfo).
fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    let valid_port = |port: &str| {
        !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
    };
    if authority.is_empty() || authority.contains(['@', '/', '\\', ' ']) {
        return None;
    }
    if authority.starts_with('[') {
        let end = authority.find(']')?;
        let (host, rest) = authority.split_at(end + 1);
        return match rest.strip_prefix(':') {
            None if rest.is_empty() => Some((host, None)),
            Some(port) if valid_port(port) => Some((host, Some(port))),
            _ => None,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => valid_port(port).then_some((host, Some(port))),
        Some(_) => None,
        None => Some((authority, None)),
    }
}

fn shorten(value: &str) -> String {
    value.chars().take(100).collect()
}

fn bad_target(message: &str) -> ProxyError {
    ProxyError::new(ErrorCode::BadRequestTarget, message)
}

fn check_target(request: Line<'_>, fields: &impl FieldValues) -> Result<(), ProxyError> {
    if *request.method == Method::CONNECT {
        return Err(bad_target(
            "CONNECT is refused: bearer-proxy forwards requests to its one upstream and opens no tunnels",
        ));
    }
    let hosts = fields.values_of(&HOST).count();
    if hosts > 1 {
        return Err(bad_target("the request carries more than one Host header"));
    }
    // HTTP/2 requests always carry their authority in the URI; only an
    // HTTP/1.1 request says it in the Host header, which it must have.
    let http1 = request.version <= Version::HTTP_11;
    if request.version == Version::HTTP_11 && hosts == 0 {
        return Err(bad_target(
            "the request has no Host header: HTTP/1.1 requires one",
        ));
    }
    if http1 && let Some(authority) = request.uri.authority() {
        let host = fields.first(&HOST).and_then(visible_ascii);
        if !host.is_some_and(|h| h.eq_ignore_ascii_case(authority.as_str())) {
            return Err(bad_target(
                "an absolute-form target naming another host is refused: bearer-proxy is not an open proxy",
            ));
        }
    }
    if has_dot_segment(request.uri.path()) {
        return Err(bad_target(
            "the path has a '.' or '..' segment (also as %2e): send the path already resolved",
        ));
    }
    Ok(())
}

/// Whether any segment of `path` is `.` or `..`, literally or percent-encoded
/// (`%2e`, `%2E`): a server that resolves them could be led out of the
/// upstream's base path with the token attached.
pub fn has_dot_segment(path: &str) -> bool {
    // Without allocating: this runs for every request.
    path.as_bytes().split(|b| *b == b'/').any(|mut segment| {
        let mut dots = 0;
        while !segment.is_empty() {
            if segment[0] == b'.' {
                segment = &segment[1..];
            } else if segment.len() >= 3 && segment[..3].eq_ignore_ascii_case(b"%2e") {
                segment = &segment[3..];
            } else {
                return false;
            }
            dots += 1;
        }
        dots == 1 || dots == 2
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard::new(&GuardConfig::default(), "127.0.0.1:8080".parse().ok())
    }

    fn code(guard: &Guard, request: Request<()>) -> Option<ErrorCode> {
        guard.check(&request).err().map(|e| e.code)
    }

    fn get(uri: &str) -> http::request::Builder {
        Request::builder().uri(uri).header("host", "localhost:8080")
    }

    #[test]
    fn refusals() -> Result<(), http::Error> {
        let g = guard();
        let connect = Request::builder()
            .method("CONNECT")
            .uri("evil.example:443")
            .header("host", "evil.example:443");
        assert_eq!(
            code(&g, connect.body(())?),
            Some(ErrorCode::BadRequestTarget)
        );
        assert_eq!(
            code(&g, get("/").method("TRACE").body(())?),
            Some(ErrorCode::MethodNotAllowed)
        );
        let ws = get("/")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket");
        assert_eq!(code(&g, ws.body(())?), None);
        let h2c = get("/x")
            .header("connection", "Upgrade, HTTP2-Settings")
            .header("upgrade", "h2c")
            .header("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA");
        assert_eq!(code(&g, h2c.body(())?), None);
        let other = get("/x")
            .header("connection", "upgrade")
            .header("upgrade", "IRC/6.9");
        assert_eq!(
            code(&g, other.body(())?),
            Some(ErrorCode::UpgradeNotSupported)
        );
        let post_ws = get("/x")
            .method("POST")
            .header("connection", "upgrade")
            .header("upgrade", "websocket");
        assert_eq!(
            code(&g, post_ws.body(())?),
            Some(ErrorCode::UpgradeNotSupported)
        );
        assert_eq!(code(&g, get("/x").method("PATCH").body(())?), None);
        assert_eq!(code(&g, get("/x").method("PURGE").body(())?), None);
        Ok(())
    }

    #[test]
    fn targets() -> Result<(), http::Error> {
        let g = guard();
        let bad = Some(ErrorCode::BadRequestTarget);
        assert_eq!(code(&g, get("http://evil.example/x").body(())?), bad);
        assert_eq!(code(&g, get("http://localhost:8080/x").body(())?), None);
        assert_eq!(
            code(&g, Request::builder().uri("/x").body(())?),
            bad,
            "HTTP/1.1 without Host"
        );
        let http10 = Request::builder().version(Version::HTTP_10).uri("/x");
        assert_eq!(code(&g, http10.body(())?), None, "HTTP/1.0 may omit Host");
        assert_eq!(code(&g, get("/x").header("host", "other").body(())?), bad);
        let h2 = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://localhost:8080/x");
        assert_eq!(code(&g, h2.body(())?), None);
        for path in ["/a/../b", "/..", "/./x", "/a/%2e%2E/b", "/%2e/x", "/a/.%2e"] {
            assert_eq!(code(&g, get(path).body(())?), bad, "{path}");
        }
        for path in [
            "/a/..b/c",
            "/.well-known/x",
            "/a/b.",
            "/x?path=../..",
            "//evil.example/x",
            "/a/.../b",
            "/a/%2e%2e%2e/b",
            "/a/%2",
            "/a/%2f",
        ] {
            assert_eq!(code(&g, get(path).body(())?), None, "{path}");
        }
        Ok(())
    }

    #[test]
    fn hosts() -> Result<(), http::Error> {
        let g = guard();
        let host = |h: &str| Request::builder().uri("/").header("host", h).body(());
        for ok in [
            "localhost",
            "localhost:1",
            "LOCALHOST.",
            "127.0.0.1:8080",
            "127.1.2.3",
            "[::1]:9",
            "app.localhost",
        ] {
            assert_eq!(code(&g, host(ok)?), None, "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:8080",
            "10.0.0.5:8080",
            "localhost.evil.example",
            "[::2]",
            "[::1]evil",
            "localhost:1@evil.example",
            "localhost:80x",
        ] {
            assert_eq!(
                code(&g, host(refused)?),
                Some(ErrorCode::HostNotAllowed),
                "{refused}"
            );
        }
        let h2 = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://rebound.example/x")
            .body(())?;
        assert_eq!(
            code(&g, h2),
            Some(ErrorCode::HostNotAllowed),
            "h2 is judged by :authority"
        );
        let h2 = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://rebound.example/x")
            .header("host", "localhost");
        assert_eq!(
            code(&g, h2.body(())?),
            Some(ErrorCode::BadRequestTarget),
            "host must agree with :authority"
        );
        let mapped = Request::builder()
            .uri("/")
            .header("host", "[::ffff:127.0.0.1]:8080")
            .body(())?;
        assert_eq!(
            code(&g, mapped),
            None,
            "an IPv4-mapped loopback is the loopback"
        );
        let binary = Request::builder()
            .uri("/")
            .header("host", http::HeaderValue::from_bytes(b"evil\x80")?);
        assert_eq!(
            code(&g, binary.body(())?),
            Some(ErrorCode::BadRequestTarget),
            "a non-ASCII Host is not 'no Host'"
        );

        let config = GuardConfig {
            allowed_hosts: vec!["bearer-proxy".into(), "api:8443".into()],
            ..GuardConfig::default()
        };
        let g = Guard::new(&config, "0.0.0.0:8080".parse().ok());
        for ok in [
            "bearer-proxy",
            "bearer-proxy:8080",
            "api:8443",
            "172.18.0.4:8080",
        ] {
            assert_eq!(code(&g, host(ok)?), None, "{ok}");
        }
        for refused in ["api:8080", "evil.example"] {
            assert_eq!(
                code(&g, host(refused)?),
                Some(ErrorCode::HostNotAllowed),
                "{refused}"
            );
        }
        Ok(())
    }

    #[test]
    fn origins() -> Result<(), http::Error> {
        let config = GuardConfig {
            allowed_origins: vec!["https://app.example.com".into()],
            ..GuardConfig::default()
        };
        let g = Guard::new(&config, "127.0.0.1:8080".parse().ok());
        let with = |name: &str, value: &str| get("/").header(name, value).body(());
        for ok in [
            "http://localhost:3000",
            "http://127.0.0.1:8080",
            "https://app.example.com",
            "http://[::1]:1",
        ] {
            assert_eq!(code(&g, with("origin", ok)?), None, "{ok}");
        }
        for refused in [
            "https://evil.example",
            "null",
            "http://localhost.evil.example",
            "https://app.example.com.evil",
        ] {
            assert_eq!(
                code(&g, with("origin", refused)?),
                Some(ErrorCode::OriginNotAllowed),
                "{refused}"
            );
        }
        assert_eq!(
            code(&g, with("sec-fetch-site", "cross-site")?),
            Some(ErrorCode::OriginNotAllowed)
        );
        assert_eq!(code(&g, with("sec-fetch-site", "same-origin")?), None);
        Ok(())
    }

    #[test]
    fn local_key_and_order() -> Result<(), http::Error> {
        let config = GuardConfig {
            local_key: Some(LocalKey::new("k3y-0123456789abcdef")),
            ..GuardConfig::default()
        };
        let g = Guard::new(&config, "127.0.0.1:8080".parse().ok());
        assert_eq!(
            code(&g, get("/").body(())?),
            Some(ErrorCode::LocalKeyRequired)
        );
        assert_eq!(
            code(&g, get("/").header("x-proxy-key", "wrong").body(())?),
            Some(ErrorCode::LocalKeyRequired)
        );
        assert_eq!(
            code(
                &g,
                get("/")
                    .header("x-proxy-key", "k3y-0123456789abcdef")
                    .body(())?
            ),
            None
        );
        // Order: Host before Origin before key before method.
        let all = Request::builder()
            .method("TRACE")
            .uri("/")
            .header("host", "evil")
            .header("origin", "https://evil");
        assert_eq!(code(&g, all.body(())?), Some(ErrorCode::HostNotAllowed));
        let all = get("/").method("TRACE").header("origin", "https://evil");
        assert_eq!(code(&g, all.body(())?), Some(ErrorCode::OriginNotAllowed));
        assert_eq!(
            code(&g, get("/").method("TRACE").body(())?),
            Some(ErrorCode::LocalKeyRequired)
        );
        Ok(())
    }
}
