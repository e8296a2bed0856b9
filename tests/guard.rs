//! The perimeter over real sockets: each refusal's status, JSON code, and an
//! upstream that received nothing.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn refused(proxy: &Proxy, request: &[u8], status: u16, code: &str) -> TestResult {
    let response = raw(proxy.addr, request).await?;
    let shown = String::from_utf8_lossy(request);
    assert_eq!(response.status, status, "{shown}");
    assert_eq!(
        response.header("x-bearer-proxy-error"),
        Some(code),
        "{shown}"
    );
    assert_eq!(response.header("content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&response.body)?;
    assert_eq!(body["error"], code);
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    Ok(())
}

#[tokio::test]
async fn foreign_hosts_are_refused_and_allowed_names_pass() -> TestResult {
    let (_token, upstream, proxy) = ready_proxy(&[(
        "BEARER_PROXY_GUARD_ALLOWED_HOSTS",
        "bearer-proxy, api.internal:8443",
    )])
    .await;
    for host in [
        "rebound.attacker.example",
        "rebound.attacker.example:8080",
        "api.internal:8080",
        "10.1.2.3",
    ] {
        let request = format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        refused(&proxy, request.as_bytes(), 403, "host_not_allowed").await?;
    }
    assert!(
        upstream.requests().is_empty(),
        "nothing refused reached the upstream"
    );

    for host in [
        "localhost:8080",
        "127.0.0.1",
        "[::1]:80",
        "bearer-proxy",
        "bearer-proxy:9999",
        "api.internal:8443",
    ] {
        let request = format!("GET /ok HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        assert_eq!(
            raw(proxy.addr, request.as_bytes()).await?.status,
            200,
            "{host}"
        );
    }
    assert_eq!(upstream.requests().len(), 6);
    Ok(())
}

#[tokio::test]
async fn h2_requests_are_judged_by_their_authority() -> TestResult {
    let (_token, upstream, proxy) = ready_proxy(&[]).await;
    // A prior-knowledge h2 client whose :authority is a rebound name.
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .resolve("rebound.attacker.example", proxy.addr)
        .build()?;
    let response = client
        .get(format!(
            "http://rebound.attacker.example:{}/x",
            proxy.addr.port()
        ))
        .send()
        .await?;
    assert_proxy_error(&response, 403, "host_not_allowed");
    let response = h2c().get(proxy.url("/fine")).send().await?;
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.requests().len(), 1);
    Ok(())
}

#[tokio::test]
async fn browsers_from_foreign_origins_are_refused() -> TestResult {
    let (_token, upstream, proxy) = ready_proxy(&[(
        "BEARER_PROXY_GUARD_ALLOWED_ORIGINS",
        "https://dashboard.example.com",
    )])
    .await;
    let cases: &[&[u8]] = &[
        b"POST /orders HTTP/1.1\r\nHost: localhost\r\nOrigin: https://evil.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        b"POST /orders HTTP/1.1\r\nHost: localhost\r\nOrigin: null\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        b"GET /orders HTTP/1.1\r\nHost: localhost\r\nSec-Fetch-Site: cross-site\r\nConnection: close\r\n\r\n",
    ];
    for request in cases {
        refused(&proxy, request, 403, "origin_not_allowed").await?;
    }
    assert!(upstream.requests().is_empty());
    let allowed: &[&[u8]] = &[
        b"GET /a HTTP/1.1\r\nHost: localhost\r\nOrigin: http://localhost:3000\r\nConnection: close\r\n\r\n",
        b"GET /b HTTP/1.1\r\nHost: localhost\r\nOrigin: https://dashboard.example.com\r\nSec-Fetch-Site: cross-site\r\nConnection: close\r\n\r\n",
        b"GET /c HTTP/1.1\r\nHost: localhost\r\nSec-Fetch-Site: same-origin\r\nConnection: close\r\n\r\n",
    ];
    for request in allowed {
        assert_eq!(raw(proxy.addr, request).await?.status, 200);
    }
    Ok(())
}

