//! Upgrades and bodies as the clients of legacy apps send them: an h2c
//! offer is ignored (on the lean path and on hyper's), a WebSocket
//! handshake is forwarded and then relayed both ways, other upgrades are
//! refused by name, and a body on any method reaches the upstream.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What Java's default `HttpClient` and `curl --http2` add to every
/// `http://` request.
const H2C_OFFER: &str = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAEAAEAAAAIAAAABAAMAAABkAAQBAAAAAAUAAEAA\r\n";

/// Reads one answer (head and a Content-Length body) from `stream`.
async fn answer_on(stream: &mut TcpStream) -> std::io::Result<RawResponse> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Ok(response) = RawResponse::parse(&bytes) {
            let length = response
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if response.body.len() >= length && response.status >= 200 {
                return Ok(response);
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
        if n == 0 {
            return RawResponse::parse(&bytes);
        }
        bytes.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn an_h2c_offer_is_ignored_and_the_request_served_over_http1() -> TestResult {
    let (_token, upstream, proxy) = ready_proxy(&[]).await;
    let requests = [
        // Lean path: no body.
        format!("GET /lean?a=1 HTTP/1.1\r\nHost: localhost\r\n{H2C_OFFER}\r\n"),
        // Hyper's path: a body, and one announced with Expect.
        format!(
            "POST /posted HTTP/1.1\r\nHost: localhost\r\n{H2C_OFFER}Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{{\"a\":1}}"
        ),
        format!(
            "PUT /expected HTTP/1.1\r\nHost: localhost\r\n{H2C_OFFER}Expect: 100-continue\r\nContent-Length: 3\r\n\r\nabc"
        ),
    ];
    // One connection for all: the offer does not end it.
    let mut stream = TcpStream::connect(proxy.addr).await?;
    for request in &requests {
        stream.write_all(request.as_bytes()).await?;
        let response = answer_on(&mut stream).await?;
        assert_eq!(response.status, 200, "{request}");
        assert_eq!(response.header("upgrade"), None);
    }
    let seen = upstream.requests();
    assert_eq!(seen.len(), 3);
    for request in &seen {
        for name in ["upgrade", "http2-settings", "connection"] {
            assert_eq!(request.header(name), None, "{name} in {request:?}");
        }
        assert!(request.header("authorization").is_some());
    }
    assert_eq!(seen[1].body, b"{\"a\":1}");
    assert_eq!(seen[2].body, b"abc");
    Ok(())
}

#[tokio::test]
async fn bodies_on_any_method_reach_the_upstream() -> TestResult {
    let (_token, upstream, proxy) = ready_proxy(&[]).await;
    for method in ["GET", "DELETE", "OPTIONS", "HEAD"] {
        for chunked in [false, true] {
            let framing = if chunked {
                "Transfer-Encoding: chunked\r\n\r\n4\r\nfind\r\n3\r\n me\r\n0\r\n\r\n".to_owned()
            } else {
                "Content-Length: 7\r\n\r\nfind me".to_owned()
            };
            let request = format!(
                "{method} /search HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{framing}"
            );
            let response = raw(proxy.addr, request.as_bytes()).await?;
            assert_eq!(response.status, 200, "{request}");
            let seen = upstream.last();
            assert_eq!(seen.method, method);
            assert_eq!(seen.body, b"find me", "{request}");
            assert_eq!(seen.chunked, chunked, "{request}");
        }
    }
    Ok(())
}

/// A WebSocket upstream in miniature: checks the handshake, answers 101
/// with a first message right behind it, then echoes bytes back until
/// the client closes. Records the handshakes it received.
async fn echo_upstream(refuse_first: bool) -> std::io::Result<(String, Arc<Mutex<Vec<String>>>)> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let (addr, _) = raw_upstream(move |mut stream, head| {
        let record = record.clone();
        async move {
            let head = String::from_utf8_lossy(&head).into_owned();
            let first = {
                let mut seen = record.lock().unwrap_or_else(|e| e.into_inner());
                seen.push(head.clone());
                seen.len() == 1
            };
            if refuse_first && first {
                let _ = stream
                    .write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
                    .await;
                return;
            }
            let _ = stream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nhello")
                .await;
            let mut buf = [0u8; 65536];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    })
    .await?;
    Ok((format!("http://{addr}"), seen))
}

const HANDSHAKE: &[u8] = b"GET /feed?x=1 HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nUser-Agent: a-browser\r\n\r\n";

/// Sends the handshake on a new connection; the 101's head and the
/// stream, positioned after it.
async fn handshake(proxy: &Proxy) -> std::io::Result<(String, TcpStream, Vec<u8>)> {
    let mut stream = TcpStream::connect(proxy.addr).await?;
    stream.write_all(HANDSHAKE).await?;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    while !bytes.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&buf[..n]);
    }
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(bytes.len(), |at| at + 4);
    let rest = bytes.split_off(end);
    Ok((String::from_utf8_lossy(&bytes).into_owned(), stream, rest))
}

