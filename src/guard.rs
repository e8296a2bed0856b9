//! Who and what may use the proxy. Checks run in DESIGN.md's order: target,
//! Host, Origin, local key, method, capacity. This version checks the target
//! and the method; the Host, Origin and local-key checks come next.

use http::header::{CONNECTION, UPGRADE};
use http::{Method, Request};

use crate::proxy::{ErrorCode, ProxyError};

/// Refuses what the proxy must never forward.
pub fn check<B>(request: &Request<B>) -> Result<(), ProxyError> {
    if request.method() == Method::CONNECT {
        return Err(ProxyError::new(
            ErrorCode::BadRequestTarget,
            "CONNECT is refused: bearer-proxy forwards requests to its one upstream and opens no tunnels",
        ));
    }
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

    #[test]
    fn refusals() -> Result<(), http::Error> {
        assert_eq!(
            code(
                Request::builder()
                    .method("CONNECT")
                    .uri("evil.example:443")
                    .body(())?
            ),
            Some(ErrorCode::BadRequestTarget)
        );
        assert_eq!(
            code(Request::builder().method("TRACE").uri("/").body(())?),
            Some(ErrorCode::MethodNotAllowed)
        );
        let ws = Request::builder()
            .uri("/")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())?;
        assert_eq!(code(ws), Some(ErrorCode::UpgradeNotSupported));
        assert_eq!(
            code(Request::builder().method("PATCH").uri("/x").body(())?),
            None
        );
        assert_eq!(
            code(Request::builder().method("PURGE").uri("/x").body(())?),
            None
        );
        Ok(())
    }
}