#[tokio::test]
async fn a_local_key_is_required_checked_and_never_forwarded() -> TestResult {
    let dir = std::env::temp_dir().join(format!("bearer-proxy-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let key_file = dir.join("local-key");
    std::fs::write(&key_file, "s3cr3t-local-key-0123456789\n")?;
    let (token, upstream, proxy) = ready_proxy(&[(
        "BEARER_PROXY_GUARD_LOCAL_KEY_FILE",
        key_file.to_str().unwrap_or_default(),
    )])
    .await;

    for request in [
        &b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"[..],
        b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-Proxy-Key: s3cr3t-local-key-012345678\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-Proxy-Key: s3cr3t-local-key-0123456789x\r\nConnection: close\r\n\r\n",
    ] {
        let response = raw(proxy.addr, request).await?;
        assert_eq!(response.status, 401);
        assert_eq!(response.header("x-bearer-proxy-error"), Some("local_key_required"));
        assert!(response.header("www-authenticate").is_some());
    }
    assert!(upstream.requests().is_empty());
    // The proxy's own 401 never forces a token renewal.
    assert_eq!(token.count(), 1);

    let response = http1()
        .get(proxy.url("/x"))
        .header("x-proxy-key", "s3cr3t-local-key-0123456789")
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(
        upstream.last().header("x-proxy-key"),
        None,
        "the local key is removed before forwarding"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[tokio::test]
async fn past_max_concurrent_requests_get_503_overloaded() -> TestResult {
    let upstream = FakeUpstream::with(|_| {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = tx.send(b"slow".to_vec()).await;
        });
        Reply::with_body(Body::Stream(rx))
    })
    .await;
    let (_token, proxy) = ready_proxy_to(
        &upstream.url(),
        &[("BEARER_PROXY_PROXY_MAX_CONCURRENT", "2")],
    )
    .await;
    let client = http1();
    let slow: Vec<_> = (0..2)
        .map(|i| tokio::spawn(client.get(proxy.url(&format!("/slow/{i}"))).send()))
        .collect();
    until(|| upstream.requests().len() == 2, "two requests in flight").await?;
    let response = client.get(proxy.url("/third")).send().await?;
    assert_proxy_error(&response, 503, "overloaded");
    assert_eq!(response.headers()["retry-after"], "1");
    for request in slow {
        assert_eq!(request.await??.text().await?, "slow");
    }
    assert_eq!(
        upstream.requests().len(),
        2,
        "the third never reached the upstream"
    );
    assert_eq!(
        client.get(proxy.url("/after")).send().await?.status(),
        200,
        "capacity is given back"
    );
    Ok(())
}

#[tokio::test]
async fn the_token_is_masked_in_every_spelling_of_a_masked_path() -> TestResult {
    let upstream = FakeUpstream::with(|request| {
        let bearer = request.bearer();
        let body = serde_json::json!({ "token": bearer, "audience": "api://x", "nested": { "echo": format!("Bearer {bearer}") } });
        Reply { status: 200, headers: vec![("content-type".into(), "application/json; charset=utf-8".into())], body: Body::Bytes(body.to_string().into_bytes()) }
    })
    .await;
    let (_token, proxy) = ready_proxy_to(&upstream.url(), &[]).await;
    for path in [
        "/api/status",
        "/api//status",
        "/api/%73tatus",
        "//api/status",
    ] {
        let response = http1()
            .get(proxy.url(path))
            .header("accept-encoding", "gzip, br")
            .send()
            .await?;
        let length: usize = response.headers()["content-length"].to_str()?.parse()?;
        let body = response.bytes().await?;
        assert_eq!(length, body.len(), "Content-Length is corrected");
        let json: serde_json::Value = serde_json::from_slice(&body)?;
        assert_eq!(json["token"], "[masked]", "{path}");
        assert_eq!(json["nested"]["echo"], "Bearer [masked]", "{path}");
        assert_eq!(json["audience"], "api://x");
        assert_eq!(upstream.last().header("accept-encoding"), None, "{path}");
    }
    Ok(())
}

#[tokio::test]
async fn hostile_input_is_refused_cleanly_and_others_are_still_served() -> TestResult {
    let (_token, upstream, proxy) =
        ready_proxy(&[("BEARER_PROXY_PROXY_HEADER_TIMEOUT", "500ms")]).await;

    let huge = format!(
        "GET /x HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(512 * 1024)
    );
    let many: String = (0..500).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET /x HTTP/1.1\r\nHost: localhost\r\n{many}Connection: close\r\n\r\n");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("oversized header", huge.into_bytes()),
        ("too many headers", many.into_bytes()),
        ("invalid header byte", b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-Bad: a\x01b\r\nConnection: close\r\n\r\n".to_vec()),
        ("invalid header name", b"GET /x HTTP/1.1\r\nHost: localhost\r\nX Bad: a\r\nConnection: close\r\n\r\n".to_vec()),
        ("obs-fold", b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-Fold: a\r\n b\r\nConnection: close\r\n\r\n".to_vec()),
        ("two different Content-Lengths", b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd".to_vec()),
        ("Content-Length with junk", b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3x\r\nConnection: close\r\n\r\nabc".to_vec()),
        ("Transfer-Encoding not ending in chunked", b"POST /x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nabc".to_vec()),
        ("bad chunk size", b"POST /x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".to_vec()),
        ("bare LF request line junk", b"\x00\x01\x02 garbage\r\n\r\n".to_vec()),
    ];
    for (name, request) in &cases {
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await?;
        let _ = stream.write_all(request).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        let status = RawResponse::parse(&answer).map(|r| r.status).unwrap_or(0);
        assert!(
            status == 0 || (400..500).contains(&status),
            "{name}: got {status}"
        );
    }
    // Both Content-Length and chunked: the body is read as chunked and
    // forwarded with unambiguous framing, never with both headers.
    let smuggle = b"POST /cl-te HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let response = raw(proxy.addr, smuggle).await?;
    if response.status == 200 {
        let seen = upstream.last();
        assert_eq!(seen.body, b"abc");
        assert!(
            !(seen.header("content-length").is_some()
                && seen.header("transfer-encoding").is_some()),
            "{seen:?}"
        );
    } else {
        assert_eq!(response.status, 400);
    }
    let forwarded: Vec<String> = upstream
        .requests()
        .iter()
        .map(Recorded::target_str)
        .filter(|t| t != "/cl-te")
        .collect();
    assert!(
        forwarded.is_empty(),
        "hostile requests reached the upstream: {forwarded:?}"
    );

    // A slow client: headers never finished within proxy.header_timeout.
    let mut slow = tokio::net::TcpStream::connect(proxy.addr).await?;
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: local").await?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the proxy closed the slow connection itself");

    // A client that connects and sends nothing, or half an HTTP/2 preface,
    // is cut too.
    for opening in [&b""[..], b"PRI * HT"] {
        let mut idle = tokio::net::TcpStream::connect(proxy.addr).await?;
        idle.write_all(opening).await?;
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut answer)).await;
        assert!(
            read.is_ok(),
            "a connection opened with {opening:?} was held open"
        );
    }

    // Everyone else is still served.
    assert_eq!(
        http1().get(proxy.url("/still-fine")).send().await?.status(),
        200
    );
    Ok(())
}

#[tokio::test]
async fn the_header_timeout_never_cuts_a_slow_answer() -> TestResult {
    let upstream = FakeUpstream::with(|_| {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = tx.send(b"tick ".to_vec()).await;
            }
        });
        Reply::with_body(Body::Stream(rx))
    })
    .await;
    let (_token, proxy) = ready_proxy_to(
        &upstream.url(),
        &[("BEARER_PROXY_PROXY_HEADER_TIMEOUT", "500ms")],
    )
    .await;
    // A 1.2 s answer, to a short request (fewer bytes than the HTTP/2
    // preface, served by hyper) and to one served on the lean path.
    for request in [
        &b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    ] {
        let response = raw(proxy.addr, request).await?;
        assert_eq!(response.status, 200);
        // Close-delimited to HTTP/1.0, chunked to HTTP/1.1: whole either way.
        assert_eq!(
            String::from_utf8_lossy(&response.body)
                .matches("tick")
                .count(),
            4
        );
    }
    Ok(())
}

