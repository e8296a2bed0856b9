//! Who and what may use the proxy. Checks run in DESIGN.md's order: target,
//! Host, Origin, local key, method, capacity. This version checks the target
//! (no tunnel, no other authority, no dot-segment, exactly one Host) and the
//! method; the Host allow-list, Origin and local-key checks come next.

use http::header::{CONNECTION, HOST, UPGRADE};
use http::{Method, Request, Version};

use crate::proxy::{ErrorCode, ProxyError};

/// Refuses what the proxy must never forward.
pub fn check<B>(request: &Request<B>) -> Result<(), ProxyError> {
    check_target(request)?;
    if request.method() == Method::TRACE {
        return Err(ProxyError::new(
            ErrorCode::MethodNotAllowed,
            "TRACE is refused: the upstream would echo the injected token back",
        ));
    }
    if is_upgrade(request) {
        return Err(ProxyError::new(
            ErrorCode::UpgradeNotSupported,
            "protocol upgrades (WebSocket) are not supported: send plain HTTP requests",
        ));
    }
    Ok(())
}

fn bad_target(message: &str) -> ProxyError {
    ProxyError::new(ErrorCode::BadRequestTarget, message)
}

fn check_target<B>(request: &Request<B>) -> Result<(), ProxyError> {
    if request.method() == Method::CONNECT {
        return Err(bad_target(
            "CONNECT is refused: bearer-proxy forwards requests to its one upstream and opens no tunnels",
        ));
    }
    let hosts = request.headers().get_all(HOST).iter().count();
    if hosts > 1 {
        return Err(bad_target("the request carries more than one Host header"));
    }
    // HTTP/2 requests always carry their authority in the URI; only an
    // HTTP/1.1 request says it in the Host header, which it must have.
    let http1 = request.version() <= Version::HTTP_11;
    if http1 && hosts == 0 && request.version() == Version::HTTP_11 {
        return Err(bad_target(
            "the request has no Host header: HTTP/1.1 requires one",
        ));
    }
    if http1 && let Some(authority) = request.uri().authority() {
        let host = request.headers().get(HOST).and_then(|h| h.to_str().ok());
        if !host.is_some_and(|h| h.eq_ignore_ascii_case(authority.as_str())) {
            return Err(bad_target(
                "an absolute-form target naming another host is refused: bearer-proxy is not an open proxy",
            ));
        }
    }
    if has_dot_segment(request.uri().path()) {
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
    path.split('/').any(|segment| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

fn is_upgrade<B>(request: &Request<B>) -> bool {
    request.headers().contains_key(UPGRADE)
        && request
            .headers()
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(request: Request<()>) -> Option<ErrorCode> {
        check(&request).err().map(|e| e.code)
    }

    fn get(uri: &str) -> http::request::Builder {
        Request::builder().uri(uri).header("host", "localhost:8080")
    }

    #[test]
    fn refusals() -> Result<(), http::Error> {
        let connect = Request::builder()
            .method("CONNECT")
            .uri("evil.example:443")
            .header("host", "evil.example:443");
        assert_eq!(code(connect.body(())?), Some(ErrorCode::BadRequestTarget));
        assert_eq!(
            code(get("/").method("TRACE").body(())?),
            Some(ErrorCode::MethodNotAllowed)
        );
        let ws = get("/")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket");
        assert_eq!(code(ws.body(())?), Some(ErrorCode::UpgradeNotSupported));
        assert_eq!(code(get("/x").method("PATCH").body(())?), None);
        assert_eq!(code(get("/x").method("PURGE").body(())?), None);
        Ok(())
    }

    #[test]
    fn targets() -> Result<(), http::Error> {
        let bad = Some(ErrorCode::BadRequestTarget);
        assert_eq!(code(get("http://evil.example/x").body(())?), bad);
        assert_eq!(code(get("http://localhost:8080/x").body(())?), None);
        assert_eq!(
            code(Request::builder().uri("/x").body(())?),
            bad,
            "HTTP/1.1 without Host"
        );
        let http10 = Request::builder().version(Version::HTTP_10).uri("/x");
        assert_eq!(code(http10.body(())?), None, "HTTP/1.0 may omit Host");
        let two = get("/x").header("host", "other");
        assert_eq!(code(two.body(())?), bad);
        let h2 = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://localhost:8080/x");
        assert_eq!(code(h2.body(())?), None);
        for path in ["/a/../b", "/..", "/./x", "/a/%2e%2E/b", "/%2e/x", "/a/.%2e"] {
            assert_eq!(code(get(path).body(())?), bad, "{path}");
        }
        for path in [
            "/a/..b/c",
            "/.well-known/x",
            "/a/b.",
            "/x?path=../..",
            "//evil.example/x",
        ] {
            assert_eq!(code(get(path).body(())?), None, "{path}");
        }
        Ok(())
    }
}
