//! HTTPS to the upstream: a private CA made by the test, refused without
//! `tls.ca_file` and served with it; HTTP/2 by ALPN where offered.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::pki::{Pki, TlsServer};
use support::*;

/// A TLS upstream that answers with the HTTP version it was spoken to in,
/// the path, the Authorization it got and the protocol ALPN agreed (or
/// "no-alpn").
async fn tls_upstream(
    pki: &Pki,
    alpn: &[&[u8]],
) -> Result<SocketAddr, Box<dyn std::error::Error + Send + Sync>> {
    TlsServer {
        alpn,
        require_client_cert: false,
    }
    .serve(pki, |tls| async move {
        let alpn = tls.get_ref().1.alpn_protocol().map_or_else(
            || "no-alpn".to_owned(),
            |p| String::from_utf8_lossy(p).into_owned(),
        );
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let alpn = alpn.clone();
            async move {
                let auth = request
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let body = format!(
                    "{:?} {} {} {alpn}",
                    request.version(),
                    request.uri().path(),
                    auth
                );
                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
            }
        });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tls), service)
            .await;
    })
    .await
}

#[tokio::test]
async fn a_private_ca_is_refused_without_tls_ca_file_and_trusted_with_it() -> TestResult {
    let pki = Pki::new()?;
    let addr = tls_upstream(&pki, &[b"h2", b"http/1.1"]).await?;
    let upstream = format!("https://localhost:{}/base", addr.port());
    let token = FakeTokenEndpoint::start().await;

    let proxy = start_proxy(&token, &upstream, &[]).await;
    let response = http1().get(proxy.url("/x")).send().await?;
    assert_proxy_error(&response, 502, "upstream_unreachable");
    let body: serde_json::Value = response.json().await?;
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("TLS")
            && message.contains("unknown issuer")
            && message.contains("tls.ca_file"),
        "{message}"
    );

    let ca_file = pki.write_ca()?;
    let proxy = start_proxy(
        &token,
        &upstream,
        &[(
            "BEARER_PROXY_TLS_CA_FILE",
            ca_file.to_str().unwrap_or_default(),
        )],
    )
    .await;
    for client in [http1(), h2c()] {
        let response = client.get(proxy.url("/x")).send().await?;
        assert_eq!(response.status(), 200);
        let text = response.text().await?;
        assert!(
            text.starts_with("HTTP/2.0 /base/x Bearer token-"),
            "h2 is negotiated when offered: {text}"
        );
    }
    Ok(())
}

/// The proxy, with a token endpoint of its own, in front of the TLS
/// upstream at `addr`, trusting the test's CA, with `extra` settings.
async fn proxy_trusting(
    addr: SocketAddr,
    ca_file: &str,
    extra: &[(&str, &str)],
) -> (FakeTokenEndpoint, Proxy) {
    let token = FakeTokenEndpoint::start().await;
    let upstream = format!("https://localhost:{}", addr.port());
    let mut settings = vec![("BEARER_PROXY_TLS_CA_FILE", ca_file)];
    settings.extend_from_slice(extra);
    let proxy = start_proxy(&token, &upstream, &settings).await;
    (token, proxy)
}

#[tokio::test]
async fn http1_is_used_where_the_upstream_offers_only_http1() -> TestResult {
    let pki = Pki::new()?;
    let addr = tls_upstream(&pki, &[b"http/1.1"]).await?;
    let ca_file = pki.write_ca()?;
    let (_token, proxy) = proxy_trusting(addr, ca_file.to_str().unwrap_or_default(), &[]).await;
    for client in [http1(), h2c()] {
        let text = client.get(proxy.url("/y")).send().await?.text().await?;
        assert!(text.starts_with("HTTP/1.1 /y Bearer token-"), "{text}");
    }
    Ok(())
}

#[tokio::test]
async fn with_http2_off_alpn_offers_http1_alone_and_upgrades_get_through() -> TestResult {
    let pki = Pki::new()?;
    let ca_file = pki.write_ca()?;
    let ca_file = ca_file.to_str().unwrap_or_default();
    // A server that prefers h2 agrees on what the client offers.
    let both = tls_upstream(&pki, &[b"h2", b"http/1.1"]).await?;
    for (http2, expected) in [
        ("true", "HTTP/2.0 /z Bearer token-1 h2"),
        ("false", "HTTP/1.1 /z Bearer token-1 http/1.1"),
    ] {
        let (_token, proxy) =
            proxy_trusting(both, ca_file, &[("BEARER_PROXY_UPSTREAM_HTTP2", http2)]).await;
        for client in [http1(), h2c()] {
            let text = client.get(proxy.url("/z")).send().await?.text().await?;
            assert_eq!(text, expected, "upstream.http2 = {http2}");
        }
        // A WebSocket handshake cannot go over HTTP/2 (502, saying why);
        // with it off it reaches the upstream over HTTP/1.1, which answers
        // it (here with a 200, passed back as any answer).
        let response = http1()
            .get(proxy.url("/ws"))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .send()
            .await?;
        if http2 == "true" {
            assert_eq!(response.status(), 502);
            let text = response.text().await?;
            assert!(
                text.contains("HTTP/2") && text.contains("upstream_unreachable"),
                "{text}"
            );
        } else {
            assert_eq!(response.status(), 200);
            let text = response.text().await?;
            assert_eq!(text, "HTTP/1.1 /ws Bearer token-1 http/1.1");
        }
    }

    // An upstream that speaks only HTTP/2 cannot be reached with it off:
    // the handshake fails, and the answer says so.
    let h2_only = tls_upstream(&pki, &[b"h2"]).await?;
    let (_token, proxy) = proxy_trusting(
        h2_only,
        ca_file,
        &[("BEARER_PROXY_UPSTREAM_HTTP2", "false")],
    )
    .await;
    let response = http1().get(proxy.url("/z")).send().await?;
    assert_proxy_error(&response, 502, "upstream_unreachable");
    let body: serde_json::Value = response.json().await?;
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("TLS"), "{message}");
    Ok(())
}

#[tokio::test]
async fn tls_failures_name_the_problem() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    let upstream = FakeUpstream::start().await;

    // The certificate names localhost; the upstream is called by its IP.
    let pki = Pki::new()?;
    let front = support::pki::tls_front(&pki, upstream.addr).await?;
    let ca = pki.write_ca()?;
    let ca = ca.to_str().unwrap_or_default();
    let by_ip = format!("https://127.0.0.1:{}", front.port());
    let proxy = start_proxy(&token, &by_ip, &[("BEARER_PROXY_TLS_CA_FILE", ca)]).await;
    let body: serde_json::Value = http1().get(proxy.url("/x")).send().await?.json().await?;
    assert_text_contains(&body, "message", "wrong host name");

    // An expired certificate.
    let expired = Pki::expired()?;
    let front = support::pki::tls_front(&expired, upstream.addr).await?;
    let ca = expired.write_ca()?;
    let url = format!("https://localhost:{}", front.port());
    let proxy = start_proxy(
        &token,
        &url,
        &[("BEARER_PROXY_TLS_CA_FILE", ca.to_str().unwrap_or_default())],
    )
    .await;
    let response = http1().get(proxy.url("/x")).send().await?;
    assert_eq!(response.status(), 502);
    let body: serde_json::Value = response.json().await?;
    assert_text_contains(&body, "message", "expired");
    assert!(upstream.requests().is_empty());
    Ok(())
}