/// Reads exactly `n` bytes, with what was already read first.
async fn read_n(stream: &mut TcpStream, mut have: Vec<u8>, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = [0u8; 65536];
    while have.len() < n {
        let got = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
        if got == 0 {
            break;
        }
        have.extend_from_slice(&buf[..got]);
    }
    Ok(have)
}

#[tokio::test]
async fn a_websocket_is_forwarded_with_the_token_then_relayed_both_ways() -> TestResult {
    let (url, seen) = echo_upstream(false).await?;
    let (_token, proxy) = ready_proxy_to(&url, &[]).await;
    let (head, mut stream, rest) = handshake(&proxy).await?;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    assert!(
        lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );

    // The upstream's first message came right behind its 101.
    let first = read_n(&mut stream, rest, 5).await?;
    assert_eq!(first, b"hello");
    // A large message both ways, byte for byte.
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let (mut reader, mut writer) = stream.into_split();
    let sent = big.clone();
    let writing = tokio::spawn(async move { writer.write_all(&sent).await.map(|()| writer) });
    let mut echoed = Vec::with_capacity(big.len());
    let mut buf = [0u8; 65536];
    while echoed.len() < big.len() {
        let n = tokio::time::timeout(Duration::from_secs(5), reader.read(&mut buf)).await??;
        assert!(n > 0, "the tunnel closed early");
        echoed.extend_from_slice(&buf[..n]);
    }
    assert!(echoed == big, "the echo differs");
    drop(writing.await??);

    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let handshake = seen[0].to_ascii_lowercase();
    assert!(
        handshake.starts_with("get /feed?x=1 http/1.1\r\n"),
        "{handshake}"
    );
    for field in [
        "authorization: bearer token-1",
        "connection: upgrade",
        "upgrade: websocket",
        "sec-websocket-key: dghlihnhbxbszsbub25jzq==",
        "sec-websocket-version: 13",
    ] {
        assert!(handshake.contains(field), "{field} missing: {handshake}");
    }
    assert!(!handshake.contains("a-browser"), "{handshake}");
    Ok(())
}

#[tokio::test]
async fn a_refused_websocket_handshake_is_renewed_and_replayed() -> TestResult {
    let (url, seen) = echo_upstream(true).await?;
    let (token, proxy) = ready_proxy_to(&url, &[]).await;
    let (head, mut stream, rest) = handshake(&proxy).await?;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(read_n(&mut stream, rest, 5).await?, b"hello");
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(seen.len(), 2);
    assert!(seen[0].contains("Bearer token-1"));
    assert!(seen[1].contains("Bearer token-2"));
    assert_eq!(token.count(), 2);
    Ok(())
}