#[tokio::test]
async fn masking_fails_closed_and_covers_every_spelling() -> TestResult {
    let upstream = FakeUpstream::with(|request| {
        let bearer = request.bearer();
        match request.target_str().as_str() {
            "/api/status/gzip" => Reply::ok("compressed").header("content-encoding", "gzip"),
            _ => Reply::ok(&format!("token={bearer}; up")),
        }
    })
    .await;
    let mask = [(
        "BEARER_PROXY_PROXY_MASK_TOKEN_IN",
        "/api/status,/api/status/gzip",
    )];
    let (_token, proxy) = ready_proxy_to(&upstream.url(), &mask).await;
    for path in [
        "/api/status",
        "/API/Status",
        "/api/status/",
        "/api//%53tatus",
    ] {
        let text = http1().get(proxy.url(path)).send().await?.text().await?;
        assert_eq!(
            text, "token=[masked]; up",
            "{path}: a non-JSON answer is masked too"
        );
    }
    let response = http1().get(proxy.url("/api/status/gzip")).send().await?;
    assert_eq!(
        response.status(),
        502,
        "a compressed answer cannot be searched: refused, not passed on"
    );
    assert_eq!(
        response.headers()["x-bearer-proxy-error"],
        "upstream_unreachable"
    );
    Ok(())
}

#[tokio::test]
async fn framing_another_server_could_read_otherwise_is_refused() -> TestResult {
    let (_token, upstream, proxy) = ready_proxy(&[]).await;
    let cases: [(&[u8], u16, &str); 6] = [
        (
            b"POST /gz HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            501,
            "transfer_coding_not_supported",
        ),
        (
            b"POST /cow HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: cow, chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            501,
            "transfer_coding_not_supported",
        ),
        (
            b"POST /two HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            501,
            "transfer_coding_not_supported",
        ),
        (
            b"GET /u HTTP/1.1\r\nHost: localhost\r\nContent_Length: 5\r\nConnection: close\r\n\r\n",
            400,
            "ambiguous_header",
        ),
        (
            b"POST /u HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\nTRANSFER_ENCODING: chunked\r\nConnection: close\r\n\r\nabc",
            400,
            "ambiguous_header",
        ),
        (
            b"POST /u HTTP/1.1\r\nHost: localhost\r\ntransfer_encoding: chunked\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            400,
            "ambiguous_header",
        ),
    ];
    for (request, status, code) in cases {
        refused(&proxy, request, status, code).await?;
    }
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());

    // Chunked alone, in any case, is the framing it is.
    let response = raw(
        proxy.addr,
        b"POST /ok HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await?;
    assert_eq!(response.status, 200);
    assert_eq!(upstream.last().body, b"abc");
    Ok(())
}