#[tokio::test]
async fn a_websocket_the_upstream_refuses_gets_its_answer() -> TestResult {
    let (addr, _) = answering(
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nno way",
    )
    .await?;
    let (_token, proxy) = ready_proxy_to(&format!("http://{addr}"), &[]).await;
    let mut stream = TcpStream::connect(proxy.addr).await?;
    stream.write_all(HANDSHAKE).await?;
    let response = answer_on(&mut stream).await?;
    assert_eq!(response.status, 403);
    assert_eq!(response.body, b"no way");
    assert_eq!(response.header("x-bearer-proxy-error"), None);
    Ok(())
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_and_frees_its_capacity() -> TestResult {
    let (url, _) = echo_upstream(false).await?;
    let (_token, proxy) = ready_proxy_to(
        &url,
        &[
            ("BEARER_PROXY_PROXY_TUNNEL_IDLE_TIMEOUT", "300ms"),
            ("BEARER_PROXY_PROXY_MAX_CONCURRENT", "1"),
        ],
    )
    .await;
    let (head, mut stream, rest) = handshake(&proxy).await?;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(read_n(&mut stream, rest, 5).await?, b"hello");
    // While the tunnel is open, it holds the one place.
    let busy = raw(
        proxy.addr,
        b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(busy.status, 503);
    assert_eq!(busy.header("x-bearer-proxy-error"), Some("overloaded"));
    // Silent both ways: closed after the idle timeout.
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
    assert_eq!(closed, 0);
    // The place is free again.
    let mut status = 0;
    for _ in 0..50 {
        let response = raw(
            proxy.addr,
            b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await?;
        status = response.status;
        if status != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ne!(status, 503);
    Ok(())
}

#[tokio::test]
async fn a_tunnel_is_closed_once_the_shutdown_grace_has_passed() -> TestResult {
    let (url, _) = echo_upstream(false).await?;
    let (_token, proxy) = ready_proxy_to(&url, &[("BEARER_PROXY_SHUTDOWN_GRACE", "500ms")]).await;
    let (head, mut stream, rest) = handshake(&proxy).await?;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(read_n(&mut stream, rest, 5).await?, b"hello");
    let started = std::time::Instant::now();
    proxy.shutdown.cancel();
    // Still relaying during the grace.
    stream.write_all(b"still there").await?;
    assert_eq!(read_n(&mut stream, Vec::new(), 11).await?, b"still there");
    // Then closed, and the proxy ends.
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await?;
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    let ended = tokio::time::timeout(Duration::from_secs(5), proxy.task).await?;
    assert!(ended.is_ok());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(4),
        "{took:?}"
    );
    Ok(())
}

/// An upstream that switches to `protocol` whatever was asked, then
/// echoes; records the heads it received.
async fn switching_upstream(
    protocol: &'static str,
) -> std::io::Result<(String, Arc<Mutex<Vec<String>>>)> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let (addr, _) = raw_upstream(move |mut stream, head| {
        let record = record.clone();
        async move {
            record
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(String::from_utf8_lossy(&head).into_owned());
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: {protocol}\r\nConnection: Upgrade\r\n\r\n"
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    })
    .await?;
    Ok((format!("http://{addr}"), seen))
}

#[tokio::test]
async fn only_websocket_is_asked_for_and_only_websocket_is_tunnelled() -> TestResult {
    // A client that names another protocol beside websocket: the upstream
    // is asked for websocket alone.
    let (url, seen) = echo_upstream(false).await?;
    let (_token, proxy) = ready_proxy_to(&url, &[]).await;
    let mut stream = TcpStream::connect(proxy.addr).await?;
    stream
        .write_all(b"GET /feed HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: IRC/6.9\r\nUpgrade: h2c, websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await?;
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
    let forwarded = seen.lock().unwrap_or_else(|e| e.into_inner())[0].to_ascii_lowercase();
    assert!(
        forwarded.contains("\r\nupgrade: websocket\r\n"),
        "{forwarded}"
    );
    assert!(
        !forwarded.contains("irc") && !forwarded.contains("h2c"),
        "{forwarded}"
    );

    // An upstream that switches to something else is not tunnelled to.
    for protocol in ["h2c", "IRC/6.9"] {
        let (url, _) = switching_upstream(protocol).await?;
        let (_token, proxy) = ready_proxy_to(&url, &[]).await;
        let (head, _, _) = handshake(&proxy).await?;
        assert!(head.starts_with("HTTP/1.1 502"), "{protocol}: {head}");
        assert!(head.contains("upstream_unreachable"), "{head}");
    }

    // Nor is a 101 that nobody asked for passed on.
    let (url, _) = switching_upstream("websocket").await?;
    let (_token, proxy) = ready_proxy_to(&url, &[]).await;
    let plain = raw(
        proxy.addr,
        b"GET /plain HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(plain.status, 502);
    Ok(())
}

#[tokio::test]
async fn handshakes_that_cannot_be_tunnelled_are_refused() -> TestResult {
    let (url, seen) = echo_upstream(false).await?;
    let (_token, proxy) =
        ready_proxy_to(&url, &[("BEARER_PROXY_PROXY_MASK_TOKEN_IN", "/status")]).await;
    let with_body = raw(
        proxy.addr,
        b"GET /feed HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await?;
    assert_eq!(with_body.status, 501);
    assert_eq!(
        with_body.header("x-bearer-proxy-error"),
        Some("upgrade_not_supported")
    );
    let masked = raw(
        proxy.addr,
        b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\r\n",
    )
    .await?;
    assert_eq!(masked.status, 501);
    // HTTP/1.0 has no upgrades: the offer is ignored, the GET served.
    let old = raw(
        proxy.addr,
        b"GET /old HTTP/1.0\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await?;
    assert_ne!(
        old.header("x-bearer-proxy-error"),
        Some("upgrade_not_supported")
    );
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        seen.iter()
            .all(|head| !head.contains("/feed") && !head.contains("/status"))
    );
    assert!(
        seen.iter()
            .all(|head| !head.to_ascii_lowercase().contains("upgrade:"))
    );
    Ok(())
}
